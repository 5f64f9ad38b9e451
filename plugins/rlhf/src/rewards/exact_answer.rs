//! `rlhf.exact_answer`: a verifiable reward. The final answer of the response, read as
//! a number, against the reference answer the prompt carries ([`ScorePair::reference`],
//! filled by rollouts from the prompt file).
//!
//! Both sides are compared in canonical form ([`plumb_core::reward::answer`]), so
//! `1,000`, `1000`, `1000.0` and `$1,000` are the same answer. The response's answer is
//! read `strict`ly (after `####` or "The answer is") or `flexible` (its last number). The
//! reference may be a bare number (`1,000`) or a worked solution ending `#### 1000`.
//!
//! ```yaml
//! rewards:
//!   - name: exact
//!     uses: rlhf.exact_answer
//!     config: {extraction: strict, correct: 1.0, wrong: 0.0, no_answer: -0.5}
//! ```
use plumb_core::plugin::{RewardContext, ValidateContext};
use plumb_core::reward::answer::{extract_flexible, extract_strict, normalize_number};
use plumb_core::reward::{RewardModel, ScorePair};
use plumb_core::{Error, Result};
use serde::Deserialize;

use super::finite;

/// How the response's final answer is found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Extraction {
    /// The number after the last `####` or in the last "The answer is N".
    Strict,
    /// The last number in the response.
    #[default]
    Flexible,
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExactAnswerConfig {
    #[serde(default)]
    pub extraction: Extraction,
    /// The score of a response whose answer equals the reference.
    #[serde(default = "one")]
    pub correct: f64,
    /// The score of a response with another answer.
    #[serde(default)]
    pub wrong: f64,
    /// The score of a response in which no answer is found.
    #[serde(default)]
    pub no_answer: f64,
}

fn one() -> f64 {
    1.0
}

pub struct ExactAnswer {
    config: ExactAnswerConfig,
}

impl ExactAnswer {
    /// The response's answer in canonical form, if it has one.
    fn answer(&self, response: &str) -> Option<String> {
        match self.config.extraction {
            Extraction::Strict => extract_strict(response),
            Extraction::Flexible => extract_flexible(response),
        }
    }
}

/// The reference in canonical form: the answer after `####` in a worked solution, else
/// the number it holds.
fn reference(i: usize, pair: &ScorePair) -> Result<String> {
    let text = pair.reference.as_deref().ok_or_else(|| {
        Error::Other(format!(
            "pair {i} carries no reference answer; rlhf.exact_answer needs prompts with one (the prompt file's reference)"
        ))
    })?;
    let marked = text.contains("####").then(|| extract_strict(text)).flatten();
    marked
        .or_else(|| normalize_number(text))
        .ok_or_else(|| Error::Other(format!("the reference answer of pair {i}, `{text}`, holds no number")))
}

impl RewardModel for ExactAnswer {
    fn score(&mut self, pairs: &[ScorePair]) -> Result<Vec<f64>> {
        pairs
            .iter()
            .enumerate()
            .map(|(i, pair)| {
                let expected = reference(i, pair)?;
                Ok(match self.answer(&pair.response) {
                    Some(answer) if answer == expected => self.config.correct,
                    Some(_) => self.config.wrong,
                    None => self.config.no_answer,
                })
            })
            .collect()
    }
}

impl plumb_core::Reward for ExactAnswer {
    const NAME: &'static str = "exact_answer";
    const DESCRIPTION: &'static str = "The response's final answer against the prompt's reference (numbers normalised)";
    type Config = ExactAnswerConfig;

    fn validate(c: &ExactAnswerConfig, _: &ValidateContext) -> Result<()> {
        finite("correct", c.correct)?;
        finite("wrong", c.wrong)?;
        finite("no_answer", c.no_answer)
    }

    fn new(config: ExactAnswerConfig, _: &RewardContext) -> Result<Self> {
        Ok(Self { config })
    }
}

#[cfg(test)]
mod tests {
    use plumb_core::recipe::parse_section;

    use super::*;

    fn reward(yaml: &str) -> ExactAnswer {
        ExactAnswer { config: parse_section(yaml).unwrap() }
    }

    fn pair(response: &str, reference: &str) -> ScorePair {
        ScorePair::new("How many?", response).with_reference(reference)
    }

    #[test]
    fn flexible_reads_the_last_number_and_normalises_both_sides() {
        let mut r = reward("{no_answer: -1}");
        let table = [
            ("So she has 1,000 apples.", "1000", 1.0),
            ("The total is $1000.00", "1,000", 1.0),
            ("1000.0", "#### 1,000", 1.0),
            ("First 12, then 18 - so 18.", "18", 1.0),
            ("It is 17.", "18", 0.0),
            ("I do not know.", "18", -1.0),
            ("-3.50 degrees", "-3.5", 1.0),
            (
                "Natalia sold 48/2 = 24 clips in May.\n#### 72",
                "Natalia sold 48/2 = 24 clips in May. 48+24 = 72.\n#### 72",
                1.0,
            ),
        ];
        let pairs: Vec<ScorePair> = table.iter().map(|(r, t, _)| pair(r, t)).collect();
        let expected: Vec<f64> = table.iter().map(|t| t.2).collect();
        assert_eq!(r.score(&pairs).unwrap(), expected);
    }

    #[test]
    fn strict_needs_the_marker() {
        let mut r = reward("{extraction: strict, correct: 2, wrong: -1, no_answer: -0.5}");
        let table = [
            ("Step by step: 3 + 15 = 18.\n#### 18", 2.0),
            ("The answer is 18", 2.0),
            ("The answer is 1,8000", -1.0),
            ("So 18.", -0.5),
            ("The answer is eighteen", -0.5),
        ];
        let pairs: Vec<ScorePair> = table.iter().map(|(r, _)| pair(r, "18")).collect();
        assert_eq!(r.score(&pairs).unwrap(), table.iter().map(|t| t.1).collect::<Vec<_>>());
    }

    #[test]
    fn a_pair_without_a_usable_reference_is_an_error() {
        let mut r = reward("{}");
        let e = r.score(&[pair("18", "18"), ScorePair::new("q", "18")]).unwrap_err().to_string();
        assert!(e.starts_with("pair 1 carries no reference answer"), "{e}");
        let e = r.score(&[pair("18", "eighteen")]).unwrap_err().to_string();
        assert_eq!(e, "the reference answer of pair 0, `eighteen`, holds no number");
    }

    #[test]
    fn bad_settings_are_errors_at_their_key() {
        let ctx = ValidateContext::new(Vec::new());
        let check = |yaml: &str| {
            <ExactAnswer as plumb_core::Reward>::validate(&parse_section(yaml).unwrap(), &ctx).unwrap_err().to_string()
        };
        assert_eq!(check("{wrong: .inf}"), "wrong: expected a finite number, found inf");
        let e = parse_section::<ExactAnswerConfig>("{extraction: loose}").unwrap_err().to_string();
        assert!(e.starts_with("extraction") && e.contains("strict") && e.contains("flexible"), "{e}");
    }
}
