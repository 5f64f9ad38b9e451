//! A preference pair as DPO reads it: the prompt's tokens and each completion's, scored
//! apart. As TRL's `DPOTrainer`: a plain prompt is tokenized with the tokenizer's own
//! special tokens (a BOS) and each plain completion without them, then closed with EOS; a
//! conversation is rendered with the chat template, the prompt with its generation
//! prompt, and each completion is what the whole conversation renders past the prompt
//! (its end-of-turn marks its end).
use plumb_core::data::BatchOrder;
use plumb_core::model::{Policy, ScoreOptions};
use plumb_core::tch::{Device, Kind, Tensor};
use plumb_core::tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
use plumb_core::{Error, Result};

use crate::preference::{Pair, Sequence};
use crate::reward_model::scoring::collate;

/// A pair as token ids: the prompt, then the completions the log-probs are summed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenPair {
    pub prompt: Vec<i64>,
    pub chosen: Vec<i64>,
    pub rejected: Vec<i64>,
}

impl TokenPair {
    /// Tokens of both sequences (prompt and completion each).
    pub fn tokens(&self) -> usize {
        2 * self.prompt.len() + self.chosen.len() + self.rejected.len()
    }

    /// Keeps the last `max_prompt_length` prompt tokens, then the first tokens of each
    /// completion that fit in `max_length`; says whether anything was cut.
    pub fn truncate(&mut self, max_prompt_length: usize, max_length: usize) -> bool {
        let mut cut = false;
        if self.prompt.len() > max_prompt_length {
            self.prompt.drain(..self.prompt.len() - max_prompt_length);
            cut = true;
        }
        let room = max_length.saturating_sub(self.prompt.len()).max(1);
        for completion in [&mut self.chosen, &mut self.rejected] {
            if completion.len() > room {
                completion.truncate(room);
                cut = true;
            }
        }
        cut
    }
}

/// The tokens of `pair`; see the module docs. An error when the prompt has no tokens
/// (nothing to condition the first completion token on) or a template renders the prompt
/// otherwise than as the start of the whole conversation.
pub fn tokenize(pair: &Pair, tokenizer: &Tokenizer, template: Option<&ChatTemplate>) -> Result<TokenPair> {
    let (prompt, chosen, rejected) = match (&pair.prompt, &pair.chosen, &pair.rejected) {
        (Sequence::Text(prompt), Sequence::Text(chosen), Sequence::Text(rejected)) => {
            let completion = |text: &str| -> Result<Vec<i64>> {
                let mut ids = tokenizer.encode(text)?;
                ids.extend(tokenizer.eos_id());
                Ok(ids)
            };
            (tokenizer.encode_prompt(prompt)?, completion(chosen)?, completion(rejected)?)
        }
        (Sequence::Chat(prompt), Sequence::Chat(chosen), Sequence::Chat(rejected)) => {
            let template =
                template.ok_or_else(|| Error::Other("a conversation to tokenize, but no chat template".into()))?;
            let opens_reply = chosen.first().is_some_and(|m| m.role == "assistant");
            let prompt_text = if prompt.is_empty() { String::new() } else { template.render(prompt, opens_reply)? };
            let completion = |turns: &[ChatMessage]| -> Result<Vec<i64>> {
                let whole: Vec<ChatMessage> = prompt.iter().chain(turns).cloned().collect();
                let text = template.render(&whole, false)?;
                let rest = text.strip_prefix(prompt_text.as_str()).ok_or_else(|| {
                    Error::Other(
                        "the chat template renders the prompt otherwise than as the start of the whole conversation; DPO needs the prompt's text to be a prefix of it".into(),
                    )
                })?;
                tokenizer.encode(rest)
            };
            (tokenizer.encode(&prompt_text)?, completion(chosen)?, completion(rejected)?)
        }
        _ => return Err(Error::Other("the prompt and the responses mix plain text and chat".into())),
    };
    if prompt.is_empty() {
        return Err(Error::Other(
            "the prompt has no tokens (no `prompt` field, the sides open with nothing in common, and the tokenizer adds no BOS): DPO scores each completion given a prompt".into(),
        ));
    }
    if chosen.is_empty() || rejected.is_empty() {
        return Err(Error::Other("a completion has no tokens".into()));
    }
    Ok(TokenPair { prompt, chosen, rejected })
}

