//! The data side of two denoising pretraining objectives: BERT's masked language modelling
//! and T5's span corruption. Each turns a row of token ids into model inputs and labels;
//! all randomness comes from a [`SeededRng`] the caller seeds, so an example depends on
//! that seed alone, not on libtorch's global generator.
//!
//! - Masked LM: Devlin et al. 2019, "BERT" (<https://arxiv.org/abs/1810.04805>), §3.1 and
//!   appendix A.1, as HF's `DataCollatorForLanguageModeling.torch_mask_tokens`
//!   (<https://github.com/huggingface/transformers/blob/main/src/transformers/data/data_collator.py>).
//! - Span corruption: Raffel et al. 2020, "T5" (<https://arxiv.org/abs/1910.10683>), §3.1.4
//!   and §3.3.4, as `random_spans_noise_mask`, `noise_span_to_unique_sentinel` and
//!   `random_spans_helper` of
//!   <https://github.com/google-research/text-to-text-transfer-transformer/blob/main/t5/data/preprocessors.py>
//!   (HF's port: `examples/flax/language-modeling/run_t5_mlm_flax.py`).
use rand::seq::SliceRandom;
use rand::Rng;
use std::ops::Range;

use tch::{Device, Tensor};

use super::SeededRng;
use crate::error::{Error, Result};

/// The label of a position that takes no part in the loss: PyTorch's default
/// `ignore_index` of `cross_entropy`, and what HF's collators write.
pub const IGNORE_INDEX: i64 = -100;

/// Uniform in [0, 1).
fn uniform(rng: &mut SeededRng) -> f64 {
    rng.random::<f64>()
}

// ---------------------------------------------------------------------------------------
// Masked LM (BERT)
// ---------------------------------------------------------------------------------------

/// How many tokens BERT's objective selects, and what becomes of them.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct MlmConfig {
    /// Chance that a maskable token is selected for prediction (HF `mlm_probability`).
    pub probability: f64,
    /// Of the selected tokens, the fraction replaced by the mask token.
    pub mask_fraction: f64,
    /// Of the selected tokens, the fraction replaced by a random token; the rest
    /// (1 - mask_fraction - random_fraction) keep their token.
    pub random_fraction: f64,
}

impl Default for MlmConfig {
    /// BERT's 15% selected; 80% of them masked, 10% random, 10% kept.
    fn default() -> Self {
        Self { probability: 0.15, mask_fraction: 0.8, random_fraction: 0.1 }
    }
}

impl MlmConfig {
    /// The fraction of selected tokens left as they are.
    pub fn kept_fraction(&self) -> f64 {
        1.0 - self.mask_fraction - self.random_fraction
    }

    pub fn validate(&self) -> Result<()> {
        for (key, value) in [
            ("probability", self.probability),
            ("mask_fraction", self.mask_fraction),
            ("random_fraction", self.random_fraction),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(Error::config(key, format!("expected a fraction in [0, 1], found {value}")));
            }
        }
        if self.mask_fraction + self.random_fraction > 1.0 {
            return Err(Error::config(
                "random_fraction",
                format!(
                    "mask_fraction + random_fraction is {} (> 1); the kept fraction is what is left of 1",
                    self.mask_fraction + self.random_fraction
                ),
            ));
        }
        Ok(())
    }
}

/// The ids masking needs from the tokenizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialIds {
    /// `[MASK]` (BERT) or `<mask>` (RoBERTa).
    pub mask_id: i64,
    /// Random replacements are drawn uniformly from `0..vocab_size`.
    pub vocab_size: usize,
    /// Ids never selected: CLS, SEP, PAD, EOS... HF excludes all of the tokenizer's
    /// `all_special_ids` (which include UNK and MASK); list the same ids for parity.
    pub never_mask: Vec<i64>,
}

