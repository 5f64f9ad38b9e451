//! The pretraining objectives' documented statistics, over many seeded rows: BERT's
//! 15% selected and 80/10/10 split, T5's exact noise counts, span lengths and sentinel
//! layout, and exact reconstruction of the raw rows.
use plumb_core::data::objectives::{
    corrupt_spans, mask_tokens, mlm_batch, random_spans, raw_length_for_inputs, reconstruct, span_batch, span_lengths,
    MlmConfig, Sentinels, SpanConfig, SpecialIds, IGNORE_INDEX,
};
use plumb_core::data::{seeded_rng, SeededRng};
use plumb_core::rand::Rng;
use plumb_core::tch::{Device, Kind};

const PAD: i64 = 0;
const CLS: i64 = 1;
const SEP: i64 = 2;
const MASK: i64 = 3;
const VOCAB: usize = 1000;

fn specials() -> SpecialIds {
    SpecialIds { mask_id: MASK, vocab_size: VOCAB, never_mask: vec![PAD, CLS, SEP, MASK] }
}

/// `n` rows of `len` tokens: CLS, ordinary tokens (ids 4..VOCAB), SEP, and in every
/// fourth row the last 16 tokens are PAD.
fn bert_rows(n: usize, len: usize, seed: u64) -> Vec<Vec<i64>> {
    let mut rng = seeded_rng(seed);
    (0..n)
        .map(|r| {
            let mut row: Vec<i64> = (0..len).map(|_| 4 + rng.random_range(0..VOCAB as u64 - 4) as i64).collect();
            row[0] = CLS;
            row[len - 1] = SEP;
            if r % 4 == 0 {
                row[len - 16..].fill(PAD);
            }
            row
        })
        .collect()
}

#[test]
fn masking_selects_15_percent_and_splits_them_80_10_10() {
    let rows = bert_rows(2000, 128, 1);
    let mut rng = seeded_rng(2);
    let (mut maskable, mut selected, mut masked, mut random, mut kept) = (0usize, 0usize, 0usize, 0usize, 0usize);
    for row in &rows {
        let example = mask_tokens(row, &MlmConfig::default(), &specials(), &mut rng).unwrap();
        assert_eq!((example.input_ids.len(), example.labels.len()), (row.len(), row.len()));
        for ((&original, &input), &label) in row.iter().zip(&example.input_ids).zip(&example.labels) {
            let special = specials().never_mask.contains(&original);
            maskable += usize::from(!special);
            if label == IGNORE_INDEX {
                // Not selected: the input is the original token.
                assert_eq!(input, original);
                continue;
            }
            assert!(!special, "special token {original} was selected");
            assert_eq!(label, original, "the label of a selected position is its original token");
            selected += 1;
            if input == MASK {
                masked += 1;
            } else if input == original {
                kept += 1; // (a random draw of the same id, p = 1/1000, counts here)
            } else {
                random += 1;
                assert!((0..VOCAB as i64).contains(&input));
            }
        }
    }
    let fraction = selected as f64 / maskable as f64;
    assert!((fraction - 0.15).abs() < 0.01, "selected {fraction}");
    let share = |n: usize| n as f64 / selected as f64;
    assert!((share(masked) - 0.8).abs() < 0.02, "masked {}", share(masked));
    assert!((share(random) - 0.1).abs() < 0.02, "random {}", share(random));
    assert!((share(kept) - 0.1).abs() < 0.02, "kept {}", share(kept));
}

#[test]
fn other_fractions_are_honoured() {
    // The same checks must move with the settings: a swapped or hard-coded split fails here.
    let config = MlmConfig { probability: 0.4, mask_fraction: 0.5, random_fraction: 0.3 };
    let rows = bert_rows(500, 128, 3);
    let mut rng = seeded_rng(4);
    let (mut maskable, mut selected, mut masked, mut kept) = (0usize, 0usize, 0usize, 0usize);
    for row in &rows {
        let example = mask_tokens(row, &config, &specials(), &mut rng).unwrap();
        for ((&original, &input), &label) in row.iter().zip(&example.input_ids).zip(&example.labels) {
            maskable += usize::from(!specials().never_mask.contains(&original));
            if label != IGNORE_INDEX {
                selected += 1;
                masked += usize::from(input == MASK);
                kept += usize::from(input == original);
            }
        }
    }
    assert!((selected as f64 / maskable as f64 - 0.4).abs() < 0.01);
    assert!((masked as f64 / selected as f64 - 0.5).abs() < 0.02);
    assert!((kept as f64 / selected as f64 - config.kept_fraction()).abs() < 0.02);
}

