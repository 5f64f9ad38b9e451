//! `cot.gsm8k`: chain-of-thought accuracy of a causal LM on GSM8K (built in) or on a
//! user's JSONL, in several prompting modes in one run, or of generations made elsewhere
//! (`predictions:`, no model).
//!
//! With a model, each mode of `modes` is evaluated in turn: every prompt is built
//! ([`crate::prompt`]), prompts are sorted by length and generated `batch_size` rows at a
//! time through core's batched generation (a self-consistency question's `samples`
//! chains sit in the same batch; finished rows leave it), each generation is cut at the
//! first stop string, and the answers are extracted, voted and scored ([`crate::report`]).
//! Greedy modes decode with temperature 0; `self_consistency` samples with
//! `temperature`/`top_p`/`top_k`, seeded by the run's seed.
//!
//! The report (`<stage dir>/cot_report.json`, and `output:` when given) holds the
//! per-mode summaries and per-question records; the metrics (`<mode>/strict/accuracy`,
//! `…/ci95_low`, `…/maj@k`, `…/hit_token_limit`, `time/tokens_per_s`) go to TensorBoard
//! through the host, with the first rationales of each mode as text, and a table is
//! printed at the end.
use std::path::{Path, PathBuf};
use std::time::Instant;

use plumb_core::error::IoResultExt;
use plumb_core::model::generate::{generate, Finish, GenerationSettings};
use plumb_core::model::{self, Policy};
use plumb_core::plugin::{Metrics, ValidateContext};
use plumb_core::tch::Kind;
use plumb_core::tokenizer::Tokenizer;
use plumb_core::{Error, Evaluator, Result, RunContext};
use serde::Deserialize;

use crate::data::{Fields, Problem, Source, GSM8K_TEST_NAME};
use crate::prompt::{self, Exemplar, Mode, Style, ANSWER_PASS};
use crate::report::{self, Generations, Scored};

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CotConfig {
    /// A JSONL file of problems, or `gsm8k:test` (the default): GSM8K's test set, built in.
    #[serde(default = "default_data")]
    pub data: PathBuf,
    /// The fields holding the question and the answer (default `question`, `answer`).
    #[serde(default)]
    pub fields: Fields,
    /// Evaluate only the first this many problems.
    #[serde(default)]
    pub max_questions: Option<usize>,
    /// The prompting modes to evaluate, each reported on its own.
    #[serde(default = "default_modes")]
    pub modes: Vec<Mode>,
    /// Exemplars of the few-shot modes.
    #[serde(default)]
    pub few_shot: FewShot,
    /// zero_shot_cot: add Kojima et al.'s second pass ("Therefore, the answer (arabic
    /// numerals) is", up to 16 greedy tokens after the reasoning) and take its first
    /// number as the answer, as their answer cleansing does (strict and flexible alike).
    #[serde(default)]
    pub answer_pass: bool,
    /// Render prompts with the model's chat template (instruction-tuned models).
    #[serde(default)]
    pub chat: bool,
    /// How questions and answers are written: `lm_eval` (`Q:`/`A:`, "The answer is N",
    /// the harness's gsm8k-cot) or `gsm8k` (`Question:`/`Answer:`, `#### N`, for models
    /// taught GSM8K's answer format: direct opens with `####`, reasoning modes with nothing).
    #[serde(default)]
    pub style: Style,
    /// New tokens per generation; generations that reach it are counted and reported.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// A generation ends at the first of these strings (cut off there); EOS ends it too.
    /// Default: the next question's turn (`Q:` in the lm_eval style, `Question:` in gsm8k).
    #[serde(default)]
    pub stop: Option<Vec<String>>,
    /// Chains per question for self_consistency (maj@k and pass@k for k up to it).
    #[serde(default = "default_samples")]
    pub samples: usize,
    /// Sampling of self_consistency (the other modes decode greedily).
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Nucleus sampling of self_consistency: the smallest set of tokens whose probability
    /// reaches this (1.0 = all).
    #[serde(default = "default_top_p")]
    pub top_p: f64,
    /// Sampling of self_consistency from the k likeliest tokens only; 0 = no limit.
    #[serde(default)]
    pub top_k: i64,
    /// Rows (prompts × samples) per generation batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Score generations made elsewhere instead of generating: JSONL, one line per
    /// problem of `data` in its order, `{"question": …, "generations": [...]}`.
    #[serde(default)]
    pub predictions: Option<PathBuf>,
    /// Also write the report here.
    #[serde(default)]
    pub output: Option<PathBuf>,
    /// Rationales per mode logged to TensorBoard as text.
    #[serde(default = "default_text_samples")]
    pub text_samples: usize,
}

