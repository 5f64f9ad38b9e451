//! Tokenizers through the `tokenizers` crate, read from and written to HF's
//! `tokenizer.json` + `tokenizer_config.json`; byte-level BPE training for
//! from-scratch runs.
use std::path::Path;

use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, TokenizerBuilder};

use crate::checkpoint::write_file_atomically;
use crate::error::{Error, IoResultExt, Result};

/// The end-of-text token plumb's trained tokenizers use (GPT-2's name for it).
pub const END_OF_TEXT: &str = "<|endoftext|>";

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos_token: Option<String>,
}

impl Tokenizer {
    /// `dir/tokenizer.json`, with EOS from `dir/tokenizer_config.json` when present.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let file = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&file).map_err(|e| Error::file(&file, e.to_string()))?;
        let config = dir.join("tokenizer_config.json");
        let eos_token = if config.is_file() {
            let text = std::fs::read_to_string(&config).at(&config)?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::file(&config, format!("invalid JSON: {e}")))?;
            match &json["eos_token"] {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_owned),
                _ => None,
            }
        } else {
            None
        };
        Ok(Self { inner, eos_token })
    }

    /// Trains a byte-level BPE tokenizer (GPT-2 style) on `texts`, with [`END_OF_TEXT`]
    /// as its only special token.
    pub fn train_bpe<'a>(
        texts: impl Iterator<Item = &'a str> + Send,
        vocab_size: usize,
        min_frequency: u64,
    ) -> Result<Self> {
        let mut trainer = TrainerWrapper::BpeTrainer(
            BpeTrainerBuilder::new()
                .vocab_size(vocab_size)
                .min_frequency(min_frequency)
                .show_progress(false)
                .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
                .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
                .build(),
        );
        let mut builder = TokenizerBuilder::<
            ModelWrapper,
            NormalizerWrapper,
            PreTokenizerWrapper,
            PostProcessorWrapper,
            DecoderWrapper,
        >::new()
        .with_model(BPE::default().into())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
        .with_post_processor(Some(ByteLevel::new(false, true, true).into()))
        .with_decoder(Some(ByteLevel::new(false, true, true).into()))
        .build()
        .map_err(|e| Error::Other(format!("building the tokenizer: {e}")))?;
        builder.train(&mut trainer, texts).map_err(|e| Error::Other(format!("training the tokenizer: {e}")))?;
        Ok(Self { inner: tokenizers::Tokenizer::from(builder), eos_token: Some(END_OF_TEXT.into()) })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn eos_id(&self) -> Option<i64> {
        self.eos_token.as_deref().and_then(|t| self.inner.token_to_id(t)).map(i64::from)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let encoding = self.inner.encode(text, false).map_err(|e| Error::Other(format!("tokenizing: {e}")))?;
        Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
    }

    /// Tokenizes many texts in parallel.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<i64>>> {
        let encodings =
            self.inner.encode_batch(texts.to_vec(), false).map_err(|e| Error::Other(format!("tokenizing: {e}")))?;
        Ok(encodings.iter().map(|e| e.get_ids().iter().map(|&id| i64::from(id)).collect()).collect())
    }

    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().filter_map(|&id| u32::try_from(id).ok()).collect();
        self.inner.decode(&ids, true).map_err(|e| Error::Other(format!("detokenizing: {e}")))
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir`.
    pub fn save(&self, dir: &Path, model_max_length: usize) -> Result<()> {
        let file = dir.join("tokenizer.json");
        let json = self.inner.to_string(false).map_err(|e| Error::file(&file, e.to_string()))?;
        write_file_atomically(&file, json.as_bytes())?;
        let mut config = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": false,
        });
        if let Some(eos) = &self.eos_token {
            config["eos_token"] = serde_json::json!(eos);
            config["bos_token"] = serde_json::json!(eos);
        }
        let config_file = dir.join("tokenizer_config.json");
        let text = serde_json::to_string_pretty(&config).map_err(|e| Error::file(&config_file, e.to_string()))?;
        write_file_atomically(&config_file, text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trained_tokenizer_round_trips_text_and_keeps_its_eos_when_saved() {
        let texts = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"];
        let tokenizer = Tokenizer::train_bpe(texts.iter().copied(), 300, 1).unwrap();
        let ids = tokenizer.encode("the cat sat on the log").unwrap();
        assert_eq!(tokenizer.decode(&ids).unwrap(), "the cat sat on the log");
        assert!(ids.len() < "the cat sat on the log".len(), "merges were learned");
        let eos = tokenizer.eos_id().unwrap();
        let dir = tempfile::tempdir().unwrap();
        tokenizer.save(dir.path(), 64).unwrap();
        let loaded = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(loaded.eos_id(), Some(eos));
        assert_eq!(loaded.encode("a dog").unwrap(), tokenizer.encode("a dog").unwrap());
        assert_eq!(loaded.vocab_size(), tokenizer.vocab_size());
    }

    #[test]
    fn a_broken_tokenizer_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), "{ not json").unwrap();
        let message = Tokenizer::from_dir(dir.path()).err().unwrap().to_string();
        assert!(message.contains("tokenizer.json: "), "{message}");
    }
}
