//! The recipe fields every training stage shares, declared, defaulted and checked once.
//!
//! A training stage's section is one flat mapping: the shared fields of
//! [`TrainingConfig`] (`optimizer`, `schedule`, `batch_size`, `max_steps`, ...) beside the
//! stage's own (`data`, `model`, `template`, ...). [`TrainSection`] reads it, sending each
//! key to the struct that declares it, so both stay `deny_unknown_fields` and a typo is
//! answered with the nearest name from either.
use schemars::JsonSchema;
use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};

use super::{require, Precision};
use crate::error::{Error, Result};
use crate::model::lora::LoraConfig;
use crate::optim::schedule::Decay;
use crate::optim::{AdamW, AdamWConfig, Schedule};
use crate::recipe::{located_message, parse_value};

/// The fields every training stage's section has, with their defaults.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    /// AdamW; no weight decay on norms, biases and embeddings.
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    /// The learning rate: linear warmup, then a decay to a floor.
    #[serde(default)]
    pub schedule: ScheduleConfig,
    /// Sequences (or examples, or packed rows) per optimizer step.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Sequences per forward/backward pass; the gradients of `batch_size /
    /// micro_batch_size` micro-batches are accumulated into one step. Default: `batch_size`.
    #[serde(default)]
    pub micro_batch_size: Option<usize>,
    /// Training length in optimizer steps ...
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// ... or in passes over the training data, for stages whose data has a size.
    #[serde(default)]
    pub epochs: Option<f64>,
    /// Clip the global gradient norm to this; 0 turns clipping off.
    #[serde(default = "default_grad_clip")]
    pub grad_clip: f64,
    /// `fp32`, or `bf16`: the forward pass under bf16 autocast, fp32 master weights.
    #[serde(default)]
    pub precision: Precision,
    /// What a non-finite loss or gradient does: `stop` the run naming the step, or `skip`
    /// the step (no update) and go on.
    #[serde(default)]
    pub on_nonfinite: OnNonFinite,
    /// Resumable checkpoints: how often, how many kept.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// Evaluation: how often, on how much held-out data, and what samples to show.
    #[serde(default)]
    pub eval: EvalConfig,
    /// Write the `train/*` scalars every this many steps.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Train LoRA adapters (`{rank, alpha, dropout, target_modules}`) instead of every weight.
    #[serde(default)]
    pub lora: Option<LoraConfig>,
    /// Activation checkpointing: keep only each transformer block's input in the forward pass and recompute the block in the backward pass. Activation memory falls to one hidden-state tensor per block for about one more forward pass of time; the gradients are the same.
    #[serde(default)]
    pub activation_checkpointing: bool,
}

/// How a stage's length is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Length {
    /// `max_steps` only: the data is a stream with no epochs (pretraining).
    Steps,
    /// `max_steps` or `epochs`, exactly one.
    StepsOrEpochs,
}

impl TrainingConfig {
    /// Every check of the shared fields, at their keys.
    pub fn validate(&self, length: Length) -> Result<()> {
        require(self.batch_size > 0, "batch_size", "expected at least 1")?;
        if let Some(micro) = self.micro_batch_size {
            require(
                micro > 0 && self.batch_size.is_multiple_of(micro),
                "micro_batch_size",
                "expected a positive divisor of batch_size",
            )?;
        }
        match (self.max_steps, self.epochs, length) {
            (Some(steps), None, _) => {
                require(steps > 0, "max_steps", "expected at least 1")?;
                self.schedule.validate(steps)?;
            }
            (None, Some(epochs), Length::StepsOrEpochs) => {
                require(epochs > 0.0 && epochs.is_finite(), "epochs", "expected a positive number")?
            }
            (_, Some(_), Length::Steps) => {
                return Err(Error::config("epochs", "this stage streams its data and has no epochs; give max_steps"))
            }
            (None, None, Length::Steps) => return Err(Error::config("max_steps", "expected the number of steps")),
            _ => return Err(Error::config("max_steps", "expected exactly one of max_steps and epochs")),
        }
        self.optimizer.validate()?;
        require(self.grad_clip >= 0.0, "grad_clip", "expected a non-negative value (0 turns clipping off)")?;
        require(self.checkpoint.keep > 0, "checkpoint.keep", "expected at least 1")?;
        require(self.eval.every > 0, "eval.every", "expected at least 1")?;
        require(self.log_every > 0, "log_every", "expected at least 1")?;
        self.lora.as_ref().map_or(Ok(()), LoraConfig::validate)
    }

