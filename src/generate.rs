//! `plumb generate`: continue a prompt with a model in HF layout, printing the
//! continuation to stdout as it is generated.
use std::cell::Cell;
use std::io::Write;
use std::path::PathBuf;

use plumb_core::model::generate::{self as generation, GenerationSettings};
use plumb_core::tokenizer::{ChatMessage, Tokenizer};

use crate::device::{parse_dtype, resolve_device};
use crate::Failure;

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// A model directory in HF layout (config.json, safetensors, tokenizer.json), or a
    /// hub name `ORG/NAME` already in the local Hugging Face cache (plumb does not download).
    #[arg(long)]
    pub model: PathBuf,
    /// The text to continue.
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user turn with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Print the prompt (with --chat, the text the template made of it) before the
    /// continuation.
    #[arg(long)]
    pub echo: bool,
    /// At most the room the prompt leaves in the model's context (`max_position_embeddings`);
    /// default 128, or that room where it is less.
    #[arg(long, allow_negative_numbers = true)]
    pub max_new_tokens: Option<usize>,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Sample from the k most likely tokens only; 0 keeps all.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub top_k: i64,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches top-p; 1 keeps all.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f64,
    /// Above 1 discourages tokens already in the text (as transformers applies it).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repetition_penalty: f64,
    /// Seeds sampling; without it each run draws differently.
    #[arg(long, allow_negative_numbers = true)]
    pub seed: Option<u64>,
    /// Stop when the continuation contains this text (repeatable); it is cut there.
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
}

/// New tokens when `--max-new-tokens` is not given.
const DEFAULT_MAX_NEW_TOKENS: usize = 128;

pub fn run(args: &GenerateArgs) -> Result<(), Failure> {
    let user = |e: plumb_core::Error| Failure::User(e.to_string());
    let check = |ok: bool, message: &str| if ok { Ok(()) } else { Err(Failure::User(message.to_string())) };
    check(args.temperature >= 0.0 && args.temperature.is_finite(), "--temperature: expected a value >= 0")?;
    check(args.top_p > 0.0 && args.top_p <= 1.0, "--top-p: expected a value in (0, 1]")?;
    check(args.top_k >= 0, "--top-k: expected a value >= 0")?;
    check(args.repetition_penalty > 0.0, "--repetition-penalty: expected a positive value")?;
    let device = resolve_device(&args.device)?;
    let kind = parse_dtype(args.dtype.as_deref(), device)?;
    let dir =
        plumb_core::checkpoint::hub::resolve_model(&args.model).map_err(|e| Failure::User(format!("--model: {e}")))?;
    let tokenizer = Tokenizer::from_dir(&dir).map_err(user)?;
    let model = plumb_core::model::load(&dir, device, kind).map_err(user)?;
    tokenizer.check_fits_embedding(model.vocab_size() as usize, &dir).map_err(user)?;

    let (prompt_text, prompt) = if args.chat {
        let text =
            tokenizer.apply_chat_template(&[ChatMessage::new("user", args.prompt.clone())], true).map_err(user)?;
        let ids = tokenizer.encode(&text).map_err(user)?;
        (text, ids)
    } else {
        (args.prompt.clone(), tokenizer.encode_prompt(&args.prompt).map_err(user)?)
    };
    // The whole sequence must fit the model's context: say so rather than cut it short
    // (the default is cut to fit).
    let mut max_new_tokens = args.max_new_tokens.unwrap_or(DEFAULT_MAX_NEW_TOKENS);
    if let Some(context) = model.context_length().map(|c| c.max(0) as usize) {
        let config = dir.join("config.json");
        if prompt.len() >= context {
            return Err(Failure::User(format!(
                "--prompt: {} tokens leave no room for new tokens in the model's context of {context} positions ({}); shorten the prompt",
                prompt.len(),
                config.display()
            )));
        }
        let room = context - prompt.len();
        match args.max_new_tokens {
            Some(asked) if asked > room => {
                return Err(Failure::User(format!(
                    "--max-new-tokens {asked}: with the prompt's {} tokens that is more than the model's context of {context} positions ({}); use at most {room}",
                    prompt.len(),
                    config.display()
                )))
            }
            Some(_) => {}
            None => max_new_tokens = max_new_tokens.min(room),
        }
    }
    let settings = GenerationSettings {
        max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        stop_tokens: tokenizer.eos_ids(),
        seed: args.seed,
        pad_token: tokenizer.pad_id().unwrap_or(0),
        context: None,
        // Stream each token as it comes: one device read a token is nothing beside a human reader.
        check_every: 1,
        ..Default::default()
    };
    // The printer decodes as tokens come; it ends generation at a stop string, or once
    // stdout is gone (e.g. `| head`).
    let halt = Cell::new(false);
    let stop_check = |_: &[i64]| halt.get();
    if args.echo {
        print!("{prompt_text}");
    }
    let mut printer = Printer::new(&tokenizer, &args.stop, &halt);
    let mut on_token = |_row: usize, token: i64| printer.push(token);
    let out = generation::generate_with(model.as_ref(), &[prompt], &settings, Some(&stop_check), Some(&mut on_token))
        .map_err(user)?;
    printer.finish(&out[0].tokens)
}

