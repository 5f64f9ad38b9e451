//! Pairwise preference data in JSONL, one pair per line, in the shapes TRL's
//! `RewardTrainer` and OpenRLHF read:
//!
//! - plain text with a shared prompt: `{"prompt": "…", "chosen": "…", "rejected": "…"}`;
//!   each side is scored as `prompt + chosen` (concatenated as is, as TRL does);
//! - plain text with an implicit prompt: `{"chosen": "…", "rejected": "…"}`, each a whole text;
//! - chat: `chosen`/`rejected` as message lists (`[{"role": …, "content": …}, …]`), whole
//!   conversations (TRL's implicit-prompt conversational format), or the responses after
//!   a shared `prompt` that is a message list (or a string: one user turn); a string
//!   response after a chat prompt is one assistant turn. Conversations are rendered with
//!   the chat template.
//!
//! An optional `margin` (a number) asks the chosen side to win by at least that much
//! (Llama 2's loss). Field names are renamable (`data.fields`). A line is malformed —
//! an error naming the file and line, or skipped and counted with `on_malformed: skip` —
//! when a field is missing or mistyped, a response is empty, the two sides mix plain
//! text and chat, a conversation has no assistant turn, or `chosen` equals `rejected`:
//! such a pair prefers nothing (its loss is log 2 whatever the model does) and is almost
//! always a data bug, so it is refused rather than trained on.
use std::path::Path;

use plumb_core::data::jsonl::{kind_of, parse_messages, parse_object, read_lines, OnMalformed, Skipped};
use plumb_core::tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
use plumb_core::{Error, Result};
use serde::Deserialize;
use serde_json::{Map, Value};

/// The names of the fields a preference line has; defaults are TRL's.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Fields {
    /// The prompt: text, or a list of chat turns.
    pub prompt: String,
    /// The preferred response: text, or chat turns.
    pub chosen: String,
    /// The other response: text, or chat turns.
    pub rejected: String,
    /// An optional number by which chosen should outscore rejected (TRL's `margin`).
    pub margin: String,
    /// The role and content keys of each chat turn.
    pub role: String,
    /// The content key of each chat turn.
    pub content: String,
}

impl Default for Fields {
    fn default() -> Self {
        let s = |v: &str| v.to_string();
        Self {
            prompt: s("prompt"),
            chosen: s("chosen"),
            rejected: s("rejected"),
            margin: s("margin"),
            role: s("role"),
            content: s("content"),
        }
    }
}

/// One side of a pair, prompt included: what the reward model scores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sequence {
    /// Plain text, tokenized as it is.
    Text(String),
    /// A conversation, rendered with the chat template first.
    Chat(Vec<ChatMessage>),
}

impl Sequence {
    /// What a reward scores for a `prompt` answered by `response`: their text
    /// concatenated, or, with `chat`, one user turn and one assistant turn.
    pub fn of_exchange(prompt: &str, response: &str, chat: bool) -> Self {
        if chat {
            Self::Chat(vec![ChatMessage::new("user", prompt), ChatMessage::new("assistant", response)])
        } else {
            Self::Text(format!("{prompt}{response}"))
        }
    }

    pub fn is_chat(&self) -> bool {
        matches!(self, Self::Chat(_))
    }

    /// Token ids as the reward model reads them: plain text with the tokenizer's own
    /// special tokens (as `transformers`' `tokenizer(text)`), a conversation through
    /// `template`. Trailing pad-id tokens are dropped: `transformers` reads a sequence's
    /// score at its last token that is not the pad id, so a text ending in that id (a
    /// template's EOS where pad = EOS) would otherwise be scored at another token there
    /// than here.
    pub fn tokenize(&self, tokenizer: &Tokenizer, template: Option<&ChatTemplate>, pad_id: i64) -> Result<Vec<i64>> {
        let mut ids = match self {
            Self::Text(text) => tokenizer.encode_prompt(text)?,
            Self::Chat(messages) => {
                let template = template.ok_or_else(|| {
                    Error::Other("a conversation to score, but the reward model has no chat template".into())
                })?;
                tokenizer.encode(&template.render(messages, false)?)?
            }
        };
        while ids.len() > 1 && ids.last() == Some(&pad_id) {
            ids.pop();
        }
        if ids.is_empty() {
            return Err(Error::Other("a text with no tokens to score".into()));
        }
        Ok(ids)
    }
}

/// One preference: `chosen` is better than `rejected` (by at least `margin`).
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub chosen: Sequence,
    pub rejected: Sequence,
    pub margin: f64,
    /// 1-based line in its file.
    pub line: usize,
}

