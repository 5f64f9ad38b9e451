//! The two ways an answer is read out of a generation, over core's numeric
//! normalisation ([`plumb_core::reward::answer`]), so that this evaluator and the
//! exact-answer reward grade alike.
use plumb_core::reward::answer::{extract_flexible, extract_strict};
use serde::Serialize;

/// How the final answer is found in a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Extraction {
    /// The number after the last `####` or in the last "The answer is N".
    Strict,
    /// The last number in the text.
    Flexible,
}

impl Extraction {
    pub const BOTH: [Extraction; 2] = [Extraction::Strict, Extraction::Flexible];

    pub fn name(self) -> &'static str {
        match self {
            Extraction::Strict => "strict",
            Extraction::Flexible => "flexible",
        }
    }

    /// The canonical answer in `text`, or None when it holds none (under this rule).
    pub fn extract(self, text: &str) -> Option<String> {
        match self {
            Extraction::Strict => extract_strict(text),
            Extraction::Flexible => extract_flexible(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Realistic endings of model outputs, and what each rule reads in them.
    #[test]
    fn the_table_of_model_outputs() {
        let table: &[(&str, Option<&str>, Option<&str>)] = &[
            ("Janet has 16 - 3 - 4 = 9 eggs. She makes 9 * 2 = 18 dollars. The answer is 18", Some("18"), Some("18")),
            ("The total is $1,000.00.", None, Some("1000")),
            ("The answer is $1,000.00.", Some("1000"), Some("1000")),
            ("The temperature drops to -3 degrees. The answer is -3.", Some("-3"), Some("-3")),
            ("Each pen costs 2.50 dollars.\n#### 2.50", Some("2.5"), Some("2.5")),
            ("She has 12 apples left.", None, Some("12")),
            ("I cannot solve this problem.", None, None),
            ("48 / 2 = 24 in May, so 48 + 24 = 72 in all.\n#### 72", Some("72"), Some("72")),
            ("He ran 3 laps of 400 meters, 1,200 meters in total", None, Some("1200")),
        ];
        for &(text, strict, flexible) in table {
            assert_eq!(Extraction::Strict.extract(text).as_deref(), strict, "{text:?}");
            assert_eq!(Extraction::Flexible.extract(text).as_deref(), flexible, "{text:?}");
        }
    }
}
