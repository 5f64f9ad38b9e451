//! `pretrain.perplexity`: perplexity and mean token loss of a causal LM (any family
//! `plumb_core::model::load` reads) on a text or JSONL file.
//!
//! Scored the way lm-evaluation-harness scores wikitext (`loglikelihood_rolling`, context
//! length 1): each document is tokenized on its own and cut into disjoint windows of up to
//! `seq_len` predicted tokens. A window's input is the token just before it (for the first
//! window, BOS, or EOS when the tokenizer has no BOS) followed by all but its last target,
//! so every token of the document is predicted exactly once, from at most `seq_len` tokens
//! of context. Windows are scored `batch_size` at a time.
//!
//! Metrics: `eval/loss` (mean negative log-likelihood per token, nats), `eval/perplexity`
//! (its exponential), `eval/tokens` (tokens scored); like the harness, also
//! `eval/word_perplexity`, `eval/byte_perplexity` and `eval/bits_per_byte`, and
//! `eval/documents`.
use std::path::{Path, PathBuf};
use std::time::Instant;

use plumb_core::data::objectives::IGNORE_INDEX;
use plumb_core::data::stream::{read_source, SourceConfig};
use plumb_core::error::IoResultExt;
use plumb_core::plugin::{Metrics, ValidateContext};
use plumb_core::tch::{self, Kind, Tensor};
use plumb_core::train::summed_cross_entropy;
use plumb_core::{model, Error, Evaluator, Result, RunContext};
use serde::Deserialize;

/// Context length when neither the recipe nor the model's `config.json` gives one.
const FALLBACK_SEQ_LEN: usize = 1024;

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PerplexityConfig {
    /// A text file (documents separated by blank lines) or a JSONL file (`.jsonl`, one
    /// document per line, the text in `field`).
    pub data: PathBuf,
    /// JSONL only: the field holding the text.
    #[serde(default)]
    pub field: Option<String>,
    /// Tokens predicted per window; default: the model's context length
    /// (`max_position_embeddings` or `n_positions` in its `config.json`).
    #[serde(default)]
    pub seq_len: Option<usize>,
    /// Windows per forward pass.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Score only the first this many documents.
    #[serde(default)]
    pub max_documents: Option<usize>,
}

fn default_batch_size() -> usize {
    8
}

fn is_jsonl(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("jsonl" | "ndjson"))
}

pub struct Perplexity;

impl Evaluator for Perplexity {
    const NAME: &'static str = "perplexity";
    const DESCRIPTION: &'static str =
        "Perplexity and mean token loss of the input causal LM on a text or JSONL file, in windows of seq_len";
    type Config = PerplexityConfig;

    fn validate(c: &PerplexityConfig, ctx: &ValidateContext) -> Result<()> {
        ctx.existing_file("data", &c.data)?;
        if c.field.is_some() && !is_jsonl(&c.data) {
            return Err(Error::config("field", "only JSONL files (.jsonl) have fields"));
        }
        if c.seq_len == Some(0) {
            return Err(Error::config("seq_len", "expected at least 1 token per window"));
        }
        if c.batch_size == 0 {
            return Err(Error::config("batch_size", "expected at least 1"));
        }
        if c.max_documents == Some(0) {
            return Err(Error::config("max_documents", "expected at least 1"));
        }
        ctx.require_input_model("perplexity scores a model")?;
        Ok(())
    }

    fn evaluate(c: PerplexityConfig, ctx: &mut RunContext) -> Result<Metrics> {
        let dir = ctx
            .input_model()
            .ok_or_else(|| {
                Error::Other(
                    "no model to evaluate: give the entry a `model:` directory or put it after a stage that \
                     produces one"
                        .into(),
                )
            })?
            .to_path_buf();
        let seq_len = match c.seq_len {
            Some(n) => n,
            None => context_length(&dir)?,
        };
        let tokenizer = plumb_core::tokenizer::Tokenizer::from_dir(&dir)?;
        let prefix = tokenizer.bos_id().or(tokenizer.eos_id()).ok_or_else(|| {
            Error::file(
                dir.join("tokenizer.json"),
                "the tokenizer has neither a BOS nor an EOS token to start a document with",
            )
        })?;
        let mut documents = read_documents(&c.data, c.field.as_deref())?;
        if let Some(max) = c.max_documents {
            documents.truncate(max);
        }
        let texts: Vec<&str> = documents.iter().map(String::as_str).collect();
        let tokens = tokenizer.encode_batch(&texts)?;
        let windows: Vec<Window> = tokens.iter().flat_map(|doc| windows(doc, prefix, seq_len)).collect();
        if windows.is_empty() {
            return Err(Error::file(&c.data, "no tokens to score: every document is empty"));
        }

        let device = ctx.device();
        let policy = model::load(&dir, device, Kind::Float)?;
        let _no_grad = tch::no_grad_guard();
        let batches = windows.len().div_ceil(c.batch_size) as u64;
        let (mut nll, mut scored) = (0.0f64, 0u64);
        let started = Instant::now();
        for (i, batch) in windows.chunks(c.batch_size).enumerate() {
            if ctx.should_stop() {
                return Err(Error::Cancelled);
            }
            let (inputs, targets) = pad(batch);
            let inputs = inputs.to_device(device);
            let logits = policy.logits(&inputs, None)?; // (B, T, vocab)

            // Summed over real targets; padding is ignored. Right padding never changes
            // what a causal model predicts at the positions before it.
            let sum = summed_cross_entropy(&logits, &targets.to_device(device));
            nll += sum.double_value(&[]); // a CPU-GPU sync per batch
            scored += batch.iter().map(|w| w.targets.len() as u64).sum::<u64>();
            let seconds = started.elapsed().as_secs_f64().max(1e-9);
            ctx.progress(i as u64 + 1, batches, Some(nll / scored as f64), Some(scored as f64 / seconds), Some(scored));
        }

        let loss = nll / scored as f64;
        let words: usize = documents.iter().map(|d| d.split_whitespace().count()).sum();
        let bytes: usize = documents.iter().map(String::len).sum();
        tracing::info!(
            "perplexity of {} on {}: {:.4} ({scored} tokens in {} windows of up to {seq_len})",
            dir.display(),
            c.data.display(),
            loss.exp(),
            windows.len()
        );
        let mut metrics = Metrics::new();
        metrics.insert("eval/loss".into(), loss);
        metrics.insert("eval/perplexity".into(), loss.exp());
        metrics.insert("eval/tokens".into(), scored as f64);
        metrics.insert("eval/documents".into(), documents.len() as f64);
        metrics.insert("eval/word_perplexity".into(), (nll / words.max(1) as f64).exp());
        metrics.insert("eval/byte_perplexity".into(), (nll / bytes.max(1) as f64).exp());
        metrics.insert("eval/bits_per_byte".into(), nll / bytes.max(1) as f64 / std::f64::consts::LN_2);
        Ok(metrics)
    }
}

