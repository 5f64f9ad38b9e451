//! The quickstart recipe as shipped, shortened (fewer pretraining, reward-model and PPO
//! steps, fewer questions) and run end to end on the shipped arithmetic task: each stage
//! does its job (pretraining lowers the loss, SFT teaches the answer format, the reward
//! model learns its preference, PPO moves the policy at a bounded KL, reasoning step by
//! step beats answering at once), and the run ends with its summary table, `summary.json`
//! and the table as TensorBoard text.
//!
//! One setting differs from the recipe's, and one figure is printed rather than asserted,
//! for reasons measured on a 2-vCPU AMD EPYC machine:
//! - After the test's 800 pretraining steps, the recipe's brief SFT (80 steps) leaves a
//!   model that has learned to read the chat turn's numbers and copy its last result into
//!   the `#### N` line, or has not: the seed and the machine's floating-point sums decide.
//!   Over five runs (seeds 1–4 on one thread, 1234 on two) its held-out step-by-step
//!   accuracy was 40.5%, 7.0%, 19.5%, 3.0% and 5.0%; the misses compute with other numbers
//!   than the question's, or compute right and write another number after `####`.
//!   After 160 SFT steps the same five gave 51.5%, 38.5%, 59.5%, 66.0% and 70.0%, against
//!   at most 10.5% answering at once. So the test trains SFT 160 steps.
//! - PPO's effect on accuracy: 40 steps of 32 episodes took the practised prompts' greedy
//!   accuracy from 49.0% to 50.6% (sampled pass@1 38.2% → 43.4%; exact-answer reward only)
//!   from one of those SFT models, and from 76.0% to 73.6% (pass@1 67.5% → 67.1%) from
//!   another. That PPO raises a reward it can reach is tests/ppo.rs's assertion; that an RL
//!   stage raises held-out accuracy is tests/grpo.rs's.
mod common;

use common::*;

fn metric(report: &serde_json::Value, name: &str) -> f64 {
    report["metrics"][name].as_f64().unwrap_or_else(|| panic!("no {name} in {report}"))
}

#[test]
fn every_quickstart_stage_does_its_job_and_the_run_ends_with_its_summary() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let recipe = repo_root().join("recipes/quickstart.yaml");
    let overrides = [
        format!("run.output_dir={}", out.display()),
        "run.device=cpu".into(),
        format!("rewards.judge.config.model={}", out.join("reward_model/final").display()),
        "stages.pretrain.config.max_steps=800".into(),
        "stages.pretrain.config.eval.every=800".into(),
        "stages.sft.config.max_steps=160".into(),
        "stages.sft.config.eval.every=160".into(),
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
    let stage = |name: &str| read_json(&out.join(name).join("report.json"));

    // Pretraining lowers the held-out loss far below a uniform guess's.
    let pretrain = stage("pretrain");
    assert!(metric(&pretrain, "eval/loss") < 0.2 * metric(&pretrain, "eval/initial_loss"), "{pretrain}");
    // SFT teaches the answer format the pretraining corpus never shows.
    let sft = stage("sft");
    assert_eq!(metric(&sft, "eval/initial_format_compliance"), 0.0, "{sft}");
    assert!(metric(&sft, "eval/format_compliance") >= 0.9, "{sft}");
    // The reward model learns to prefer the correct solution over the slip.
    let rm = stage("reward_model");
    assert!(metric(&rm, "eval/accuracy") > metric(&rm, "eval/initial_accuracy"), "{rm}");
    // PPO moves the policy away from the SFT model, at a bounded KL to it. (Its accuracy on
    // the prompts it practised on is printed: see the module's documentation.)
    let ppo = stage("ppo");
    let kl = metric(&ppo, "objective/kl");
    assert!(kl > 0.01 && kl < 5.0, "{ppo}");
    let practised = |name: &str| metric(&stage(name), "zero_shot_cot/strict/accuracy");
    println!(
        "PPO's prompts, greedy step by step: SFT {:.4}, PPO {:.4}",
        practised("cot_sft_prompts"),
        practised("cot_ppo_prompts")
    );
    // Step by step beats answering at once.
    let cot = stage("cot");
    let direct = metric(&cot, "direct/strict/accuracy");
    let stepwise = metric(&cot, "zero_shot_cot/strict/accuracy");
    assert!(stepwise > direct + 0.1, "step by step {stepwise} vs direct {direct}");

    // The summary: printed, as JSON, and as TensorBoard text, one entry per stage.
    let text = stdout(&run);
    assert!(text.contains("run quickstart finished in"), "{text}");
    assert!(text.contains("eval/format_compliance 0 → "), "{text}");
    let summary = read_json(&out.join("summary.json"));
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
