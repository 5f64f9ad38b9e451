//! Problems to evaluate on: GSM8K's JSONL (`question`, `answer` whose solution ends with
//! `#### N`) or a user's own JSONL with the two fields named in the recipe, where the
//! answer is either a solution ending in `#### N` / "The answer is N" or just a number.
//! The question may also be a chat conversation (a list of `{role, content}` turns, as RL
//! prompt files hold them): its last user turn is the question, so a PPO or GRPO stage's
//! own prompts (`fields: {question: messages, answer: reference}`) can be evaluated.
//!
//! GSM8K's test set (`data/gsm8k/test.jsonl`, MIT license, see `data/gsm8k/SOURCE.md`)
//! is built into the plugin, so `plumb eval --evaluator cot.gsm8k` needs no data path.
use std::path::{Path, PathBuf};

use plumb_core::error::IoResultExt;
use plumb_core::reward::answer::{extract_strict, normalize_number, numbers};
use plumb_core::{Error, Result};
use serde::Deserialize;

/// GSM8K's 1,319 test problems, as shipped in `data/gsm8k/test.jsonl`.
pub const GSM8K_TEST: &str = include_str!("../../../data/gsm8k/test.jsonl");
/// The name the recipe uses for the built-in test set.
pub const GSM8K_TEST_NAME: &str = "gsm8k:test";

/// One problem: the question, the reference solution as written, and its final number.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub question: String,
    /// The answer field as written (for GSM8K, the worked solution and `#### N`).
    pub solution: String,
    /// The canonical final number ([`normalize_number`]).
    pub target: String,
}

impl Problem {
    /// The solution's reasoning as an exemplar shows it: calculator annotations `<<…>>`
    /// and the `#### N` line removed, so only what a person would write remains.
    pub fn rationale(&self) -> String {
        let before_marker = self.solution.rsplit_once("####").map_or(self.solution.as_str(), |(r, _)| r);
        strip_annotations(before_marker).trim().to_string()
    }
}

/// `a = <<3*4=12>>12` → `a = 12`: GSM8K's calculator annotations left out.
pub fn strip_annotations(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find("<<") {
        match rest[open..].find(">>") {
            Some(close) => {
                out.push_str(&rest[..open]);
                rest = &rest[open + close + 2..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out
}

/// Which fields of a JSONL line hold the question and the answer.
#[derive(Debug, Clone, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Fields {
    /// The field holding the question.
    #[serde(default = "default_question")]
    pub question: String,
    /// The field holding the reference answer (GSM8K's, with its `#### N` final line).
    #[serde(default = "default_answer")]
    pub answer: String,
}

impl Default for Fields {
    fn default() -> Self {
        Self { question: default_question(), answer: default_answer() }
    }
}

fn default_question() -> String {
    "question".into()
}

fn default_answer() -> String {
    "answer".into()
}

/// Where problems come from: the built-in GSM8K test set or a JSONL file.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Gsm8kTest,
    File(PathBuf),
}

impl Source {
    pub fn parse(text: &Path) -> Self {
        if text.as_os_str() == GSM8K_TEST_NAME {
            Source::Gsm8kTest
        } else {
            Source::File(text.to_path_buf())
        }
    }

    /// The name errors and reports use.
    pub fn name(&self) -> PathBuf {
        match self {
            Source::Gsm8kTest => PathBuf::from(GSM8K_TEST_NAME),
            Source::File(p) => p.clone(),
        }
    }

    pub fn read(&self, fields: &Fields) -> Result<Vec<Problem>> {
        match self {
            Source::Gsm8kTest => parse_problems(GSM8K_TEST, Path::new(GSM8K_TEST_NAME), fields),
            Source::File(path) => {
                let text = std::fs::read_to_string(path).at(path)?;
                parse_problems(&text, path, fields)
            }
        }
    }
}

/// The content of the last `user` turn of a chat conversation.
fn last_user_turn(turns: &[serde_json::Value]) -> Option<String> {
    turns.iter().rev().find_map(|turn| {
        let turn = turn.as_object()?;
        (turn.get("role")?.as_str()? == "user").then(|| turn.get("content")?.as_str().map(str::to_string))?
    })
}

/// Problems of JSONL `text` (read from `path`, named in errors with the line): blank lines
/// are skipped; a line that is not a JSON object, lacks a field, or whose answer holds no
/// final number is an error.
pub fn parse_problems(text: &str, path: &Path, fields: &Fields) -> Result<Vec<Problem>> {
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(text);
    let mut problems = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let at = |message: String| Error::file(path, format!("line {}: {message}", i + 1));
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| at(format!("not JSON: {e}")))?;
        let object = value.as_object().ok_or_else(|| at("expected a JSON object".into()))?;
        let field = |name: &str| -> Result<String> {
            match object.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
                Some(other) => Err(at(format!("field `{name}`: expected a string or a number, found {other}"))),
                None => Err(at(format!("missing field `{name}`"))),
            }
        };
        let question = match object.get(&fields.question) {
            Some(serde_json::Value::Array(turns)) => last_user_turn(turns).ok_or_else(|| {
                at(format!(
                    "field `{}`: a conversation needs a turn {{\"role\": \"user\", \"content\": \"...\"}}",
                    fields.question
                ))
            })?,
            _ => field(&fields.question)?,
        };
        let solution = field(&fields.answer)?;
        let target = final_number(&solution).ok_or_else(|| {
            at(format!(
                "field `{}`: expected a final number (`#### N`, `The answer is N`, or a number alone), found {:?}",
                fields.answer,
                shorten(&solution)
            ))
        })?;
        problems.push(Problem { question, solution, target });
    }
    if problems.is_empty() {
        return Err(Error::file(path, "no problems: the file has no non-blank line"));
    }
    Ok(problems)
}

