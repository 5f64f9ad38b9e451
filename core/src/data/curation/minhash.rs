//! MinHash signatures of n-gram shingles (Broder 1997) and an LSH index over their bands
//! (Leskovec, Rajaraman & Ullman, *Mining of Massive Datasets*, §3.4).
//!
//! A document is a set of shingles, each a 64-bit hash. Permutation `i` is the universal hash
//! `h_i(x) = (a_i·x + b_i) mod p` with `p = 2⁶¹ − 1` and `a_i, b_i` drawn from the seed; the
//! signature is, per permutation, the minimum over the shingles. Two documents agree at one
//! position with probability equal to their Jaccard similarity `J`, so the fraction of
//! agreeing positions estimates `J` (standard error `√(J(1−J)/num_perm)`: ±0.035 at J = 0.8
//! with 128 permutations).
//!
//! LSH cuts the signature into `bands` bands of `rows` values; documents that agree on a whole
//! band become candidates, with probability `1 − (1 − J^rows)^bands` (see
//! [`MinHashConfig::candidate_probability`]), and a candidate counts as a duplicate when its
//! estimated `J` reaches `threshold`.
use rand::Rng;
use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::exact::normalize;
use super::hash::{combine, BuildPreHashed, Fnv};
use crate::data::seeded_rng;
use crate::error::{Error, Result};

/// What a shingle is made of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ShingleUnit {
    /// Words: maximal runs of alphanumeric characters, lowercased (punctuation and spacing
    /// do not matter).
    #[default]
    Word,
    /// Characters of the text after [`normalize`](super::normalize).
    Char,
}

/// `near_dedup:` — MinHash + LSH settings. Defaults: 5-word shingles, 128 permutations,
/// 16 bands × 8 rows, threshold 0.8: a pair at J = 0.8 becomes a candidate with probability
/// 0.95, at J = 0.9 with 0.9999, at J = 0.5 with 0.06.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct MinHashConfig {
    /// Shingle unit; default `word`.
    pub shingle: ShingleUnit,
    /// Shingle length in units; default 5. A document shorter than this is one shingle.
    pub ngram: usize,
    /// Number of hash functions (signature length); default 128.
    pub num_perm: usize,
    /// LSH bands; `bands × rows` must equal `num_perm`. Default 16.
    pub bands: usize,
    /// Signature values per band. Default 8.
    pub rows: usize,
    /// Estimated Jaccard similarity at or above which a candidate is a duplicate; default 0.8.
    pub threshold: f64,
}

impl Default for MinHashConfig {
    fn default() -> Self {
        Self { shingle: ShingleUnit::Word, ngram: 5, num_perm: 128, bands: 16, rows: 8, threshold: 0.8 }
    }
}

impl MinHashConfig {
    /// Checks the options; `prefix` is this section's key (`near_dedup`).
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let at_least_one = |key: &str, value: usize| {
            if value == 0 {
                Err(Error::config(format!("{prefix}.{key}"), "must be at least 1, found 0"))
            } else {
                Ok(())
            }
        };
        at_least_one("ngram", self.ngram)?;
        at_least_one("num_perm", self.num_perm)?;
        at_least_one("bands", self.bands)?;
        at_least_one("rows", self.rows)?;
        if self.bands.checked_mul(self.rows) != Some(self.num_perm) {
            return Err(Error::config(
                format!("{prefix}.bands"),
                format!("bands × rows must equal num_perm ({}), found {} × {}", self.num_perm, self.bands, self.rows),
            ));
        }
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return Err(Error::config(
                format!("{prefix}.threshold"),
                format!("must be in (0, 1], found {}", self.threshold),
            ));
        }
        Ok(())
    }

    /// The probability that two documents with Jaccard similarity `jaccard` share at least
    /// one band, i.e. get compared at all: `1 − (1 − J^rows)^bands`.
    pub fn candidate_probability(&self, jaccard: f64) -> f64 {
        1.0 - (1.0 - jaccard.powi(self.rows as i32)).powi(self.bands as i32)
    }
}

