//! JSONL files of examples, one JSON object per line, as SFT and reward-model data come:
//! bounded line reading, file:line errors or skipped-and-counted lines, typed field access
//! with messages that say what was found, and chat `messages` lists with renamable fields.
//!
//! What an example *is* stays with the stage that reads it: [`read_lines`] takes the
//! function that parses one line. A line over `max_line_bytes` is measured and refused
//! without being held in memory, so one runaway line cannot cost gigabytes; a UTF-8
//! byte-order mark at the start of the file is ignored; blank lines are skipped.
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Error, IoResultExt, Result};
use crate::tokenizer::ChatMessage;

/// The longest line read by default (`data.max_line_bytes`'s default): 1 MiB, some
/// 250 000 tokens, far beyond any `max_length`; the rare longer example is better cut
/// before it is written to the file.
pub const DEFAULT_MAX_LINE_BYTES: usize = 1 << 20;

/// The roles a chat turn may have.
pub const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// What a malformed line does (`data.on_malformed`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnMalformed {
    /// Stop before training, naming the file and line.
    #[default]
    Stop,
    /// Leave the line out, count it and report the first few.
    Skip,
}

/// Lines left out of a file.
#[derive(Debug, Clone, Default)]
pub struct Skipped {
    pub file: PathBuf,
    /// (1-based line, why), in file order.
    pub lines: Vec<(usize, String)>,
}

impl Skipped {
    /// `"; line N: why"` for the first skipped line, or nothing: the tail of an error
    /// about a file none of whose lines could be used.
    pub fn first_reason(&self) -> String {
        self.lines.first().map(|(n, why)| format!("; line {n}: {why}")).unwrap_or_default()
    }
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: skipped {} malformed line(s)", self.file.display(), self.lines.len())?;
        for (line, why) in self.lines.iter().take(5) {
            write!(f, "\n  line {line}: {why}")?;
        }
        if self.lines.len() > 5 {
            write!(f, "\n  …")?;
        }
        Ok(())
    }
}

/// Parses every non-blank line of `path` with `parse`, returning (1-based line, example)
/// for the lines it accepts. A line `parse` refuses (with why), one that is not UTF-8
/// or one longer than `max_line_bytes` (without its newline) is an error naming the file
/// and line, or with [`OnMalformed::Skip`] left out and listed in [`Skipped`].
pub fn read_lines<T>(
    path: &Path,
    on_malformed: OnMalformed,
    max_line_bytes: usize,
    mut parse: impl FnMut(&str) -> std::result::Result<T, String>,
) -> Result<(Vec<(usize, T)>, Skipped)> {
    let file = std::fs::File::open(path).at(path)?;
    let mut reader = BufReader::new(file);
    let mut examples = Vec::new();
    let mut skipped = Skipped { file: path.to_path_buf(), lines: Vec::new() };
    let mut bytes = Vec::new();
    for number in 1.. {
        let Some(size) = read_bounded_line(&mut reader, &mut bytes, max_line_bytes).at(path)? else {
            break;
        };
        if number == 1 && bytes.starts_with(BOM) {
            bytes.drain(..BOM.len());
        }
        let parsed = if size > max_line_bytes as u64 {
            Err(format!(
                "{size} bytes, more than data.max_line_bytes ({max_line_bytes}); shorten the example or raise the limit"
            ))
        } else {
            match std::str::from_utf8(&bytes) {
                Ok(text) if text.trim().is_empty() => continue,
                Ok(text) => parse(text),
                Err(e) => Err(format!("not valid UTF-8 text ({e})")),
            }
        };
        match (parsed, on_malformed) {
            (Ok(example), _) => examples.push((number, example)),
            (Err(why), OnMalformed::Stop) => {
                return Err(Error::file(
                    path,
                    format!("line {number}: {why} (set data.on_malformed: skip to skip such lines)"),
                ))
            }
            (Err(why), OnMalformed::Skip) => skipped.lines.push((number, why)),
        }
    }
    Ok((examples, skipped))
}

/// The UTF-8 byte-order mark some editors write at the start of a file.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Reads the next line into `line` (without its `\n` or `\r\n`), keeping at most
/// `limit + 1` bytes of it, and returns its whole length in bytes, or None at the end
/// of the input. A longer line is read to its end but not kept, so memory stays bounded.
fn read_bounded_line(reader: &mut impl BufRead, line: &mut Vec<u8>, limit: usize) -> std::io::Result<Option<u64>> {
    line.clear();
    let (mut size, mut any, mut ends_cr) = (0u64, false, false);
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            break;
        }
        any = true;
        let newline = available.iter().position(|&b| b == b'\n');
        let chunk = &available[..newline.unwrap_or(available.len())];
        let room = (limit + 1).saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        size += chunk.len() as u64;
        if let Some(&last) = chunk.last() {
            ends_cr = last == b'\r';
        }
        let used = newline.map_or(available.len(), |i| i + 1);
        reader.consume(used);
        if newline.is_some() {
            break;
        }
    }
    if !any {
        return Ok(None);
    }
    if ends_cr {
        if line.len() as u64 == size {
            line.pop();
        }
        size -= 1;
    }
    Ok(Some(size))
}

