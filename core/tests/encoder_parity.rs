//! Parity of the encoder (BERT) and encoder-decoder (T5) families with `transformers`
//! (the reference): small random checkpoints built by `transformers`, with padding in
//! the batch, must give the same fp32 CPU logits (1e-4 max abs), and what plumb saves
//! (loaded or freshly initialised) must load in `transformers` with the same logits.
mod common;

use std::path::{Path, PathBuf};

use plumb_core::model::bert::BertForMaskedLm;
use plumb_core::model::t5::{self, T5ForConditionalGeneration};
use plumb_core::tch::{Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-4;

fn run_python(args: &[&str]) -> String {
    common::run_script("encoders.py", args)
}

/// Builds the reference checkpoints once per test binary.
fn checkpoints() -> &'static (tempfile::TempDir, Vec<String>) {
    static CELL: std::sync::OnceLock<(tempfile::TempDir, Vec<String>)> = std::sync::OnceLock::new();
    CELL.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> =
            serde_json::from_str(run_python(&["make", dir.path().to_str().unwrap()]).trim()).unwrap();
        assert_eq!(names, ["bert", "bert_gelu_new", "t5_relu", "t5_v1_1", "t5_v1_1_hub"]);
        (dir, names)
    })
}

/// A case's reference.json: the inputs and what `transformers` computed.
struct Reference {
    json: serde_json::Value,
}

impl Reference {
    fn read(dir: &Path) -> Self {
        Self { json: serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap() }
    }

    fn ids(&self, key: &str) -> Tensor {
        let rows: Vec<Vec<i64>> = serde_json::from_value(self.json[key].clone()).unwrap();
        let (b, t) = (rows.len() as i64, rows[0].len() as i64);
        Tensor::from_slice(&rows.concat()).view([b, t])
    }

    fn logits(&self, key: &str) -> Tensor {
        tensor3(&self.json[key])
    }
}