/// The Mersenne prime 2⁶¹ − 1: reduction modulo it is two shifts and adds.
const P: u64 = (1 << 61) - 1;

/// `x mod p` for any 64-bit x.
fn reduce(x: u64) -> u64 {
    let s = (x & P) + (x >> 61);
    if s >= P {
        s - P
    } else {
        s
    }
}

/// `(a·x + b) mod p` for a, x, b < p.
fn mul_add_mod(a: u64, x: u64, b: u64) -> u64 {
    let v = u128::from(a) * u128::from(x) + u128::from(b); // < 2¹²² + 2⁶¹
    let s = (v as u64 & P) + (v >> 61) as u64; // < 2⁶² + 1
    reduce(s)
}

/// Computes shingles and signatures; one per corpus, shared by the threads that use it.
#[derive(Debug, Clone)]
pub struct MinHasher {
    unit: ShingleUnit,
    ngram: usize,
    /// The permutations' coefficients: `a` in `[1, p)`, `b` in `[0, p)`.
    a: Vec<u64>,
    b: Vec<u64>,
}

impl MinHasher {
    /// The permutations depend on `seed` and `config.num_perm` only.
    pub fn new(config: &MinHashConfig, seed: u64) -> Self {
        let mut rng = seeded_rng(seed);
        let (a, b) = (0..config.num_perm).map(|_| (1 + rng.random_range(0..P - 1), rng.random_range(0..P))).unzip();
        Self { unit: config.shingle, ngram: config.ngram.max(1), a, b }
    }

    pub fn num_perm(&self) -> usize {
        self.a.len()
    }

    /// The document's shingle set: 64-bit hashes, sorted, without repeats. Empty when the
    /// text has no words (for word shingles) or no characters.
    pub fn shingles(&self, text: &str) -> Vec<u64> {
        let units = match self.unit {
            ShingleUnit::Word => word_hashes(text),
            ShingleUnit::Char => normalize(text)
                .chars()
                .map(|c| {
                    let mut h = Fnv::new();
                    h.char(c);
                    h.finish()
                })
                .collect(),
        };
        let mut shingles: Vec<u64> = if units.is_empty() {
            Vec::new()
        } else if units.len() < self.ngram {
            vec![combine(&units)]
        } else {
            units.windows(self.ngram).map(combine).collect()
        };
        shingles.sort_unstable();
        shingles.dedup();
        shingles
    }

    /// The MinHash signature (`num_perm` values), or `None` for a text without shingles.
    ///
    /// Each value is the low 32 bits of the permutation's minimum: two different minima
    /// agree on them with probability 2⁻³², too small to bias the estimate, and the index
    /// holds half the bytes.
    pub fn signature(&self, text: &str) -> Option<Vec<u32>> {
        let shingles = self.shingles(text);
        if shingles.is_empty() {
            return None;
        }
        let xs: Vec<u64> = shingles.into_iter().map(reduce).collect();
        // Permutation-major: a and b stay in registers over the inner loop.
        let signature = self.a.iter().zip(&self.b).map(|(&a, &b)| {
            let min = xs.iter().fold(u64::MAX, |min, &x| min.min(mul_add_mod(a, x, b)));
            min as u32
        });
        Some(signature.collect())
    }

    /// The estimated Jaccard similarity of two signatures: the fraction of positions that agree.
    pub fn jaccard(a: &[u32], b: &[u32]) -> f64 {
        if a.is_empty() || a.len() != b.len() {
            return 0.0;
        }
        let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
        same as f64 / a.len() as f64
    }
}

/// Hashes of the words (maximal alphanumeric runs), lowercased, in order.
fn word_hashes(text: &str) -> Vec<u64> {
    let mut hashes = Vec::new();
    let mut word: Option<Fnv> = None;
    for c in text.chars() {
        if c.is_alphanumeric() {
            word.get_or_insert_with(Fnv::new).char_lowercase(c);
        } else if let Some(done) = word.take() {
            hashes.push(done.finish());
        }
    }
    if let Some(done) = word {
        hashes.push(done.finish());
    }
    hashes
}

