//! Corpora streamed from disk, so a corpus larger than memory trains as well as a small one.
//!
//! A [`Mixture`] reads documents from several files (text, documents separated by blank
//! lines; or JSONL, the text in a named field), choosing the file of each document at
//! random by weight and starting a file over when it ends. A document is held out for
//! validation by a hash of the seed, its file and its ordinal, so the split needs no pass
//! over the data and never changes between runs. A [`TokenStream`] tokenizes documents in
//! parallel chunks, packs them into rows of `seq_len + 1` tokens with EOS between
//! documents, and draws rows from a shuffle buffer. Its whole position ([`StreamState`])
//! is small and serializable, so a run resumes exactly where it stopped.
use rand::Rng;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{seeded_rng, SeededRng};
use crate::error::{Error, IoResultExt, Result};
use crate::tokenizer::Tokenizer;

/// One file of a mixture (`data.sources[i]` in a recipe).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// A text file (documents separated by blank lines) or JSONL (`.jsonl`).
    pub path: PathBuf,
    /// Relative share of documents drawn from this file.
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// JSONL files (`.jsonl`): the field holding the text (default `text`).
    #[serde(default)]
    pub field: Option<String>,
}

fn default_weight() -> f64 {
    1.0
}

impl SourceConfig {
    pub fn text(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), weight: 1.0, field: None }
    }

    fn is_jsonl(&self) -> bool {
        matches!(self.path.extension().and_then(|e| e.to_str()), Some("jsonl" | "ndjson"))
    }

    /// Checks of `sources[index]`, as config errors at `key` (e.g. `data.sources[0]`).
    pub fn validate(&self, key: &str) -> Result<()> {
        if !(self.weight > 0.0 && self.weight.is_finite()) {
            return Err(Error::config(format!("{key}.weight"), "expected a positive number"));
        }
        if self.field.is_some() && !self.is_jsonl() {
            return Err(Error::config(format!("{key}.field"), "only JSONL files (.jsonl) have fields"));
        }
        if !self.path.is_file() {
            return Err(Error::config(format!("{key}.path"), format!("file not found: `{}`", self.path.display())));
        }
        Ok(())
    }
}

/// Reads every document of `source` once, as training will, so that a file training
/// could not read (not UTF-8, a JSONL line that is not JSON or lacks its field, no
/// documents at all) is reported with its line before any stage computes. Returns the
/// number of documents.
pub fn check_documents(source: &SourceConfig) -> Result<u64> {
    each_document(source, |_| {})
}

/// Every document of `source`, in file order, read as training reads them (an evaluator
/// that scores a whole file, say); the same errors as [`check_documents`].
pub fn read_source(source: &SourceConfig) -> Result<Vec<String>> {
    let mut documents = Vec::new();
    each_document(source, |document| documents.push(document))?;
    Ok(documents)
}

/// Hands each document of `source` to `each`; an error when there is none.
fn each_document(source: &SourceConfig, mut each: impl FnMut(String)) -> Result<u64> {
    let mut reader = SourceReader::open(source, SourcePosition::default())?;
    let mut documents = 0;
    while let Some((_, document)) = reader.next_document()? {
        each(document);
        documents += 1;
    }
    if documents == 0 {
        return Err(no_documents(source));
    }
    Ok(documents)
}

/// The error of a source without a single document.
fn no_documents(source: &SourceConfig) -> Error {
    let what = if source.is_jsonl() { "blank lines" } else { "whitespace" };
    Error::file(&source.path, format!("the corpus has no documents: it is empty or only {what}"))
}

/// Where a file's reader is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcePosition {
    /// Byte offset of the next line.
    pub offset: u64,
    /// Lines read in this pass (the next line is `line + 1`).
    pub line: u64,
    /// Completed passes over the file.
    pub epoch: u64,
    /// Documents read in this pass.
    pub ordinal: u64,
    /// Training documents read in this pass (to tell an all-held-out file from a full one).
    pub trained: u64,
}

