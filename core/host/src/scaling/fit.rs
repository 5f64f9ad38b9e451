//! Scaling-law fits to (N, D, loss) points.
//!
//! - Chinchilla's parametric law (Hoffmann et al. 2022, "Training Compute-Optimal Large
//!   Language Models", approach 3): L(N, D) = E + A/N^α + B/D^β, fitted as they do — in
//!   log space, log L̂ = LSE(a − α log N, b − β log D, e) with A = eᵃ, B = eᵇ, E = eᵉ,
//!   minimising the Huber loss (δ = 10⁻³) of the log-residuals with L-BFGS from every
//!   start of their grid, keeping the best. Confidence intervals come from a bootstrap
//!   over the points (as Besiroglu et al. 2024, "Chinchilla Scaling: A replication
//!   attempt", report them).
//! - Kaplan et al. 2020's single-variable laws L(N) = (N_c/N)^α_N and L(D) = (D_c/D)^α_D,
//!   fitted by least squares in log-log space, each on the frontier of the points: for
//!   each N the lowest loss over D (the data-rich limit), and for each D the lowest over N.
//!
//! N counts non-embedding parameters, D training tokens, and compute C ≈ 6ND FLOPs.
use serde::{Deserialize, Serialize};

use super::lbfgs::Lbfgs;
use crate::scaling::rng::SplitMix;

/// One training run: its size, its tokens, its final validation loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub n: f64,
    pub d: f64,
    pub loss: f64,
}

/// L(N, D) = E + A/N^α + B/D^β.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Chinchilla {
    pub e: f64,
    pub a: f64,
    pub b: f64,
    pub alpha: f64,
    pub beta: f64,
}

impl Chinchilla {
    /// Hoffmann et al.'s published fit.
    pub const HOFFMANN: Chinchilla = Chinchilla { e: 1.69, a: 406.4, b: 410.7, alpha: 0.34, beta: 0.28 };
    /// Besiroglu et al.'s (Epoch AI) replication of it.
    pub const EPOCH: Chinchilla = Chinchilla { e: 1.8169, a: 482.01, b: 2085.43, alpha: 0.3478, beta: 0.3658 };

    pub fn loss(&self, n: f64, d: f64) -> f64 {
        self.e + self.a / n.powf(self.alpha) + self.b / d.powf(self.beta)
    }

    /// The (N, D) that minimise the loss at compute `c` = 6ND (Hoffmann et al., eq. 4):
    /// N* = G (C/6)^(β/(α+β)), D* = G⁻¹ (C/6)^(α/(α+β)), G = (αA/(βB))^(1/(α+β)).
    pub fn compute_optimal(&self, c: f64) -> (f64, f64) {
        let sum = self.alpha + self.beta;
        let g = (self.alpha * self.a / (self.beta * self.b)).powf(1.0 / sum);
        (g * (c / 6.0).powf(self.beta / sum), (c / 6.0).powf(self.alpha / sum) / g)
    }

    fn from_log(theta: &[f64]) -> Self {
        Self { a: theta[0].exp(), b: theta[1].exp(), e: theta[2].exp(), alpha: theta[3], beta: theta[4] }
    }
}

/// The Huber loss's threshold on log-residuals, as Hoffmann et al. use it.
pub const HUBER_DELTA: f64 = 1e-3;

fn huber(r: f64) -> (f64, f64) {
    if r.abs() <= HUBER_DELTA {
        (0.5 * r * r, r)
    } else {
        (HUBER_DELTA * (r.abs() - 0.5 * HUBER_DELTA), HUBER_DELTA * r.signum())
    }
}

/// Σ Huber(LSE(a − α log N, b − β log D, e) − log L) over the points, and its gradient
/// in θ = (a, b, e, α, β).
fn objective(points: &[(f64, f64, f64)], theta: &[f64], grad: &mut [f64]) -> f64 {
    let (a, b, e, alpha, beta) = (theta[0], theta[1], theta[2], theta[3], theta[4]);
    grad.iter_mut().for_each(|g| *g = 0.0);
    let mut total = 0.0;
    for &(log_n, log_d, log_l) in points {
        let terms = [a - alpha * log_n, b - beta * log_d, e];
        let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let exps = terms.map(|t| (t - max).exp());
        let sum: f64 = exps.iter().sum();
        let lse = max + sum.ln();
        let (value, slope) = huber(lse - log_l);
        total += value;
        let w = exps.map(|x| x / sum);
        grad[0] += slope * w[0];
        grad[1] += slope * w[1];
        grad[2] += slope * w[2];
        grad[3] -= slope * w[0] * log_n;
        grad[4] -= slope * w[1] * log_d;
    }
    total
}

