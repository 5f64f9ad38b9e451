//! AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization"), as
//! `torch.optim.AdamW(fused=True)` computes it — one fused libtorch kernel per parameter
//! group, through plumb's C++ shim — with two groups: weight decay on matrices, none on
//! norms, biases and embeddings.
//!
//! Sharded (ZeRO stage 1, Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward
//! Training Trillion Parameter Models"; what `torch.distributed.optim.ZeroRedundantOptimizer`
//! does): in a data-parallel run each rank keeps the moments of, and steps, only the
//! parameters it owns ([`partition`]); the owners then broadcast the updated parameters.
//! The update of every parameter is the same kernel on the same averaged gradient, so the
//! parameters equal those of the unsharded optimizer.
use std::os::raw::c_void;

use tch::{nn, Kind, Tensor};

use super::Optimizer;
use crate::dist::{data_parallel, ProcessGroup};
use crate::error::Result;
use crate::shim::{self, raw};

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
    /// The rank that keeps this parameter's moments and updates it (0 when not sharded).
    owner: usize,
}

pub struct AdamW {
    config: AdamWConfig,
    params: Vec<Param>,
    step: u64,
    /// This rank, whose parameters [`Optimizer::step`] updates (0 when not sharded).
    rank: usize,
    sharded: bool,
}

/// The owners of tensors of `sizes` elements among `world` ranks, for ZeRO-1: whole
/// tensors, the largest first (ties in order), each to the rank with the fewest elements
/// so far (ties: the lower rank). Deterministic, so every rank computes the same owners.
pub fn partition(sizes: &[usize], world: usize) -> Vec<usize> {
    let world = world.max(1);
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by(|&a, &b| sizes[b].cmp(&sizes[a]).then(a.cmp(&b)));
    let mut load = vec![0usize; world];
    let mut owners = vec![0; sizes.len()];
    for i in order {
        let rank = (0..world).min_by_key(|&r| (load[r], r)).unwrap_or(0);
        owners[i] = rank;
        load[rank] += sizes[i];
    }
    owners
}

