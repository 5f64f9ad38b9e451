//! Pairwise preference data in JSONL, one pair per line, in the shapes TRL's
//! `RewardTrainer` and `DPOTrainer` and OpenRLHF read (the reward-model and DPO stages
//! both read it here):
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
use std::path::{Path, PathBuf};

use plumb_core::data::jsonl::{
    kind_of, parse_messages, parse_object, read_lines, OnMalformed, Skipped, DEFAULT_MAX_LINE_BYTES,
};
use plumb_core::plugin::ValidateContext;
use plumb_core::tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
use plumb_core::train::{check_train_and_validation, read_train_and_validation, require};
use plumb_core::{Error, Result, RunContext};
use serde::Deserialize;
use serde_json::{Map, Value};

/// The names of the fields a preference line has; defaults are TRL's.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Fields {
    /// The shared prompt (optional on a line).
    pub prompt: String,
    /// The preferred response.
    pub chosen: String,
    /// The response it is preferred to.
    pub rejected: String,
    /// The optional margin the chosen side should win by (reward model only).
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

/// The `data:` section of a stage that trains on preference pairs (the reward model,
/// DPO).
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PreferenceData {
    /// A JSONL file, one preference pair per line.
    pub train: PathBuf,
    /// A held-out JSONL file; without it, `validation_fraction` of `train` is held out.
    #[serde(default)]
    pub validation: Option<PathBuf>,
    /// The share of `train` held out when there is no `validation` file.
    #[serde(default = "default_validation_fraction")]
    pub validation_fraction: f64,
    /// The names of the fields a line has (TRL's by default).
    #[serde(default)]
    pub fields: Fields,
    /// `stop` at the first malformed line, or `skip` (and count) them.
    #[serde(default)]
    pub on_malformed: OnMalformed,
    /// The longest line read, in bytes (default 1 MiB).
    #[serde(default = "default_max_line_bytes")]
    pub max_line_bytes: usize,
}

fn default_validation_fraction() -> f64 {
    0.1
}
fn default_max_line_bytes() -> usize {
    DEFAULT_MAX_LINE_BYTES
}

impl PreferenceData {
    /// The pairs of `path` and the lines left out.
    pub fn read(&self, path: &Path) -> Result<(Vec<Pair>, Skipped)> {
        read_pairs(path, &self.fields, self.on_malformed, self.max_line_bytes)
    }

    /// Every check of the section that needs no model: the files exist, the fraction and
    /// the line limit are in range, and every line of the files reads as a pair.
    pub fn validate(&self, ctx: &ValidateContext) -> Result<()> {
        ctx.existing_file("data.train", &self.train)?;
        if let Some(validation) = &self.validation {
            ctx.existing_file("data.validation", validation)?;
        } else {
            require(
                self.validation_fraction > 0.0 && self.validation_fraction < 1.0,
                "data.validation_fraction",
                "expected a fraction strictly between 0 and 1",
            )?;
        }
        require(self.max_line_bytes > 0, "data.max_line_bytes", "expected at least 1")?;
        check_train_and_validation(&self.train, self.validation.as_deref(), "pair", |p| self.read(p))
    }

