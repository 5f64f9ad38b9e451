//! Examples into batches without padding dominating: either bucketed by length (a batch
//! holds examples of similar length, padded to its longest) or packed (several examples
//! share a row, each seeing only itself: segment ids in the attention mask, positions
//! restarting at 0).
//!
//! A [`Plan`] fixes, once, which examples share a row and which rows share a batch; the
//! order of batches is then shuffled every epoch from the seed.
use plumb_core::data::seeded_rng;
use plumb_core::rand::seq::SliceRandom;
use plumb_core::tch::{Device, Tensor};
use serde::Deserialize;

use crate::template::Example;

/// The target of tokens that carry no loss (`cross_entropy`'s `ignore_index`).
pub use plumb_core::data::objectives::IGNORE_INDEX as IGNORE;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Batching {
    /// `batch_size` examples of similar length per batch.
    #[default]
    Bucket,
    /// Examples packed into rows of `max_length` tokens; `batch_size` rows per batch.
    Pack,
}

/// Rows (lists of example indices) and batches (lists of row indices).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub rows: Vec<Vec<usize>>,
    pub batches: Vec<Vec<usize>>,
}

impl Plan {
    pub fn new(examples: &[Example], batching: Batching, batch_size: usize, max_length: usize, seed: u64) -> Self {
        let mut order: Vec<usize> = (0..examples.len()).collect();
        order.shuffle(&mut seeded_rng(seed));
        let rows: Vec<Vec<usize>> = match batching {
            Batching::Bucket => {
                // Shuffled first, so examples of equal length are grouped at random.
                order.sort_by_key(|&i| examples[i].len());
                order.into_iter().map(|i| vec![i]).collect()
            }
            Batching::Pack => {
                let mut rows: Vec<Vec<usize>> = Vec::new();
                let mut used = usize::MAX;
                for i in order {
                    let len = examples[i].len();
                    if used.saturating_add(len) > max_length {
                        rows.push(Vec::new());
                        used = 0;
                    }
                    rows.last_mut().expect("pushed above").push(i);
                    used += len;
                }
                rows
            }
        };
        let row_ids: Vec<usize> = (0..rows.len()).collect();
        let batches = row_ids.chunks(batch_size.max(1)).map(<[usize]>::to_vec).collect();
        Self { rows, batches }
    }

    /// Tokens in all rows, and the tokens of the padded batches: their ratio is the
    /// fraction of compute spent on real tokens.
    pub fn efficiency(&self, examples: &[Example]) -> f64 {
        let row_len = |r: &Vec<usize>| r.iter().map(|&i| examples[i].len()).sum::<usize>();
        let real: usize = self.rows.iter().map(row_len).sum();
        let padded: usize =
            self.batches.iter().map(|b| b.len() * b.iter().map(|&r| row_len(&self.rows[r])).max().unwrap_or(0)).sum();
        real as f64 / padded.max(1) as f64
    }
}

/// One forward pass's tensors.
pub struct Batch {
    pub input_ids: Tensor,
    /// The next token each position predicts, or [`IGNORE`]: (B, T).
    pub targets: Tensor,
    pub positions: Tensor,
    /// Segment ids (0 = padding); `None` when every row is one full example.
    pub attention_mask: Option<Tensor>,
    /// Targets that are not [`IGNORE`].
    pub target_count: usize,
}

/// The rows `rows` of `examples` as tensors on `device`, right-padded to the longest.
pub fn collate(examples: &[Example], rows: &[&[usize]], device: Device) -> Batch {
    let width = rows.iter().map(|r| r.iter().map(|&i| examples[i].len()).sum::<usize>()).max().unwrap_or(0);
    let n = rows.len() * width;
    let (mut ids, mut targets, mut positions, mut segments) =
        (vec![0i64; n], vec![IGNORE; n], vec![0i64; n], vec![0i64; n]);
    let mut target_count = 0;
    let mut simple = true;
    for (r, row) in rows.iter().enumerate() {
        let mut at = r * width;
        simple &= row.len() == 1;
        for (s, &i) in row.iter().enumerate() {
            let e = &examples[i];
            for j in 0..e.len() {
                ids[at + j] = e.ids[j];
                positions[at + j] = j as i64;
                segments[at + j] = s as i64 + 1;
                if j + 1 < e.len() && e.trained[j + 1] {
                    targets[at + j] = e.ids[j + 1];
                    target_count += 1;
                }
            }
            at += e.len();
        }
        simple &= at == (r + 1) * width;
    }
    let shape = [rows.len() as i64, width as i64];
    let tensor = |v: &[i64]| Tensor::from_slice(v).view(shape).to_device(device);
    Batch {
        input_ids: tensor(&ids),
        targets: tensor(&targets),
        positions: tensor(&positions),
        attention_mask: (!simple).then(|| tensor(&segments)),
        target_count,
    }
}

/// Targets in the rows `rows`, without building tensors.
pub fn count_targets(examples: &[Example], rows: &[&[usize]]) -> usize {
    rows.iter().flat_map(|r| r.iter()).map(|&i| examples[i].targets()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: &[i64], trained: &[bool]) -> Example {
        Example { ids: ids.to_vec(), trained: trained.to_vec() }
    }

    #[test]
    fn targets_are_shifted_and_stay_inside_their_example() {
        let examples = [
            ex(&[1, 2, 3], &[false, false, true]),
            ex(&[4, 5], &[false, true]),
            ex(&[6, 7, 8, 9], &[false, true, true, true]),
        ];
        let b = collate(&examples, &[&[0, 1], &[2]], Device::Cpu);
        let rows = |t: &Tensor| Vec::<Vec<i64>>::try_from(t).unwrap();
        assert_eq!(rows(&b.input_ids), [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]);
        assert_eq!(rows(&b.targets), [[IGNORE, 3, IGNORE, 5, IGNORE], [7, 8, 9, IGNORE, IGNORE]]);
        assert_eq!(rows(&b.positions), [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]);
        assert_eq!(rows(b.attention_mask.as_ref().unwrap()), [[1, 1, 1, 2, 2], [1, 1, 1, 1, 0]]);
        assert_eq!(b.target_count, 5);
        assert_eq!(count_targets(&examples, &[&[0, 1], &[2]]), 5);
    }

    #[test]
    fn full_single_example_rows_need_no_mask() {
        let examples = [ex(&[1, 2], &[false, true]), ex(&[3, 4], &[false, true])];
        assert!(collate(&examples, &[&[0], &[1]], Device::Cpu).attention_mask.is_none());
    }

    #[test]
    fn packing_fills_rows_and_bucketing_groups_lengths() {
        let lengths = [5, 1, 4, 2, 3, 5, 1, 3];
        let examples: Vec<Example> = lengths.iter().map(|&n| ex(&vec![1; n], &vec![false; n])).collect();
        let packed = Plan::new(&examples, Batching::Pack, 2, 6, 3);
        let mut seen: Vec<usize> = packed.rows.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..8).collect::<Vec<_>>(), "every example in exactly one row");
        for row in &packed.rows {
            assert!(row.iter().map(|&i| lengths[i]).sum::<usize>() <= 6);
        }
        assert!(packed.rows.len() < 8);
        let bucketed = Plan::new(&examples, Batching::Bucket, 2, 6, 3);
        let batch_lengths: Vec<Vec<usize>> =
            bucketed.batches.iter().map(|b| b.iter().map(|&r| lengths[bucketed.rows[r][0]]).collect()).collect();
        assert_eq!(batch_lengths, [[1, 1], [2, 3], [3, 4], [5, 5]]);
        assert!(bucketed.efficiency(&examples) > 0.85);
    }
}