/// Where few-shot exemplars come from.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FewShot {
    /// `wei` (the eight exemplars of Wei et al., in order, as lm-evaluation-harness's
    /// gsm8k-cot shows them) or a JSONL file (e.g. GSM8K's train set) to draw from.
    #[serde(default = "default_source")]
    pub source: String,
    /// Exemplars shown (at most 8 for `wei`, the first k).
    #[serde(default = "default_shots")]
    pub k: usize,
    /// Seeds the draw from a file (the same exemplars for every question).
    #[serde(default)]
    pub seed: u64,
    /// The file's fields.
    #[serde(default)]
    pub fields: Fields,
}

impl Default for FewShot {
    fn default() -> Self {
        Self { source: default_source(), k: default_shots(), seed: 0, fields: Fields::default() }
    }
}

fn default_data() -> PathBuf {
    PathBuf::from(GSM8K_TEST_NAME)
}
fn default_modes() -> Vec<Mode> {
    vec![Mode::FewShotCot]
}
fn default_source() -> String {
    "wei".into()
}
fn default_shots() -> usize {
    8
}
/// lm-evaluation-harness's default `max_gen_toks`.
fn default_max_new_tokens() -> usize {
    256
}
fn default_samples() -> usize {
    8
}
fn default_temperature() -> f64 {
    0.7
}
fn default_top_p() -> f64 {
    1.0
}
fn default_batch_size() -> usize {
    32
}
fn default_text_samples() -> usize {
    3
}

impl CotConfig {
    /// The stop strings: `stop`, or the style's (the harness's `until`; its `</s>` and
    /// `<|im_end|>` are the tokenizer's EOS here).
    pub fn stops(&self) -> Vec<String> {
        self.stop.clone().unwrap_or_else(|| vec![self.style.default_stop().to_string()])
    }
}

pub struct Gsm8k;

impl Evaluator for Gsm8k {
    const NAME: &'static str = "gsm8k";
    const DESCRIPTION: &'static str =
        "Chain-of-thought accuracy on GSM8K or your JSONL: direct, few-shot, zero-shot CoT, self-consistency (maj@k, pass@k), or scoring --predictions";
    type Config = CotConfig;

    fn validate(c: &CotConfig, ctx: &ValidateContext) -> Result<()> {
        if let Source::File(path) = Source::parse(&c.data) {
            ctx.existing_file("data", &path)?;
        }
        if let Some(p) = &c.predictions {
            ctx.existing_file("predictions", p)?;
        }
        if c.modes.is_empty() {
            return Err(Error::config("modes", "expected at least one mode"));
        }
        for (i, m) in c.modes.iter().enumerate() {
            if c.modes[..i].contains(m) {
                return Err(Error::config(format!("modes.{i}"), format!("`{}` is listed twice", m.name())));
            }
        }
        if c.few_shot.source != "wei" {
            ctx.existing_file("few_shot.source", Path::new(&c.few_shot.source))?;
        } else if c.few_shot.k > 8 {
            return Err(Error::config("few_shot.k", format!("`wei` has 8 exemplars; found k = {}", c.few_shot.k)));
        }
        let checks = [
            (c.max_questions == Some(0), "max_questions", "expected at least 1"),
            (
                c.few_shot.k == 0 && c.modes.iter().any(|m| matches!(m, Mode::FewShotDirect | Mode::FewShotCot)),
                "few_shot.k",
                "expected at least 1 exemplar for the few-shot modes (0 only with the zero-shot modes and self_consistency)",
            ),
            (c.max_new_tokens == 0, "max_new_tokens", "expected at least 1"),
            (c.samples == 0, "samples", "expected at least 1"),
            (c.batch_size == 0, "batch_size", "expected at least 1"),
            (!(c.temperature >= 0.0 && c.temperature.is_finite()), "temperature", "expected a number >= 0"),
            (!(c.top_p > 0.0 && c.top_p <= 1.0), "top_p", "expected a number in (0, 1]"),
            (c.top_k < 0, "top_k", "expected 0 (all tokens) or more"),
            (c.stops().iter().any(String::is_empty), "stop", "expected non-empty strings"),
        ];
        if let Some((_, key, message)) = checks.iter().find(|(bad, _, _)| *bad) {
            return Err(Error::config(*key, *message));
        }
        if c.modes.contains(&Mode::SelfConsistency) && c.temperature == 0.0 && c.predictions.is_none() {
            return Err(Error::config(
                "temperature",
                "self_consistency samples its chains: with temperature 0 every chain is the same; set temperature > 0",
            ));
        }
        if c.answer_pass && !c.modes.contains(&Mode::ZeroShotCot) {
            return Err(Error::config(
                "answer_pass",
                "the second answer pass belongs to zero_shot_cot, which `modes` does not list",
            ));
        }
        if let Some(out) = &c.output {
            if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
                ctx.existing_dir("output", parent)?;
            }
        }
        if c.predictions.is_none() {
            ctx.require_input_model("cot.gsm8k generates with a model (or scores `predictions` made elsewhere)")?;
        }
        Ok(())
    }

    fn evaluate(c: CotConfig, ctx: &mut RunContext) -> Result<Metrics> {
        let source = Source::parse(&c.data);
        let mut problems = source.read(&c.fields)?;
        if let Some(max) = c.max_questions {
            problems.truncate(max);
        }
        let mut metrics = Metrics::new();
        let report = match &c.predictions {
            Some(path) => {
                let generations = read_predictions(path, &problems)?;
                let scored = report::score(&problems, generations);
                report::metrics("", &scored, &mut metrics);
                println!("{}", report::table(&[("predictions", &scored)]));
                let mut value = serde_json::to_value(&scored).map_err(json_error)?;
                value["data"] = source.name().display().to_string().into();
                value["predictions"] = path.display().to_string().into();
                value
            }
            None => evaluate_model(&c, &problems, ctx, &mut metrics)?,
        };
        let text = serde_json::to_string_pretty(&report).map_err(json_error)? + "\n";
        let path = ctx.stage_dir().join("cot_report.json");
        plumb_core::checkpoint::write_file_atomically(&path, text.as_bytes())?;
        if let Some(out) = &c.output {
            std::fs::write(out, &text).at(out)?;
        }
        ctx.info(&format!("chain-of-thought report: {}", path.display()));
        Ok(metrics)
    }
}

