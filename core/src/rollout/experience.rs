//! [`Experience`]: a batch of episodes (prompt, sampled response and everything PPO-style
//! training needs about each token), as tensors that split into shuffled minibatches and
//! concatenate back.
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// A batch of B episodes. Prompts are left-padded to P positions and responses
/// right-padded to R, so every row's response starts at position P; per-token tensors
/// are (B, R) and are 0 past each response's end.
#[derive(Debug)]
pub struct Experience {
    /// Prompt then response token ids (B, P + R); padding holds any valid id.
    pub sequences: Tensor,
    /// (B, P + R): 1 on prompt and response tokens, 0 on padding.
    pub attention_mask: Tensor,
    /// P: the prompt positions (the same for every row).
    pub prompt_len: i64,
    /// (B, R) float: 1.0 on response tokens (the stop token included), 0.0 past the end.
    pub response_mask: Tensor,
    /// (B, R): log-probs of the response tokens under the policy that sampled them.
    pub log_probs: Tensor,
    /// (B, R): log-probs under the frozen reference policy.
    pub ref_log_probs: Tensor,
    /// (B, R): the value model's estimate before each response token.
    pub values: Tensor,
    /// (B): each episode's score (the rewards' weighted total, penalties included).
    pub scores: Tensor,
    /// (B, R): per-token rewards (KL penalty, plus the score at the last token).
    pub rewards: Tensor,
    /// (B, R)
    pub advantages: Tensor,
    /// (B, R)
    pub returns: Tensor,
}

