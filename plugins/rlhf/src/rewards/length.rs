//! `rlhf.length`: a length penalty. With `n` the response's length in `unit`s and `t`
//! the `target`:
//!
//! ```text
//! score = − over · max(0, n − t) − under · max(0, t − n)
//! ```
//!
//! so a response of the target length scores 0, and each unit beyond it costs `over`
//! (each unit short of it, `under`; 0 by default: only long responses are penalised).
//! Characters are Unicode scalar values (`é` is one); words are runs of non-whitespace.
//! Weighted beside another reward in a stage's `RewardSet`, it curbs the length drift
//! PPO is known for.
//!
//! ```yaml
//! rewards:
//!   - name: brevity
//!     uses: rlhf.length
//!     config: {unit: words, target: 200, over: 0.01}
//! ```
use plumb_core::plugin::{RewardContext, ValidateContext};
use plumb_core::reward::{RewardModel, ScorePair};
use plumb_core::{Error, Result};
use serde::Deserialize;

/// What a response's length is counted in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    #[default]
    Chars,
    Words,
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LengthConfig {
    #[serde(default)]
    pub unit: Unit,
    /// The length that costs nothing.
    pub target: usize,
    /// Penalty per unit beyond the target.
    #[serde(default = "one")]
    pub over: f64,
    /// Penalty per unit short of the target.
    #[serde(default)]
    pub under: f64,
}

fn one() -> f64 {
    1.0
}

pub struct Length {
    config: LengthConfig,
}

impl Length {
    fn length(&self, text: &str) -> usize {
        match self.config.unit {
            Unit::Chars => text.chars().count(),
            Unit::Words => text.split_whitespace().count(),
        }
    }
}

impl RewardModel for Length {
    fn score(&mut self, pairs: &[ScorePair]) -> Result<Vec<f64>> {
        let (t, c) = (self.config.target as f64, &self.config);
        Ok(pairs
            .iter()
            .map(|p| {
                let n = self.length(&p.response) as f64;
                -c.over * (n - t).max(0.0) - c.under * (t - n).max(0.0)
            })
            .collect())
    }
}

impl plumb_core::Reward for Length {
    const NAME: &'static str = "length";
    const DESCRIPTION: &'static str = "A penalty per character or word beyond (or below) a target length";
    type Config = LengthConfig;

    fn validate(c: &LengthConfig, _: &ValidateContext) -> Result<()> {
        for (key, value) in [("over", c.over), ("under", c.under)] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(Error::config(key, format!("expected a penalty per unit, a number ≥ 0; found {value}")));
            }
        }
        Ok(())
    }

    fn new(config: LengthConfig, _: &RewardContext) -> Result<Self> {
        Ok(Self { config })
    }
}

#[cfg(test)]
mod tests {
    use plumb_core::recipe::parse_section;
    use plumb_core::Reward;

    use super::*;

    fn scores(yaml: &str, responses: &[&str]) -> Vec<f64> {
        let mut r = Length { config: parse_section(yaml).unwrap() };
        r.score(&responses.iter().map(|s| ScorePair::new("q", *s)).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn the_penalty_follows_the_formula() {
        // chars: 5, 3, 8 (é is one character), 0
        let responses = ["hello", "hey", "héllo yo", ""];
        assert_eq!(scores("{target: 5}", &responses), [0.0, 0.0, -3.0, 0.0]);
        assert_eq!(scores("{target: 5, over: 0.5, under: 2}", &responses), [0.0, -4.0, -1.5, -10.0]);
        // words: 1, 1, 2, 0
        assert_eq!(scores("{unit: words, target: 1, under: 1}", &responses), [0.0, 0.0, -1.0, -1.0]);
        assert_eq!(scores("{unit: words, target: 0, over: 0.25}", &[" a  b\tc\n d "]), [-1.0]);
    }

    #[test]
    fn bad_settings_are_errors_at_their_key() {
        let ctx = ValidateContext::new(Vec::new());
        let e = Length::validate(&parse_section("{target: 3, over: -1}").unwrap(), &ctx).unwrap_err();
        assert_eq!(e.to_string(), "over: expected a penalty per unit, a number ≥ 0; found -1");
        let e = Length::validate(&parse_section("{target: 3, under: .nan}").unwrap(), &ctx).unwrap_err();
        assert_eq!(e.to_string(), "under: expected a penalty per unit, a number ≥ 0; found NaN");
        let e = parse_section::<LengthConfig>("{target: -3}").unwrap_err().to_string();
        assert!(e.starts_with("target"), "{e}");
        let e = parse_section::<LengthConfig>("{over: 1}").unwrap_err().to_string();
        assert!(e.contains("target"), "{e}");
    }
}
