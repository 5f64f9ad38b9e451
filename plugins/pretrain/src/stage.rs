//! The training loop every pretraining objective shares — causal LM on a decoder, masked
//! LM on a bidirectional encoder, span corruption on an encoder-decoder — which differ only
//! in the model and in how a row of tokens becomes a loss. Each objective implements
//! [`Objective`]; the stage ([`Pretraining`]) does the rest: a streamed corpus, a tokenizer
//! trained from scratch with the objective's special tokens (or an input model), batch-size
//! warmup, accumulation, clipping, the non-finite guard, checkpoints and resume, evaluation
//! on the held-out rows (corrupted the same way at every evaluation, with greedy samples
//! where the model generates), and an HF-layout save.
//!
//! The loop in [`Pretraining::run`] is the whole algorithm, top to bottom.

use std::fmt::Debug;
use std::marker::PhantomData;
use std::path::Path;

use plumb_core::data::stream::TokenStream;
use plumb_core::data::{seeded_rng, SeededRng};
use plumb_core::device::device_name;
use plumb_core::model::SaveHf;
use plumb_core::optim::AdamW;
use plumb_core::plugin::ValidateContext;
use plumb_core::tch::{self, nn, Device, Tensor};
use plumb_core::tokenizer::Tokenizer;
use plumb_core::train::{require, BatchSizeWarmup, Length, TrainSection, Trained, Trainer};
use plumb_core::{Error, Result, RunContext, Stage, StageOutput};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::corpus::{eos_of, position, stream_from, Corpus, DataConfig, TokenizerConfig};

/// Special tokens a fresh tokenizer needs besides EOS: (name, token) pairs for the named
/// ones, and the additional ones.
pub type SpecialTokens = (Vec<(&'static str, String)>, Vec<String>);

/// One pretraining objective: its model family, its settings, and its loss.
pub trait Objective: Sized + 'static {
    const NAME: &'static str;
    const DESCRIPTION: &'static str;
    /// The model trained.
    type Model: SaveHf;
    /// `model:`, the architecture of a fresh model (the vocabulary comes from the tokenizer).
    type Architecture: DeserializeOwned + schemars::JsonSchema + Debug + Clone;
    /// `objective:`, the corruption's settings.
    type Settings: DeserializeOwned + schemars::JsonSchema + Debug + Clone + Default;

    /// Checks of `objective:` and `model:` (at those keys) for rows of `seq_len` tokens.
    fn validate(settings: &Self::Settings, model: Option<&Self::Architecture>, seq_len: usize) -> Result<()>;
    /// Special tokens a fresh tokenizer needs besides EOS: named ones and additional ones.
    fn special_tokens(settings: &Self::Settings, seq_len: usize) -> Result<SpecialTokens>;
    /// Tokens of a raw (uncorrupted) training row for inputs of `seq_len` tokens.
    fn row_length(settings: &Self::Settings, seq_len: usize) -> Result<usize>;

    fn new_model(
        architecture: &Self::Architecture,
        tokenizer: &Tokenizer,
        seq_len: usize,
        device: Device,
    ) -> Result<Self::Model>;
    fn load_model(dir: &Path, device: Device) -> Result<Self::Model>;
    fn var_store(model: &Self::Model) -> &nn::VarStore;

    /// The objective, its token ids looked up in `tokenizer`, for `model`.
    fn new(settings: &Self::Settings, tokenizer: &Tokenizer, model: &Self::Model) -> Result<Self>;
    /// Corrupts `rows` with `rng` (if the objective corrupts) and returns the summed loss
    /// over their prediction targets and how many there were.
    fn loss(
        &self,
        model: &Self::Model,
        rows: &[Vec<i64>],
        rng: &mut SeededRng,
        device: Device,
    ) -> Result<(Tensor, usize)>;

    /// Greedy continuations of `prompts`, as Markdown, where the model generates.
    fn samples(
        &self,
        _model: &Self::Model,
        _tokenizer: &Tokenizer,
        _prompts: &[String],
        _tokens: usize,
    ) -> Result<Option<String>> {
        Ok(None)
    }
}

/// The stage's own recipe section, beside the training fields every stage shares
/// ([`TrainingConfig`]: optimizer, schedule, batch, steps, checkpoint, eval, ...).
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(bound = "A: schemars::JsonSchema, S: schemars::JsonSchema + Default")]
pub struct PretrainConfig<A, S> {
    /// The corpus: one text file or a weighted mixture, streamed, packed and held out.
    pub data: DataConfig,
    /// The byte-level BPE tokenizer trained from the corpus when the stage starts from scratch.
    #[serde(default)]
    pub tokenizer: TokenizerConfig,
    /// The architecture, when the stage starts from scratch (no input model).
    #[serde(default = "no_model::<A>")]
    pub model: Option<A>,
    /// The objective's own settings (masking or span corruption rates).
    #[serde(default)]
    pub objective: S,
    /// Grow the batch from `start` sequences to `batch_size` over the first `steps` steps.
    #[serde(default)]
    pub batch_size_warmup: Option<BatchSizeWarmup>,
}

