//! `plumb run` and `plumb validate`: everything is checked before any compute starts,
//! then the stages run in order, each handing its model directory to the next. An entry
//! of `stages:` that names an evaluator runs it on the current model (the previous
//! stage's output or its own `model:`) and records its metrics: `<name>/results.json`,
//! `<name>/report.json`, a TensorBoard scalar per metric in `tb/<name>/`, and stdout.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use plumb_core::checkpoint::write_file_atomically;
use plumb_core::context::RunRequest;
use plumb_core::dist::{ProcessGroup, Rendezvous};
use plumb_core::plugin::CreateRequest;
use plumb_host::log::progress::Progress;
use plumb_host::log::TbWriter;
use plumb_host::plugin::host::HostServices;
use plumb_host::plugin::registry::RewardInstance;
use plumb_host::plugin::{loader, CallError, Component, Kind, Registry};
use plumb_host::recipe::options::fill_defaults;
use plumb_host::recipe::{LoadedRecipe, ModelSource, Recipe, RecipeError};

use crate::output_dir::{self, Earlier};
use crate::summary::{RunSummary, StageSummary};
use crate::Failure;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Run into a new or empty output directory.
    Run,
    /// Run, continuing each stage from its latest checkpoint.
    Resume,
    /// Delete the earlier run's files in the output directory, then run.
    Overwrite,
    Validate,
}

/// The exit code of a run stopped on request, set by the signal that asked: 128 + the
/// signal, as shells report it (130 for Ctrl-C's SIGINT, 143 for the SIGTERM that
/// schedulers such as SLURM and Kubernetes send).
static STOP_CODE: OnceLock<Arc<AtomicUsize>> = OnceLock::new();

pub fn stop_exit_code() -> u8 {
    let code = STOP_CODE.get().map_or(0, |code| code.load(Ordering::SeqCst));
    u8::try_from(code).ok().filter(|&c| c != 0).unwrap_or(130)
}

/// SIGINT and SIGTERM ask the running stage to finish its step and save a checkpoint
/// (they set `stop`); a second one of either exits at once.
fn install_stop_handlers(stop: &Arc<AtomicBool>) -> Result<(), Failure> {
    let code = Arc::clone(STOP_CODE.get_or_init(|| Arc::new(AtomicUsize::new(0))));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let exit = 128 + signal;
        // Registered first, so it sees the flag as it was before this signal.
        signal_hook::flag::register_conditional_shutdown(signal, exit, Arc::clone(stop))
            .and_then(|_| signal_hook::flag::register_usize(signal, Arc::clone(&code), exit as usize))
            .and_then(|_| signal_hook::flag::register(signal, Arc::clone(stop)))
            .map_err(|e| Failure::Internal(format!("cannot install the handler of signal {signal}: {e}")))?;
    }
    Ok(())
}

/// How a recipe error reads to the user: as it is for `plumb run`; `plumb eval` rewrites
/// the places of the recipe it builds into its own options.
pub type Render<'a> = &'a dyn Fn(RecipeError) -> String;

/// Loads the plugins the recipe lists; errors point at their entry.
fn load_plugins(recipe: &LoadedRecipe, user: &dyn Fn(RecipeError) -> Failure) -> Result<Registry, Failure> {
    let mut registry = Registry::default();
    for (i, spec) in recipe.recipe().plugins.iter().enumerate() {
        let key = |field: &str| format!("plugins[{i}]{field}");
        let path = loader::locate(&spec.name, spec.path.as_deref()).map_err(|e| {
            user(recipe.error_at(&key(if spec.path.is_some() { ".path" } else { ".name" }), e.to_string()))
        })?;
        let plugin = loader::load(&path, &spec.name, spec.sha256.as_deref()).map_err(|e| {
            let field = if matches!(e, loader::LoadError::Sha256Mismatch { .. }) { ".sha256" } else { "" };
            user(recipe.error_at(&key(field), e.to_string()))
        })?;
        if plugin.name != spec.name {
            return Err(user(recipe.error_at(
                &key(".name"),
                format!("{} is the plugin `{}`, not `{}`", path.display(), plugin.name, spec.name),
            )));
        }
        tracing::debug!("loaded plugin `{}` {} from {}", plugin.name, plugin.version, path.display());
        registry.add(plugin).map_err(|m| user(recipe.error_at(&key(".name"), m)))?;
    }
    Ok(registry)
}

