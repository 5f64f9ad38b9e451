//! Scoring a set of generations (from plumb's own model or from another system) and the
//! report: per-question records, per-extraction summaries with Wilson 95% intervals,
//! maj@k and pass@k, the flat metrics the host logs to TensorBoard, and a table.
use std::collections::BTreeMap;

use plumb_core::plugin::Metrics;
use serde::Serialize;

use crate::data::Problem;
use crate::extract::Extraction;
use crate::vote::{maj_at_k, majority, pass_at_k, wilson_95};

/// What was generated for one question: the texts (each as read for its answer, i.e.
/// with the prompt's answer opening in front), and whether each hit the token limit.
#[derive(Debug, Clone, Default)]
pub struct Generations {
    pub prompt: Option<String>,
    pub texts: Vec<String>,
    pub hit_limit: Vec<bool>,
}

/// One question's record in the report.
#[derive(Debug, Clone, Serialize)]
pub struct QuestionRecord {
    pub index: usize,
    pub question: String,
    pub target: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    pub generations: Vec<String>,
    pub hit_token_limit: Vec<bool>,
    pub strict: Graded,
    pub flexible: Graded,
}

/// One extraction rule applied to a question's generations.
#[derive(Debug, Clone, Serialize)]
pub struct Graded {
    /// The canonical answer of each generation (null: none found).
    pub extracted: Vec<Option<String>>,
    /// Votes per canonical answer.
    pub votes: BTreeMap<String, usize>,
    /// The voted answer (with one generation, its answer).
    pub answer: Option<String>,
    pub correct: bool,
    /// Generations whose answer is the target (for pass@k).
    pub correct_generations: usize,
}

/// Accuracy of one extraction rule over the questions.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    /// Fraction of questions whose (voted) answer is the target.
    pub accuracy: f64,
    /// Wilson score interval at 95%, (low, high).
    pub ci95: (f64, f64),
    /// Questions scored.
    pub n: usize,
    pub correct: usize,
    /// maj@k for k = 1..=samples (present with several generations per question).
    #[serde(rename = "maj@k", skip_serializing_if = "BTreeMap::is_empty")]
    pub maj_at_k: BTreeMap<usize, f64>,
    /// Unbiased pass@k for k = 1..=samples (present with several generations).
    #[serde(rename = "pass@k", skip_serializing_if = "BTreeMap::is_empty")]
    pub pass_at_k: BTreeMap<usize, f64>,
}

/// Everything scored for one mode (or one predictions file).
#[derive(Debug, Clone, Serialize)]
pub struct Scored {
    pub strict: Summary,
    pub flexible: Summary,
    /// Generations in all.
    pub generations: usize,
    /// Generations that stopped at the new-token limit rather than finishing: their
    /// reasoning may have been cut short.
    pub hit_token_limit: usize,
    pub questions: Vec<QuestionRecord>,
}

fn grade(rule: Extraction, texts: &[String], target: &str) -> Graded {
    let extracted: Vec<Option<String>> = texts.iter().map(|t| rule.extract(t)).collect();
    let vote = majority(&extracted);
    let correct_generations = extracted.iter().filter(|a| a.as_deref() == Some(target)).count();
    Graded {
        correct: vote.winner.as_deref() == Some(target),
        answer: vote.winner,
        votes: vote.counts,
        extracted,
        correct_generations,
    }
}

/// Scores `generations` (one entry per problem, in order) against `problems`.
pub fn score(problems: &[Problem], generations: Vec<Generations>) -> Scored {
    assert_eq!(problems.len(), generations.len(), "one set of generations per problem");
    let questions: Vec<QuestionRecord> = problems
        .iter()
        .zip(generations)
        .enumerate()
        .map(|(index, (p, g))| QuestionRecord {
            index,
            question: p.question.clone(),
            target: p.target.clone(),
            prompt: g.prompt,
            strict: grade(Extraction::Strict, &g.texts, &p.target),
            flexible: grade(Extraction::Flexible, &g.texts, &p.target),
            hit_token_limit: if g.hit_limit.is_empty() { vec![false; g.texts.len()] } else { g.hit_limit },
            generations: g.texts,
        })
        .collect();
    let summary = |rule: Extraction| {
        let graded: Vec<&Graded> = questions
            .iter()
            .map(|q| match rule {
                Extraction::Strict => &q.strict,
                Extraction::Flexible => &q.flexible,
            })
            .collect();
        let n = graded.len();
        let correct = graded.iter().filter(|g| g.correct).count();
        // With a different number of generations per question, k runs to the fewest.
        let samples = graded.iter().map(|g| g.extracted.len()).min().unwrap_or(0);
        let (mut maj, mut pass) = (BTreeMap::new(), BTreeMap::new());
        if samples > 1 {
            for k in 1..=samples {
                let mean = |f: &dyn Fn(&(&Graded, &QuestionRecord)) -> f64| {
                    graded.iter().copied().zip(&questions).map(|pair| f(&pair)).sum::<f64>() / n as f64
                };
                maj.insert(k, mean(&|(g, q)| maj_at_k(&g.extracted, &q.target, k)));
                pass.insert(k, mean(&|(g, _)| pass_at_k(g.extracted.len(), g.correct_generations, k)));
            }
        }
        Summary {
            accuracy: correct as f64 / n.max(1) as f64,
            ci95: wilson_95(correct, n),
            n,
            correct,
            maj_at_k: maj,
            pass_at_k: pass,
        }
    };
    Scored {
        strict: summary(Extraction::Strict),
        flexible: summary(Extraction::Flexible),
        generations: questions.iter().map(|q| q.generations.len()).sum(),
        hit_token_limit: questions.iter().map(|q| q.hit_token_limit.iter().filter(|&&h| h).count()).sum(),
        questions,
    }
}