/// One line as a JSON object, or why it is not one.
pub fn parse_object(text: &str) -> std::result::Result<Map<String, Value>, String> {
    match serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))? {
        Value::Object(object) => Ok(object),
        other => Err(format!("expected a JSON object, found {}", kind_of(&other))),
    }
}

/// The string field `name` of `object`: `Ok(None)` when absent or null and not
/// `required`; an error saying what was found otherwise.
pub fn text_field(
    object: &Map<String, Value>,
    name: &str,
    required: bool,
) -> std::result::Result<Option<String>, String> {
    match object.get(name) {
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Null) | None if !required => Ok(None),
        None => Err(format!("missing field `{name}`")),
        Some(other) => Err(format!("field `{name}`: expected a string, found {}", kind_of(other))),
    }
}

/// A chat turn list (`[{"role": …, "content": …}, …]`) at `at` (the field's name, for
/// messages), with the role and content read from the fields `role` and `content`.
pub fn parse_messages(
    value: &Value,
    at: &str,
    role: &str,
    content: &str,
) -> std::result::Result<Vec<ChatMessage>, String> {
    let Value::Array(list) = value else {
        return Err(format!("field `{at}`: expected a list, found {}", kind_of(value)));
    };
    let mut messages = Vec::with_capacity(list.len());
    for (i, turn) in list.iter().enumerate() {
        let at = format!("{at}[{i}]");
        let turn = turn.as_object().ok_or_else(|| format!("{at}: expected an object, found {}", kind_of(turn)))?;
        let get = |name: &str| match turn.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(format!("{at}.{name}: expected a string, found {}", kind_of(other))),
            None => Err(format!("{at}: missing field `{name}`")),
        };
        let role_name = get(role)?;
        if !ROLES.contains(&role_name.as_str()) {
            return Err(format!("{at}.{role}: unknown role `{role_name}`; expected one of {}", ROLES.join(", ")));
        }
        messages.push(ChatMessage::new(role_name, get(content)?));
    }
    Ok(messages)
}

/// What a JSON value is, for messages ("found a number").
pub fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_read_whole_up_to_the_limit_and_only_measured_beyond_it() {
        let text = b"short\r\nexactly8\nmuch too long\n\nlast";
        let mut reader = BufReader::with_capacity(4, &text[..]); // lines span several buffers
        let mut line = Vec::new();
        let mut read = || {
            let size = read_bounded_line(&mut reader, &mut line, 8).unwrap();
            size.map(|n| (n, String::from_utf8(line.clone()).unwrap()))
        };
        assert_eq!(read(), Some((5, "short".into())));
        assert_eq!(read(), Some((8, "exactly8".into())));
        assert_eq!(read(), Some((13, "much too ".into())), "9 bytes kept: enough to tell it is too long");
        assert_eq!(read(), Some((0, "".into())));
        assert_eq!(read(), Some((4, "last".into())));
        assert_eq!(read(), None);
    }

    #[test]
    fn refused_lines_stop_with_file_and_line_or_are_skipped_and_listed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, "\u{FEFF}{\"a\": 1}\n\n{\"a\": \"x\"}\n[2]\n").unwrap();
        let parse = |line: &str| {
            let object = parse_object(line)?;
            object.get("a").and_then(Value::as_i64).ok_or_else(|| "field `a`: expected a number".to_string())
        };
        let message = read_lines(&path, OnMalformed::Stop, 100, parse).unwrap_err().to_string();
        assert!(
            message.ends_with(
                "d.jsonl: line 3: field `a`: expected a number (set data.on_malformed: skip to skip such lines)"
            ),
            "{message}"
        );
        let (examples, skipped) = read_lines(&path, OnMalformed::Skip, 100, parse).unwrap();
        assert_eq!(examples, [(1, 1)]);
        let lines: Vec<usize> = skipped.lines.iter().map(|(n, _)| *n).collect();
        assert_eq!(lines, [3, 4]);
        assert_eq!(skipped.lines[1].1, "expected a JSON object, found a list");
    }

    #[test]
    fn message_lists_name_the_turn_that_is_wrong() {
        let parse = |json: &str| parse_messages(&serde_json::from_str(json).unwrap(), "chosen", "role", "content");
        let ok = parse(r#"[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]"#).unwrap();
        assert_eq!(ok, [ChatMessage::new("user", "a"), ChatMessage::new("assistant", "b")]);
        assert_eq!(parse(r#""text""#).unwrap_err(), "field `chosen`: expected a list, found a string");
        assert_eq!(
            parse(r#"[{"role": "bot", "content": "b"}]"#).unwrap_err(),
            "chosen[0].role: unknown role `bot`; expected one of system, user, assistant"
        );
        assert_eq!(parse(r#"[{"role": "user"}]"#).unwrap_err(), "chosen[0]: missing field `content`");
    }
}
