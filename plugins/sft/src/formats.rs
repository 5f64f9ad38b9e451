//! Instruction data in JSONL, one example per line, in one of three formats, each read
//! into a conversation (system/user/assistant turns):
//!
//! - `alpaca`: `{"instruction": …, "input": …, "output": …}`; the user turn is the
//!   instruction, then a blank line and the input when there is one.
//! - `prompt_completion`: `{"prompt": …, "completion": …}`: one user and one assistant turn.
//! - `messages`: `{"messages": [{"role": …, "content": …}, …]}`, multi-turn.
//!
//! Field names are mappable (`fields:` in the recipe). A malformed line (not JSON, a
//! missing or mistyped field, no assistant turn, longer than `data.max_line_bytes`) is an
//! error naming the file and line, or, with `on_malformed: skip`, counted and left out.
//! A line over the limit is measured and skipped without being held in memory, so one
//! runaway line cannot cost gigabytes before it is refused. A UTF-8 byte-order mark at
//! the start of the file is ignored; a file whose answers are all empty is refused.
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use plumb_core::error::IoResultExt;
use plumb_core::tokenizer::ChatMessage;
use plumb_core::{Error, Result};
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Alpaca,
    PromptCompletion,
    Messages,
}

/// What a malformed line does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnMalformed {
    /// Stop before training, naming the file and line.
    #[default]
    Stop,
    /// Leave the line out, count it and report the first few.
    Skip,
}

/// The names of the fields each format reads; defaults are the formats' usual names.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Fields {
    pub instruction: String,
    pub input: String,
    pub output: String,
    pub prompt: String,
    pub completion: String,
    pub messages: String,
    pub role: String,
    pub content: String,
    /// An optional system prompt field (alpaca and prompt_completion).
    pub system: String,
}

impl Default for Fields {
    fn default() -> Self {
        let s = |v: &str| v.to_string();
        Self {
            instruction: s("instruction"),
            input: s("input"),
            output: s("output"),
            prompt: s("prompt"),
            completion: s("completion"),
            messages: s("messages"),
            role: s("role"),
            content: s("content"),
            system: s("system"),
        }
    }
}

/// One example: the turns of a conversation, with the line it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    pub messages: Vec<ChatMessage>,
    /// 1-based line in the file.
    pub line: usize,
}

/// Lines left out of a file.
#[derive(Debug, Clone, Default)]
pub struct Skipped {
    pub file: PathBuf,
    /// (1-based line, why), in file order.
    pub lines: Vec<(usize, String)>,
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

const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// The longest line [`read_jsonl`] reads (`data.max_line_bytes`'s default): 1 MiB, some
/// 250 000 tokens, far beyond any `max_length`; the rare longer example is better cut
/// before it is written to the file.
pub const DEFAULT_MAX_LINE_BYTES: usize = 1 << 20;

/// Reads every non-blank line of `path` as an example of `format`, refusing lines over
/// [`DEFAULT_MAX_LINE_BYTES`].
pub fn read_jsonl(
    path: &Path,
    format: Format,
    fields: &Fields,
    on_malformed: OnMalformed,
) -> Result<(Vec<Conversation>, Skipped)> {
    read_jsonl_with_limit(path, format, fields, on_malformed, DEFAULT_MAX_LINE_BYTES)
}

/// [`read_jsonl`] with lines of up to `max_line_bytes` (without the newline).
pub fn read_jsonl_with_limit(
    path: &Path,
    format: Format,
    fields: &Fields,
    on_malformed: OnMalformed,
    max_line_bytes: usize,
) -> Result<(Vec<Conversation>, Skipped)> {
    let file = std::fs::File::open(path).at(path)?;
    let mut reader = BufReader::new(file);
    let mut conversations = Vec::new();
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
                Ok(text) => parse_line(text, format, fields),
                Err(e) => Err(format!("not valid UTF-8 text ({e})")),
            }
        };
        match (parsed, on_malformed) {
            (Ok(messages), _) => conversations.push(Conversation { messages, line: number }),
            (Err(why), OnMalformed::Stop) => {
                return Err(Error::file(
                    path,
                    format!("line {number}: {why} (set data.on_malformed: skip to skip such lines)"),
                ))
            }
            (Err(why), OnMalformed::Skip) => skipped.lines.push((number, why)),
        }
    }
    if conversations.is_empty() {
        let why = skipped.lines.first().map(|(n, why)| format!("; line {n}: {why}")).unwrap_or_default();
        return Err(Error::file(path, format!("no usable examples in {format:?} format{why}")));
    }
    let answered = |c: &Conversation| c.messages.iter().any(|m| m.role == "assistant" && !m.content.trim().is_empty());
    if !conversations.iter().any(answered) {
        let field = match format {
            Format::Alpaca => format!("`{}`", fields.output),
            Format::PromptCompletion => format!("`{}`", fields.completion),
            Format::Messages => "assistant turns".to_string(),
        };
        return Err(Error::file(
            path,
            format!(
                "every answer is empty (the {field} of all {} examples): there is nothing to learn; check the field names",
                conversations.len()
            ),
        ));
    }
    Ok((conversations, skipped))
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

