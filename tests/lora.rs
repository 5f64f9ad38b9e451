//! LoRA end to end through the binary: a tiny model pretrained here is tuned with adapters
//! by SFT (dropout on), then a reward model and PPO start from that adapter. Checked: what
//! each stage trains and its optimizer state are a fraction of full fine-tuning's (the
//! figures are printed); the SFT adapter is saved in PEFT's layout, loads in `plumb
//! generate` and merges (`plumb lora merge`) into a checkpoint that generates the same
//! text; a resumed LoRA run continues the same trajectory, dropout masks included; PPO's
//! reference is the policy with its adapters off (no model copy; KL 0 at the first step).
//! DPO and GRPO train adapters the same way, their reference the base model under the
//! switched-off adapters, which stays bit-identical through the run.
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

fn prompt_file(dir: &Path) -> PathBuf {
    let starts = ["One day, Lily", "Tom and his dog", "The sun was", "Once upon a time"];
    let lines: Vec<String> = starts.iter().cycle().take(8).map(|s| format!("{{\"prompt\": \"{s}\"}}")).collect();
    let path = dir.join("prompts.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn scalars(tb: &Path, tag: &str) -> Vec<(i64, f64)> {
    let events = read_tensorboard(tb);
    let series = events["scalars"][tag].as_array().unwrap_or_else(|| panic!("no {tag} in {events}"));
    series.iter().map(|e| (e[0].as_i64().unwrap(), e[1].as_f64().unwrap())).collect()
}

/// The (trainable, all) parameter counts of the first log line `LoRA r=...` after `after`.
fn lora_figures(log: &str, after: &str) -> (f64, f64) {
    let start = log.find(after).unwrap_or_else(|| panic!("no `{after}` in {log}"));
    let line = log[start..].lines().find(|l| l.contains("LoRA r=")).unwrap_or_else(|| panic!("no LoRA line in {log}"));
    println!("{line}");
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "trainable").unwrap();
    (words[at - 1].parse().unwrap(), words[at + 3].parse().unwrap())
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).len()
}

