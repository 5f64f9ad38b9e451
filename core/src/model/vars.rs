//! Where a layer's variables come from. Layers are built from a [`Vars`]: a path in a
//! VarStore (the path is the checkpoint key) and whether the variables are initialised
//! (a fresh model, drawn exactly as tch's layers draw them) or left uninitialised, in
//! the store's dtype and on its device, for a checkpoint to overwrite. So the same code
//! builds a fresh model or one to load, and loading never allocates an fp32 copy of a
//! bf16 checkpoint nor spends time drawing random weights it throws away.
use std::ops::Div;

use tch::nn::{self, Module};
use tch::Tensor;

use super::lora::{Builder, Linear};

/// A VarStore path and how variables created under it start.
#[derive(Debug, Clone)]
pub struct Vars<'a> {
    path: nn::Path<'a>,
    init: bool,
    /// Where LoRA adapters come from, when the model gets them (see [`Vars::adaptable_linear`]).
    lora: Option<&'a Builder>,
}

impl<'a> Vars<'a> {
    /// Variables initialised as each layer's `Init` says: a fresh model.
    pub fn fresh(path: nn::Path<'a>) -> Self {
        Self { path, init: true, lora: None }
    }

    /// Variables allocated without values (`Tensor::empty`), for a checkpoint to fill:
    /// every one must be overwritten before use.
    pub fn uninit(path: nn::Path<'a>) -> Self {
        Self { path, init: false, lora: None }
    }

    /// The same variables, with LoRA adapters from `lora` on the linear layers its
    /// `target_modules` name (see [`Vars::adaptable_linear`]).
    pub fn with_lora(self, lora: Option<&'a Builder>) -> Self {
        Self { lora, ..self }
    }

    /// Whether variables are initialised (a fresh model) rather than left for a checkpoint.
    pub fn is_fresh(&self) -> bool {
        self.init
    }

    /// The underlying VarStore path.
    pub fn path(&self) -> &nn::Path<'a> {
        &self.path
    }

    /// A trainable variable `name` of shape `dims`, drawn from `init` when fresh.
    pub fn var(&self, name: &str, dims: &[i64], init: nn::Init) -> Tensor {
        if self.init {
            self.path.var(name, dims, init)
        } else {
            let empty = Tensor::empty(dims, (self.path.kind(), self.path.device()));
            self.path.add(name, empty, true)
        }
    }

    /// A linear layer, `weight` (out, in) and `bias` (out), as `nn::linear` builds it.
    pub fn linear(&self, in_dim: i64, out_dim: i64, config: nn::LinearConfig) -> nn::Linear {
        if self.init {
            return nn::linear(&self.path, in_dim, out_dim, config);
        }
        let bs = config.bias.then(|| self.var("bias", &[out_dim], nn::Init::Const(0.0)));
        nn::Linear { ws: self.var("weight", &[out_dim, in_dim], config.ws_init), bs }
    }

    /// A linear layer that gets a LoRA adapter when the model is built with adapters and
    /// this layer's path is one of their `target_modules` ([`super::lora`]); else a
    /// plain one, as [`Vars::linear`] builds it.
    pub fn adaptable_linear(&self, in_dim: i64, out_dim: i64, config: nn::LinearConfig) -> Linear {
        let base = self.linear(in_dim, out_dim, config);
        match self.lora {
            Some(lora) => lora.linear(&self.path.components().collect::<Vec<_>>(), base, in_dim, out_dim),
            None => Linear::plain(base),
        }
    }

    /// An embedding table `weight` (rows, dim), as `nn::embedding` builds it.
    pub fn embedding(&self, rows: i64, dim: i64, config: nn::EmbeddingConfig) -> Embedding {
        let ws = if self.init {
            nn::embedding(&self.path, rows, dim, config).ws
        } else {
            self.var("weight", &[rows, dim], config.ws_init)
        };
        Embedding { ws, padding_idx: config.padding_idx }
    }

    /// A LayerNorm, `weight` and `bias` (dim). Always initialised (ones and zeros): it
    /// is small, and its init draws no random numbers.
    pub fn layer_norm(&self, dim: i64, config: nn::LayerNormConfig) -> nn::LayerNorm {
        nn::layer_norm(&self.path, vec![dim], config)
    }
}

impl<'a, T: ToString> Div<T> for &Vars<'a> {
    type Output = Vars<'a>;

    fn div(self, rhs: T) -> Vars<'a> {
        Vars { path: &self.path / rhs, init: self.init, lora: self.lora }
    }
}

impl<'a, T: ToString> Div<T> for Vars<'a> {
    type Output = Vars<'a>;

    fn div(self, rhs: T) -> Vars<'a> {
        Vars { path: self.path / rhs, init: self.init, lora: self.lora }
    }
}

/// Adds `tensor` (a copy, not trainable) to `vs` as variable `name` (a dotted path,
/// `model.layers.0.mlp.up_proj.weight`).
pub(crate) fn add_copy(vs: &nn::VarStore, name: &str, tensor: &Tensor) {
    let mut parts: Vec<&str> = name.split('.').collect();
    let last = parts.pop().unwrap_or_default();
    let path = parts.iter().fold(vs.root(), |p, c| p.sub(*c));
    let _ = path.add(last, tensor.copy(), false);
}

/// An embedding table: `nn::Embedding` with a public padding index (tch keeps its
/// configuration private, so a table allocated here could not become one).
#[derive(Debug)]
pub struct Embedding {
    /// (rows, dim)
    pub ws: Tensor,
    /// The row that gets no gradient from the lookup; -1 for none.
    pub padding_idx: i64,
}

impl Module for Embedding {
    /// ids (...) -> (..., dim)
    fn forward(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.ws, ids, self.padding_idx, false, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn uninit_allocates_in_the_stores_dtype() {
        let config = nn::LinearConfig { ws_init: nn::Init::Randn { mean: 0.0, stdev: 0.02 }, ..Default::default() };
        let mut store = nn::VarStore::new(Device::Cpu);
        store.set_kind(Kind::BFloat16);
        let vars = Vars::uninit(store.root());
        let linear = (&vars / "a" / 0).linear(4, 3, config);
        let embedding = (&vars / "e").embedding(10, 4, Default::default());
        assert_eq!((linear.ws.kind(), embedding.ws.kind()), (Kind::BFloat16, Kind::BFloat16));
        let mut names: Vec<String> = store.variables().into_keys().collect();
        names.sort();
        assert_eq!(names, ["a.0.bias", "a.0.weight", "e.weight"]);
        assert_eq!(store.trainable_variables().len(), 3);
    }
}