/// The flat metrics of `scored` under `prefix` (`""` or `"few_shot_cot/"`):
/// `{prefix}{strict,flexible}/{accuracy,ci95_low,ci95_high,maj@k,pass@k}` and
/// `{prefix}hit_token_limit`.
pub fn metrics(prefix: &str, scored: &Scored, into: &mut Metrics) {
    for (rule, s) in [("strict", &scored.strict), ("flexible", &scored.flexible)] {
        into.insert(format!("{prefix}{rule}/accuracy"), s.accuracy);
        into.insert(format!("{prefix}{rule}/ci95_low"), s.ci95.0);
        into.insert(format!("{prefix}{rule}/ci95_high"), s.ci95.1);
        for (k, v) in &s.maj_at_k {
            into.insert(format!("{prefix}{rule}/maj@{k}"), *v);
        }
        for (k, v) in &s.pass_at_k {
            into.insert(format!("{prefix}{rule}/pass@{k}"), *v);
        }
    }
    into.insert(format!("{prefix}hit_token_limit"), scored.hit_token_limit as f64);
}

/// A table with one row per mode: accuracy and interval under each rule, the largest
/// maj@k, and how many generations hit the token limit.
pub fn table(rows: &[(&str, &Scored)]) -> String {
    let pct = |s: &Summary| format!("{:5.1}% [{:5.1}, {:5.1}]", 100.0 * s.accuracy, 100.0 * s.ci95.0, 100.0 * s.ci95.1);
    let mut out = format!(
        "{:<18} {:>5}  {:<24} {:<24} {:>14}  {}\n",
        "mode", "n", "strict (95% CI)", "flexible (95% CI)", "strict maj@k", "hit token limit"
    );
    for (name, s) in rows {
        let maj = s.strict.maj_at_k.last_key_value().map_or("-".into(), |(k, v)| format!("maj@{k} {:.1}%", 100.0 * v));
        out.push_str(&format!(
            "{:<18} {:>5}  {:<24} {:<24} {:>14}  {}/{}\n",
            name,
            s.strict.n,
            pct(&s.strict),
            pct(&s.flexible),
            maj,
            s.hit_token_limit,
            s.generations
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(target: &str) -> Problem {
        Problem { question: "q".into(), solution: format!("#### {target}"), target: target.into() }
    }

    #[test]
    fn voting_and_intervals() {
        let problems = [problem("18"), problem("1000")];
        let g = |texts: &[&str]| Generations {
            prompt: None,
            texts: texts.iter().map(|t| t.to_string()).collect(),
            hit_limit: vec![],
        };
        let scored = score(
            &problems,
            vec![
                g(&["The answer is 18", "so 17", "#### 18"]),
                // `1,000` and `1000` vote together; no answer casts no vote.
                g(&["The answer is 1,000.", "The answer is none", "#### 1000.0"]),
            ],
        );
        assert_eq!(scored.strict.correct, 2);
        assert_eq!(scored.questions[1].strict.votes, BTreeMap::from([("1000".to_string(), 2)]));
        assert_eq!(scored.questions[0].flexible.votes.get("17"), Some(&1));
        assert_eq!(scored.strict.ci95, wilson_95(2, 2));
        // pass@1 = mean fraction of correct generations: (2/3 + 2/3) / 2.
        assert!((scored.strict.pass_at_k[&1] - 2.0 / 3.0).abs() < 1e-12);
        assert!((scored.strict.maj_at_k[&1] - 2.0 / 3.0).abs() < 1e-12);
        let mut m = Metrics::new();
        metrics("x/", &scored, &mut m);
        assert_eq!(m["x/strict/accuracy"], 1.0);
        assert!(m.contains_key("x/flexible/maj@3") && m.contains_key("x/strict/pass@2"));
    }
}
