//! Pretraining objectives as plumb stages, each from scratch (training a BPE tokenizer)
//! or from an input model, on a streamed corpus (`corpus`), through one training loop
//! (`stage`):
//!
//! - `pretrain.causal_lm`: next-token prediction with a Llama-style decoder;
//! - `pretrain.masked_lm`: BERT's masked LM with a bidirectional encoder;
//! - `pretrain.span_corruption`: T5's span corruption with an encoder-decoder.
//!
//! and one evaluator, `pretrain.perplexity` (`perplexity`): perplexity of any causal LM on
//! a text or JSONL file, in windows of `seq_len` tokens.
pub mod causal_lm;
pub mod corpus;
pub mod masked_lm;
pub mod perplexity;
pub mod span_corruption;
pub mod stage;

pub use causal_lm::CausalLm;
pub use masked_lm::MaskedLm;
pub use perplexity::Perplexity;
pub use span_corruption::SpanCorruption;

plumb_core::export_plugin! {
    name: "pretrain",
    version: env!("CARGO_PKG_VERSION"),
    description: "Pretraining objectives: causal LM, masked LM (BERT) and span corruption (T5) on text corpora; perplexity evaluation",
    stages: [CausalLm, MaskedLm, SpanCorruption],
    evaluators: [Perplexity],
    rewards: [],
}