    /// An error at `lora` for a stage that cannot train adapters (`why`).
    pub fn refuse_lora(&self, why: &str) -> Result<()> {
        require(self.lora.is_none(), "lora", why)
    }

    /// Sequences per forward/backward pass.
    pub fn micro_batch_size(&self) -> usize {
        self.micro_batch_size.unwrap_or(self.batch_size)
    }

    /// Optimizer steps of the run: `max_steps`, or `epochs` over `batches_per_epoch`.
    pub fn total_steps(&self, batches_per_epoch: usize) -> u64 {
        match (self.max_steps, self.epochs) {
            (Some(steps), _) => steps,
            (None, Some(epochs)) => (epochs * batches_per_epoch as f64).ceil().max(1.0) as u64,
            (None, None) => 1, // refused by `validate`
        }
    }

    /// The hyper-parameters every stage shows in TensorBoard's HParams tab.
    pub fn hparams(&self, total_steps: u64) -> serde_json::Map<String, serde_json::Value> {
        let json = serde_json::json!({
            "lr": self.optimizer.lr, "batch_size": self.batch_size, "max_steps": total_steps,
            "weight_decay": self.optimizer.weight_decay,
        });
        match json {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        }
    }
}

/// A training stage's section: the shared [`TrainingConfig`] and the stage's own `T`,
/// side by side in one mapping. Use it as a stage's `Config`.
#[derive(Debug, Clone)]
pub struct TrainSection<T> {
    pub train: TrainingConfig,
    pub stage: T,
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for TrainSection<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let section = match Value::deserialize(deserializer)? {
            Value::Null => Mapping::new(),
            Value::Mapping(mapping) => mapping,
            other => {
                let found = de::Unexpected::Other(match other {
                    Value::Sequence(_) => "a sequence",
                    _ => "a scalar",
                });
                return Err(de::Error::invalid_type(found, &"a mapping"));
            }
        };
        let shared = struct_fields::<TrainingConfig>().unwrap_or_default();
        let own = struct_fields::<T>();
        let (mut train, mut stage) = (Mapping::new(), Mapping::new());
        for (key, value) in section {
            let Some(name) = key.as_str() else {
                return Err(de::Error::custom(format!("expected string keys, found {key:?}")));
            };
            if shared.contains(&name) {
                train.insert(key, value);
            } else if own.is_none_or(|own| own.contains(&name)) {
                stage.insert(key, value);
            } else {
                let expected: Vec<&str> = own.unwrap_or_default().iter().chain(shared).copied().collect();
                let listed: Vec<String> = expected.iter().map(|n| format!("`{n}`")).collect();
                let message = format!("unknown field `{name}`, expected one of {}", listed.join(", "));
                return Err(de::Error::custom(located_message(name, &message)));
            }
        }
        let train = parse_value(Value::Mapping(train)).map_err(|e| de::Error::custom(located_message(&e.0, &e.1)))?;
        let stage = parse_value(Value::Mapping(stage)).map_err(|e| de::Error::custom(located_message(&e.0, &e.1)))?;
        Ok(Self { train, stage })
    }
}

/// One mapping with the keys of both parts: what `plumb explain` lists and `plumb
/// validate` fills in.
impl<T: JsonSchema> JsonSchema for TrainSection<T> {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        format!("TrainSection_{}", T::schema_name()).into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let mut section = T::json_schema(generator);
        let shared = TrainingConfig::json_schema(generator);
        for key in ["properties", "required"] {
            let Some(from_shared) = shared.get(key).cloned() else { continue };
            match (section.ensure_object().entry(key).or_insert_with(|| from_shared.clone()), from_shared) {
                (serde_json::Value::Object(own), serde_json::Value::Object(more)) => own.extend(more),
                (serde_json::Value::Array(own), serde_json::Value::Array(more)) => own.extend(more),
                _ => {}
            }
        }
        section
    }
}

