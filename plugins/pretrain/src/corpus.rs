//! The `data:` and `tokenizer:` sections every pretraining objective shares: which files
//! to read (one text file, curated on request, or a weighted mixture of text and JSONL
//! files, streamed), the held-out documents, and a tokenizer trained on the stream's start.
use std::path::PathBuf;

use plumb_core::checkpoint::write_file_atomically;
use plumb_core::data::curation::{count_words, curate, CurationConfig};
use plumb_core::data::stream::{
    check_documents, validation_documents, Mixture, SourceConfig, StreamState, TokenStream,
};
use plumb_core::data::{self};
use plumb_core::plugin::ValidateContext;
use plumb_core::tch::Tensor;
use plumb_core::tokenizer::Tokenizer;
use plumb_core::train::{nested, require, DataPosition};
use plumb_core::{Error, Result, RunContext};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A UTF-8 text file; documents are separated by blank lines. Or `sources`.
    #[serde(default)]
    pub train: Option<PathBuf>,
    /// Several files mixed by weight, streamed from disk: text (`.txt`, blank-line
    /// separated) or JSONL (`.jsonl`, the text in `field`, default `text`).
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// Held-out documents kept for evaluation, at most, from each source.
    #[serde(default = "default_max_validation_documents")]
    pub max_validation_documents: usize,
    /// Rows ready to draw from at random (a shuffle buffer over the stream).
    #[serde(default = "default_shuffle_buffer")]
    pub shuffle_buffer: usize,
    /// Fraction of documents held out for evaluation.
    #[serde(default = "default_validation_fraction")]
    pub validation_fraction: f64,
    /// Tokens per training sequence (the encoder's input length, for span corruption).
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// Curate the corpus before training (quality heuristics, exact and near
    /// deduplication); the report goes to the log and TensorBoard.
    #[serde(default)]
    pub curation: Option<CurationConfig>,
}