#[test]
fn sft_reward_model_and_ppo_train_adapters_that_peft_layout_saves_and_plumb_loads() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path(), 200);
    let instructions = small_instructions(dir.path(), 60);
    let prefs = repo_root().join("data/tiny_tales_prefs.jsonl");
    let prompts = prompt_file(dir.path());
    let run = dir.path().join("run");
    let recipe = dir.path().join("recipe.yaml");
    std::fs::write(
        &recipe,
        format!(
            r#"run:
  output_dir: {run}
  seed: 4
  device: cpu
plugins:
  - name: pretrain
  - name: sft
  - name: rlhf
rewards:
  - name: rm
    uses: rlhf.learned
    config: {{model: {run}/reward_model/final, batch_size: 4}}
stages:
{pretrain}      checkpoint: {{every: 12}}
  - name: sft
    uses: sft.sft
    config:
      data: {{train: {instructions}, format: alpaca}}
      max_length: 64
      batch_size: 4
      max_steps: 8
      log_every: 1
      optimizer: {{lr: 1.0e-2}}
      checkpoint: {{every: 4}}
      eval: {{every: 8, num_prompts: 1, max_new_tokens: 4}}
      lora: {{rank: 4, alpha: 8, dropout: 0.1, target_modules: all-linear}}
  - name: reward_model
    uses: rlhf.reward_model
    model: {{stage: sft}}
    config:
      data: {{train: {prefs}, validation_fraction: 0.1}}
      max_length: 48
      batch_size: 8
      max_steps: 4
      checkpoint: {{every: 2}}
      lora: {{rank: 2, target_modules: [q_proj, v_proj]}}
  - name: ppo
    uses: rlhf.ppo
    model: {{stage: sft}}
    config:
      data: {{train: {prompts}}}
      reward: rm
      max_prompt_length: 16
      max_new_tokens: 8
      batch_size: 4
      num_minibatches: 2
      ppo_epochs: 1
      max_steps: 3
      log_every: 1
      optimizer: {{lr: 1.0e-2}}
      lora: {{rank: 4, alpha: 16, target_modules: all-linear}}
"#,
            run = run.display(),
            pretrain = tiny_pretrain_stage("pretrain", &corpus, 24),
            instructions = instructions.display(),
            prefs = prefs.display(),
            prompts = prompts.display(),
        ),
    )
    .unwrap();
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap()]);
    assert_exit(&out, 0);
    let log = stderr(&out);

    // SFT trains the adapters alone: a fraction of the parameters and of the optimizer state.
    let (trained, all) = lora_figures(&log, "sft");
    assert!(trained > 0.0 && trained < 0.2 * all, "{trained} of {all}");
    let full_optimizer = file_size(&run.join("pretrain/checkpoints/step-00000012/optimizer.safetensors"));
    let lora_optimizer = file_size(&run.join("sft/checkpoints/step-00000004/optimizer.safetensors"));
    println!(
        "optimizer state: LoRA SFT {lora_optimizer} bytes, full training of the same model {full_optimizer} bytes ({:.1}%)",
        100.0 * lora_optimizer as f64 / full_optimizer as f64
    );
    assert!((lora_optimizer as f64) < 0.2 * full_optimizer as f64);

    // The final SFT model is an adapter in PEFT's layout on the pretrained model.
    let adapter = run.join("sft/final");
    assert!(adapter.join("adapter_model.safetensors").is_file() && !adapter.join("model.safetensors").exists());
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(adapter.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);
    assert!(config["base_model_name_or_path"].as_str().unwrap().ends_with("pretrain/final"), "{config}");

    // The reward model trained adapters and its head on the SFT model (merged as it
    // loaded); its final model is a plain one, which the PPO reward loaded.
    let (trained, all) = lora_figures(&log, "reward_model");
    assert!(trained < 0.2 * all, "{trained} of {all}");
    assert!(run.join("reward_model/final/model.safetensors").is_file());
    let checkpoint: serde_json::Value = serde_json::from_slice(
        &std::fs::read(run.join("reward_model/checkpoints/step-00000002/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (&checkpoint["task_type"], &checkpoint["modules_to_save"]),
        (&"SEQ_CLS".into(), &serde_json::json!(["score"]))
    );

    // PPO: the reference is the policy with its adapters off, so at the first step (B = 0)
    // the policy is the reference and the KL is 0; then the adapters move it.
    assert!(log.contains("reference: the policy with its LoRA adapters off"), "{log}");
    let kl = scalars(&run.join("tb/ppo"), "objective/kl");
    assert_eq!(kl.len(), 3);
    assert!(kl[0].1.abs() < 1e-6, "{kl:?}");
    assert!(run.join("ppo/final/adapter_model.safetensors").is_file());

    // The adapter generates as a model, and merged into a plain checkpoint, the same text.
    let generate = |model: &Path| {
        let out = plumb(
            dir.path(),
            &[
                "generate",
                "--model",
                model.to_str().unwrap(),
                "--prompt",
                "One day",
                "--max-new-tokens",
                "12",
                "--temperature",
                "0",
                "--device",
                "cpu",
            ],
        );
        assert_exit(&out, 0);
        stdout(&out)
    };
    let merged = dir.path().join("merged");
    let out = plumb(dir.path(), &["lora", "merge", adapter.to_str().unwrap(), "--output", merged.to_str().unwrap()]);
    assert_exit(&out, 0);
    assert!(merged.join("model.safetensors").is_file() && merged.join("tokenizer.json").is_file());
    assert_eq!(generate(&adapter), generate(&merged));
    let again = plumb(dir.path(), &["lora", "merge", adapter.to_str().unwrap(), "--output", merged.to_str().unwrap()]);
    assert_exit(&again, 1);

    // A resumed LoRA SFT run continues the same trajectory (dropout masks included).
    let expected = train_losses(&run.join("tb/sft"));
    assert_eq!(expected.len(), 8);
    for gone in ["sft/final", "reward_model", "ppo", "tb/reward_model", "tb/ppo"] {
        std::fs::remove_dir_all(run.join(gone)).unwrap();
    }
    std::fs::remove_file(run.join("sft/report.json")).unwrap();
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap(), "--resume"]);
    assert_exit(&out, 0);
    assert!(stderr(&out).contains("resuming from step 4"), "{}", stderr(&out));
    assert_eq!(train_losses(&run.join("tb/sft")), expected, "steps 5-8 after resuming differ");
    assert_eq!(scalars(&run.join("tb/ppo"), "objective/kl"), kl, "the later stages repeat the first run");
}

