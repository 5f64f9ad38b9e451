//! Supervised fine-tuning as a plumb stage.
//!
//! - `sft.sft`: instruction/chat data in JSONL (alpaca, prompt/completion, messages),
//!   formatted by a chat template, with the loss on assistant turns only.
pub mod batching;
pub mod formats;
pub mod sft;
pub mod template;

pub use sft::Sft;

plumb_core::export_plugin! {
    name: "sft",
    version: env!("CARGO_PKG_VERSION"),
    description: "Supervised fine-tuning on instruction and chat data, loss on responses only",
    stages: [Sft],
    evaluators: [],
    rewards: [],
}