/// Reads every non-blank line of `path` as a preference pair; see the module docs for
/// what is refused. An error too when no line is usable.
pub fn read_pairs(
    path: &Path,
    fields: &Fields,
    on_malformed: OnMalformed,
    max_line_bytes: usize,
) -> Result<(Vec<Pair>, Skipped)> {
    let (lines, skipped) = read_lines(path, on_malformed, max_line_bytes, |text| parse_pair(text, fields))?;
    if lines.is_empty() {
        return Err(Error::file(path, format!("no usable preference pairs{}", skipped.first_reason())));
    }
    let pairs = lines.into_iter().map(|(line, (chosen, rejected, margin))| Pair { chosen, rejected, margin, line });
    Ok((pairs.collect(), skipped))
}

/// One line as (chosen, rejected, margin), or why it is malformed.
pub fn parse_pair(text: &str, fields: &Fields) -> std::result::Result<(Sequence, Sequence, f64), String> {
    let object = parse_object(text)?;
    let response = |name: &str| -> std::result::Result<Side, String> {
        match object.get(name) {
            None => Err(format!("missing field `{name}`")),
            Some(Value::String(s)) if s.trim().is_empty() => Err(format!("field `{name}` is empty")),
            Some(Value::String(s)) => Ok(Side::Text(s.clone())),
            Some(list @ Value::Array(_)) => {
                let messages = parse_messages(list, name, &fields.role, &fields.content)?;
                match messages.last() {
                    None => Err(format!("field `{name}` is an empty list")),
                    Some(last) if last.content.trim().is_empty() => {
                        Err(format!("field `{name}`: the last turn is empty"))
                    }
                    Some(_) => Ok(Side::Chat(messages)),
                }
            }
            Some(other) => {
                Err(format!("field `{name}`: expected a string or a list of messages, found {}", kind_of(other)))
            }
        }
    };
    let chosen = response(&fields.chosen)?;
    let rejected = response(&fields.rejected)?;
    let prompt = match object.get(&fields.prompt) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(Side::Text(s.clone())),
        Some(list @ Value::Array(_)) => {
            Some(Side::Chat(parse_messages(list, &fields.prompt, &fields.role, &fields.content)?))
        }
        Some(other) => {
            return Err(format!(
                "field `{}`: expected a string or a list of messages, found {}",
                fields.prompt,
                kind_of(other)
            ))
        }
    };
    if chosen.is_chat() != rejected.is_chat() {
        return Err(format!(
            "`{}` and `{}` mix plain text and a message list; give both as one or the other",
            fields.chosen, fields.rejected
        ));
    }
    let margin = margin(&object, &fields.margin)?;
    let chat = chosen.is_chat() || prompt.as_ref().is_some_and(Side::is_chat);
    let whole = |side: Side, name: &str| -> std::result::Result<Sequence, String> {
        if !chat {
            let prefix = match &prompt {
                Some(Side::Text(p)) => p.as_str(),
                _ => "",
            };
            return Ok(Sequence::Text(format!("{prefix}{}", side.text())));
        }
        let mut messages = match &prompt {
            None => Vec::new(),
            Some(Side::Text(p)) => vec![ChatMessage::new("user", p.clone())],
            Some(Side::Chat(m)) => m.clone(),
        };
        match side {
            Side::Text(t) => messages.push(ChatMessage::new("assistant", t)),
            Side::Chat(m) => messages.extend(m),
        }
        if !messages.iter().any(|m| m.role == "assistant") {
            return Err(format!("`{name}`: the conversation has no assistant turn to score"));
        }
        Ok(Sequence::Chat(messages))
    };
    let chosen = whole(chosen, &fields.chosen)?;
    let rejected = whole(rejected, &fields.rejected)?;
    if chosen == rejected {
        return Err(format!(
            "`{}` and `{}` are the same: a pair must prefer one response over another",
            fields.chosen, fields.rejected
        ));
    }
    Ok((chosen, rejected, margin))
}

/// A response or prompt as the line gives it.
enum Side {
    Text(String),
    Chat(Vec<ChatMessage>),
}

impl Side {
    fn is_chat(&self) -> bool {
        matches!(self, Self::Chat(_))
    }

    fn text(&self) -> &str {
        match self {
            Self::Text(t) => t,
            Self::Chat(_) => "",
        }
    }
}