/// One line as a conversation, or why it is malformed.
pub fn parse_line(text: &str, format: Format, fields: &Fields) -> std::result::Result<Vec<ChatMessage>, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let object = value.as_object().ok_or_else(|| format!("expected a JSON object, found {}", kind_of(&value)))?;
    let text_field = |name: &str, required: bool| -> std::result::Result<Option<String>, String> {
        match object.get(name) {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Null) | None if !required => Ok(None),
            None => Err(format!("missing field `{name}`")),
            Some(other) => Err(format!("field `{name}`: expected a string, found {}", kind_of(other))),
        }
    };
    let mut messages = Vec::new();
    if format != Format::Messages {
        if let Some(system) = text_field(&fields.system, false)?.filter(|s| !s.is_empty()) {
            messages.push(ChatMessage::new("system", system));
        }
    }
    match format {
        Format::Alpaca => {
            let instruction = text_field(&fields.instruction, true)?.unwrap_or_default();
            let input = text_field(&fields.input, false)?.unwrap_or_default();
            let user = if input.trim().is_empty() { instruction } else { format!("{instruction}\n\n{input}") };
            messages.push(ChatMessage::new("user", user));
            messages.push(ChatMessage::new("assistant", text_field(&fields.output, true)?.unwrap_or_default()));
        }
        Format::PromptCompletion => {
            messages.push(ChatMessage::new("user", text_field(&fields.prompt, true)?.unwrap_or_default()));
            messages.push(ChatMessage::new("assistant", text_field(&fields.completion, true)?.unwrap_or_default()));
        }
        Format::Messages => {
            let list = match object.get(&fields.messages) {
                Some(Value::Array(list)) => list,
                Some(other) => {
                    return Err(format!("field `{}`: expected a list, found {}", fields.messages, kind_of(other)))
                }
                None => return Err(format!("missing field `{}`", fields.messages)),
            };
            for (i, turn) in list.iter().enumerate() {
                let at = format!("{}[{i}]", fields.messages);
                let turn =
                    turn.as_object().ok_or_else(|| format!("{at}: expected an object, found {}", kind_of(turn)))?;
                let get = |name: &str| match turn.get(name) {
                    Some(Value::String(s)) => Ok(s.clone()),
                    Some(other) => Err(format!("{at}.{name}: expected a string, found {}", kind_of(other))),
                    None => Err(format!("{at}: missing field `{name}`")),
                };
                let role = get(&fields.role)?;
                if !ROLES.contains(&role.as_str()) {
                    return Err(format!(
                        "{at}.{}: unknown role `{role}`; expected one of {}",
                        fields.role,
                        ROLES.join(", ")
                    ));
                }
                messages.push(ChatMessage::new(role, get(&fields.content)?));
            }
        }
    }
    match messages.iter().position(|m| m.role == "assistant") {
        None => Err("no assistant turn to learn from".into()),
        Some(first) if !messages[..first].iter().any(|m| m.role == "user") => {
            Err("the first assistant turn has no user turn before it".into())
        }
        Some(_) => Ok(messages),
    }
}

fn kind_of(value: &Value) -> &'static str {
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

    fn turns(messages: &[ChatMessage]) -> Vec<(&str, &str)> {
        messages.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect()
    }

    #[test]
    fn alpaca_joins_instruction_and_input() {
        let fields = Fields::default();
        let m = parse_line(r#"{"instruction": "Add", "input": "2 and 3", "output": "5"}"#, Format::Alpaca, &fields);
        assert_eq!(turns(&m.unwrap()), [("user", "Add\n\n2 and 3"), ("assistant", "5")]);
        let m = parse_line(
            r#"{"instruction": "Hi", "input": "", "output": "Hello", "system": "Be brief."}"#,
            Format::Alpaca,
            &fields,
        );
        assert_eq!(turns(&m.unwrap()), [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello")]);
    }

    #[test]
    fn fields_are_mappable() {
        let fields = Fields { prompt: "question".into(), completion: "answer".into(), ..Fields::default() };
        let m = parse_line(r#"{"question": "Why?", "answer": "Because."}"#, Format::PromptCompletion, &fields);
        assert_eq!(turns(&m.unwrap()), [("user", "Why?"), ("assistant", "Because.")]);
        let fields = Fields {
            messages: "conversation".into(),
            role: "from".into(),
            content: "value".into(),
            ..Fields::default()
        };
        let line = r#"{"conversation": [{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"}]}"#;
        assert_eq!(turns(&parse_line(line, Format::Messages, &fields).unwrap()), [("user", "a"), ("assistant", "b")]);
    }

    #[test]
    fn malformed_lines_say_what_is_wrong() {
        let f = Fields::default();
        let err = |line: &str, format| parse_line(line, format, &f).unwrap_err();
        assert!(err("{not json", Format::Alpaca).starts_with("not JSON"));
        assert_eq!(err("[1]", Format::Alpaca), "expected a JSON object, found a list");
        assert_eq!(err(r#"{"instruction": "x"}"#, Format::Alpaca), "missing field `output`");
        assert_eq!(
            err(r#"{"prompt": 3, "completion": "x"}"#, Format::PromptCompletion),
            "field `prompt`: expected a string, found a number"
        );
        assert_eq!(
            err(
                r#"{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}"#,
                Format::Messages
            ),
            "messages[1].role: unknown role `bot`; expected one of system, user, assistant"
        );
        assert_eq!(
            err(r#"{"messages": [{"role": "user", "content": "a"}]}"#, Format::Messages),
            "no assistant turn to learn from"
        );
        assert_eq!(
            err(r#"{"messages": [{"role": "assistant", "content": "a"}]}"#, Format::Messages),
            "the first assistant turn has no user turn before it"
        );
    }
}
