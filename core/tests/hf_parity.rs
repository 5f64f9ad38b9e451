//! Parity with `transformers` (the reference): small random checkpoints of each family,
//! built by `transformers`, must give the same fp32 CPU logits (1e-4 max abs), the same
//! greedy continuations, batched = one by one, and what plumb saves must load back in
//! `transformers` with the same logits.
mod common;

use std::path::Path;

use plumb_core::model::{self, GenerationSettings, Policy};
use plumb_core::tch::{Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-4;

fn run_python(args: &[&str]) -> String {
    common::run_script("reference.py", args)
}

struct Reference {
    input_ids: Tensor,
    logits: Tensor,
    prompts: Vec<Vec<i64>>,
    greedy: Vec<Vec<i64>>,
}

fn tensor3(v: &serde_json::Value) -> Tensor {
    let rows: Vec<Vec<Vec<f64>>> = serde_json::from_value(v.clone()).unwrap();
    let (b, t, n) = (rows.len() as i64, rows[0].len() as i64, rows[0][0].len() as i64);
    let flat: Vec<f64> = rows.into_iter().flatten().flatten().collect();
    Tensor::from_slice(&flat).view([b, t, n]).to_kind(Kind::Float)
}

fn reference(dir: &Path) -> Reference {
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    let ids: Vec<Vec<i64>> = serde_json::from_value(json["input_ids"].clone()).unwrap();
    let (b, t) = (ids.len() as i64, ids[0].len() as i64);
    Reference {
        input_ids: Tensor::from_slice(&ids.concat()).view([b, t]),
        logits: tensor3(&json["logits"]),
        prompts: serde_json::from_value(json["prompts"].clone()).unwrap(),
        greedy: serde_json::from_value(json["greedy"].clone()).unwrap(),
    }
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Builds the reference checkpoints once per test binary.
fn checkpoints() -> &'static (tempfile::TempDir, Vec<String>) {
    static CELL: std::sync::OnceLock<(tempfile::TempDir, Vec<String>)> = std::sync::OnceLock::new();
    CELL.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> =
            serde_json::from_str(run_python(&["make", dir.path().to_str().unwrap()]).trim()).unwrap();
        (dir, names)
    })
}

/// Runs `test` on every family's checkpoint, loaded by `model_type`.
fn each_case(test: impl Fn(&str, &Path, &dyn Policy, &Reference)) {
    let (dir, names) = checkpoints();
    assert_eq!(*names, ["gpt2", "llama3", "llama_dynamic", "llama_linear", "mistral", "qwen2"]);
    for name in names {
        let path = dir.path().join(name);
        let model = model::load(&path, Device::Cpu, Kind::Float).unwrap();
        test(name, &path, model.as_ref(), &reference(&path));
    }
}

#[test]
fn logits_match_transformers() {
    each_case(|name, _, model, reference| {
        let logits = model.logits(&reference.input_ids, None).unwrap();
        let diff = max_abs(&logits, &reference.logits);
        eprintln!("{name}: max abs logit difference to transformers {diff:.2e}");
        assert!(diff < TOLERANCE, "{name}: max abs logit difference {diff}");
    });
}

#[test]
fn greedy_continuations_match_transformers() {
    each_case(|name, _, model, reference| {
        let settings = GenerationSettings { max_new_tokens: 32, temperature: 0.0, ..Default::default() };
        for (prompt, expected) in reference.prompts.iter().zip(&reference.greedy) {
            let out = model.generate(std::slice::from_ref(prompt), &settings).unwrap();
            assert_eq!(&out[0].tokens, expected, "{name}: prompt {prompt:?}");
        }
    });
}

#[test]
fn batched_left_padded_generation_equals_one_by_one() {
    each_case(|name, _, model, reference| {
        let settings = GenerationSettings { max_new_tokens: 32, temperature: 0.0, ..Default::default() };
        let batched = model.generate(&reference.prompts, &settings).unwrap();
        for (prompt, together) in reference.prompts.iter().zip(&batched) {
            let alone = model.generate(std::slice::from_ref(prompt), &settings).unwrap();
            assert_eq!(together.tokens, alone[0].tokens, "{name}: prompt {prompt:?}");
            for (a, b) in together.log_probs.iter().zip(&alone[0].log_probs) {
                assert!((a - b).abs() < 1e-4, "{name}: log-probs {a} vs {b}");
            }
        }
    });
}

