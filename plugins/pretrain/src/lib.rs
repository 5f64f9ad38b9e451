//! Pretraining objectives as plumb stages.
//!
//! - `pretrain.causal_lm`: next-token prediction on a text corpus with a Llama-style
//!   decoder, from scratch (training a BPE tokenizer) or from an input model.
pub mod causal_lm;

pub use causal_lm::CausalLm;

plumb_core::export_plugin! {
    name: "pretrain",
    version: env!("CARGO_PKG_VERSION"),
    description: "Pretraining objectives: causal language modelling on text corpora",
    stages: [CausalLm],
    evaluators: [],
    rewards: [],
}
