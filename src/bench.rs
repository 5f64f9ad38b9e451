//! `plumb bench generate`, `plumb bench train`, `plumb bench load` and `plumb bench
//! pack`: generation throughput and time to first token, training tokens/s (and MFU),
//! the time and peak memory of loading a checkpoint, and the time the token stream takes
//! to tokenize and pack a long document; the first two measured the way
//! `../shared/bench/hf_baseline.py` measures `transformers` (same shapes, batch, lengths;
//! a training step is forward, backward, clipping and AdamW), so the two can be compared
//! side by side on one machine. `bench/hf_train.py` measures transformers on a CPU too.
//!
//! Each prints a table when it is done (progress on stderr meanwhile, at a terminal), or,
//! with `--json`, one JSON object per line as each figure is measured ([`table`]).
mod allreduce;
mod table;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use plumb_core::data::seeded_rng;
use plumb_core::data::stream::{Mixture, SourceConfig, TokenStream};
use plumb_core::device::{device_name, dtype_name};
use plumb_core::model::generate::{self as generation, GenerationSettings, StepMode};
use plumb_core::model::llama::{LlamaConfig, LlamaForCausalLm};
use plumb_core::model::{recompute, Policy};
use plumb_core::optim::{clip_grad_norm, AdamW, AdamWConfig, Optimizer};
use plumb_core::rand::Rng;
use plumb_core::tch::{self, Device, Tensor};
use plumb_core::tokenizer::Tokenizer;
use plumb_core::train::{accumulate_gradients, OneIntraOpThread, Precision};

use plumb_host::log::progress::Counter;

use self::table::{column, Column, Report, Unit};
use crate::device::{parse_dtype, resolve_device};
use crate::Failure;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Print one JSON object per line, as each figure is measured, instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub case: Bench,
}

#[derive(clap::Subcommand)]
pub enum Bench {
    /// New tokens per second and time to first token of batched generation.
    Generate(GenerateBench),
    /// Training tokens per second (and MFU, given the device's peak FLOP/s).
    Train(TrainBench),
    /// Seconds and peak resident memory (against the file size) of loading a checkpoint.
    Load(LoadBench),
    /// Seconds the token stream takes to cut its first rows when the corpus starts with
    /// one long document (no blank lines): linear in the document's size.
    Pack(PackBench),
    /// Episodes per second of whole PPO iterations on a fixed small shape (policy,
    /// reference, value and a learned reward model), as `bench/trl_ppo.py` runs TRL's.
    Ppo(PpoBench),
    /// Trainable parameters, optimizer state and step time of LoRA against full
    /// fine-tuning on one shape.
    Lora(crate::bench_lora::LoraBench),
    /// All-reduce time and bandwidth (algorithm and bus, as nccl-tests) of c10d's Gloo on
    /// the CPU, for tensors of 1 MiB to 256 MiB, among --nproc ranks it starts itself.
    Allreduce(allreduce::AllreduceBench),
}

#[derive(clap::Args)]
pub struct PpoBench {
    /// Timed PPO iterations per repeat, after one untimed warm-up iteration.
    #[arg(long, default_value_t = 2, allow_negative_numbers = true)]
    pub iterations: usize,
    /// Repeats; the median of each figure is printed after them.
    #[arg(long, default_value_t = 3, allow_negative_numbers = true)]
    pub repeats: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Seeds the random weights, prompts and sampling.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
}

#[derive(clap::Args)]
pub struct PackBench {
    /// Sizes of the long document, in MB (10^6 bytes), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8", allow_negative_numbers = true)]
    pub mb: Vec<f64>,
    /// Tokens per row (rows hold seq_len + 1).
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    pub seq_len: usize,
    /// Each figure is the fastest of this many runs.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub repeats: usize,
}

#[derive(clap::Args)]
pub struct LoadBench {
    /// A shape of hf_baseline.py (llama-125m, llama-350m, llama-1b) or quickstart; its
    /// checkpoint holds random weights.
    #[arg(long, default_value = "llama-1b")]
    pub shape: String,
    /// The dtype of the checkpoint and of the loaded model: float32, bfloat16, float16.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// The checkpoint directory; written once (in a child process) when it holds no
    /// `config.json`. Default: plumb-bench-load-SHAPE-DTYPE in the temporary directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Load in this process, with no child processes, and print the load time and this
    /// process's peak RSS (for checking the figure with `/usr/bin/time -v`).
    #[arg(long)]
    pub in_process: bool,
    /// Write the checkpoint into --dir and exit (what the child process that writes it runs).
    #[arg(long, hide = true)]
    pub write_only: bool,
}