impl DataConfig {
    /// Checks under `data.`.
    pub fn validate(&self, ctx: &ValidateContext) -> Result<()> {
        match (&self.train, self.sources.as_slice()) {
            (Some(train), []) => ctx.existing_file("data.train", train)?,
            (None, sources) if !sources.is_empty() => {
                for (i, source) in sources.iter().enumerate() {
                    source.validate(&format!("data.sources[{i}]"))?;
                }
                require(self.curation.is_none(), "data.curation", "curation works on `train`, a single file")?;
            }
            _ => return Err(Error::config("data", "expected `train` (one text file) or `sources` (a mixture)")),
        }
        // Every file is read once now, so that a file no stage could read is reported
        // before the first stage of the recipe computes anything.
        let sources = match &self.train {
            Some(train) => vec![SourceConfig::text(train)],
            None => self.sources.clone(),
        };
        for source in &sources {
            check_documents(source)?;
        }
        require(self.shuffle_buffer > 0, "data.shuffle_buffer", "expected at least 1")?;
        require(self.max_validation_documents > 0, "data.max_validation_documents", "expected at least 1")?;
        require(
            self.validation_fraction > 0.0 && self.validation_fraction < 1.0,
            "data.validation_fraction",
            "expected a fraction strictly between 0 and 1",
        )?;
        require(self.seq_len >= 2, "data.seq_len", "expected at least 2")?;
        if let Some(curation) = &self.curation {
            curation.validate().map_err(|e| nested("data.curation", e))?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizerConfig {
    /// Tokens in the vocabulary, special tokens included.
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    /// A pair is merged only when it occurs at least this often.
    #[serde(default = "default_min_frequency")]
    pub min_frequency: u64,
    /// Trained on at most this many training documents, from the start of the stream.
    #[serde(default = "default_max_tokenizer_documents")]
    pub max_documents: usize,
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        Self {
            vocab_size: default_vocab_size(),
            min_frequency: default_min_frequency(),
            max_documents: default_max_tokenizer_documents(),
        }
    }
}

impl TokenizerConfig {
    /// Checks under `tokenizer.`; `specials` more special tokens than EOS will be added.
    pub fn validate(&self, specials: usize) -> Result<()> {
        require(
            self.vocab_size > 256 + 1 + specials,
            "tokenizer.vocab_size",
            &format!("expected more than {} (256 bytes, EOS and {specials} other special tokens)", 257 + specials),
        )?;
        require(self.max_documents > 0, "tokenizer.max_documents", "expected at least 1")
    }

    /// A byte-level BPE trained on the first training documents (at most one pass over
    /// the mixture), with the `named` and `additional` special tokens besides EOS.
    ///
    /// A stop asked for meanwhile (Ctrl-C, SIGTERM) is honoured within 50 ms: the
    /// reading and the training (one library call that cannot be interrupted) run on a
    /// thread of their own that the run does not wait for once it stops.
    pub fn train(
        &self,
        corpus: &Corpus,
        named: &[(&str, &str)],
        additional: &[String],
        ctx: &RunContext,
    ) -> Result<Tokenizer> {
        let (sources, seed, fraction) = (corpus.sources.clone(), corpus.seed, corpus.fraction);
        let (vocab_size, min_frequency, max_documents) = (self.vocab_size, self.min_frequency, self.max_documents);
        let named: Vec<(String, String)> = named.iter().map(|(k, t)| (k.to_string(), t.to_string())).collect();
        let additional = additional.to_vec();
        tracing::info!("training a tokenizer of {vocab_size} tokens on up to {max_documents} documents");
        ctx.unless_stopped("tokenizer training", move || {
            let mut mixture = Mixture::open(&sources, seed, fraction, None)?;
            let mut sample = Vec::new();
            let passes = sources.len() as u64;
            while sample.len() < max_documents && mixture.epochs().iter().sum::<u64>() < passes {
                sample.push(mixture.next_document()?);
            }
            let named: Vec<(&str, &str)> = named.iter().map(|(k, t)| (k.as_str(), t.as_str())).collect();
            Tokenizer::train_bpe_with(sample.iter().map(String::as_str), vocab_size, min_frequency, &named, &additional)
        })
    }
}

/// The files a stage trains on and its held-out documents.
pub struct Corpus {
    pub sources: Vec<SourceConfig>,
    pub validation: Vec<String>,
    seed: u64,
    fraction: f64,
}

impl Corpus {
    /// The sources of `c` (a curated copy of `train` in the stage directory, when asked)
    /// and their held-out documents. The passes over the corpus this takes stop within
    /// 50 ms of a stop asked for (see [`RunContext::unless_stopped`]).
    pub fn open(c: &DataConfig, ctx: &RunContext) -> Result<Self> {
        let sources = match (&c.train, &c.curation) {
            (Some(train), Some(curation)) => {
                let (file, curation) = (train.clone(), curation.clone());
                let (kept, report) = ctx.unless_stopped("corpus curation", move || {
                    curate(data::read_documents(&file)?, &curation, &count_words)
                })?;
                tracing::info!("curation of {}:\n{report}", train.display());
                ctx.text("data/curation", 0, &report.to_markdown());
                for (tag, value) in report.scalars() {
                    ctx.scalar(&tag, 0, value);
                }
                let curated = ctx.stage_dir().join("curated.txt");
                write_file_atomically(&curated, (kept.join("\n\n") + "\n").as_bytes())?;
                vec![SourceConfig::text(curated)]
            }
            (Some(train), None) => vec![SourceConfig::text(train)],
            (None, _) => c.sources.clone(),
        };
        let (seed, fraction, max) = (ctx.seed(), c.validation_fraction, c.max_validation_documents);
        let held_out = sources.clone();
        let validation = ctx.unless_stopped("reading the held-out documents", move || {
            validation_documents(&held_out, seed, fraction, max)
        })?;
        Ok(Self { sources, validation, seed, fraction })
    }

    /// The held-out documents packed into rows of `row_len` tokens with EOS between them,
    /// and their unigram entropy (nats/token): the loss of a model that ignores context.
    pub fn validation_rows(&self, tokenizer: &Tokenizer, row_len: usize) -> Result<(Vec<Vec<i64>>, f64)> {
        let eos = eos_of(tokenizer)?;
        let tokens = tokenizer.encode_batch(&self.validation.iter().map(String::as_str).collect::<Vec<_>>())?;
        let with_eos: Vec<Vec<i64>> = tokens.iter().map(|d| [d.as_slice(), &[eos]].concat()).collect();
        let entropy = data::unigram_entropy(&with_eos, tokenizer.vocab_size());
        let packed: Tensor = data::pack(&tokens, eos, row_len - 1)?;
        let rows = Vec::<Vec<i64>>::try_from(&packed).map_err(|e| Error::Other(e.to_string()))?;
        tracing::info!(
            "data: {} source(s); {} validation documents in {} rows of {row_len} tokens; vocabulary {}; unigram entropy {entropy:.4} nats",
            self.sources.len(),
            self.validation.len(),
            rows.len(),
            tokenizer.vocab_size()
        );
        Ok((rows, entropy))
    }

    /// The training stream in rows of `row_len` tokens, from the start or a checkpoint's position.
    pub fn stream(&self, row_len: usize, eos: i64, buffer: usize, at: Option<StreamState>) -> Result<TokenStream> {
        match at {
            Some(state) => {
                TokenStream::resume(&self.sources, self.seed, self.fraction, row_len - 1, eos, buffer, state)
            }
            None => {
                let mixture = Mixture::open(&self.sources, self.seed, self.fraction, None)?;
                Ok(TokenStream::new(mixture, row_len - 1, eos, buffer, self.seed, None))
            }
        }
    }
}

/// The token stream from where a checkpoint left it (`resumed`, the data position the
/// trainer restored), or from the corpus' start.
pub fn stream_from(
    corpus: &Corpus,
    resumed: Option<DataPosition>,
    (row_len, eos, buffer): (usize, i64, usize),
) -> Result<TokenStream> {
    match resumed {
        None => corpus.stream(row_len, eos, buffer, None),
        Some(DataPosition::Stream(position)) => corpus.stream(row_len, eos, buffer, Some(*position)),
        Some(DataPosition::Batches(_)) => Err(Error::Other(
            "the checkpoint holds a batch order, not a stream position: was it made by another stage?".into(),
        )),
    }
}

/// The stream's position, for a checkpoint.
pub fn position(stream: &TokenStream) -> DataPosition {
    DataPosition::Stream(Box::new(stream.state()))
}

/// The tokenizer's EOS, which separates documents.
pub fn eos_of(tokenizer: &Tokenizer) -> Result<i64> {
    tokenizer.eos_id().ok_or_else(|| Error::Other("the tokenizer has no EOS token to separate documents".into()))
}

fn default_max_validation_documents() -> usize {
    2000
}
fn default_shuffle_buffer() -> usize {
    1024
}
fn default_max_tokenizer_documents() -> usize {
    100_000
}
fn default_validation_fraction() -> f64 {
    0.05
}
fn default_seq_len() -> usize {
    128
}
fn default_vocab_size() -> usize {
    2048
}
fn default_min_frequency() -> u64 {
    2
}