impl SpecialIds {
    fn validate(&self) -> Result<()> {
        if self.vocab_size == 0 {
            return Err(Error::Other("masked LM: vocab_size is 0; random replacements need a vocabulary".into()));
        }
        if !usize::try_from(self.mask_id).is_ok_and(|id| id < self.vocab_size) {
            return Err(Error::Other(format!(
                "masked LM: mask_id {} is outside the vocabulary 0..{}",
                self.mask_id, self.vocab_size
            )));
        }
        Ok(())
    }
}

/// One masked row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MlmExample {
    /// The row with the selected tokens masked, replaced or kept.
    pub input_ids: Vec<i64>,
    /// The original token at selected positions, [`IGNORE_INDEX`] elsewhere.
    pub labels: Vec<i64>,
}

/// BERT's masking of one row. Each token not in `special.never_mask` is selected
/// independently with `config.probability` (a Bernoulli draw per token, as HF does, so the
/// number selected varies from row to row); a selected token becomes `special.mask_id`
/// with chance `mask_fraction`, a random id with chance `random_fraction`, else stays.
///
/// The random id is uniform over the whole vocabulary `0..vocab_size`, special ids and the
/// mask id included, as in HF (`torch.randint(len(tokenizer), ...)`) and BERT's
/// `create_pretraining_data.py` (which draws from all of `vocab_words`).
pub fn mask_tokens(
    tokens: &[i64],
    config: &MlmConfig,
    special: &SpecialIds,
    rng: &mut SeededRng,
) -> Result<MlmExample> {
    config.validate()?;
    special.validate()?;
    let mut input_ids = tokens.to_vec();
    let mut labels = vec![IGNORE_INDEX; tokens.len()];
    for ((input, label), &token) in input_ids.iter_mut().zip(labels.iter_mut()).zip(tokens) {
        if special.never_mask.contains(&token) || uniform(rng) >= config.probability {
            continue;
        }
        *label = token;
        let action = uniform(rng);
        if action < config.mask_fraction {
            *input = special.mask_id;
        } else if action < config.mask_fraction + config.random_fraction {
            *input = rng.random_range(0..special.vocab_size as u64) as i64;
        }
    }
    Ok(MlmExample { input_ids, labels })
}

/// Masks each of `rows` (all the same length, e.g. rows of [`super::pack`]) in order with
/// [`mask_tokens`]. Returns (input_ids, labels), each (B, T) int64 on `device`.
pub fn mlm_batch<R: AsRef<[i64]>>(
    rows: &[R],
    config: &MlmConfig,
    special: &SpecialIds,
    rng: &mut SeededRng,
    device: Device,
) -> Result<(Tensor, Tensor)> {
    let len = equal_row_length(rows)?;
    let mut inputs = Vec::with_capacity(rows.len() * len);
    let mut labels = Vec::with_capacity(rows.len() * len);
    for row in rows {
        let example = mask_tokens(row.as_ref(), config, special, rng)?;
        inputs.extend(example.input_ids);
        labels.extend(example.labels);
    }
    let shape = [rows.len() as i64, len as i64];
    Ok((
        Tensor::from_slice(&inputs).view(shape).to_device(device),
        Tensor::from_slice(&labels).view(shape).to_device(device),
    ))
}

fn equal_row_length<R: AsRef<[i64]>>(rows: &[R]) -> Result<usize> {
    let first = rows.first().ok_or_else(|| Error::Other("a batch needs at least one row".into()))?.as_ref().len();
    for (i, row) in rows.iter().enumerate() {
        if row.as_ref().len() != first {
            return Err(Error::Other(format!(
                "batch rows differ in length: row 0 has {first} tokens, row {i} has {}",
                row.as_ref().len()
            )));
        }
    }
    Ok(first)
}

// ---------------------------------------------------------------------------------------
// Span corruption (T5)
// ---------------------------------------------------------------------------------------