#[test]
fn a_checkpoint_saved_by_plumb_loads_in_transformers_with_the_same_logits() {
    each_case(|name, path, model, reference| {
        let out = tempfile::tempdir().unwrap();
        model.save(out.path()).unwrap();
        let json: serde_json::Value = serde_json::from_str(&run_python(&[
            "logits",
            out.path().to_str().unwrap(),
            path.join("reference.json").to_str().unwrap(),
        ]))
        .unwrap();
        let original: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path.join("config.json")).unwrap()).unwrap();
        assert_eq!(json["architecture"], original["architectures"][0], "{name}");
        let diff = max_abs(&tensor3(&json["logits"]), &reference.logits);
        assert!(diff < TOLERANCE, "{name}: transformers on plumb's save differs by {diff}");
    });
}

#[test]
fn sampling_with_a_seed_is_reproducible_and_log_probs_are_of_the_sampled_tokens() {
    each_case(|name, _, model, reference| {
        let settings = GenerationSettings {
            max_new_tokens: 12,
            temperature: 0.8,
            top_k: 20,
            top_p: 0.9,
            repetition_penalty: 1.1,
            seed: Some(7),
            ..Default::default()
        };
        let a = model.generate(&reference.prompts, &settings).unwrap();
        let b = model.generate(&reference.prompts, &settings).unwrap();
        assert_eq!(a, b, "{name}");
        assert!(a.iter().all(|g| g.log_probs.iter().all(|&lp| lp.is_finite() && lp <= 0.0)), "{name}");
    });
}

#[test]
fn an_unknown_model_type_names_the_field_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "mamba", "vocab_size": 10}"#).unwrap();
    let message = model::load(dir.path(), Device::Cpu, Kind::Float).err().unwrap().to_string();
    assert!(
        message.ends_with(
            "config.json: model_type: unsupported model type `mamba`; supported: llama, qwen2, mistral, gpt2"
        ),
        "{message}"
    );
}

#[test]
fn a_scalar_head_model_saved_by_plumb_loads_as_sequence_classification() {
    use plumb_core::model::scalar_head::ScalarHeadModel;
    let (dir, _) = checkpoints();
    // Row 1 is right-padded with the pad id 0, which no real token uses here.
    let rows: Vec<Vec<i64>> = vec![(1..=10).collect(), vec![7, 3, 9, 4, 0, 0, 0, 0, 0, 0]];
    let ids = Tensor::from_slice(&rows.concat()).view([2, 10]);
    let mask = ids.ne(0).to_kind(Kind::Int64);
    for name in ["llama3", "qwen2", "mistral", "gpt2"] {
        plumb_core::tch::manual_seed(1);
        let model = ScalarHeadModel::from_causal_lm(&dir.path().join(name), Device::Cpu, Kind::Float).unwrap();
        let ours = Vec::<f64>::try_from(model.scores(&ids, &mask).unwrap().to_kind(Kind::Double)).unwrap();
        let out = tempfile::tempdir().unwrap();
        model.save(out.path(), 0).unwrap();
        let json: serde_json::Value = serde_json::from_str(&run_python(&[
            "scores",
            out.path().to_str().unwrap(),
            &serde_json::to_string(&rows).unwrap(),
        ]))
        .unwrap();
        assert!(json["architecture"].as_str().unwrap().ends_with("ForSequenceClassification"), "{json}");
        assert_eq!(json["num_labels"], 1);
        let theirs: Vec<f64> = serde_json::from_value(json["scores"].clone()).unwrap();
        for (a, b) in ours.iter().zip(&theirs) {
            assert!((a - b).abs() < TOLERANCE, "{name}: scores {ours:?} vs transformers {theirs:?}");
        }
        // And plumb reads back what it saved.
        let again = ScalarHeadModel::from_dir(out.path(), Device::Cpu, Kind::Float).unwrap();
        let reread = again.scores(&ids, &mask).unwrap();
        assert_eq!(Vec::<f64>::try_from(reread.to_kind(Kind::Double)).unwrap(), ours, "{name}");
    }
}

#[test]
fn bf16_and_fp16_loads_stay_close_to_fp32() {
    let (dir, _) = checkpoints();
    let path = dir.path().join("llama3");
    let reference = reference(&path);
    for kind in [Kind::BFloat16, Kind::Half] {
        let model = model::load(&path, Device::Cpu, kind).unwrap();
        assert_eq!(model.var_store().kind(), kind);
        let logits = model.logits(&reference.input_ids, None).unwrap();
        assert_eq!(logits.kind(), kind);
        // Half precision keeps about 3 significant digits; the logits here are O(1-10).
        let diff = max_abs(&logits.to_kind(Kind::Float), &reference.logits);
        let scale = reference.logits.abs().max().double_value(&[]);
        assert!(diff < 0.05 * scale, "{kind:?}: max abs difference {diff} on logits up to {scale}");
    }
}