#[test]
fn validate_refuses_bad_lora_blocks_at_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path(), 20);
    let recipe = dir.path().join("recipe.yaml");
    let write = |lora: &str| {
        std::fs::write(
            &recipe,
            format!(
                "run:\n  output_dir: out\n  device: cpu\nplugins:\n  - name: pretrain\nstages:\n{}      lora: {lora}\n",
                tiny_pretrain_stage("pretrain", &corpus, 2)
            ),
        )
        .unwrap();
        let out = plumb(dir.path(), &["validate", recipe.to_str().unwrap()]);
        assert_exit(&out, 1);
        stderr(&out)
    };
    let err = write("{rank: 0}");
    assert!(err.contains("lora.rank: expected a positive rank, found 0"), "{err}");
    let err = write("{rank: 4, target_modules: all_linear}");
    assert!(err.contains("lora.target_modules: expected a list of module names or `all-linear`"), "{err}");
    let err = write("{rnak: 4}");
    assert!(err.contains("lora.rnak: unknown key; expected one of `rank`"), "{err}");
    let err = write("{rank: 4}");
    assert!(err.contains("lora: pretraining trains every weight"), "{err}");
}

/// A tiny Qwen2 made by transformers with the Qwen2.5 fixture tokenizer (argv[1]), saved in argv[2].
const MAKE_QWEN2: &str = r#"
import sys, torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
tok = AutoTokenizer.from_pretrained(sys.argv[1])
torch.manual_seed(0)
config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                     tie_word_embeddings=True, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
Qwen2ForCausalLM(config).save_pretrained(sys.argv[2])
tok.save_pretrained(sys.argv[2])
"#;

/// peft loads the adapter (argv[2]) on its base (argv[1]); transformers the merged model
/// (argv[3]). Prints the max abs difference of their logits, and how far the adapter moved
/// the base's.
const PEFT_AGAINST_MERGED: &str = r#"
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
ids = torch.tensor([[5, 17, 33, 2, 9, 41, 60, 7, 13], [40, 100, 264, 211, 149, 13, 1, 198, 100]])
with torch.no_grad():
    base = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
    plain = base(input_ids=ids).logits
    adapted = PeftModel.from_pretrained(base, sys.argv[2]).eval()(input_ids=ids).logits
    merged = AutoModelForCausalLM.from_pretrained(sys.argv[3]).eval()(input_ids=ids).logits
print(json.dumps({"diff": (adapted - merged).abs().max().item(), "moved": (adapted - plain).abs().max().item()}))
"#;

