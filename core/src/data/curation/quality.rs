//! Per-document quality heuristics, after Gopher's "quality filters" and "repetition removal"
//! (Rae et al. 2021, appendix A.1.1, <https://arxiv.org/abs/2112.11446>); the defaults are
//! Gopher's thresholds unless a field says otherwise.
//!
//! Definitions used by the rules:
//! - *words*: whitespace-separated pieces of the text (punctuation included);
//! - *lines*: the text's lines with surrounding whitespace trimmed, empty ones skipped;
//! - *n-grams*: runs of n consecutive words, compared case-insensitively; an n-gram's
//!   characters are its words' characters (spaces not counted), as are the document's.
use std::cell::OnceCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

use super::hash::{mix64, BuildPreHashed, Fnv};
use super::Reason;
use crate::error::{Error, Result};

/// Gopher's stop words: a document needs at least [`QualityConfig::min_stop_words`] of them.
pub const STOP_WORDS: [&str; 8] = ["the", "be", "to", "of", "and", "that", "have", "with"];

/// Characters that start a bulleted line.
const BULLETS: [char; 7] = ['•', '●', '◦', '‣', '▪', '-', '*'];

/// `quality:` — every rule is on by default; `null` turns one off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct QualityConfig {
    /// Fewest words. Default 50.
    pub min_words: Option<usize>,
    /// Most words. Default 100,000.
    pub max_words: Option<usize>,
    /// Smallest mean word length, in characters. Default 3.
    pub min_mean_word_length: Option<f64>,
    /// Largest mean word length, in characters. Default 10.
    pub max_mean_word_length: Option<f64>,
    /// Largest ratio to the word count of `#` characters, and separately of ellipses
    /// (`...` or `…`). Default 0.1.
    pub max_symbol_word_ratio: Option<f64>,
    /// Largest fraction of lines starting with a bullet (`•`, `●`, `◦`, `‣`, `▪`, `-`, `*`).
    /// Default 0.9.
    pub max_bullet_line_fraction: Option<f64>,
    /// Largest fraction of lines ending with an ellipsis. Default 0.3.
    pub max_ellipsis_line_fraction: Option<f64>,
    /// Smallest fraction of words with at least one alphabetic character. Default 0.8.
    pub min_alpha_word_fraction: Option<f64>,
    /// Fewest distinct [`STOP_WORDS`] present (a word matches when equal to one, ignoring
    /// case and surrounding punctuation). Default 2.
    pub min_stop_words: Option<usize>,
    /// Smallest fraction of words that are [`STOP_WORDS`]. Not a Gopher rule; default off
    /// (`null`). Typical English prose is around 0.15.
    pub min_stop_word_fraction: Option<f64>,
    /// Largest fraction of non-whitespace characters that are numeric. Not a Gopher rule:
    /// plumb's default 0.2 lets prose with dates and figures through and stops number dumps.
    pub max_digit_fraction: Option<f64>,
    /// Largest fraction of lines that repeat an earlier line of the document. Default 0.3.
    pub max_duplicate_line_fraction: Option<f64>,
    /// Largest fraction of line characters in lines that repeat an earlier line. Default 0.2.
    pub max_duplicate_line_char_fraction: Option<f64>,
    /// n → largest fraction of characters covered by the most frequent repeated n-gram
    /// (its characters × its count). Default {2: 0.20, 3: 0.18, 4: 0.16}.
    pub max_top_ngram_char_fraction: Option<BTreeMap<usize, f64>>,
    /// n → largest fraction of characters in words covered by n-grams that occur more than
    /// once (each word counted once). Default {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11,
    /// 10: 0.10}.
    pub max_duplicate_ngram_char_fraction: Option<BTreeMap<usize, f64>>,
}

impl Default for QualityConfig {
    fn default() -> Self {
        Self {
            min_words: Some(50),
            max_words: Some(100_000),
            min_mean_word_length: Some(3.0),
            max_mean_word_length: Some(10.0),
            max_symbol_word_ratio: Some(0.1),
            max_bullet_line_fraction: Some(0.9),
            max_ellipsis_line_fraction: Some(0.3),
            min_alpha_word_fraction: Some(0.8),
            min_stop_words: Some(2),
            min_stop_word_fraction: None,
            max_digit_fraction: Some(0.2),
            max_duplicate_line_fraction: Some(0.3),
            max_duplicate_line_char_fraction: Some(0.2),
            max_top_ngram_char_fraction: Some([(2, 0.20), (3, 0.18), (4, 0.16)].into_iter().collect()),
            max_duplicate_ngram_char_fraction: Some(
                [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)].into_iter().collect(),
            ),
        }
    }
}