/// The UTF-8 byte-order mark, skipped at the start of a file.
const BOM: char = '\u{FEFF}';

/// Reads one file document by document from a position.
struct SourceReader {
    config: SourceConfig,
    reader: BufReader<File>,
    position: SourcePosition,
}

impl SourceReader {
    fn open(config: &SourceConfig, position: SourcePosition) -> Result<Self> {
        let path = &config.path;
        let mut file = File::open(path).at(path)?;
        file.seek(SeekFrom::Start(position.offset)).at(path)?;
        Ok(Self { config: config.clone(), reader: BufReader::with_capacity(1 << 20, file), position })
    }

    fn path(&self) -> &Path {
        &self.config.path
    }

    /// The next line without its newline, or None at the end of the file.
    fn next_line(&mut self, line: &mut String) -> Result<bool> {
        line.clear();
        let first = self.position.offset == 0;
        let read = self.reader.read_line(line).map_err(|e| {
            let why =
                if e.kind() == std::io::ErrorKind::InvalidData { "not valid UTF-8 text".into() } else { e.to_string() };
            Error::file(self.path(), format!("line {}: {why}", self.position.line + 1))
        })?;
        if read == 0 {
            return Ok(false);
        }
        self.position.offset += read as u64;
        self.position.line += 1;
        let trimmed = line.trim_end_matches(['\n', '\r']).len();
        line.truncate(trimmed);
        if first && line.starts_with(BOM) {
            line.drain(..BOM.len_utf8()); // a byte-order mark some editors write
        }
        Ok(true)
    }

    /// The next document and its ordinal in this pass, or None at the end of the file.
    fn next_document(&mut self) -> Result<Option<(u64, String)>> {
        let mut line = String::new();
        let document = if self.config.is_jsonl() {
            loop {
                if !self.next_line(&mut line)? {
                    return Ok(None);
                }
                if !line.trim().is_empty() {
                    break self.field_of(&line)?;
                }
            }
        } else {
            let mut document = String::new();
            loop {
                let more = self.next_line(&mut line)?;
                if !more || line.trim().is_empty() {
                    if !document.is_empty() {
                        break document;
                    }
                    if !more {
                        return Ok(None);
                    }
                    continue;
                }
                if !document.is_empty() {
                    document.push('\n');
                }
                document.push_str(&line);
            }
        };
        self.position.ordinal += 1;
        Ok(Some((self.position.ordinal - 1, document)))
    }

    fn field_of(&self, line: &str) -> Result<String> {
        let field = self.config.field.as_deref().unwrap_or("text");
        let at = |why: String| Error::file(self.path(), format!("line {}: {why}", self.position.line));
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| at(format!("not JSON: {e}")))?;
        match value.get(field) {
            Some(serde_json::Value::String(text)) => Ok(text.clone()),
            Some(other) => Err(at(format!("field `{field}`: expected a string, found {other}"))),
            None => Err(at(format!("missing field `{field}`"))),
        }
    }

    /// Back to the start, for the next pass.
    fn restart(&mut self) -> Result<()> {
        if self.position.trained == 0 {
            return Err(Error::file(self.path(), "no training documents (it is empty, or every document is held out)"));
        }
        let epoch = self.position.epoch + 1;
        *self = Self::open(&self.config, SourcePosition { epoch, ..SourcePosition::default() })?;
        Ok(())
    }
}

/// Whether document `ordinal` of source `source` is held out: a hash of the seed, source
/// and ordinal, so the split is fixed without a pass over the data.
pub fn held_out(seed: u64, source: usize, ordinal: u64, fraction: f64) -> bool {
    let mut rng = seeded_rng(seed ^ ((source as u64) << 48) ^ ordinal.wrapping_mul(0xA24B_AED4_963E_E407));
    rng.random::<f64>() < fraction
}

/// Training documents of several files, drawn by weight.
pub struct Mixture {
    readers: Vec<SourceReader>,
    cumulative: Vec<f64>,
    rng: SeededRng,
    seed: u64,
    fraction: f64,
}

