//! Chain-of-thought evaluators: one evaluator, `cot.gsm8k` ([`evaluator`]), that measures
//! a causal LM's arithmetic reasoning on GSM8K (built in) or on a user's JSONL in several
//! prompting modes at once — direct answer, few-shot with or without reasoning, zero-shot
//! CoT, self-consistency with maj@k and pass@k — or scores generations made elsewhere.
//!
//! By concern: problems ([`data`]), prompts and the Wei et al. exemplars ([`prompt`]),
//! answer extraction over core's normalisation ([`extract`]), voting and the estimators
//! ([`vote`]), scoring and the report ([`report`]).
pub mod data;
pub mod evaluator;
pub mod extract;
pub mod prompt;
pub mod report;
pub mod vote;

pub use evaluator::Gsm8k;

plumb_core::export_plugin! {
    name: "cot",
    version: env!("CARGO_PKG_VERSION"),
    description: "Chain-of-thought evaluation: GSM8K and your own data; direct, few-shot, zero-shot CoT, self-consistency, pass@k",
    stages: [],
    evaluators: [Gsm8k],
    rewards: [],
}
