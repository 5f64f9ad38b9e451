//! Optimizers: the `Optimizer` contract, AdamW with weight-decay groups, learning-rate
//! schedules and global-norm gradient clipping.
pub mod adamw;
pub mod schedule;

pub use adamw::{AdamW, AdamWConfig};
pub use schedule::Schedule;

use tch::Tensor;

use crate::error::Result;

/// Updates a model's parameters from their gradients.
pub trait Optimizer {
    /// Applies one update with the current gradients.
    fn step(&mut self) -> Result<()>;
    /// Clears every gradient.
    fn zero_grad(&mut self);
    fn learning_rate(&self) -> f64;
    fn set_learning_rate(&mut self, lr: f64);
    /// The parameters it updates.
    fn parameters(&self) -> Vec<&Tensor>;
    /// Named state tensors (moments, step), to checkpoint and restore.
    fn state(&self) -> Vec<(String, Tensor)>;
}

/// Scales all gradients so their global L2 norm is at most `max_norm`; returns the
/// norm before clipping. One device-to-host sync, to read the norm.
pub fn clip_grad_norm(parameters: &[&Tensor], max_norm: f64) -> Result<f64> {
    gradient_norm_then_clip(parameters, max_norm)
}

/// The global L2 norm of the gradients of `parameters`, as [`clip_grad_norm`] reads it,
/// with the gradients left as they are: for a caller that clips inside the optimizer's
/// step ([`clip_factor`], [`AdamW::step_with_gradients_scaled`]).
pub fn gradient_norm(parameters: &[&Tensor]) -> Result<f64> {
    gradient_norm_then_clip(parameters, 0.0)
}

/// What [`clip_grad_norm`] multiplies the gradients by at `norm`: `max_norm / (norm +
/// 1e-6)` when the norm is finite and above a positive `max_norm`, else 1.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm.is_finite() && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// The norm, and the gradients scaled in place when `max_norm` > 0 (the shim's clip).
fn gradient_norm_then_clip(parameters: &[&Tensor], max_norm: f64) -> Result<f64> {
    let _no_grad = tch::no_grad_guard();
    let grads: Vec<Tensor> = parameters.iter().map(|p| p.grad()).filter(|g| g.defined()).collect();
    if grads.is_empty() {
        return Ok(0.0);
    }
    let pointers: Vec<*mut std::ffi::c_void> = grads.iter().map(|g| g.as_ptr() as *mut std::ffi::c_void).collect();
    let mut norm = 0.0;
    // SAFETY: `pointers` point at the live gradients for the duration of the call; `norm`
    // receives the total.
    let code = unsafe {
        crate::shim::plumb_clip_grad_norm(pointers.as_ptr(), pointers.len() as std::os::raw::c_int, max_norm, &mut norm)
    };
    crate::shim::check(code, "clipping the gradients")?;
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_scales_to_the_max_norm_and_returns_the_old_norm() {
        let a = Tensor::from_slice(&[3.0f32]).set_requires_grad(true);
        let b = Tensor::from_slice(&[0.0f32]).set_requires_grad(true);
        (&a * 1.0 + &b * 4.0).sum(tch::Kind::Float).backward();
        // d/da = 1, d/db = 4: norm sqrt(17)
        let norm = clip_grad_norm(&[&a, &b], 1.0).unwrap();
        assert!((norm - 17f64.sqrt()).abs() < 1e-5);
        let clipped = (a.grad().square() + b.grad().square()).sqrt().double_value(&[0]);
        assert!((clipped - 1.0).abs() < 1e-5, "{clipped}");
        assert!((clip_factor(norm, 1.0) - 1.0 / (norm + 1e-6)).abs() < 1e-12 && clip_factor(norm, 1.0) < 0.25);
        assert_eq!((clip_factor(0.5, 1.0), clip_factor(f64::NAN, 1.0), clip_factor(3.0, 0.0)), (1.0, 1.0, 1.0));
    }
}
