//! Tokenizers through the `tokenizers` crate, read from and written to HF's layout: `tokenizer.json`,
//! `tokenizer_config.json` (special tokens, chat template) and `chat_template.jinja`, with stop ids from the
//! model's `generation_config.json` / `config.json`; byte-level BPE training for from-scratch runs.
mod chat;
mod special;

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, TokenizerBuilder};

pub use self::chat::{ChatMessage, ChatTemplate, CHAT_TEMPLATE_FILE};
use self::special::{ModelTokenIds, SpecialTokens};
use crate::checkpoint::write_file_atomically;
use crate::error::{Error, IoResultExt, Result};

/// The end-of-text token plumb's trained tokenizers use (GPT-2's name for it).
pub const END_OF_TEXT: &str = "<|endoftext|>";

const TOKENIZER_FILE: &str = "tokenizer.json";
const CONFIG_FILE: &str = "tokenizer_config.json";

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `tokenizer_config.json` as read (empty when there was none); `save` writes it back.
    config: Map<String, Value>,
    /// Where `tokenizer_config.json` is or would be; errors name it.
    config_file: PathBuf,
    special: SpecialTokens,
    chat_template: Option<ChatTemplate>,
}

impl Tokenizer {
    /// `dir/tokenizer.json`, with special tokens and the chat template from `dir/tokenizer_config.json` and
    /// `dir/chat_template.jinja`, and stop ids from `dir/generation_config.json` or `dir/config.json`, each
    /// when present.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let file = dir.join(TOKENIZER_FILE);
        let inner = tokenizers::Tokenizer::from_file(&file).map_err(|e| Error::file(&file, e.to_string()))?;
        let config_file = dir.join(CONFIG_FILE);
        let config = special::read_json_object(&config_file)?.unwrap_or_default();
        let special = SpecialTokens::resolve(&inner, &config, &config_file, &ModelTokenIds::read(dir)?)?;
        let chat_template = chat::load(dir, &config, &config_file, &special.tokens)?;
        Ok(Self { inner, config, config_file, special, chat_template })
    }

    /// Trains a byte-level BPE tokenizer (GPT-2 style) on `texts`, with [`END_OF_TEXT`]
    /// as its only special token: its BOS and EOS.
    pub fn train_bpe<'a>(
        texts: impl Iterator<Item = &'a str> + Send,
        vocab_size: usize,
        min_frequency: u64,
    ) -> Result<Self> {
        Self::train_bpe_with(texts, vocab_size, min_frequency, &[], &[])
    }

    /// [`train_bpe`](Self::train_bpe) with more special tokens: `named` ones written to
    /// `tokenizer_config.json` under their key (`("mask_token", "[MASK]")`), and `additional`
    /// ones (`additional_special_tokens`, e.g. T5's sentinels), all after [`END_OF_TEXT`].
    pub fn train_bpe_with<'a>(
        texts: impl Iterator<Item = &'a str> + Send,
        vocab_size: usize,
        min_frequency: u64,
        named: &[(&str, &str)],
        additional: &[String],
    ) -> Result<Self> {
        let specials: Vec<AddedToken> = std::iter::once(END_OF_TEXT)
            .chain(named.iter().map(|(_, token)| *token))
            .chain(additional.iter().map(String::as_str))
            .map(|t| AddedToken::from(t.to_owned(), true))
            .collect();
        let mut trainer = TrainerWrapper::BpeTrainer(
            BpeTrainerBuilder::new()
                .vocab_size(vocab_size)
                .min_frequency(min_frequency)
                .show_progress(false)
                .special_tokens(specials)
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
        let inner = tokenizers::Tokenizer::from(builder);
        let mut config: Map<String, Value> =
            ["bos_token", "eos_token"].into_iter().map(|key| (key.to_owned(), json!(END_OF_TEXT))).collect();
        for (key, token) in named {
            config.insert((*key).to_owned(), json!(token));
        }
        if !additional.is_empty() {
            config.insert("additional_special_tokens".into(), json!(additional));
        }
        let config_file = PathBuf::from(CONFIG_FILE);
        let special = SpecialTokens::resolve(&inner, &config, &config_file, &ModelTokenIds::default())?;
        Ok(Self { inner, config, config_file, special, chat_template: None })
    }

    /// The id of `token` (a whole vocabulary entry, such as a special token).
    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }

    /// Tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// `bos_token`'s id.
    pub fn bos_id(&self) -> Option<i64> {
        self.special.bos_id
    }

    /// The tokenizer's `eos_token` id, else the model's first `eos_token_id`.
    pub fn eos_id(&self) -> Option<i64> {
        self.eos_ids().first().copied()
    }

    /// Every id generation stops at: `eos_token`'s, then those of `generation_config.json`'s
    /// `eos_token_id` (an int or a list; `config.json`'s when it has none). Llama 3 Instruct ends turns
    /// with `<|eot_id|>` and tool calls with `<|eom_id|>`; both stop.
    pub fn eos_ids(&self) -> Vec<i64> {
        self.special.eos_ids.clone()
    }

    /// `pad_token`'s id, else — as is common practice for models shipped without one (Llama 3) — the EOS
    /// id. Padding is masked out of attention and loss, so its id only has to be a valid one.
    pub fn pad_id(&self) -> Option<i64> {
        self.special.pad_id
    }

    pub fn unk_id(&self) -> Option<i64> {
        self.special.unk_id
    }

    /// A named special token by its `tokenizer_config.json` key: `bos_token`, `sep_token`, `image_token`.
    pub fn special_token(&self, key: &str) -> Option<&str> {
        self.special.tokens.get(key).map(String::as_str)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.special_token("bos_token")
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.special_token("eos_token")
    }

    /// The `pad_token` as configured; see [`pad_id`](Self::pad_id) for the id to pad with.
    pub fn pad_token(&self) -> Option<&str> {
        self.special_token("pad_token")
    }

    pub fn unk_token(&self) -> Option<&str> {
        self.special_token("unk_token")
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Replaces the chat template with `source` (Jinja, seeing this tokenizer's special tokens);
    /// `origin` names it in errors. [`save`](Self::save) writes it to `tokenizer_config.json`, so
    /// a model fine-tuned on a template keeps it.
    pub fn set_chat_template(&mut self, source: &str, origin: &Path) -> Result<&ChatTemplate> {
        let template = ChatTemplate::new(source, origin, &self.special.tokens)?;
        self.config.insert("chat_template".into(), json!(source));
        Ok(self.chat_template.insert(template))
    }

    /// A conversation as the model's prompt text, through its chat template (see [`ChatTemplate::render`]).
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        match &self.chat_template {
            Some(template) => template.render(messages, add_generation_prompt),
            None => Err(Error::file(
                &self.config_file,
                format!("no `chat_template` (and no {CHAT_TEMPLATE_FILE} beside it) to format a conversation with"),
            )),
        }
    }

    /// Fails unless every token id, added tokens included, has a row in the model's embedding of
    /// `embedding_rows` rows (`vocab_size` of `model_dir/config.json`): a larger id would index past it.
    pub fn check_fits_embedding(&self, embedding_rows: usize, model_dir: &Path) -> Result<()> {
        let vocab = self.inner.get_vocab(true);
        let Some(largest) = vocab.values().copied().max() else { return Ok(()) };
        if (largest as usize) < embedding_rows {
            return Ok(());
        }
        Err(Error::file(
            model_dir.join("config.json"),
            format!(
                "tokenizer.json has {} tokens (largest id {largest}) but the model's embedding has {embedding_rows} \
                 rows (config.json vocab_size)",
                vocab.len()
            ),
        ))
    }

    /// Token ids of `text` alone (no BOS/EOS added): for text already formatted, such as
    /// a rendered chat template, and for corpora.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        self.encode_inner(text, false)
    }

    /// Token ids of `text` with the tokenizer's own special tokens (e.g. Llama's BOS), as
    /// `transformers`' `tokenizer(text)` does by default: for plain prompts.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<i64>> {
        self.encode_inner(text, true)
    }

    fn encode_inner(&self, text: &str, special: bool) -> Result<Vec<i64>> {
        let encoding = self.inner.encode(text, special).map_err(|e| Error::Other(format!("tokenizing: {e}")))?;
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

    /// Writes `tokenizer.json` and `tokenizer_config.json` (as read, with `model_max_length` set) into
    /// `dir`, and `chat_template.jinja` when the template came from one. `generation_config.json` and
    /// `config.json` are the model's to write.
    pub fn save(&self, dir: &Path, model_max_length: usize) -> Result<()> {
        let file = dir.join(TOKENIZER_FILE);
        let json = self.inner.to_string(false).map_err(|e| Error::file(&file, e.to_string()))?;
        write_file_atomically(&file, json.as_bytes())?;
        let mut config = self.config.clone();
        config.entry("tokenizer_class").or_insert_with(|| json!("PreTrainedTokenizerFast"));
        config.entry("clean_up_tokenization_spaces").or_insert(json!(false));
        config.insert("model_max_length".into(), json!(model_max_length));
        let template_file = dir.join(CHAT_TEMPLATE_FILE);
        match &self.chat_template {
            Some(template) if template.origin().file_name() == Some(CHAT_TEMPLATE_FILE.as_ref()) => {
                // As transformers saves it: the file wins over the config's entry on load, so drop that.
                config.remove("chat_template");
                write_file_atomically(&template_file, template.source().as_bytes())?;
            }
            // A stale chat_template.jinja would take priority over the config's template when loaded.
            _ if template_file.is_file() => std::fs::remove_file(&template_file).at(&template_file)?,
            _ => {}
        }
        let config_file = dir.join(CONFIG_FILE);
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
        assert_eq!((loaded.bos_id(), loaded.pad_id(), loaded.eos_ids()), (Some(eos), Some(eos), vec![eos]));
        assert_eq!(loaded.encode("a dog").unwrap(), tokenizer.encode("a dog").unwrap());
        assert_eq!(loaded.vocab_size(), tokenizer.vocab_size());
    }

    use std::fs;

    use serde_json::json;

    /// A word-level `tokenizer.json`: `words` get ids 0.., then `added` special tokens the ids after them.
    fn tokenizer_dir(words: &[&str], added: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let vocab: Map<String, Value> = words.iter().enumerate().map(|(id, w)| (w.to_string(), json!(id))).collect();
        let added: Vec<Value> = added
            .iter()
            .enumerate()
            .map(|(i, token)| {
                json!({"id": words.len() + i, "content": token, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let tokenizer = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
        });
        fs::write(dir.path().join("tokenizer.json"), tokenizer.to_string()).unwrap();
        dir
    }

    fn write_json(dir: &Path, name: &str, json: Value) {
        fs::write(dir.join(name), serde_json::to_string_pretty(&json).unwrap()).unwrap();
    }

    const WORDS: [&str; 4] = ["<unk>", "hello", "world", "<pad>"];
    const ADDED: [&str; 5] = ["<|begin_of_text|>", "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>", "<image>"];

    #[test]
    fn special_tokens_come_from_strings_and_added_token_objects() {
        let dir = tokenizer_dir(&WORDS, &ADDED);
        write_json(
            dir.path(),
            "tokenizer_config.json",
            json!({
                "bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>", "lstrip": false,
                              "normalized": false, "rstrip": false, "single_word": false},
                "eos_token": "<|eot_id|>",
                "pad_token": {"content": "<pad>", "special": true},
                "unk_token": "<unk>",
                "sep_token": null,
                "add_bos_token": true,
                "image_token": "<image>",
            }),
        );
        let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(
            (tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id(), tokenizer.unk_id()),
            (Some(4), Some(7), Some(3), Some(0))
        );
        assert_eq!(tokenizer.eos_ids(), [7]);
        assert_eq!(
            (tokenizer.bos_token(), tokenizer.eos_token(), tokenizer.pad_token(), tokenizer.unk_token()),
            (Some("<|begin_of_text|>"), Some("<|eot_id|>"), Some("<pad>"), Some("<unk>"))
        );
        assert_eq!(tokenizer.special_token("image_token"), Some("<image>"));
        assert_eq!(tokenizer.special_token("sep_token"), None);
        assert_eq!(tokenizer.special_token("add_bos_token"), None);
        assert!(tokenizer.chat_template().is_none());
    }

    #[test]
    fn every_eos_token_id_of_generation_config_stops_and_pad_falls_back_to_eos() {
        let dir = tokenizer_dir(&WORDS, &ADDED);
        write_json(dir.path(), "tokenizer_config.json", json!({"eos_token": "<|eot_id|>"}));
        write_json(
            dir.path(),
            "generation_config.json",
            json!({"bos_token_id": 4, "eos_token_id": [5, 6, 7], "pad_token_id": 3}),
        );
        write_json(dir.path(), "config.json", json!({"eos_token_id": 1}));
        let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tokenizer.eos_ids(), [7, 5, 6], "the tokenizer's EOS first, no duplicates");
        assert_eq!(tokenizer.eos_id(), Some(7));
        assert_eq!((tokenizer.bos_id(), tokenizer.pad_id()), (None, Some(7)), "BOS and PAD are the tokenizer's");

        // config.json's when generation_config.json has none; one id is a list of one.
        fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
        write_json(dir.path(), "generation_config.json", json!({"eos_token_id": null}));
        write_json(dir.path(), "config.json", json!({"eos_token_id": 5}));
        let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!((tokenizer.eos_ids(), tokenizer.eos_id(), tokenizer.pad_id()), (vec![5], Some(5), Some(5)));
    }

    #[test]
    fn a_directory_with_only_tokenizer_json_has_no_special_tokens() {
        let dir = tokenizer_dir(&WORDS, &ADDED);
        let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!((tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id()), (None, None, None));
        assert!(tokenizer.eos_ids().is_empty());
        assert_eq!(tokenizer.encode("hello <|eot_id|> world").unwrap(), [1, 7, 2]);
    }

    #[test]
    fn bad_special_token_entries_are_named() {
        let dir = tokenizer_dir(&WORDS, &ADDED);
        write_json(dir.path(), "generation_config.json", json!({"eos_token_id": [5, "6"]}));
        let message = Tokenizer::from_dir(dir.path()).err().unwrap().to_string();
        let file = dir.path().join("generation_config.json");
        assert_eq!(message, format!("{}: `eos_token_id` must be a token id or a list of token ids", file.display()));

        fs::remove_file(&file).unwrap();
        write_json(dir.path(), "tokenizer_config.json", json!({"eos_token": "</s>"}));
        let message = Tokenizer::from_dir(dir.path()).err().unwrap().to_string();
        let file = dir.path().join("tokenizer_config.json");
        assert_eq!(message, format!("{}: eos_token `</s>` is not in tokenizer.json's vocabulary", file.display()));

        write_json(dir.path(), "tokenizer_config.json", json!({"pad_token": 3}));
        let message = Tokenizer::from_dir(dir.path()).err().unwrap().to_string();
        assert_eq!(
            message,
            format!(
                "{}: `pad_token` must be a token string or an AddedToken object with `content`, not 3",
                file.display()
            )
        );
    }

    #[test]
    fn check_fits_embedding_counts_added_tokens() {
        let dir = tokenizer_dir(&WORDS, &ADDED);
        let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
        tokenizer.check_fits_embedding(9, dir.path()).unwrap();
        let message = tokenizer.check_fits_embedding(8, dir.path()).unwrap_err().to_string();
        assert_eq!(
            message,
            format!(
                "{}: tokenizer.json has 9 tokens (largest id 8) but the model's embedding has 8 rows (config.json vocab_size)",
                dir.path().join("config.json").display()
            )
        );
    }

    #[test]
    fn applying_a_missing_template_names_tokenizer_config() {
        let dir = tokenizer_dir(&WORDS, &ADDED);
        write_json(dir.path(), "tokenizer_config.json", json!({"eos_token": "<|eot_id|>"}));
        let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
        let message =
            tokenizer.apply_chat_template(&[ChatMessage::new("user", "hello")], true).unwrap_err().to_string();
        let file = dir.path().join("tokenizer_config.json");
        assert_eq!(
            message,
            format!(
                "{}: no `chat_template` (and no chat_template.jinja beside it) to format a conversation with",
                file.display()
            )
        );
    }

    const TEMPLATE: &str = "{% for m in messages %}{{ bos_token + m.role + ': ' + m.content + eos_token }}{% endfor %}\
                            {% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}";

    #[test]
    fn raise_exception_and_syntax_errors_name_the_file_and_the_message() {
        let dir = tokenizer_dir(&WORDS, &ADDED);
        let template = "{% if messages[0].role != 'user' %}\n  {{ raise_exception('Conversations start with the user') }}\n{% endif %}";
        write_json(dir.path(), "tokenizer_config.json", json!({"chat_template": template}));
        let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
        let message =
            tokenizer.apply_chat_template(&[ChatMessage::new("system", "hi")], false).unwrap_err().to_string();
        let config = dir.path().join("tokenizer_config.json");
        assert_eq!(
            message,
            format!("{}: chat template, line 2: raise_exception: Conversations start with the user", config.display())
        );

        fs::write(dir.path().join("chat_template.jinja"), "{% for m in messages %}\n{{ m.content }}\n").unwrap();
        let message = Tokenizer::from_dir(dir.path()).err().unwrap().to_string();
        let file = dir.path().join("chat_template.jinja");
        assert_eq!(
            message,
            format!(
                "{}: chat template, line 2: syntax error: unexpected end of input, expected end of block",
                file.display()
            )
        );
    }

    #[test]
    fn named_templates_use_the_default_one() {
        let dir = tokenizer_dir(&WORDS, &ADDED);
        let templates = json!([{"name": "tool_use", "template": "tools"}, {"name": "default", "template": TEMPLATE}]);
        write_json(
            dir.path(),
            "tokenizer_config.json",
            json!({"chat_template": templates, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
        );
        let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
        let rendered = tokenizer.apply_chat_template(&[ChatMessage::new("user", "hello")], true).unwrap();
        assert_eq!(rendered, "<|begin_of_text|>user: hello<|eot_id|>assistant:");

        write_json(
            dir.path(),
            "tokenizer_config.json",
            json!({"chat_template": [{"name": "tool_use", "template": "x"}]}),
        );
        let message = Tokenizer::from_dir(dir.path()).err().unwrap().to_string();
        let file = dir.path().join("tokenizer_config.json");
        assert_eq!(
            message,
            format!("{}: `chat_template` lists templates [\"tool_use\"] but none named `default`", file.display())
        );
    }

    /// The template goes back where it came from: into tokenizer_config.json, or chat_template.jinja.
    #[test]
    fn a_saved_tokenizer_loads_back_with_its_special_tokens_and_template() {
        for in_jinja_file in [false, true] {
            let dir = tokenizer_dir(&WORDS, &ADDED);
            let mut config = json!({"bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>"},
                                    "eos_token": "<|eot_id|>", "pad_token": "<pad>", "model_max_length": 8192});
            if in_jinja_file {
                fs::write(dir.path().join("chat_template.jinja"), TEMPLATE).unwrap();
                config["chat_template"] = json!("overridden by chat_template.jinja");
            } else {
                config["chat_template"] = json!(TEMPLATE);
            }
            write_json(dir.path(), "tokenizer_config.json", config);
            let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
            let saved = tempfile::tempdir().unwrap();
            fs::write(saved.path().join("chat_template.jinja"), "stale").unwrap();
            tokenizer.save(saved.path(), 512).unwrap();
            let loaded = Tokenizer::from_dir(saved.path()).unwrap();

            let messages = [ChatMessage::new("user", "hello"), ChatMessage::new("assistant", "world")];
            let rendered = loaded.apply_chat_template(&messages, false).unwrap();
            assert_eq!(rendered, "<|begin_of_text|>user: hello<|eot_id|><|begin_of_text|>assistant: world<|eot_id|>");
            assert_eq!(loaded.chat_template().unwrap().source(), TEMPLATE);
            assert_eq!(saved.path().join("chat_template.jinja").is_file(), in_jinja_file);
            assert_eq!((loaded.bos_id(), loaded.eos_ids(), loaded.pad_id()), (Some(4), vec![7], Some(3)));
            let config: Value =
                serde_json::from_str(&fs::read_to_string(saved.path().join("tokenizer_config.json")).unwrap()).unwrap();
            assert_eq!(
                config["bos_token"],
                json!({"__type": "AddedToken", "content": "<|begin_of_text|>"}),
                "kept as read"
            );
            assert_eq!(config["model_max_length"], json!(512));
            assert_eq!(config.get("chat_template").is_some(), !in_jinja_file);
        }
    }

    #[test]
    fn a_broken_tokenizer_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), "{ not json").unwrap();
        let message = Tokenizer::from_dir(dir.path()).err().unwrap().to_string();
        assert!(message.contains("tokenizer.json: "), "{message}");
    }
}