/// How much of a row T5's objective corrupts, and in how long spans.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct SpanConfig {
    /// Fraction of the tokens that are noise (dropped from the inputs, predicted in the targets).
    pub noise_density: f64,
    /// Mean length of a noise span, in tokens.
    pub mean_span_length: f64,
}

impl Default for SpanConfig {
    /// T5's final objective: 15% noise in spans of 3 on average.
    fn default() -> Self {
        Self { noise_density: 0.15, mean_span_length: 3.0 }
    }
}

impl SpanConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.noise_density > 0.0 && self.noise_density < 1.0) {
            return Err(Error::config(
                "noise_density",
                format!("expected a fraction strictly between 0 and 1, found {}", self.noise_density),
            ));
        }
        if !(self.mean_span_length >= 1.0 && self.mean_span_length.is_finite()) {
            return Err(Error::config(
                "mean_span_length",
                format!("expected a number of tokens >= 1, found {}", self.mean_span_length),
            ));
        }
        Ok(())
    }
}

/// The sentinel ids that stand for noise spans, and the EOS that ends inputs and targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sentinels {
    /// In T5's order: `<extra_id_0>` first. A row needs one per noise span.
    pub ids: Vec<i64>,
    /// Appended to both inputs and targets when set (T5 appends `</s>` to both).
    pub eos: Option<i64>,
}

impl Sentinels {
    /// T5's layout: `<extra_id_0>` is `highest` (the last id of the tokenizer, 32099 for the
    /// original T5 vocabulary), `<extra_id_1>` is `highest - 1`, and so on, `count` of them.
    pub fn descending(highest: i64, count: usize, eos: Option<i64>) -> Self {
        Self { ids: (0..count as i64).map(|i| highest - i).collect(), eos }
    }
}

/// The sizes of a span-corruption example, which depend on the raw length alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanLengths {
    /// Tokens before corruption.
    pub raw: usize,
    pub noise_tokens: usize,
    /// Also the number of sentinels used.
    pub noise_spans: usize,
    /// Length of the inputs: the kept tokens, one sentinel per span, the EOS if any.
    pub inputs: usize,
    /// Length of the targets: one sentinel per span, the noise tokens, the EOS if any.
    pub targets: usize,
}

/// T5's counts for a row of `raw` tokens, with its guards against degenerate cases:
/// noise_tokens = round(raw * noise_density) clamped to [1, raw - 1];
/// noise_spans = round(noise_tokens / mean_span_length), at least 1. Rounding is half to
/// even, as `tf.round` and Python's `round`. Where T5 would fail (more spans than kept
/// tokens, possible only above 50% noise) the spans are capped at the kept tokens.
pub fn span_lengths(raw: usize, config: &SpanConfig, eos: bool) -> Result<SpanLengths> {
    config.validate()?;
    if raw < 2 {
        return Err(Error::Other(format!(
            "span corruption needs at least 2 tokens (one noise, one kept); the row has {raw}"
        )));
    }
    let noise_tokens = ((raw as f64 * config.noise_density).round_ties_even() as usize).clamp(1, raw - 1);
    let kept = raw - noise_tokens;
    let noise_spans =
        ((noise_tokens as f64 / config.mean_span_length).round_ties_even() as usize).clamp(1, noise_tokens.min(kept));
    let eos = usize::from(eos);
    Ok(SpanLengths {
        raw,
        noise_tokens,
        noise_spans,
        inputs: kept + noise_spans + eos,
        targets: noise_tokens + noise_spans + eos,
    })
}

/// T5's `random_spans_helper` (HF: `compute_input_and_target_lengths`): the longest raw
/// length whose corrupted inputs fit in `inputs` tokens, so rows can be packed to that raw
/// length and come out as inputs of (at most) the length the model was built for. With
/// T5's defaults and an EOS, 512 inputs take 568 raw tokens and give 114 targets.
pub fn raw_length_for_inputs(inputs: usize, config: &SpanConfig, eos: bool) -> Result<SpanLengths> {
    let mut raw = inputs.saturating_sub(usize::from(eos));
    let mut lengths = span_lengths(raw, config, eos)
        .map_err(|_| Error::Other(format!("span corruption: inputs of {inputs} tokens are too short to hold a row")))?;
    // Same search as T5's: grow the raw length while the inputs still fit.
    loop {
        let next = span_lengths(raw + 1, config, eos)?;
        if next.inputs > inputs {
            return Ok(lengths);
        }
        raw += 1;
        lengths = next;
    }
}