impl Mixture {
    /// Opens `sources` at `state` (their starts when None).
    pub fn open(sources: &[SourceConfig], seed: u64, fraction: f64, state: Option<&MixtureState>) -> Result<Self> {
        if sources.is_empty() {
            return Err(Error::config("data.sources", "expected at least one source"));
        }
        let readers = sources
            .iter()
            .enumerate()
            .map(|(i, s)| SourceReader::open(s, state.map(|st| st.sources[i].clone()).unwrap_or_default()))
            .collect::<Result<Vec<_>>>()?;
        let total: f64 = sources.iter().map(|s| s.weight).sum();
        let cumulative = sources
            .iter()
            .scan(0.0, |acc, s| {
                *acc += s.weight / total;
                Some(*acc)
            })
            .collect();
        let rng = state.map(|s| s.rng.clone()).unwrap_or_else(|| seeded_rng(seed ^ 0x6D69_7874_7572_6500));
        Ok(Self { readers, cumulative, rng, seed, fraction })
    }

    /// The next training document.
    pub fn next_document(&mut self) -> Result<String> {
        let draw = self.rng.random::<f64>();
        let source = self.cumulative.iter().position(|&c| draw < c).unwrap_or(self.readers.len() - 1);
        let reader = &mut self.readers[source];
        loop {
            match reader.next_document()? {
                Some((ordinal, document)) if !held_out(self.seed, source, ordinal, self.fraction) => {
                    reader.position.trained += 1;
                    return Ok(document);
                }
                Some(_) => continue,
                None => reader.restart()?,
            }
        }
    }

    pub fn state(&self) -> MixtureState {
        MixtureState { sources: self.readers.iter().map(|r| r.position.clone()).collect(), rng: self.rng.clone() }
    }

    /// Passes completed over each file.
    pub fn epochs(&self) -> Vec<u64> {
        self.readers.iter().map(|r| r.position.epoch).collect()
    }
}

/// Where a [`Mixture`] is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MixtureState {
    pub sources: Vec<SourcePosition>,
    pub rng: SeededRng,
}

/// The held-out documents of `sources`, in file order, at most `max` from each. A file
/// with no documents, or only one (nothing to split), is an error that says so.
pub fn validation_documents(sources: &[SourceConfig], seed: u64, fraction: f64, max: usize) -> Result<Vec<String>> {
    let mut documents = Vec::new();
    for (i, source) in sources.iter().enumerate() {
        let mut reader = SourceReader::open(source, SourcePosition::default())?;
        let start = documents.len();
        let mut seen = 0;
        while documents.len() - start < max || seen < 2 {
            match reader.next_document()? {
                Some((ordinal, document)) => {
                    seen += 1;
                    if held_out(seed, i, ordinal, fraction) && documents.len() - start < max {
                        documents.push(document);
                    }
                }
                None => break,
            }
        }
        let separated = if source.is_jsonl() { "one a line" } else { "separated by blank lines" };
        if seen == 0 {
            return Err(no_documents(source));
        }
        if seen == 1 {
            return Err(Error::file(
                &source.path,
                format!(
                    "the corpus holds a single document (documents are {separated}); training and validation need at least two"
                ),
            ));
        }
        if documents.len() == start {
            return Err(Error::file(
                &source.path,
                format!(
                    "none of its {seen} documents is held out for validation (validation_fraction {fraction}); raise the fraction or add documents"
                ),
            ));
        }
    }
    Ok(documents)
}

/// Tokens packed into rows, drawn from a shuffle buffer.
pub struct TokenStream {
    mixture: Mixture,
    seq_len: usize,
    eos: i64,
    /// Tokens of the row being filled.
    pending: Vec<i64>,
    buffer: Vec<Vec<i64>>,
    buffer_rows: usize,
    rng: SeededRng,
}