/// The LSH index over the documents kept so far.
#[derive(Debug)]
pub(super) struct LshIndex {
    rows: usize,
    num_perm: usize,
    threshold: f64,
    /// One table per band: band key → slots of the kept documents with that band.
    tables: Vec<HashMap<u64, Vec<usize>, BuildPreHashed>>,
    /// Signatures of the kept documents, `num_perm` values per slot, back to back.
    signatures: Vec<u32>,
    /// Input index of the document in each slot.
    documents: Vec<usize>,
}

impl LshIndex {
    pub(super) fn new(config: &MinHashConfig) -> Self {
        Self {
            rows: config.rows.max(1),
            num_perm: config.num_perm,
            threshold: config.threshold,
            tables: (0..config.bands).map(|_| HashMap::default()).collect(),
            signatures: Vec::new(),
            documents: Vec::new(),
        }
    }

    /// The earliest kept document that shares a band with `signature` and whose estimated
    /// similarity reaches the threshold: its input index and the similarity.
    pub(super) fn find(&self, signature: &[u32]) -> Option<(usize, f64)> {
        let mut candidates: Vec<usize> = Vec::new();
        for (table, band) in self.tables.iter().zip(signature.chunks_exact(self.rows)) {
            if let Some(slots) = table.get(&band_key(band)) {
                candidates.extend_from_slice(slots);
            }
        }
        candidates.sort_unstable();
        candidates.dedup();
        candidates.into_iter().find_map(|slot| {
            let kept = self.signatures.get(slot * self.num_perm..(slot + 1) * self.num_perm)?;
            let similarity = MinHasher::jaccard(signature, kept);
            (similarity >= self.threshold).then(|| (self.documents[slot], similarity))
        })
    }

    /// Adds a kept document.
    pub(super) fn insert(&mut self, signature: Vec<u32>, index: usize) {
        let slot = self.documents.len();
        for (table, band) in self.tables.iter_mut().zip(signature.chunks_exact(self.rows)) {
            table.entry(band_key(band)).or_default().push(slot);
        }
        self.signatures.extend_from_slice(&signature);
        self.documents.push(index);
    }
}