/// Splits `items` into `segments` non-empty runs, uniformly over all such splits: T5's
/// `_random_segmentation` (shuffle `segments - 1` "a run starts here" flags among the
/// `items - 1` positions after the first). Needs 1 <= segments <= items.
fn random_segmentation(items: usize, segments: usize, rng: &mut SeededRng) -> Vec<usize> {
    let mut starts: Vec<bool> = (0..items.saturating_sub(1)).map(|i| i + 1 < segments).collect();
    starts.shuffle(rng);
    let mut lengths = Vec::with_capacity(segments);
    lengths.push(1);
    for start in starts {
        if start {
            lengths.push(1);
        } else if let Some(last) = lengths.last_mut() {
            *last += 1;
        }
    }
    lengths
}

/// T5's `random_spans_noise_mask`, as the noise spans' positions: kept and noise runs
/// alternate, starting with kept (so no span starts at 0) and ending with noise (so the
/// last span ends at `raw`); their lengths are independent uniform splits of the counts of
/// [`span_lengths`]. Spans are sorted, disjoint and separated by at least one kept token.
pub fn random_spans(raw: usize, config: &SpanConfig, rng: &mut SeededRng) -> Result<Vec<Range<usize>>> {
    let lengths = span_lengths(raw, config, false)?;
    Ok(spans_for(&lengths, rng))
}

fn spans_for(lengths: &SpanLengths, rng: &mut SeededRng) -> Vec<Range<usize>> {
    let noise = random_segmentation(lengths.noise_tokens, lengths.noise_spans, rng);
    let kept = random_segmentation(lengths.raw - lengths.noise_tokens, lengths.noise_spans, rng);
    let mut at = 0;
    kept.iter()
        .zip(&noise)
        .map(|(kept, noise)| {
            let span = at + kept..at + kept + noise;
            at = span.end;
            span
        })
        .collect()
}

/// One span-corrupted row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanExample {
    /// Kept tokens with each noise span replaced by its sentinel, then EOS if any.
    pub inputs: Vec<i64>,
    /// Each sentinel followed by the tokens of its span, then EOS if any.
    pub targets: Vec<i64>,
    /// Where the noise spans were in the raw row.
    pub noise_spans: Vec<Range<usize>>,
}

/// T5's span corruption of one row (the `span_corruption` preprocessor on an already
/// packed row). With T5's layout, "Thank you for inviting me to your party last week ."
/// may become inputs "Thank you <X> me to your party <Y> week <Z>" and targets
/// "<X> for inviting <Y> last <Z> ." — since T5's noise always ends the row, the targets
/// end with a span, not with a sentinel, and the same sentinels appear in both, in order.
///
/// Tokens equal to a sentinel id would make the example ambiguous; they are not checked
/// for (T5 does not either): keep sentinels out of the text's vocabulary.
pub fn corrupt_spans(
    tokens: &[i64],
    config: &SpanConfig,
    sentinels: &Sentinels,
    rng: &mut SeededRng,
) -> Result<SpanExample> {
    let lengths = span_lengths(tokens.len(), config, sentinels.eos.is_some())?;
    if lengths.noise_spans > sentinels.ids.len() {
        return Err(Error::Other(format!(
            "span corruption of a row of {} tokens makes {} noise spans, but only {} sentinels are given",
            tokens.len(),
            lengths.noise_spans,
            sentinels.ids.len()
        )));
    }
    let noise_spans = spans_for(&lengths, rng);
    let mut inputs = Vec::with_capacity(lengths.inputs);
    let mut targets = Vec::with_capacity(lengths.targets);
    let mut kept_from = 0;
    for (span, &sentinel) in noise_spans.iter().zip(&sentinels.ids) {
        inputs.extend_from_slice(&tokens[kept_from..span.start]);
        inputs.push(sentinel);
        targets.push(sentinel);
        targets.extend_from_slice(&tokens[span.clone()]);
        kept_from = span.end;
    }
    inputs.extend_from_slice(&tokens[kept_from..]); // empty: the last span ends the row
    if let Some(eos) = sentinels.eos {
        inputs.push(eos);
        targets.push(eos);
    }
    Ok(SpanExample { inputs, targets, noise_spans })
}