/// Documents tokenized together (in parallel) when the buffer runs low: at most this
/// many, and no more once they hold [`CHUNK_BYTES`] of text (so a corpus of a few long
/// documents does not read hundreds of copies of them at once).
const CHUNK_DOCUMENTS: usize = 256;
const CHUNK_BYTES: usize = 16 << 20;

impl TokenStream {
    /// Rows of `seq_len + 1` tokens (inputs and shifted targets share a row) from
    /// `mixture`, each drawn at random from `buffer_rows` ready rows; at `state` when resuming.
    pub fn new(
        mixture: Mixture,
        seq_len: usize,
        eos: i64,
        buffer_rows: usize,
        seed: u64,
        state: Option<StreamState>,
    ) -> Self {
        let (pending, buffer, rng) = match state {
            Some(s) => (s.pending, s.buffer, s.rng),
            None => (Vec::new(), Vec::new(), seeded_rng(seed ^ 0x7368_7566_666C_6500)),
        };
        Self { mixture, seq_len, eos, pending, buffer, buffer_rows: buffer_rows.max(1), rng }
    }

    /// The next `rows` rows, each of `seq_len + 1` tokens.
    pub fn next_rows(&mut self, tokenizer: &Tokenizer, rows: usize) -> Result<Vec<Vec<i64>>> {
        let mut out = Vec::with_capacity(rows);
        for _ in 0..rows {
            while self.buffer.len() < self.buffer_rows {
                self.fill(tokenizer)?;
            }
            let pick = self.rng.random_range(0..self.buffer.len() as u64) as usize;
            out.push(self.buffer.swap_remove(pick));
        }
        Ok(out)
    }

    /// Tokenizes a chunk of documents into rows.
    fn fill(&mut self, tokenizer: &Tokenizer) -> Result<()> {
        let (mut documents, mut bytes) = (Vec::new(), 0);
        while documents.len() < CHUNK_DOCUMENTS && bytes < CHUNK_BYTES {
            let document = self.mixture.next_document()?;
            bytes += document.len();
            documents.push(document);
        }
        let tokens = tokenizer.encode_batch(&documents.iter().map(String::as_str).collect::<Vec<_>>())?;
        let row = self.seq_len + 1;
        for document in tokens {
            self.pending.extend(document);
            self.pending.push(self.eos);
            // Cut every whole row, then drop them from the front in one move: draining a
            // row at a time would shift the rest each time, quadratic in a long document.
            let mut cut = 0;
            while self.pending.len() - cut >= row {
                self.buffer.push(self.pending[cut..cut + row].to_vec());
                cut += row;
            }
            self.pending.drain(..cut);
        }
        Ok(())
    }

    pub fn state(&self) -> StreamState {
        StreamState {
            mixture: self.mixture.state(),
            pending: self.pending.clone(),
            buffer: self.buffer.clone(),
            rng: self.rng.clone(),
        }
    }

    pub fn epochs(&self) -> Vec<u64> {
        self.mixture.epochs()
    }
}

/// Everything a [`TokenStream`] needs to continue exactly: where each file is, the
/// mixture's and the shuffle's generators, and the rows and tokens already cut.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamState {
    pub mixture: MixtureState,
    pub pending: Vec<i64>,
    pub buffer: Vec<Vec<i64>>,
    pub rng: SeededRng,
}

