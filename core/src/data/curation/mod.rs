//! Data curation: quality heuristics, exact deduplication and MinHash near-deduplication
//! of a text corpus, with a report of what each filter removed.
//!
//! Filters run in this order, and a document is removed by the first one that rejects it:
//!
//! 1. **Quality** ([`QualityConfig`]): per-document heuristics in the style of Gopher
//!    (Rae et al. 2021, appendix A, <https://arxiv.org/abs/2112.11446>), C4 and RefinedWeb.
//!    The rules run in a fixed order (see [`QualityRule`]); the first one violated is the reason.
//! 2. **Exact dedup**: documents equal after [`normalize`] (lowercase, whitespace collapsed);
//!    the first occurrence *among quality survivors* is kept. Only a 128-bit prefix of each
//!    document's SHA-256 is held, not its text.
//! 3. **Near dedup** ([`MinHashConfig`]): MinHash signatures (Broder 1997) of n-gram shingles,
//!    LSH banding (Leskovec et al., *Mining of Massive Datasets*, ch. 3) to find candidate
//!    pairs, and each candidate checked by its estimated Jaccard similarity. "First seen wins":
//!    a document is compared with the documents kept so far only, and removed if one of them is
//!    similar enough; only kept documents are indexed. As in Lee et al. 2022
//!    (<https://arxiv.org/abs/2107.06499>) and datasketch's `MinHashLSH`.
//!
//! Cheap filters come first, so the costly MinHash work is spent on survivors only; and every
//! decision depends on the documents before it alone, so a corpus can be streamed ([`Curator`]).
//! Results are deterministic given [`CurationConfig::seed`], whatever the number of threads.
//!
//! ```no_run
//! use plumb_core::data::curation::{count_words, curate, CurationConfig};
//! # fn main() -> plumb_core::error::Result<()> {
//! let docs = vec!["some text".to_owned(), "Some   TEXT".to_owned()];
//! let (kept, report) = curate(docs, &CurationConfig::default(), &count_words)?;
//! println!("{report}");
//! # Ok(()) }
//! ```
use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

mod exact;
mod hash;
mod minhash;
mod quality;
mod report;

pub use exact::{exact_key, normalize};
pub use minhash::{MinHashConfig, MinHasher, ShingleUnit};
pub use quality::{QualityConfig, QualityRule, STOP_WORDS};
pub use report::{Counts, CurationReport, FilterStats};

use hash::BuildPreHashed;
use minhash::LshIndex;
use quality::QualityFilter;

/// What to curate, and how. Every field has a default, so `{}` is a full config: quality
/// rules on (Gopher's thresholds), exact dedup on, near dedup on (5-word shingles, 128
/// permutations, 16 bands × 8 rows, Jaccard ≥ 0.8), seed 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct CurationConfig {
    /// Remove documents equal to an earlier one after [`normalize`]. Default true.
    pub exact_dedup: bool,
    /// MinHash + LSH near-duplicate removal; `null` turns it off.
    pub near_dedup: Option<MinHashConfig>,
    /// Quality heuristics; `null` turns them all off (`null` on one rule turns off that rule).
    pub quality: Option<QualityConfig>,
    /// Seeds the MinHash permutations. Default 0.
    pub seed: u64,
}

impl Default for CurationConfig {
    fn default() -> Self {
        Self {
            exact_dedup: true,
            near_dedup: Some(MinHashConfig::default()),
            quality: Some(QualityConfig::default()),
            seed: 0,
        }
    }
}

impl CurationConfig {
    /// Checks every option; the error names the key (`near_dedup.bands`, `quality.max_words`).
    pub fn validate(&self) -> Result<()> {
        if let Some(near) = &self.near_dedup {
            near.validate("near_dedup")?;
        }
        if let Some(quality) = &self.quality {
            quality.validate("quality")?;
        }
        Ok(())
    }
}

/// Counts whitespace-separated words: the default "token" count of the report.
pub fn count_words(text: &str) -> usize {
    text.split_whitespace().count()
}