fn logs(points: &[Point]) -> Vec<(f64, f64, f64)> {
    points.iter().map(|p| (p.n.ln(), p.d.ln(), p.loss.ln())).collect()
}

/// Hoffmann et al.'s grid of starts: α, β ∈ {0, 0.5, …, 2}, e ∈ {−1, −0.5, …, 1},
/// a, b ∈ {0, 5, …, 25}.
fn grid() -> Vec<[f64; 5]> {
    let half = |k: usize| (0..k).map(|i| i as f64 * 0.5);
    let mut starts = Vec::new();
    for a in (0..6).map(|i| i as f64 * 5.0) {
        for b in (0..6).map(|i| i as f64 * 5.0) {
            for e in half(5).map(|v| v - 1.0) {
                for alpha in half(5) {
                    for beta in half(5) {
                        starts.push([a, b, e, alpha, beta]);
                    }
                }
            }
        }
    }
    starts
}

/// The best Chinchilla fit over `starts`, and its objective.
fn fit_from(points: &[(f64, f64, f64)], starts: &[[f64; 5]]) -> (Chinchilla, f64) {
    let optimizer = Lbfgs { max_iterations: 300, ..Lbfgs::default() };
    let mut best: Option<(Vec<f64>, f64)> = None;
    for start in starts {
        let min = optimizer.minimize(|theta, grad| objective(points, theta, grad), start);
        let sane = min.value.is_finite() && min.x[3] > 0.0 && min.x[4] > 0.0;
        if sane && best.as_ref().is_none_or(|(_, v)| min.value < *v) {
            best = Some((min.x, min.value));
        }
    }
    let (theta, value) = best.unwrap_or((starts[0].to_vec(), f64::INFINITY));
    (Chinchilla::from_log(&theta), value)
}

/// A 95% interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub low: f64,
    pub high: f64,
}

/// The Chinchilla law fitted to a sweep, with bootstrap intervals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChinchillaFit {
    pub law: Chinchilla,
    /// Σ Huber of the log-residuals at the optimum.
    pub huber_loss: f64,
    /// 1 − SS_res/SS_tot of the losses.
    pub r_squared: f64,
    pub points: usize,
    /// 95% bootstrap intervals of E, A, B, α, β and of a/b = β/(α+β), α/(α+β), the
    /// exponents of N*(C) and D*(C).
    pub intervals: std::collections::BTreeMap<String, Interval>,
    pub bootstrap_samples: usize,
}

/// Fits L(N, D) to `points` (at least 5, with at least 2 distinct N and 2 distinct D),
/// with `bootstrap` resamples for the intervals (seeded by `seed`).
pub fn fit_chinchilla(points: &[Point], bootstrap: usize, seed: u64) -> Result<ChinchillaFit, String> {
    check_points(points)?;
    let log_points = logs(points);
    let (law, huber_loss) = fit_from(&log_points, &grid());
    let mean = points.iter().map(|p| p.loss).sum::<f64>() / points.len() as f64;
    let ss_tot: f64 = points.iter().map(|p| (p.loss - mean).powi(2)).sum();
    let ss_res: f64 = points.iter().map(|p| (p.loss - law.loss(p.n, p.d)).powi(2)).sum();
    let r_squared = if ss_tot > 0.0 { 1.0 - ss_res / ss_tot } else { f64::NAN };

    // Bootstrap: refit on resampled points, from the full fit and a few grid starts
    // around it (the full grid each time would cost thousands of fits per sample).
    let best = [law.a.ln(), law.b.ln(), law.e.ln(), law.alpha, law.beta];
    let starts: Vec<[f64; 5]> = vec![
        best,
        [best[0], best[1], best[2] - 0.5, best[3], best[4]],
        [best[0] + 2.0, best[1] + 2.0, best[2], best[3] + 0.1, best[4] + 0.1],
        [best[0] - 2.0, best[1] - 2.0, best[2], (best[3] - 0.1).max(0.01), (best[4] - 0.1).max(0.01)],
    ];
    let mut rng = SplitMix::new(seed);
    let mut samples: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for _ in 0..bootstrap {
        let resampled: Vec<(f64, f64, f64)> =
            (0..log_points.len()).map(|_| log_points[rng.below(log_points.len())]).collect();
        let (l, _) = fit_from(&resampled, &starts);
        let sum = l.alpha + l.beta;
        for (name, value) in [
            ("E", l.e),
            ("A", l.a),
            ("B", l.b),
            ("alpha", l.alpha),
            ("beta", l.beta),
            ("n_opt_exponent", l.beta / sum),
            ("d_opt_exponent", l.alpha / sum),
        ] {
            samples.entry(name).or_default().push(value);
        }
    }
    let intervals = samples
        .into_iter()
        .map(|(name, mut values)| {
            values.sort_by(f64::total_cmp);
            let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
            (name.to_owned(), Interval { low: at(0.025), high: at(0.975) })
        })
        .collect();
    Ok(ChinchillaFit { law, huber_loss, r_squared, points: points.len(), intervals, bootstrap_samples: bootstrap })
}