    /// The training and held-out pairs (see [`read_train_and_validation`]).
    pub fn read_split(&self, ctx: &RunContext) -> Result<(Vec<Pair>, Vec<Pair>)> {
        let data = self.clone();
        read_train_and_validation(
            ctx,
            "reading the preference pairs",
            &self.train,
            self.validation.as_deref(),
            self.validation_fraction,
            move |path| data.read(path),
        )
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

/// One preference: `chosen` is better than `rejected` (by at least `margin`), both
/// answering `prompt`. The prompt is the line's own, or, when the line has none, what both
/// sides open with (TRL's implicit prompt: the turns they share, or for plain text their
/// shared words); it is empty (`Text("")`, `Chat([])`) when they share nothing. The
/// responses are never empty, and are of the prompt's kind (text or chat).
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub prompt: Sequence,
    pub chosen: Sequence,
    pub rejected: Sequence,
    pub margin: f64,
    /// 1-based line in its file.
    pub line: usize,
}

impl Pair {
    /// The prompt followed by `response` (one of this pair's): what a reward model scores.
    pub fn whole(&self, response: &Sequence) -> Sequence {
        join(&self.prompt, response)
    }
}

/// `prompt` followed by `response`: text concatenated as is, or the turns of both.
fn join(prompt: &Sequence, response: &Sequence) -> Sequence {
    match (prompt, response) {
        (Sequence::Chat(p), Sequence::Chat(r)) => Sequence::Chat(p.iter().chain(r).cloned().collect()),
        (Sequence::Text(p), Sequence::Text(r)) => Sequence::Text(format!("{p}{r}")),
        (Sequence::Text(p), Sequence::Chat(r)) => {
            let mut turns = if p.is_empty() { Vec::new() } else { vec![ChatMessage::new("user", p.clone())] };
            turns.extend(r.iter().cloned());
            Sequence::Chat(turns)
        }
        (Sequence::Chat(p), Sequence::Text(r)) => {
            Sequence::Chat(p.iter().cloned().chain([ChatMessage::new("assistant", r.clone())]).collect())
        }
    }
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
    let pairs = lines.into_iter().map(|(line, p)| Pair { line, ..p });
    Ok((pairs.collect(), skipped))
}

/// One line as a pair (its `line` 0), or why it is malformed.
pub fn parse_pair(text: &str, fields: &Fields) -> std::result::Result<Pair, String> {
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
    let (prompt, chosen, rejected) = if chat {
        let turns = |side: Side| match side {
            Side::Text(t) => vec![ChatMessage::new("assistant", t)],
            Side::Chat(m) => m,
        };
        let mut prompt = match prompt {
            None => Vec::new(),
            Some(Side::Text(p)) => vec![ChatMessage::new("user", p)],
            Some(Side::Chat(m)) => m,
        };
        let (mut chosen, mut rejected) = (turns(chosen), turns(rejected));
        // The turns both sides open with belong to the prompt; each keeps at least one.
        let shared = chosen.iter().zip(&rejected).take_while(|(c, r)| c == r).count();
        let shared = shared.min(chosen.len() - 1).min(rejected.len() - 1);
        prompt.extend(chosen.drain(..shared));
        rejected.drain(..shared);
        (Sequence::Chat(prompt), Sequence::Chat(chosen), Sequence::Chat(rejected))
    } else {
        let (chosen, rejected) = (chosen.text().to_owned(), rejected.text().to_owned());
        match prompt {
            Some(Side::Text(p)) => (Sequence::Text(p), Sequence::Text(chosen), Sequence::Text(rejected)),
            _ => {
                let cut = shared_words(&chosen, &rejected);
                let prompt = Sequence::Text(chosen[..cut].to_owned());
                (prompt, Sequence::Text(chosen[cut..].to_owned()), Sequence::Text(rejected[cut..].to_owned()))
            }
        }
    };
    let pair = Pair { prompt, chosen, rejected, margin, line: 0 };
    for (side, name) in [(&pair.chosen, &fields.chosen), (&pair.rejected, &fields.rejected)] {
        if let Sequence::Chat(turns) = pair.whole(side) {
            if !turns.iter().any(|m| m.role == "assistant") {
                return Err(format!("`{name}`: the conversation has no assistant turn to score"));
            }
        }
    }
    if pair.chosen == pair.rejected {
        return Err(format!(
            "`{}` and `{}` are the same: a pair must prefer one response over another",
            fields.chosen, fields.rejected
        ));
    }
    Ok(pair)
}

/// Where the implicit prompt of two plain texts ends: before the last whitespace of the
/// text they share (so no word is split between prompt and response, and each response
/// keeps at least that whitespace), or 0 when they share no whitespace.
fn shared_words(a: &str, b: &str) -> usize {
    let shared: usize =
        a.char_indices().zip(b.chars()).take_while(|((_, x), y)| x == y).map(|((_, x), _)| x.len_utf8()).sum();
    a[..shared].rfind(char::is_whitespace).unwrap_or(0)
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

    /// The whole chosen and rejected sequences and the margin of a line.
    fn parse(line: &str) -> std::result::Result<(Sequence, Sequence, f64), String> {
        wholes(line, &Fields::default())
    }

    fn wholes(line: &str, fields: &Fields) -> std::result::Result<(Sequence, Sequence, f64), String> {
        let p = parse_pair(line, fields)?;
        Ok((p.whole(&p.chosen), p.whole(&p.rejected), p.margin))
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
    fn the_prompt_is_the_lines_own_or_what_both_sides_open_with() {
        let text = |s: &str| Sequence::Text(s.into());
        let p =
            parse_pair(r#"{"prompt": "Once", "chosen": " upon a time.", "rejected": " upon a"}"#, &Fields::default())
                .unwrap();
        assert_eq!((p.prompt, p.chosen, p.rejected), (text("Once"), text(" upon a time."), text(" upon a")));
        // Implicit: the shared words, cut before a whitespace so no word is split.
        let p = parse_pair(r#"{"chosen": "The cat sat.", "rejected": "The cat sang."}"#, &Fields::default()).unwrap();
        assert_eq!((p.prompt, p.chosen, p.rejected), (text("The cat"), text(" sat."), text(" sang.")));
        let p = parse_pair(r#"{"chosen": "ab", "rejected": "abc d"}"#, &Fields::default()).unwrap();
        assert_eq!((p.prompt, p.chosen, p.rejected), (text(""), text("ab"), text("abc d")));
        // Chat: the turns both conversations open with.
        let line = r#"{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                       "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go."}]}"#;
        let p = parse_pair(&line.replace('\n', " "), &Fields::default()).unwrap();
        assert_eq!(p.prompt, Sequence::Chat(vec![ChatMessage::new("user", "Hi")]));
        assert_eq!(p.chosen, Sequence::Chat(vec![ChatMessage::new("assistant", "Hello!")]));
        assert_eq!(p.rejected, Sequence::Chat(vec![ChatMessage::new("assistant", "Go.")]));
        // A plain prompt before chat responses is one user turn.
        let line = r#"{"prompt": "Hi", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}"#;
        assert!(parse_pair(line, &Fields::default()).is_err(), "mixed responses are refused");
        let line = r#"{"prompt": "Hi", "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}"#;
        assert_eq!(
            parse_pair(line, &Fields::default()).unwrap().prompt,
            Sequence::Chat(vec![ChatMessage::new("user", "Hi")])
        );
    }

    #[test]
    fn fields_are_renamable() {
        let fields =
            Fields { prompt: "question".into(), chosen: "good".into(), rejected: "bad".into(), ..Fields::default() };
        let (c, r, _) = wholes(r#"{"question": "Q ", "good": "yes", "bad": "no"}"#, &fields).unwrap();
        assert_eq!((c, r), (Sequence::Text("Q yes".into()), Sequence::Text("Q no".into())));
        let fields = Fields { role: "from".into(), content: "value".into(), ..Fields::default() };
        let line = r#"{"chosen": [{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"}], "rejected": [{"from": "user", "value": "a"}, {"from": "assistant", "value": "c"}]}"#;
        assert!(wholes(line, &fields).unwrap().0.is_chat());
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