/// The log-probs of the chosen and of the rejected completions of `pairs` under `model`
/// in one forward pass over 2N right-padded sequences: each completion's per-token
/// log-probs summed, or with `average` their mean over its tokens. Returns (chosen (N,),
/// rejected (N,)).
pub fn completion_log_probs(
    model: &dyn Policy,
    pairs: &[&TokenPair],
    pad: i64,
    device: Device,
    average: bool,
) -> Result<(Tensor, Tensor)> {
    let rows: Vec<Vec<i64>> = pairs
        .iter()
        .map(|p| [p.prompt.as_slice(), &p.chosen].concat())
        .chain(pairs.iter().map(|p| [p.prompt.as_slice(), &p.rejected].concat()))
        .collect();
    let slices: Vec<&[i64]> = rows.iter().map(Vec::as_slice).collect();
    let (ids, attention) = collate(&slices, pad, device); // (2N, T)
    let width = ids.size()[1];
    // 1.0 at each completion token, from the position after its prompt to its end.
    let mut targets = vec![0f32; rows.len() * width as usize];
    let completions = pairs.iter().map(|p| (p.prompt.len(), p.chosen.len()));
    let completions = completions.chain(pairs.iter().map(|p| (p.prompt.len(), p.rejected.len())));
    for (row, (start, length)) in completions.enumerate() {
        let offset = row * width as usize;
        targets[offset + start..offset + start + length].fill(1.0);
    }
    let targets = Tensor::from_slice(&targets).view([rows.len() as i64, width]).to_device(device);
    // Position t predicts token t + 1, through the head a chunk of positions at a time: the
    // (2N, T, V) logits never exist whole.
    let next = ids.narrow(1, 1, width - 1);
    let log_probs = model.token_scores(&ids, None, Some(&attention), &next, 0, &ScoreOptions::default())?.log_probs; // (2N, T − 1)
    let mask = targets.narrow(1, 1, width - 1);
    let mut summed = (log_probs * &mask).sum_dim_intlist([1].as_slice(), false, Kind::Float); // (2N,)
    if average {
        summed /= mask.sum_dim_intlist([1].as_slice(), false, Kind::Float).clamp_min(1.0);
    }
    let n = pairs.len() as i64;
    Ok((summed.narrow(0, 0, n), summed.narrow(0, n, n)))
}

/// Batches of `batch_size` pair indices, fixed once from the seed (each epoch's order of
/// the batches is a [`BatchOrder`]).
pub fn batches(pairs: usize, batch_size: usize, seed: u64) -> (Vec<Vec<usize>>, BatchOrder) {
    use plumb_core::rand::seq::SliceRandom;
    let mut shuffled: Vec<usize> = (0..pairs).collect();
    shuffled.shuffle(&mut plumb_core::data::seeded_rng(seed));
    let batches: Vec<Vec<usize>> = shuffled.chunks(batch_size.max(1)).map(<[usize]>::to_vec).collect();
    let order = BatchOrder::new(batches.len(), seed);
    (batches, order)
}

#[cfg(test)]
mod tests {
    use plumb_core::data::template::DEFAULT_TEMPLATE;

    use super::*;
    use crate::preference::{parse_pair, Fields};

    fn tokenizer() -> Tokenizer {
        let text = "Hi there. Hello! Go away. The cat sat on the mat. ### Instruction: ### Response:";
        let mut tokenizer = Tokenizer::train_bpe(std::iter::once(text), 300, 1).unwrap();
        tokenizer.set_chat_template(DEFAULT_TEMPLATE, std::path::Path::new("default")).unwrap();
        tokenizer
    }

    #[test]
    fn plain_completions_end_with_eos_and_chat_completions_are_what_follows_the_rendered_prompt() {
        let tokenizer = tokenizer();
        let eos = tokenizer.eos_id().unwrap();
        let pair = parse_pair(
            r#"{"prompt": "The cat", "chosen": " sat.", "rejected": " sat on the mat."}"#,
            &Fields::default(),
        )
        .unwrap();
        let tokens = tokenize(&pair, &tokenizer, None).unwrap();
        assert_eq!(tokens.prompt, tokenizer.encode_prompt("The cat").unwrap());
        assert_eq!(tokens.chosen, [tokenizer.encode(" sat.").unwrap(), vec![eos]].concat());
        assert_eq!(*tokens.rejected.last().unwrap(), eos);

        let line =
            r#"{"prompt": [{"role": "user", "content": "Hi there."}], "chosen": "Hello!", "rejected": "Go away."}"#;
        let pair = parse_pair(line, &Fields::default()).unwrap();
        let template = tokenizer.chat_template();
        let tokens = tokenize(&pair, &tokenizer, template).unwrap();
        // The prompt with the generation prompt; each completion the rest of its conversation.
        let prompt = "### Instruction:\nHi there.\n\n### Response:\n";
        assert_eq!(tokens.prompt, tokenizer.encode(prompt).unwrap());
        assert_eq!(tokens.chosen, tokenizer.encode("Hello!<|endoftext|>\n\n").unwrap());
        assert_eq!(tokens.rejected, tokenizer.encode("Go away.<|endoftext|>\n\n").unwrap());
        let error = tokenize(&pair, &tokenizer, None).unwrap_err().to_string();
        assert!(error.contains("no chat template"), "{error}");
    }

    #[test]
    fn truncation_keeps_the_prompts_end_and_the_completions_start() {
        let mut pair = TokenPair { prompt: vec![1, 2, 3, 4], chosen: vec![5, 6, 7], rejected: vec![8] };
        assert!(pair.truncate(2, 4));
        assert_eq!(pair, TokenPair { prompt: vec![3, 4], chosen: vec![5, 6], rejected: vec![8] });
        assert!(!pair.truncate(2, 4));
    }
}
