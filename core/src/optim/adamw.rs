//! AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization"), as
//! `torch.optim.AdamW(fused=True)` computes it — one fused libtorch kernel per parameter
//! group, through plumb's C++ shim — with two groups: weight decay on matrices, none on
//! norms, biases and embeddings.
use std::os::raw::c_void;

use tch::{nn, Kind, Tensor};

use super::Optimizer;
use crate::error::Result;
use crate::shim;

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
    /// The step number as a float scalar on the parameter's device, as the fused kernel reads it.
    step: Tensor,
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
                step: Tensor::zeros([], (Kind::Float, tensor.device())),
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
        for decay in [true, false] {
            let mut group: Vec<(&mut Param, Tensor)> = self
                .params
                .iter_mut()
                .filter(|p| p.decay == decay)
                .map(|p| {
                    let grad = p.tensor.grad();
                    (p, grad)
                })
                .filter(|(_, grad)| grad.defined())
                .collect();
            if group.is_empty() {
                continue;
            }
            for (p, _) in group.iter_mut() {
                let _ = p.step.f_fill_(self.step as f64)?;
            }
            let pointers = |f: &dyn Fn(&Param, &Tensor) -> *mut c_void| -> Vec<*mut c_void> {
                group.iter().map(|(p, g)| f(p, g)).collect()
            };
            let raw = |t: &Tensor| t.as_ptr() as *mut c_void;
            let params = pointers(&|p, _| raw(&p.tensor));
            let grads = pointers(&|_, g| raw(g));
            let exp_avgs = pointers(&|p, _| raw(&p.exp_avg));
            let exp_avg_sqs = pointers(&|p, _| raw(&p.exp_avg_sq));
            let steps = pointers(&|p, _| raw(&p.step));
            let wd = if decay { weight_decay } else { 0.0 };
            // SAFETY: every pointer is to an at::Tensor owned by `group` (parameters, their
            // moments and steps, and the gradients fetched above), alive for the call.
            let code = unsafe {
                shim::plumb_fused_adamw(
                    params.as_ptr(),
                    grads.as_ptr(),
                    exp_avgs.as_ptr(),
                    exp_avg_sqs.as_ptr(),
                    steps.as_ptr(),
                    group.len() as i32,
                    lr,
                    beta1,
                    beta2,
                    wd,
                    eps,
                )
            };
            shim::check(code, "fused AdamW")?;
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