fn check_points(points: &[Point]) -> Result<(), String> {
    if let Some(p) = points.iter().find(|p| !(p.n > 0.0 && p.d > 0.0 && p.loss > 0.0 && p.loss.is_finite())) {
        return Err(format!("every point needs N > 0, D > 0 and a finite loss > 0; found {p:?}"));
    }
    let distinct = |f: fn(&Point) -> f64| {
        let mut v: Vec<f64> = points.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.dedup();
        v.len()
    };
    if points.len() < 5 || distinct(|p| p.n) < 2 || distinct(|p| p.d) < 2 {
        return Err(format!(
            "a fit of L(N, D) needs at least 5 runs over at least 2 model sizes and 2 token budgets; found {} runs, {} sizes, {} budgets",
            points.len(),
            distinct(|p| p.n),
            distinct(|p| p.d)
        ));
    }
    Ok(())
}

/// Kaplan's L(X) = (X_c/X)^α: `exponent` α and `scale` X_c, with the R² of the log-log fit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PowerLaw {
    pub exponent: f64,
    pub scale: f64,
    pub r_squared: f64,
    pub points: usize,
}

impl PowerLaw {
    pub fn loss(&self, x: f64) -> f64 {
        (self.scale / x).powf(self.exponent)
    }
}

/// Kaplan's L(N) (`by_n`) or L(D) on the frontier: for each distinct value of the
/// variable, the lowest loss over the other; least squares of log L on log X.
pub fn fit_kaplan(points: &[Point], by_n: bool) -> Option<PowerLaw> {
    let mut frontier: Vec<(f64, f64)> = Vec::new();
    for p in points {
        let x = if by_n { p.n } else { p.d };
        match frontier.iter_mut().find(|(v, _)| *v == x) {
            Some(entry) => entry.1 = entry.1.min(p.loss),
            None => frontier.push((x, p.loss)),
        }
    }
    if frontier.len() < 2 {
        return None;
    }
    let xs: Vec<f64> = frontier.iter().map(|(x, _)| x.ln()).collect();
    let ys: Vec<f64> = frontier.iter().map(|(_, l)| l.ln()).collect();
    let n = xs.len() as f64;
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let sxx: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    let sxy: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let slope = sxy / sxx;
    let intercept = my - slope * mx;
    let ss_tot: f64 = ys.iter().map(|y| (y - my).powi(2)).sum();
    let ss_res: f64 = xs.iter().zip(&ys).map(|(x, y)| (y - intercept - slope * x).powi(2)).sum();
    let exponent = -slope;
    Some(PowerLaw {
        exponent,
        scale: (intercept / exponent).exp(),
        r_squared: if ss_tot > 0.0 { 1.0 - ss_res / ss_tot } else { f64::NAN },
        points: frontier.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points of `law` on a grid of N × D like a real sweep's (several sizes, several
    /// budgets each), with multiplicative noise of relative size `noise`.
    fn synthetic(law: &Chinchilla, noise: f64, seed: u64) -> Vec<Point> {
        let mut rng = SplitMix::new(seed);
        let mut points = Vec::new();
        for i in 0..8 {
            let n = 1e7 * 10f64.powf(i as f64 * 0.45);
            for j in 0..6 {
                let d = 20.0 * n * 10f64.powf(j as f64 * 0.4 - 1.0);
                let loss = law.loss(n, d) * (1.0 + noise * rng.normal());
                points.push(Point { n, d, loss });
            }
        }
        points
    }

    /// The tolerances the fit meets on 48 points with 0.5% multiplicative noise: E within
    /// 0.05, α and β within 0.03, A and B within a factor e^0.3; R² above 0.99; the
    /// bootstrap's 95% intervals of α and β hold the truth (to 0.03).
    fn assert_recovers(truth: Chinchilla) {
        let points = synthetic(&truth, 0.005, 7);
        let fit = fit_chinchilla(&points, 20, 1).unwrap();
        let law = fit.law;
        assert!((law.e - truth.e).abs() < 0.05, "E {} vs {}", law.e, truth.e);
        assert!((law.alpha - truth.alpha).abs() < 0.03, "alpha {} vs {}", law.alpha, truth.alpha);
        assert!((law.beta - truth.beta).abs() < 0.03, "beta {} vs {}", law.beta, truth.beta);
        assert!((law.a.ln() - truth.a.ln()).abs() < 0.3, "A {} vs {}", law.a, truth.a);
        assert!((law.b.ln() - truth.b.ln()).abs() < 0.3, "B {} vs {}", law.b, truth.b);
        assert!(fit.r_squared > 0.99, "{}", fit.r_squared);
        // The intervals hold the truth's exponents.
        for (name, value) in [("alpha", truth.alpha), ("beta", truth.beta)] {
            let i = fit.intervals[name];
            assert!(i.low < i.high, "{name}: {i:?}");
            assert!(i.low - 0.03 <= value && value <= i.high + 0.03, "{name} {value} outside {i:?}");
        }
        // The compute-optimal frontier is where the fitted loss is lowest at fixed compute.
        let c = 1e21;
        let (n_opt, d_opt) = law.compute_optimal(c);
        assert!((6.0 * n_opt * d_opt / c - 1.0).abs() < 1e-9);
        for factor in [0.5, 2.0] {
            let (n, d) = (n_opt * factor, c / (6.0 * n_opt * factor));
            assert!(law.loss(n, d) > law.loss(n_opt, d_opt));
        }
    }

    #[test]
    fn recovers_hoffmanns_published_constants() {
        assert_recovers(Chinchilla::HOFFMANN);
    }

    #[test]
    fn recovers_the_epoch_replications_constants() {
        assert_recovers(Chinchilla::EPOCH);
    }

    #[test]
    fn hoffmanns_compute_optimal_exponents_follow_from_alpha_and_beta() {
        // a = β/(α+β) ≈ 0.45, b = α/(α+β) ≈ 0.55 for the published fit.
        let law = Chinchilla::HOFFMANN;
        let (n1, d1) = law.compute_optimal(1e20);
        let (n2, d2) = law.compute_optimal(1e22);
        assert!(((n2 / n1).log10() / 2.0 - 0.28 / 0.62).abs() < 1e-9);
        assert!(((d2 / d1).log10() / 2.0 - 0.34 / 0.62).abs() < 1e-9);
    }

    #[test]
    fn kaplans_power_law_is_recovered_on_the_frontier() {
        let (alpha_n, n_c) = (0.076, 8.8e13);
        let points: Vec<Point> = (0..6)
            .flat_map(|i| {
                let n = 1e6 * 10f64.powi(i);
                // The most data-rich run at each size sits on the law; others above it.
                [
                    Point { n, d: 1e12, loss: (n_c / n).powf(alpha_n) },
                    Point { n, d: 1e9, loss: (n_c / n).powf(alpha_n) + 0.3 },
                ]
            })
            .collect();
        let law = fit_kaplan(&points, true).unwrap();
        assert!((law.exponent - alpha_n).abs() < 1e-9 && (law.scale / n_c - 1.0).abs() < 1e-6, "{law:?}");
        assert!((law.r_squared - 1.0).abs() < 1e-12);
    }

    #[test]
    fn too_few_points_are_refused_with_counts() {
        let points = vec![Point { n: 1e6, d: 1e8, loss: 3.0 }; 6];
        let err = fit_chinchilla(&points, 0, 0).unwrap_err();
        assert!(err.contains("found 6 runs, 1 sizes, 1 budgets"), "{err}");
    }
}