/// The reference's final number: strict extraction (`#### N`, "The answer is N"), or the
/// answer's one number when it is nothing but a number (users' own sets).
fn final_number(solution: &str) -> Option<String> {
    extract_strict(solution).or_else(|| {
        let found = numbers(solution);
        (found.len() == 1).then(|| normalize_number(solution)).flatten()
    })
}

fn shorten(text: &str) -> String {
    let mut s: String = text.chars().take(80).collect();
    if s.len() < text.len() {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm8k_test_set_reads_whole_with_integer_targets() {
        let problems = Source::Gsm8kTest.read(&Fields::default()).unwrap();
        assert_eq!(problems.len(), 1319);
        assert_eq!(problems[0].target, "18");
        assert!(problems[0].rationale().ends_with("She makes 9 * 2 = $18 every day at the farmer’s market."));
        assert!(!problems.iter().any(|p| p.rationale().contains("<<")));
    }

    #[test]
    fn own_fields_and_plain_number_answers() {
        let fields = Fields { question: "q".into(), answer: "a".into() };
        let text = "{\"q\": \"2+2?\", \"a\": 4}\n\n{\"q\": \"half of 3?\", \"a\": \"1.50\"}\n";
        let problems = parse_problems(text, Path::new("own.jsonl"), &fields).unwrap();
        assert_eq!(problems.iter().map(|p| p.target.as_str()).collect::<Vec<_>>(), ["4", "1.5"]);
    }

    #[test]
    fn a_conversation_asks_its_last_user_turn() {
        // An RL prompt line: chat turns and a reference number.
        let fields = Fields { question: "messages".into(), answer: "reference".into() };
        let text = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"}], "reference": "4"}"#;
        let problems = parse_problems(text, Path::new("prompts.jsonl"), &fields).unwrap();
        assert_eq!((problems[0].question.as_str(), problems[0].target.as_str()), ("2+2?", "4"));
        let no_user = r#"{"messages": [{"role": "system", "content": "x"}], "reference": "4"}"#;
        let err = parse_problems(no_user, Path::new("prompts.jsonl"), &fields).unwrap_err().to_string();
        assert!(err.starts_with("prompts.jsonl: line 1: field `messages`: a conversation needs a turn"), "{err}");
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let path = Path::new("d.jsonl");
        let err = |text: &str| parse_problems(text, path, &Fields::default()).unwrap_err().to_string();
        assert_eq!(
            err("{\"question\": \"x\", \"answer\": \"#### 3\"}\nnot json\n").split(": not JSON").next(),
            Some("d.jsonl: line 2")
        );
        assert_eq!(err("{\"question\": \"x\"}"), "d.jsonl: line 1: missing field `answer`");
        assert_eq!(
            err("{\"question\": \"x\", \"answer\": \"three or 4 or 5\"}"),
            "d.jsonl: line 1: field `answer`: expected a final number (`#### N`, `The answer is N`, or a number alone), found \"three or 4 or 5\""
        );
        assert_eq!(err("\n\n"), "d.jsonl: no problems: the file has no non-blank line");
        assert_eq!(strip_annotations("2*3 = <<2*3=6>>6 and <<oops"), "2*3 = 6 and <<oops");
    }
}