/// Why a document was removed.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "filter", rename_all = "snake_case")]
pub enum Reason {
    /// A quality rule: the document's measured `value` is on the wrong side of `limit`.
    Quality { rule: QualityRule, value: f64, limit: f64 },
    /// Equal after [`normalize`] to document `of` (an index into the input).
    ExactDuplicate { of: usize },
    /// Near duplicate of the kept document `of`, with this estimated Jaccard similarity.
    NearDuplicate { of: usize, similarity: f64 },
}

impl Reason {
    /// The report row (filter name) this reason counts under: `quality.min_words`,
    /// `exact_dedup`, `near_dedup`.
    pub fn filter(&self) -> String {
        match self {
            Reason::Quality { rule, .. } => rule.key(),
            Reason::ExactDuplicate { .. } => EXACT_DEDUP.to_owned(),
            Reason::NearDuplicate { .. } => NEAR_DEDUP.to_owned(),
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Quality { rule, value, limit } => {
                let side = if rule.is_minimum() { "below the minimum" } else { "above the maximum" };
                write!(f, "{}: {} {side} {}", rule.key(), fmt_value(*value), fmt_value(*limit))
            }
            Reason::ExactDuplicate { of } => write!(f, "{EXACT_DEDUP}: same text as document {of}"),
            Reason::NearDuplicate { of, similarity } => {
                write!(f, "{NEAR_DEDUP}: near duplicate of document {of} (estimated Jaccard {similarity:.3})")
            }
        }
    }
}

fn fmt_value(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{x:.0}")
    } else {
        format!("{x:.4}")
    }
}

/// A removed document: its index in the input and why it went.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rejection {
    pub index: usize,
    pub reason: Reason,
}

const EXACT_DEDUP: &str = "exact_dedup";
const NEAR_DEDUP: &str = "near_dedup";

/// Documents analysed at a time by [`curate`]: bounds the memory beyond the output.
const BATCH: usize = 4096;

/// Curates `docs` and returns the kept documents, in input order, with a report.
///
/// `count_tokens` counts a document's tokens for the report (pass [`count_words`] to count
/// whitespace-separated words); it is called once per input document. The report's
/// [`rejections`](CurationReport::rejections) lists every removed document and its reason.
pub fn curate(
    docs: impl IntoIterator<Item = String>,
    config: &CurationConfig,
    count_tokens: &dyn Fn(&str) -> usize,
) -> Result<(Vec<String>, CurationReport)> {
    let mut curator = Curator::new(config)?;
    let mut kept = Vec::new();
    let mut rejections = Vec::new();
    let mut docs = docs.into_iter();
    loop {
        let batch: Vec<String> = docs.by_ref().take(BATCH).collect();
        if batch.is_empty() {
            break;
        }
        let tokens: Vec<usize> = batch.iter().map(|d| count_tokens(d)).collect();
        let first = curator.documents_seen();
        let verdicts = curator.check_batch(&batch, &tokens)?;
        for (i, (doc, verdict)) in batch.into_iter().zip(verdicts).enumerate() {
            match verdict {
                None => kept.push(doc),
                Some(reason) => rejections.push(Rejection { index: first + i, reason }),
            }
        }
    }
    let mut report = curator.finish();
    report.rejections = rejections;
    Ok((kept, report))
}

/// The curation state, for streaming: feed documents in order with [`check`](Self::check) or
/// [`check_batch`](Self::check_batch), then take the report with [`finish`](Self::finish).
/// Memory grows with the kept documents only (a hash each, and a MinHash signature of
/// `4 × num_perm` bytes each), not with their text.
#[derive(Debug)]
pub struct Curator {
    quality: Option<QualityFilter>,
    /// Normalised-text key → index of the first document with it.
    exact: Option<HashMap<u128, usize, BuildPreHashed>>,
    near: Option<(MinHasher, LshIndex)>,
    /// Report rows: the enabled quality rules in order, then exact dedup, then near dedup.
    filters: Vec<FilterStats>,
    input: Counts,
    seen: usize,
}

