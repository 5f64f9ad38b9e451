//! `rlhf.regex`: a rule reward. One score when the response matches a pattern, another
//! when it does not: a format check (`<think>…</think>` before the answer, a final line
//! `#### N`, no URLs).
//!
//! The pattern is Rust's [`regex`](https://docs.rs/regex) syntax (no look-around or
//! back-references; flags inline, e.g. `(?is)` for case-insensitive and `.` matching
//! newlines). `mode: search` looks for a match anywhere in the response; `mode: full`
//! needs the whole response to match.
//!
//! ```yaml
//! rewards:
//!   - name: format
//!     uses: rlhf.regex
//!     config: {pattern: '(?s)^<think>.+</think>.*#### -?[0-9]+$', match: 1.0, no_match: -1.0}
//! ```
use plumb_core::plugin::{RewardContext, ValidateContext};
use plumb_core::reward::{RewardModel, ScorePair};
use plumb_core::{Error, Result};
use serde::Deserialize;

use super::finite;

/// Where the pattern must match.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Anywhere in the response.
    #[default]
    Search,
    /// The whole response, first character to last.
    Full,
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegexConfig {
    /// The regular expression (Rust's `regex` syntax) a response is tested against.
    pub pattern: String,
    /// `search` (anywhere in the response) or `full` (the whole response).
    #[serde(default)]
    pub mode: Mode,
    /// The score of a matching response.
    #[serde(rename = "match", default = "one")]
    pub on_match: f64,
    /// The score of any other response.
    #[serde(default)]
    pub no_match: f64,
}

fn one() -> f64 {
    1.0
}

pub struct Regex {
    regex: ::regex::Regex,
    on_match: f64,
    no_match: f64,
}

/// The pattern as it is run: anchored at both ends in `full` mode.
fn compile(c: &RegexConfig) -> Result<::regex::Regex> {
    let pattern = match c.mode {
        Mode::Search => c.pattern.clone(),
        Mode::Full => format!(r"\A(?:{})\z", c.pattern),
    };
    // The regex crate's message shows the pattern and points at the fault.
    ::regex::Regex::new(&pattern).map_err(|e| Error::config("pattern", format!("not a valid regex: {e}")))
}

impl RewardModel for Regex {
    fn score(&mut self, pairs: &[ScorePair]) -> Result<Vec<f64>> {
        Ok(pairs.iter().map(|p| if self.regex.is_match(&p.response) { self.on_match } else { self.no_match }).collect())
    }
}

impl plumb_core::Reward for Regex {
    const NAME: &'static str = "regex";
    const DESCRIPTION: &'static str = "One score when the response matches a pattern, another when not";
    type Config = RegexConfig;

    fn validate(c: &RegexConfig, _: &ValidateContext) -> Result<()> {
        compile(c)?;
        finite("match", c.on_match)?;
        finite("no_match", c.no_match)
    }

    fn new(c: RegexConfig, _: &RewardContext) -> Result<Self> {
        Ok(Self { regex: compile(&c)?, on_match: c.on_match, no_match: c.no_match })
    }
}

#[cfg(test)]
mod tests {
    use plumb_core::recipe::parse_section;
    use plumb_core::Reward;

    use super::*;

    fn scores(yaml: &str, responses: &[&str]) -> Vec<f64> {
        let ctx = RewardContext::new("r", plumb_core::tch::Device::Cpu, 0, "/tmp");
        let mut r = Regex::new(parse_section(yaml).unwrap(), &ctx).unwrap();
        r.score(&responses.iter().map(|s| ScorePair::new("q", *s)).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn search_finds_the_pattern_anywhere_and_full_needs_all_of_it() {
        let responses = ["#### 42", "so #### 42", "#### 42\nthanks", "#### x"];
        assert_eq!(scores("{pattern: '#### -?[0-9]+', match: 2, no_match: -1}", &responses), [2.0, 2.0, 2.0, -1.0]);
        assert_eq!(scores("{pattern: '#### -?[0-9]+', mode: full}", &responses), [1.0, 0.0, 0.0, 0.0]);
        // `full` anchors the whole alternation, not its first branch.
        assert_eq!(scores("{pattern: 'a|b', mode: full}", &["a", "b", "ab"]), [1.0, 1.0, 0.0]);
        let think = "{pattern: '(?s)^<think>.+</think>', mode: search}";
        assert_eq!(
            scores(think, &["<think>\nhmm\n</think> 4", "4 <think>x</think>", "<THINK>x</THINK>"]),
            [1.0, 0.0, 0.0]
        );
        assert_eq!(scores("{pattern: '(?i)^<think>'}", &["<THINK>x"]), [1.0]);
    }

    #[test]
    fn a_bad_pattern_is_an_error_at_pattern() {
        let ctx = ValidateContext::new(Vec::new());
        let e = Regex::validate(&parse_section("{pattern: '(unclosed'}").unwrap(), &ctx).unwrap_err().to_string();
        assert!(e.starts_with("pattern: not a valid regex: ") && e.contains("unclosed group"), "{e}");
        let e = Regex::validate(&parse_section("{pattern: x, no_match: .nan}").unwrap(), &ctx).unwrap_err();
        assert_eq!(e.to_string(), "no_match: expected a finite number, found NaN");
        let e = parse_section::<RegexConfig>("{pattern: x, mode: partial}").unwrap_err().to_string();
        assert!(e.starts_with("mode") && e.contains("search") && e.contains("full"), "{e}");
        let e = parse_section::<RegexConfig>("{match: 1}").unwrap_err().to_string();
        assert!(e.contains("pattern"), "{e}");
    }
}