fn python_json(script: &str, args: &[&Path]) -> serde_json::Value {
    let out = std::process::Command::new(python()).arg("-c").arg(script).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_lora_recipe_tunes_a_transformers_checkpoint_into_an_adapter_peft_loads() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("qwen2-tiny");
    python_json(
        &format!("{MAKE_QWEN2}\nprint('{{}}')"),
        &[&repo_root().join("core/tests/fixtures/tokenizers/qwen2.5"), &hf],
    );
    let instructions = small_instructions(dir.path(), 40);
    let run = dir.path().join("run");
    let overrides = [
        format!("run.output_dir={}", run.display()),
        "run.device=cpu".into(),
        format!("stages.sft.model={}", hf.display()),
        format!("stages.sft.config.data.train={}", instructions.display()),
        "stages.sft.config.max_steps=3".into(),
        "stages.sft.config.optimizer.lr=1.0e-2".into(),
        "stages.sft.config.schedule.warmup_steps=1".into(),
        "stages.sft.config.eval.every=3".into(),
        "stages.sft.config.eval.max_new_tokens=4".into(),
        "stages.sft.config.eval.num_prompts=1".into(),
    ];
    let recipe = repo_root().join("recipes/sft_lora.yaml");
    let mut args = vec!["run", recipe.to_str().unwrap()];
    args.extend(overrides.iter().map(String::as_str));
    let out = plumb(dir.path(), &args);
    assert_exit(&out, 0);
    let (trained, all) = lora_figures(&stderr(&out), "sft");
    // r = 16 on a model 32 wide (and a 303-token vocabulary) is over half of it; on
    // SmolLM2-135M the recipe trains 4.9M of 135M parameters.
    assert!(trained < all, "{trained} of {all}");

    let adapter = run.join("sft/final");
    let merged = dir.path().join("merged");
    assert_exit(&plumb(dir.path(), &["lora", "merge", adapter.to_str().unwrap(), "-o", merged.to_str().unwrap()]), 0);
    let compared = python_json(PEFT_AGAINST_MERGED, &[&hf, &adapter, &merged]);
    println!("peft (adapter) against transformers (plumb's merge): {compared}");
    assert!(compared["diff"].as_f64().unwrap() < 1e-4, "{compared}");
    assert!(compared["moved"].as_f64().unwrap() > 1e-3, "the adapter trained: {compared}");
}

/// The scores of a few token rows under `policy` (log-probs of each next token).
fn row_log_probs(policy: &dyn plumb_core::model::Policy) -> plumb_core::tch::Tensor {
    use plumb_core::tch::Tensor;
    let ids =
        Tensor::from_slice(&[5i64, 17, 33, 2, 9, 41, 60, 7, 13, 40, 100, 264, 211, 149, 13, 1, 98, 100]).view([2, 9]);
    plumb_core::tch::no_grad(|| policy.log_probs(&ids, None).unwrap())
}

