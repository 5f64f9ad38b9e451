//! Self-consistency (Wang et al., 2022, <https://arxiv.org/abs/2203.11171>): a majority
//! vote over the canonical answers of several sampled chains; maj@k and pass@k from one
//! sampling run of n chains; and the Wilson score interval of an accuracy.
//!
//! Rules, fixed against lm-evaluation-harness (whose vote counts raw strings, so `1,000`
//! and `1000` split, and whose `[invalid]` can win):
//! - answers are voted in canonical form (the extraction normalises them);
//! - a chain with no answer casts no vote: "no number" never wins, and a question whose
//!   chains all lack an answer has no answer (counted wrong);
//! - **ties** go to the numerically smallest of the tied answers. The rule does not
//!   depend on the order of the chains, so a vote is the same however the samples were
//!   batched, and maj@k has the exact closed form below.
use std::cmp::Ordering;
use std::collections::BTreeMap;

/// The winner of a vote and how many votes each answer got.
#[derive(Debug, Clone, PartialEq)]
pub struct Vote {
    /// None when no chain gave an answer.
    pub winner: Option<String>,
    /// Votes per canonical answer (chains without an answer are not counted).
    pub counts: BTreeMap<String, usize>,
}

/// Numeric order of canonical answers (as written by `normalize_number`), falling back
/// to text order for any that does not parse.
pub fn numeric_order(a: &str, b: &str) -> Ordering {
    match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) => x.partial_cmp(&y).unwrap_or(Ordering::Equal).then_with(|| a.cmp(b)),
        _ => a.cmp(b),
    }
}

/// Majority vote over `answers` (one per chain); see the module doc for the rules.
pub fn majority(answers: &[Option<String>]) -> Vote {
    let mut counts = BTreeMap::new();
    for answer in answers.iter().flatten() {
        *counts.entry(answer.clone()).or_insert(0usize) += 1;
    }
    let winner = counts
        .iter()
        .max_by(|(a, ca), (b, cb)| ca.cmp(cb).then_with(|| numeric_order(b, a)))
        .map(|(answer, _)| answer.clone());
    Vote { winner, counts }
}

/// C(n, k) as a float (exact up to 2^53, then to float precision).
pub fn binomial(n: usize, k: usize) -> f64 {
    if k > n {
        return 0.0;
    }
    let k = k.min(n - k);
    (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
}

/// Unbiased pass@k from n chains of which c are correct (Chen et al., 2021, the Codex
/// paper): 1 − C(n−c, k) / C(n, k), which is 1 when n − c < k. Computed as the product
/// ∏_{i=n−c+1}^{n} (1 − k/i), stable for large n.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    assert!(k >= 1 && k <= n && c <= n, "pass@k needs 1 <= k <= n and c <= n (n={n}, c={c}, k={k})");
    if n - c < k {
        return 1.0;
    }
    1.0 - ((n - c + 1)..=n).map(|i| 1.0 - k as f64 / i as f64).product::<f64>()
}

/// maj@k: the probability that the majority vote of k chains drawn without replacement
/// from the n in `answers` is `target`, i.e. the mean over all C(n, k) subsets, not only
/// the first k chains.
///
/// Exact: with c_t chains answering `target`, a subset holding s of them (C(c_t, s) ways)
/// wins when every other answer j gets fewer votes than s (at most s − 1 if j is
/// numerically smaller and so wins a tie, at most s otherwise), while chains with no
/// answer are free. Counting the ways the other k − s chains fall is the coefficient of
/// z^(k−s) in ∏_j Σ_{x ≤ bound_j} C(c_j, x) z^x · (1 + z)^(c_none).
pub fn maj_at_k(answers: &[Option<String>], target: &str, k: usize) -> f64 {
    let n = answers.len();
    assert!(k >= 1 && k <= n, "maj@k needs 1 <= k <= n (n={n}, k={k})");
    let vote = majority(answers);
    let Some(&c_target) = vote.counts.get(target) else {
        return 0.0;
    };
    let none = answers.iter().filter(|a| a.is_none()).count();
    let mut favourable = 0.0;
    for s in 1..=c_target.min(k) {
        // Polynomial in z: ways[m] = ways to pick m chains among the others.
        let mut ways = vec![0.0; k - s + 1];
        ways[0] = 1.0;
        let mut multiply = |count: usize, bound: usize| {
            let factor: Vec<f64> = (0..=bound.min(count)).map(|x| binomial(count, x)).collect();
            let mut next = vec![0.0; ways.len()];
            for (m, w) in ways.iter().enumerate().filter(|(_, w)| **w != 0.0) {
                for (x, f) in factor.iter().enumerate().take(ways.len() - m) {
                    next[m + x] += w * f;
                }
            }
            ways = next;
        };
        for (answer, &count) in vote.counts.iter().filter(|(a, _)| a.as_str() != target) {
            let wins_ties = numeric_order(answer, target) == Ordering::Less;
            multiply(count, if wins_ties { s - 1 } else { s });
        }
        multiply(none, none);
        favourable += binomial(c_target, s) * ways[k - s];
    }
    favourable / binomial(n, k)
}