fn json_error(e: serde_json::Error) -> Error {
    Error::Other(format!("writing the report: {e}"))
}

/// The predictions file: one line per problem, in order, each `{"question": text,
/// "generations": [text, ...]}`; the question must be the problem's (a shifted or
/// reordered file would be scored against the wrong answers).
pub fn read_predictions(path: &Path, problems: &[Problem]) -> Result<Vec<Generations>> {
    #[derive(Deserialize)]
    struct Line {
        question: String,
        generations: Vec<String>,
    }
    let text = std::fs::read_to_string(path).at(path)?;
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(&text);
    let mut out = Vec::with_capacity(problems.len());
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |m: String| Error::file(path, format!("line {}: {m}", i + 1));
        let parsed: Line = serde_json::from_str(line)
            .map_err(|e| at(format!("expected {{\"question\": string, \"generations\": [string, ...]}}: {e}")))?;
        let Some(problem) = problems.get(out.len()) else {
            return Err(at(format!("more predictions than the {} problems of the data file", problems.len())));
        };
        if parsed.question.trim() != problem.question.trim() {
            return Err(at(format!(
                "the question is not problem {}'s of the data file (predictions must follow its order)",
                out.len() + 1
            )));
        }
        if parsed.generations.is_empty() {
            return Err(at("`generations` is empty; expected at least one".into()));
        }
        out.push(Generations { prompt: None, hit_limit: Vec::new(), texts: parsed.generations });
    }
    if out.len() != problems.len() {
        return Err(Error::file(
            path,
            format!(
                "{} predictions for the {} problems of the data file; expected one line per problem",
                out.len(),
                problems.len()
            ),
        ));
    }
    Ok(out)
}

/// What the generation loop of one mode produced, beside its score.
struct ModeRun {
    scored: Scored,
    new_tokens: usize,
    seconds: f64,
}

