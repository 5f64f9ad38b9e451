//! RMSNorm, the rotary embedding and SwiGLU as one kernel each way on a CPU, through the
//! shim (`core/csrc/fused.cpp`): libtorch runs them as their formulas there, several small
//! kernels and autograd nodes a call, which is most of a small model's training step that
//! is not a matrix product. Each function returns `None` for a case the shim does not take
//! (not fp32 on a CPU, or under autocast); its caller then runs the formula.
use tch::Tensor;

use crate::shim::{self, raw, taken};

/// `weight · x / √(mean(x²) + eps)` over the last dimension of `x` (.., C), `weight` (C),
/// differentiable in both: the numbers of the formula to fp32 rounding.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Option<Tensor> {
    // SAFETY: the tensors are alive for the call; see `shim::taken`.
    taken(|out| unsafe { shim::plumb_rms_norm(raw(x), raw(weight), eps, out) })
}

/// The rotary embedding of `x` (B, H, T, D) by [`super::rope::Rope::cos_sin`]'s `cos` and
/// `signed_sin` (B or 1, 1, T, D): `x·cos + roll(x, D/2)·signed_sin`, differentiable in `x`.
pub fn rope(x: &Tensor, cos: &Tensor, signed_sin: &Tensor) -> Option<Tensor> {
    // SAFETY: the tensors are alive for the call; see `shim::taken`.
    taken(|out| unsafe { shim::plumb_rope(raw(x), raw(cos), raw(signed_sin), out) })
}