/// The field names of struct `T` as its `Deserialize` declares them, or `None` when `T`
/// does not deserialize from a struct. (serde hands them to `deserialize_struct`.)
fn struct_fields<T: DeserializeOwned>() -> Option<&'static [&'static str]> {
    struct Fields(Option<&'static [&'static str]>);
    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("field names read")
        }
    }
    impl std::error::Error for Stop {}
    impl de::Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }
    impl<'de> Deserializer<'de> for &mut Fields {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> std::result::Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> std::result::Result<V::Value, Stop> {
            self.0 = Some(fields);
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields = Fields(None);
    let _ = T::deserialize(&mut fields);
    fields.0
}

/// The `optimizer:` section: AdamW with decoupled weight decay on matrices.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    /// The peak learning rate.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Adam's β1 and β2: decay rates of the gradient's running mean and of its square's.
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    /// Added to the denominator of Adam's update, for numerical stability.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay on matrices (not on norms, biases or embeddings).
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// 1: ZeRO stage 1 — in a distributed run each rank keeps and updates the AdamW state
    /// of its share of the parameters only, and the owners broadcast the updated
    /// parameters (same parameters, about 1/world of the state per rank). 0 (the
    /// default): every rank holds the whole state. No effect in a single-process run.
    #[serde(default)]
    pub zero_stage: u8,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            lr: default_lr(),
            betas: default_betas(),
            eps: default_eps(),
            weight_decay: default_weight_decay(),
            zero_stage: 0,
        }
    }
}

impl OptimizerConfig {
    /// Checks under `optimizer.`.
    pub fn validate(&self) -> Result<()> {
        require(self.lr > 0.0 && self.lr.is_finite(), "optimizer.lr", "expected a positive learning rate")?;
        require(self.betas.iter().all(|b| (0.0..1.0).contains(b)), "optimizer.betas", "expected two values in [0, 1)")?;
        require(self.eps > 0.0, "optimizer.eps", "expected a positive value")?;
        require(self.weight_decay >= 0.0, "optimizer.weight_decay", "expected a non-negative value")?;
        require(
            self.zero_stage <= 1,
            "optimizer.zero_stage",
            "expected 0 (no sharding) or 1 (shard the optimizer state)",
        )
    }

    pub fn adamw(&self, vs: &tch::nn::VarStore) -> AdamW {
        AdamW::new(
            vs,
            AdamWConfig {
                lr: self.lr,
                betas: (self.betas[0], self.betas[1]),
                eps: self.eps,
                weight_decay: self.weight_decay,
            },
        )
    }
}

/// The `schedule:` section: linear warmup, then a decay to a floor.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Steps of linear warmup from 0 to the peak learning rate.
    #[serde(default)]
    pub warmup_steps: u64,
    /// After warmup: `cosine`, `linear` or `constant` down to the floor.
    #[serde(default = "default_decay")]
    pub decay: Decay,
    /// The floor of the decay, as a fraction of the peak learning rate.
    #[serde(default = "default_min_lr_ratio")]
    pub min_lr_ratio: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self { warmup_steps: 0, decay: default_decay(), min_lr_ratio: default_min_lr_ratio() }
    }
}

impl ScheduleConfig {
    /// Checks under `schedule.` for a run of `max_steps`.
    pub fn validate(&self, max_steps: u64) -> Result<()> {
        require((0.0..=1.0).contains(&self.min_lr_ratio), "schedule.min_lr_ratio", "expected a value in [0, 1]")?;
        require(self.warmup_steps <= max_steps, "schedule.warmup_steps", "expected at most max_steps")
    }

    pub fn schedule(&self, peak_lr: f64, total_steps: u64) -> Schedule {
        Schedule {
            peak_lr,
            warmup_steps: self.warmup_steps,
            total_steps,
            decay: self.decay,
            min_lr_ratio: self.min_lr_ratio,
        }
    }
}