impl QualityConfig {
    /// Checks the thresholds; `prefix` is this section's key (`quality`).
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let key = |name: &str| format!("{prefix}.{name}");
        let fraction = |name: &str, value: Option<f64>| match value {
            Some(x) if !(0.0..=1.0).contains(&x) => {
                Err(Error::config(key(name), format!("must be a fraction in [0, 1], found {x}")))
            }
            _ => Ok(()),
        };
        let non_negative = |name: &str, value: Option<f64>| match value {
            Some(x) if !(x >= 0.0 && x.is_finite()) => {
                Err(Error::config(key(name), format!("must be a finite number ≥ 0, found {x}")))
            }
            _ => Ok(()),
        };
        if let (Some(min), Some(max)) = (self.min_words, self.max_words) {
            if max < min {
                return Err(Error::config(
                    key("max_words"),
                    format!("must be at least min_words ({min}), found {max}"),
                ));
            }
        }
        non_negative("min_mean_word_length", self.min_mean_word_length)?;
        non_negative("max_mean_word_length", self.max_mean_word_length)?;
        if let (Some(min), Some(max)) = (self.min_mean_word_length, self.max_mean_word_length) {
            if max < min {
                return Err(Error::config(
                    key("max_mean_word_length"),
                    format!("must be at least min_mean_word_length ({min}), found {max}"),
                ));
            }
        }
        non_negative("max_symbol_word_ratio", self.max_symbol_word_ratio)?;
        fraction("max_bullet_line_fraction", self.max_bullet_line_fraction)?;
        fraction("max_ellipsis_line_fraction", self.max_ellipsis_line_fraction)?;
        fraction("min_alpha_word_fraction", self.min_alpha_word_fraction)?;
        if let Some(n) = self.min_stop_words {
            if n > STOP_WORDS.len() {
                return Err(Error::config(
                    key("min_stop_words"),
                    format!("must be at most {} (the stop-word list's length), found {n}", STOP_WORDS.len()),
                ));
            }
        }
        fraction("min_stop_word_fraction", self.min_stop_word_fraction)?;
        fraction("max_digit_fraction", self.max_digit_fraction)?;
        fraction("max_duplicate_line_fraction", self.max_duplicate_line_fraction)?;
        fraction("max_duplicate_line_char_fraction", self.max_duplicate_line_char_fraction)?;
        for (name, limits) in [
            ("max_top_ngram_char_fraction", &self.max_top_ngram_char_fraction),
            ("max_duplicate_ngram_char_fraction", &self.max_duplicate_ngram_char_fraction),
        ] {
            for (&n, &limit) in limits.iter().flatten() {
                if n == 0 {
                    return Err(Error::config(key(&format!("{name}.0")), "n-gram length must be at least 1"));
                }
                fraction(&format!("{name}.{n}"), Some(limit))?;
            }
        }
        Ok(())
    }
}

/// One quality rule; the report's row and a rejection's reason name it by [`key`](Self::key).
/// Rules run in the order of this enum (n-gram rules by increasing n), cheap ones first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QualityRule {
    MinWords,
    MaxWords,
    MinMeanWordLength,
    MaxMeanWordLength,
    MaxSymbolWordRatio,
    MaxBulletLineFraction,
    MaxEllipsisLineFraction,
    MinAlphaWordFraction,
    MinStopWords,
    MinStopWordFraction,
    MaxDigitFraction,
    MaxDuplicateLineFraction,
    MaxDuplicateLineCharFraction,
    MaxTopNgramCharFraction(usize),
    MaxDuplicateNgramCharFraction(usize),
}