fn bytes(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
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
                owner: 0,
                name,
                tensor,
            })
            .collect();
        Self { config, params, step: 0, rank: 0, sharded: false }
    }

    /// Shards the state for ZeRO-1 as rank `rank` of `world`: keeps the moments of the
    /// parameters [`partition`] gives this rank and frees the others'. From now on
    /// [`Optimizer::step`] updates only those; follow it with
    /// [`broadcast_updated`](Self::broadcast_updated).
    pub fn shard(&mut self, rank: usize, world: usize) {
        let sizes: Vec<usize> = self.params.iter().map(|p| p.tensor.numel()).collect();
        for (p, owner) in self.params.iter_mut().zip(partition(&sizes, world)) {
            p.owner = owner;
            if owner != rank {
                p.exp_avg = Tensor::empty([0], (p.tensor.kind(), p.tensor.device()));
                p.exp_avg_sq = Tensor::empty([0], (p.tensor.kind(), p.tensor.device()));
            }
        }
        self.rank = rank;
        self.sharded = true;
    }

    pub fn is_sharded(&self) -> bool {
        self.sharded
    }

    /// The rank that owns each parameter, in [`Optimizer::parameters`] order.
    pub fn owners(&self) -> Vec<usize> {
        self.params.iter().map(|p| p.owner).collect()
    }

    /// Bytes of optimizer state this rank holds (moments and step counters).
    pub fn state_bytes(&self) -> usize {
        self.params.iter().map(|p| bytes(&p.exp_avg) + bytes(&p.exp_avg_sq) + bytes(&p.step)).sum()
    }

    /// Bytes of the whole, unsharded state: what each rank would hold without ZeRO.
    pub fn full_state_bytes(&self) -> usize {
        self.params.iter().map(|p| 2 * bytes(&p.tensor) + bytes(&p.step)).sum()
    }

    /// After a sharded [`Optimizer::step`]: every rank takes each parameter from its owner
    /// (in buckets, one broadcast per owner and bucket). Nothing to do when not sharded.
    pub fn broadcast_updated(&self, group: &ProcessGroup) -> Result<()> {
        if !self.sharded {
            return Ok(());
        }
        let tensors: Vec<&Tensor> = self.params.iter().map(|p| &p.tensor).collect();
        Ok(data_parallel::broadcast_from_owners(group, &tensors, &self.owners())?)
    }

    /// The whole state, as [`Optimizer::state`] gives it unsharded, on every rank: each
    /// owner broadcasts its moments. A collective: every rank calls it. The state as it is
    /// when not sharded.
    pub fn gather_state(&self, group: Option<&ProcessGroup>) -> Result<Vec<(String, Tensor)>> {
        let Some(group) = group.filter(|_| self.sharded) else { return Ok(self.state()) };
        let full = |p: &Param, t: &Tensor| if p.owner == self.rank { t.copy() } else { p.tensor.zeros_like() };
        let mut moments = Vec::new();
        let mut owners = Vec::new();
        for p in &self.params {
            moments.push((format!("{}.exp_avg", p.name), full(p, &p.exp_avg)));
            moments.push((format!("{}.exp_avg_sq", p.name), full(p, &p.exp_avg_sq)));
            owners.extend([p.owner, p.owner]);
        }
        let refs: Vec<&Tensor> = moments.iter().map(|(_, t)| t).collect();
        data_parallel::broadcast_from_owners(group, &refs, &owners)?;
        let mut state = vec![("step".to_string(), Tensor::from(self.step as i64))];
        state.extend(moments);
        Ok(state)
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

    /// Restores what [`Optimizer::state`] (or [`gather_state`](Self::gather_state))
    /// returned, e.g. from a checkpoint; every parameter's moments must be there with its
    /// shape. Sharded, it keeps only its own parameters' moments: a whole state resumes
    /// on any number of ranks.
    pub fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let find = |name: &str| state.iter().find(|(n, _)| n == name).map(|(_, t)| t);
        let missing = |name: &str| crate::Error::Other(format!("optimizer state has no `{name}`"));
        let step = find("step").ok_or_else(|| missing("step"))?;
        let _no_grad = tch::no_grad_guard();
        for p in self.params.iter_mut().filter(|p| p.owner == self.rank) {
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
                .filter(|p| p.decay == decay && p.owner == self.rank)
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

    /// Sharded, only this rank's parameters' moments (see [`AdamW::gather_state`]).
    fn state(&self) -> Vec<(String, Tensor)> {
        let mut state = vec![("step".to_string(), Tensor::from(self.step as i64))];
        for p in self.params.iter().filter(|p| p.owner == self.rank) {
            state.push((format!("{}.exp_avg", p.name), p.exp_avg.shallow_clone()));
            state.push((format!("{}.exp_avg_sq", p.name), p.exp_avg_sq.shallow_clone()));
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_balances_whole_tensors_by_size() {
        // 10 to rank 0, 8 to rank 1, 3 to rank 1 (11), 2 to rank 0 (12), 1 to rank 1.
        assert_eq!(partition(&[2, 10, 3, 8, 1], 2), [0, 0, 1, 1, 1]);
        assert_eq!(partition(&[5, 5, 5], 3), [0, 1, 2]);
        assert_eq!(partition(&[4, 4], 1), [0, 0]);
        // More ranks than tensors: the extra ranks own nothing.
        assert_eq!(partition(&[7], 3), [0]);
    }

    #[test]
    fn matches_the_adamw_formula() {
        adamw_formula_on(tch::Device::Cpu);
    }

    /// On CUDA the step is the fused CUDA kernel (torch.optim.AdamW(fused=True)'s).
    #[test]
    fn matches_the_adamw_formula_on_cuda() {
        if let Some(device) = crate::cuda::device_for_test() {
            adamw_formula_on(device);
        }
    }

    /// Two steps on f(w) = sum(w * c) on `device`, checked against the AdamW formula by hand.
    fn adamw_formula_on(device: tch::Device) {
        let vs = nn::VarStore::new(device);
        let layer = vs.root() / "layer";
        let w = layer.var_copy("weight", &Tensor::from_slice(&[1.0f32, -2.0, 0.5, 3.0]).view([2, 2]));
        let b = layer.var_copy("bias", &Tensor::from_slice(&[1.0f32, 1.0]));
        let config = AdamWConfig { lr: 0.1, betas: (0.9, 0.99), eps: 1e-8, weight_decay: 0.5 };
        let mut opt = AdamW::new(&vs, config.clone());
        let c = [0.3f64, -0.7, 1.1, 0.2];
        let grad_w = Tensor::from_slice(&c).to_kind(tch::Kind::Float).view([2, 2]).to_device(device);
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
        let got = Vec::<f64>::try_from(w.view([-1]).to_kind(tch::Kind::Double).to_device(tch::Device::Cpu)).unwrap();
        for (g, e) in got.iter().zip(wv) {
            assert!((g - e).abs() < 1e-6, "{got:?} vs {wv:?}");
        }
        // The bias is not decayed: two Adam steps of a unit gradient move it by 2 * lr.
        let bias = Vec::<f64>::try_from(b.to_kind(tch::Kind::Double).to_device(tch::Device::Cpu)).unwrap();
        assert!((bias[0] - 0.8).abs() < 1e-5, "{bias:?}");
    }
}
