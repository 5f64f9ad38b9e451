//! Log-probs and entropy of response tokens at a sampling temperature, computed exactly
//! as generation computes them (logits / T, then log-softmax in fp32; see
//! [`crate::model::generate::sample`]), so rollout, reference and training log-probs of
//! the same tokens agree.
use tch::{Kind, Tensor};

/// The logits (B, R, V) that predict the `response_len` response tokens of
/// `logits` (B, P + R, V), whose prompts fill the first `prompt_len` positions, divided
/// by `temperature`: position t predicts token t + 1.
pub fn response_logits(logits: &Tensor, prompt_len: i64, response_len: i64, temperature: f64) -> Tensor {
    logits.narrow(1, prompt_len - 1, response_len).to_kind(Kind::Float) / temperature
}

/// The log-prob (B, R) of each of `responses` (B, R) under `logits` (B, R, V) (already
/// divided by the temperature).
pub fn response_log_probs(logits: &Tensor, responses: &Tensor) -> Tensor {
    logits.log_softmax(-1, Kind::Float).gather(-1, &responses.unsqueeze(-1), false).squeeze_dim(-1)
}

/// The entropy (B, R) of each position's distribution under `logits` (B, R, V):
/// logsumexp(z) − Σ softmax(z)·z.
pub fn entropy(logits: &Tensor) -> Tensor {
    let probs = logits.softmax(-1, Kind::Float);
    logits.logsumexp([-1].as_slice(), false) - (probs * logits).sum_dim_intlist([-1].as_slice(), false, Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_probs_and_entropy_at_a_temperature_by_hand() {
        // One prompt token, two response tokens; V = 2. Position 0 predicts response token 0.
        let logits = Tensor::from_slice(&[2.0f32, 0.0, 0.0, 0.0, 9.0, 9.0]).view([1, 3, 2]);
        let z = response_logits(&logits, 1, 2, 2.0); // [[1, 0], [0, 0]]
        let responses = Tensor::from_slice(&[0i64, 1]).view([1, 2]);
        let got = Vec::<f64>::try_from(response_log_probs(&z, &responses).view([-1]).to_kind(Kind::Double)).unwrap();
        let p0 = 1f64.exp() / (1f64.exp() + 1.0);
        assert!((got[0] - p0.ln()).abs() < 1e-6 && (got[1] - 0.5f64.ln()).abs() < 1e-6, "{got:?}");
        let h = Vec::<f64>::try_from(entropy(&z).view([-1]).to_kind(Kind::Double)).unwrap();
        let h0 = -(p0 * p0.ln() + (1.0 - p0) * (1.0 - p0).ln());
        assert!((h[0] - h0).abs() < 1e-6 && (h[1] - 2f64.ln()).abs() < 1e-6, "{h:?}");
    }
}
