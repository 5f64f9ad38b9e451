//! LoRA adapters against `peft`: an adapter plumb trains and saves (PEFT layout) loads in
//! `peft` on the same base with the same fp32 CPU logits (1e-4 max abs), and the model
//! plumb merges and saves loads in `transformers` with those logits too.
mod common;

use plumb_core::model::lora::{LoraConfig, Request, TargetModules, ALL_LINEAR};
use plumb_core::model::{self, Policy};
use plumb_core::tch::{self, Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-4;

const IDS: [[i64; 10]; 2] = [[5, 17, 33, 2, 9, 41, 60, 7, 13, 21], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]];

fn logits_of(json: &serde_json::Value) -> Tensor {
    let rows: Vec<Vec<Vec<f64>>> = serde_json::from_value(json["logits"].clone()).unwrap();
    let (b, t, n) = (rows.len() as i64, rows[0].len() as i64, rows[0][0].len() as i64);
    Tensor::from_slice(&rows.into_iter().flatten().flatten().collect::<Vec<f64>>()).view([b, t, n]).to_kind(Kind::Float)
}

fn python(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(common::run_script("lora.py", args).trim()).unwrap()
}

/// Gives every B random values (a fresh adapter's B is zero, so its update would be
/// nothing and any layout mistake would go unseen), as training would.
fn train_a_little(policy: &dyn Policy) {
    let _no_grad = tch::no_grad_guard();
    for (name, mut var) in policy.trainable().variables() {
        if name.ends_with("lora_B.weight") {
            var.copy_(&(Tensor::randn(var.size(), (Kind::Float, Device::Cpu)) * 0.3));
        }
    }
}

#[test]
fn adapters_load_in_peft_and_merged_checkpoints_in_transformers_with_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<String> = serde_json::from_value(python(&["make", dir.path().to_str().unwrap()])).unwrap();
    assert_eq!(cases, ["llama", "qwen2"]);
    let ids = Tensor::from_slice(&IDS.concat()).view([2, 10]);
    let ids_json = serde_json::to_string(&IDS).unwrap();
    let targets = [
        (TargetModules::Keyword(ALL_LINEAR.into()), 14),
        (TargetModules::Names(vec!["q_proj".into(), "v_proj".into(), "down_proj".into()]), 6),
    ];
    for case in &cases {
        let base = dir.path().join(case);
        for (target_modules, adapted) in &targets {
            let config = LoraConfig { rank: 4, alpha: 16.0, dropout: 0.1, target_modules: target_modules.clone() };
            tch::manual_seed(3);
            let request = Request::New { config: &config, seed: 1 };
            let policy = model::load_with(&base, Device::Cpu, Kind::Float, Some(&request)).unwrap();
            train_a_little(policy.as_ref());
            let ours = tch::no_grad(|| policy.logits(&ids, None).unwrap());
            let label = format!("{case} {}", target_modules.describe());

            let adapter = tempfile::tempdir().unwrap();
            policy.save(adapter.path()).unwrap();
            let reference = python(&["peft", base.to_str().unwrap(), adapter.path().to_str().unwrap(), &ids_json]);
            assert_eq!(reference["adapted"], *adapted, "{label}");
            let diff = (&ours - logits_of(&reference)).abs().max().double_value(&[]);
            eprintln!("{label}: max abs logit difference to peft {diff:.2e}");
            assert!(diff < TOLERANCE, "{label}: {diff}");
            let base_model = model::load(&base, Device::Cpu, Kind::Float).unwrap();
            let moved = (&ours - base_model.logits(&ids, None).unwrap()).abs().max().double_value(&[]);
            assert!(moved > 100.0 * TOLERANCE, "{label}: the adapter must change the logits ({moved})");

            let merged = tempfile::tempdir().unwrap();
            policy.save_merged(merged.path()).unwrap();
            let reference = python(&["plain", merged.path().to_str().unwrap(), &ids_json]);
            let diff = (&ours - logits_of(&reference)).abs().max().double_value(&[]);
            eprintln!("{label}: merged, max abs logit difference to transformers {diff:.2e}");
            assert!(diff < TOLERANCE, "{label} merged: {diff}");
        }
    }
}
