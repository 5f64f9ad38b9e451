//! Rotary position embeddings (Su et al. 2021, "RoFormer") with the scaling variants
//! HF configs name: `linear`, `dynamic` (NTK-aware) and `llama3`.
//!
//! Reference: transformers/modeling_rope_utils.py. Frequencies are computed in fp32
//! the way transformers computes them, so logits match to float tolerance.
use serde_json::Value;
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// How rotary frequencies are scaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// NTK-aware: the base grows once a sequence outgrows `max_positions`.
    Dynamic {
        factor: f64,
        max_positions: i64,
    },
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_positions: i64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub head_dim: i64,
    pub scaling: RopeScaling,
}

fn number(map: &serde_json::Map<String, Value>, key: &str, field: &str) -> Result<f64> {
    map.get(key)
        .and_then(Value::as_f64)
        .ok_or_else(|| Error::config(format!("{field}.{key}"), format!("expected a number for `{key}`")))
}

impl RopeScaling {
    /// Reads HF's `rope_scaling` (older configs) or `rope_parameters` (transformers 5):
    /// a mapping with `rope_type` (or `type`) and its parameters. `field` names it in errors.
    pub fn from_hf(value: Option<&Value>, field: &str, max_positions: i64) -> Result<Self> {
        let map = match value {
            None | Some(Value::Null) => return Ok(RopeScaling::None),
            Some(Value::Object(map)) => map,
            Some(other) => return Err(Error::config(field, format!("expected a mapping, found {other}"))),
        };
        let kind = map.get("rope_type").or_else(|| map.get("type")).and_then(Value::as_str).unwrap_or("default");
        Ok(match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: number(map, "factor", field)? },
            "dynamic" => RopeScaling::Dynamic {
                factor: number(map, "factor", field)?,
                max_positions: map
                    .get("original_max_position_embeddings")
                    .and_then(Value::as_i64)
                    .unwrap_or(max_positions),
            },
            "llama3" => RopeScaling::Llama3 {
                factor: number(map, "factor", field)?,
                low_freq_factor: number(map, "low_freq_factor", field)?,
                high_freq_factor: number(map, "high_freq_factor", field)?,
                original_max_positions: number(map, "original_max_position_embeddings", field)? as i64,
            },
            other => {
                return Err(Error::config(
                    format!("{field}.rope_type"),
                    format!("unsupported rope type `{other}`; supported: default, linear, dynamic, llama3"),
                ))
            }
        })
    }

    /// As HF writes it in `config.json` (`rope_scaling`), or null.
    pub fn to_hf(&self) -> Value {
        match self {
            RopeScaling::None => Value::Null,
            RopeScaling::Linear { factor } => serde_json::json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Dynamic { factor, max_positions } => serde_json::json!({
                "rope_type": "dynamic", "factor": factor, "original_max_position_embeddings": max_positions
            }),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_positions } => {
                serde_json::json!({
                    "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original_max_positions
                })
            }
        }
    }
}

impl Rope {
    /// Inverse frequencies, (B, head_dim / 2), for each row of `positions` (B, T).
    ///
    /// Only the dynamic variant depends on the positions: its base grows with the
    /// furthest position of each row. (transformers takes the furthest position of the
    /// whole batch, so a row's result would depend on its batch-mates; per row, batched
    /// generation equals one-by-one, and single sequences match transformers exactly.)
    fn inv_freq(&self, positions: &Tensor) -> Tensor {
        let device = positions.device();
        let dim = self.head_dim as f64;
        let exponents =
            Tensor::arange_start_step(0, self.head_dim, 2, (Kind::Int64, device)).to_kind(Kind::Float) / dim;
        let inv_freq = match self.scaling {
            RopeScaling::Dynamic { factor, max_positions } => {
                let seq_len = positions.amax(&[-1i64][..], true).to_kind(Kind::Double) + 1.0; // (B, 1)
                let ratio = (&seq_len * (factor / max_positions as f64) - (factor - 1.0)).clamp_min(1.0);
                let grown = ratio.pow_tensor_scalar(dim / (dim - 2.0)) * self.theta;
                let base = grown.where_self(&seq_len.gt(max_positions as f64), &grown.full_like(self.theta));
                // inv_freq = 1 / base^(2i/d), in fp32 as transformers computes it.
                base.to_kind(Kind::Float).pow(&exponents.unsqueeze(0)).reciprocal()
            }
            _ => Tensor::pow_scalar(self.theta, &exponents).reciprocal().unsqueeze(0),
        };
        match self.scaling {
            RopeScaling::Linear { factor } => inv_freq / factor,
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_positions } => {
                let old = original_max_positions as f64;
                let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
                let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
                let scaled = inv_freq.where_self(&wavelen.le(low_wavelen), &(&inv_freq / factor));
                let smooth = (wavelen.reciprocal() * old - low_freq_factor) / (high_freq_factor - low_freq_factor);
                let smoothed = (smooth.ones_like() - &smooth) * &scaled / factor + &smooth * &scaled;
                let medium = wavelen.ge(high_wavelen).logical_and(&wavelen.le(low_wavelen));
                smoothed.where_self(&medium, &scaled)
            }
            _ => inv_freq,
        }
    }

    /// The inverse frequencies, (1, head_dim / 2) on `device`, when they do not depend on the
    /// positions (every scaling but `dynamic`): computed once by a model, so that each
    /// decoding step does not (a step is launch-bound).
    pub fn fixed_inv_freq(&self, device: tch::Device) -> Option<Tensor> {
        let positions = Tensor::zeros([1, 1], (Kind::Int64, device));
        (!matches!(self.scaling, RopeScaling::Dynamic { .. })).then(|| self.inv_freq(&positions))
    }

    /// cos and signed sin for `positions` (B, T), each (B, 1, T, head_dim) (a head axis to
    /// broadcast over), for [`apply`]: cos is HF's "rotate half" layout, `cat(θ, θ).cos()`;
    /// the sin carries the rotation's sign, `cat(-θ.sin(), θ.sin())`. Computed in fp32,
    /// returned in `kind` (the activations' dtype). `inv_freq`: [`Rope::fixed_inv_freq`],
    /// when the caller keeps it.
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind, inv_freq: Option<&Tensor>) -> (Tensor, Tensor) {
        let inv_freq = inv_freq.map_or_else(|| self.inv_freq(positions), Tensor::shallow_clone); // (B or 1, hd/2)
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv_freq.unsqueeze(1); // (B, T, hd/2)
        let cos = Tensor::cat(&[&freqs, &freqs], -1).cos(); // (B, T, hd)
        let sin = freqs.sin();
        let signed_sin = Tensor::cat(&[&sin.neg(), &sin], -1);
        let (cos, signed_sin) = (cos.unsqueeze(1), signed_sin.unsqueeze(1));
        if kind == Kind::Float {
            return (cos, signed_sin);
        }
        (cos.to_kind(kind), signed_sin.to_kind(kind))
    }
}

/// Rotates `x` (B, H, T, hd) by the angles of [`Rope::cos_sin`] (B, 1, T, hd):
/// x·cos + rotate_half(x)·sin, where rotate_half(x) = cat(−x₂, x₁) is written as the
/// halves swapped (a roll) times the signed sin: three kernels a call instead of nine
/// (a decoding step is launch-bound).
pub fn apply(x: &Tensor, cos: &Tensor, signed_sin: &Tensor) -> Tensor {
    if let Some(y) = super::fused::rope(x, cos, signed_sin) {
        return y; // one kernel each way on a CPU
    }
    let half = x.size()[3] / 2;
    (x * cos).addcmul(&x.roll([half], [-1]), signed_sin)
}
