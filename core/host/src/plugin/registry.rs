//! The host's view of the loaded plugins: look up a component by its recipe name
//! (`<plugin>.<component>`) and call it across the boundary.
use std::ffi::c_void;
use std::path::Path;

use plumb_core::context::RunRequest;
use plumb_core::plugin::abi::{vec_sink, ComponentEntry, RewardEntry, SchemaFn, Status, StrRef, ValidateFn};
use plumb_core::plugin::{CreateRequest, StageOutput, ValidateRequest};
use plumb_core::recipe::{suggest, SectionError};

use super::host::HostServices;
use super::loader::Plugin;

/// Why a call into a plugin did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The component rejected its configuration section; `path` is inside the section.
    #[error("{0}")]
    InvalidConfig(SectionError),
    #[error("{0}")]
    Failed(String),
    #[error("panicked {0}")]
    Panicked(String),
    #[error("stopped on request")]
    Cancelled,
}

/// All loaded plugins, by name.
#[derive(Default)]
pub struct Registry {
    plugins: Vec<Plugin>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Stage,
    Evaluator,
    Reward,
}

impl Kind {
    /// `stage`, `evaluator` or `reward`.
    pub fn noun(self) -> &'static str {
        match self {
            Kind::Stage => "stage",
            Kind::Evaluator => "evaluator",
            Kind::Reward => "reward",
        }
    }
}

impl Registry {
    /// Adds a plugin; two plugins of one name are an error.
    pub fn add(&mut self, plugin: Plugin) -> Result<(), String> {
        if let Some(other) = self.plugins.iter().find(|p| p.name == plugin.name) {
            return Err(format!(
                "two plugins are named `{}`: {} and {}",
                plugin.name,
                other.path.display(),
                plugin.path.display()
            ));
        }
        self.plugins.push(plugin);
        Ok(())
    }

    pub fn plugins(&self) -> &[Plugin] {
        &self.plugins
    }

    /// All `<plugin>.<name>` of one kind, for messages.
    pub fn names(&self, kind: Kind) -> Vec<String> {
        self.plugins
            .iter()
            .flat_map(|p| {
                let list = match kind {
                    Kind::Stage => &p.stages,
                    Kind::Evaluator => &p.evaluators,
                    Kind::Reward => &p.rewards,
                };
                list.iter().map(move |c| format!("{}.{}", p.name, c.name))
            })
            .collect()
    }

    fn split<'u>(&self, uses: &'u str, kind: Kind) -> Result<(&Plugin, &'u str), String> {
        let unknown = |what: String| {
            let names = self.names(kind);
            let hint = suggest(uses, names.iter().map(String::as_str))
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_else(|| {
                    if names.is_empty() {
                        String::new()
                    } else {
                        format!("; available: {}", names.join(", "))
                    }
                });
            format!("{what}{hint}")
        };
        let Some((plugin, name)) = uses.split_once('.') else {
            return Err(unknown(format!("`{uses}` is not of the form <plugin>.<{}>", kind.noun())));
        };
        match self.plugins.iter().find(|p| p.name == plugin) {
            Some(p) => Ok((p, name)),
            None => Err(unknown(format!("no plugin named `{plugin}` is loaded (list it under `plugins:`)"))),
        }
    }

    /// The stage or evaluator `uses` (`<plugin>.<name>`), or a message with a suggestion.
    pub fn component(&self, uses: &str, kind: Kind) -> Result<Component<'_>, String> {
        let (plugin, name) = self.split(uses, kind)?;
        let entry = match kind {
            Kind::Stage => plugin.stage_entry(name),
            Kind::Evaluator => plugin.evaluator_entry(name),
            Kind::Reward => None,
        };
        let names = self.names(kind);
        entry.map(|entry| Component { plugin, entry, kind, uses: uses.to_owned() }).ok_or_else(|| {
            let hint = suggest(uses, names.iter().map(String::as_str))
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            format!("plugin `{}` has no {} `{name}`{hint}", plugin.name, kind.noun())
        })
    }

    /// What a recipe's `stages:` entry names: a stage, or an evaluator to run on the current
    /// model. A name that is both in one plugin is refused as ambiguous.
    pub fn runnable(&self, uses: &str) -> Result<Component<'_>, String> {
        let (plugin, name) = self.split(uses, Kind::Stage)?;
        match (plugin.stage_entry(name), plugin.evaluator_entry(name)) {
            (Some(entry), None) => Ok(Component { plugin, entry, kind: Kind::Stage, uses: uses.to_owned() }),
            (None, Some(entry)) => Ok(Component { plugin, entry, kind: Kind::Evaluator, uses: uses.to_owned() }),
            (Some(_), Some(_)) => Err(format!(
                "plugin `{}` has both a stage and an evaluator named `{name}`; rename one of them",
                plugin.name
            )),
            (None, None) => {
                let mut names = self.names(Kind::Stage);
                names.extend(self.names(Kind::Evaluator));
                let hint = suggest(uses, names.iter().map(String::as_str))
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_default();
                Err(format!("plugin `{}` has no stage or evaluator `{name}`{hint}", plugin.name))
            }
        }
    }

    /// The reward `uses` (`<plugin>.<name>`), or a message with a suggestion.
    pub fn reward(&self, uses: &str) -> Result<RewardComponent<'_>, String> {
        let (plugin, name) = self.split(uses, Kind::Reward)?;
        let names = self.names(Kind::Reward);
        plugin.reward_entry(name).map(|entry| RewardComponent { plugin, entry, uses: uses.to_owned() }).ok_or_else(
            || {
                let hint = suggest(uses, names.iter().map(String::as_str))
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_default();
                format!("plugin `{}` has no reward `{name}`{hint}", plugin.name)
            },
        )
    }
}

