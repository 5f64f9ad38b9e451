//! The losses of causal and masked language models, written once.
use tch::{Device, Kind, Reduction, Tensor};

use super::Precision;
use crate::data::{self, objectives::IGNORE_INDEX};
use crate::error::Result;
use crate::model::{HeadChunks, Policy, ScoreOptions};

/// Summed cross-entropy of `logits` (..., V) against `targets` (...), in fp32, leaving out
/// targets equal to [`IGNORE_INDEX`]. A sum, so that micro-batches add up and the caller
/// divides by the step's target count.
pub fn summed_cross_entropy(logits: &Tensor, targets: &Tensor) -> Tensor {
    let vocab = logits.size()[logits.dim() - 1];
    logits.view([-1, vocab]).to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
        &targets.reshape([-1]),
        None,
        Reduction::Sum,
        IGNORE_INDEX,
        0.0,
    )
}

/// Summed cross-entropy of `targets` (B, T) ([`IGNORE_INDEX`] left out) predicted at each
/// position of `inputs` (B, T) by a causal LM, through its head `chunks` positions at a
/// time ([`crate::model::head`]): the whole (B, T, V) logits never exist, in the forward
/// pass or the backward. `positions` default to the mask's.
pub fn summed_token_loss(
    policy: &(impl Policy + ?Sized),
    inputs: &Tensor,
    positions: Option<&Tensor>,
    attention_mask: Option<&Tensor>,
    targets: &Tensor,
    chunks: HeadChunks,
) -> Result<Tensor> {
    let options = ScoreOptions { chunks, ..Default::default() };
    let scores = policy.token_scores(inputs, positions, attention_mask, targets, 0, &options)?;
    Ok(-scores.log_probs.sum(Kind::Float))
}

/// Mean cross-entropy of predicting `targets` (B, T) from `inputs` (B, T).
pub fn next_token_loss(policy: &(impl Policy + ?Sized), inputs: &Tensor, targets: &Tensor) -> Result<Tensor> {
    Ok(summed_token_loss(policy, inputs, None, None, targets, HeadChunks::Auto)? / targets.numel() as f64)
}

/// Runs forward (in `precision`) and backward over `rows` in micro-batches of `micro`,
/// accumulating the gradients of the mean loss over all rows; returns that mean loss.
/// The LM head runs `chunks` positions at a time ([`summed_token_loss`]).
pub fn accumulate_gradients(
    policy: &(impl Policy + ?Sized),
    data: &Tensor,
    rows: &[i64],
    micro: usize,
    device: Device,
    precision: Precision,
    chunks: HeadChunks,
) -> Result<f64> {
    let mut loss_sum = 0.0;
    for chunk in rows.chunks(micro.max(1)) {
        let (inputs, targets) = data::causal_batch(data, chunk, device);
        let loss = precision.forward(device, || {
            Ok::<_, crate::Error>(
                summed_token_loss(policy, &inputs, None, None, &targets, chunks)? / targets.numel() as f64,
            )
        })??;
        (&loss * (chunk.len() as f64 / rows.len() as f64)).backward();
        loss_sum += loss.double_value(&[]) * chunk.len() as f64;
    }
    Ok(loss_sum / rows.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::{LlamaConfig, LlamaForCausalLm};
    use crate::optim::{AdamW, AdamWConfig, Optimizer};

    #[test]
    fn the_summed_loss_skips_ignored_targets_and_matches_the_mean() {
        let logits = Tensor::from_slice(&[2.0f32, 0.0, 0.0, 1.0, 1.0, 1.0]).view([1, 2, 3]);
        let targets = Tensor::from_slice(&[0i64, IGNORE_INDEX]).view([1, 2]);
        let sum = summed_cross_entropy(&logits, &targets).double_value(&[]);
        // -log softmax([2, 0, 0])[0]; the ignored position adds nothing.
        let expected = -(2f64.exp() / (2f64.exp() + 2.0)).ln();
        assert!((sum - expected).abs() < 1e-6, "{sum} vs {expected}");
    }

    /// The loss and gradients of one model over 8 rows in micro-batches of `micro`.
    fn grads(policy: &LlamaForCausalLm, micro: usize) -> (f64, Vec<Tensor>) {
        let data = Tensor::arange(8 * 9, (Kind::Int64, Device::Cpu)).remainder(40).view([8, 9]);
        let mut optimizer = AdamW::new(policy.var_store(), AdamWConfig::default());
        optimizer.zero_grad();
        let rows = [0, 1, 2, 3, 4, 5, 6, 7];
        let loss =
            accumulate_gradients(policy, &data, &rows, micro, Device::Cpu, Precision::Fp32, HeadChunks::Auto).unwrap();
        (loss, optimizer.parameters().iter().map(|p| p.grad().copy()).collect())
    }

    /// The chunked head gives the loss and gradients of the whole logits, to fp32
    /// tolerance, for a tied and an untied head.
    #[test]
    fn the_chunked_loss_and_its_gradients_equal_the_whole_logits() {
        for tie in [false, true] {
            let hf: LlamaConfig = serde_json::from_value(serde_json::json!({
                "vocab_size": 40, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                "num_attention_heads": 2, "max_position_embeddings": 16, "tie_word_embeddings": tie
            }))
            .unwrap();
            let policy = LlamaForCausalLm::new(hf, Device::Cpu).unwrap();
            let data = Tensor::arange(6 * 9, (Kind::Int64, Device::Cpu)).remainder(37).view([6, 9]);
            let rows = [0, 1, 2, 3, 4, 5];
            let run = |chunks| {
                let mut optimizer = AdamW::new(policy.var_store(), AdamWConfig::default());
                optimizer.zero_grad();
                let loss =
                    accumulate_gradients(&policy, &data, &rows, 4, Device::Cpu, Precision::Fp32, chunks).unwrap();
                (loss, optimizer.parameters().iter().map(|p| p.grad().copy()).collect::<Vec<_>>())
            };
            let (whole_loss, whole) = run(HeadChunks::Whole);
            let (loss, chunked) = run(HeadChunks::Rows(5));
            assert!((whole_loss - loss).abs() < 1e-6, "tied {tie}: loss {whole_loss} vs {loss}");
            for (a, b) in whole.iter().zip(&chunked) {
                let diff = (a - b).abs().max().double_value(&[]);
                assert!(diff < 1e-6, "tied {tie}: gradient differs by {diff}");
            }
        }
    }

    #[test]
    fn accumulating_micro_batches_equals_one_large_batch() {
        // One model for every micro-batch size, so nothing depends on the global generator
        // that tests on other threads draw from.
        let hf: LlamaConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 40, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 16
        }))
        .unwrap();
        let policy = LlamaForCausalLm::new(hf, Device::Cpu).unwrap();
        let (loss, whole) = grads(&policy, 8);
        for micro in [1, 2, 4] {
            let (accumulated_loss, accumulated) = grads(&policy, micro);
            assert!((loss - accumulated_loss).abs() < 1e-6, "micro {micro}: loss {loss} vs {accumulated_loss}");
            for (a, b) in whole.iter().zip(&accumulated) {
                let diff = (a - b).abs().max().double_value(&[]);
                assert!(diff < 1e-6, "micro {micro}: gradient differs by {diff}");
            }
        }
    }
}
