//! Scaled dot-product attention, as every family calls it. A decoding step's single query
//! on a CPU takes the shim's kernel (`core/csrc/attention.cpp`): libtorch's SDPA runs its
//! flash kernel there, made for long query blocks, which costs a small model's batched
//! decoding step about a seventh of its time.
use tch::{Device, Kind, Tensor};

use crate::shim::{self, raw};

/// `Tensor::scaled_dot_product_attention` without dropout: `q` (B, H, T, D), `k` and `v`
/// (B, Hkv, L, D) (grouped heads with `gqa`), an additive or boolean `mask` broadcast to
/// (B, H, T, L), `is_causal` for a causal mask instead, `scale` (default 1/√D). One query
/// position in fp32 on a CPU without autograd gives the same numbers to fp32 rounding (its
/// sums run in another order).
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    is_causal: bool,
    scale: Option<f64>,
    gqa: bool,
) -> Tensor {
    let single_query =
        !is_causal && q.device() == Device::Cpu && q.kind() == Kind::Float && q.size().get(2) == Some(&1);
    single_query
        .then(|| decode_attention(q, k, v, mask, scale))
        .flatten()
        .unwrap_or_else(|| Tensor::scaled_dot_product_attention(q, k, v, mask, 0.0, is_causal, scale, gqa))
}

/// The shim's single-query attention, or `None` where it does not take the case (a scale
/// that is not positive, whose 0 the shim reads as "the default", among them).
fn decode_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: Option<f64>) -> Option<Tensor> {
    let scale = match scale {
        Some(s) if s <= 0.0 => return None,
        given => given.unwrap_or(0.0),
    };
    let mask = mask.map_or(std::ptr::null_mut(), raw);
    // SAFETY: the tensors are alive for the call; see `shim::taken`.
    shim::taken(|out| unsafe { shim::plumb_decode_attention(raw(q), raw(k), raw(v), mask, scale, out) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn simd() -> bool {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }

    fn randn(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }

    /// Keys and values as a decoding step sees them: the first `len` positions of a larger
    /// cache (B, Hkv, 24, D), a view that is not contiguous.
    fn cache_views(b: i64, hkv: i64, len: i64, d: i64) -> (Tensor, Tensor) {
        (randn(&[b, hkv, 24, d]).narrow(2, 0, len), randn(&[b, hkv, 24, d]).narrow(2, 0, len))
    }

    /// Left padding as a batch of prompts of different lengths has it: row i hides its
    /// first 2·i positions (all but the last, when there are fewer).
    fn padding_mask(b: i64, len: i64) -> Tensor {
        let mask = Tensor::zeros([b, 1, 1, len], (Kind::Float, Device::Cpu));
        for row in 0..b {
            let _ = mask.get(row).narrow(2, 0, (2 * row).min(len - 1)).fill_(f64::NEG_INFINITY);
        }
        mask
    }

    #[test]
    fn one_query_agrees_with_libtorchs_attention() {
        tch::manual_seed(0);
        let _no_grad = tch::no_grad_guard();
        // Head sizes 32 and 64, grouped and plain heads, lengths that are not multiples of
        // 8, a mask per row, one broadcast over the batch, none, and a scale of the caller's.
        for (heads, kv_heads, d, len) in [(4, 4, 32, 13), (8, 2, 64, 21), (2, 1, 16, 1), (4, 2, 8, 9)] {
            let b = 3;
            let q = randn(&[b, 1, heads, d]).transpose(1, 2); // (B, H, 1, D), strided like a model's
            let (k, v) = cache_views(b, kv_heads, len, d);
            let masks = [Some(padding_mask(b, len)), Some(randn(&[1, 1, 1, len])), None];
            for mask in masks.iter().map(Option::as_ref) {
                for scale in [None, Some(0.3)] {
                    let want = Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, false, scale, true);
                    let got = decode_attention(&q, &k, &v, mask, scale);
                    assert_eq!(got.is_some(), simd(), "taken where the CPU has AVX2 and FMA");
                    let Some(got) = got else { continue };
                    assert_eq!(got.size(), want.size());
                    let diff = (&got - &want).abs().max().double_value(&[]);
                    assert!(diff <= 1e-5, "h {heads}, hkv {kv_heads}, d {d}, len {len}: differs by {diff}");
                    let same = scaled_dot_product_attention(&q, &k, &v, mask, false, scale, true);
                    assert!(same.equal(&got), "the public call takes the kernel");
                }
            }
        }
    }

    #[test]
    fn other_cases_are_left_to_libtorch() {
        let (q, (k, v)) = (randn(&[2, 4, 1, 32]), cache_views(2, 4, 10, 32));
        let _no_grad = tch::no_grad_guard();
        // Two query positions, a head size not a multiple of 8, fp64, a mask over the query,
        // a scale that is not positive.
        assert!(decode_attention(&randn(&[2, 4, 2, 32]), &k, &v, None, None).is_none());
        let (k12, v12) = cache_views(2, 4, 10, 12);
        assert!(decode_attention(&randn(&[2, 4, 1, 12]), &k12, &v12, None, None).is_none());
        let double = |t: &Tensor| t.to_kind(Kind::Double);
        assert!(decode_attention(&double(&q), &double(&k), &double(&v), None, None).is_none());
        assert!(decode_attention(&q, &k, &v, Some(&randn(&[2, 4, 1, 10])), None).is_none());
        assert!(decode_attention(&q, &k, &v, None, Some(0.0)).is_none());
        drop(_no_grad);
        // Under autograd, with a query that wants its gradient.
        let wants = q.set_requires_grad(true);
        assert!(decode_attention(&wants, &k, &v, None, None).is_none());
        let y = scaled_dot_product_attention(&wants, &k, &v, None, false, None, false);
        y.sum(Kind::Float).backward();
        assert!(wants.grad().defined());
    }
}
