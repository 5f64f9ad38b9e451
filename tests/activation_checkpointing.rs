//! Activation checkpointing end to end through the binary: the same seeded pipeline (a
//! tiny model pretrained here, then LoRA SFT with adapter dropout) run with the recipe's
//! `activation_checkpointing` off and on gives the same training losses step by step and
//! the same held-out loss on a CPU, and the run with it on did recompute its blocks.
mod common;

use std::path::{Path, PathBuf};

use common::*;

/// The first `n` lines of the shipped instruction data.
fn small_instructions(dir: &Path, n: usize) -> PathBuf {
    let text = std::fs::read_to_string(repo_root().join("data/tiny_tales_sft.jsonl")).unwrap();
    let path = dir.join("instructions.jsonl");
    std::fs::write(&path, text.lines().take(n).collect::<Vec<_>>().join("\n") + "\n").unwrap();
    path
}

#[test]
fn pretraining_and_lora_sft_give_the_same_losses_with_activation_checkpointing() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path(), 100);
    let instructions = small_instructions(dir.path(), 40);
    let run_with = |on: bool| -> PathBuf {
        let switch = format!("      activation_checkpointing: {on}\n");
        let recipe = dir.path().join(format!("recipe_{on}.yaml"));
        std::fs::write(
            &recipe,
            format!(
                "run:\n  output_dir: run_{on}\n  seed: 5\n  device: cpu\nplugins:\n  - name: pretrain\n  - name: sft\nstages:\n{}{switch}  - name: sft\n    uses: sft.sft\n    config:\n      data: {{train: {}, format: alpaca}}\n      max_length: 64\n      batch_size: 4\n      max_steps: 6\n      log_every: 1\n      eval: {{every: 6, num_prompts: 0}}\n      lora: {{rank: 4, alpha: 8, dropout: 0.2, target_modules: all-linear}}\n{switch}",
                tiny_pretrain_stage("pretrain", &corpus, 4),
                instructions.display()
            ),
        )
        .unwrap();
        let out = plumb(dir.path(), &["run", recipe.to_str().unwrap()]);
        assert_exit(&out, 0);
        dir.path().join(format!("run_{on}"))
    };
    let (off, on) = (run_with(false), run_with(true));
    for stage in ["pretrain", "sft"] {
        let losses = |run: &Path| train_losses(&run.join("tb").join(stage));
        assert!(!losses(&off).is_empty());
        assert_eq!(losses(&on), losses(&off), "{stage}: training losses with and without checkpointing");
        let metrics = |run: &Path| stage_report(run, stage)["metrics"].clone();
        assert!(metrics(&off)["eval/loss"].is_f64(), "{stage}: {}", metrics(&off));
        assert_eq!(metrics(&on)["eval/loss"], metrics(&off)["eval/loss"], "{stage}: held-out loss");
        // 2 blocks a pass: pretraining's 4 steps, SFT's 6 (one micro-batch a step).
        let recomputed = metrics(&on)["train/recomputed_blocks"].as_f64().unwrap();
        assert!(recomputed >= 8.0, "{stage}: {recomputed} blocks recomputed");
        assert!(metrics(&off).get("train/recomputed_blocks").is_none());
    }
}