/// What `plumb explain` describes: a stage, evaluator or reward of a loaded plugin.
pub struct Described<'r> {
    pub plugin: &'r Plugin,
    pub kind: Kind,
    /// `<plugin>.<name>`.
    pub uses: String,
    /// Its one line for `plumb plugins`.
    pub description: String,
    schema: SchemaFn,
}

impl Described<'_> {
    /// The JSON Schema of its configuration section.
    pub fn schema(&self) -> Result<serde_json::Value, CallError> {
        call_schema(self.schema)
    }
}

impl Registry {
    /// The stage, evaluator or reward `uses` (`<plugin>.<name>`), whichever it is; or a
    /// message that lists every known name, with the nearest first.
    pub fn described(&self, uses: &str) -> Result<Described<'_>, String> {
        let (plugin_name, name) = uses.split_once('.').unwrap_or((uses, ""));
        if let Some(plugin) = self.plugins.iter().find(|p| p.name == plugin_name) {
            let found = [
                (Kind::Stage, plugin.stage_entry(name).map(|e| (e.schema, &plugin.stages))),
                (Kind::Evaluator, plugin.evaluator_entry(name).map(|e| (e.schema, &plugin.evaluators))),
                (Kind::Reward, plugin.reward_entry(name).map(|e| (e.schema, &plugin.rewards))),
            ];
            for (kind, entry) in found {
                let Some((schema, infos)) = entry else { continue };
                let description = infos.iter().find(|c| c.name == name).map(|c| c.description.clone());
                return Ok(Described {
                    plugin,
                    kind,
                    uses: uses.to_owned(),
                    description: description.unwrap_or_default(),
                    schema,
                });
            }
        }
        let mut names = self.names(Kind::Stage);
        names.extend(self.names(Kind::Evaluator));
        names.extend(self.names(Kind::Reward));
        let hint = suggest(uses, names.iter().map(String::as_str))
            .map(|s| format!("did you mean `{s}`? "))
            .unwrap_or_default();
        let known = if names.is_empty() { "none (no plugins found)".to_owned() } else { names.join(", ") };
        Err(format!("no stage, evaluator or reward named `{uses}`; {hint}known: {known}"))
    }
}

/// A configuration section's JSON Schema, from a component's `schema` entry.
fn call_schema(schema: SchemaFn) -> Result<serde_json::Value, CallError> {
    let mut out = Vec::new();
    let raw = schema(vec_sink(&mut out));
    let out = outcome(raw, out)?;
    serde_json::from_slice(&out).map_err(|e| CallError::Failed(format!("returned a malformed schema: {e}")))
}

fn outcome(raw: i32, out: Vec<u8>) -> Result<Vec<u8>, CallError> {
    let text = || String::from_utf8_lossy(&out).into_owned();
    match Status::from_raw(raw) {
        Some(Status::Ok) => Ok(out),
        Some(Status::InvalidConfig) => Err(match serde_json::from_slice::<SectionError>(&out) {
            Ok(section) => CallError::InvalidConfig(section),
            Err(_) => CallError::Failed(text()),
        }),
        Some(Status::Failed) => Err(CallError::Failed(text())),
        Some(Status::Panicked) => Err(CallError::Panicked(text())),
        Some(Status::Cancelled) => Err(CallError::Cancelled),
        None => Err(CallError::Failed(format!("unknown status {raw} returned: {}", text()))),
    }
}