/// SwiGLU's `silu(gate) · up` for `gate` and `up` of one shape, differentiable in both. Taken
/// on a CPU with AVX2 and FMA (a vectorised exponential: the numbers of the formula to
/// within a few fp32 roundings).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Option<Tensor> {
    // SAFETY: the tensors are alive for the call; see `shim::taken`.
    taken(|out| unsafe { shim::plumb_swiglu(raw(gate), raw(up), out) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn randn(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }

    /// Largest |a − b| relative to b's largest magnitude.
    fn relative(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-12)
    }

    fn rms_formula(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        let variance = x.square().mean_dim(-1, true, Kind::Float);
        w * (x * (variance + eps).rsqrt())
    }

    #[test]
    fn rms_norm_gives_the_formulas_values_and_gradients() {
        tch::manual_seed(0);
        // 70 rows: two whole blocks of the weight gradient's 32 and a part.
        for shape in [[2i64, 35, 24], [1, 3, 5]] {
            let x = (randn(&shape) * 3.0).set_requires_grad(true);
            let w = (randn(&[shape[2]]) + 1.0).set_requires_grad(true);
            let upstream = randn(&shape);
            let fused = rms_norm(&x, &w, 1e-5).expect("an fp32 CPU case is taken");
            (&fused * &upstream).sum(Kind::Float).backward();
            let (dx, dw) = (x.grad().copy(), w.grad().copy());
            let _ = (x.grad().zero_(), w.grad().zero_());
            let reference = rms_formula(&x, &w, 1e-5);
            (&reference * &upstream).sum(Kind::Float).backward();
            assert!(relative(&fused, &reference) < 1e-6, "{shape:?} values");
            assert!(relative(&dx, &x.grad()) < 1e-5, "{shape:?} dx");
            assert!(relative(&dw, &w.grad()) < 1e-5, "{shape:?} dw");
        }
    }

    #[test]
    fn a_frozen_weight_gets_no_gradient_and_other_cases_are_left_to_the_formula() {
        let x = randn(&[4, 8]).set_requires_grad(true);
        let w = randn(&[8]);
        rms_norm(&x, &w, 1e-6).unwrap().sum(Kind::Float).backward();
        assert!(x.grad().defined() && !w.grad().defined());
        assert!(rms_norm(&x.to_kind(Kind::BFloat16), &w, 1e-6).is_none(), "bf16");
        assert!(rms_norm(&x, &randn(&[7]), 1e-6).is_none(), "a weight of another width");
    }

    /// cos and signed sin as rope.rs lays them out for `positions` (B, T).
    fn angles(positions: &Tensor, d: i64) -> (Tensor, Tensor) {
        let inv_freq = Tensor::arange_start_step(0, d, 2, (Kind::Float, Device::Cpu)).divide_scalar(d as f64);
        let inv_freq = Tensor::from(10_000f32).pow(&inv_freq).reciprocal();
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv_freq; // (B, T, D/2)
        let cos = Tensor::cat(&[&freqs, &freqs], -1).cos().unsqueeze(1);
        let sin = freqs.sin();
        (cos, Tensor::cat(&[&sin.neg(), &sin], -1).unsqueeze(1))
    }

    #[test]
    fn rope_gives_the_formulas_values_and_gradients() {
        tch::manual_seed(1);
        let (b, h, t, d) = (2, 3, 5, 8);
        // Per-row positions (left padding shifts them), and one set shared by the batch.
        let per_row =
            Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0) + Tensor::from_slice(&[0i64, 3]).unsqueeze(1);
        let shared = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0);
        for positions in [per_row, shared] {
            let (cos, sin) = angles(&positions, d);
            // x as attention makes it: (B, T, H, D) projections viewed as (B, H, T, D).
            let x = randn(&[b, t, h, d]).set_requires_grad(true);
            let heads = x.transpose(1, 2);
            let upstream = randn(&[b, h, t, d]);
            let fused = rope(&heads, &cos, &sin).expect("an fp32 CPU case is taken");
            (&fused * &upstream).sum(Kind::Float).backward();
            let dx = x.grad().copy();
            let _ = x.grad().zero_();
            let reference = (&heads * &cos).addcmul(&heads.roll([d / 2], [-1]), &sin);
            (&reference * &upstream).sum(Kind::Float).backward();
            assert!(relative(&fused, &reference) < 1e-6, "values");
            assert!(relative(&dx, &x.grad()) < 1e-6, "dx");
        }
        // The angles of the last positions alone (a view with the whole batch stride), as
        // queries from a position on take them.
        let (cos, sin) = angles(
            &(Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0) + Tensor::from_slice(&[0i64, 2]).unsqueeze(1)),
            d,
        );
        let x = randn(&[b, h, t - 2, d]);
        let (cos, sin) = (cos.narrow(2, 2, t - 2), sin.narrow(2, 2, t - 2));
        let reference = (&x * &cos).addcmul(&x.roll([d / 2], [-1]), &sin);
        assert!(relative(&rope(&x, &cos, &sin).expect("a narrowed view is taken"), &reference) < 1e-6, "narrowed");
        let (cos, sin) = angles(&Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0), d);
        assert!(rope(&randn(&[1, 1, t, d]).to_kind(Kind::BFloat16), &cos, &sin).is_none(), "bf16");
        assert!(rope(&randn(&[1, 1, t + 1, d]), &cos, &sin).is_none(), "positions that do not match");
    }

    #[test]
    fn swiglu_gives_the_formulas_values_and_gradients() {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            return; // left to the formula there
        }
        tch::manual_seed(2);
        // 3 · 37 elements: whole vectors and a tail; gates past exp's range both ways.
        let gate = randn(&[3, 37]) * 4.0;
        gate.get(0).narrow(0, 0, 2).copy_(&Tensor::from_slice(&[-100f32, 100.]));
        let gate = gate.set_requires_grad(true);
        let up = randn(&[3, 37]).set_requires_grad(true);
        let upstream = randn(&[3, 37]);
        let fused = swiglu(&gate, &up).expect("an fp32 CPU case is taken");
        (&fused * &upstream).sum(Kind::Float).backward();
        let (dg, du) = (gate.grad().copy(), up.grad().copy());
        let _ = (gate.grad().zero_(), up.grad().zero_());
        let reference = gate.silu() * &up;
        (&reference * &upstream).sum(Kind::Float).backward();
        assert!(relative(&fused, &reference) < 1e-6, "values");
        assert!(relative(&dg, &gate.grad()) < 1e-6, "dgate");
        assert!(relative(&du, &up.grad()) < 1e-6, "dup");
        assert!(swiglu(&gate.tr(), &up.tr()).is_none(), "not contiguous");
        assert!(swiglu(&gate.to_kind(Kind::Double), &up.to_kind(Kind::Double)).is_none(), "fp64");
    }
}
