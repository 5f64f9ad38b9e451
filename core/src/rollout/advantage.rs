//! Generalised advantage estimation and whitening over response tokens.
use tch::{Kind, Tensor};

use super::masked::{masked_mean, masked_sum, masked_var};
use crate::dist::{data_parallel, DistError, ProcessGroup, ReduceOp};

/// GAE(γ, λ) (Schulman et al. 2016, <https://arxiv.org/abs/1506.02438>) over each row's
/// response tokens, backwards from its end; returns (advantages, returns), both (B, R).
///
/// `rewards` and `values` are (B, R); positions past the end (`mask` 0) are zeroed
/// first, so the value after a response's last token is 0 (the episode ends there) and
/// those positions get advantage 0 and return 0.
pub fn gae(rewards: &Tensor, values: &Tensor, mask: &Tensor, gamma: f64, lambda: f64) -> (Tensor, Tensor) {
    let _no_grad = tch::no_grad_guard();
    let rewards = rewards * mask; // (B, R)
    let values = values * mask; // (B, R)
    let length = rewards.size()[1];
    let mut last = values.select(1, 0).zeros_like(); // (B)
    let mut reversed = Vec::with_capacity(length as usize);
    for t in (0..length).rev() {
        let next_value = if t + 1 < length { values.select(1, t + 1) } else { last.zeros_like() };
        let delta = rewards.select(1, t) + next_value * gamma - values.select(1, t);
        last = delta + &last * (gamma * lambda);
        reversed.push(last.shallow_clone());
    }
    reversed.reverse();
    let advantages = Tensor::stack(&reversed, 1) * mask; // (B, R)
    let returns = &advantages + &values;
    (advantages, returns)
}

/// `values` (B, R) shifted to mean 0 (unless `shift_mean` is false, when the mean is
/// kept) and scaled to variance 1 over the real tokens (`mask` 1); positions past the
/// end are 0. As TRL's `masked_whiten` (variance with Bessel's correction, + 1e-8).
pub fn whiten(values: &Tensor, mask: &Tensor, shift_mean: bool) -> Tensor {
    let mean = masked_mean(values, mask);
    let variance = masked_var(values, mask);
    let mut whitened = (values - &mean) * (variance + 1e-8).rsqrt();
    if !shift_mean {
        whitened += &mean;
    }
    (whitened * mask).to_kind(Kind::Float)
}

/// [`whiten`] over the global batch of a data-parallel run: the mean and variance are of
/// the real tokens of every rank's `values` (sums and counts reduced over `group`), and
/// each rank whitens its own rows with them. [`whiten`] itself without a group.
pub fn whiten_over_ranks(
    values: &Tensor,
    mask: &Tensor,
    shift_mean: bool,
    group: Option<&ProcessGroup>,
) -> Result<Tensor, DistError> {
    let Some(group) = group else { return Ok(whiten(values, mask, shift_mean)) };
    let _no_grad = tch::no_grad_guard();
    let scalar = |t: Tensor| t.to_kind(Kind::Double).double_value(&[]);
    let local = [scalar(masked_sum(values, mask, None)), scalar(mask.sum(Kind::Float))];
    let global = data_parallel::reduce_values(Some(group), &local, ReduceOp::Sum)?;
    let (sum, count) = (global[0], global[1]);
    let mean = sum / count;
    let centred = values.to_kind(Kind::Double) - mean;
    let squares = scalar(masked_sum(&centred.square(), mask, None));
    let squares = data_parallel::reduce_values(Some(group), &[squares], ReduceOp::Sum)?[0];
    let variance = squares / (count - 1.0);
    let mut whitened = centred / (variance + 1e-8).sqrt();
    if !shift_mean {
        whitened += mean;
    }
    Ok((whitened * mask).to_kind(Kind::Float))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(values: &[f32]) -> Tensor {
        Tensor::from_slice(values).view([1, values.len() as i64])
    }

    fn close(tensor: &Tensor, expected: &[f64]) {
        let got = Vec::<f64>::try_from(tensor.flatten(0, -1).to_kind(Kind::Double)).unwrap();
        assert_eq!(got.len(), expected.len());
        for (g, e) in got.iter().zip(expected) {
            assert!((g - e).abs() < 1e-5, "{got:?} vs {expected:?}");
        }
    }

    #[test]
    fn gae_by_hand_and_nothing_past_the_end() {
        // γ 1, λ 0.95; the fourth token is past the end (its reward and value are junk).
        let rewards = row(&[0.1, -0.2, 1.0, 5.0]);
        let values = row(&[0.5, 0.4, 0.3, 9.0]);
        let mask = row(&[1.0, 1.0, 1.0, 0.0]);
        let (advantages, returns) = gae(&rewards, &values, &mask, 1.0, 0.95);
        // t=2: δ = 1.0 + 0 − 0.3 = 0.7;            A = 0.7
        // t=1: δ = −0.2 + 0.3 − 0.4 = −0.3;        A = −0.3 + 0.95·0.7 = 0.365
        // t=0: δ = 0.1 + 0.4 − 0.5 = 0;            A = 0.95·0.365 = 0.34675
        close(&advantages, &[0.34675, 0.365, 0.7, 0.0]);
        close(&returns, &[0.84675, 0.765, 1.0, 0.0]);

        // γ 0.5, λ 0.5: t=1: A = 2; t=0: δ = 1 + 0.5·0 − 0 = 1, A = 1 + 0.25·2 = 1.5.
        let (advantages, _) = gae(&row(&[1.0, 2.0]), &row(&[0.0, 0.0]), &row(&[1.0, 1.0]), 0.5, 0.5);
        close(&advantages, &[1.5, 2.0]);
    }

    #[test]
    fn whitening_uses_only_real_tokens() {
        // Real: 1 2 3 | 4 6: mean 3.2, unbiased variance 3.7.
        let values = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 100.0, 4.0, 6.0, -50.0, 7.0]).view([2, 4]);
        let mask = Tensor::from_slice(&[1.0f32, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]).view([2, 4]);
        let s = 1.0 / (3.7f64 + 1e-8).sqrt();
        let expected = [-2.2 * s, -1.2 * s, -0.2 * s, 0.0, 0.8 * s, 2.8 * s, 0.0, 0.0];
        close(&whiten(&values, &mask, true), &expected);
        let kept: Vec<f64> =
            expected.iter().zip([1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]).map(|(e, m)| (e + 3.2) * m).collect();
        close(&whiten(&values, &mask, false), &kept);
    }
}
