//! A custom plumb plugin, written the way you would write one in your own crate. To
//! start your own, let plumb write the crate (manifest, build script, a stage, a recipe, a
//! test) and follow its README:
//!
//! ```sh
//! plumb new plugin my_plugin            # plumb-core comes from this checkout, by path
//! ```
//!
//! (plumb-core is not on crates.io: the name there belongs to another project.)
//!
//! It provides a stage, `custom.perplexity`, that measures the input model's perplexity
//! on a text file, and a reward, `custom.word_count`, that prefers responses of a target
//! length. Build it with `cargo build --example custom_plugin` and name the library in a
//! recipe (see `recipes/custom_plugin.yaml`).
use std::path::PathBuf;

use plumb_core::model::llama::LlamaForCausalLm;
use plumb_core::plugin::ValidateContext;
use plumb_core::reward::{RewardModel, ScorePair};
use plumb_core::tch::{self, Kind};
use plumb_core::tokenizer::Tokenizer;
use plumb_core::train::next_token_loss;
use plumb_core::{data, Error, Result, RunContext, Stage, StageOutput};
use serde::Deserialize;

/// The evaluator's section. Deriving `schemars::JsonSchema` is all it takes for
/// `plumb explain custom.perplexity` to list its keys, doc comments and defaults.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PerplexityConfig {
    /// A text file; documents separated by blank lines.
    text: PathBuf,
    /// Tokens per window scored.
    #[serde(default = "default_seq_len")]
    seq_len: usize,
}

fn default_seq_len() -> usize {
    64
}

pub struct Perplexity;

impl Stage for Perplexity {
    const NAME: &'static str = "perplexity";
    const DESCRIPTION: &'static str = "Perplexity of the input model on a text file";
    type Config = PerplexityConfig;

    fn validate(c: &PerplexityConfig, ctx: &ValidateContext) -> Result<()> {
        ctx.existing_file("text", &c.text)?;
        if c.seq_len < 2 {
            return Err(Error::config("seq_len", "expected at least 2"));
        }
        ctx.require_input_model("perplexity measures a model")?;
        Ok(())
    }

    fn run(c: PerplexityConfig, ctx: &mut RunContext) -> Result<StageOutput> {
        let dir = ctx.input_model().ok_or_else(|| Error::Other("needs an input model".into()))?.to_path_buf();
        let model = LlamaForCausalLm::from_dir(&dir, ctx.device(), Kind::Float)?;
        let tokenizer = Tokenizer::from_dir(&dir)?;
        let eos = tokenizer.eos_id().unwrap_or(0);
        let docs = data::read_documents(&c.text)?;
        let tokens = tokenizer.encode_batch(&docs.iter().map(String::as_str).collect::<Vec<_>>())?;
        let rows = data::pack(&tokens, eos, c.seq_len)?.to_device(ctx.device());
        let _no_grad = tch::no_grad_guard();
        let len = rows.size()[1] - 1;
        let loss = next_token_loss(&model, &rows.narrow(1, 0, len), &rows.narrow(1, 1, len))?.double_value(&[]);
        ctx.scalar("eval/loss", 0, loss);
        tracing::info!("perplexity of {} on {}: {:.3}", dir.display(), c.text.display(), loss.exp());
        let mut output = StageOutput { model: Some(dir), ..Default::default() };
        output.metrics.insert("eval/loss".into(), loss);
        output.metrics.insert("eval/perplexity".into(), loss.exp());
        Ok(output)
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WordCountConfig {
    /// The number of words a response should have.
    target_words: usize,
}

/// Score: minus the distance between the response's word count and the target.
pub struct WordCount {
    target: usize,
}

impl RewardModel for WordCount {
    fn score(&mut self, pairs: &[ScorePair]) -> Result<Vec<f64>> {
        Ok(pairs.iter().map(|p| -(p.response.split_whitespace().count() as f64 - self.target as f64).abs()).collect())
    }
}

impl plumb_core::Reward for WordCount {
    const NAME: &'static str = "word_count";
    const DESCRIPTION: &'static str = "Prefers responses with a target number of words";
    type Config = WordCountConfig;

    fn new(c: WordCountConfig, _: &plumb_core::plugin::RewardContext) -> Result<Self> {
        Ok(Self { target: c.target_words })
    }
}

plumb_core::export_plugin! {
    name: "custom",
    version: "0.1.0",
    description: "Example out-of-tree plugin: a perplexity stage and a word-count reward",
    stages: [Perplexity],
    evaluators: [],
    rewards: [WordCount],
}
