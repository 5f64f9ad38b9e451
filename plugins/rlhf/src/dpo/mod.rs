//! Direct preference optimisation: the losses and their figures, the tokens of a pair
//! (prompt and completions), and the `rlhf.dpo` stage.
pub mod loss;
pub mod stage;
pub mod tokens;

pub use stage::Dpo;