impl QualityRule {
    /// The config key that sets the rule's threshold: `quality.min_words`,
    /// `quality.max_top_ngram_char_fraction.2`.
    pub fn key(&self) -> String {
        let name = match self {
            Self::MinWords => "min_words",
            Self::MaxWords => "max_words",
            Self::MinMeanWordLength => "min_mean_word_length",
            Self::MaxMeanWordLength => "max_mean_word_length",
            Self::MaxSymbolWordRatio => "max_symbol_word_ratio",
            Self::MaxBulletLineFraction => "max_bullet_line_fraction",
            Self::MaxEllipsisLineFraction => "max_ellipsis_line_fraction",
            Self::MinAlphaWordFraction => "min_alpha_word_fraction",
            Self::MinStopWords => "min_stop_words",
            Self::MinStopWordFraction => "min_stop_word_fraction",
            Self::MaxDigitFraction => "max_digit_fraction",
            Self::MaxDuplicateLineFraction => "max_duplicate_line_fraction",
            Self::MaxDuplicateLineCharFraction => "max_duplicate_line_char_fraction",
            Self::MaxTopNgramCharFraction(n) => return format!("quality.max_top_ngram_char_fraction.{n}"),
            Self::MaxDuplicateNgramCharFraction(n) => {
                return format!("quality.max_duplicate_ngram_char_fraction.{n}");
            }
        };
        format!("quality.{name}")
    }

    /// True when the rule sets a floor (a smaller value fails), false for a ceiling.
    pub fn is_minimum(&self) -> bool {
        matches!(
            self,
            Self::MinWords
                | Self::MinMeanWordLength
                | Self::MinAlphaWordFraction
                | Self::MinStopWords
                | Self::MinStopWordFraction
        )
    }

    /// The rule's measurement of `text` (the value compared with the threshold).
    pub fn measure(&self, text: &str) -> f64 {
        Document::new(text).measure(*self)
    }
}

impl fmt::Display for QualityRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

impl Serialize for QualityRule {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.key())
    }
}

/// The enabled rules with their thresholds, in the order they run.
#[derive(Debug, Clone)]
pub(super) struct QualityFilter {
    rules: Vec<(QualityRule, f64)>,
}

impl QualityFilter {
    pub(super) fn new(config: &QualityConfig) -> Self {
        use QualityRule::*;
        let count = |n: Option<usize>| n.map(|n| n as f64);
        let mut rules: Vec<(QualityRule, Option<f64>)> = vec![
            (MinWords, count(config.min_words)),
            (MaxWords, count(config.max_words)),
            (MinMeanWordLength, config.min_mean_word_length),
            (MaxMeanWordLength, config.max_mean_word_length),
            (MaxSymbolWordRatio, config.max_symbol_word_ratio),
            (MaxBulletLineFraction, config.max_bullet_line_fraction),
            (MaxEllipsisLineFraction, config.max_ellipsis_line_fraction),
            (MinAlphaWordFraction, config.min_alpha_word_fraction),
            (MinStopWords, count(config.min_stop_words)),
            (MinStopWordFraction, config.min_stop_word_fraction),
            (MaxDigitFraction, config.max_digit_fraction),
            (MaxDuplicateLineFraction, config.max_duplicate_line_fraction),
            (MaxDuplicateLineCharFraction, config.max_duplicate_line_char_fraction),
        ];
        for (&n, &limit) in config.max_top_ngram_char_fraction.iter().flatten() {
            rules.push((MaxTopNgramCharFraction(n), Some(limit)));
        }
        for (&n, &limit) in config.max_duplicate_ngram_char_fraction.iter().flatten() {
            rules.push((MaxDuplicateNgramCharFraction(n), Some(limit)));
        }
        Self { rules: rules.into_iter().filter_map(|(rule, limit)| Some((rule, limit?))).collect() }
    }

    pub(super) fn rules(&self) -> &[(QualityRule, f64)] {
        &self.rules
    }

    /// The first rule `text` violates: its position in [`rules`](Self::rules) and the reason.
    pub(super) fn check(&self, text: &str) -> Option<(usize, Reason)> {
        let doc = Document::new(text);
        self.rules.iter().enumerate().find_map(|(row, &(rule, limit))| {
            let value = doc.measure(rule);
            let fails = if rule.is_minimum() { value < limit } else { value > limit };
            fails.then_some((row, Reason::Quality { rule, value, limit }))
        })
    }
}

/// A document being measured; costlier views are built on first use.
struct Document<'a> {
    text: &'a str,
    words: Vec<&'a str>,
    lines: OnceCell<Lines>,
    ngrams: OnceCell<NgramBasis>,
}

struct Lines {
    total: usize,
    total_chars: usize,
    bullets: usize,
    ellipses: usize,
    duplicates: usize,
    duplicate_chars: usize,
}