/// Turns a plugin's verdict on a section into a located error.
fn located(
    recipe: &LoadedRecipe,
    user: &dyn Fn(RecipeError) -> Failure,
    section: &str,
    what: &str,
    error: CallError,
) -> Failure {
    match error {
        CallError::InvalidConfig(e) => user(recipe.section_error(section, &e)),
        CallError::Panicked(m) => Failure::Internal(format!("{what} panicked while checking its configuration {m}")),
        CallError::Failed(m) => user(recipe.error_at(section, m)),
        CallError::Cancelled => Failure::Cancelled(format!("{what} stopped")),
    }
}

/// The resolved recipe with the defaults of every stage's and reward's section filled in,
/// as its plugin declares them: what `plumb validate` prints and the run directory keeps.
fn with_defaults(
    recipe: &LoadedRecipe,
    registry: &Registry,
    user: &dyn Fn(RecipeError) -> Failure,
) -> Result<String, Failure> {
    let filled = recipe.resolved_yaml_filled(|at, uses, config| {
        let schema = match at.starts_with("rewards") {
            true => registry.reward(uses).map(|c| c.schema()),
            false => registry.runnable(uses).map(|c| c.schema()),
        };
        match schema {
            Ok(Ok(schema)) => {
                fill_defaults(&schema, config);
                Ok(())
            }
            Ok(Err(e)) => Err(recipe.error_at(at, format!("`{uses}` could not describe its options: {e}"))),
            Err(message) => Err(recipe.error_at(at, message)),
        }
    });
    filled.map_err(user)
}

fn yaml(value: &serde_yaml::Value) -> String {
    serde_yaml::to_string(value).unwrap_or_default()
}

/// How `plumb run` goes on from an output directory that holds an earlier run.
const RUN_CHOICES: &str =
    "pass --resume to continue it, --overwrite to delete its files and start over, or set another run.output_dir";

pub fn run(path: &Path, overrides: &[String], mode: Mode) -> Result<(), Failure> {
    let recipe = Recipe::load(path, overrides).map_err(|e| Failure::User(e.to_string()))?;
    run_loaded(&recipe, mode, &|e: RecipeError| e.to_string(), RUN_CHOICES)
}

