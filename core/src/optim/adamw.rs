//! AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization"), as
//! `torch.optim.AdamW` computes it, with two parameter groups: weight decay on
//! matrices, none on norms, biases and embeddings.
use tch::{nn, Tensor};

use super::Optimizer;
use crate::error::Result;

#[derive(Debug, Clone, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { lr: 1e-3, betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.01 }
    }
}

struct Param {
    name: String,
    tensor: Tensor,
    decay: bool,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

pub struct AdamW {
    config: AdamWConfig,
    params: Vec<Param>,
    step: u64,
}

/// Whether a variable gets weight decay: matrices yes; norms, biases and embeddings no.
pub fn decays(name: &str, tensor: &Tensor) -> bool {
    tensor.dim() >= 2 && !name.contains("embed") && !name.contains("norm")
}

impl AdamW {
    /// Every trainable variable of `vs`, grouped by [`decays`], in name order.
    pub fn new(vs: &nn::VarStore, config: AdamWConfig) -> Self {
        let mut variables: Vec<(String, Tensor)> =
            vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        let params = variables
            .into_iter()
            .map(|(name, tensor)| Param {
                decay: decays(&name, &tensor),
                exp_avg: tensor.zeros_like(),
                exp_avg_sq: tensor.zeros_like(),
                name,
                tensor,
            })
            .collect();
        Self { config, params, step: 0 }
    }

    /// (decayed, not decayed) parameter counts, for the log.
    pub fn group_sizes(&self) -> (i64, i64) {
        self.params.iter().fold((0, 0), |(d, n), p| {
            let count = p.tensor.numel() as i64;
            if p.decay {
                (d + count, n)
            } else {
                (d, n + count)
            }
        })
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// Restores what [`Optimizer::state`] returned (e.g. from a checkpoint); every
    /// parameter's moments must be there with its shape.
    pub fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let find = |name: &str| state.iter().find(|(n, _)| n == name).map(|(_, t)| t);
        let missing = |name: &str| crate::Error::Other(format!("optimizer state has no `{name}`"));
        let step = find("step").ok_or_else(|| missing("step"))?;
        let _no_grad = tch::no_grad_guard();
        for p in &mut self.params {
            for (suffix, target) in [("exp_avg", &mut p.exp_avg), ("exp_avg_sq", &mut p.exp_avg_sq)] {
                let name = format!("{}.{suffix}", p.name);
                let source = find(&name).ok_or_else(|| missing(&name))?;
                if source.size() != target.size() {
                    return Err(crate::Error::Other(format!(
                        "optimizer state `{name}` has shape {:?}, the parameter {:?}",
                        source.size(),
                        target.size()
                    )));
                }
                target.f_copy_(source)?;
            }
        }
        self.step = step.f_int64_value(&[])? as u64;
        Ok(())
    }
}

impl Optimizer for AdamW {
    fn step(&mut self) -> Result<()> {
        let _no_grad = tch::no_grad_guard();
        self.step += 1;
        let AdamWConfig { lr, betas: (beta1, beta2), eps, weight_decay } = self.config;
        let bias1 = 1.0 - beta1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - beta2.powi(self.step as i32)).sqrt();
        for p in &mut self.params {
            let grad = p.tensor.grad();
            if !grad.defined() {
                continue;
            }
            if p.decay && weight_decay != 0.0 {
                let _ = p.tensor.f_mul_scalar_(1.0 - lr * weight_decay)?;
            }
            let _ = p.exp_avg.f_lerp_(&grad, 1.0 - beta1)?;
            let _ = p.exp_avg_sq.f_mul_scalar_(beta2)?.f_addcmul_(&(&grad * (1.0 - beta2)), &grad)?;
            let denom = (p.exp_avg_sq.sqrt() / bias2_sqrt) + eps;
            let update = (&p.exp_avg / denom) * (-lr / bias1);
            let _ = p.tensor.f_add_(&update)?;
        }
        Ok(())
    }

    fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut grad = p.tensor.grad();
            if grad.defined() {
                let _ = grad.detach_().zero_();
            }
        }
    }

    fn learning_rate(&self) -> f64 {
        self.config.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    fn parameters(&self) -> Vec<&Tensor> {
        self.params.iter().map(|p| &p.tensor).collect()
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        let mut state = vec![("step".to_string(), Tensor::from(self.step as i64))];
        for p in &self.params {
            state.push((format!("{}.exp_avg", p.name), p.exp_avg.shallow_clone()));
            state.push((format!("{}.exp_avg_sq", p.name), p.exp_avg_sq.shallow_clone()));
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two steps on f(w) = sum(w * c), checked against the AdamW formula by hand.
    #[test]
    fn matches_the_adamw_formula() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let layer = vs.root() / "layer";
        let w = layer.var_copy("weight", &Tensor::from_slice(&[1.0f32, -2.0, 0.5, 3.0]).view([2, 2]));
        let b = layer.var_copy("bias", &Tensor::from_slice(&[1.0f32, 1.0]));
        let config = AdamWConfig { lr: 0.1, betas: (0.9, 0.99), eps: 1e-8, weight_decay: 0.5 };
        let mut opt = AdamW::new(&vs, config.clone());
        let c = [0.3f64, -0.7, 1.1, 0.2];
        let grad_w = Tensor::from_slice(&c).to_kind(tch::Kind::Float).view([2, 2]);
        let (mut wv, mut m, mut v) = ([1.0f64, -2.0, 0.5, 3.0], [0.0f64; 4], [0.0f64; 4]);
        for step in 1..=2 {
            opt.zero_grad();
            ((&w * &grad_w).sum(tch::Kind::Float) + b.sum(tch::Kind::Float)).backward();
            opt.step().unwrap();
            for i in 0..4 {
                wv[i] *= 1.0 - 0.1 * 0.5;
                m[i] = 0.9 * m[i] + 0.1 * c[i];
                v[i] = 0.99 * v[i] + 0.01 * c[i] * c[i];
                let m_hat = m[i] / (1.0 - 0.9f64.powi(step));
                let v_hat = v[i] / (1.0 - 0.99f64.powi(step));
                wv[i] -= 0.1 * m_hat / (v_hat.sqrt() + 1e-8);
            }
        }
        let got = Vec::<f64>::try_from(w.view([-1]).to_kind(tch::Kind::Double)).unwrap();
        for (g, e) in got.iter().zip(wv) {
            assert!((g - e).abs() < 1e-6, "{got:?} vs {wv:?}");
        }
        // The bias is not decayed: two Adam steps of a unit gradient move it by 2 * lr.
        let bias = Vec::<f64>::try_from(b.to_kind(tch::Kind::Double)).unwrap();
        assert!((bias[0] - 0.8).abs() < 1e-5, "{bias:?}");
    }
}
