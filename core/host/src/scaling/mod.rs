//! Scaling laws as a tool: fits of Chinchilla's and Kaplan's laws to a sweep's runs, and
//! the compute-optimal plan they imply.
pub mod fit;
pub mod lbfgs;
mod rng;
pub mod sweep;

pub use fit::{fit_chinchilla, fit_kaplan, Chinchilla, ChinchillaFit, Interval, Point, PowerLaw};