#[derive(clap::Args)]
pub struct TrainBench {
    /// quickstart (the quickstart recipe's model), or a shape of hf_baseline.py:
    /// llama-125m, llama-350m, llama-1b.
    #[arg(long, default_value = "quickstart")]
    pub shape: String,
    /// Sequences per step; default: the shape's case in hf_baseline.py (16 for quickstart).
    #[arg(long, allow_negative_numbers = true)]
    pub batch: Option<usize>,
    /// Tokens per sequence; default 1024 (128 for quickstart).
    #[arg(long, allow_negative_numbers = true)]
    pub seq: Option<usize>,
    /// Timed steps (the mean is reported), after `--warmup` untimed ones.
    #[arg(long, default_value_t = 20, allow_negative_numbers = true)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 5, allow_negative_numbers = true)]
    pub warmup: usize,
    /// `auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// The device's peak FLOP/s, for MFU (hf_baseline.py uses 790e12 for an H100 in bf16).
    #[arg(long, allow_negative_numbers = true)]
    pub peak_flops: Option<f64>,
    /// fp32, or bf16 (forward under bf16 autocast, fp32 master weights; hf_baseline.py's setting).
    #[arg(long, default_value = "fp32")]
    pub precision: String,
    /// How the LM head and the loss run: `chunked` (a chunk of positions at a time, what
    /// training does) or `whole` (all logits at once, kept for backward: the way before).
    #[arg(long, default_value = "chunked")]
    pub head: String,
    /// Recompute each transformer block's activations in backward (the recipes'
    /// `activation_checkpointing: true`).
    #[arg(long)]
    pub activation_checkpointing: bool,
    /// Run the step three ways, each in a child process of its own: `--head whole`,
    /// `chunked`, and `chunked` with `--activation-checkpointing`; print their peak resident
    /// memory and step time, then what chunking and what checkpointing save and cost.
    #[arg(long)]
    pub memory: bool,
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
    /// Batch sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,64", allow_negative_numbers = true)]
    pub batch: Vec<usize>,
    /// Tokens per prompt (random ids).
    #[arg(long, default_value_t = 64, allow_negative_numbers = true)]
    pub prompt_len: usize,
    /// New tokens per sequence.
    #[arg(long, default_value_t = 256, allow_negative_numbers = true)]
    pub new_tokens: usize,
    /// Each figure is the median of this many runs, after a warm-up.
    #[arg(long, default_value_t = 3, allow_negative_numbers = true)]
    pub repeats: usize,
    /// `auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Sequences finish at different steps, as real generations do: each stops after a
    /// length spread evenly over 1..=--new-tokens (by its first sampled token). Without
    /// it every sequence runs to --new-tokens.
    #[arg(long)]
    pub spread: bool,
    /// Keep finished sequences in the batch (decoding padding), as plumb did before
    /// compaction: to measure what compaction saves.
    #[arg(long)]
    pub no_compact: bool,
    /// How decoding steps run: `auto` (replayed as a CUDA graph on CUDA), `growing`
    /// (eager, over the growing cache: to measure what graphs save) or `fixed` (the
    /// graph's fixed-shape steps, eager).
    #[arg(long, default_value = "auto")]
    pub steps: String,
    /// Measure `transformers.generate` beside plumb in this run: this Python (with torch
    /// and transformers) runs `bench/hf_generate.py` on the same checkpoint (the shape's
    /// random weights, written once) and the same prompts, and each batch gets a line
    /// with both figures and their ratio.
    #[arg(long, value_name = "PYTHON")]
    pub transformers: Option<PathBuf>,
    /// Prompts get lengths spread over --prompt-min..=--prompt-len (left-padded), as in
    /// a real batch. Default: all --prompt-len.
    #[arg(long, allow_negative_numbers = true)]
    pub prompt_min: Option<usize>,
    /// Threads of libtorch's CPU ops (and of torch on the transformers side); default:
    /// libtorch's own choice.
    #[arg(long, allow_negative_numbers = true)]
    pub threads: Option<usize>,
}

/// The shapes of hf_baseline.py, and the quickstart recipe's model.
pub(crate) fn shape(name: &str) -> Option<LlamaConfig> {
    // The quickstart's tokenizer comes out at 637 tokens; it ties its embeddings.
    let (vocab, hidden, intermediate, layers, heads, kv_heads, tie) = match name {
        "quickstart" => (637, 128, 352, 4, 4, 4, true),
        "llama-125m" => (32000, 768, 2048, 12, 12, 12, false),
        "llama-350m" => (32000, 1024, 2816, 24, 16, 16, false),
        "llama-1b" => (32000, 2048, 5632, 16, 32, 8, false),
        _ => return None,
    };
    serde_json::from_value(serde_json::json!({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
        "tie_word_embeddings": tie,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "max_position_embeddings": 4096
    }))
    .ok()
}

fn step_mode(text: &str) -> Result<StepMode, Failure> {
    match text {
        "auto" => Ok(StepMode::Auto),
        "growing" => Ok(StepMode::Growing),
        "fixed" => Ok(StepMode::FixedShape),
        other => Err(Failure::User(format!("--steps: expected auto, growing or fixed, found `{other}`"))),
    }
}

/// The most bytes tensors held at once on `device` since the process began (the CUDA
/// caching allocator's peak, torch.cuda.max_memory_allocated); None on a CPU.
fn peak_cuda_bytes(device: Device) -> Option<i64> {
    device.is_cuda().then(|| plumb_core::cuda::memory_stats(device).ok().map(|m| m.peak)).flatten()
}

