//! serde's error messages, rewritten for people who edit YAML.
//!
//! `invalid type: string "abc", expected u64` becomes `expected an unsigned integer, found a
//! string "abc"`; `unknown field `x`, expected one of ...` becomes `unknown key; expected one
//! of ...; did you mean ...?` (the key itself is already at the end of the key path).
//! Anything else (a type's own `custom` message) passes through unchanged.
use serde_yaml::Value;

use super::suggest::{did_you_mean, one_of};

pub fn explain(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if rest.ends_with("`, there are no fields") {
            return "unknown key; nothing is allowed here".into();
        }
        if let Some((field, expected)) = rest.split_once("`, expected ") {
            let names = backticked(expected);
            let hint = did_you_mean(field, names.iter().copied());
            return format!("unknown key; expected {}{hint}", one_of(&names, "no keys here"));
        }
    }
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        if let Some((variant, expected)) = rest.split_once("`, expected ") {
            let names = backticked(expected);
            let hint = did_you_mean(variant, names.iter().copied());
            return format!("unknown value `{variant}`; expected {}{hint}", one_of(&names, "nothing"));
        }
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        return format!("missing required key `{}`", rest.trim_end_matches('`'));
    }
    if let Some(rest) = message.strip_prefix("duplicate field `") {
        return format!("duplicate key `{}`", rest.trim_end_matches('`'));
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some((found, expected)) = message.strip_prefix(prefix).and_then(|rest| rest.rsplit_once(", expected ")) {
            return format!("expected {}, found {}", expected_phrase(expected), found_phrase(found));
        }
    }
    if let Some((length, expected)) = message.strip_prefix("invalid length ").and_then(|r| r.split_once(", expected "))
    {
        return format!("expected {expected}, found {length} elements");
    }
    message.to_owned()
}

