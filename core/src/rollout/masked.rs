//! Means, sums and variances over the real tokens of a (B, R) tensor.
use tch::{Kind, Tensor};

/// Sum of `values` where `mask` is 1, per row when `dim` is Some, else overall.
pub fn masked_sum(values: &Tensor, mask: &Tensor, dim: Option<i64>) -> Tensor {
    let masked = values * mask;
    match dim {
        Some(d) => masked.sum_dim_intlist([d].as_slice(), false, Kind::Float),
        None => masked.sum(Kind::Float),
    }
}

/// Mean of `values` over the positions where `mask` is 1 (a scalar tensor).
pub fn masked_mean(values: &Tensor, mask: &Tensor) -> Tensor {
    masked_sum(values, mask, None) / mask.sum(Kind::Float)
}

/// Variance of `values` over the positions where `mask` is 1, with Bessel's correction
/// (as TRL's `masked_var` does for whitening).
pub fn masked_var(values: &Tensor, mask: &Tensor) -> Tensor {
    let mean = masked_mean(values, mask);
    let centred = values - &mean;
    let variance = masked_mean(&centred.square(), mask);
    let count = mask.sum(Kind::Float);
    variance * &count / (&count - 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_past_the_end_count_for_nothing() {
        let values = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 100.0, 4.0, 6.0, -50.0, 7.0]).view([2, 4]);
        let mask = Tensor::from_slice(&[1.0f32, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]).view([2, 4]);
        // Real tokens: 1 2 3 | 4 6 → sum 16, mean 3.2, var (sum of squares of deviations 14.8)/4 = 3.7.
        assert_eq!(f64::try_from(masked_sum(&values, &mask, None)).unwrap(), 16.0);
        assert_eq!(Vec::<f32>::try_from(masked_sum(&values, &mask, Some(1))).unwrap(), [6.0, 10.0]);
        assert!((f64::try_from(masked_mean(&values, &mask)).unwrap() - 3.2).abs() < 1e-6);
        assert!((f64::try_from(masked_var(&values, &mask)).unwrap() - 3.7).abs() < 1e-5);
    }
}