/// What can be worked out about a document without the documents before it (so in parallel).
struct Analysis {
    /// The first violated quality rule: its report row and the reason.
    quality: Option<(usize, Reason)>,
    exact_key: Option<u128>,
    signature: Option<Vec<u32>>,
}

impl Curator {
    /// Validates `config` and starts empty.
    pub fn new(config: &CurationConfig) -> Result<Self> {
        config.validate()?;
        let quality = config.quality.as_ref().map(QualityFilter::new);
        let mut filters: Vec<FilterStats> = quality
            .as_ref()
            .map(|q| q.rules().iter().map(|(rule, _)| FilterStats::new(rule.key())).collect())
            .unwrap_or_default();
        let exact = config.exact_dedup.then(HashMap::default);
        if exact.is_some() {
            filters.push(FilterStats::new(EXACT_DEDUP.to_owned()));
        }
        let near = config.near_dedup.as_ref().map(|c| (MinHasher::new(c, config.seed), LshIndex::new(c)));
        if near.is_some() {
            filters.push(FilterStats::new(NEAR_DEDUP.to_owned()));
        }
        Ok(Self { quality, exact, near, filters, input: Counts::default(), seen: 0 })
    }

    /// How many documents have been checked so far; the next one gets this index.
    pub fn documents_seen(&self) -> usize {
        self.seen
    }

    /// Checks the next document (with `tokens` tokens, for the report): `None` keeps it,
    /// `Some(reason)` removes it.
    pub fn check(&mut self, text: &str, tokens: usize) -> Option<Reason> {
        let analysis = self.analyze(text);
        self.decide(analysis, tokens)
    }

    /// [`check`](Self::check) on each of `texts` in order (`tokens[i]` is the count of
    /// `texts[i]`), analysing them on all available cores; the verdicts are the same as one
    /// by one.
    pub fn check_batch(&mut self, texts: &[String], tokens: &[usize]) -> Result<Vec<Option<Reason>>> {
        if texts.len() != tokens.len() {
            return Err(Error::Other(format!("curation: {} documents but {} token counts", texts.len(), tokens.len())));
        }
        let analyses = self.analyze_parallel(texts)?;
        Ok(analyses.into_iter().zip(tokens).map(|(a, &t)| self.decide(a, t)).collect())
    }

    /// The report so far. Its `rejections` are empty: the caller has each one from `check`.
    pub fn finish(self) -> CurationReport {
        CurationReport::new(self.input, self.filters)
    }

    fn analyze(&self, text: &str) -> Analysis {
        let quality = self.quality.as_ref().and_then(|q| q.check(text));
        if quality.is_some() {
            return Analysis { quality, exact_key: None, signature: None };
        }
        let exact_key = self.exact.as_ref().map(|_| exact_key(text));
        let signature = self.near.as_ref().and_then(|(hasher, _)| hasher.signature(text));
        Analysis { quality, exact_key, signature }
    }