/// The names between backticks in serde's "one of `a`, `b`" lists.
fn backticked(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// serde's name for what a type accepts, in YAML words.
fn expected_phrase(expected: &str) -> String {
    let phrase = match expected {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "an unsigned integer",
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "an integer",
        "f32" | "f64" => "a number",
        "a boolean" | "bool" => "a boolean (`true` or `false`)",
        "a string" | "a borrowed string" | "string" => "a string",
        "path string" => "a path",
        "a character" | "char" => "a single character",
        "a sequence" | "sequence" => "a sequence",
        "a map" | "map" | "a YAML mapping" => "a mapping",
        "unit" => "nothing (null)",
        "option" => "a value or null",
        "any YAML value" => "a YAML value",
        other if other.starts_with("struct ") => "a mapping",
        other if other.starts_with("tuple") || other.starts_with("a tuple") => "a sequence",
        other => return other.to_owned(),
    };
    phrase.to_owned()
}

/// serde's `Unexpected` rendering, in YAML words.
fn found_phrase(found: &str) -> String {
    let quoted = |rest: &str| rest.trim_matches('`').to_owned();
    if let Some(rest) = found.strip_prefix("string ") {
        return format!("a string {rest}");
    }
    if let Some(rest) = found.strip_prefix("integer ") {
        return format!("the integer {}", quoted(rest));
    }
    if let Some(rest) = found.strip_prefix("floating point ") {
        return format!("the number {}", quoted(rest));
    }
    if let Some(rest) = found.strip_prefix("boolean ") {
        return format!("the boolean {}", quoted(rest));
    }
    if let Some(rest) = found.strip_prefix("character ") {
        return format!("the character {rest}");
    }
    match found {
        "unit value" => "null (an empty value)".into(),
        "map" => "a mapping".into(),
        "sequence" => "a sequence".into(),
        "Option value" => "an optional value".into(),
        other => other.to_owned(),
    }
}

/// A serde_yaml error without its position parts (" at line L column C", " at byte B
/// line L column C", " at position P"): callers show the position their own way.
pub fn yaml_message(error: &serde_yaml::Error) -> String {
    strip_marks(&error.to_string())
}

/// The byte offset in libyaml's " at position P" (reader errors carry no line/column).
pub fn byte_position(message: &str) -> Option<usize> {
    let (_, rest) = message.split_once(" at position ")?;
    let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn strip_marks(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(" at ") {
        out.push_str(&rest[..at]);
        let after = &rest[at + " at ".len()..];
        match mark_len(after) {
            Some(len) => rest = &after[len..],
            None => {
                out.push_str(" at ");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Length of a position phrase at the start of `text`, if there is one.
fn mark_len(text: &str) -> Option<usize> {
    /// `word N` at the start of `s`: the length of it.
    fn numbered(s: &str, word: &str) -> Option<usize> {
        let digits = s.strip_prefix(word)?.strip_prefix(' ')?;
        let n = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
        (n > 0).then_some(word.len() + 1 + n)
    }
    let line_column = |s: &str| {
        let line = numbered(s, "line")?;
        let column = numbered(s[line..].strip_prefix(' ')?, "column")?;
        Some(line + 1 + column)
    };
    if let Some(byte) = numbered(text, "byte") {
        return text[byte..].strip_prefix(' ').and_then(line_column).map(|n| byte + 1 + n);
    }
    line_column(text).or_else(|| numbered(text, "position"))
}

/// A YAML value described for a message: `a string "abc"`, `the integer 5`, `a mapping`.
pub fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null (an empty value)".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) if n.is_f64() => format!("the number {n}"),
        Value::Number(n) => format!("the integer {n}"),
        Value::String(s) => format!("a string {s:?}"),
        Value::Sequence(_) => "a sequence".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(t) => format!("a value tagged `{}`", t.tag),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_get_the_list_and_a_suggestion() {
        assert_eq!(
            explain("unknown field `lerning_rate`, expected `learning_rate` or `warmup_steps`"),
            "unknown key; expected one of `learning_rate`, `warmup_steps`; did you mean `learning_rate`?"
        );
        assert_eq!(
            explain("unknown field `zzz`, expected one of `name`, `uses`, `model`, `config`"),
            "unknown key; expected one of `name`, `uses`, `model`, `config`"
        );
        assert_eq!(explain("unknown field `a`, expected `b`"), "unknown key; expected `b`");
        assert_eq!(explain("unknown field `a`, there are no fields"), "unknown key; nothing is allowed here");
        assert_eq!(
            explain("unknown variant `adamw`, expected `AdamW` or `Sgd`"),
            "unknown value `adamw`; expected one of `AdamW`, `Sgd`; did you mean `AdamW`?"
        );
    }

    #[test]
    fn wrong_types_read_as_expected_found() {
        assert_eq!(
            explain("invalid type: string \"abc\", expected u64"),
            "expected an unsigned integer, found a string \"abc\""
        );
        assert_eq!(
            explain("invalid value: integer `-1`, expected u64"),
            "expected an unsigned integer, found the integer -1"
        );
        assert_eq!(
            explain("invalid type: unit value, expected a string"),
            "expected a string, found null (an empty value)"
        );
        assert_eq!(explain("invalid type: map, expected a sequence"), "expected a sequence, found a mapping");
        assert_eq!(explain("invalid type: sequence, expected struct Run"), "expected a mapping, found a sequence");
        assert_eq!(
            explain("invalid type: floating point `0.5`, expected i64"),
            "expected an integer, found the number 0.5"
        );
        assert_eq!(
            explain("invalid type: string \"a, expected b\", expected f64"),
            "expected a number, found a string \"a, expected b\""
        );
        assert_eq!(
            explain("invalid length 3, expected a tuple of size 2"),
            "expected a tuple of size 2, found 3 elements"
        );
    }

    #[test]
    fn other_messages_pass_through() {
        assert_eq!(explain("missing field `output_dir`"), "missing required key `output_dir`");
        assert_eq!(explain("unknown device `gpu`"), "unknown device `gpu`");
    }

    #[test]
    fn strips_marks() {
        assert_eq!(
            strip_marks("found a tab at line 2 column 1, while scanning a plain scalar at line 1 column 7"),
            "found a tab, while scanning a plain scalar"
        );
        assert_eq!(strip_marks("x at line y"), "x at line y");
        assert_eq!(
            strip_marks("comments must be separated at byte 402 line 19 column 15"),
            "comments must be separated"
        );
        assert_eq!(
            strip_marks("control characters are not allowed at position 241"),
            "control characters are not allowed"
        );
        assert_eq!(byte_position("control characters are not allowed at position 241"), Some(241));
        assert_eq!(strip_marks("look at this at line 1 column 2, ok"), "look at this, ok");
        assert_eq!(strip_marks("x at line 3 columns"), "x at line 3 columns");
    }

    #[test]
    fn describes_values() {
        assert_eq!(describe(&Value::from("x")), "a string \"x\"");
        assert_eq!(describe(&Value::from(3)), "the integer 3");
        assert_eq!(describe(&Value::from(0.5)), "the number 0.5");
    }
}