/// The `checkpoint:` section.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Save a resumable checkpoint every this many steps (and on Ctrl-C); 0 = never.
    #[serde(default = "default_checkpoint_every")]
    pub every: u64,
    /// Keep this many of the newest checkpoints.
    #[serde(default = "default_checkpoint_keep")]
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { every: default_checkpoint_every(), keep: default_checkpoint_keep() }
    }
}

/// The `eval:` section: when to evaluate and what to show.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Evaluate every this many steps (and before the first and after the last).
    #[serde(default = "default_eval_every")]
    pub every: u64,
    /// At most this many validation batches for the held-out loss; 0 = all.
    #[serde(default)]
    pub max_batches: usize,
    /// Fixed prompts answered (or continued) greedily at each evaluation, shown in
    /// TensorBoard as text, where the stage's model generates.
    #[serde(default)]
    pub sample_prompts: Vec<String>,
    /// Tokens generated for each sample or answer.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Held-out prompts answered greedily at each evaluation, for stages whose data has
    /// prompts and answers (SFT).
    #[serde(default = "default_num_prompts")]
    pub num_prompts: usize,
    /// A regular expression an answer to a held-out prompt must match (anchor it with
    /// `^…$` to require the whole answer); the share that do is `eval/format_compliance`.
    #[serde(default)]
    pub response_pattern: Option<String>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            every: default_eval_every(),
            max_batches: 0,
            sample_prompts: Vec::new(),
            max_new_tokens: default_max_new_tokens(),
            num_prompts: default_num_prompts(),
            response_pattern: None,
        }
    }
}

impl EvalConfig {
    /// At most this many validation batches.
    pub fn batch_limit(&self) -> usize {
        if self.max_batches > 0 {
            self.max_batches
        } else {
            usize::MAX
        }
    }
}

/// What a non-finite loss or gradient does (`on_nonfinite:`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnNonFinite {
    /// Stop the run with an error naming the step.
    #[default]
    Stop,
    /// Skip the step (no update), count it, and go on.
    Skip,
}

/// `batch_size_warmup:`: the batch grows linearly from `start` sequences to the full
/// batch size over the first `steps` optimizer steps, in whole micro-batches, as large
/// LLM runs ramp their batch while the loss falls fastest.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchSizeWarmup {
    /// Sequences in the first optimizer step (a multiple of `micro_batch_size`).
    pub start: usize,
    /// Optimizer steps over which the batch grows to `batch_size`.
    pub steps: u64,
}

impl BatchSizeWarmup {
    /// Checks under `batch_size_warmup.` against the full `batch_size` and `micro` batch.
    pub fn validate(&self, batch_size: usize, micro: usize) -> Result<()> {
        require(
            self.start >= 1 && self.start <= batch_size,
            "batch_size_warmup.start",
            "expected a value from 1 to batch_size",
        )?;
        require(
            self.start.is_multiple_of(micro),
            "batch_size_warmup.start",
            "expected a multiple of micro_batch_size",
        )?;
        require(self.steps > 0, "batch_size_warmup.steps", "expected at least 1")
    }

    /// Sequences in optimizer step `step` (0-based): `start + (full - start) * step / steps`,
    /// rounded down to a multiple of `micro`, reaching `full` at `steps`.
    pub fn batch_size(&self, step: u64, full: usize, micro: usize) -> usize {
        if step >= self.steps {
            return full;
        }
        let grown = self.start + ((full - self.start) as u128 * step as u128 / self.steps as u128) as usize;
        (grown / micro * micro).clamp(self.start, full)
    }
}

