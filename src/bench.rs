//! `plumb bench generate`: generation throughput and time to first token, measured the
//! way `../shared/bench/hf_baseline.py` measures `transformers` (same shapes, batch,
//! prompt and lengths, sampling at temperature 1), so the two can be compared side by
//! side on one machine.
use std::path::PathBuf;
use std::time::Instant;

use plumb_core::data::SplitMix64;
use plumb_core::model::generate::{self as generation, GenerationSettings};
use plumb_core::model::llama::{LlamaConfig, LlamaForCausalLm};
use plumb_core::model::Policy;
use plumb_core::tch::{self, Device};

use crate::device::{parse_dtype, resolve_device};
use crate::Failure;

#[derive(clap::Subcommand)]
pub enum Bench {
    /// New tokens per second and time to first token of batched generation.
    Generate(GenerateBench),
}

#[derive(clap::Args)]
pub struct GenerateBench {
    /// A Llama-architecture shape of hf_baseline.py: llama-125m, llama-350m, llama-1b
    /// (random weights, vocabulary 32000).
    #[arg(long, default_value = "llama-125m")]
    pub shape: String,
    /// Measure this model directory instead of a shape.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    pub batch: Vec<usize>,
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 256)]
    pub new_tokens: usize,
    /// Each figure is the median of this many runs, after a warm-up.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long)]
    pub dtype: Option<String>,
}

/// The shapes of hf_baseline.py.
fn shape(name: &str) -> Option<LlamaConfig> {
    let (hidden, intermediate, layers, heads, kv_heads) = match name {
        "llama-125m" => (768, 2048, 12, 12, 12),
        "llama-350m" => (1024, 2816, 24, 16, 16),
        "llama-1b" => (2048, 5632, 16, 32, 8),
        _ => return None,
    };
    serde_json::from_value(serde_json::json!({
        "model_type": "llama", "vocab_size": 32000, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "max_position_embeddings": 4096
    }))
    .ok()
}

fn synchronize(device: Device) {
    if let Device::Cuda(n) = device {
        tch::Cuda::synchronize(n as i64);
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub fn run(bench: &Bench) -> Result<(), Failure> {
    let Bench::Generate(args) = bench;
    let user = |e: plumb_core::Error| Failure::User(e.to_string());
    if args.repeats == 0 || args.new_tokens == 0 || args.prompt_len == 0 || args.batch.contains(&0) {
        return Err(Failure::User("--repeats, --new-tokens, --prompt-len and --batch must be positive".into()));
    }
    let device = resolve_device(&args.device)?;
    let kind = parse_dtype(args.dtype.as_deref(), device)?;
    tch::manual_seed(0);
    let (name, model): (String, Box<dyn Policy>) = match &args.model {
        Some(dir) => (dir.display().to_string(), plumb_core::model::load(dir, device, kind).map_err(user)?),
        None => {
            let config = shape(&args.shape).ok_or_else(|| {
                Failure::User(format!(
                    "--shape: unknown shape `{}`; expected llama-125m, llama-350m or llama-1b",
                    args.shape
                ))
            })?;
            let mut model = LlamaForCausalLm::new(config, device).map_err(user)?;
            model.set_kind(kind);
            (args.shape.clone(), Box::new(model))
        }
    };
    let vocab = model.vocab_size() as u64;
    let mut rng = SplitMix64::new(1);
    for &batch in &args.batch {
        let prompts: Vec<Vec<i64>> =
            (0..batch).map(|_| (0..args.prompt_len).map(|_| rng.below(vocab) as i64).collect()).collect();
        let settings = |new: usize| GenerationSettings {
            max_new_tokens: new,
            temperature: 1.0,
            seed: Some(0),
            ..Default::default()
        };
        let timed = |new: usize| -> Result<f64, Failure> {
            synchronize(device);
            let start = Instant::now();
            let out = generation::generate(model.as_ref(), &prompts, &settings(new), None).map_err(user)?;
            synchronize(device);
            debug_assert!(out.iter().all(|g| g.tokens.len() == new));
            Ok(start.elapsed().as_secs_f64())
        };
        timed(32.min(args.new_tokens))?; // warm-up
        let mut first = Vec::new();
        let mut full = Vec::new();
        for _ in 0..args.repeats {
            first.push(timed(1)?);
            full.push(timed(args.new_tokens)?);
        }
        let seconds = median(full);
        let line = serde_json::json!({
            "case": "generate", "model": name, "device": format!("{device:?}"), "dtype": format!("{kind:?}"),
            "batch": batch, "prompt": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "tokens_per_s": (batch * args.new_tokens) as f64 / seconds,
            "seconds": seconds,
            "ttft_ms": median(first) * 1e3,
        });
        println!("{line}");
    }
    Ok(())
}