/// Asks a component's `validate` entry to check a section without doing any work;
/// `rewards` are the names of the recipe's `rewards:`, `run_dir` the run's output directory.
fn call_validate(
    validate: ValidateFn,
    config_yaml: &str,
    rewards: &[String],
    has_input_model: bool,
    run_dir: &Path,
) -> Result<(), CallError> {
    let request = ValidateRequest {
        config_yaml: config_yaml.to_owned(),
        rewards: rewards.to_vec(),
        has_input_model,
        run_dir: Some(run_dir.to_path_buf()),
    };
    let request = serde_json::json!(request).to_string();
    let mut out = Vec::new();
    let raw = validate(StrRef::new(&request), vec_sink(&mut out));
    outcome(raw, out).map(|_| ())
}

/// A stage or evaluator of a loaded plugin.
pub struct Component<'r> {
    pub plugin: &'r Plugin,
    entry: &'static ComponentEntry,
    /// [`Kind::Stage`] or [`Kind::Evaluator`].
    pub kind: Kind,
    /// `<plugin>.<name>`.
    pub uses: String,
}

impl Component<'_> {
    /// Asks the plugin to check its section without doing any work; `rewards` are the
    /// names of the recipe's `rewards:` (a stage checks the ones it names),
    /// `has_input_model` whether it will get a model to start from, `run_dir` the run's
    /// output directory.
    pub fn validate(
        &self,
        config_yaml: &str,
        rewards: &[String],
        has_input_model: bool,
        run_dir: &Path,
    ) -> Result<(), CallError> {
        call_validate(self.entry.validate, config_yaml, rewards, has_input_model, run_dir)
    }

    /// The JSON Schema of its configuration section (its options, types, defaults, docs).
    pub fn schema(&self) -> Result<serde_json::Value, CallError> {
        call_schema(self.entry.schema)
    }

    /// Runs the component with the host's services; blocks until it returns.
    pub fn run(&self, host: &HostServices, request: &RunRequest) -> Result<StageOutput, CallError> {
        let request = serde_json::to_string(request).map_err(|e| CallError::Failed(e.to_string()))?;
        let api = host.api();
        let mut out = Vec::new();
        let raw = (self.entry.run)(&api, StrRef::new(&request), vec_sink(&mut out));
        let out = outcome(raw, out)?;
        serde_json::from_slice(&out).map_err(|e| CallError::Failed(format!("returned a malformed report: {e}")))
    }
}

/// A reward of a loaded plugin.
pub struct RewardComponent<'r> {
    pub plugin: &'r Plugin,
    entry: &'static RewardEntry,
    pub uses: String,
}

impl RewardComponent<'_> {
    /// Asks the plugin to check the reward's section; as [`Component::validate`].
    pub fn validate(&self, config_yaml: &str, rewards: &[String], run_dir: &Path) -> Result<(), CallError> {
        call_validate(self.entry.validate, config_yaml, rewards, true, run_dir)
    }

    /// The JSON Schema of its configuration section.
    pub fn schema(&self) -> Result<serde_json::Value, CallError> {
        call_schema(self.entry.schema)
    }

    /// Builds an instance for a run; it is destroyed when dropped.
    pub fn create(&self, request: &CreateRequest) -> Result<RewardInstance, CallError> {
        let request = serde_json::to_string(request).map_err(|e| CallError::Failed(e.to_string()))?;
        let mut out = Vec::new();
        let handle = (self.entry.create)(StrRef::new(&request), vec_sink(&mut out));
        if handle.is_null() {
            // `create` reports a config error as JSON and anything else as text.
            let status = if serde_json::from_slice::<SectionError>(&out).is_ok() {
                Status::InvalidConfig
            } else {
                Status::Failed
            };
            return Err(outcome(status as i32, out).err().unwrap_or(CallError::Failed("no reward was created".into())));
        }
        Ok(RewardInstance { entry: self.entry, handle })
    }
}

/// A live reward inside a plugin.
pub struct RewardInstance {
    entry: &'static RewardEntry,
    handle: *mut c_void,
}

// SAFETY: the ABI lets a reward be scored from any thread (`Reward: Send` on the plugin
// side), one call at a time: the host serialises calls to one instance behind a mutex.
unsafe impl Send for RewardInstance {}

impl RewardInstance {
    /// `request` is a JSON list of pairs; returns the JSON list of scores.
    pub fn score_json(&mut self, request: &str) -> Result<Vec<u8>, CallError> {
        let mut out = Vec::new();
        let raw = (self.entry.score)(self.handle, StrRef::new(request), vec_sink(&mut out));
        outcome(raw, out)
    }
}

impl Drop for RewardInstance {
    fn drop(&mut self) {
        (self.entry.destroy)(self.handle);
    }
}