fn default_batch_size() -> usize {
    16
}
fn default_grad_clip() -> f64 {
    1.0
}
fn default_log_every() -> u64 {
    10
}
fn default_eval_every() -> u64 {
    100
}
fn default_max_new_tokens() -> usize {
    128
}
fn default_num_prompts() -> usize {
    8
}
fn default_lr() -> f64 {
    1e-3
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.95]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_weight_decay() -> f64 {
    0.1
}
fn default_decay() -> Decay {
    Decay::Cosine
}
fn default_min_lr_ratio() -> f64 {
    0.1
}
fn default_checkpoint_every() -> u64 {
    100
}
fn default_checkpoint_keep() -> usize {
    2
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::parse_section;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Own {
        data: String,
        #[serde(default)]
        seq_len: usize,
    }

    #[test]
    fn keys_go_to_the_struct_that_declares_them() {
        let c: TrainSection<Own> =
            parse_section("data: a.txt\nseq_len: 8\nbatch_size: 4\noptimizer: {lr: 0.5}\neval: {every: 3}\n").unwrap();
        assert_eq!((c.stage.data.as_str(), c.stage.seq_len), ("a.txt", 8));
        assert_eq!((c.train.batch_size, c.train.optimizer.lr, c.train.eval.every), (4, 0.5, 3));
        assert_eq!(c.train.grad_clip, 1.0);
    }

    #[test]
    fn errors_name_the_key_inside_either_struct() {
        let e = parse_section::<TrainSection<Own>>("data: a\nmax_step: 3\n").unwrap_err();
        assert_eq!(e.path, "max_step");
        assert!(e.message.starts_with("unknown key; expected one of `data`, `seq_len`, `optimizer`"), "{}", e.message);
        assert!(e.message.ends_with("did you mean `max_steps`?"), "{}", e.message);
        let e = parse_section::<TrainSection<Own>>("data: a\noptimizer: {lr: fast}\n").unwrap_err();
        assert_eq!(
            (e.path.as_str(), e.message.as_str()),
            ("optimizer.lr", "expected a number, found a string \"fast\"")
        );
        let e = parse_section::<TrainSection<Own>>("seq_len: 2\n").unwrap_err();
        assert_eq!((e.path.as_str(), e.message.as_str()), ("", "missing required key `data`"));
        let e = parse_section::<TrainSection<Own>>("[1]").unwrap_err();
        assert_eq!(e.message, "expected a mapping, found a sequence");
    }

    #[test]
    fn the_length_is_one_of_steps_and_epochs() {
        let train = |yaml: &str| parse_section::<TrainSection<Own>>(&format!("data: a\n{yaml}")).unwrap().train;
        assert!(train("max_steps: 3").validate(Length::Steps).is_ok());
        assert!(train("epochs: 2").validate(Length::StepsOrEpochs).is_ok());
        let e = train("epochs: 2").validate(Length::Steps).unwrap_err().to_string();
        assert!(e.contains("epochs"), "{e}");
        let e = train("max_steps: 3\nepochs: 2").validate(Length::StepsOrEpochs).unwrap_err().to_string();
        assert!(e.contains("exactly one of max_steps and epochs"), "{e}");
        assert_eq!(train("epochs: 1.5").total_steps(10), 15);
        let e = train("max_steps: 4\nmicro_batch_size: 3").validate(Length::Steps).unwrap_err().to_string();
        assert!(e.contains("micro_batch_size"), "{e}");
    }

    #[test]
    fn zero_stage_is_0_or_1() {
        let train = |yaml: &str| parse_section::<TrainSection<Own>>(&format!("data: a\n{yaml}")).unwrap().train;
        assert_eq!(train("max_steps: 3").optimizer.zero_stage, 0);
        assert!(train("max_steps: 3\noptimizer: {zero_stage: 1}").validate(Length::Steps).is_ok());
        let e = train("max_steps: 3\noptimizer: {zero_stage: 2}").validate(Length::Steps).unwrap_err().to_string();
        assert!(e.contains("optimizer.zero_stage") && e.contains("expected 0 (no sharding) or 1"), "{e}");
    }

    #[test]
    fn the_batch_grows_linearly_in_whole_micro_batches() {
        let warmup = BatchSizeWarmup { start: 4, steps: 10 };
        let sizes: Vec<usize> = (0..12).map(|s| warmup.batch_size(s, 32, 4)).collect();
        // 4 + 28 * s / 10, rounded down to a multiple of 4.
        assert_eq!(sizes, [4, 4, 8, 12, 12, 16, 20, 20, 24, 28, 32, 32]);
        assert!(warmup.validate(32, 4).is_ok());
        assert!(BatchSizeWarmup { start: 6, steps: 10 }.validate(32, 4).is_err());
        assert!(BatchSizeWarmup { start: 64, steps: 10 }.validate(32, 4).is_err());
    }
}
