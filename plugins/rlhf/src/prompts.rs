//! The prompt file of a rollout: JSONL, one prompt a line, plain (`prompt`) or chat
//! (`messages`, rendered with the tokenizer's chat template and its generation prompt),
//! with an optional reference answer (`reference`, else `answer`) for verifiable rewards;
//! the prompts as tokens, and the sampled responses as pairs for the rewards to score.
//! PPO and GRPO read their prompts here.
use std::path::{Path, PathBuf};

use plumb_core::model::generate::Finish;
use plumb_core::reward::ScorePair;
use plumb_core::rollout::Sampled;
use plumb_core::tokenizer::{ChatMessage, Tokenizer};
use plumb_core::{Error, Result, RunContext};
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
/// The `data:` section of a stage that samples from prompts (PPO, GRPO).
pub struct PromptData {
    /// A JSONL file of prompts (see `prompts.rs`).
    pub train: PathBuf,
    /// The names of the fields a line is read from.
    #[serde(default)]
    pub fields: PromptFields,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
/// What a prompt longer than `max_prompt_length` does.
pub enum LongPrompts {
    /// Stop before training, naming the file and line.
    #[default]
    Error,
    /// Leave it out, counted and logged.
    Drop,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
/// Where a sampled response ends.
pub enum StopToken {
    /// At the tokenizer's end-of-sequence token(s), kept as its last token.
    #[default]
    Eos,
    /// Never before `max_new_tokens`.
    None,
}

/// The prompts of `data` that fit in `max_prompt_length` tokens, their tokens, and how
/// many were dropped for their length (or the error that names the first too long, with
/// `long_prompts: error`).
pub fn encode_prompts(
    data: &PromptData,
    tokenizer: &Tokenizer,
    max_prompt_length: usize,
    long_prompts: LongPrompts,
) -> Result<(Vec<Prompt>, Vec<Vec<i64>>, usize)> {
    let file = &data.train;
    let (mut kept, mut tokens, mut dropped) = (Vec::new(), Vec::new(), 0);
    for prompt in read_prompts(file, &data.fields)? {
        let ids = prompt.tokens(tokenizer, file)?;
        if ids.is_empty() {
            return Err(Error::file(file, format!("line {}: the prompt has no tokens", prompt.line)));
        }
        if ids.len() > max_prompt_length {
            match long_prompts {
                LongPrompts::Error => {
                    return Err(Error::file(
                        file,
                        format!(
                            "line {}: the prompt has {} tokens, more than max_prompt_length {max_prompt_length} (raise it, or set long_prompts: drop)",
                            prompt.line,
                            ids.len(),
                        ),
                    ))
                }
                LongPrompts::Drop => {
                    dropped += 1;
                    continue;
                }
            }
        }
        kept.push(prompt);
        tokens.push(ids);
    }
    if kept.is_empty() {
        return Err(Error::file(file, format!("every prompt is longer than max_prompt_length {max_prompt_length}")));
    }
    Ok((kept, tokens, dropped))
}

/// The (prompt, response) pairs the rewards score for `sampled`'s responses to
/// `prompts`, with each prompt's reference answer; a stop token is not text.
pub fn score_pairs(prompts: &[&Prompt], sampled: &Sampled, tokenizer: &Tokenizer) -> Result<Vec<ScorePair>> {
    prompts
        .iter()
        .zip(&sampled.responses)
        .zip(&sampled.finishes)
        .map(|((prompt, response), finish)| {
            let text_tokens = match finish {
                Finish::StopToken => &response[..response.len() - 1],
                _ => &response[..],
            };
            let pair = ScorePair::new(prompt.display(), tokenizer.decode(text_tokens)?);
            Ok(match &prompt.reference {
                Some(reference) => pair.with_reference(reference.clone()),
                None => pair,
            })
        })
        .collect()
}

/// A few (prompt, response, score) triples as TensorBoard text.
pub fn log_samples(ctx: &RunContext, step: u64, pairs: &[ScorePair], scores: &[f64], count: usize) {
    if count == 0 {
        return;
    }
    let mut text = String::from("| prompt | response | score |\n|---|---|---|\n");
    let cell = |s: &str| s.replace('|', "\\|").replace('\n', "<br>");
    for (pair, score) in pairs.iter().zip(scores).take(count) {
        text.push_str(&format!("| {} | {} | {score:.4} |\n", cell(&pair.prompt), cell(&pair.response)));
    }
    ctx.text("samples/episodes", step as i64, &text);
}

/// The names of the fields a prompt line is read from.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PromptFields {
    /// A plain prompt, tokenized as it is (with the tokenizer's own special tokens).
    pub prompt: String,
    /// A chat prompt: a list of {role, content} messages.
    pub messages: String,
    /// The role key of each chat message.
    pub role: String,
    /// The content key of each chat message.
    pub content: String,
    /// The reference answer; when the line has no such field, `answer` is read instead.
    pub reference: String,
}

impl Default for PromptFields {
    fn default() -> Self {
        let s = |v: &str| v.to_string();
        Self {
            prompt: s("prompt"),
            messages: s("messages"),
            role: s("role"),
            content: s("content"),
            reference: s("reference"),
        }
    }
}

/// One prompt of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptText {
    Plain(String),
    Chat(Vec<ChatMessage>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    pub text: PromptText,
    pub reference: Option<String>,
    /// 1-based line in the file.
    pub line: usize,
}

impl Prompt {
    /// The prompt as the reward sees it: the plain text, or the last user message.
    pub fn display(&self) -> String {
        match &self.text {
            PromptText::Plain(text) => text.clone(),
            PromptText::Chat(messages) => messages.last().map(|m| m.content.clone()).unwrap_or_default(),
        }
    }

