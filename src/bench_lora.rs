//! `plumb bench lora`: what LoRA saves against full fine-tuning on one of the bench's
//! shapes: trainable parameters, AdamW state (bytes of its moments, measured on the
//! optimizer) and the time of a training step (forward, backward, clipping, AdamW) on
//! random tokens, for the whole model and for adapters on the layers `--targets` names.
use std::time::Instant;

use plumb_core::device::device_name;
use plumb_core::model::lora::{LoraConfig, Request, TargetModules, ALL_LINEAR};
use plumb_core::model::{self, HeadChunks, Policy};
use plumb_core::optim::{clip_grad_norm, AdamW, AdamWConfig, Optimizer};
use plumb_core::tch::{self, Device, Kind, Tensor};
use plumb_core::train::{accumulate_gradients, Precision};

use crate::device::resolve_device;
use crate::Failure;

#[derive(clap::Args)]
pub struct LoraBench {
    /// quickstart, llama-125m, llama-350m or llama-1b (random weights, written once to a
    /// temporary directory).
    #[arg(long, default_value = "llama-125m")]
    pub shape: String,
    /// Rank of the adapters.
    #[arg(long, default_value_t = 8, allow_negative_numbers = true)]
    pub rank: i64,
    /// `all-linear`, or module names, comma-separated (`q_proj,v_proj`).
    #[arg(long, default_value = ALL_LINEAR)]
    pub targets: String,
    /// Sequences per step.
    #[arg(long, default_value_t = 4, allow_negative_numbers = true)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256, allow_negative_numbers = true)]
    pub seq: usize,
    /// Timed steps (the mean is reported), after one untimed step.
    #[arg(long, default_value_t = 3, allow_negative_numbers = true)]
    pub steps: usize,
    /// `auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// Bytes of every tensor of the optimizer's state (moments and step counters).
fn state_bytes(optimizer: &AdamW) -> i64 {
    optimizer.state().iter().map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as i64).sum()
}

pub fn run(args: &LoraBench) -> Result<(), Failure> {
    let user = |e: plumb_core::Error| Failure::User(e.to_string());
    let config = super::bench::shape(&args.shape).ok_or_else(|| super::bench::unknown_shape(&args.shape))?;
    if args.batch == 0 || args.seq == 0 || args.steps == 0 {
        return Err(Failure::User("--batch, --seq and --steps must be positive".into()));
    }
    let target_modules = match args.targets.as_str() {
        ALL_LINEAR => TargetModules::Keyword(ALL_LINEAR.into()),
        names => TargetModules::Names(names.split(',').map(|n| n.trim().to_string()).collect()),
    };
    let lora = LoraConfig { rank: args.rank, alpha: 2.0 * args.rank as f64, dropout: 0.0, target_modules };
    lora.validate().map_err(|e| Failure::User(format!("--rank/--targets: {e}")))?;
    let device = resolve_device(&args.device)?;
    let dir = std::env::temp_dir().join(format!("plumb-bench-lora-{}", args.shape));
    if !dir.join("config.json").is_file() {
        tch::manual_seed(0);
        std::fs::create_dir_all(&dir).map_err(|e| Failure::User(format!("{}: {e}", dir.display())))?;
        let model = plumb_core::model::llama::LlamaForCausalLm::new(config, Device::Cpu).map_err(user)?;
        model.save(&dir).map_err(user)?;
    }
    let mut lines = Vec::new();
    for mode in ["full", "lora"] {
        tch::manual_seed(0);
        let request = Request::New { config: &lora, seed: 0 };
        let policy: Box<dyn Policy> = match mode {
            "full" => model::load(&dir, device, Kind::Float),
            _ => model::load_with(&dir, device, Kind::Float, Some(&request)),
        }
        .map_err(user)?;
        let mut optimizer = AdamW::new(policy.trainable(), AdamWConfig { lr: 1e-4, ..Default::default() });
        let data =
            Tensor::randint(policy.vocab_size(), [args.batch as i64, args.seq as i64 + 1], (Kind::Int64, device));
        let rows: Vec<i64> = (0..args.batch as i64).collect();
        let mut step = || -> Result<(), Failure> {
            optimizer.zero_grad();
            accumulate_gradients(policy.as_ref(), &data, &rows, args.batch, device, Precision::Fp32, HeadChunks::Auto)
                .map_err(user)?;
            clip_grad_norm(&optimizer.parameters(), 1.0).map_err(user)?;
            optimizer.step().map_err(user)
        };
        step()?;
        super::bench::synchronize(device);
        let start = Instant::now();
        for _ in 0..args.steps {
            step()?;
        }
        super::bench::synchronize(device);
        let step_s = start.elapsed().as_secs_f64() / args.steps as f64;
        let parameters: i64 = policy.var_store().variables().values().map(|t| t.numel() as i64).sum();
        let trainable: i64 = optimizer.parameters().iter().map(|t| t.numel() as i64).sum();
        lines.push(serde_json::json!({
            "case": "lora", "mode": mode, "model": args.shape, "device": device_name(device),
            "rank": (mode == "lora").then_some(args.rank), "targets": (mode == "lora").then_some(&args.targets),
            "adapted_layers": policy.lora().map(|l| l.modules().len()),
            "parameters": parameters, "trainable": trainable, "optimizer_state_bytes": state_bytes(&optimizer),
            "batch": args.batch, "seq": args.seq, "step_s": step_s,
        }));
    }
    for line in &lines {
        println!("{line}");
    }
    let ratio = |key: &str| lines[1][key].as_f64().unwrap_or(0.0) / lines[0][key].as_f64().unwrap_or(1.0);
    println!(
        "lora/full: trainable parameters {:.4}, optimizer state {:.4}, step time {:.3}",
        ratio("trainable"),
        ratio("optimizer_state_bytes"),
        ratio("step_s")
    );
    Ok(())
}