    /// `analyze` on every text, split over the available cores; the results are in order.
    fn analyze_parallel(&self, texts: &[String]) -> Result<Vec<Analysis>> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Below a few dozen documents a thread costs more than it saves.
        let threads = cores.min(texts.len().div_ceil(32));
        if threads <= 1 {
            return Ok(texts.iter().map(|t| self.analyze(t)).collect());
        }
        let chunk = texts.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let workers: Vec<_> = texts
                .chunks(chunk)
                .map(|part| scope.spawn(move || part.iter().map(|t| self.analyze(t)).collect::<Vec<_>>()))
                .collect();
            let mut analyses = Vec::with_capacity(texts.len());
            for worker in workers {
                let part = worker.join().map_err(|_| Error::Other("curation: a worker thread panicked".into()))?;
                analyses.extend(part);
            }
            Ok(analyses)
        })
    }

    /// The order-dependent part: dedup against the documents kept so far, and the counts.
    fn decide(&mut self, analysis: Analysis, tokens: usize) -> Option<Reason> {
        let index = self.seen;
        self.seen += 1;
        self.input.add(tokens);
        // Report rows come in filter order: quality rules, exact dedup, near dedup.
        let mut next_row = 0;
        let (row, reason) = 'verdict: {
            if let Some(quality) = &self.quality {
                if let Some((rule_row, reason)) = analysis.quality {
                    break 'verdict (rule_row, reason);
                }
                next_row += quality.rules().len();
            }
            if let Some(first_index) = &mut self.exact {
                if let Some(key) = analysis.exact_key {
                    if let Some(&of) = first_index.get(&key) {
                        break 'verdict (next_row, Reason::ExactDuplicate { of });
                    }
                    first_index.insert(key, index);
                }
                next_row += 1;
            }
            if let Some((_, lsh)) = &mut self.near {
                if let Some(signature) = analysis.signature {
                    if let Some((of, similarity)) = lsh.find(&signature) {
                        break 'verdict (next_row, Reason::NearDuplicate { of, similarity });
                    }
                    lsh.insert(signature, index);
                }
            }
            return None;
        };
        self.filters[row].removed.add(tokens);
        Some(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn words(n: usize, seed: u64) -> String {
        let mut rng = crate::data::seeded_rng(seed);
        (0..n).map(|_| format!("w{}", rng.random_range(0..50_000))).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn defaults_are_valid_and_parse_from_empty() {
        CurationConfig::default().validate().unwrap();
        let parsed: CurationConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(parsed, CurationConfig::default());
        let off: CurationConfig =
            serde_json::from_str(r#"{"near_dedup": null, "quality": null, "exact_dedup": false}"#).unwrap();
        assert!(off.near_dedup.is_none() && off.quality.is_none() && !off.exact_dedup);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = serde_json::from_str::<CurationConfig>(r#"{"near_dedupe": null}"#).unwrap_err();
        assert!(e.to_string().contains("near_dedupe"), "{e}");
        let e = serde_json::from_str::<CurationConfig>(r#"{"quality": {"min_word": 3}}"#).unwrap_err();
        assert!(e.to_string().contains("min_word"), "{e}");
    }

    #[test]
    fn batch_and_one_by_one_agree() {
        let config = CurationConfig { quality: None, ..CurationConfig::default() };
        let mut docs: Vec<String> = (0..300).map(|i| words(60, i)).collect();
        for i in 0..50 {
            let copy = docs[i * 3].to_uppercase();
            docs.push(copy);
        }
        let tokens: Vec<usize> = docs.iter().map(|d| count_words(d)).collect();
        let mut batch = Curator::new(&config).unwrap();
        let a = batch.check_batch(&docs, &tokens).unwrap();
        let mut single = Curator::new(&config).unwrap();
        let b: Vec<_> = docs.iter().zip(&tokens).map(|(d, &t)| single.check(d, t)).collect();
        assert_eq!(a, b);
        assert_eq!(a.iter().filter(|r| r.is_some()).count(), 50);
        assert_eq!(batch.finish(), single.finish());
    }

    #[test]
    fn mismatched_token_counts_are_an_error() {
        let mut curator = Curator::new(&CurationConfig::default()).unwrap();
        assert!(curator.check_batch(&["a".to_owned()], &[]).is_err());
    }

    #[test]
    fn reasons_read_well() {
        let r = Reason::Quality { rule: QualityRule::MinWords, value: 12.0, limit: 50.0 };
        assert_eq!(r.to_string(), "quality.min_words: 12 below the minimum 50");
        let r = Reason::NearDuplicate { of: 3, similarity: 0.9 };
        assert_eq!(r.to_string(), "near_dedup: near duplicate of document 3 (estimated Jaccard 0.900)");
        let json = serde_json::to_value(Reason::ExactDuplicate { of: 2 }).unwrap();
        assert_eq!(json, serde_json::json!({"filter": "exact_duplicate", "of": 2}));
    }
}
