//! `plumb generate`: continue a prompt with a model in HF layout.
use std::path::PathBuf;

use plumb_core::model::generate::{self as generation, GenerationSettings};
use plumb_core::tokenizer::{ChatMessage, Tokenizer};

use crate::device::{parse_dtype, resolve_device};
use crate::Failure;

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// A model directory in HF layout (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user turn with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub top_k: i64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    #[arg(long)]
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

pub fn run(args: &GenerateArgs) -> Result<(), Failure> {
    let user = |e: plumb_core::Error| Failure::User(e.to_string());
    let check = |ok: bool, message: &str| if ok { Ok(()) } else { Err(Failure::User(message.to_string())) };
    check(args.temperature >= 0.0 && args.temperature.is_finite(), "--temperature: expected a value >= 0")?;
    check(args.top_p > 0.0 && args.top_p <= 1.0, "--top-p: expected a value in (0, 1]")?;
    check(args.top_k >= 0, "--top-k: expected a value >= 0")?;
    check(args.repetition_penalty > 0.0, "--repetition-penalty: expected a positive value")?;
    let device = resolve_device(&args.device)?;
    let kind = parse_dtype(args.dtype.as_deref(), device)?;
    let tokenizer = Tokenizer::from_dir(&args.model).map_err(user)?;
    let model = plumb_core::model::load(&args.model, device, kind).map_err(user)?;
    tokenizer.check_fits_embedding(model.vocab_size() as usize, &args.model).map_err(user)?;

    let prompt = if args.chat {
        let text =
            tokenizer.apply_chat_template(&[ChatMessage::new("user", args.prompt.clone())], true).map_err(user)?;
        tokenizer.encode(&text).map_err(user)?
    } else {
        tokenizer.encode_prompt(&args.prompt).map_err(user)?
    };
    let settings = GenerationSettings {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        stop_tokens: tokenizer.eos_ids(),
        seed: args.seed,
        pad_token: tokenizer.pad_id().unwrap_or(0),
    };
    let stop_strings = |tokens: &[i64]| {
        !args.stop.is_empty()
            && tokenizer.decode(tokens).is_ok_and(|text| args.stop.iter().any(|s| text.contains(s.as_str())))
    };
    let out = generation::generate(model.as_ref(), &[prompt], &settings, Some(&stop_strings)).map_err(user)?;
    let mut text = tokenizer.decode(&out[0].tokens).map_err(user)?;
    if let Some(cut) = args.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
        text.truncate(cut);
    }
    println!("{text}");
    Ok(())
}