fn evaluate_model(
    c: &CotConfig,
    problems: &[Problem],
    ctx: &mut RunContext,
    metrics: &mut Metrics,
) -> Result<serde_json::Value> {
    let dir = ctx
        .input_model()
        .ok_or_else(|| {
            Error::Other(
                "no model to evaluate: give the entry a `model:` directory, put it after a stage that produces one, \
                 or score generations made elsewhere with `predictions:`"
                    .into(),
            )
        })?
        .to_path_buf();
    let tokenizer = Tokenizer::from_dir(&dir)?;
    if c.chat && tokenizer.chat_template().is_none() {
        return Err(Error::config("chat", format!("the model in {} has no chat template", dir.display())));
    }
    let exemplars = match c.few_shot.source.as_str() {
        "wei" => prompt::wei_exemplars().into_iter().take(c.few_shot.k).collect(),
        file => {
            let pool = Source::File(file.into()).read(&c.few_shot.fields)?;
            prompt::drawn_exemplars(&pool, c.few_shot.k, c.few_shot.seed)
        }
    };
    let policy = model::load(&dir, ctx.device(), Kind::Float)?;
    let started = Instant::now();
    let (mut runs, mut total_tokens, mut generation_seconds) = (Vec::new(), 0usize, 0.0f64);
    for &mode in &c.modes {
        let run = run_mode(c, mode, problems, &exemplars, policy.as_ref(), &tokenizer, ctx)?;
        report::metrics(&format!("{}/", mode.name()), &run.scored, metrics);
        if run.scored.hit_token_limit > 0 {
            ctx.warn(&format!(
                "{}: {} of {} generations stopped at max_new_tokens = {} before finishing; their reasoning may be cut short (raise max_new_tokens)",
                mode.name(),
                run.scored.hit_token_limit,
                run.scored.generations,
                c.max_new_tokens
            ));
        }
        for q in run.scored.questions.iter().take(c.text_samples) {
            let text = format!(
                "**question** {}\n\n**target** {}\n\n**generation** {}\n\n**strict** {:?} **flexible** {:?}",
                q.question,
                q.target,
                q.generations.first().map_or("", String::as_str),
                q.strict.answer,
                q.flexible.answer
            );
            ctx.text(&format!("{}/rationale", mode.name()), q.index as i64, &text);
        }
        total_tokens += run.new_tokens;
        generation_seconds += run.seconds;
        runs.push((mode, run));
    }
    let seconds = started.elapsed().as_secs_f64();
    metrics.insert("time/tokens_per_s".into(), total_tokens as f64 / seconds.max(1e-9));
    metrics.insert("time/generation_tokens_per_s".into(), total_tokens as f64 / generation_seconds.max(1e-9));
    metrics.insert("time/seconds".into(), seconds);
    metrics.insert("time/new_tokens".into(), total_tokens as f64);
    let rows: Vec<(&str, &Scored)> = runs.iter().map(|(m, r)| (m.name(), &r.scored)).collect();
    println!("{}", report::table(&rows));
    let modes: serde_json::Map<String, serde_json::Value> = runs
        .iter()
        .map(|(m, r)| Ok((m.name().to_string(), serde_json::to_value(&r.scored).map_err(json_error)?)))
        .collect::<Result<_>>()?;
    Ok(serde_json::json!({
        "model": dir,
        "data": Source::parse(&c.data).name(),
        "questions": problems.len(),
        "seconds": seconds,
        "new_tokens": total_tokens,
        "tokens_per_s": total_tokens as f64 / seconds.max(1e-9),
        "modes": modes,
    }))
}