#[test]
fn specials_are_never_selected_even_at_probability_one() {
    let config = MlmConfig { probability: 1.0, ..MlmConfig::default() };
    let row = vec![CLS, 10, PAD, 11, SEP, MASK, 12];
    let example = mask_tokens(&row, &config, &specials(), &mut seeded_rng(0)).unwrap();
    assert_eq!(example.labels, vec![IGNORE_INDEX, 10, IGNORE_INDEX, 11, IGNORE_INDEX, IGNORE_INDEX, 12]);
    for i in [0, 2, 4, 5] {
        assert_eq!(example.input_ids[i], row[i]);
    }
}

#[test]
fn masking_is_deterministic_per_seed() {
    let rows = bert_rows(4, 64, 5);
    let run = |seed| {
        let mut rng = seeded_rng(seed);
        rows.iter().map(|r| mask_tokens(r, &MlmConfig::default(), &specials(), &mut rng).unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
}

#[test]
fn mlm_batch_is_the_rows_masked_in_order() {
    let rows = bert_rows(3, 32, 6);
    let (inputs, labels) =
        mlm_batch(&rows, &MlmConfig::default(), &specials(), &mut seeded_rng(9), Device::Cpu).unwrap();
    assert_eq!((inputs.size(), labels.size()), (vec![3, 32], vec![3, 32]));
    assert_eq!((inputs.kind(), labels.kind()), (Kind::Int64, Kind::Int64));
    let mut rng = seeded_rng(9);
    for (b, row) in rows.iter().enumerate() {
        let example = mask_tokens(row, &MlmConfig::default(), &specials(), &mut rng).unwrap();
        assert_eq!(Vec::<i64>::try_from(inputs.get(b as i64)).unwrap(), example.input_ids);
        assert_eq!(Vec::<i64>::try_from(labels.get(b as i64)).unwrap(), example.labels);
    }
    let ragged = vec![vec![5, 6], vec![7]];
    let message = mlm_batch(&ragged, &MlmConfig::default(), &specials(), &mut seeded_rng(0), Device::Cpu).unwrap_err();
    assert_eq!(message.to_string(), "batch rows differ in length: row 0 has 2 tokens, row 1 has 1");
}

// ---------------------------------------------------------------------------------------
// Span corruption
// ---------------------------------------------------------------------------------------

/// T5's vocabulary layout in miniature: text ids 0..1000, EOS = 1, 100 sentinels
/// descending from 1099 (`<extra_id_0>`) to 1000.
fn t5_sentinels(eos: Option<i64>) -> Sentinels {
    Sentinels::descending(1099, 100, eos)
}

fn text(len: usize, rng: &mut SeededRng) -> Vec<i64> {
    (0..len).map(|_| rng.random_range(0..1000) as i64).collect()
}

/// round(len * 0.15), half to even, clamped to [1, len - 1]: T5's count, written out again.
fn expected_noise(len: usize) -> usize {
    let x = len as f64 * 0.15;
    let floor = x.floor();
    let rounded = if x - floor == 0.5 {
        if floor % 2.0 == 0.0 {
            floor
        } else {
            floor + 1.0
        }
    } else {
        x.round()
    };
    (rounded as usize).clamp(1, len - 1)
}

#[test]
fn noise_is_exactly_the_rounded_density_in_disjoint_spans() {
    let config = SpanConfig::default();
    let mut rng = seeded_rng(11);
    for i in 0..3000 {
        let len = 2 + i % 600;
        let spans = random_spans(len, &config, &mut rng).unwrap();
        let noise: usize = spans.iter().map(|s| s.len()).sum();
        assert_eq!(noise, expected_noise(len), "length {len}");
        let lengths = span_lengths(len, &config, false).unwrap();
        assert_eq!((lengths.noise_tokens, lengths.noise_spans), (noise, spans.len()));
        // Kept tokens come first, noise last; spans are non-empty, sorted, and separated by kept tokens.
        assert!(spans[0].start >= 1, "{spans:?}");
        assert_eq!(spans.last().unwrap().end, len);
        for span in &spans {
            assert!(!span.is_empty());
        }
        for pair in spans.windows(2) {
            assert!(pair[0].end < pair[1].start, "spans touch or overlap: {spans:?}");
        }
    }
}

#[test]
fn mean_span_length_is_three() {
    let config = SpanConfig::default();
    let mut rng = seeded_rng(12);
    let (mut noise, mut spans) = (0usize, 0usize);
    for _ in 0..2000 {
        let len = 64 + rng.random_range(0..449) as usize;
        let s = random_spans(len, &config, &mut rng).unwrap();
        noise += s.iter().map(|s| s.len()).sum::<usize>();
        spans += s.len();
    }
    let mean = noise as f64 / spans as f64;
    assert!((mean - 3.0).abs() < 0.2, "mean span length {mean}");
}

/// n choose k, as f64.
fn choose(n: usize, k: usize) -> f64 {
    (0..k).map(|i| (n - i) as f64 / (i + 1) as f64).product()
}

#[test]
fn span_lengths_are_a_uniform_split() {
    // 128 tokens: 19 noise in 6 spans, 109 kept in 6 runs. Under a uniform split of n items
    // into k non-empty parts, a part has length j with chance C(n-1-j, k-2) / C(n-1, k-1).
    let mut rng = seeded_rng(13);
    let (rows, len) = (2000, 128);
    let mut noise_hist = [0usize; 20];
    let mut first_kept_hist = [0usize; 110];
    for _ in 0..rows {
        let spans = random_spans(len, &SpanConfig::default(), &mut rng).unwrap();
        assert_eq!(spans.len(), 6);
        for span in &spans {
            noise_hist[span.len()] += 1;
        }
        first_kept_hist[spans[0].start] += 1;
    }
    let p = |n: usize, k: usize, j: usize| choose(n - 1 - j, k - 2) / choose(n - 1, k - 1);
    for (j, &count) in noise_hist.iter().enumerate().take(7).skip(1) {
        let seen = count as f64 / (rows * 6) as f64;
        assert!((seen - p(19, 6, j)).abs() < 0.02, "noise span length {j}: {seen} vs {}", p(19, 6, j));
    }
    // The kept runs split 109 tokens the same way: the first (where the first span starts)
    // averages 109 / 6 and is short more often than long.
    for j in [1, 10, 20, 40] {
        let seen = first_kept_hist[j] as f64 / rows as f64;
        assert!((seen - p(109, 6, j)).abs() < 0.02, "kept run length {j}: {seen} vs {}", p(109, 6, j));
    }
    let mean = first_kept_hist.iter().enumerate().map(|(j, &n)| j * n).sum::<usize>() as f64 / rows as f64;
    assert!((mean - 109.0 / 6.0).abs() < 1.5, "first kept run {mean}");
}

#[test]
fn corruption_layout_lengths_and_sentinels() {
    let config = SpanConfig::default();
    let mut rng = seeded_rng(14);
    for eos in [Some(1), None] {
        let sentinels = t5_sentinels(eos);
        for i in 0..1000 {
            let len = 2 + (i * 7) % 500;
            let tokens = text(len, &mut rng);
            let example = corrupt_spans(&tokens, &config, &sentinels, &mut rng).unwrap();
            let lengths = span_lengths(len, &config, eos.is_some()).unwrap();
            assert_eq!((example.inputs.len(), example.targets.len()), (lengths.inputs, lengths.targets));
            let used = &sentinels.ids[..example.noise_spans.len()];
            let in_order = |sequence: &[i64]| sequence.iter().copied().filter(|t| t >= &1000).collect::<Vec<_>>();
            assert_eq!(in_order(&example.inputs), used, "every sentinel once in the inputs, in order");
            assert_eq!(in_order(&example.targets), used, "every sentinel once in the targets, in order");
            assert_eq!(example.targets[0], sentinels.ids[0]);
            if let Some(eos) = eos {
                assert_eq!((example.inputs.last(), example.targets.last()), (Some(&eos), Some(&eos)));
            }
            // Each sentinel in the targets is followed by exactly the tokens of its span.
            let mut at = 0;
            for (span, &sentinel) in example.noise_spans.iter().zip(used) {
                assert_eq!(example.targets[at], sentinel);
                assert_eq!(&example.targets[at + 1..at + 1 + span.len()], &tokens[span.clone()]);
                at += 1 + span.len();
            }
        }
    }
}

#[test]
fn reconstruction_is_exact() {
    let config = SpanConfig::default();
    let mut rng = seeded_rng(15);
    for eos in [Some(1), None] {
        let sentinels = t5_sentinels(eos);
        for _ in 0..3000 {
            let len = 2 + rng.random_range(0..599) as usize;
            let tokens = text(len, &mut rng); // includes id 1, the EOS, inside rows
            let example = corrupt_spans(&tokens, &config, &sentinels, &mut rng).unwrap();
            assert_eq!(reconstruct(&example.inputs, &example.targets, &sentinels).unwrap(), tokens);
        }
    }
    // Other settings too: dense noise in short spans, sparse noise in long ones.
    for config in [
        SpanConfig { noise_density: 0.5, mean_span_length: 1.0 },
        SpanConfig { noise_density: 0.05, mean_span_length: 8.0 },
    ] {
        let sentinels = Sentinels::descending(1999, 1000, Some(1));
        for _ in 0..500 {
            let tokens = text(2 + rng.random_range(0..300) as usize, &mut rng);
            let example = corrupt_spans(&tokens, &config, &sentinels, &mut rng).unwrap();
            assert_eq!(reconstruct(&example.inputs, &example.targets, &sentinels).unwrap(), tokens);
        }
    }
}

#[test]
fn corruption_is_deterministic_per_seed() {
    let tokens = text(256, &mut seeded_rng(16));
    let run = |seed| corrupt_spans(&tokens, &SpanConfig::default(), &t5_sentinels(Some(1)), &mut seeded_rng(seed));
    assert_eq!(run(3).unwrap(), run(3).unwrap());
    assert_ne!(run(3).unwrap(), run(4).unwrap());
}

#[test]
fn too_few_sentinels_and_too_short_rows_are_errors() {
    let tokens = text(128, &mut seeded_rng(17)); // 19 noise tokens in 6 spans
    let sentinels = Sentinels::descending(1099, 5, Some(1));
    let error = corrupt_spans(&tokens, &SpanConfig::default(), &sentinels, &mut seeded_rng(0)).unwrap_err();
    assert_eq!(
        error.to_string(),
        "span corruption of a row of 128 tokens makes 6 noise spans, but only 5 sentinels are given"
    );
    let sentinels = Sentinels::descending(1099, 6, Some(1));
    assert!(corrupt_spans(&tokens, &SpanConfig::default(), &sentinels, &mut seeded_rng(0)).is_ok());
    for len in [0, 1] {
        let error = corrupt_spans(&tokens[..len], &SpanConfig::default(), &sentinels, &mut seeded_rng(0)).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("span corruption needs at least 2 tokens (one noise, one kept); the row has {len}")
        );
    }
    let bad = SpanConfig { noise_density: 0.0, ..SpanConfig::default() };
    let error = corrupt_spans(&tokens, &bad, &sentinels, &mut seeded_rng(0)).unwrap_err();
    assert!(error.to_string().starts_with("noise_density: "), "{error}");
}

#[test]
fn raw_lengths_fill_the_inputs() {
    // Packing rows to the raw length T5's helper gives makes inputs of at most the target length,
    // and one more raw token would not fit.
    let config = SpanConfig::default();
    for inputs in [16, 64, 100, 128, 512, 1024] {
        let lengths = raw_length_for_inputs(inputs, &config, true).unwrap();
        assert!(lengths.inputs <= inputs);
        assert!(span_lengths(lengths.raw + 1, &config, true).unwrap().inputs > inputs);
        let example =
            corrupt_spans(&text(lengths.raw, &mut seeded_rng(1)), &config, &t5_sentinels(Some(1)), &mut seeded_rng(2))
                .unwrap();
        assert_eq!((example.inputs.len(), example.targets.len()), (lengths.inputs, lengths.targets));
    }
}

#[test]
fn span_batch_pads_inputs_and_labels() {
    let sentinels = t5_sentinels(Some(1));
    let mut rng = seeded_rng(18);
    let rows = vec![text(40, &mut rng), text(100, &mut rng), text(20, &mut rng)];
    let batch = span_batch(&rows, &SpanConfig::default(), &sentinels, PAD, &mut seeded_rng(5), Device::Cpu).unwrap();
    let mut rng = seeded_rng(5);
    let examples: Vec<_> =
        rows.iter().map(|r| corrupt_spans(r, &SpanConfig::default(), &sentinels, &mut rng).unwrap()).collect();
    let s = examples.iter().map(|e| e.inputs.len()).max().unwrap();
    let l = examples.iter().map(|e| e.targets.len()).max().unwrap();
    assert_eq!(
        (batch.inputs.size(), batch.attention_mask.size(), batch.labels.size()),
        (vec![3, s as i64], vec![3, s as i64], vec![3, l as i64])
    );
    for (b, example) in examples.iter().enumerate() {
        let inputs = Vec::<i64>::try_from(batch.inputs.get(b as i64)).unwrap();
        let mask = Vec::<i64>::try_from(batch.attention_mask.get(b as i64)).unwrap();
        let labels = Vec::<i64>::try_from(batch.labels.get(b as i64)).unwrap();
        let n = example.inputs.len();
        assert_eq!(&inputs[..n], &example.inputs[..]);
        assert!(inputs[n..].iter().all(|&t| t == PAD));
        assert_eq!(mask.iter().sum::<i64>(), n as i64);
        assert!(mask[..n].iter().all(|&m| m == 1));
        assert_eq!(&labels[..example.targets.len()], &example.targets[..]);
        assert!(labels[example.targets.len()..].iter().all(|&t| t == IGNORE_INDEX));
    }
}