impl TokenStream {
    /// Reopens a stream at `state` (from a checkpoint).
    pub fn resume(
        sources: &[SourceConfig],
        seed: u64,
        fraction: f64,
        seq_len: usize,
        eos: i64,
        buffer_rows: usize,
        state: StreamState,
    ) -> Result<Self> {
        let mixture = Mixture::open(sources, seed, fraction, Some(&state.mixture))?;
        Ok(Self::new(mixture, seq_len, eos, buffer_rows, seed, Some(state)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> SourceConfig {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        SourceConfig::text(path)
    }

    #[test]
    fn text_and_jsonl_files_read_document_by_document() {
        let dir = tempfile::tempdir().unwrap();
        let text = write(dir.path(), "a.txt", "a b\nc\n\n\n d \n\ne");
        let mut reader = SourceReader::open(&text, SourcePosition::default()).unwrap();
        let mut docs = Vec::new();
        while let Some((_, d)) = reader.next_document().unwrap() {
            docs.push(d);
        }
        assert_eq!(docs, ["a b\nc", " d ", "e"]);
        let mut jsonl = write(dir.path(), "b.jsonl", "{\"body\": \"x\"}\n\n{\"body\": \"y\\nz\"}\n{\"other\": 1}\n");
        jsonl.field = Some("body".into());
        let mut reader = SourceReader::open(&jsonl, SourcePosition::default()).unwrap();
        assert_eq!(reader.next_document().unwrap(), Some((0, "x".into())));
        assert_eq!(reader.next_document().unwrap(), Some((1, "y\nz".into())));
        let err = reader.next_document().unwrap_err().to_string();
        assert!(err.ends_with("b.jsonl: line 4: missing field `body`"), "{err}");
        let bad = write(dir.path(), "c.txt", "ok\n\n\u{0}\n");
        std::fs::write(&bad.path, b"ok\nok\n\xff\n").unwrap();
        let mut reader = SourceReader::open(&bad, SourcePosition::default()).unwrap();
        let err = reader.next_document().unwrap_err().to_string();
        assert!(err.ends_with("c.txt: line 3: not valid UTF-8 text"), "{err}");
    }

    #[test]
    fn the_mixture_follows_the_weights_and_skips_held_out_documents() {
        let dir = tempfile::tempdir().unwrap();
        let a: String = (0..200).map(|i| format!("a{i}\n\n")).collect();
        let b: String = (0..200).map(|i| format!("b{i}\n\n")).collect();
        let mut sources = vec![write(dir.path(), "a.txt", &a), write(dir.path(), "b.txt", &b)];
        sources[0].weight = 3.0;
        let validation: Vec<String> = validation_documents(&sources, 5, 0.1, 1000).unwrap();
        let mut mixture = Mixture::open(&sources, 5, 0.1, None).unwrap();
        let drawn: Vec<String> = (0..4000).map(|_| mixture.next_document().unwrap()).collect();
        let from_a = drawn.iter().filter(|d| d.starts_with('a')).count() as f64 / drawn.len() as f64;
        assert!((from_a - 0.75).abs() < 0.03, "share from a: {from_a}");
        assert!(drawn.iter().all(|d| !validation.contains(d)), "a held-out document was trained on");
        assert!((20..=60).contains(&validation.len()), "{} held out of 400", validation.len());
        assert!(mixture.epochs().iter().all(|&e| e >= 1), "both files started over");
    }

    #[test]
    fn a_resumed_stream_continues_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let corpus: String = (0..300).map(|i| format!("doc {i} has some words in it\n\n")).collect();
        let sources = vec![write(dir.path(), "c.txt", &corpus)];
        let tokenizer = Tokenizer::train_bpe(["doc has some words in it 0123456789"].into_iter(), 300, 1).unwrap();
        let open = || TokenStream::new(Mixture::open(&sources, 1, 0.05, None).unwrap(), 8, 0, 16, 1, None);
        let mut whole = open();
        let expected: Vec<Vec<i64>> = (0..50).map(|_| whole.next_rows(&tokenizer, 3).unwrap().concat()).collect();
        let mut first = open();
        for _ in 0..20 {
            let _ = first.next_rows(&tokenizer, 3).unwrap();
        }
        let state: StreamState = serde_json::from_str(&serde_json::to_string(&first.state()).unwrap()).unwrap();
        let mut resumed = TokenStream::resume(&sources, 1, 0.05, 8, 0, 16, state).unwrap();
        for (i, rows) in expected.iter().enumerate().skip(20) {
            let got: Vec<i64> = resumed.next_rows(&tokenizer, 3).unwrap().concat();
            assert_eq!(&got, rows, "batch {i}");
        }
    }
}