    /// Token ids the policy continues.
    pub fn tokens(&self, tokenizer: &Tokenizer, file: &Path) -> Result<Vec<i64>> {
        let in_line = |e: Error| Error::file(file, format!("line {}: {e}", self.line));
        match &self.text {
            PromptText::Plain(text) => tokenizer.encode_prompt(text),
            PromptText::Chat(messages) => {
                tokenizer.apply_chat_template(messages, true).map_err(in_line).and_then(|t| tokenizer.encode(&t))
            }
        }
    }
}

/// Every prompt of `path`; a line that is not a JSON object with the prompt field, or
/// a file with no prompts, is an error naming the file and line.
pub fn read_prompts(path: &Path, fields: &PromptFields) -> Result<Vec<Prompt>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e.to_string()))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut prompts = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let number = index + 1;
        let at = |message: String| Error::file(path, format!("line {number}: {message}"));
        let value: Value = serde_json::from_str(line).map_err(|e| at(format!("not JSON: {e}")))?;
        let object = value.as_object().ok_or_else(|| at("expected a JSON object".into()))?;
        let prompt_text = match (object.get(&fields.prompt), object.get(&fields.messages)) {
            (Some(Value::String(text)), _) => PromptText::Plain(text.clone()),
            (Some(_), _) => return Err(at(format!("`{}` must be a string", fields.prompt))),
            (None, Some(Value::Array(messages))) => PromptText::Chat(
                messages.iter().map(|m| message(m, fields)).collect::<std::result::Result<_, _>>().map_err(at)?,
            ),
            (None, Some(_)) => return Err(at(format!("`{}` must be a list of messages", fields.messages))),
            (None, None) => {
                return Err(at(format!(
                    "expected a `{}` (plain) or `{}` (chat) field (rename them with data.fields)",
                    fields.prompt, fields.messages
                )))
            }
        };
        if matches!(&prompt_text, PromptText::Chat(m) if m.is_empty()) {
            return Err(at(format!("`{}` is empty", fields.messages)));
        }
        let reference = match object.get(&fields.reference).or_else(|| object.get("answer")) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(_) => return Err(at(format!("`{}` must be a string or a number", fields.reference))),
        };
        prompts.push(Prompt { text: prompt_text, reference, line: number });
    }
    if prompts.is_empty() {
        return Err(Error::file(path, "no prompts: the file has no non-blank lines; expected one JSON object a line"));
    }
    Ok(prompts)
}

fn message(value: &Value, fields: &PromptFields) -> std::result::Result<ChatMessage, String> {
    let get = |key: &str| value.get(key).and_then(Value::as_str);
    match (get(&fields.role), get(&fields.content)) {
        (Some(role), Some(content)) => Ok(ChatMessage::new(role, content)),
        _ => Err(format!("each message needs string `{}` and `{}` fields", fields.role, fields.content)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_chat_prompts_with_references_and_errors_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(
            &path,
            "{\"prompt\": \"2+2=\", \"answer\": 4}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"reference\": \"yo\"}\n",
        )
        .unwrap();
        let prompts = read_prompts(&path, &PromptFields::default()).unwrap();
        assert_eq!(prompts[0], Prompt { text: PromptText::Plain("2+2=".into()), reference: Some("4".into()), line: 1 });
        assert_eq!(prompts[1].display(), "hi");
        assert_eq!((prompts[1].reference.as_deref(), prompts[1].line), (Some("yo"), 3));

        std::fs::write(&path, "{\"question\": \"x\"}\n").unwrap();
        let error = read_prompts(&path, &PromptFields::default()).unwrap_err().to_string();
        assert!(error.contains("p.jsonl") && error.contains("line 1") && error.contains("`prompt`"), "{error}");
        let renamed = PromptFields { prompt: "question".into(), ..Default::default() };
        assert_eq!(read_prompts(&path, &renamed).unwrap().len(), 1);

        std::fs::write(&path, "\n  \n").unwrap();
        let error = read_prompts(&path, &PromptFields::default()).unwrap_err().to_string();
        assert!(error.contains("no prompts"), "{error}");
    }
}