/// The Wilson score interval at 95% (z = 1.96) of `correct` successes out of `n`:
/// unlike the normal approximation it stays inside [0, 1] and is sensible at 0% and
/// 100%, which small evaluation sets hit.
pub fn wilson_95(correct: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let z = 1.959_963_984_540_054_f64;
    let (n, p) = (n as f64, correct as f64 / n as f64);
    let denominator = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denominator;
    let half = z / denominator * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt();
    // At 0% and 100% the bound is exactly 0 or 1; say so rather than 1 - 1e-16.
    let low = if correct == 0 { 0.0 } else { (centre - half).max(0.0) };
    let high = if correct as f64 == n { 1.0 } else { (centre + half).min(1.0) };
    (low, high)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chains(answers: &[Option<&str>]) -> Vec<Option<String>> {
        answers.iter().map(|a| a.map(str::to_string)).collect()
    }

    #[test]
    fn no_number_never_wins_and_ties_go_to_the_smallest() {
        let v = majority(&chains(&[None, None, None, Some("7")]));
        assert_eq!(v.winner.as_deref(), Some("7"));
        assert_eq!(majority(&chains(&[None, None])).winner, None);
        // A tie between 12 and 9 (text order would pick "12"): the smaller number wins,
        // whatever the order of the chains.
        assert_eq!(majority(&chains(&[Some("12"), Some("9"), Some("12"), Some("9")])).winner.as_deref(), Some("9"));
        assert_eq!(majority(&chains(&[Some("9"), Some("12"), Some("9"), Some("12")])).winner.as_deref(), Some("9"));
        assert_eq!(majority(&chains(&[Some("-1"), Some("0.5")])).winner.as_deref(), Some("-1"));
        assert_eq!(majority(&chains(&[Some("12"), Some("9"), Some("12")])).winner.as_deref(), Some("12"));
    }

    #[test]
    fn pass_at_k_closed_forms() {
        assert!((pass_at_k(10, 3, 1) - 0.3).abs() < 1e-12);
        // 1 − C(7,5)/C(10,5) = 1 − 21/252.
        assert!((pass_at_k(10, 3, 5) - (1.0 - 21.0 / 252.0)).abs() < 1e-12);
        assert_eq!(pass_at_k(10, 3, 8), 1.0); // n − c = 7 < 8
        assert!(pass_at_k(8, 0, 8).abs() < 1e-12);
        assert_eq!(pass_at_k(8, 8, 1), 1.0);
        // 1 − C(4,2)/C(8,2) = 1 − 6/28.
        assert!((pass_at_k(8, 4, 2) - (1.0 - 6.0 / 28.0)).abs() < 1e-12);
    }

    #[test]
    fn maj_at_k_closed_forms() {
        // Chains [5, 5, 7], target 5: k=1 → 2/3; k=2 → {5,5} wins, {5,7} ties and 5 is
        // smaller, so 1; k=3 → 1.
        let a = chains(&[Some("5"), Some("5"), Some("7")]);
        assert!((maj_at_k(&a, "5", 1) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(maj_at_k(&a, "5", 2), 1.0);
        assert_eq!(maj_at_k(&a, "5", 3), 1.0);
        // Chains [7, 7, 5], target 7: k=2 → {7,7} wins (1 of 3 pairs), {7,5} tie goes to 5.
        let b = chains(&[Some("7"), Some("7"), Some("5")]);
        assert!((maj_at_k(&b, "7", 2) - 1.0 / 3.0).abs() < 1e-12);
        // [3, none, none, 4], target 3, k=2: of 6 pairs, {3,none}×2 win, {3,4} ties and 3
        // is smaller: 3/6.
        let c = chains(&[Some("3"), None, None, Some("4")]);
        assert!((maj_at_k(&c, "3", 2) - 0.5).abs() < 1e-12);
        assert_eq!(maj_at_k(&c, "8", 2), 0.0);
    }

    /// maj@k against brute force: the mean of the vote over every k-subset.
    #[test]
    fn maj_at_k_is_the_mean_over_all_subsets() {
        let a =
            chains(&[Some("18"), None, Some("20"), Some("18"), Some("-2"), Some("20"), Some("18"), None, Some("20")]);
        let n = a.len();
        for target in ["18", "20", "-2"] {
            for k in 1..=n {
                let (mut wins, mut subsets) = (0usize, 0usize);
                for mask in 0u32..(1 << n) {
                    if mask.count_ones() as usize != k {
                        continue;
                    }
                    let subset: Vec<Option<String>> =
                        (0..n).filter(|i| mask & (1 << i) != 0).map(|i| a[i].clone()).collect();
                    subsets += 1;
                    wins += usize::from(majority(&subset).winner.as_deref() == Some(target));
                }
                let brute = wins as f64 / subsets as f64;
                assert!((maj_at_k(&a, target, k) - brute).abs() < 1e-12, "target {target}, k {k}");
            }
        }
    }

    #[test]
    fn wilson_interval() {
        // 8 of 10: the textbook values 0.4902, 0.9433.
        let (low, high) = wilson_95(8, 10);
        assert!((low - 0.4902).abs() < 1e-4 && (high - 0.9433).abs() < 1e-4, "{low} {high}");
        let (low, high) = wilson_95(10, 10);
        assert!((low - 0.7225).abs() < 1e-4 && (high - 1.0).abs() < 1e-12, "{low} {high}");
        assert_eq!(wilson_95(0, 10).0, 0.0);
    }
}