/// The trained adapter in `adapter` (PEFT layout) on `base`: its variables are LoRA's A and B
/// alone; with it on, the model moved away from the base; with it switched off
/// (`Adapters::disabled`, the reference of DPO and GRPO), its log-probs are the base model's
/// bit for bit. Returns how far it moved them.
fn adapter_off_is_the_base(base: &Path, adapter: &Path) -> f64 {
    use plumb_core::model::{self, lora::Request};
    use plumb_core::tch::{Device, Kind};
    let plain = model::load(base, Device::Cpu, Kind::Float).unwrap();
    let request = Request::Saved { dir: adapter, trainable: false };
    let adapted = model::load_with(base, Device::Cpu, Kind::Float, Some(&request)).unwrap();
    let lora = adapted.lora().expect("loaded with its adapter");
    let names: Vec<String> = lora.var_store().variables().into_keys().collect();
    assert!(!names.is_empty() && names.iter().all(|n| n.contains(".lora_A.") || n.contains(".lora_B.")), "{names:?}");
    let expected = row_log_probs(plain.as_ref());
    let moved = (row_log_probs(adapted.as_ref()) - &expected).abs().max().double_value(&[]);
    let _off = lora.disabled();
    assert!(
        row_log_probs(adapted.as_ref()).equal(&expected),
        "{}: adapters off must be the base model",
        adapter.display()
    );
    moved
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// DPO and GRPO with a `lora:` block: only the adapters train (a fraction of the parameters
/// and of full fine-tuning's optimizer state), the reference is the policy with its adapters
/// off (no model copy), and the final model is an adapter in PEFT's layout. The base model
/// stays bit-identical through the run: DPO's reference computed live under the switched-off
/// adapters gives the losses of the reference log-probs precomputed before any update, a
/// resumed run (which reloads the base from disk) repeats the uninterrupted one, and the
/// trained adapters switched off give the base model's log-probs exactly.
#[test]
fn dpo_and_grpo_train_adapters_against_the_base_model_with_its_adapters_off() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path(), 200);
    let prompts = prompt_file(dir.path());
    let prefs = std::fs::read_to_string(repo_root().join("data/tiny_tales_prefs.jsonl")).unwrap();
    let lines: Vec<&str> = prefs.lines().collect();
    let (train, validation) = (dir.path().join("train.jsonl"), dir.path().join("validation.jsonl"));
    std::fs::write(&train, lines[..48].join("\n") + "\n").unwrap();
    std::fs::write(&validation, lines[48..64].join("\n") + "\n").unwrap();
    let run = dir.path().join("run");
    let base_recipe = dir.path().join("base.yaml");
    let base_run = dir.path().join("base");
    std::fs::write(
        &base_recipe,
        format!(
            "run:\n  output_dir: {}\n  seed: 6\n  device: cpu\nplugins:\n  - name: pretrain\nstages:\n{}      checkpoint: {{every: 12}}\n",
            base_run.display(),
            tiny_pretrain_stage("pretrain", &corpus, 24)
        ),
    )
    .unwrap();
    assert_exit(&plumb(dir.path(), &["run", base_recipe.to_str().unwrap()]), 0);
    let base = base_run.join("pretrain/final");
    let base_bytes = std::fs::read(base.join("model.safetensors")).unwrap();
    let dpo = |name: &str, precompute: bool| {
        format!(
            r#"  - name: {name}
    uses: rlhf.dpo
    model: {base}
    config:
      data: {{train: {train}, validation: {validation}}}
      precompute_ref_log_probs: {precompute}
      max_prompt_length: 32
      max_length: 64
      batch_size: 8
      max_steps: 6
      log_every: 1
      optimizer: {{lr: 1.0e-2, weight_decay: 0.0}}
      checkpoint: {{every: 3}}
      eval: {{every: 6}}
      lora: {{rank: 4, alpha: 8, dropout: 0.1, target_modules: all-linear}}
"#,
            base = base.display(),
            train = train.display(),
            validation = validation.display(),
        )
    };
    let recipe = dir.path().join("recipe.yaml");
    std::fs::write(
        &recipe,
        format!(
            r#"run:
  output_dir: {run}
  seed: 6
  device: cpu
plugins:
  - name: rlhf
rewards:
  - name: short
    uses: rlhf.length
    config: {{unit: chars, target: 12, over: 0.1, under: 0.1}}
stages:
{dpo}{dpo_pre}  - name: grpo
    uses: rlhf.grpo
    model: {base}
    config:
      data: {{train: {prompts}}}
      reward: short
      num_generations: 4
      beta: 0.04
      max_prompt_length: 16
      max_completion_length: 12
      batch_size: 8
      max_steps: 4
      log_every: 1
      optimizer: {{lr: 1.0e-2, weight_decay: 0.0}}
      checkpoint: {{every: 2}}
      lora: {{rank: 4, alpha: 16, target_modules: all-linear}}
"#,
            run = run.display(),
            dpo = dpo("dpo", false),
            dpo_pre = dpo("dpo_pre", true),
            base = base.display(),
            prompts = prompts.display(),
        ),
    )
    .unwrap();
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap()]);
    assert_exit(&out, 0);
    let log = stderr(&out);
    assert_eq!(std::fs::read(base.join("model.safetensors")).unwrap(), base_bytes);

    let full_optimizer = file_size(&base_run.join("pretrain/checkpoints/step-00000012/optimizer.safetensors"));
    for (stage, step) in [("dpo", 3), ("dpo_pre", 3), ("grpo", 2)] {
        // Adapters alone train: a fraction of the parameters and of the optimizer state.
        let (trained, all) = lora_figures(&log, &format!("stage `{stage}`"));
        assert!(trained > 0.0 && trained < 0.2 * all, "{stage}: {trained} of {all}");
        let optimizer = file_size(&run.join(format!("{stage}/checkpoints/step-{step:08}/optimizer.safetensors")));
        println!(
            "{stage}: optimizer state {optimizer} bytes, full training of the same model {full_optimizer} bytes ({:.1}%)",
            100.0 * optimizer as f64 / full_optimizer as f64
        );
        assert!((optimizer as f64) < 0.2 * full_optimizer as f64, "{stage}");
        // The final model is an adapter in PEFT's layout on the base model.
        let adapter = run.join(stage).join("final");
        assert!(adapter.join("adapter_model.safetensors").is_file() && !adapter.join("model.safetensors").exists());
        let config = read_json(&adapter.join("adapter_config.json"));
        assert_eq!((&config["peft_type"], &config["task_type"]), (&"LORA".into(), &"CAUSAL_LM".into()), "{config}");
        assert!(config["base_model_name_or_path"].as_str().unwrap().ends_with("pretrain/final"), "{config}");
        let moved = adapter_off_is_the_base(&base, &adapter);
        println!("{stage}: the adapter moved the base model's log-probs by up to {moved:.4}");
        assert!(moved > 1e-4, "{stage}: the adapter trained");
    }
    assert_eq!(log.matches("reference: the policy with its LoRA adapters off").count(), 3, "{log}");

    // DPO: the reference under the switched-off adapters, computed at every step while the
    // adapters train, gives the same losses as the base model's log-probs precomputed
    // before any update.
    let (live, pre) = (train_losses(&run.join("tb/dpo")), train_losses(&run.join("tb/dpo_pre")));
    assert_eq!(live.len(), 6);
    for (a, b) in live.iter().zip(&pre) {
        assert!(a.0 == b.0 && (a.1 - b.1).abs() < 1e-5, "live {live:?} vs precomputed {pre:?}");
    }
    // GRPO: at the first step the fresh adapters (B = 0) leave the policy equal to its
    // reference (KL 0); then the adapters move it.
    let kl = scalars(&run.join("tb/grpo"), "kl");
    assert_eq!(kl.len(), 4);
    assert!(kl[0].1.abs() < 1e-6 && kl[3].1 > 0.0, "{kl:?}");

    // Resumed from their checkpoints (adapter and optimizer; the base reloaded from disk),
    // both repeat the uninterrupted runs.
    let (dpo_losses, grpo_losses) = (live, train_losses(&run.join("tb/grpo")));
    for stage in ["dpo", "grpo"] {
        std::fs::remove_dir_all(run.join(stage).join("final")).unwrap();
        std::fs::remove_file(run.join(stage).join("report.json")).unwrap();
    }
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap(), "--resume"]);
    assert_exit(&out, 0);
    let log = stderr(&out);
    assert!(log.contains("resuming from step 3") && log.contains("resuming from step 2"), "{log}");
    assert_eq!(train_losses(&run.join("tb/dpo")), dpo_losses, "DPO steps 4-6 after resuming differ");
    let resumed = train_losses(&run.join("tb/grpo"));
    assert_eq!(resumed.len(), grpo_losses.len());
    for (a, b) in grpo_losses.iter().zip(&resumed) {
        assert!(a.0 == b.0 && (a.1 - b.1).abs() <= 1e-6 * a.1.abs().max(1.0), "{grpo_losses:?} vs {resumed:?}");
    }
    assert_eq!(scalars(&run.join("tb/grpo"), "kl"), kl);
}

/// GRPO refuses LoRA dropout: its sampling log-probs are taken without it, so the ratio of
/// the first update would not be 1.
#[test]
fn grpo_refuses_lora_dropout_at_its_key() {
    let out =
        plumb(&repo_root(), &["validate", "recipes/grpo.yaml", "stages.grpo.config.lora={rank: 4, dropout: 0.1}"]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("lora.dropout: GRPO takes its sampling log-probs without dropout"),
        "{}",
        stderr(&out)
    );
    let out = plumb(&repo_root(), &["validate", "recipes/grpo.yaml", "stages.grpo.config.lora={rank: 4}"]);
    assert_exit(&out, 0);
    let out = plumb(&repo_root(), &["validate", "recipes/dpo.yaml", "stages.dpo.config.lora={rank: 4, dropout: 0.1}"]);
    assert_exit(&out, 0);
}