fn band_key(band: &[u32]) -> u64 {
    let mut h = Fnv::new();
    for value in band {
        h.bytes(&value.to_le_bytes());
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngCore;

    fn hasher(num_perm: usize, seed: u64) -> MinHasher {
        MinHasher::new(&MinHashConfig { num_perm, ..MinHashConfig::default() }, seed)
    }

    fn true_jaccard(a: &[u64], b: &[u64]) -> f64 {
        let inter = a.iter().filter(|x| b.binary_search(x).is_ok()).count();
        inter as f64 / (a.len() + b.len() - inter) as f64
    }

    #[test]
    fn modular_arithmetic_matches_u128() {
        let mut rng = seeded_rng(7);
        for _ in 0..10_000 {
            let (a, x, b) = (rng.random_range(0..P), rng.next_u64(), rng.random_range(0..P));
            assert_eq!(reduce(x), x % P);
            let x = reduce(x);
            let expected = ((u128::from(a) * u128::from(x) + u128::from(b)) % u128::from(P)) as u64;
            assert_eq!(mul_add_mod(a, x, b), expected);
        }
        assert_eq!(reduce(P), 0);
        assert_eq!(reduce(u64::MAX), u64::MAX % P);
        assert_eq!(
            mul_add_mod(P - 1, P - 1, P - 1),
            (((P - 1) as u128 * (P - 1) as u128 + (P - 1) as u128) % P as u128) as u64
        );
    }

    #[test]
    fn word_shingles_ignore_case_and_punctuation() {
        let h = hasher(16, 0);
        assert_eq!(h.shingles("One two, three four five six."), h.shingles("one TWO three\nfour five  six"));
        assert_eq!(h.shingles("one two three four five six").len(), 2);
        assert_eq!(h.shingles("too short").len(), 1);
        assert!(h.shingles(" ... ").is_empty());
        assert!(h.signature("!!").is_none());
    }

    #[test]
    fn char_shingles() {
        let config = MinHashConfig { shingle: ShingleUnit::Char, ngram: 3, ..MinHashConfig::default() };
        let h = MinHasher::new(&config, 0);
        // "abcab" → abc, bca, cab
        assert_eq!(h.shingles("ABCab").len(), 3);
        assert_eq!(h.shingles("a  b"), h.shingles("A\nB"));
    }

    #[test]
    fn identical_sets_have_identical_signatures_and_seeds_matter() {
        let h = hasher(128, 1);
        let a = h.signature("the quick brown fox jumps over the lazy dog").unwrap();
        assert_eq!(a.len(), 128);
        assert_eq!(Some(a.clone()), h.signature("The quick brown fox; jumps over the lazy dog!"));
        assert_eq!(MinHasher::jaccard(&a, &a), 1.0);
        assert_ne!(Some(a), hasher(128, 2).signature("the quick brown fox jumps over the lazy dog"));
    }

    #[test]
    fn estimates_track_true_jaccard() {
        let h = hasher(128, 0);
        let base: Vec<String> = (0..200).map(|i| format!("w{i}")).collect();
        // Pairs sharing a prefix of the words: true Jaccard from ~0.1 to ~0.95.
        for keep in [20, 60, 100, 150, 190] {
            let a = base.join(" ");
            let b: Vec<String> = base[..keep].iter().cloned().chain((0..200 - keep).map(|i| format!("x{i}"))).collect();
            let b = b.join(" ");
            let truth = true_jaccard(&h.shingles(&a), &h.shingles(&b));
            let estimate = MinHasher::jaccard(&h.signature(&a).unwrap(), &h.signature(&b).unwrap());
            assert!((estimate - truth).abs() <= 0.1, "keep {keep}: estimate {estimate}, truth {truth}");
        }
    }

    #[test]
    fn validation_names_the_key() {
        let bad = MinHashConfig { bands: 20, rows: 5, ..MinHashConfig::default() };
        assert_eq!(
            bad.validate("near_dedup").unwrap_err().to_string(),
            "near_dedup.bands: bands × rows must equal num_perm (128), found 20 × 5"
        );
        let bad = MinHashConfig { threshold: 1.5, ..MinHashConfig::default() };
        assert_eq!(
            bad.validate("near_dedup").unwrap_err().to_string(),
            "near_dedup.threshold: must be in (0, 1], found 1.5"
        );
        let bad = MinHashConfig { ngram: 0, ..MinHashConfig::default() };
        assert_eq!(
            bad.validate("near_dedup").unwrap_err().to_string(),
            "near_dedup.ngram: must be at least 1, found 0"
        );
        let bad = MinHashConfig { threshold: f64::NAN, ..MinHashConfig::default() };
        assert!(bad.validate("x").is_err());
    }

    #[test]
    fn default_banding_fits_the_threshold() {
        let c = MinHashConfig::default();
        assert!((c.candidate_probability(0.8) - 0.947).abs() < 0.001);
        assert!(c.candidate_probability(0.9) > 0.999);
        assert!(c.candidate_probability(0.5) < 0.07);
    }

    #[test]
    fn index_finds_the_earliest_similar_kept_document() {
        let config = MinHashConfig::default();
        let h = MinHasher::new(&config, 0);
        let mut index = LshIndex::new(&config);
        let doc: Vec<String> = (0..100).map(|i| format!("w{i}")).collect();
        let other: Vec<String> = (0..100).map(|i| format!("v{i}")).collect();
        index.insert(h.signature(&other.join(" ")).unwrap(), 3);
        index.insert(h.signature(&doc.join(" ")).unwrap(), 5);
        let mut changed = doc.clone();
        changed[50] = "changed".into();
        let (of, similarity) = index.find(&h.signature(&changed.join(" ")).unwrap()).unwrap();
        assert_eq!(of, 5);
        assert!((0.8..1.0).contains(&similarity), "{similarity}");
        let unrelated: Vec<String> = (0..100).map(|i| format!("u{i}")).collect();
        assert_eq!(index.find(&h.signature(&unrelated.join(" ")).unwrap()), None);
    }
}
