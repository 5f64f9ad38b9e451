//! Special tokens: the named ones of `tokenizer_config.json` (`bos_token`, `eos_token`, `pad_token`,
//! `unk_token`, ...) as strings for chat templates, and their ids, with the stop ids a model's
//! `generation_config.json` or `config.json` adds.
//!
//! transformers reads the same keys (`PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES` and every other
//! `*_token` key, `tokenization_utils_base.py`); a token is a string or an AddedToken object
//! (`{"__type": "AddedToken", "content": "<s>", ...}`). Its `generate` stops on every id of
//! `generation_config.json`'s `eos_token_id`, an int or a list (Llama 3 Instruct: `<|end_of_text|>`,
//! `<|eom_id|>`, `<|eot_id|>`).
use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, IoResultExt, Result};

/// The keys transformers always treats as special tokens; a value of another type is an error for these.
const STANDARD_KEYS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// Named special tokens and the ids plumb uses.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct SpecialTokens {
    /// `bos_token`, `eos_token`, ... and model-specific `*_token` keys: token string by config key.
    /// Chat templates see each under its key.
    pub tokens: BTreeMap<String, String>,
    pub bos_id: Option<i64>,
    /// The tokenizer's own EOS first, then the model's further stop ids; no duplicates.
    pub eos_ids: Vec<i64>,
    /// Without a PAD token anywhere this is the EOS id (see `Tokenizer::pad_id`).
    pub pad_id: Option<i64>,
    pub unk_id: Option<i64>,
}

/// The model's stop ids: `eos_token_id` of `generation_config.json`, else of `config.json`. (Their
/// `bos_token_id` and `pad_token_id` are not used: whether a BOS is prepended and what pads is the
/// tokenizer's call, as in transformers; Qwen2.5 names a `bos_token_id` there but never uses a BOS.)
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ModelTokenIds {
    pub eos: Vec<i64>,
}

impl ModelTokenIds {
    /// Reads `dir/generation_config.json` and `dir/config.json`; either may be absent. For
    /// a LoRA adapter, those of the model under it.
    pub fn read(dir: &Path) -> Result<Self> {
        let (dir, _) = crate::model::lora::chain(dir)?;
        for name in ["generation_config.json", "config.json"] {
            let file = dir.join(name);
            let Some(json) = read_json_object(&file)? else { continue };
            let eos = token_ids(&json, "eos_token_id", &file)?;
            if !eos.is_empty() {
                return Ok(Self { eos });
            }
        }
        Ok(Self::default())
    }
}

impl SpecialTokens {
    /// Resolves the tokens `config` (read from `config_file`) names to ids of `vocab`, adds `model`'s stop
    /// ids to the EOS, and pads with EOS when there is no PAD token. A BOS, EOS, PAD or UNK token that is not
    /// in the vocabulary is an error: transformers would add it as a new token, which the model has no
    /// embedding row for.
    pub fn resolve(
        vocab: &tokenizers::Tokenizer,
        config: &Map<String, Value>,
        config_file: &Path,
        model: &ModelTokenIds,
    ) -> Result<Self> {
        let tokens = named_tokens(config, config_file)?;
        let id_of = |key: &str| -> Result<Option<i64>> {
            let Some(token) = tokens.get(key) else { return Ok(None) };
            match vocab.token_to_id(token) {
                Some(id) => Ok(Some(i64::from(id))),
                None => Err(Error::file(config_file, format!("{key} `{token}` is not in tokenizer.json's vocabulary"))),
            }
        };
        let bos_id = id_of("bos_token")?;
        let mut eos_ids: Vec<i64> = id_of("eos_token")?.into_iter().collect();
        for &id in &model.eos {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        let pad_id = id_of("pad_token")?.or(eos_ids.first().copied());
        let unk_id = id_of("unk_token")?;
        Ok(Self { tokens, bos_id, eos_ids, pad_id, unk_id })
    }
}

/// Every `*_token` key (and `extra_special_tokens` entry) with a token value, as transformers'
/// `special_tokens_map` plus its model-specific tokens.
fn named_tokens(config: &Map<String, Value>, file: &Path) -> Result<BTreeMap<String, String>> {
    let extra = match config.get("extra_special_tokens") {
        Some(Value::Object(extra)) => extra.iter().collect(),
        _ => Vec::new(),
    };
    let mut tokens = BTreeMap::new();
    for (key, value) in config.iter().filter(|(key, _)| key.ends_with("_token")).chain(extra) {
        let token = match value {
            Value::String(token) => Some(token.clone()),
            Value::Object(added) => added.get("content").and_then(Value::as_str).map(str::to_owned),
            _ => None,
        };
        match token {
            Some(token) => {
                tokens.insert(key.clone(), token);
            }
            None if value.is_null() || !STANDARD_KEYS.contains(&key.as_str()) => {}
            None => {
                return Err(Error::file(
                    file,
                    format!("`{key}` must be a token string or an AddedToken object with `content`, not {value}"),
                ))
            }
        }
    }
    Ok(tokens)
}

/// `key` of a model config: absent or null, one id, or a list of ids.
fn token_ids(json: &Map<String, Value>, key: &str, file: &Path) -> Result<Vec<i64>> {
    let invalid = || Error::file(file, format!("`{key}` must be a token id or a list of token ids"));
    match json.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(|item| as_id(item).ok_or_else(invalid)).collect(),
        Some(item) => as_id(item).map(|id| vec![id]).ok_or_else(invalid),
    }
}

fn as_id(value: &Value) -> Option<i64> {
    value.as_i64().filter(|id| *id >= 0)
}

/// A JSON object file, or `None` when there is no such file.
pub(crate) fn read_json_object(file: &Path) -> Result<Option<Map<String, Value>>> {
    if !file.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(file).at(file)?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(json)) => Ok(Some(json)),
        Ok(_) => Err(Error::file(file, "expected a JSON object")),
        Err(e) => Err(Error::file(file, format!("invalid JSON: {e}"))),
    }
}