/// One window: the tokens fed in and the tokens they predict, one for one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub inputs: Vec<i64>,
    pub targets: Vec<i64>,
}

/// A document's disjoint windows of up to `seq_len` targets; `prefix` precedes the first.
pub fn windows(tokens: &[i64], prefix: i64, seq_len: usize) -> Vec<Window> {
    (0..tokens.len())
        .step_by(seq_len.max(1))
        .map(|start| {
            let end = (start + seq_len.max(1)).min(tokens.len());
            let mut inputs = Vec::with_capacity(end - start);
            inputs.push(if start == 0 { prefix } else { tokens[start - 1] });
            inputs.extend_from_slice(&tokens[start..end - 1]);
            Window { inputs, targets: tokens[start..end].to_vec() }
        })
        .collect()
}

/// Windows as a right-padded batch: inputs (B, T) padded with 0, targets (B, T) with IGNORE_INDEX (-100).
fn pad(batch: &[Window]) -> (Tensor, Tensor) {
    let width = batch.iter().map(|w| w.inputs.len()).max().unwrap_or(0);
    let mut inputs = Vec::with_capacity(batch.len() * width);
    let mut targets = Vec::with_capacity(batch.len() * width);
    for w in batch {
        let gap = width - w.inputs.len();
        inputs.extend(w.inputs.iter().copied().chain(std::iter::repeat_n(0, gap)));
        targets.extend(w.targets.iter().copied().chain(std::iter::repeat_n(IGNORE_INDEX, gap)));
    }
    let shape = [batch.len() as i64, width as i64];
    (Tensor::from_slice(&inputs).view(shape), Tensor::from_slice(&targets).view(shape))
}

/// The model's context length from its `config.json`, else [`FALLBACK_SEQ_LEN`].
fn context_length(dir: &Path) -> Result<usize> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).at(&path)?;
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::file(&path, format!("not JSON: {e}")))?;
    let length = ["max_position_embeddings", "n_positions"].iter().find_map(|k| config.get(*k)?.as_u64());
    Ok(length.map_or(FALLBACK_SEQ_LEN, |n| n as usize))
}

/// The documents of a text file (blank-line separated) or of a JSONL file (`field`,
/// default `text`, of each non-blank line); errors name the file and line.
pub fn read_documents(path: &Path, field: Option<&str>) -> Result<Vec<String>> {
    read_source(&SourceConfig { path: path.to_path_buf(), weight: 1.0, field: field.map(str::to_owned) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_predict_every_token_once_with_the_token_before_as_context() {
        let w = windows(&[10, 11, 12, 13, 14], 1, 2);
        assert_eq!(
            w,
            vec![
                Window { inputs: vec![1, 10], targets: vec![10, 11] },
                Window { inputs: vec![11, 12], targets: vec![12, 13] },
                Window { inputs: vec![13], targets: vec![14] },
            ]
        );
        assert_eq!(windows(&[7], 1, 8), vec![Window { inputs: vec![1], targets: vec![7] }]);
        assert!(windows(&[], 1, 8).is_empty());
    }

    #[test]
    fn padding_is_ignored_by_the_loss() {
        let (inputs, targets) = pad(&windows(&[5, 6, 7], 1, 2));
        assert_eq!(Vec::<i64>::try_from(inputs.view([-1])).unwrap(), vec![1, 5, 6, 0]);
        assert_eq!(Vec::<i64>::try_from(targets.view([-1])).unwrap(), vec![5, 6, 7, -100]);
    }

    #[test]
    fn jsonl_errors_name_the_line() {
        let dir = std::env::temp_dir().join(format!("plumb-ppl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.jsonl");
        std::fs::write(&path, "{\"text\": \"a b\"}\n\n{\"body\": \"c\"}\n").unwrap();
        let e = read_documents(&path, None).unwrap_err().to_string();
        assert_eq!(e, format!("{}: line 3: missing field `text`", path.display()));
        assert_eq!(
            read_documents(&path, Some("body")).unwrap_err().to_string(),
            format!("{}: line 1: missing field `body`", path.display())
        );
        std::fs::write(&path, "{\"text\": \"a b\"}\n{\"text\": \"c\"}\n").unwrap();
        assert_eq!(read_documents(&path, None).unwrap(), vec!["a b".to_string(), "c".to_string()]);
        std::fs::write(&path, "\u{FEFF}{\"text\": \"a b\"}\n").unwrap(); // a byte-order mark
        assert_eq!(read_documents(&path, None).unwrap(), vec!["a b".to_string()]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