/// Generates and scores one mode over every problem.
fn run_mode(
    c: &CotConfig,
    mode: Mode,
    problems: &[Problem],
    exemplars: &[Exemplar],
    policy: &dyn Policy,
    tokenizer: &Tokenizer,
    ctx: &RunContext,
) -> Result<ModeRun> {
    let chat = c.chat.then_some(tokenizer);
    let prompts: Vec<prompt::Prompt> =
        problems.iter().map(|p| prompt::build(mode, c.style, &p.question, exemplars, chat)).collect::<Result<_>>()?;
    let encode = |text: &str| if c.chat { tokenizer.encode(text) } else { tokenizer.encode_prompt(text) };
    let ids: Vec<Vec<i64>> = prompts.iter().map(|p| encode(&p.text)).collect::<Result<_>>()?;
    let samples = if mode.samples() { c.samples } else { 1 };
    let settings = GenerationSettings {
        max_new_tokens: c.max_new_tokens,
        temperature: if mode.samples() { c.temperature } else { 0.0 },
        top_k: c.top_k,
        top_p: c.top_p,
        stop_tokens: tokenizer.eos_ids(),
        pad_token: tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0),
        ..Default::default()
    };
    let started = Instant::now();
    let rows: Vec<(usize, usize)> =
        by_length(&ids).into_iter().flat_map(|q| (0..samples).map(move |s| (q, s))).collect();
    let outputs = generate_rows(c, &rows, &ids, &settings, policy, tokenizer, ctx, mode)?;
    let mut generated: Vec<Generations> = prompts
        .iter()
        .map(|p| Generations {
            prompt: Some(p.text.clone()),
            texts: vec![String::new(); samples],
            hit_limit: vec![false; samples],
        })
        .collect();
    let mut new_tokens = 0;
    let mut continuations = Vec::new();
    for (&(q, s), (text, hit, tokens)) in rows.iter().zip(outputs) {
        new_tokens += tokens;
        generated[q].hit_limit[s] = hit;
        if mode == Mode::ZeroShotCot && c.answer_pass {
            continuations.push(format!("{text}\n{ANSWER_PASS}"));
        }
        generated[q].texts[s] = format!("{}{text}", prompts[q].opening);
    }
    if mode == Mode::ZeroShotCot && c.answer_pass {
        // Kojima et al.'s second pass: the reasoning, then the answer prompt, greedily.
        let second: Vec<Vec<i64>> = rows
            .iter()
            .zip(&continuations)
            .map(|(&(q, _), tail)| Ok([ids[q].clone(), tokenizer.encode(tail)?].concat()))
            .collect::<Result<_>>()?;
        let pass = GenerationSettings { max_new_tokens: 16, ..settings.clone() };
        let rows2: Vec<(usize, usize)> = (0..second.len()).map(|i| (i, 0)).collect();
        let answers = generate_rows(c, &rows2, &second, &pass, policy, tokenizer, ctx, mode)?;
        for (&(q, s), (answer, _, tokens)) in rows.iter().zip(answers) {
            new_tokens += tokens;
            let reasoning = std::mem::take(&mut generated[q].texts[s]);
            // Read from the answer pass alone, as if the model had said "The answer is …".
            generated[q].texts[s] = format!("{reasoning}\n{ANSWER_PASS}{answer}");
            let read = plumb_core::reward::answer::normalize_number(&answer).map(|n| format!("\nThe answer is {n}."));
            generated[q].texts[s].push_str(&read.unwrap_or_default());
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(ModeRun { scored: report::score(problems, generated), new_tokens, seconds })
}

/// Problem indices, longest prompt first: batches of similar lengths pad little.
fn by_length(ids: &[Vec<i64>]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
    order
}

/// Generates every row `(prompt index, sample)` of `rows`, `batch_size` at a time, and
/// returns for each its text (cut at the first stop string), whether it hit the token
/// limit, and how many tokens it drew.
#[allow(clippy::too_many_arguments)]
fn generate_rows(
    c: &CotConfig,
    rows: &[(usize, usize)],
    ids: &[Vec<i64>],
    settings: &GenerationSettings,
    policy: &dyn Policy,
    tokenizer: &Tokenizer,
    ctx: &RunContext,
    mode: Mode,
) -> Result<Vec<(String, bool, usize)>> {
    let stops = c.stops();
    // A stop string is at most a few tokens long: look at the decoded tail only.
    let stop_check = |tokens: &[i64]| -> bool {
        let tail = &tokens[tokens.len().saturating_sub(16)..];
        tokenizer.decode(tail).is_ok_and(|t| stops.iter().any(|s| t.contains(s.as_str())))
    };
    let batches = rows.len().div_ceil(c.batch_size);
    let started = Instant::now();
    let mut out = Vec::with_capacity(rows.len());
    let mut drawn = 0u64;
    for (b, batch) in rows.chunks(c.batch_size).enumerate() {
        if ctx.should_stop() {
            return Err(Error::Cancelled);
        }
        let prompts: Vec<Vec<i64>> = batch.iter().map(|&(q, _)| ids[q].clone()).collect();
        // One seed per batch, from the run's: reproducible whatever the batch holds.
        let seeded = GenerationSettings { seed: Some(ctx.seed().wrapping_add(b as u64)), ..settings.clone() };
        let generated = generate(policy, &prompts, &seeded, Some(&stop_check))?;
        for g in generated {
            drawn += g.tokens.len() as u64;
            let full = tokenizer.decode(&g.tokens)?;
            let cut = stops.iter().filter_map(|s| full.find(s.as_str())).min().unwrap_or(full.len());
            out.push((full[..cut].to_string(), g.finish == Finish::Length, g.tokens.len()));
        }
        let seconds = started.elapsed().as_secs_f64().max(1e-9);
        ctx.progress(b as u64 + 1, batches as u64, None, Some(drawn as f64 / seconds), Some(drawn));
    }
    tracing::debug!("{}: {} rows in {} batches", mode.name(), rows.len(), batches);
    Ok(out)
}