/// Prints a continuation while it is generated: each token's text as soon as it is
/// certain, holding back what may still turn out to be the start of a stop string or
/// an incomplete character. Tokens are decoded a few at a time (from the last point
/// where their text was complete), so streaming costs time linear in the length.
struct Printer<'a> {
    tokenizer: &'a Tokenizer,
    stops: &'a [String],
    tokens: Vec<i64>,
    /// Tokens before `prefix` are decoded into `text` for good; `prefix..read` are decoded
    /// again with the new ones, for the context their text depends on.
    prefix: usize,
    read: usize,
    /// The continuation's text so far.
    text: String,
    /// Bytes of `text` written.
    printed: usize,
    /// A stop string was written up to; nothing more goes out.
    done: bool,
    /// Writing failed (e.g. a closed pipe); reported at the end.
    failed: Option<std::io::Error>,
    /// Set at a stop string or when writing fails, so that generation ends.
    halt: &'a Cell<bool>,
}

impl<'a> Printer<'a> {
    fn new(tokenizer: &'a Tokenizer, stops: &'a [String], halt: &'a Cell<bool>) -> Self {
        Self {
            tokenizer,
            stops,
            tokens: Vec::new(),
            prefix: 0,
            read: 0,
            text: String::new(),
            printed: 0,
            done: false,
            failed: None,
            halt,
        }
    }

    fn push(&mut self, token: i64) {
        self.tokens.push(token);
        if self.done || self.failed.is_some() {
            return;
        }
        let decode = |ids: &[i64]| self.tokenizer.decode(ids).unwrap_or_default();
        let before = decode(&self.tokens[self.prefix..self.read]);
        let after = decode(&self.tokens[self.prefix..]);
        match after.get(before.len()..) {
            Some(new) if after.starts_with(&before) && !new.is_empty() && !new.ends_with('\u{FFFD}') => {
                self.text.push_str(new);
                (self.prefix, self.read) = (self.read, self.tokens.len());
            }
            _ => return, // an incomplete character: wait for the next token
        }
        let certain = match self.stop_at(&self.text) {
            Some(cut) => {
                self.done = true;
                self.halt.set(true);
                cut
            }
            None => self.text.len() - self.held_back(&self.text),
        };
        self.write_to(certain);
    }

    /// Writes what is left of the whole continuation `tokens` (to a stop string), and a newline.
    fn finish(mut self, tokens: &[i64]) -> Result<(), Failure> {
        if !self.done {
            let text = self.tokenizer.decode(tokens).map_err(|e| Failure::User(e.to_string()))?;
            if text.starts_with(&self.text[..self.printed]) {
                self.text = text;
            }
            let end = self.stop_at(&self.text).unwrap_or(self.text.len());
            self.write_to(end);
        }
        let mut stdout = std::io::stdout().lock();
        if let Err(e) = writeln!(stdout).and_then(|()| stdout.flush()) {
            self.failed.get_or_insert(e);
        }
        match self.failed {
            Some(e) => Err(Failure::User(format!("writing the continuation to stdout: {e}"))),
            None => Ok(()),
        }
    }

    /// Where the first stop string in `text` starts.
    fn stop_at(&self, text: &str) -> Option<usize> {
        self.stops.iter().filter_map(|s| text.find(s.as_str())).min()
    }

    /// Bytes at the end of `text` that may begin a stop string.
    fn held_back(&self, text: &str) -> usize {
        self.stops
            .iter()
            .flat_map(|s| s.char_indices().skip(1).map(move |(i, _)| &s[..i]))
            .filter(|prefix| text.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0)
    }

    /// Writes `text[printed..end]`.
    fn write_to(&mut self, end: usize) {
        if end <= self.printed || self.failed.is_some() {
            return;
        }
        let mut stdout = std::io::stdout().lock();
        match stdout.write_all(&self.text.as_bytes()[self.printed..end]).and_then(|()| stdout.flush()) {
            Ok(()) => self.printed = end,
            Err(e) => {
                self.failed = Some(e);
                self.halt.set(true);
            }
        }
    }
}