/// No architecture: the default of `model:` (typed, so that schemars can write it out).
fn no_model<A>() -> Option<A> {
    None
}

/// A pretraining objective as a stage.
pub struct Pretraining<O>(PhantomData<O>);

impl<O: Objective> Stage for Pretraining<O> {
    const NAME: &'static str = O::NAME;
    const DESCRIPTION: &'static str = O::DESCRIPTION;
    type Config = TrainSection<PretrainConfig<O::Architecture, O::Settings>>;

    fn validate(config: &Self::Config, ctx: &ValidateContext) -> Result<()> {
        let TrainSection { train: training, stage: c } = config;
        c.data.validate(ctx)?;
        let (named, additional) = O::special_tokens(&c.objective, c.data.seq_len)?;
        c.tokenizer.validate(named.len() + additional.len())?;
        O::validate(&c.objective, c.model.as_ref(), c.data.seq_len)?;
        training.validate(Length::Steps)?;
        training.refuse_lora(
            "pretraining trains every weight of the model; LoRA adapts a pretrained one (sft, reward_model, ppo)",
        )?;
        require(
            training.eval.response_pattern.is_none(),
            "eval.response_pattern",
            "pretraining has no held-out prompts to answer; drop it",
        )?;
        if let Some(warmup) = &c.batch_size_warmup {
            warmup.validate(training.batch_size, training.micro_batch_size())?;
        }
        Ok(())
    }

