//! Conversations to tokens with a label mask: which chat template formats them, where
//! each assistant turn lies in the rendered text, and truncation that keeps the prompt's end.
//!
//! The assistant turns are found by rendering, not by parsing: for assistant turn `i`, the
//! conversation before it rendered with the generation prompt ends where the turn's tokens
//! start, and the conversation through it ends where they stop (its end-of-turn marker
//! included, so the model learns to stop). The text is tokenized piece by piece along
//! those boundaries, so every token is either prompt or response, never both.
use std::ops::Range;

use plumb_core::tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
use plumb_core::{Error, Result};
use serde::Deserialize;

pub use plumb_core::data::template::{use_template, TemplateChoice, CHATML_TEMPLATE, DEFAULT_TEMPLATE};

/// End-of-turn markers of common templates; those that are single tokens stop generation.
const END_OF_TURN: [&str; 4] = ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"];

/// Token ids that end an assistant turn: the tokenizer's EOS ids and the end-of-turn
/// markers it has as single tokens.
pub fn stop_tokens(tokenizer: &Tokenizer) -> Result<Vec<i64>> {
    let mut stops = tokenizer.eos_ids();
    for marker in END_OF_TURN {
        if let [id] = tokenizer.encode(marker)?.as_slice() {
            if tokenizer.decode(&[*id]).map(|d| d.is_empty()).unwrap_or(false) && !stops.contains(id) {
                stops.push(*id); // a special token (decoding skips it), not plain text
            }
        }
    }
    Ok(stops)
}

/// Which tokens carry the loss.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TrainOn {
    /// Every assistant turn (its end-of-turn marker included); prompts are context only.
    #[default]
    Responses,
    /// Every token.
    All,
}

/// A tokenized example: `trained[j]` says token `j` is a target (predicted from the
/// tokens before it); `trained[0]` is always false.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<i64>,
    pub trained: Vec<bool>,
}

impl Example {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn targets(&self) -> usize {
        self.trained.iter().filter(|&&t| t).count()
    }
}

/// The rendered conversation and the byte ranges of its assistant turns.
pub fn render_with_spans(
    template: &ChatTemplate,
    messages: &[ChatMessage],
    variables: &serde_json::Map<String, serde_json::Value>,
) -> Result<(String, Vec<Range<usize>>)> {
    let full = template.render_with(messages, false, variables)?;
    let mut spans = Vec::new();
    for (i, message) in messages.iter().enumerate().filter(|(_, m)| m.role == "assistant") {
        let before = template.render_with(&messages[..i], true, variables)?;
        let through = template.render_with(&messages[..=i], false, variables)?;
        if !through.starts_with(&before) || !full.starts_with(&through) {
            return Err(Error::file(
                template.origin(),
                format!(
                    "cannot locate assistant turn {i} (\"{}\") in the rendered conversation: the template does not \
                     render a conversation as the text of its beginning followed by more; use train_on: all or \
                     another template",
                    preview(&message.content)
                ),
            ));
        }
        spans.push(before.len()..through.len());
    }
    Ok((full, spans))
}

/// Tokenizes `text` along the `spans` (sorted, disjoint byte ranges of responses).
pub fn tokenize(tokenizer: &Tokenizer, text: &str, spans: &[Range<usize>], train_on: TrainOn) -> Result<Example> {
    let mut ids = Vec::new();
    let mut trained = Vec::new();
    let mut push = |piece: &str, is_response: bool| -> Result<()> {
        if !piece.is_empty() {
            let piece_ids = tokenizer.encode(piece)?;
            trained.extend(std::iter::repeat_n(is_response || train_on == TrainOn::All, piece_ids.len()));
            ids.extend(piece_ids);
        }
        Ok(())
    };
    let mut at = 0;
    for span in spans {
        push(&text[at..span.start], false)?;
        push(&text[span.clone()], true)?;
        at = span.end;
    }
    push(&text[at..], false)?;
    if let Some(first) = trained.first_mut() {
        *first = false; // nothing before it to predict it from
    }
    Ok(Example { ids, trained })
}

/// Shortens `example` to `max_length` tokens, if longer, and says whether it did. The
/// prompt (tokens before the first target) loses its beginning, not its end: it keeps
/// what the response needs, and at least half the length when the response alone
/// would fill it; then the response loses its end.
pub fn truncate(example: &mut Example, max_length: usize) -> bool {
    let len = example.len();
    if len <= max_length {
        return false;
    }
    let prompt = example.trained.iter().position(|&t| t).unwrap_or(len);
    let response = len - prompt;
    let keep_prompt = prompt.min(max_length.saturating_sub(response).max(max_length / 2));
    let start = prompt - keep_prompt;
    let end = start + max_length;
    example.ids = example.ids[start..end].to_vec();
    example.trained = example.trained[start..end].to_vec();
    example.trained[0] = false;
    true
}

/// The messages before the last assistant turn: what a model is asked to continue.
pub fn prompt_of(messages: &[ChatMessage]) -> &[ChatMessage] {
    let last = messages.iter().rposition(|m| m.role == "assistant").unwrap_or(messages.len());
    &messages[..last]
}

fn preview(text: &str) -> String {
    let short: String = text.chars().take(40).collect();
    if short.len() < text.len() {
        format!("{short}…")
    } else {
        short
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(prompt: usize, response: usize) -> Example {
        let len = prompt + response;
        Example { ids: (0..len as i64).collect(), trained: (0..len).map(|j| j >= prompt).collect() }
    }

    #[test]
    fn truncation_keeps_the_end_of_the_prompt() {
        let mut e = example(10, 4);
        assert!(truncate(&mut e, 8));
        assert_eq!(e.ids, vec![6, 7, 8, 9, 10, 11, 12, 13]); // the prompt's last 4, the whole response
        assert_eq!(e.targets(), 4);
        let mut e = example(3, 4);
        assert!(!truncate(&mut e, 8));
    }

    #[test]
    fn a_long_response_keeps_half_the_length_of_prompt_and_loses_its_end() {
        let mut e = example(10, 20);
        assert!(truncate(&mut e, 8));
        assert_eq!(e.ids, vec![6, 7, 8, 9, 10, 11, 12, 13]);
        assert_eq!(e.trained, vec![false, false, false, false, true, true, true, true]);
    }

    #[test]
    fn the_prompt_of_a_conversation_ends_before_the_last_answer() {
        let m = |r: &str| ChatMessage::new(r, r);
        let conversation = [m("user"), m("assistant"), m("user"), m("assistant")];
        assert_eq!(prompt_of(&conversation).len(), 3);
    }
}