/// The optional margin: a finite number, 0 when absent or null.
fn margin(object: &Map<String, Value>, name: &str) -> std::result::Result<f64, String> {
    match object.get(name) {
        None | Some(Value::Null) => Ok(0.0),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(m) if m.is_finite() => Ok(m),
            _ => Err(format!("field `{name}`: expected a finite number")),
        },
        Some(other) => Err(format!("field `{name}`: expected a number, found {}", kind_of(other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> std::result::Result<(Sequence, Sequence, f64), String> {
        parse_pair(line, &Fields::default())
    }

    #[test]
    fn a_shared_prompt_is_prepended_to_each_plain_response() {
        let (c, r, m) = parse(r#"{"prompt": "Once", "chosen": " upon a time.", "rejected": " upon a"}"#).unwrap();
        assert_eq!((c, r, m), (Sequence::Text("Once upon a time.".into()), Sequence::Text("Once upon a".into()), 0.0));
        let (c, _, m) = parse(r#"{"chosen": "whole text", "rejected": "other text", "margin": 1.5}"#).unwrap();
        assert_eq!((c, m), (Sequence::Text("whole text".into()), 1.5));
    }

    #[test]
    fn chat_pairs_are_whole_conversations_or_responses_after_a_chat_prompt() {
        let user = ChatMessage::new("user", "Hi");
        let said = |t: &str| ChatMessage::new("assistant", t);
        // TRL's implicit prompt: each side is the whole conversation.
        let line = r#"{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                       "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]}"#;
        let (c, r, _) = parse(&line.replace('\n', " ")).unwrap();
        assert_eq!(c, Sequence::Chat(vec![user.clone(), said("Hello!")]));
        assert_eq!(r, Sequence::Chat(vec![user.clone(), said("Go away.")]));
        // An explicit chat prompt, responses as lists or as strings.
        let line = r#"{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": [{"role": "assistant", "content": "No."}]}"#;
        assert_eq!(parse(line).unwrap().0, Sequence::Chat(vec![user.clone(), said("Hello!")]));
        let line = r#"{"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "No."}"#;
        assert_eq!(parse(line).unwrap().1, Sequence::Chat(vec![user, said("No.")]));
    }

    #[test]
    fn fields_are_renamable() {
        let fields =
            Fields { prompt: "question".into(), chosen: "good".into(), rejected: "bad".into(), ..Fields::default() };
        let (c, r, _) = parse_pair(r#"{"question": "Q ", "good": "yes", "bad": "no"}"#, &fields).unwrap();
        assert_eq!((c, r), (Sequence::Text("Q yes".into()), Sequence::Text("Q no".into())));
        let fields = Fields { role: "from".into(), content: "value".into(), ..Fields::default() };
        let line = r#"{"chosen": [{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"}], "rejected": [{"from": "user", "value": "a"}, {"from": "assistant", "value": "c"}]}"#;
        assert!(parse_pair(line, &fields).unwrap().0.is_chat());
    }

    #[test]
    fn malformed_pairs_say_what_is_wrong() {
        let err = |line: &str| parse(line).unwrap_err();
        assert_eq!(err(r#"{"prompt": "p", "chosen": "a"}"#), "missing field `rejected`");
        assert_eq!(
            err(r#"{"chosen": 1, "rejected": "a"}"#),
            "field `chosen`: expected a string or a list of messages, found a number"
        );
        assert_eq!(err(r#"{"chosen": "a", "rejected": "  "}"#), "field `rejected` is empty");
        assert_eq!(
            err(r#"{"prompt": "p", "chosen": "a", "rejected": "a"}"#),
            "`chosen` and `rejected` are the same: a pair must prefer one response over another"
        );
        assert_eq!(
            err(r#"{"chosen": "a", "rejected": "b", "margin": "big"}"#),
            "field `margin`: expected a number, found a string"
        );
        assert_eq!(
            err(r#"{"chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}"#),
            "`chosen` and `rejected` mix plain text and a message list; give both as one or the other"
        );
        assert_eq!(
            err(r#"{"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]}"#),
            "`chosen`: the conversation has no assistant turn to score"
        );
        assert_eq!(
            err(r#"{"prompt": 3, "chosen": "a", "rejected": "b"}"#),
            "field `prompt`: expected a string or a list of messages, found a number"
        );
    }

    #[test]
    fn bad_lines_are_named_by_file_and_line_or_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prefs.jsonl");
        std::fs::write(&path, "{\"chosen\": \"a\", \"rejected\": \"b\"}\n\n{\"chosen\": \"a\"}\n").unwrap();
        let message = read_pairs(&path, &Fields::default(), OnMalformed::Stop, 1 << 20).unwrap_err().to_string();
        assert!(message.contains("prefs.jsonl: line 3: missing field `rejected`"), "{message}");
        let (pairs, skipped) = read_pairs(&path, &Fields::default(), OnMalformed::Skip, 1 << 20).unwrap();
        assert_eq!((pairs.len(), pairs[0].line, skipped.lines.len()), (1, 1, 1));
    }
}