impl Experience {
    /// Episodes in the batch.
    pub fn len(&self) -> i64 {
        self.sequences.size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// R: the response positions.
    pub fn response_len(&self) -> i64 {
        self.sequences.size()[1] - self.prompt_len
    }

    /// The response token ids (B, R).
    pub fn responses(&self) -> Tensor {
        self.sequences.narrow(1, self.prompt_len, self.response_len())
    }

    /// The per-row tensors, in field order (for operations that treat them alike).
    fn rows(&self) -> [&Tensor; 10] {
        [
            &self.sequences,
            &self.attention_mask,
            &self.response_mask,
            &self.log_probs,
            &self.ref_log_probs,
            &self.values,
            &self.scores,
            &self.rewards,
            &self.advantages,
            &self.returns,
        ]
    }

    fn from_rows(prompt_len: i64, rows: Vec<Tensor>) -> Self {
        let mut rows = rows.into_iter();
        let mut next = || rows.next().expect("ten tensors, one per field");
        Self {
            sequences: next(),
            attention_mask: next(),
            prompt_len,
            response_mask: next(),
            log_probs: next(),
            ref_log_probs: next(),
            values: next(),
            scores: next(),
            rewards: next(),
            advantages: next(),
            returns: next(),
        }
    }

    /// The same episodes, sharing their tensors.
    pub fn shallow_clone(&self) -> Self {
        Self::from_rows(self.prompt_len, self.rows().iter().map(|t| t.shallow_clone()).collect())
    }

    /// The episodes at `indices` (an Int64 tensor), in that order: a shuffled minibatch.
    pub fn index_select(&self, indices: &Tensor) -> Self {
        let indices = indices.to_device(self.sequences.device());
        Self::from_rows(self.prompt_len, self.rows().iter().map(|t| t.index_select(0, &indices)).collect())
    }

    /// Consecutive minibatches of `size` episodes (the last may be smaller).
    pub fn split(&self, size: i64) -> Vec<Self> {
        let chunks: Vec<Vec<Tensor>> = self.rows().iter().map(|t| t.split(size, 0)).collect();
        (0..chunks[0].len())
            .map(|i| Self::from_rows(self.prompt_len, chunks.iter().map(|c| c[i].shallow_clone()).collect()))
            .collect()
    }

    /// The episodes of `parts` in order, as one batch. Parts with shorter prompts are
    /// padded on the left, shorter responses on the right (mask 0, values 0).
    pub fn cat(parts: &[Self]) -> Result<Self> {
        let Some(first) = parts.first() else {
            return Err(Error::Other("Experience::cat: no parts to concatenate".into()));
        };
        let prompt_len = parts.iter().map(|p| p.prompt_len).max().unwrap_or(first.prompt_len);
        let response_len = parts.iter().map(Self::response_len).max().unwrap_or(0);
        let padded: Vec<Self> = parts.iter().map(|p| p.padded(prompt_len, response_len)).collect();
        let fields = first.rows().len();
        let rows =
            (0..fields).map(|f| Tensor::cat(&padded.iter().map(|p| p.rows()[f]).collect::<Vec<_>>(), 0)).collect();
        Ok(Self::from_rows(prompt_len, rows))
    }

    /// This batch with prompts left-padded to `prompt_len` and responses right-padded to
    /// `response_len` positions.
    fn padded(&self, prompt_len: i64, response_len: i64) -> Self {
        let (left, right) = (prompt_len - self.prompt_len, response_len - self.response_len());
        if left == 0 && right == 0 {
            return Self::from_rows(self.prompt_len, self.rows().iter().map(|t| t.shallow_clone()).collect());
        }
        let pad = |t: &Tensor, left: i64, right: i64| {
            let b = t.size()[0];
            let zeros = |n: i64| Tensor::zeros([b, n], (t.kind(), t.device()));
            Tensor::cat(&[zeros(left), t.shallow_clone(), zeros(right)], 1)
        };
        let rows = self
            .rows()
            .iter()
            .enumerate()
            .map(|(field, t)| match field {
                0 | 1 => pad(t, left, right), // sequences, attention_mask: (B, P + R)
                6 => t.shallow_clone(),       // scores: (B)
                _ => pad(t, 0, right),        // per-token: (B, R)
            })
            .collect();
        Self::from_rows(prompt_len, rows)
    }

    /// Response tokens in the batch (the stop tokens included).
    pub fn response_tokens(&self) -> i64 {
        self.response_mask.sum(Kind::Float).int64_value(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two episodes with P = 2, R = 3; the second response ends after two tokens.
    fn batch(offset: f64) -> Experience {
        let per_token =
            |scale: f64| Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 0.0]).view([2, 3]) * scale + offset;
        Experience {
            sequences: Tensor::from_slice(&[0i64, 7, 8, 9, 10, 5, 6, 11, 12, 0]).view([2, 5]),
            attention_mask: Tensor::from_slice(&[0i64, 1, 1, 1, 1, 1, 1, 1, 1, 0]).view([2, 5]),
            prompt_len: 2,
            response_mask: Tensor::from_slice(&[1.0f32, 1.0, 1.0, 1.0, 1.0, 0.0]).view([2, 3]),
            log_probs: per_token(-1.0),
            ref_log_probs: per_token(-2.0),
            values: per_token(0.5),
            scores: Tensor::from_slice(&[1.0f32, -1.0]) + offset,
            rewards: per_token(0.1),
            advantages: per_token(0.2),
            returns: per_token(0.3),
        }
    }

    fn same(a: &Experience, b: &Experience) -> bool {
        a.prompt_len == b.prompt_len && a.rows().iter().zip(b.rows()).all(|(x, y)| x.equal(y))
    }

    #[test]
    fn split_and_cat_round_trip_and_shuffle_by_rows() {
        let whole = Experience::cat(&[batch(0.0), batch(10.0)]).unwrap();
        assert_eq!((whole.len(), whole.response_len(), whole.response_tokens()), (4, 3, 10));
        let parts = whole.split(3);
        assert_eq!(parts.iter().map(Experience::len).collect::<Vec<_>>(), [3, 1]);
        assert!(same(&Experience::cat(&parts).unwrap(), &whole));
        // A shuffled minibatch holds whole rows: row 3 is batch(10)'s second episode.
        let picked = whole.index_select(&Tensor::from_slice(&[3i64, 0]));
        assert!(same(&picked.index_select(&Tensor::from_slice(&[1i64])), &batch(0.0).split(1)[0]));
        assert!(same(&picked.index_select(&Tensor::from_slice(&[0i64])), &batch(10.0).split(1)[1]));
        assert_eq!(Vec::<i64>::try_from(picked.responses().get(0)).unwrap(), [11, 12, 0]);
    }

    #[test]
    fn cat_pads_shorter_prompts_left_and_shorter_responses_right() {
        let short = batch(0.0).index_select(&Tensor::from_slice(&[0i64]));
        let mut long = batch(1.0).index_select(&Tensor::from_slice(&[0i64]));
        // Widen `long` by one prompt position and one response position.
        long = long.padded(3, 4);
        let joined = Experience::cat(&[short, long]).unwrap();
        assert_eq!((joined.prompt_len, joined.response_len()), (3, 4));
        assert_eq!(Vec::<i64>::try_from(joined.sequences.get(0)).unwrap(), [0, 0, 7, 8, 9, 10, 0]);
        assert_eq!(Vec::<i64>::try_from(joined.attention_mask.get(0)).unwrap(), [0, 0, 1, 1, 1, 1, 0]);
        assert_eq!(Vec::<f32>::try_from(joined.response_mask.get(0)).unwrap(), [1.0, 1.0, 1.0, 0.0]);
        assert_eq!(Vec::<f32>::try_from(joined.log_probs.get(0)).unwrap(), [-1.0, -2.0, -3.0, 0.0]);
    }
}