pub(crate) fn synchronize(device: Device) {
    if let Device::Cuda(n) = device {
        tch::Cuda::synchronize(n as i64);
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub fn run(bench: &BenchArgs) -> Result<(), Failure> {
    let json = bench.json;
    match &bench.case {
        Bench::Generate(args) => generate(args, json),
        Bench::Train(args) => train(args, json),
        Bench::Load(args) => load(args, json),
        Bench::Pack(args) => pack(args, json),
        Bench::Ppo(args) => ppo(args, json),
        Bench::Lora(args) => crate::bench_lora::run(args),
        Bench::Allreduce(args) => allreduce::run(args, json),
    }
}

/// The ranks to start on this machine and the store's port, when this command launches
/// ranks of itself (as `plumb run --nproc`); `None` when it runs in this process.
pub fn ranks_to_launch(bench: &BenchArgs) -> Result<Option<(usize, Option<u16>)>, Failure> {
    match &bench.case {
        Bench::Allreduce(args) => allreduce::launch(args),
        _ => Ok(None),
    }
}

/// Runs `work` with a bar of `total` steps (on stderr, at a terminal), then prints the
/// report's table once the bar is gone.
fn measured(
    label: &str,
    total: usize,
    mut report: Report,
    work: impl FnOnce(&Counter, &mut Report) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let progress = Counter::new(label, total as u64);
    work(&progress, &mut report)?;
    drop(progress);
    report.print();
    Ok(())
}

const TRAIN_COLUMNS: &[Column] = &[
    column("model", "model", Unit::Text),
    column("device", "device", Unit::Text),
    column("precision", "precision", Unit::Text),
    column("params", "params", Unit::Integer),
    column("batch", "batch", Unit::Integer),
    column("seq", "seq", Unit::Integer),
    column("steps", "steps", Unit::Integer),
    column("step_s", "step (s)", Unit::Decimals(4)),
    column("tokens_per_s", "tokens/s", Unit::Decimals(1)),
    column("mfu", "MFU", Unit::Percent),
    column("peak_cuda_bytes", "peak CUDA", Unit::Bytes),
];

const GENERATE_COLUMNS: &[Column] = &[
    column("model", "model", Unit::Text),
    column("device", "device", Unit::Text),
    column("dtype", "dtype", Unit::Text),
    column("batch", "batch", Unit::Integer),
    column("prompt", "prompt (tokens)", Unit::Integer),
    column("new_tokens", "new (tokens)", Unit::Integer),
    column("repeats", "repeats", Unit::Integer),
    column("generated_tokens", "generated (tokens)", Unit::Integer),
    column("seconds", "time (s)", Unit::Decimals(3)),
    column("tokens_per_s", "tokens/s", Unit::Decimals(1)),
    column("ttft_ms", "TTFT (ms)", Unit::Decimals(1)),
    column("compact", "compact", Unit::Text),
    column("spread", "spread", Unit::Text),
];

const LOAD_COLUMNS: &[Column] = &[
    column("model", "model", Unit::Text),
    column("device", "device", Unit::Text),
    column("dtype", "dtype", Unit::Text),
    column("file_bytes", "file", Unit::Bytes),
    column("load_s", "load (s)", Unit::Decimals(3)),
    column("peak_rss_bytes", "peak RSS", Unit::Bytes),
    column("peak_rss_over_file", "RSS / file", Unit::Decimals(2)),
    column("dir", "checkpoint", Unit::Text),
];

const LOAD_IN_PROCESS_COLUMNS: &[Column] = &[
    column("dir", "checkpoint", Unit::Text),
    column("params", "params", Unit::Integer),
    column("dtype", "dtype", Unit::Text),
    column("load_s", "load (s)", Unit::Decimals(3)),
    column("peak_rss_bytes", "peak RSS", Unit::Bytes),
];

const PACK_COLUMNS: &[Column] = &[
    column("document_mb", "document (MB)", Unit::Decimals(2)),
    column("document_tokens", "tokens", Unit::Integer),
    column("rows", "rows", Unit::Integer),
    column("seq_len", "seq_len", Unit::Integer),
    column("repeats", "repeats", Unit::Integer),
    column("first_rows_s", "first rows (s)", Unit::Decimals(3)),
    column("mb_per_s", "MB/s", Unit::Decimals(2)),
    column("tokenize_s", "tokenize (s)", Unit::Decimals(3)),
];

const PPO_COLUMNS: &[Column] = &[
    column("case", "case", Unit::Text),
    column("repeat", "repeat", Unit::Text),
    column("device", "device", Unit::Text),
    column("iterations", "iterations", Unit::Integer),
    column("episodes_per_s", "episodes/s", Unit::Decimals(2)),
    column("rollout_share", "rollout", Unit::Percent),
    column("train_share", "training", Unit::Percent),
    column("iteration_s", "iteration (s)", Unit::Decimals(3)),
    column("peak_rss_bytes", "peak RSS", Unit::Bytes),
];

pub(crate) fn unknown_shape(name: &str) -> Failure {
    Failure::User(format!("--shape: unknown shape `{name}`; expected quickstart, llama-125m, llama-350m or llama-1b"))
}

/// Mean seconds of a full training step on random tokens, as hf_baseline.py's `train`.
fn train(args: &TrainBench, json: bool) -> Result<(), Failure> {
    if args.memory {
        return train_memory(args);
    }
    let chunks = match args.head.as_str() {
        "chunked" => plumb_core::model::HeadChunks::Auto,
        "whole" => plumb_core::model::HeadChunks::Whole,
        other => return Err(Failure::User(format!("--head: expected chunked or whole, found `{other}`"))),
    };
    let user = |e: plumb_core::Error| Failure::User(e.to_string());
    let config = shape(&args.shape).ok_or_else(|| unknown_shape(&args.shape))?;
    let quickstart = args.shape == "quickstart";
    let batch = args.batch.unwrap_or(if quickstart || args.shape == "llama-125m" { 16 } else { 8 });
    let seq = args.seq.unwrap_or(if quickstart { 128 } else { 1024 });
    if batch == 0 || seq == 0 || args.steps == 0 {
        return Err(Failure::User("--batch, --seq and --steps must be positive".into()));
    }
    let device = resolve_device(&args.device)?;
    let precision = match args.precision.as_str() {
        "fp32" => Precision::Fp32,
        "bf16" => Precision::Bf16,
        other => return Err(Failure::User(format!("--precision: expected fp32 or bf16, found `{other}`"))),
    };
    tch::manual_seed(0);
    let (layers, hidden) = (config.num_hidden_layers, config.hidden_size);
    let model = LlamaForCausalLm::new(config, device).map_err(user)?;
    let params = model.num_parameters();
    let mut optimizer = AdamW::new(model.var_store(), AdamWConfig { lr: 1e-4, ..Default::default() });
    let data = Tensor::randint(model.vocab_size(), [batch as i64, seq as i64 + 1], (tch::Kind::Int64, device));
    let rows: Vec<i64> = (0..batch as i64).collect();
    let mut step = || -> Result<(), Failure> {
        optimizer.zero_grad();
        accumulate_gradients(&model, &data, &rows, batch, device, precision, chunks).map_err(user)?;
        clip_grad_norm(&optimizer.parameters(), 1.0).map_err(user)?;
        optimizer.step().map_err(user)
    };
    let _checkpointing = recompute::enable(args.activation_checkpointing);
    let rss_before_steps = rss_bytes();
    let progress = Counter::new("bench train", (args.warmup + args.steps) as u64);
    progress.doing("warm-up");
    for _ in 0..args.warmup {
        step()?;
        progress.step();
    }
    synchronize(device);
    progress.doing("timed steps");
    let start = Instant::now();
    for _ in 0..args.steps {
        step()?;
        progress.step();
    }
    synchronize(device);
    let step_s = start.elapsed().as_secs_f64() / args.steps as f64;
    drop(progress);
    let tokens_per_s = (batch * seq) as f64 / step_s;
    // Parameters and attention, as hf_baseline.py counts them (Kaplan/PaLM accounting).
    let flops_per_token = 6.0 * params as f64 + 12.0 * (layers * hidden * seq) as f64;
    let line = serde_json::json!({
        "case": "train", "model": args.shape, "device": device_name(device), "precision": args.precision,
        "params": params, "batch": batch, "seq": seq, "steps": args.steps,
        "step_s": step_s, "tokens_per_s": tokens_per_s,
        "mfu": args.peak_flops.map(|peak| tokens_per_s * flops_per_token / peak),
        "head": args.head, "activation_checkpointing": args.activation_checkpointing,
        "rss_before_steps_bytes": rss_before_steps, "peak_rss_bytes": peak_rss_bytes(),
        "peak_cuda_bytes": peak_cuda_bytes(device),
    });
    let mut report = Report::new(json, TRAIN_COLUMNS);
    report.add(&line);
    report.print();
    Ok(())
}

fn generate(args: &GenerateBench, json: bool) -> Result<(), Failure> {
    if let Some(threads) = args.threads {
        if threads == 0 {
            return Err(Failure::User("--threads must be positive".into()));
        }
        tch::set_num_threads(threads as i32);
    }
    let min_len = args.prompt_min.unwrap_or(args.prompt_len);
    if args.repeats == 0 || args.new_tokens == 0 || min_len == 0 || min_len > args.prompt_len || args.batch.contains(&0)
    {
        return Err(Failure::User(
            "--repeats, --new-tokens, --prompt-len and --batch must be positive, and --prompt-min at most --prompt-len"
                .into(),
        ));
    }
    let steps = step_mode(&args.steps)?;
    if let Some(python) = &args.transformers {
        return generate_beside_transformers(args, python, steps);
    }
    let user = |e: plumb_core::Error| Failure::User(e.to_string());
    let device = resolve_device(&args.device)?;
    let kind = parse_dtype(args.dtype.as_deref(), device)?;
    tch::manual_seed(0);
    let (name, model): (String, Box<dyn Policy>) = match &args.model {
        Some(dir) => (dir.display().to_string(), plumb_core::model::load(dir, device, kind).map_err(user)?),
        None => {
            let config = shape(&args.shape).ok_or_else(|| unknown_shape(&args.shape))?;
            let mut model = LlamaForCausalLm::new(config, device).map_err(user)?;
            model.set_kind(kind);
            (args.shape.clone(), Box::new(model))
        }
    };
    let vocab = model.vocab_size() as u64;
    let mut rng = seeded_rng(1);
    let runs = args.batch.len() * (1 + args.repeats);
    measured("bench generate", runs, Report::new(json, GENERATE_COLUMNS), |progress, report| {
        for &batch in &args.batch {
            let prompts = random_prompts(&mut rng, batch, min_len..=args.prompt_len, vocab);
            let settings = |new: usize| GenerationSettings {
                max_new_tokens: new,
                temperature: 1.0,
                seed: Some(0),
                compact: !args.no_compact,
                steps,
                ..Default::default()
            };
            // (seconds, new tokens drawn): with --spread, sequences end early.
            let timed = |new: usize| -> Result<(f64, usize), Failure> {
                synchronize(device);
                let start = Instant::now();
                let spread = |tokens: &[i64]| tokens.len() > (tokens[0] as usize * 7919) % new;
                let check: Option<generation::StopCheck> = if args.spread { Some(&spread) } else { None };
                let out = generation::generate(model.as_ref(), &prompts, &settings(new), check).map_err(user)?;
                synchronize(device);
                debug_assert!(args.spread || out.iter().all(|g| g.tokens.len() == new));
                Ok((start.elapsed().as_secs_f64(), out.iter().map(|g| g.tokens.len()).sum()))
            };
            progress.doing(&format!("batch {batch}, warm-up"));
            timed(32.min(args.new_tokens))?; // warm-up
            progress.step();
            let mut first = Vec::new();
            let mut full = Vec::new();
            let mut drawn = 0;
            for repeat in 1..=args.repeats {
                progress.doing(&format!("batch {batch}, repeat {repeat}/{}", args.repeats));
                first.push(timed(1)?.0);
                let (seconds, tokens) = timed(args.new_tokens)?;
                full.push(seconds);
                drawn = tokens; // seeded: the same every repeat
                progress.step();
            }
            let seconds = median(full);
            let line = serde_json::json!({
                "case": "generate", "model": name, "device": device_name(device), "dtype": dtype_name(kind),
                "batch": batch, "prompt": args.prompt_len, "prompt_min": min_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                "tokens_per_s": drawn as f64 / seconds,
                "generated_tokens": drawn,
                "compact": !args.no_compact, "spread": args.spread, "steps": args.steps,
                "seconds": seconds,
                "ttft_ms": median(first) * 1e3,
            });
            progress.suspend(|| report.add(&line));
        }
        Ok(())
    })
}

/// `batch` prompts of random ids below `vocab`, each of a length drawn from `lengths`.
fn random_prompts(
    rng: &mut impl Rng,
    batch: usize,
    lengths: std::ops::RangeInclusive<usize>,
    vocab: u64,
) -> Vec<Vec<i64>> {
    (0..batch)
        .map(|_| {
            let len = rng.random_range(lengths.clone());
            (0..len).map(|_| rng.random_range(0..vocab) as i64).collect()
        })
        .collect()
}

/// `plumb bench generate --transformers PYTHON`: for each batch, plumb's generation and
/// `bench/hf_generate.py`'s `transformers.generate` on one checkpoint (the shape's random
/// weights, saved once; or --model) and the same prompts (lengths spread over
/// --prompt-min..=--prompt-len, left-padded), sampling at temperature 1 exactly
/// --new-tokens tokens; each side's median of --repeats runs after a warm-up, one side
/// after the other in this process's run.
fn generate_beside_transformers(args: &GenerateBench, python: &Path, steps: StepMode) -> Result<(), Failure> {
    let user = |e: plumb_core::Error| Failure::User(e.to_string());
    let min_len = args.prompt_min.unwrap_or(args.prompt_len);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/hf_generate.py");
    if !script.is_file() {
        return Err(Failure::User(format!("{}: not found (it ships in plumb's checkout)", script.display())));
    }
    let device = resolve_device(&args.device)?;
    let dir = std::env::temp_dir().join(format!("plumb-bench-generate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let checkpoint = match &args.model {
        Some(model) => model.clone(),
        None => {
            let config = shape(&args.shape).ok_or_else(|| unknown_shape(&args.shape))?;
            tch::manual_seed(0);
            LlamaForCausalLm::new(config, Device::Cpu).map_err(user)?.save(&dir).map_err(user)?;
            dir.clone()
        }
    };
    let model = plumb_core::model::load(&checkpoint, device, tch::Kind::Float).map_err(user)?;
    let vocab = model.vocab_size() as u64;
    let mut rng = seeded_rng(1);
    for &batch in &args.batch {
        let prompts = random_prompts(&mut rng, batch, min_len..=args.prompt_len, vocab);
        let prompts_file = dir.join(format!("prompts-{batch}.json"));
        std::fs::write(&prompts_file, serde_json::to_string(&prompts).unwrap_or_default())
            .map_err(io(&prompts_file))?;

        let settings = |new: usize| GenerationSettings {
            max_new_tokens: new,
            temperature: 1.0,
            seed: Some(0),
            steps,
            ..Default::default()
        };
        let timed = |new: usize| -> Result<f64, Failure> {
            synchronize(device);
            let start = Instant::now();
            let out = generation::generate(model.as_ref(), &prompts, &settings(new), None).map_err(user)?;
            synchronize(device);
            if out.iter().any(|g| g.tokens.len() != new) {
                return Err(Failure::Internal("a sequence ended before --new-tokens".into()));
            }
            Ok(start.elapsed().as_secs_f64())
        };
        timed(32.min(args.new_tokens))?; // warm-up
        let mut command = Command::new(python);
        command.arg(&script).arg("--model").arg(&checkpoint).arg("--prompts").arg(&prompts_file);
        command.args(["--new-tokens", &args.new_tokens.to_string(), "--paced"]);
        command.args(["--device", &device_name(device)]);
        command.args(["--threads", &tch::get_num_threads().to_string()]);
        let mut theirs = Paced::start(command, &dir.join(format!("transformers-{batch}.log")))?;
        // Each of plumb's runs, then one of transformers', in turn: the pairs share the
        // machine's speed of the moment. A pause before each run lets the other side's idle
        // OpenMP threads stop spinning (libgomp spins for milliseconds after a parallel region).
        let pause = || std::thread::sleep(std::time::Duration::from_millis(100));
        let mut plumb_runs = Vec::new();
        for _ in 0..args.repeats {
            pause();
            plumb_runs.push(timed(args.new_tokens)?);
            pause();
            theirs.run_once()?;
        }
        let plumb_s = median(plumb_runs);
        let theirs = theirs.finish()?;
        let hf_s = theirs["seconds"].as_f64().unwrap_or(f64::NAN);
        let tokens = (batch * args.new_tokens) as f64;
        let line = serde_json::json!({
            "case": "generate-vs-transformers", "model": args.model.as_ref().map_or(args.shape.clone(), |m| m.display().to_string()),
            "device": device_name(device), "threads": tch::get_num_threads(), "batch": batch,
            "prompt_min": prompts.iter().map(Vec::len).min(), "prompt_max": prompts.iter().map(Vec::len).max(),
            "new_tokens": args.new_tokens, "repeats": args.repeats, "steps": args.steps,
            "plumb_s": plumb_s, "plumb_tokens_per_s": tokens / plumb_s,
            "transformers_s": hf_s, "transformers_tokens_per_s": tokens / hf_s,
            "speedup": hf_s / plumb_s,
        });
        println!("{line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `bench/hf_generate.py --paced` running beside this process: one timed run of
/// `transformers.generate` per [`Paced::run_once`], then its summary line.
struct Paced {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    what: String,
    log: PathBuf,
}

impl Paced {
    /// Starts `command` (its stderr to `log`) and waits for its warm-up to end.
    fn start(mut command: Command, log: &Path) -> Result<Self, Failure> {
        use std::process::Stdio;
        let what = format!("{command:?}");
        let stderr = std::fs::File::create(log).map_err(io(log))?;
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(stderr);
        let mut child = command.spawn().map_err(|e| Failure::User(format!("cannot run {what}: {e}")))?;
        let (stdin, stdout) = (child.stdin.take(), child.stdout.take());
        let stdout = std::io::BufReader::new(stdout.ok_or_else(|| Failure::Internal("no stdout pipe".into()))?);
        let mut paced = Self { child, stdin, stdout, what, log: log.to_path_buf() };
        let ready = paced.line()?;
        if ready["ready"] != true {
            return Err(paced.failed(&format!("printed {ready} where {{\"ready\": true}} was expected")));
        }
        Ok(paced)
    }

    /// One timed run.
    fn run_once(&mut self) -> Result<(), Failure> {
        use std::io::Write;
        let sent = self.stdin.as_mut().map(|stdin| writeln!(stdin, "go").and_then(|_| stdin.flush()));
        if !matches!(sent, Some(Ok(()))) {
            return Err(self.failed("stopped reading its input"));
        }
        let ran = self.line()?;
        if !ran["seconds"].is_number() {
            return Err(self.failed(&format!("printed {ran} where {{\"seconds\": S}} was expected")));
        }
        Ok(())
    }

    /// Ends its input and returns its summary line.
    fn finish(mut self) -> Result<serde_json::Value, Failure> {
        drop(self.stdin.take());
        let summary = self.line()?;
        let _ = self.child.wait();
        Ok(summary)
    }

    /// Its next line of output, as JSON.
    fn line(&mut self) -> Result<serde_json::Value, Failure> {
        use std::io::BufRead;
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(0) | Err(_) => Err(self.failed("ended without a result")),
            Ok(_) => serde_json::from_str(line.trim())
                .map_err(|_| self.failed(&format!("printed `{}`, not a JSON line", line.trim()))),
        }
    }

    /// An error naming the command, what went wrong, and the end of its stderr.
    fn failed(&mut self, what: &str) -> Failure {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let stderr = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = stderr.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect();
        let tail = if tail.is_empty() { "(nothing on stderr)".to_string() } else { tail.join("\n") };
        Failure::User(format!("{} {what}; its stderr: {tail}", self.what))
    }
}

/// `plumb bench train --memory`: the same step with the whole logits, with the chunked
/// head, and with the chunked head and activation checkpointing, each in a child process
/// (so one's freed memory cannot hide in the other's peak); their lines, then one line
/// with what chunking saves and costs, and one with what checkpointing saves and costs.
fn train_memory(args: &TrainBench) -> Result<(), Failure> {
    let exe = std::env::current_exe().map_err(|e| Failure::Internal(format!("cannot find plumb's executable: {e}")))?;
    let mut runs = Vec::new();
    for (head, checkpointing) in [("whole", false), ("chunked", false), ("chunked", true)] {
        let mut command = Command::new(&exe);
        command.args([
            "bench",
            "--json",
            "train",
            "--shape",
            &args.shape,
            "--device",
            &args.device,
            "--precision",
            &args.precision,
        ]);
        command.args(["--steps", &args.steps.to_string(), "--warmup", &args.warmup.to_string(), "--head", head]);
        if checkpointing {
            command.arg("--activation-checkpointing");
        }
        for (flag, value) in [("--batch", args.batch), ("--seq", args.seq)] {
            if let Some(value) = value {
                command.args([flag, &value.to_string()]);
            }
        }
        let output = command.output().map_err(|e| Failure::Internal(format!("cannot run {}: {e}", exe.display())))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout.lines().last().unwrap_or_default();
        let parsed: serde_json::Value = serde_json::from_str(line).map_err(|_| {
            Failure::Internal(format!(
                "`plumb bench train --head {head}{}` printed no result: {}",
                if checkpointing { " --activation-checkpointing" } else { "" },
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        })?;
        println!("{line}");
        runs.push(parsed);
    }
    let figure = |run: &serde_json::Value, key: &str| run[key].as_f64().unwrap_or(f64::NAN);
    let (whole, chunked, checkpointed) = (&runs[0], &runs[1], &runs[2]);
    let line = serde_json::json!({
        "case": "train-memory", "model": args.shape, "batch": whole["batch"], "seq": whole["seq"],
        "peak_rss_bytes_whole": whole["peak_rss_bytes"], "peak_rss_bytes_chunked": chunked["peak_rss_bytes"],
        "saved_bytes": figure(whole, "peak_rss_bytes") - figure(chunked, "peak_rss_bytes"),
        "step_s_whole": whole["step_s"], "step_s_chunked": chunked["step_s"],
        "time_ratio": figure(chunked, "step_s") / figure(whole, "step_s"),
    });
    println!("{line}");
    let line = serde_json::json!({
        "case": "train-checkpointing", "model": args.shape, "batch": chunked["batch"], "seq": chunked["seq"],
        "peak_rss_bytes_off": chunked["peak_rss_bytes"], "peak_rss_bytes_on": checkpointed["peak_rss_bytes"],
        "saved_bytes": figure(chunked, "peak_rss_bytes") - figure(checkpointed, "peak_rss_bytes"),
        "step_s_off": chunked["step_s"], "step_s_on": checkpointed["step_s"],
        "time_ratio": figure(checkpointed, "step_s") / figure(chunked, "step_s"),
    });
    println!("{line}");
    Ok(())
}

/// The resident set size of this process now, in bytes (`VmRSS`).
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.trim_start_matches("VmRSS:").trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// The peak resident set size of this process in bytes (`VmHWM` in /proc/self/status,
/// what getrusage's maxrss reports), or None where /proc has no such line.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.trim_start_matches("VmHWM:").trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// Bytes of the safetensors files in `dir`.
fn weight_bytes(dir: &Path) -> Result<u64, Failure> {
    let entries = std::fs::read_dir(dir).map_err(|e| Failure::User(format!("{}: {e}", dir.display())))?;
    let mut total = 0;
    for entry in entries.flatten() {
        if entry.path().extension().is_some_and(|x| x == "safetensors") {
            total += entry.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    Ok(total)
}

/// Runs this executable's `bench load` with `extra` arguments and returns its stdout.
fn child(args: &LoadBench, dir: &Path, extra: &str) -> Result<String, Failure> {
    let exe = std::env::current_exe().map_err(|e| Failure::Internal(format!("finding this executable: {e}")))?;
    let output = Command::new(&exe)
        .args([
            "bench",
            "load",
            "--json",
            "--shape",
            &args.shape,
            "--dtype",
            &args.dtype,
            "--device",
            &args.device,
            extra,
        ])
        .arg("--dir")
        .arg(dir)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| Failure::Internal(format!("running {}: {e}", exe.display())))?;
    if !output.status.success() {
        return Err(Failure::User(format!("`bench load {extra}` failed ({})", output.status)));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Writes the shape's checkpoint once, then loads it in a child process (so that
/// writing it does not count) and reports the child's peak RSS against the file size.
fn load(args: &LoadBench, json: bool) -> Result<(), Failure> {
    let user = |e: plumb_core::Error| Failure::User(e.to_string());
    let device = resolve_device(&args.device)?;
    let kind = parse_dtype(Some(&args.dtype), device)?;
    let config = shape(&args.shape).ok_or_else(|| unknown_shape(&args.shape))?;
    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!(
            "plumb-bench-load-{}-{}",
            args.shape,
            plumb_core::checkpoint::hf_dtype_name(kind)
        ))
    });
    if args.write_only {
        tch::manual_seed(0);
        let mut model = LlamaForCausalLm::new(config, device).map_err(user)?;
        model.set_kind(kind);
        std::fs::create_dir_all(&dir).map_err(|e| Failure::User(format!("{}: {e}", dir.display())))?;
        return model.save(&dir).map_err(user);
    }
    if args.in_process {
        let start = Instant::now();
        let model = plumb_core::model::load(&dir, device, kind).map_err(user)?;
        synchronize(device);
        let load_s = start.elapsed().as_secs_f64();
        let line = serde_json::json!({
            "case": "load", "dir": dir.display().to_string(), "params": model.num_parameters(),
            "dtype": dtype_name(model.var_store().kind()), "load_s": load_s, "peak_rss_bytes": peak_rss_bytes(),
        });
        let mut report = Report::new(json, LOAD_IN_PROCESS_COLUMNS);
        report.add(&line);
        report.print();
        return Ok(());
    }
    let progress = Counter::new("bench load", 2);
    if !dir.join("config.json").is_file() {
        progress.suspend(|| eprintln!("writing the {} checkpoint into {} (once)", args.shape, dir.display()));
        progress.doing("writing the checkpoint");
        child(args, &dir, "--write-only")?;
    }
    progress.step();
    let file_bytes = weight_bytes(&dir)?;
    progress.doing("loading it in a child process");
    let out = child(args, &dir, "--in-process")?;
    drop(progress);
    let report: serde_json::Value = out
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| Failure::Internal(format!("the loading child printed no report: {out}")))?;
    let peak = report["peak_rss_bytes"].as_u64();
    let line = serde_json::json!({
        "case": "load", "model": args.shape, "device": device_name(device), "dtype": args.dtype,
        "dir": dir.display().to_string(), "file_bytes": file_bytes, "load_s": report["load_s"],
        "peak_rss_bytes": peak, "peak_rss_over_file": peak.map(|p| p as f64 / file_bytes.max(1) as f64),
    });
    let mut report = Report::new(json, LOAD_COLUMNS);
    report.add(&line);
    report.print();
    Ok(())
}

/// Words of the synthetic long document.
const WORDS: [&str; 16] = [
    "the", "little", "fox", "ran", "to", "a", "big", "tree", "and", "Lily", "saw", "red", "ball", "in", "park", "happy",
];

/// `mb` MB of text in lines of 12 words, with no blank line: one document.
fn long_document(mb: f64, seed: u64) -> String {
    let target = (mb * 1e6) as usize;
    let mut rng = seeded_rng(seed);
    let mut text = String::with_capacity(target + 64);
    let mut words = 0;
    while text.len() < target {
        text.push_str(WORDS[rng.random_range(0..WORDS.len())]);
        words += 1;
        text.push(if words % 12 == 0 { '\n' } else { ' ' });
    }
    text
}

/// For each size: a corpus of one long document then 300 short ones, and the seconds
/// from opening the stream to its first row: reading, tokenizing and packing the long
/// document (and the short ones, which fill the stream's first chunk).
fn pack(args: &PackBench, json: bool) -> Result<(), Failure> {
    let user = |e: plumb_core::Error| Failure::User(e.to_string());
    if args.mb.is_empty() || args.mb.iter().any(|&mb| !(mb > 0.0 && mb.is_finite())) {
        return Err(Failure::User("--mb: expected positive sizes in MB, e.g. 1,8".into()));
    }
    if args.seq_len == 0 || args.repeats == 0 {
        return Err(Failure::User("--seq-len and --repeats must be positive".into()));
    }
    let dir = std::env::temp_dir().join(format!("plumb-bench-pack-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let sample = long_document(0.05, 0);
    let tokenizer = Tokenizer::train_bpe(std::iter::once(sample.as_str()), 512, 2).map_err(user)?;
    let eos = tokenizer.eos_id().ok_or_else(|| Failure::Internal("the trained tokenizer has no EOS".into()))?;
    let short: String = (0..300).map(|i| format!("\n\nA short story, number {i}.")).collect();
    let runs = args.mb.len() * args.repeats;
    measured("bench pack", runs, Report::new(json, PACK_COLUMNS), |progress, report| {
        for (i, &mb) in args.mb.iter().enumerate() {
            let path = dir.join(format!("long-{i}.txt"));
            let document = long_document(mb, 1);
            std::fs::write(&path, format!("{document}{short}\n")).map_err(io(&path))?;
            let start = Instant::now();
            let tokens = tokenizer.encode(&document).map_err(user)?.len();
            let tokenize_s = start.elapsed().as_secs_f64();
            let sources = [SourceConfig::text(&path)];
            let mut best = f64::INFINITY;
            for repeat in 1..=args.repeats {
                progress.doing(&format!("{mb} MB, run {repeat}/{}", args.repeats));
                let start = Instant::now();
                let mixture = Mixture::open(&sources, 0, 0.0, None).map_err(user)?;
                let mut stream = TokenStream::new(mixture, args.seq_len, eos, 1, 0, None);
                stream.next_rows(&tokenizer, 1).map_err(user)?;
                best = best.min(start.elapsed().as_secs_f64());
                progress.step();
            }
            let line = serde_json::json!({
                "case": "pack", "document_mb": mb, "document_bytes": document.len(), "document_tokens": tokens,
                "rows": tokens / (args.seq_len + 1), "seq_len": args.seq_len, "repeats": args.repeats,
                "first_rows_s": best, "mb_per_s": mb / best, "tokenize_s": tokenize_s,
            });
            progress.suspend(|| report.add(&line));
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
        Ok(())
    })?;
    std::fs::remove_dir(&dir).map_err(io(&dir))
}

/// An I/O error on `path`, as the user's.
fn io(path: &Path) -> impl Fn(std::io::Error) -> Failure + '_ {
    move |e| Failure::User(format!("{}: {e}", path.display()))
}

/// The shape of `plumb bench ppo`, for `bench/trl_ppo.py` to mirror.
const PPO_BATCH: usize = 16;
const PPO_PROMPT_TOKENS: usize = 16;
const PPO_RESPONSE_TOKENS: usize = 32;
const PPO_EPOCHS: usize = 4;
const PPO_MINIBATCH: usize = 4;
const PPO_KL_COEF: f64 = 0.05;
const PPO_LR: f64 = 3e-6;

/// Whole PPO iterations on the quickstart shape: sample 32 tokens for each of 16 random
/// prompts (temperature 1, no stop token), score them with a learned reward model on the
/// same tokens, the reference's log-probs and the value model's values, KL-shaped rewards,
/// GAE and whitening (the rollout); then 4 epochs of 4 shuffled minibatches of 4, each a
/// forward and backward of policy and value model, one clip and two AdamW steps (the
/// training). The same core functions as the `rlhf.ppo` stage.
fn ppo(args: &PpoBench, json: bool) -> Result<(), Failure> {
    use plumb_core::model::scalar_head::ScalarHeadModel;
    use plumb_core::rand::seq::SliceRandom;
    use plumb_core::rollout::{
        gae, minibatch_backward_side_by_side, minibatch_loss, reference_and_values, sample, shaped_rewards, whiten,
        Experience, KlEstimator, PpoLossSettings,
    };

    let user = |e: plumb_core::Error| Failure::User(e.to_string());
    if args.repeats == 0 || args.iterations == 0 {
        return Err(Failure::User("--iterations and --repeats must be positive".into()));
    }
    let device = resolve_device(&args.device)?;
    let config = shape("quickstart").ok_or_else(|| unknown_shape("quickstart"))?;
    let shape_line = serde_json::json!({
        "case": "ppo-shape", "model": "quickstart", "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "tie_word_embeddings": true,
        "batch": PPO_BATCH, "prompt_tokens": PPO_PROMPT_TOKENS, "response_tokens": PPO_RESPONSE_TOKENS,
        "temperature": 1.0, "stop_token": null, "ppo_epochs": PPO_EPOCHS, "minibatch": PPO_MINIBATCH,
        "gradient_accumulation": 1, "kl_coef": PPO_KL_COEF, "lr": PPO_LR, "gamma": 1.0, "lam": 0.95,
        "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1,
        "models": "policy, reference (frozen), value (policy's transformer + fresh head), reward (scalar head)",
    });
    let mut report = Report::new(json, PPO_COLUMNS);
    report.note(&shape_line);

    // Random weights, saved once so the reference and the scalar-head models start from them.
    tch::manual_seed(args.seed as i64);
    let dir = std::env::temp_dir().join(format!("plumb-bench-ppo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let policy = LlamaForCausalLm::new(config, device).map_err(user)?;
    policy.save(&dir).map_err(user)?;
    let reference = plumb_core::model::load(&dir, device, tch::Kind::Float).map_err(user)?;
    let value_model = ScalarHeadModel::from_causal_lm(&dir, device, tch::Kind::Float).map_err(user)?;
    let reward_model = ScalarHeadModel::from_causal_lm(&dir, device, tch::Kind::Float).map_err(user)?;
    let _ = std::fs::remove_dir_all(&dir);
    let optimizer = |vs| AdamW::new(vs, AdamWConfig { lr: PPO_LR, ..Default::default() });
    let (mut policy_adamw, mut value_adamw) = (optimizer(policy.var_store()), optimizer(value_model.var_store()));
    let mut rng = seeded_rng(args.seed);
    let vocab = policy.vocab_size() as u64;
    let prompts: Vec<Vec<i64>> =
        (0..PPO_BATCH).map(|_| (0..PPO_PROMPT_TOKENS).map(|_| rng.random_range(0..vocab) as i64).collect()).collect();
    let settings = PpoLossSettings { clip: 0.2, clip_value: 0.2, vf_coef: 0.1, temperature: 1.0 };

    // One iteration: (rollout seconds, training seconds).
    let mut iteration = |index: u64| -> Result<(f64, f64), Failure> {
        synchronize(device);
        let started = Instant::now();
        let generation = GenerationSettings {
            max_new_tokens: PPO_RESPONSE_TOKENS,
            temperature: 1.0,
            seed: Some(args.seed.wrapping_add(index)),
            ..Default::default()
        };
        let sampled = sample(&policy, &prompts, &generation, 0).map_err(user)?;
        let (prompt_len, mask) = (sampled.prompt_len, sampled.response_mask.shallow_clone());
        let scores = {
            // (B)
            let _no_grad = tch::no_grad_guard();
            reward_model.scores(&sampled.sequences, &sampled.attention_mask).map_err(user)?
        };
        let side_by_side = device == Device::Cpu; // as the stage runs a single-process run
        let (ref_log_probs, values) =
            reference_and_values(reference.as_ref(), &value_model, &sampled, 1.0, side_by_side).map_err(user)?;
        let mut experience = Experience {
            sequences: sampled.sequences.shallow_clone(),
            attention_mask: sampled.attention_mask.shallow_clone(),
            prompt_len,
            response_mask: mask.shallow_clone(),
            log_probs: sampled.log_probs.shallow_clone(),
            ref_log_probs,
            values,
            scores,
            rewards: mask.zeros_like(),
            advantages: mask.zeros_like(),
            returns: mask.zeros_like(),
        };
        let (rewards, _kl) = shaped_rewards(&experience, PPO_KL_COEF, KlEstimator::K1);
        let (advantages, returns) = gae(&rewards, &experience.values, &mask, 1.0, 0.95);
        (experience.rewards, experience.advantages, experience.returns) =
            (rewards, whiten(&advantages, &mask, true), returns);
        synchronize(device);
        let rollout = started.elapsed().as_secs_f64();

        let started = Instant::now();
        let mut order: Vec<i64> = (0..PPO_BATCH as i64).collect();
        // As the stage trains a single-process run: on a CPU the two models side by side
        // (and the updates between them on one thread).
        let side_by_side = device == Device::Cpu;
        let _one_thread = side_by_side.then(OneIntraOpThread::enter);
        for _ in 0..PPO_EPOCHS {
            order.shuffle(&mut rng);
            for indices in order.chunks(PPO_MINIBATCH) {
                let minibatch = experience.index_select(&Tensor::from_slice(indices));
                policy_adamw.zero_grad();
                value_adamw.zero_grad();
                if side_by_side {
                    minibatch_backward_side_by_side(&policy, &value_model, &minibatch, &settings, Precision::Fp32, 1.0)
                        .map_err(user)?;
                } else {
                    let (loss, _stats) = minibatch_loss(&policy, &value_model, &minibatch, &settings).map_err(user)?;
                    loss.backward();
                }
                let mut parameters = policy_adamw.parameters();
                parameters.extend(value_adamw.parameters());
                clip_grad_norm(&parameters, 1.0).map_err(user)?;
                policy_adamw.step().map_err(user)?;
                value_adamw.step().map_err(user)?;
            }
        }
        synchronize(device);
        Ok((rollout, started.elapsed().as_secs_f64()))
    };

    let progress = Counter::new("bench ppo", (1 + args.repeats * args.iterations) as u64);
    progress.doing("warm-up");
    iteration(0)?; // warm-up
    progress.step();
    let mut figures = Vec::new();
    for repeat in 0..args.repeats {
        let (mut rollout, mut training) = (0.0, 0.0);
        for i in 0..args.iterations {
            progress.doing(&format!("repeat {}/{}, iteration {}/{}", repeat + 1, args.repeats, i + 1, args.iterations));
            let (r, t) = iteration(1 + (repeat * args.iterations + i) as u64)?;
            rollout += r;
            training += t;
            progress.step();
        }
        let seconds = rollout + training;
        let figure = (args.iterations as f64 * PPO_BATCH as f64 / seconds, rollout / seconds, training / seconds);
        let line = serde_json::json!({
            "case": "ppo", "repeat": repeat + 1, "device": device_name(device), "iterations": args.iterations,
            "episodes_per_s": figure.0, "rollout_share": figure.1, "train_share": figure.2,
            "iteration_s": seconds / args.iterations as f64, "peak_rss_bytes": peak_rss_bytes(),
        });
        progress.suspend(|| report.add(&line));
        figures.push(figure);
    }
    drop(progress);
    // The shares of the repeat whose episodes/s is the median, so the three figures agree.
    figures.sort_by(|a, b| a.0.total_cmp(&b.0));
    let middle = figures[figures.len() / 2];
    let line = serde_json::json!({
        "case": "ppo-median", "device": device_name(device), "repeats": args.repeats, "iterations": args.iterations,
        "episodes_per_s": middle.0,
        "rollout_share": middle.1,
        "train_share": middle.2,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_cuda_bytes": peak_cuda_bytes(device),
    });
    report.add(&line);
    report.print();
    Ok(())
}