    fn run(config: Self::Config, ctx: &mut RunContext) -> Result<StageOutput> {
        let TrainSection { train: training, stage: c } = config;
        let device = ctx.device();
        tch::manual_seed(ctx.seed() as i64);
        let seq_len = c.data.seq_len;
        let row_len = O::row_length(&c.objective, seq_len)?;
        let mut trainer = Trainer::new(ctx, &training, training.total_steps(0))?;

        // Data, tokenizer and model: from the latest checkpoint, an input model, or scratch.
        let corpus = Corpus::open(&c.data, ctx)?;
        let (model, tokenizer) = match (trainer.resume_dir(), ctx.input_model(), &c.model) {
            (Some(dir), _, _) => (O::load_model(dir, device)?, Tokenizer::from_dir(dir)?),
            (None, Some(dir), None) => (O::load_model(dir, device)?, Tokenizer::from_dir(dir)?),
            (None, None, Some(architecture)) => {
                let (named, additional) = O::special_tokens(&c.objective, seq_len)?;
                let named: Vec<(&str, &str)> = named.iter().map(|(k, t)| (*k, t.as_str())).collect();
                let tokenizer = c.tokenizer.train(&corpus, &named, &additional, ctx)?;
                (O::new_model(architecture, &tokenizer, seq_len, device)?, tokenizer)
            }
            (None, Some(dir), Some(_)) => {
                return Err(Error::config(
                    "model",
                    format!("the stage starts from the model in {}; drop `model:` or the input model", dir.display()),
                ))
            }
            (None, None, None) => {
                return Err(Error::config(
                    "model",
                    "expected an architecture (`model:`) or an input model (the stage's `model:` path in the recipe)",
                ))
            }
        };
        let vs = O::var_store(&model);
        let parameters = plumb_core::model::num_parameters(vs);
        let non_embedding = plumb_core::model::non_embedding_parameters(vs);
        let objective = O::new(&c.objective, &tokenizer, &model)?;
        let eos = eos_of(&tokenizer)?;
        let (validation, unigram_entropy) = corpus.validation_rows(&tokenizer, row_len)?;
        tracing::info!("model: {parameters} parameters on {}; rows of {row_len} raw tokens", device_name(device));

        let mut optimizer = training.optimizer.adamw(vs);
        let resumed = trainer.restore(&mut [("model", &mut optimizer)])?;
        let is_resumed = resumed.is_some();
        let mut stream = stream_from(&corpus, resumed, (row_len, eos, c.data.shuffle_buffer))?;
        let checkpoint = |trainer: &Trainer, stream: &TokenStream, optimizer: &AdamW| {
            let models = [Trained { name: "model", model: &model, optimizer }];
            trainer.save_checkpoint(&models, &tokenizer, seq_len, position(stream))
        };
        let evaluate = || -> Result<f64> {
            let _no_grad = tch::no_grad_guard();
            let mut rng = seeded_rng(ctx.seed() ^ 0xE7A1); // the same corruption every time
            let (mut total, mut count) = (0.0, 0);
            for rows in validation.chunks(training.batch_size).take(training.eval.batch_limit()) {
                let (sum, n) =
                    training.precision.forward(device, || objective.loss(&model, rows, &mut rng, device))??;
                total += sum.double_value(&[]);
                count += n;
            }
            Ok(total / count.max(1) as f64)
        };
        // The loss before training; a resumed run reports the one its first run measured.
        let initial_eval = trainer.at_start("eval/initial_loss", evaluate)?;
        let mut eval_loss = initial_eval;
        if is_resumed {
            eval_loss = trainer.untimed(evaluate)?;
        } else {
            tracing::info!("step 0: eval/loss {initial_eval:.4}");
            ctx.scalar("eval/loss", 0, initial_eval);
        }

        // Train: each step takes batch_size fresh rows (fewer while the batch size warms
        // up), corrupts them (drawn from the seed and the step alone) and accumulates the
        // gradients of micro-batches.
        let micro = training.micro_batch_size();
        while trainer.running() {
            if trainer.stop_requested() {
                return Err(trainer.stop(checkpoint(&trainer, &stream, &optimizer)?));
            }
            let step = trainer.state.step;
            trainer.start_step(&mut [&mut optimizer]);
            let batch_size = match &c.batch_size_warmup {
                Some(warmup) => warmup.batch_size(step, training.batch_size, micro),
                None => training.batch_size,
            };
            let rows = stream.next_rows(&tokenizer, batch_size)?;
            // This rank's share of the global batch (all of it in a single-process run).
            let rows = &rows[trainer.shard(rows.len())];
            let mut rng = seeded_rng(ctx.seed() ^ (step + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut sums = Vec::new();
            let mut targets = 0;
            for chunk in rows.chunks(micro) {
                let (sum, n) =
                    training.precision.forward(device, || objective.loss(&model, chunk, &mut rng, device))??;
                sums.push(sum);
                targets += n;
            }
            let mut loss = 0.0;
            let last = sums.len().saturating_sub(1);
            for (i, sum) in sums.into_iter().enumerate() {
                trainer.backward(&(&sum / targets as f64), i == last)?;
                loss += sum.double_value(&[]) / targets as f64;
            }
            // Model input tokens, as hf_baseline.py counts them (the trainer sums the ranks').
            let step_tokens = (rows.len() * seq_len) as u64;
            if !trainer.finish_step(&mut [&mut optimizer], loss, step_tokens, rows.len())? {
                continue;
            }
            let step = trainer.state.step;
            if trainer.eval_due() {
                let train_loss = trainer.last.loss;
                trainer.untimed(|| -> Result<()> {
                    eval_loss = evaluate()?;
                    ctx.scalar("eval/loss", step as i64, eval_loss);
                    ctx.scalar("eval/perplexity", step as i64, eval_loss.exp());
                    tracing::info!("step {step}: train/loss {train_loss:.4} eval/loss {eval_loss:.4}");
                    let (prompts, tokens) = (&training.eval.sample_prompts, training.eval.max_new_tokens);
                    if let Some(text) =
                        objective.samples(&model, &tokenizer, prompts, tokens)?.filter(|_| !prompts.is_empty())
                    {
                        ctx.text("samples/greedy", step as i64, &text);
                    }
                    Ok(())
                })?;
            }
            if trainer.checkpoint_due() {
                checkpoint(&trainer, &stream, &optimizer)?;
            }
        }

        let final_dir = trainer.save_final(&model, &tokenizer, seq_len)?;
        let mut metrics = trainer.metrics();
        metrics.extend([
            ("eval/loss".to_string(), eval_loss),
            ("eval/initial_loss".to_string(), initial_eval),
            ("data/unigram_entropy".to_string(), unigram_entropy),
            ("model/parameters".to_string(), parameters as f64),
            ("model/non_embedding_parameters".to_string(), non_embedding as f64),
        ]);
        let mut hparams = training.hparams(trainer.max_steps());
        hparams.extend([
            ("objective".to_string(), O::NAME.into()),
            ("seq_len".to_string(), seq_len.into()),
            ("vocab_size".to_string(), tokenizer.vocab_size().into()),
            ("parameters".to_string(), parameters.into()),
        ]);
        ctx.hparams(&hparams, &["eval/loss", "train/loss"]);
        Ok(StageOutput { model: Some(final_dir), metrics })
    }
}
