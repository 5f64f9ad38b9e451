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
    }
}