/// Rebuilds the raw row from a span-corruption example: each sentinel of `inputs` is
/// replaced by the tokens that follow the same sentinel in `targets`. Errors when the two
/// do not fit together (sentinels missing, extra or out of order, a missing EOS).
pub fn reconstruct(inputs: &[i64], targets: &[i64], sentinels: &Sentinels) -> Result<Vec<i64>> {
    let without_eos = |sequence: &'static str, tokens: &[i64]| -> Result<Vec<i64>> {
        match (sentinels.eos, tokens.split_last()) {
            (None, _) => Ok(tokens.to_vec()),
            (Some(eos), Some((&last, rest))) if last == eos => Ok(rest.to_vec()),
            (Some(eos), _) => Err(Error::Other(format!("span corruption: the {sequence} do not end with EOS {eos}"))),
        }
    };
    let inputs = without_eos("inputs", inputs)?;
    let targets = without_eos("targets", targets)?;
    let is_sentinel = |token: &i64| sentinels.ids.contains(token);

    // The targets as (sentinel, span) pairs.
    let marks: Vec<usize> = (0..targets.len()).filter(|&i| is_sentinel(&targets[i])).collect();
    if let Some(&first) = targets.first() {
        if marks.first() != Some(&0) {
            return Err(Error::Other(format!("span corruption: the targets start with {first}, not a sentinel")));
        }
    }
    let spans: Vec<(i64, &[i64])> = marks
        .iter()
        .enumerate()
        .map(|(n, &at)| (targets[at], &targets[at + 1..marks.get(n + 1).copied().unwrap_or(targets.len())]))
        .collect();

    let mut raw = Vec::with_capacity(inputs.len() + targets.len());
    let mut used = 0;
    for token in inputs {
        if !is_sentinel(&token) {
            raw.push(token);
            continue;
        }
        match spans.get(used) {
            Some(&(sentinel, span)) if sentinel == token => raw.extend_from_slice(span),
            Some(&(sentinel, _)) => {
                return Err(Error::Other(format!(
                    "span corruption: sentinel {used} of the inputs is {token}, of the targets {sentinel}"
                )))
            }
            None => {
                return Err(Error::Other(format!(
                    "span corruption: the inputs have more sentinels than the targets ({})",
                    spans.len()
                )))
            }
        }
        used += 1;
    }
    if used != spans.len() {
        return Err(Error::Other(format!(
            "span corruption: the targets have {} sentinels, the inputs {used}",
            spans.len()
        )));
    }
    Ok(raw)
}

/// A batch of span-corrupted rows, padded to the longest inputs and targets.
#[derive(Debug)]
pub struct SpanBatch {
    /// (B, S) encoder input ids, `pad_id` after the end.
    pub inputs: Tensor,
    /// (B, S) int64: 1 on real tokens, 0 on padding.
    pub attention_mask: Tensor,
    /// (B, L) target ids, [`IGNORE_INDEX`] after the end (HF's T5 builds the decoder
    /// inputs from these by shifting right and writing the pad id over the ignore index).
    pub labels: Tensor,
}