/// Runs (or, in [`Mode::Validate`], checks) a loaded recipe; `render` words its errors,
/// `choices` the ways on from an output directory that holds an earlier run.
pub fn run_loaded(recipe: &LoadedRecipe, mode: Mode, render: Render, choices: &str) -> Result<(), Failure> {
    let user = |e: RecipeError| Failure::User(render(e));
    let user: &dyn Fn(RecipeError) -> Failure = &user;
    // 1. The recipe, its plugins, and every section they own: all before any compute.
    let registry = load_plugins(recipe, user)?;
    let spec = recipe.recipe();
    // Every component learns the recipe's reward names, so a stage (or a reward made of
    // others) checks the ones it names before any compute.
    let reward_names: Vec<String> = spec.rewards.iter().map(|r| r.name.clone()).collect();
    let mut rewards = Vec::new();
    for (i, reward) in spec.rewards.iter().enumerate() {
        let component =
            registry.reward(&reward.uses).map_err(|m| user(recipe.error_at(&format!("rewards[{i}].uses"), m)))?;
        let what = format!("reward `{}` ({})", reward.name, reward.uses);
        component
            .validate(&yaml(&reward.config), &reward_names, &spec.run.output_dir)
            .map_err(|e| located(recipe, user, &format!("rewards[{i}].config"), &what, e))?;
        rewards.push(component);
    }
    let mut stages: Vec<Component> = Vec::new();
    let mut stage_models: Vec<Option<PathBuf>> = Vec::new();
    for (i, stage) in spec.stages.iter().enumerate() {
        let component =
            registry.runnable(&stage.uses).map_err(|m| user(recipe.error_at(&format!("stages[{i}].uses"), m)))?;
        let what = format!("{} `{}` ({})", component.kind.noun(), stage.name, stage.uses);
        // It starts from its own model or from what an earlier entry hands on (a stage's
        // output, or an evaluator's own model, which it passes on).
        let has_input_model = stage.model.is_some()
            || stages.iter().zip(&stage_models).any(|(earlier, own)| earlier.kind == Kind::Stage || own.is_some());
        component
            .validate(&recipe.stage_config_yaml(i), &reward_names, has_input_model, &spec.run.output_dir)
            .map_err(|e| located(recipe, user, &format!("stages[{i}].config"), &what, e))?;
        // A stage's own model: a directory, or a hub name (`ORG/NAME`) found in the local
        // Hugging Face cache.
        let model = match &stage.model {
            // Found when that stage has run (the recipe checked it comes earlier).
            Some(ModelSource::Stage { .. }) | None => None,
            Some(ModelSource::Path(model)) => {
                let at = format!("stages[{i}].model");
                let dir = plumb_core::checkpoint::hub::resolve_model(model)
                    .map_err(|e| user(recipe.error_at(&at, e.to_string())))?;
                if !dir.join("config.json").is_file() {
                    return Err(user(recipe.error_at(
                        &at,
                        format!(
                            "expected a model directory in HF layout (with config.json), found `{}`",
                            dir.display()
                        ),
                    )));
                }
                Some(dir)
            }
        };
        stage_models.push(model);
        stages.push(component);
    }
    // A device this machine lacks is a recipe error, found by `validate` too.
    let device = spec.run.device.resolve().map_err(|m| user(recipe.error_at("run.device", m)))?;
    let resolved = with_defaults(recipe, &registry, user)?;
    if mode == Mode::Validate {
        print!("{resolved}");
        return Ok(());
    }

    // A distributed run (torchrun's variables, or `plumb run --nproc N`): every rank runs
    // every stage; rank 0 serves the run's store, claims the output directory, logs and writes
    // the reports, and the ranks meet after each stage, so the next one finds what rank 0 wrote.
    // On CUDA each rank takes a GPU of its own (cuda:LOCAL_RANK from the run's first); the
    // stages' groups attach NCCL for it (this group only meets at barriers, on Gloo).
    let dist = Rendezvous::from_env().map_err(|e| Failure::User(e.to_string()))?;
    let device = match &dist {
        Some(rendezvous) => {
            rendezvous.rank_device(device).map_err(|e| user(recipe.error_at("run.device", e.to_string())))?
        }
        None => device,
    };
    let group = match &dist {
        Some(rendezvous) => Some(ProcessGroup::join(rendezvous).map_err(|e| Failure::User(e.to_string()))?),
        None => None,
    };
    let device = plumb_core::device::device_name(device);
    let main = dist.as_ref().is_none_or(|r| r.rank == 0);
    let meet = |after: &str| match &group {
        Some(group) => group.barrier().map_err(|e| Failure::User(format!("after {after}: {e}"))),
        None => Ok(()),
    };
    if let Some(r) = &dist {
        tracing::info!("rank {} of {} (local rank {}), store at {}", r.rank, r.world_size, r.local_rank, r.address());
    }

    // 2. The run directory, this run's alone, with the fully resolved recipe beside the
    // results.
    let output_dir = spec.run.output_dir.clone();
    let earlier = match mode {
        Mode::Resume => Earlier::Continue,
        Mode::Overwrite => Earlier::Clear,
        Mode::Run | Mode::Validate => Earlier::Refuse,
    };
    let _owned = if main { Some(output_dir::claim(&output_dir, earlier, choices)?) } else { None };
    let recipe_file = output_dir.join("recipe.yaml");
    // A resume that a stage refuses (its checkpoint was made under another recipe) keeps
    // the recipe the run was made under.
    let earlier_recipe = if mode == Mode::Resume && main { std::fs::read(&recipe_file).ok() } else { None };
    if main {
        write_file_atomically(&recipe_file, resolved.as_bytes()).map_err(|e| Failure::User(e.to_string()))?;
    }
    meet("claiming the output directory")?;
    // The first Ctrl-C (or SIGTERM) asks the running stage to finish its step and save; a
    // second one exits at once.
    let stop = Arc::new(AtomicBool::new(false));
    install_stop_handlers(&stop)?;
    // The rewards, made once for the whole run on its device (a learned reward loads its
    // model here); every stage scores with the same instances.
    let mut live_rewards: BTreeMap<String, Mutex<RewardInstance>> = BTreeMap::new();
    for (i, (reward, component)) in spec.rewards.iter().zip(&rewards).enumerate() {
        let what = format!("reward `{}` ({})", reward.name, reward.uses);
        let request = CreateRequest {
            config_yaml: yaml(&reward.config),
            name: reward.name.clone(),
            device: device.clone(),
            seed: spec.run.seed,
            run_dir: output_dir.clone(),
            rewards: reward_names.clone(),
        };
        let instance =
            component.create(&request).map_err(|e| located(recipe, user, &format!("rewards[{i}].config"), &what, e))?;
        live_rewards.insert(reward.name.clone(), Mutex::new(instance));
    }
    tracing::info!("run `{}` on {device} into {}", spec.run.name, output_dir.display());

    // 3. The stages, in order.
    let run_started = Instant::now();
    let mut summary = RunSummary { run: spec.run.name.clone(), ..Default::default() };
    let mut input_model: Option<PathBuf> = None;
    let mut sweep_start: Option<Option<PathBuf>> = None;
    // The model each stage that has run made, for `model: {stage: <name>}`.
    let mut outputs: BTreeMap<String, PathBuf> = BTreeMap::new();
    for (i, (stage, component)) in spec.stages.iter().zip(&stages).enumerate() {
        let evaluator = component.kind == Kind::Evaluator;
        let what = format!(
            "{} `{}` ({}, plugin {} {})",
            component.kind.noun(),
            stage.name,
            stage.uses,
            component.plugin.name,
            component.plugin.version
        );
        let stage_dir = output_dir.join(&stage.name);
        // Every point of a sweep starts where the swept stage would have: from the model
        // before the sweep, not from the point before it.
        let start = match recipe.sweep_points().iter().any(|p| p.stage == stage.name) {
            true => sweep_start.get_or_insert_with(|| input_model.clone()).clone(),
            false => input_model.clone(),
        };
        if mode == Mode::Resume {
            if let Some((model, report)) = finished_report(&stage_dir) {
                println!("{} {} finished in an earlier run; not running it again", component.kind.noun(), stage.name);
                let metrics: BTreeMap<String, f64> =
                    serde_json::from_value(report["metrics"].clone()).unwrap_or_default();
                let kind = component.kind.noun();
                let seconds = report["seconds"].as_f64();
                summary.stages.push(StageSummary::new(
                    &stage.name,
                    &stage.uses,
                    kind,
                    seconds,
                    &metrics,
                    &stage.summary,
                ));
                if let Some(made) = &model {
                    outputs.insert(stage.name.clone(), made.clone());
                }
                input_model = model.or(input_model);
                continue;
            }
        }
        std::fs::create_dir_all(&stage_dir).map_err(|e| Failure::User(format!("{}: {e}", stage_dir.display())))?;
        let tensorboard = if main {
            // A report marks a finished stage (see --resume); a stage run again must not keep it.
            let _ = std::fs::remove_file(stage_dir.join("report.json"));
            let tb_dir = output_dir.join("tb").join(&stage.name);
            let tensorboard = TbWriter::create(&tb_dir).map_err(|e| Failure::User(e.to_string()))?;
            if mode != Mode::Resume {
                // Starting over: TensorBoard drops what earlier runs wrote here.
                tensorboard.restart_at(0);
            }
            Some(tensorboard)
        } else {
            None
        };
        let host = HostServices {
            plugin: component.plugin.name.clone(),
            tensorboard: tensorboard.as_ref(),
            progress: Mutex::new(Progress::new(&stage.name)),
            stop: Arc::clone(&stop),
            rewards: &live_rewards,
        };
        let model = match &stage.model {
            Some(ModelSource::Stage { stage: named }) => Some(outputs.get(named).cloned().ok_or_else(|| {
                user(recipe.error_at(&format!("stages[{i}].model.stage"), format!("stage `{named}` made no model")))
            })?),
            _ => stage_models[i].clone().or(start),
        };
        let request = RunRequest {
            stage: stage.name.clone(),
            config_yaml: recipe.stage_config_yaml(i),
            run_dir: output_dir.clone(),
            stage_dir: stage_dir.clone(),
            input_model: model.clone(),
            device: device.clone(),
            seed: spec.run.seed,
            resume: mode == Mode::Resume,
            rewards: reward_names.clone(),
            dist: dist.clone(),
        };
        tracing::info!("{what}: starting");
        let started = Instant::now();
        let result = component.run(&host, &request);
        if let Ok(mut progress) = host.progress.lock() {
            progress.finish();
        }
        if let Some(tensorboard) = tensorboard {
            if let (true, Ok(output)) = (evaluator, &result) {
                // An evaluator's results: one scalar per metric, at step 0.
                for (tag, value) in &output.metrics {
                    tensorboard.scalar(tag, 0, *value);
                }
            }
            tensorboard
                .close()
                .map_err(|e| Failure::Internal(format!("TensorBoard events of stage `{}`: {e}", stage.name)))?;
        }
        if let (Err(CallError::Failed(_) | CallError::InvalidConfig(_)), Some(earlier)) = (&result, &earlier_recipe) {
            write_file_atomically(&recipe_file, earlier).map_err(|e| Failure::User(e.to_string()))?;
        }
        let output = match result {
            Ok(output) => output,
            Err(CallError::InvalidConfig(e)) => {
                return Err(user(recipe.section_error(&format!("stages[{i}].config"), &e)))
            }
            Err(CallError::Failed(m)) => return Err(Failure::User(format!("{what} failed: {m}"))),
            Err(CallError::Panicked(m)) => return Err(Failure::Internal(format!("{what} panicked {m}"))),
            Err(CallError::Cancelled) => return Err(Failure::Cancelled(format!("{what} stopped on request"))),
        };
        let seconds = started.elapsed().as_secs_f64();
        meet(&format!("stage `{}`", stage.name))?;
        if !main {
            input_model = output.model.clone().or(input_model);
            if let Some(made) = output.model {
                outputs.insert(stage.name.clone(), made);
            }
            if stop.load(Ordering::SeqCst) && i + 1 < spec.stages.len() {
                return Err(Failure::Cancelled(format!("stopped on request after stage `{}`", stage.name)));
            }
            continue;
        }
        if evaluator {
            let results = serde_json::json!({
                "name": stage.name,
                "evaluator": stage.uses,
                "plugin": { "name": component.plugin.name, "version": component.plugin.version },
                "model": model,
                "config": serde_yaml::from_str::<serde_json::Value>(&request.config_yaml).unwrap_or_default(),
                "seconds": seconds,
                "metrics": output.metrics,
            });
            write_json(&stage_dir.join("results.json"), &results)?;
        }
        let kind = component.kind.noun();
        let report = serde_json::json!({
            "stage": stage.name,
            "uses": stage.uses,
            "kind": kind,
            "model": output.model,
            "seconds": seconds,
            "metrics": output.metrics,
        });
        write_json(&stage_dir.join("report.json"), &report)?;
        if evaluator {
            let on = model.as_ref().map(|m| format!(" on {}", m.display())).unwrap_or_default();
            println!("evaluator {} ({}){on} finished in {seconds:.1}s:", stage.name, stage.uses);
            let width = output.metrics.keys().map(String::len).max().unwrap_or(0);
            for (tag, value) in &output.metrics {
                println!("  {tag:<width$}  {}", short(*value));
            }
            println!("evaluator {} results: {}", stage.name, stage_dir.join("results.json").display());
        } else {
            let figures: Vec<String> = output.metrics.iter().map(|(k, v)| format!("{k}={}", short(*v))).collect();
            println!("stage {} finished in {seconds:.1}s: {}", stage.name, figures.join(" "));
        }
        if let Some(model) = &output.model {
            println!("stage {} model: {}", stage.name, model.display());
        }
        summary.stages.push(StageSummary::new(
            &stage.name,
            &stage.uses,
            kind,
            Some(seconds),
            &output.metrics,
            &stage.summary,
        ));
        if let Some(made) = &output.model {
            outputs.insert(stage.name.clone(), made.clone());
        }
        input_model = output.model.or(input_model);
        if stop.load(Ordering::SeqCst) && i + 1 < spec.stages.len() {
            return Err(Failure::Cancelled(format!(
                "stopped on request after stage `{}`; its model is saved",
                stage.name
            )));
        }
    }
    if !main {
        return Ok(());
    }
    summary.seconds = run_started.elapsed().as_secs_f64();
    summary.write(&output_dir)?;
    print!("{}", summary.table());
    println!("summary: {}", output_dir.join("summary.json").display());
    let points = recipe.sweep_points();
    if !points.is_empty() {
        let rows = plumb_host::scaling::sweep::write_table(&output_dir, points).map_err(Failure::User)?;
        println!("sweep of {} runs:", rows.len());
        println!("  {:<14} {:>12} {:>12} {:>12} {:>9}", "stage", "N", "D", "C", "loss");
        for row in &rows {
            println!("  {:<14} {:>12.4e} {:>12.4e} {:>12.4e} {:>9.4}", row.stage, row.n, row.d, row.c, row.loss);
        }
        println!(
            "sweep table: {}; fit it with `plumb scaling fit {}`",
            output_dir.join("sweep.csv").display(),
            output_dir.display()
        );
    }
    Ok(())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value).unwrap_or_default() + "\n";
    write_file_atomically(path, text.as_bytes()).map_err(|e| Failure::User(e.to_string()))
}

/// The output model and the report of a stage that finished in an earlier run (its
/// report exists).
fn finished_report(stage_dir: &Path) -> Option<(Option<PathBuf>, serde_json::Value)> {
    let text = std::fs::read(stage_dir.join("report.json")).ok()?;
    let report: serde_json::Value = serde_json::from_slice(&text).ok()?;
    Some((report["model"].as_str().map(PathBuf::from), report))
}

fn short(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.4}")
    }
}
