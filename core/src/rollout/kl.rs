//! The KL penalty of RLHF: per-token estimators of KL(policy ‖ reference) from the log-probs
//! of sampled tokens, and the coefficient that weighs it, fixed or adaptive.
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// How the per-token KL is estimated from the sampled token's log-probs (Schulman,
/// "Approximating KL divergence", <http://joschu.net/blog/kl-approx.html>).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// log π − log π_ref: unbiased, can be negative per token.
    #[default]
    K1,
    /// (r − 1) − log r with r = π_ref / π: unbiased, never negative, lower variance.
    K3,
}

/// The estimated KL of each response token (B, R), 0 past the end (`mask` 0).
pub fn kl_penalty(log_probs: &Tensor, ref_log_probs: &Tensor, mask: &Tensor, estimator: KlEstimator) -> Tensor {
    let log_ratio = ref_log_probs - log_probs; // log(π_ref / π)
    let kl = match estimator {
        KlEstimator::K1 => -log_ratio,
        KlEstimator::K3 => log_ratio.exp() - 1.0 - &log_ratio,
    };
    kl * mask
}

/// The KL coefficient β: fixed, or adapted after each batch towards a target KL as in
/// Ziegler et al. 2019 (<https://arxiv.org/abs/1909.08593>, TRL's `AdaptiveKLController`).
/// Its whole state is this struct, saved in checkpoints so a resumed run continues with
/// the same β.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KlController {
    /// The current β (saved as text: serde_json's float parser may be an ulp off, and a
    /// resumed run must continue with exactly this β).
    #[serde(with = "exact")]
    pub coef: f64,
    /// None: β stays fixed.
    pub adaptive: Option<AdaptiveKl>,
}

/// The target of an adaptive β.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveKl {
    /// The KL per sequence β steers towards.
    pub target: f64,
    /// Episodes over which β may change by a factor of e^±0.2 at most.
    pub horizon: f64,
}

impl KlController {
    pub fn fixed(coef: f64) -> Self {
        Self { coef, adaptive: None }
    }

    pub fn adaptive(initial: f64, target: f64, horizon: f64) -> Self {
        Self { coef: initial, adaptive: Some(AdaptiveKl { target, horizon }) }
    }

    /// After a batch of `episodes` whose mean KL per sequence was `current`: β grows when
    /// the KL is above the target and shrinks below it (error clipped to ±20%).
    pub fn update(&mut self, current: f64, episodes: usize) {
        if let Some(AdaptiveKl { target, horizon }) = self.adaptive {
            let error = (current / target - 1.0).clamp(-0.2, 0.2);
            self.coef *= 1.0 + error * episodes as f64 / horizon;
        }
    }
}

/// An `f64` as the shortest text that parses back to the same bits.
mod exact {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{value:?}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(|e| serde::de::Error::custom(format!("expected a number as text, found `{text}`: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k1_and_k3_by_hand() {
        let log_probs = Tensor::from_slice(&[-1.0f32, -2.0, -3.0]).view([1, 3]);
        let ref_log_probs = Tensor::from_slice(&[-1.5f32, -1.0, -9.0]).view([1, 3]);
        let mask = Tensor::from_slice(&[1.0f32, 1.0, 0.0]).view([1, 3]);
        let k1 =
            Vec::<f32>::try_from(kl_penalty(&log_probs, &ref_log_probs, &mask, KlEstimator::K1).view([-1])).unwrap();
        assert_eq!(k1, [0.5, -1.0, 0.0]);
        // r = π_ref/π: log r = −0.5 → e^−0.5 − 1 + 0.5 = 0.1065307; log r = 1 → e − 2 = 0.7182818.
        let k3 =
            Vec::<f32>::try_from(kl_penalty(&log_probs, &ref_log_probs, &mask, KlEstimator::K3).view([-1])).unwrap();
        for (got, expected) in k3.iter().zip([0.1065307f32, 0.7182818, 0.0]) {
            assert!((got - expected).abs() < 1e-6, "{k3:?}");
        }
    }

    #[test]
    fn adaptive_coefficient_follows_the_target_and_fixed_stays() {
        let mut beta = KlController::adaptive(0.1, 6.0, 10_000.0);
        beta.update(9.0, 256); // error +0.5 clipped to +0.2: × (1 + 0.2·256/10000) = 1.00512
        assert!((beta.coef - 0.100512).abs() < 1e-12);
        beta.update(6.6, 100); // error +0.1: × 1.001
        assert!((beta.coef - 0.100512 * 1.001).abs() < 1e-12);
        let mut fixed = KlController::fixed(0.05);
        fixed.update(100.0, 256);
        assert_eq!(fixed.coef, 0.05);
        let json = serde_json::to_string(&beta).unwrap();
        assert_eq!(serde_json::from_str::<KlController>(&json).unwrap(), beta);
    }
}