/// Corrupts each of `rows` in order with [`corrupt_spans`] and pads the results into
/// tensors on `device`. Rows of one raw length (packed rows) give one length, so no padding.
pub fn span_batch<R: AsRef<[i64]>>(
    rows: &[R],
    config: &SpanConfig,
    sentinels: &Sentinels,
    pad_id: i64,
    rng: &mut SeededRng,
    device: Device,
) -> Result<SpanBatch> {
    if rows.is_empty() {
        return Err(Error::Other("a batch needs at least one row".into()));
    }
    let examples =
        rows.iter().map(|row| corrupt_spans(row.as_ref(), config, sentinels, rng)).collect::<Result<Vec<_>>>()?;
    let s = examples.iter().map(|e| e.inputs.len()).max().unwrap_or(0);
    let l = examples.iter().map(|e| e.targets.len()).max().unwrap_or(0);
    let mut inputs = vec![pad_id; examples.len() * s];
    let mut attention_mask = vec![0i64; examples.len() * s];
    let mut labels = vec![IGNORE_INDEX; examples.len() * l];
    for (b, example) in examples.iter().enumerate() {
        let n = example.inputs.len();
        inputs[b * s..b * s + n].copy_from_slice(&example.inputs);
        attention_mask[b * s..b * s + n].fill(1);
        labels[b * l..b * l + example.targets.len()].copy_from_slice(&example.targets);
    }
    let b = examples.len() as i64;
    let tensor = |data: &[i64], t: usize| Tensor::from_slice(data).view([b, t as i64]).to_device(device);
    Ok(SpanBatch { inputs: tensor(&inputs, s), attention_mask: tensor(&attention_mask, s), labels: tensor(&labels, l) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::seeded_rng;

    fn bert() -> SpecialIds {
        SpecialIds { mask_id: 3, vocab_size: 100, never_mask: vec![0, 1, 2, 3] }
    }

    #[test]
    fn masking_is_seeded() {
        let tokens: Vec<i64> = (4..100).collect();
        let run = |seed| mask_tokens(&tokens, &MlmConfig::default(), &bert(), &mut seeded_rng(seed)).unwrap();
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn everything_selected_and_masked_when_asked() {
        let config = MlmConfig { probability: 1.0, mask_fraction: 1.0, random_fraction: 0.0 };
        let example = mask_tokens(&[1, 5, 6, 2], &config, &bert(), &mut seeded_rng(0)).unwrap();
        assert_eq!(example.input_ids, vec![1, 3, 3, 2]);
        assert_eq!(example.labels, vec![IGNORE_INDEX, 5, 6, IGNORE_INDEX]);
        let config = MlmConfig { probability: 1.0, mask_fraction: 0.0, random_fraction: 0.0 };
        let example = mask_tokens(&[1, 5, 6, 2], &config, &bert(), &mut seeded_rng(0)).unwrap();
        assert_eq!(example.input_ids, vec![1, 5, 6, 2]);
        assert_eq!(example.labels, vec![IGNORE_INDEX, 5, 6, IGNORE_INDEX]);
    }

    #[test]
    fn bad_masking_settings_are_errors() {
        let config = MlmConfig { mask_fraction: 0.95, ..MlmConfig::default() };
        let message = mask_tokens(&[5], &config, &bert(), &mut seeded_rng(0)).unwrap_err().to_string();
        assert!(message.starts_with("random_fraction: mask_fraction + random_fraction is 1.05"), "{message}");
        let special = SpecialIds { vocab_size: 0, ..bert() };
        assert!(mask_tokens(&[5], &MlmConfig::default(), &special, &mut seeded_rng(0)).is_err());
        let special = SpecialIds { mask_id: 100, ..bert() };
        let message = mask_tokens(&[5], &MlmConfig::default(), &special, &mut seeded_rng(0)).unwrap_err();
        assert_eq!(message.to_string(), "masked LM: mask_id 100 is outside the vocabulary 0..100");
    }

    #[test]
    fn segmentation_is_positive_and_sums_to_the_items() {
        let mut rng = seeded_rng(3);
        for (items, segments) in [(1, 1), (5, 1), (5, 5), (19, 6), (100, 7)] {
            let lengths = random_segmentation(items, segments, &mut rng);
            assert_eq!(lengths.len(), segments);
            assert_eq!(lengths.iter().sum::<usize>(), items);
            assert!(lengths.iter().all(|&l| l >= 1), "{lengths:?}");
        }
    }

    #[test]
    fn counts_round_half_to_even_and_avoid_degeneracy() {
        let config = SpanConfig::default();
        // 30 * 0.15 = 4.5 → 4 (half to even, as tf.round); 10 * 0.15 = 1.5 → 2.
        assert_eq!(span_lengths(30, &config, false).unwrap().noise_tokens, 4);
        assert_eq!(span_lengths(10, &config, false).unwrap().noise_tokens, 2);
        let two = span_lengths(2, &config, true).unwrap();
        assert_eq!((two.noise_tokens, two.noise_spans, two.inputs, two.targets), (1, 1, 3, 3));
        let dense = span_lengths(10, &SpanConfig { noise_density: 0.9, mean_span_length: 1.0 }, false).unwrap();
        assert_eq!((dense.noise_tokens, dense.noise_spans), (9, 1));
        assert!(span_lengths(1, &config, false).is_err());
    }

    #[test]
    fn t5_lengths_for_512_inputs() {
        let lengths = raw_length_for_inputs(512, &SpanConfig::default(), true).unwrap();
        assert_eq!((lengths.raw, lengths.inputs, lengths.targets), (568, 512, 114));
        // T5's random_spans_helper gives (141, 29) for 128 inputs and (284, 58) for 256.
        let lengths = raw_length_for_inputs(128, &SpanConfig::default(), true).unwrap();
        assert_eq!((lengths.raw, lengths.inputs, lengths.targets), (141, 128, 29));
        let lengths = raw_length_for_inputs(256, &SpanConfig::default(), true).unwrap();
        assert_eq!((lengths.raw, lengths.targets), (284, 58));
    }

    #[test]
    fn a_hand_checked_corruption() {
        let sentinels = Sentinels::descending(99, 3, Some(1));
        assert_eq!(sentinels.ids, vec![99, 98, 97]);
        let tokens: Vec<i64> = (10..30).collect(); // 20 tokens: 3 noise, 1 span
        let example = corrupt_spans(&tokens, &SpanConfig::default(), &sentinels, &mut seeded_rng(5)).unwrap();
        assert_eq!(example.noise_spans, vec![17..20]);
        let mut inputs: Vec<i64> = (10..27).collect();
        inputs.extend([99, 1]);
        assert_eq!(example.inputs, inputs);
        assert_eq!(example.targets, vec![99, 27, 28, 29, 1]);
        assert_eq!(reconstruct(&example.inputs, &example.targets, &sentinels).unwrap(), tokens);
    }

    #[test]
    fn reconstruct_rejects_mismatched_pairs() {
        let sentinels = Sentinels::descending(99, 3, None);
        assert!(reconstruct(&[5, 99, 6, 98], &[99, 7, 98, 8], &sentinels).is_ok());
        assert!(reconstruct(&[5, 98, 6, 99], &[99, 7, 98, 8], &sentinels).is_err());
        assert!(reconstruct(&[5, 99, 6], &[99, 7, 98, 8], &sentinels).is_err());
        assert!(reconstruct(&[5, 99, 6, 98], &[99, 7], &sentinels).is_err());
        assert!(reconstruct(&[5, 99], &[7, 99, 8], &sentinels).is_err());
        let with_eos = Sentinels::descending(99, 3, Some(1));
        assert!(reconstruct(&[5, 99], &[99, 7, 1], &with_eos).is_err());
    }
}
