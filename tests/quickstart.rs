//! The quickstart recipe as shipped, shortened (fewer steps and questions) and run end to
//! end on the shipped arithmetic task: each alignment step moves its figure the way the
//! README says, and the run ends with its summary table, `summary.json` and the table as
//! TensorBoard text.
mod common;

use std::path::Path;

use common::*;

fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn metric(report: &serde_json::Value, name: &str) -> f64 {
    report["metrics"][name].as_f64().unwrap_or_else(|| panic!("no {name} in {report}"))
}

#[test]
fn the_quickstart_pipeline_moves_each_figure_the_right_way() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let recipe = repo_root().join("recipes/quickstart.yaml");
    let overrides = [
        format!("run.output_dir={}", out.display()),
        "run.device=cpu".into(),
        format!("rewards.judge.config.model={}", out.join("reward_model/final").display()),
        "stages.pretrain.config.max_steps=800".into(),
        "stages.pretrain.config.eval.every=800".into(),
        "stages.sft.config.max_steps=80".into(),
        "stages.sft.config.eval.every=80".into(),
        "stages.cot_sft.config.max_questions=100".into(),
        "stages.reward_model.config.max_steps=200".into(),
        "stages.reward_model.config.eval.every=200".into(),
        "stages.ppo.config.max_steps=40".into(),
        "stages.ppo.config.checkpoint.every=40".into(),
        "stages.cot.config.max_questions=100".into(),
        "stages.cot.config.samples=4".into(),
    ];
    let mut args = vec!["run", recipe.to_str().unwrap()];
    args.extend(overrides.iter().map(String::as_str));
    // Paths in the recipe are relative to the checkout's root.
    let run = plumb(&repo_root(), &args);
    assert_exit(&run, 0);
    let stage = |name: &str| json(&out.join(name).join("report.json"));

    // SFT teaches the answer format the pretraining corpus never shows.
    let sft = stage("sft");
    assert_eq!(metric(&sft, "eval/initial_format_compliance"), 0.0, "{sft}");
    assert!(metric(&sft, "eval/format_compliance") >= 0.9, "{sft}");
    // The reward model learns to prefer the correct solution over the slip.
    let rm = stage("reward_model");
    assert!(metric(&rm, "eval/accuracy") > metric(&rm, "eval/initial_accuracy"), "{rm}");
    // PPO raises the greedy step-by-step accuracy on the prompts it practised on, at a
    // bounded KL to the SFT model.
    let ppo = stage("ppo");
    assert!(metric(&ppo, "objective/kl").abs() < 5.0, "{ppo}");
    let practised = |name: &str| metric(&stage(name), "zero_shot_cot/strict/accuracy");
    let (before, after) = (practised("cot_sft_prompts"), practised("cot_ppo_prompts"));
    assert!(after > before + 0.02, "PPO's prompts: SFT {before}, PPO {after}");
    // Step by step beats answering at once.
    let cot = stage("cot");
    let direct = metric(&cot, "direct/strict/accuracy");
    let stepwise = metric(&cot, "zero_shot_cot/strict/accuracy");
    assert!(stepwise > direct + 0.1, "step by step {stepwise} vs direct {direct}");

    // The summary: printed, as JSON, and as TensorBoard text, one entry per stage.
    let text = stdout(&run);
    assert!(text.contains("run quickstart finished in"), "{text}");
    assert!(text.contains("eval/format_compliance 0 → "), "{text}");
    let summary = json(&out.join("summary.json"));
    let stages: Vec<&str> =
        summary["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert_eq!(
        stages,
        ["pretrain", "sft", "cot_sft", "cot_sft_prompts", "reward_model", "ppo", "cot_ppo_prompts", "cot"]
    );
    for s in summary["stages"].as_array().unwrap() {
        assert!(s["seconds"].as_f64().unwrap() > 0.0, "{s}");
    }
    let figure = &summary["stages"][1]["figures"][0];
    assert_eq!(figure["metric"], "eval/format_compliance");
    assert_eq!(figure["initial"], 0.0);
    let events = read_tensorboard(&out.join("tb/summary"));
    let table = events["text"]["summary"][0][1].as_str().unwrap();
    assert!(table.contains("| reward_model | rlhf.reward_model |"), "{table}");
}
