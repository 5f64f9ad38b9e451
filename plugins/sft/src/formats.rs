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
use std::path::Path;

use plumb_core::data::jsonl::{parse_messages, parse_object, read_lines, text_field};
pub use plumb_core::data::jsonl::{OnMalformed, Skipped, DEFAULT_MAX_LINE_BYTES};
use plumb_core::tokenizer::ChatMessage;
use plumb_core::{Error, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Alpaca,
    PromptCompletion,
    Messages,
}

/// The names of the fields each format reads; defaults are the formats' usual names.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Fields {
    /// alpaca: the instruction.
    pub instruction: String,
    /// alpaca: the optional input, after the instruction and a blank line.
    pub input: String,
    /// alpaca: the answer.
    pub output: String,
    /// prompt_completion: the prompt.
    pub prompt: String,
    /// prompt_completion: the answer.
    pub completion: String,
    /// messages: the list of chat turns.
    pub messages: String,
    /// messages: the role key of each turn.
    pub role: String,
    /// messages: the content key of each turn.
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
    let (lines, skipped) = read_lines(path, on_malformed, max_line_bytes, |text| parse_line(text, format, fields))?;
    let conversations: Vec<Conversation> =
        lines.into_iter().map(|(line, messages)| Conversation { messages, line }).collect();
    if conversations.is_empty() {
        return Err(Error::file(path, format!("no usable examples in {format:?} format{}", skipped.first_reason())));
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

/// One line as a conversation, or why it is malformed.
pub fn parse_line(text: &str, format: Format, fields: &Fields) -> std::result::Result<Vec<ChatMessage>, String> {
    let object = parse_object(text)?;
    let text_field = |name: &str, required: bool| text_field(&object, name, required);
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
            let list = object.get(&fields.messages).ok_or_else(|| format!("missing field `{}`", fields.messages))?;
            messages.extend(parse_messages(list, &fields.messages, &fields.role, &fields.content)?);
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

#[cfg(test)]
mod tests {
    use super::*;

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
