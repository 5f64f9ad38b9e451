//! Token sequences into padded batches for a scalar-head model, and a loaded reward model
//! that scores text: what the reward-model stage evaluates with and the learned reward
//! scores with, written once.
use std::path::Path;

use plumb_core::model::scalar_head::ScalarHeadModel;
use plumb_core::tch::{self, Device, Kind, Tensor};
use plumb_core::tokenizer::Tokenizer;
use plumb_core::Result;

use crate::preference::Sequence;

/// `rows` right-padded with `pad_id` to the longest: ids (N, T) and attention mask (N, T),
/// 1 for tokens, 0 for padding, on `device`.
pub fn collate(rows: &[&[i64]], pad_id: i64, device: Device) -> (Tensor, Tensor) {
    let width = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let (mut ids, mut mask) = (vec![pad_id; rows.len() * width], vec![0i64; rows.len() * width]);
    for (i, row) in rows.iter().enumerate() {
        ids[i * width..i * width + row.len()].copy_from_slice(row);
        mask[i * width..i * width + row.len()].fill(1);
    }
    let shape = [rows.len() as i64, width as i64];
    let tensor = |v: &[i64]| Tensor::from_slice(v).view(shape).to_device(device);
    (tensor(&ids), tensor(&mask))
}

/// The id a reward model pads with: its config's `pad_token_id` (what transformers
/// reads), else the tokenizer's pad (or EOS) id, else 0 (padding is masked, so any valid
/// id does).
pub fn pad_id(model_dir: &Path, tokenizer: &Tokenizer) -> Result<i64> {
    let from_config =
        if model_dir.join("config.json").is_file() { ScalarHeadModel::pad_token_id_in(model_dir)? } else { None };
    Ok(from_config.or(tokenizer.pad_id()).or(tokenizer.eos_id()).unwrap_or(0))
}

/// Keeps the last `max_length` tokens of `ids` (the response's end, where the score is
/// read) and says whether it cut anything.
pub fn keep_end(ids: &mut Vec<i64>, max_length: usize) -> bool {
    if ids.len() <= max_length {
        return false;
    }
    ids.drain(..ids.len() - max_length);
    true
}

/// A saved scalar-head model with its own tokenizer, scoring text.
pub struct TextScorer {
    pub model: ScalarHeadModel,
    pub tokenizer: Tokenizer,
    pub pad_id: i64,
    pub device: Device,
}

impl TextScorer {
    /// The model saved in `dir` (its `config.json`, weights and `tokenizer.json`) on `device`.
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let tokenizer = Tokenizer::from_dir(dir)?;
        let model = ScalarHeadModel::from_dir(dir, device, Kind::Float)?;
        tokenizer.check_fits_embedding(model.vocab_size(), dir)?;
        let pad_id = pad_id(dir, &tokenizer)?;
        Ok(Self { model, tokenizer, pad_id, device })
    }

    /// One score per sequence, in batches of `batch_size`, without gradients; sequences
    /// keep their last `max_length` tokens.
    pub fn score(&self, sequences: &[Sequence], batch_size: usize, max_length: usize) -> Result<Vec<f64>> {
        let template = self.tokenizer.chat_template();
        let rows = sequences
            .iter()
            .map(|s| {
                let mut ids = s.tokenize(&self.tokenizer, template, self.pad_id)?;
                keep_end(&mut ids, max_length);
                Ok(ids)
            })
            .collect::<Result<Vec<_>>>()?;
        let _no_grad = tch::no_grad_guard();
        let mut scores = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(batch_size.max(1)) {
            let slices: Vec<&[i64]> = chunk.iter().map(Vec::as_slice).collect();
            let (ids, mask) = collate(&slices, self.pad_id, self.device);
            let batch = self.model.scores(&ids, &mask)?; // (N,)
            scores.extend(Vec::<f64>::try_from(batch.to_kind(Kind::Double).to_device(Device::Cpu))?);
        }
        Ok(scores)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_right_padded_and_masked() {
        let (ids, mask) = collate(&[&[5, 6, 7], &[8]], 0, Device::Cpu);
        assert_eq!(Vec::<Vec<i64>>::try_from(&ids).unwrap(), [[5, 6, 7], [8, 0, 0]]);
        assert_eq!(Vec::<Vec<i64>>::try_from(&mask).unwrap(), [[1, 1, 1], [1, 0, 0]]);
    }

    #[test]
    fn truncation_keeps_the_end() {
        let mut ids = vec![1, 2, 3, 4, 5];
        assert!(keep_end(&mut ids, 3));
        assert_eq!(ids, [3, 4, 5]);
        assert!(!keep_end(&mut ids, 3));
    }
}
