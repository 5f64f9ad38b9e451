//! `plumb lora merge`: a LoRA adapter (PEFT layout, as LoRA stages save it) merged into the
//! model it adapts, saved as a plain HF checkpoint that `transformers` and every plumb
//! stage load without `peft`.
use std::path::{Path, PathBuf};

use plumb_core::checkpoint::write_dir_atomically;
use plumb_core::model::lora;
use plumb_core::tch::{Device, Kind};

use crate::Failure;

#[derive(clap::Subcommand)]
pub enum Lora {
    /// Merge an adapter into its base model (W + alpha/r·B·A) and save a plain HF checkpoint.
    Merge(MergeArgs),
}

#[derive(clap::Args)]
pub struct MergeArgs {
    /// The adapter directory (`adapter_config.json`, `adapter_model.safetensors`); its
    /// `base_model_name_or_path` is the model it adapts (itself an adapter or a checkpoint).
    pub adapter: PathBuf,
    /// Where the merged checkpoint goes (a new directory).
    #[arg(long, short)]
    pub output: PathBuf,
}

/// Files of a tokenizer in HF layout, copied beside the merged weights.
const TOKENIZER_FILES: [&str; 4] =
    ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"];

pub fn run(command: &Lora) -> Result<(), Failure> {
    let Lora::Merge(args) = command;
    let user = |e: plumb_core::Error| Failure::User(e.to_string());
    if !lora::is_adapter(&args.adapter) {
        return Err(Failure::User(format!(
            "{}: not a LoRA adapter (expected {} and no config.json)",
            args.adapter.display(),
            lora::CONFIG_FILE
        )));
    }
    if args.output.exists() {
        return Err(Failure::User(format!("--output {}: already exists; give a new directory", args.output.display())));
    }
    let (base, adapters) = lora::chain(&args.adapter).map_err(user)?;
    // fp32 on the CPU: the update is added at full precision.
    let model = plumb_core::model::load(&args.adapter, Device::Cpu, Kind::Float).map_err(user)?;
    write_dir_atomically(&args.output, |dir| {
        model.save_merged(dir)?;
        // The tokenizer the adapter was saved with, else its base's.
        let source =
            if args.adapter.join(TOKENIZER_FILES[0]).is_file() { args.adapter.as_path() } else { base.as_path() };
        copy_tokenizer(source, dir)
    })
    .map_err(user)?;
    println!("merged {} adapter(s) into {} and saved {}", adapters.len(), base.display(), args.output.display());
    Ok(())
}

fn copy_tokenizer(from: &Path, to: &Path) -> plumb_core::Result<()> {
    for name in TOKENIZER_FILES {
        let file = from.join(name);
        if file.is_file() {
            std::fs::copy(&file, to.join(name)).map_err(|e| plumb_core::Error::io(&file, e))?;
        }
    }
    Ok(())
}