/// Prefix sums over the words, so that any n-gram costs O(1):
/// - `poly[i]` = Σ_{k<i} hash(word k)·B^(i−1−k) (mod 2⁶⁴) over lowercased word hashes, so the
///   n-gram at `i` hashes to `mix64(poly[i+n] − poly[i]·Bⁿ)` (a rolling hash);
/// - `chars[i]`: characters in words `0..i`, so words `i..j` have `chars[j] − chars[i]`.
struct NgramBasis {
    poly: Vec<u64>,
    chars: Vec<usize>,
}

/// The rolling hash's base: any odd constant.
const BASE: u64 = 0x9E37_79B9_7F4A_7C15;

impl NgramBasis {
    fn words(&self) -> usize {
        self.chars.len() - 1
    }

    /// Hashes of every n-gram, in order.
    fn ngram_hashes(&self, n: usize) -> impl Iterator<Item = u64> + '_ {
        let shift = BASE.wrapping_pow(n as u32);
        (0..(self.words() + 1).saturating_sub(n))
            .map(move |i| mix64(self.poly[i + n].wrapping_sub(self.poly[i].wrapping_mul(shift))))
    }
}

/// `part / whole`, 0 for an empty whole.
fn ratio(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

fn is_ellipsis_line(line: &str) -> bool {
    line.ends_with("...") || line.ends_with('…')
}

/// The index in [`STOP_WORDS`] of `word`, ignoring case and surrounding punctuation.
fn stop_word(word: &str) -> Option<usize> {
    let core = word.trim_matches(|c: char| !c.is_alphanumeric());
    STOP_WORDS.iter().position(|s| s.eq_ignore_ascii_case(core))
}

impl<'a> Document<'a> {
    fn new(text: &'a str) -> Self {
        Self { text, words: text.split_whitespace().collect(), lines: OnceCell::new(), ngrams: OnceCell::new() }
    }

    fn measure(&self, rule: QualityRule) -> f64 {
        use QualityRule::*;
        let n_words = self.words.len();
        match rule {
            MinWords | MaxWords => n_words as f64,
            MinMeanWordLength | MaxMeanWordLength => ratio(self.ngrams().chars[n_words], n_words),
            MaxSymbolWordRatio => {
                let hashes = self.text.matches('#').count();
                let ellipses = self.text.matches("...").count() + self.text.matches('…').count();
                ratio(hashes.max(ellipses), n_words)
            }
            MaxBulletLineFraction => ratio(self.lines().bullets, self.lines().total),
            MaxEllipsisLineFraction => ratio(self.lines().ellipses, self.lines().total),
            MinAlphaWordFraction => {
                ratio(self.words.iter().filter(|w| w.chars().any(char::is_alphabetic)).count(), n_words)
            }
            MinStopWords => {
                let present = self.words.iter().filter_map(|w| stop_word(w)).fold(0u32, |seen, i| seen | (1 << i));
                f64::from(present.count_ones())
            }
            MinStopWordFraction => ratio(self.words.iter().filter(|w| stop_word(w).is_some()).count(), n_words),
            MaxDigitFraction => {
                let (mut numeric, mut visible) = (0, 0);
                for c in self.text.chars().filter(|c| !c.is_whitespace()) {
                    visible += 1;
                    numeric += usize::from(c.is_numeric());
                }
                ratio(numeric, visible)
            }
            MaxDuplicateLineFraction => ratio(self.lines().duplicates, self.lines().total),
            MaxDuplicateLineCharFraction => ratio(self.lines().duplicate_chars, self.lines().total_chars),
            MaxTopNgramCharFraction(n) => self.top_ngram_char_fraction(n),
            MaxDuplicateNgramCharFraction(n) => self.duplicate_ngram_char_fraction(n),
        }
    }

    fn lines(&self) -> &Lines {
        self.lines.get_or_init(|| {
            let mut lines =
                Lines { total: 0, total_chars: 0, bullets: 0, ellipses: 0, duplicates: 0, duplicate_chars: 0 };
            let mut seen: HashSet<u64, BuildPreHashed> = HashSet::default();
            for line in self.text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                let chars = line.chars().count();
                lines.total += 1;
                lines.total_chars += chars;
                lines.bullets += usize::from(line.starts_with(BULLETS));
                lines.ellipses += usize::from(is_ellipsis_line(line));
                let mut h = Fnv::new();
                h.bytes(line.as_bytes());
                if !seen.insert(h.finish()) {
                    lines.duplicates += 1;
                    lines.duplicate_chars += chars;
                }
            }
            lines
        })
    }

    fn ngrams(&self) -> &NgramBasis {
        self.ngrams.get_or_init(|| {
            let mut poly = Vec::with_capacity(self.words.len() + 1);
            let mut chars = Vec::with_capacity(self.words.len() + 1);
            poly.push(0);
            chars.push(0);
            let (mut rolling, mut total) = (0u64, 0);
            for word in &self.words {
                let mut h = Fnv::new();
                for c in word.chars() {
                    h.char_lowercase(c);
                    total += 1;
                }
                rolling = rolling.wrapping_mul(BASE).wrapping_add(h.finish());
                poly.push(rolling);
                chars.push(total);
            }
            NgramBasis { poly, chars }
        })
    }

    /// Characters of the most frequent repeated n-gram times its count (ties: the longer),
    /// over all word characters; at most 1 (occurrences may overlap).
    fn top_ngram_char_fraction(&self, n: usize) -> f64 {
        let basis = self.ngrams();
        let (words, chars) = (basis.words(), &basis.chars);
        if n == 0 || words < n {
            return 0.0;
        }
        // n-gram → (count, first position)
        let mut counts: HashMap<u64, (usize, usize), BuildPreHashed> = HashMap::default();
        counts.reserve(words);
        for (i, key) in basis.ngram_hashes(n).enumerate() {
            counts.entry(key).or_insert((0, i)).0 += 1;
        }
        let top = counts
            .values()
            .filter(|(count, _)| *count >= 2)
            .map(|&(count, first)| (count, chars[first + n] - chars[first]))
            .max();
        match top {
            Some((count, ngram_chars)) => ratio(count * ngram_chars, chars[words]).min(1.0),
            None => 0.0,
        }
    }

    /// Characters of the words covered by n-grams that occur more than once, over all word
    /// characters.
    fn duplicate_ngram_char_fraction(&self, n: usize) -> f64 {
        let basis = self.ngrams();
        let (words, chars) = (basis.words(), &basis.chars);
        if n == 0 || words < n {
            return 0.0;
        }
        let keys: Vec<u64> = basis.ngram_hashes(n).collect();
        let mut counts: HashMap<u64, u32, BuildPreHashed> = HashMap::default();
        counts.reserve(keys.len());
        for &key in &keys {
            *counts.entry(key).or_insert(0) += 1;
        }
        // Walk the repeated n-grams left to right, counting each word once.
        let (mut covered, mut covered_until) = (0, 0);
        for (i, key) in keys.iter().enumerate() {
            if counts.get(key).is_some_and(|&c| c >= 2) {
                let start = i.max(covered_until);
                covered += chars[i + n] - chars[start];
                covered_until = i + n;
            }
        }
        ratio(covered, chars[words])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use QualityRule::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn word_and_character_measures() {
        assert_eq!(MinWords.measure("one two  three\nfour"), 4.0);
        assert!(close(MinMeanWordLength.measure("ab abcd"), 3.0));
        assert_eq!(MinMeanWordLength.measure("   "), 0.0);
        // two '#' against one ellipsis, over 3 words
        assert!(close(MaxSymbolWordRatio.measure("#a #b c..."), 2.0 / 3.0));
        assert!(close(MaxSymbolWordRatio.measure("a… b... c d"), 0.5));
        assert!(close(MinAlphaWordFraction.measure("abc 123 !! x1"), 0.5));
        assert!(close(MaxDigitFraction.measure("ab 12"), 0.5));
    }

    #[test]
    fn stop_words_ignore_case_and_punctuation() {
        assert_eq!(MinStopWords.measure("The cat, the dog (and) THE bird."), 2.0);
        assert_eq!(MinStopWords.measure("there other theory"), 0.0);
        assert!(close(MinStopWordFraction.measure("the cat and dog"), 0.5));
    }

    #[test]
    fn line_measures() {
        let text = "- one\n\n  - two\nthree...\nfour…\n- one\n";
        // lines: "- one", "- two", "three...", "four…", "- one"
        assert!(close(MaxBulletLineFraction.measure(text), 3.0 / 5.0));
        assert!(close(MaxEllipsisLineFraction.measure(text), 2.0 / 5.0));
        assert!(close(MaxDuplicateLineFraction.measure(text), 1.0 / 5.0));
        // "- one" is 5 characters of 5 + 5 + 8 + 5 + 5
        assert!(close(MaxDuplicateLineCharFraction.measure(text), 5.0 / 28.0));
    }

    #[test]
    fn ngram_measures() {
        // "aa bb" three times, 4 characters each, of 15 word characters
        let text = "aa bb x AA bb yy aa BB";
        assert!(close(MaxTopNgramCharFraction(2).measure(text), 12.0 / 15.0));
        assert_eq!(MaxTopNgramCharFraction(3).measure(text), 0.0);
        // duplicated 2-grams cover the words aa bb (three times): 12 of 15
        assert!(close(MaxDuplicateNgramCharFraction(2).measure(text), 12.0 / 15.0));
        // overlapping repeats count each word once: "a a a a" 2-gram "a a" covers all 4
        assert!(close(MaxDuplicateNgramCharFraction(2).measure("a a a a"), 1.0));
        assert!(close(MaxTopNgramCharFraction(2).measure("a a a a"), 1.0));
        assert_eq!(MaxDuplicateNgramCharFraction(5).measure("too short"), 0.0);
    }

    #[test]
    fn rolling_ngram_hashes_match_equal_ngrams() {
        let doc = Document::new("a b c A B C d");
        let trigrams: Vec<u64> = doc.ngrams().ngram_hashes(3).collect();
        assert_eq!(trigrams.len(), 5);
        assert_eq!(trigrams[0], trigrams[3]);
        let distinct: HashSet<u64> = trigrams.iter().copied().collect();
        assert_eq!(distinct.len(), 4);
        assert_eq!(doc.ngrams().ngram_hashes(7).count(), 1);
        assert_eq!(doc.ngrams().ngram_hashes(8).count(), 0);
    }

    #[test]
    fn first_violated_rule_is_the_reason() {
        let filter = QualityFilter::new(&QualityConfig::default());
        // short, and no stop words: min_words comes first
        let (row, reason) = filter.check("alpha beta gamma").unwrap();
        assert_eq!(row, 0);
        assert_eq!(reason, Reason::Quality { rule: MinWords, value: 3.0, limit: 50.0 });
    }

    #[test]
    fn null_turns_a_rule_off() {
        let config: QualityConfig =
            serde_json::from_str(r#"{"min_words": null, "max_top_ngram_char_fraction": {"3": 0.5}}"#).unwrap();
        let filter = QualityFilter::new(&config);
        let rules: Vec<QualityRule> = filter.rules().iter().map(|r| r.0).collect();
        assert!(!rules.contains(&MinWords));
        assert!(rules.contains(&MaxWords));
        assert!(rules.contains(&MaxTopNgramCharFraction(3)));
        assert!(!rules.contains(&MaxTopNgramCharFraction(2)));
        assert!(!rules.contains(&MinStopWordFraction), "off by default");
        // the default rules, in order
        assert_eq!(QualityFilter::new(&QualityConfig::default()).rules().len(), 12 + 3 + 6);
    }

    #[test]
    fn validation_names_the_key() {
        let err = |config: QualityConfig| config.validate("quality").unwrap_err().to_string();
        let base = QualityConfig::default();
        assert_eq!(
            err(QualityConfig { max_words: Some(10), ..base.clone() }),
            "quality.max_words: must be at least min_words (50), found 10"
        );
        assert_eq!(
            err(QualityConfig { max_digit_fraction: Some(1.5), ..base.clone() }),
            "quality.max_digit_fraction: must be a fraction in [0, 1], found 1.5"
        );
        assert_eq!(
            err(QualityConfig { min_stop_words: Some(9), ..base.clone() }),
            "quality.min_stop_words: must be at most 8 (the stop-word list's length), found 9"
        );
        let mut ngrams = BTreeMap::new();
        ngrams.insert(4, -0.1);
        assert_eq!(
            err(QualityConfig { max_top_ngram_char_fraction: Some(ngrams), ..base.clone() }),
            "quality.max_top_ngram_char_fraction.4: must be a fraction in [0, 1], found -0.1"
        );
        assert_eq!(
            err(QualityConfig { min_mean_word_length: Some(f64::NAN), ..base }),
            "quality.min_mean_word_length: must be a finite number ≥ 0, found NaN"
        );
    }
}