fn tensor3(v: &serde_json::Value) -> Tensor {
    let rows: Vec<Vec<Vec<f64>>> = serde_json::from_value(v.clone()).unwrap();
    let (b, t, n) = (rows.len() as i64, rows[0].len() as i64, rows[0][0].len() as i64);
    let flat: Vec<f64> = rows.into_iter().flatten().flatten().collect();
    Tensor::from_slice(&flat).view([b, t, n]).to_kind(Kind::Float)
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// What `transformers` makes of the checkpoint plumb saved in `dir`, on `inputs` (a JSON
/// file with the reference's input keys).
struct Transformers {
    architecture: String,
    tied: bool,
    logits: Tensor,
}

fn transformers_logits(dir: &Path, inputs: &Path) -> Transformers {
    let out = run_python(&["logits", dir.to_str().unwrap(), inputs.to_str().unwrap()]);
    let json: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    Transformers {
        architecture: json["architecture"].as_str().unwrap().to_string(),
        tied: json["tied"].as_bool().unwrap(),
        logits: tensor3(&json["logits"]),
    }
}

fn bert_cases() -> impl Iterator<Item = (&'static str, PathBuf)> {
    let (dir, names) = checkpoints();
    names.iter().filter(|n| n.starts_with("bert")).map(|n| (n.as_str(), dir.path().join(n)))
}

fn t5_cases() -> impl Iterator<Item = (&'static str, PathBuf)> {
    let (dir, names) = checkpoints();
    names.iter().filter(|n| n.starts_with("t5")).map(|n| (n.as_str(), dir.path().join(n)))
}

fn t5_logits(model: &T5ForConditionalGeneration, reference: &Reference) -> Tensor {
    model
        .forward(
            &reference.ids("input_ids"),
            Some(&reference.ids("attention_mask")),
            &reference.ids("decoder_input_ids"),
            Some(&reference.ids("decoder_attention_mask")),
        )
        .unwrap()
}

#[test]
fn bert_logits_match_transformers_with_padding_and_token_types() {
    for (name, path) in bert_cases() {
        let reference = Reference::read(&path);
        let model = BertForMaskedLm::from_dir(&path, Device::Cpu, Kind::Float).unwrap();
        let (ids, mask) = (reference.ids("input_ids"), reference.ids("attention_mask"));
        let logits = model.forward(&ids, Some(&mask)).unwrap();
        assert_eq!(logits.size(), [3, 12, 96]);
        let diff = max_abs(&logits, &reference.logits("logits"));
        eprintln!("{name}: max abs logit difference to transformers {diff:.2e}");
        assert!(diff < TOLERANCE, "{name}: max abs logit difference {diff}");

        let typed = model.forward_with_token_types(&ids, Some(&reference.ids("token_type_ids")), Some(&mask)).unwrap();
        let diff = max_abs(&typed, &reference.logits("typed_logits"));
        eprintln!("{name} with token types: max abs logit difference to transformers {diff:.2e}");
        assert!(diff < TOLERANCE, "{name} with token types: max abs logit difference {diff}");
    }
}

#[test]
fn t5_logits_match_transformers_with_padded_encoder_and_decoder_inputs() {
    for (name, path) in t5_cases() {
        let reference = Reference::read(&path);
        let model = T5ForConditionalGeneration::from_dir(&path, Device::Cpu, Kind::Float).unwrap();
        let logits = t5_logits(&model, &reference);
        assert_eq!(logits.size(), [3, 7, 96]);
        let diff = max_abs(&logits, &reference.logits("logits"));
        eprintln!("{name}: max abs logit difference to transformers {diff:.2e}");
        assert!(diff < TOLERANCE, "{name}: max abs logit difference {diff}");
        assert_eq!(model.config().tie_word_embeddings, name == "t5_relu", "{name}");
        assert_eq!(model.config().scale_decoder_outputs, name == "t5_relu", "{name}");
    }
}

#[test]
fn shift_right_matches_transformers() {
    for (name, path) in t5_cases() {
        let reference = Reference::read(&path);
        let model = T5ForConditionalGeneration::from_dir(&path, Device::Cpu, Kind::Float).unwrap();
        let labels = reference.ids("labels");
        let expected = reference.ids("decoder_input_ids");
        assert!(model.shift_right(&labels).unwrap().equal(&expected), "{name}");
        assert!(t5::shift_right(&labels, 0, 0).equal(&expected), "{name}");
    }
}

#[test]
fn a_loaded_checkpoint_saved_by_plumb_loads_in_transformers_with_the_same_logits() {
    let (_, names) = checkpoints();
    for (name, path) in bert_cases().chain(t5_cases()) {
        let out = tempfile::tempdir().unwrap();
        if name.starts_with("bert") {
            BertForMaskedLm::from_dir(&path, Device::Cpu, Kind::Float).unwrap().save(out.path()).unwrap();
        } else {
            T5ForConditionalGeneration::from_dir(&path, Device::Cpu, Kind::Float).unwrap().save(out.path()).unwrap();
        }
        let theirs = transformers_logits(out.path(), &path.join("reference.json"));
        let expected = if name.starts_with("bert") { "BertForMaskedLM" } else { "T5ForConditionalGeneration" };
        assert_eq!(theirs.architecture, expected, "{name}");
        assert_eq!(theirs.tied, name.starts_with("bert") || name == "t5_relu", "{name}");
        let diff = max_abs(&theirs.logits, &Reference::read(&path).logits("logits"));
        eprintln!("{name}, saved by plumb: transformers' logits differ by {diff:.2e}");
        assert!(diff < TOLERANCE, "{name}: transformers on plumb's save differs by {diff}");
    }
    assert_eq!(names.len(), 5);
}

/// A fresh model plumb builds (`new`) and saves loads in `transformers`, which computes
/// the logits plumb does.
#[test]
fn a_fresh_model_saved_by_plumb_loads_in_transformers_with_the_same_logits() {
    let (dir, _) = checkpoints();
    let inputs = |case: &str| dir.path().join(case).join("reference.json");

    let bert = serde_json::json!({
        "model_type": "bert", "vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 40, "max_position_embeddings": 16, "initializer_range": 0.2
    });
    plumb_core::tch::manual_seed(3);
    let model = BertForMaskedLm::new(serde_json::from_value(bert).unwrap(), Device::Cpu).unwrap();
    let reference = Reference::read(&dir.path().join("bert"));
    let ours = model.forward(&reference.ids("input_ids"), Some(&reference.ids("attention_mask"))).unwrap();
    let out = tempfile::tempdir().unwrap();
    model.save(out.path()).unwrap();
    let theirs = transformers_logits(out.path(), &inputs("bert"));
    assert_eq!((theirs.architecture.as_str(), theirs.tied), ("BertForMaskedLM", true));
    let diff = max_abs(&theirs.logits, &ours);
    eprintln!("fresh bert: transformers' logits differ from plumb's by {diff:.2e}");
    assert!(diff < TOLERANCE, "fresh bert: {diff}");

    for (label, feed_forward, tie) in [("relu, tied", "relu", true), ("gated-gelu, untied", "gated-gelu", false)] {
        let config = serde_json::json!({
            "model_type": "t5", "vocab_size": 96, "d_model": 32, "d_kv": 8, "d_ff": 40, "num_layers": 2,
            "num_decoder_layers": 1, "num_heads": 4, "feed_forward_proj": feed_forward, "tie_word_embeddings": tie
        });
        plumb_core::tch::manual_seed(4);
        let model = T5ForConditionalGeneration::new(serde_json::from_value(config).unwrap(), Device::Cpu).unwrap();
        let reference = Reference::read(&dir.path().join("t5_relu"));
        let ours = t5_logits(&model, &reference);
        let out = tempfile::tempdir().unwrap();
        model.save(out.path()).unwrap();
        let theirs = transformers_logits(out.path(), &inputs("t5_relu"));
        assert_eq!((theirs.architecture.as_str(), theirs.tied), ("T5ForConditionalGeneration", tie), "{label}");
        let diff = max_abs(&theirs.logits, &ours);
        eprintln!("fresh t5 ({label}): transformers' logits differ from plumb's by {diff:.2e}");
        assert!(diff < TOLERANCE, "fresh t5 ({label}): {diff}");
    }
}

#[test]
fn bf16_loads_stay_close_to_fp32() {
    let (dir, _) = checkpoints();
    let bert_path = dir.path().join("bert");
    let reference = Reference::read(&bert_path);
    let bert = BertForMaskedLm::from_dir(&bert_path, Device::Cpu, Kind::BFloat16).unwrap();
    let logits = bert.forward(&reference.ids("input_ids"), Some(&reference.ids("attention_mask"))).unwrap();
    assert_eq!(logits.kind(), Kind::BFloat16);
    let expected = reference.logits("logits");
    let (diff, scale) = (max_abs(&logits.to_kind(Kind::Float), &expected), expected.abs().max().double_value(&[]));
    assert!(diff < 0.05 * scale, "bert: max abs difference {diff} on logits up to {scale}");

    let t5_path = dir.path().join("t5_v1_1");
    let reference = Reference::read(&t5_path);
    let t5 = T5ForConditionalGeneration::from_dir(&t5_path, Device::Cpu, Kind::BFloat16).unwrap();
    let logits = t5_logits(&t5, &reference);
    assert_eq!(logits.kind(), Kind::BFloat16);
    let expected = reference.logits("logits");
    let (diff, scale) = (max_abs(&logits.to_kind(Kind::Float), &expected), expected.abs().max().double_value(&[]));
    assert!(diff < 0.05 * scale, "t5: max abs difference {diff} on logits up to {scale}");
}
