//! Data: text corpora, train/validation splits, packing into fixed-length sequences,
//! and a seeded batch order.
pub mod curation;
pub mod jsonl;
pub mod objectives;
pub mod stream;
pub mod template;

use std::path::Path;

use rand::seq::SliceRandom;
use tch::{Kind, Tensor};

use crate::error::{Error, IoResultExt, Result};

/// Reads a text corpus: documents separated by one or more blank lines.
pub fn read_documents(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).at(path)?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let offset = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..offset].iter().filter(|&&b| b == b'\n').count() + 1;
        Error::file(path, format!("line {line}: not valid UTF-8 text"))
    })?;
    let mut documents = Vec::new();
    let mut current = String::new();
    for line in text.strip_prefix('\u{FEFF}').unwrap_or(&text).lines() {
        if line.trim().is_empty() {
            if !current.is_empty() {
                documents.push(std::mem::take(&mut current));
            }
        } else {
            if !current.is_empty() {
                current.push('\n');
            }
            current.push_str(line);
        }
    }
    if !current.is_empty() {
        documents.push(current);
    }
    if documents.is_empty() {
        return Err(Error::file(path, "the corpus has no documents (it is empty or only blank lines)"));
    }
    Ok(documents)
}

/// The generator behind every host-side random choice: shuffles, masking and span
/// draws, the stream's mixture and shuffle buffer, MinHash permutations, sampling draws.
/// ChaCha8 from the `rand` family: the same stream on every machine, and serializable, so
/// a checkpoint keeps a generator's exact state and a resumed run draws what the
/// uninterrupted one would have.
pub type SeededRng = rand_chacha::ChaCha8Rng;

/// A [`SeededRng`] seeded with `seed`.
pub fn seeded_rng(seed: u64) -> SeededRng {
    rand::SeedableRng::seed_from_u64(seed)
}

/// Splits documents (or examples) into (train, validation), holding out `fraction` of
/// them (at least one each side), chosen by a seeded shuffle.
pub fn split_documents<T>(mut documents: Vec<T>, fraction: f64, seed: u64) -> Result<(Vec<T>, Vec<T>)> {
    if documents.len() < 2 {
        return Err(Error::Other("a train/validation split needs at least two documents".into()));
    }
    documents.shuffle(&mut seeded_rng(seed));
    let held_out = ((documents.len() as f64 * fraction).round() as usize).clamp(1, documents.len() - 1);
    let validation = documents.split_off(documents.len() - held_out);
    Ok((documents, validation))
}

/// Concatenates tokenized documents with `eos` after each and cuts the stream into
/// rows of `seq_len + 1` tokens (inputs and shifted targets share a row); the tail
/// shorter than a row is dropped. Returns (N, seq_len + 1) int64.
pub fn pack(documents: &[Vec<i64>], eos: i64, seq_len: usize) -> Result<Tensor> {
    let row = seq_len + 1;
    let mut stream: Vec<i64> = Vec::with_capacity(documents.iter().map(|d| d.len() + 1).sum());
    for doc in documents {
        stream.extend_from_slice(doc);
        stream.push(eos);
    }
    let rows = stream.len() / row;
    if rows == 0 {
        return Err(Error::Other(format!(
            "the data has {} tokens, fewer than one sequence of {row}; lower seq_len or add data",
            stream.len()
        )));
    }
    stream.truncate(rows * row);
    Ok(Tensor::from_slice(&stream).view([rows as i64, row as i64]))
}

/// Entropy in nats of the unigram (token frequency) distribution of `documents`: the
/// loss a model that ignores context entirely would reach.
pub fn unigram_entropy(documents: &[Vec<i64>], vocab_size: usize) -> f64 {
    let mut counts = vec![0u64; vocab_size];
    let mut total = 0u64;
    for &id in documents.iter().flatten() {
        if let Some(c) = usize::try_from(id).ok().and_then(|i| counts.get_mut(i)) {
            *c += 1;
            total += 1;
        }
    }
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.ln()
        })
        .sum()
}

/// Draws batches of rows from packed data in a seeded order: each epoch is a fresh
/// permutation of all rows.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BatchOrder {
    rng: SeededRng,
    rows: usize,
    order: Vec<usize>,
    cursor: usize,
}

impl BatchOrder {
    pub fn new(rows: usize, seed: u64) -> Self {
        Self { rng: seeded_rng(seed), rows, order: Vec::new(), cursor: 0 }
    }

    /// Indices of the next `batch_size` rows.
    pub fn next_batch(&mut self, batch_size: usize) -> Vec<i64> {
        (0..batch_size)
            .map(|_| {
                if self.cursor >= self.order.len() {
                    self.order = (0..self.rows).collect();
                    self.order.shuffle(&mut self.rng);
                    self.cursor = 0;
                }
                self.cursor += 1;
                self.order[self.cursor - 1] as i64
            })
            .collect()
    }
}

/// Rows `indices` of `data` (on any device) as (inputs, targets), each (B, seq_len), on
/// `device`.
pub fn causal_batch(data: &Tensor, indices: &[i64], device: tch::Device) -> (Tensor, Tensor) {
    let rows = data.index_select(0, &Tensor::from_slice(indices).to_device(data.device())).to_device(device);
    let len = rows.size()[1] - 1;
    (rows.narrow(1, 0, len), rows.narrow(1, 1, len).to_kind(Kind::Int64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_separated_by_blank_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.txt");
        std::fs::write(&path, "a b\nc\n\n\n d \n\ne").unwrap();
        assert_eq!(read_documents(&path).unwrap(), vec!["a b\nc", " d ", "e"]);
    }

    #[test]
    fn invalid_utf8_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.txt");
        std::fs::write(&path, b"ok\nok\n\xff\n").unwrap();
        let message = read_documents(&path).unwrap_err().to_string();
        assert!(message.ends_with("c.txt: line 3: not valid UTF-8 text"), "{message}");
    }

    #[test]
    fn packing_puts_eos_between_documents_and_drops_the_tail() {
        let packed = pack(&[vec![1, 2, 3], vec![4, 5]], 0, 3).unwrap();
        assert_eq!(packed.size(), vec![1, 4]);
        assert_eq!(Vec::<i64>::try_from(packed.view([-1])).unwrap(), vec![1, 2, 3, 0]);
        let packed = pack(&[vec![1, 2, 3], vec![4, 5, 6]], 0, 1).unwrap();
        assert_eq!(Vec::<i64>::try_from(packed.view([-1])).unwrap(), vec![1, 2, 3, 0, 4, 5, 6, 0]);
    }

    #[test]
    fn unigram_entropy_of_a_uniform_stream_is_ln_n() {
        let h = unigram_entropy(&[vec![0, 1, 2, 3]], 4);
        assert!((h - 4f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn batch_order_visits_every_row_once_per_epoch_and_is_seeded() {
        let mut a = BatchOrder::new(10, 7);
        let mut epoch: Vec<i64> = a.next_batch(10);
        epoch.sort();
        assert_eq!(epoch, (0..10).collect::<Vec<_>>());
        let mut b = BatchOrder::new(10, 7);
        b.next_batch(10);
        assert_eq!(a.next_batch(4), b.next_batch(4));
        assert_ne!(BatchOrder::new(10, 8).next_batch(10), BatchOrder::new(10, 7).next_batch(10));
    }

    #[test]
    fn split_holds_out_at_least_one_document() {
        let docs: Vec<String> = (0..10).map(|i| i.to_string()).collect();
        let (train, val) = split_documents(docs, 0.01, 1).unwrap();
        assert_eq!((train.len(), val.len()), (9, 1));
    }
}
