//! Limited-memory BFGS (Nocedal & Wright, *Numerical Optimization*, algorithm 7.4) with a
//! backtracking Armijo line search: the minimiser of the scaling-law fits, which have a
//! handful of parameters and smooth objectives.

/// The minimiser's settings.
#[derive(Debug, Clone, Copy)]
pub struct Lbfgs {
    /// Correction pairs kept.
    pub memory: usize,
    pub max_iterations: usize,
    /// Stop when the gradient's largest component falls below this.
    pub gradient_tolerance: f64,
    /// Stop when an iteration improves the objective by less than this (relative).
    pub value_tolerance: f64,
}

impl Default for Lbfgs {
    fn default() -> Self {
        Self { memory: 10, max_iterations: 500, gradient_tolerance: 1e-9, value_tolerance: 1e-14 }
    }
}

/// Where a minimisation ended.
#[derive(Debug, Clone)]
pub struct Minimum {
    pub x: Vec<f64>,
    pub value: f64,
    pub iterations: usize,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

impl Lbfgs {
    /// Minimises `f` from `x0`; `f` returns the value and writes the gradient.
    pub fn minimize(&self, f: impl Fn(&[f64], &mut [f64]) -> f64, x0: &[f64]) -> Minimum {
        let n = x0.len();
        let mut x = x0.to_vec();
        let mut g = vec![0.0; n];
        let mut value = f(&x, &mut g);
        let mut history: std::collections::VecDeque<(Vec<f64>, Vec<f64>, f64)> = Default::default();
        let mut iterations = 0;
        while iterations < self.max_iterations && value.is_finite() {
            if g.iter().all(|v| v.abs() < self.gradient_tolerance) {
                break;
            }
            iterations += 1;
            // Two-loop recursion: direction = -H g.
            let mut q = g.clone();
            let mut alphas = Vec::with_capacity(history.len());
            for (s, y, rho) in history.iter().rev() {
                let a = rho * dot(s, &q);
                q.iter_mut().zip(y).for_each(|(qi, yi)| *qi -= a * yi);
                alphas.push(a);
            }
            if let Some((s, y, _)) = history.back() {
                let gamma = dot(s, y) / dot(y, y);
                q.iter_mut().for_each(|qi| *qi *= gamma);
            }
            for ((s, y, rho), a) in history.iter().zip(alphas.into_iter().rev()) {
                let b = rho * dot(y, &q);
                q.iter_mut().zip(s).for_each(|(qi, si)| *qi += (a - b) * si);
            }
            let mut direction: Vec<f64> = q.iter().map(|v| -v).collect();
            let mut slope = dot(&direction, &g);
            if slope >= 0.0 {
                // Not a descent direction (curvature information went bad): steepest descent.
                history.clear();
                direction = g.iter().map(|v| -v).collect();
                slope = -dot(&g, &g);
            }
            // Backtracking line search (Armijo condition).
            let mut step = if history.is_empty() { 1.0 / g.iter().map(|v| v.abs()).fold(1.0, f64::max) } else { 1.0 };
            let mut next_g = vec![0.0; n];
            let (next_x, next_value) = loop {
                let candidate: Vec<f64> = x.iter().zip(&direction).map(|(xi, di)| xi + step * di).collect();
                let v = f(&candidate, &mut next_g);
                if v.is_finite() && v <= value + 1e-4 * step * slope {
                    break (candidate, v);
                }
                step *= 0.5;
                if step < 1e-20 {
                    return Minimum { x, value, iterations };
                }
            };
            let s: Vec<f64> = next_x.iter().zip(&x).map(|(a, b)| a - b).collect();
            let y: Vec<f64> = next_g.iter().zip(&g).map(|(a, b)| a - b).collect();
            let sy = dot(&s, &y);
            if sy > 1e-300 {
                history.push_back((s, y, 1.0 / sy));
                if history.len() > self.memory {
                    history.pop_front();
                }
            }
            let improvement = value - next_value;
            x = next_x;
            g = next_g;
            let previous = value;
            value = next_value;
            if improvement.abs() <= self.value_tolerance * previous.abs().max(1e-300) {
                break;
            }
        }
        Minimum { x, value, iterations }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_minimum_of_rosenbrocks_function() {
        let rosenbrock = |x: &[f64], g: &mut [f64]| {
            let (a, b) = (x[0], x[1]);
            g[0] = -2.0 * (1.0 - a) - 400.0 * a * (b - a * a);
            g[1] = 200.0 * (b - a * a);
            (1.0 - a).powi(2) + 100.0 * (b - a * a).powi(2)
        };
        let min = Lbfgs::default().minimize(rosenbrock, &[-1.2, 1.0]);
        assert!((min.x[0] - 1.0).abs() < 1e-5 && (min.x[1] - 1.0).abs() < 1e-5, "{min:?}");
        assert!(min.value < 1e-10);
    }
}
