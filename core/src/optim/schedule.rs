//! Learning-rate schedules: linear warmup, then cosine, linear or constant down to a
//! floor of `min_lr_ratio * peak`.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub peak_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub decay: Decay,
    /// The floor, as a fraction of the peak.
    pub min_lr_ratio: f64,
}

impl Schedule {
    /// The learning rate for optimizer step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let floor = self.peak_lr * self.min_lr_ratio;
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let factor = match self.decay {
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Decay::Linear => 1.0 - progress,
            Decay::Constant => 1.0,
        };
        floor + (self.peak_lr - floor) * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(decay: Decay) -> Schedule {
        Schedule { peak_lr: 1e-3, warmup_steps: 10, total_steps: 110, decay, min_lr_ratio: 0.1 }
    }

    #[test]
    fn warmup_is_linear_to_the_peak() {
        let s = schedule(Decay::Cosine);
        assert!((s.lr(0) - 1e-4).abs() < 1e-15);
        assert!((s.lr(4) - 5e-4).abs() < 1e-15);
        assert!((s.lr(9) - 1e-3).abs() < 1e-15);
    }

    #[test]
    fn cosine_decays_to_the_floor_through_the_midpoint() {
        let s = schedule(Decay::Cosine);
        assert!((s.lr(10) - 1e-3).abs() < 1e-15);
        assert!((s.lr(60) - (1e-4 + 0.9e-3 * 0.5)).abs() < 1e-15);
        assert!((s.lr(110) - 1e-4).abs() < 1e-15);
        assert!((s.lr(500) - 1e-4).abs() < 1e-15);
    }

    #[test]
    fn linear_and_constant() {
        assert!((schedule(Decay::Linear).lr(35) - (1e-4 + 0.9e-3 * 0.75)).abs() < 1e-15);
        assert!((schedule(Decay::Constant).lr(100) - 1e-3).abs() < 1e-15);
    }
}
