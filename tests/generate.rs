//! `plumb generate` and the generation of stages: bounded by the model's context,
//! streamed to stdout, and negative numbers taken as values whose range is checked.
mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;

/// A tiny random Qwen2 model with the Qwen2.5 fixture tokenizer and a context of 2048,
/// saved by transformers. Its special tokens' embeddings (tied to the LM head) are zero,
/// so greedy decoding never picks one and a continuation runs to its length.
const MAKE_MODEL: &str = r#"
import sys, torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
tok = AutoTokenizer.from_pretrained(sys.argv[1])
torch.manual_seed(0)
config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                     tie_word_embeddings=True, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
model = Qwen2ForCausalLM(config)
with torch.no_grad():
    for t in tok.all_special_tokens + ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]:
        model.model.embed_tokens.weight[tok.convert_tokens_to_ids(t)] = 0
model.save_pretrained(sys.argv[2])
tok.save_pretrained(sys.argv[2])
"#;

/// The model, made once per test process.
fn model() -> &'static Path {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("generate-model-{}", std::process::id()));
        let fixture = repo_root().join("core/tests/fixtures/tokenizers/qwen2.5");
        let out = Command::new(python()).arg("-c").arg(MAKE_MODEL).arg(&fixture).arg(&dir).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        dir
    })
}

fn generate(args: &[&str]) -> std::process::Output {
    let mut all = vec!["generate", "--model", model().to_str().unwrap(), "--device", "cpu"];
    all.extend_from_slice(args);
    plumb(&repo_root(), &all)
}

#[test]
fn max_new_tokens_past_the_context_is_an_error() {
    let out = generate(&["--prompt", "Hello", "--max-new-tokens", "5000"]);
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(err.contains("--max-new-tokens 5000: with the prompt's"), "{err}");
    assert!(err.contains("more than the model's context of 2048 positions"), "{err}");
    assert!(err.contains("config.json); use at most"), "{err}");
}

#[test]
fn a_prompt_longer_than_the_context_is_an_error() {
    let prompt = "a story ".repeat(2000);
    let out = generate(&["--prompt", &prompt, "--max-new-tokens", "1"]);
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(err.contains("tokens leave no room for new tokens in the model's context of 2048 positions"), "{err}");
    assert!(err.starts_with("error: --prompt: "), "{err}");
}

#[test]
fn generate_streams_the_continuation_as_it_is_generated() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_plumb"))
        .args(["generate", "--model", model().to_str().unwrap(), "--device", "cpu", "--prompt", "Once"])
        .args(["--max-new-tokens", "600"])
        .current_dir(repo_root())
        .env_remove("PLUMB_PLUGIN_PATH")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // When each part of the output arrived.
    let mut stdout = child.stdout.take().unwrap();
    let (mut output, mut arrivals) = (Vec::new(), Vec::new());
    let mut chunk = [0u8; 64];
    loop {
        let n = stdout.read(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        output.extend_from_slice(&chunk[..n]);
        arrivals.push((Instant::now(), output.len()));
    }
    assert!(child.wait().unwrap().success());
    // Printed at the end, the whole text would arrive at once: its 64-byte reads follow each
    // other within microseconds. Streamed, the pieces come as the tokens are generated, each
    // a fraction of a millisecond or more after the last (a pause the reader waits through).
    // Counting the pauses, not timing the whole, keeps this true however fast generation gets.
    let pauses = arrivals.windows(2).filter(|w| w[1].0 - w[0].0 > Duration::from_micros(100)).count();
    let spread = arrivals.last().unwrap().0 - arrivals[0].0;
    println!("{} reads over {spread:?}, {pauses} of them after a pause", arrivals.len());
    assert!(pauses >= 50, "{pauses} pauses in {} reads over {spread:?}: not streamed", arrivals.len());
    let text = String::from_utf8_lossy(&output).into_owned();
    assert!(text.ends_with('\n') && text.trim().chars().count() > 100, "{text:?}");
    // The streamed text is the continuation itself: greedy, the same as a second run.
    assert_eq!(stdout_of(&generate(&["--prompt", "Once", "--max-new-tokens", "600"])), text);
}

fn stdout_of(out: &std::process::Output) -> String {
    assert_exit(out, 0);
    stdout(out)
}

#[test]
fn negative_numbers_are_values_whose_range_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| plumb(dir.path(), args);
    // Checked before the model is read: the model need not exist.
    let out = run(&["generate", "--model", "nowhere", "--prompt", "x", "--temperature", "-1"]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("--temperature: expected a value >= 0"), "{}", stderr(&out));
    let out = run(&["generate", "--model", "nowhere", "--prompt", "x", "--top-k", "-3"]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("--top-k: expected a value >= 0"), "{}", stderr(&out));
    // Unsigned options: a negative number is a bad value (exit 1), not an unknown option.
    for args in [
        &["generate", "--model", "nowhere", "--prompt", "x", "--max-new-tokens", "-5"][..],
        &["bench", "train", "--steps", "-1"],
        &["bench", "generate", "--batch", "-2"],
        &["eval", "--model", "m", "--evaluator", "pretrain.perplexity", "--seed", "-1"],
    ] {
        let out = run(args);
        assert_exit(&out, 1);
        assert!(stderr(&out).contains("invalid value '-"), "{args:?}: {}", stderr(&out));
    }
    // A command line that does not parse is still clap's usage error.
    assert_exit(&run(&["generate", "--no-such-option"]), 2);
}

#[test]
fn evaluation_answers_of_a_stage_stop_at_the_models_context() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path(), 60);
    let data = dir.path().join("instructions.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(repo_root().join("data/tiny_tales_sft.jsonl"))
        .unwrap()
        .lines()
        .take(20)
        .map(String::from)
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    // The pretrained model's context is its seq_len, 32, and SFT trains it on 64 (RoPE
    // extrapolates): answers may reach 64 positions, not the 500 tokens they ask for.
    let recipe = dir.path().join("recipe.yaml");
    std::fs::write(
        &recipe,
        format!(
            "run:\n  output_dir: run\n  device: cpu\nplugins:\n  - name: pretrain\n  - name: sft\nstages:\n{}  - name: sft\n    uses: sft.sft\n    config:\n      data: {{train: {}, format: alpaca}}\n      max_length: 64\n      batch_size: 2\n      max_steps: 1\n      eval: {{num_prompts: 2, max_new_tokens: 500}}\n",
            tiny_pretrain_stage("pretrain", &corpus, 2),
            data.display()
        ),
    )
    .unwrap();
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap()]);
    assert_exit(&out, 0);
    let err = stderr(&out);
    assert!(
        err.contains("max_new_tokens 500 is more than the 63 positions a prompt of 1 tokens leaves in a context of 64: generating at most 63 tokens"),
        "{err}"
    );
    // `plumb generate` on that model: its default of 128 new tokens is cut to the room
    // the prompt leaves in the 32 positions its config declares.
    let model = dir.path().join("run/sft/final");
    let out = plumb(dir.path(), &["generate", "--model", model.to_str().unwrap(), "--prompt", "One day"]);
    assert_exit(&out, 0);
}

/// `--model ORG/NAME` reads the snapshot the local Hugging Face cache's `main` ref points
/// to, and says how to fetch a model the cache lacks; `--echo` prints the prompt first.
#[test]
fn a_hub_name_resolves_in_the_local_cache_and_echo_prints_the_prompt() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--tiny-org--qwen2-tiny");
    std::fs::create_dir_all(repo.join("snapshots")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::os::unix::fs::symlink(model(), repo.join("snapshots/0123abcd")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd\n").unwrap();
    let env = [("HF_HUB_CACHE", cache.path().to_str().unwrap())];
    let run = |name: &str, extra: &[&str]| {
        let mut args =
            vec!["generate", "--model", name, "--device", "cpu", "--prompt", "Once", "--max-new-tokens", "8"];
        args.extend_from_slice(extra);
        plumb_with_env(&repo_root(), &args, &env)
    };
    let by_name = stdout_of(&run("tiny-org/qwen2-tiny", &[]));
    assert_eq!(by_name, stdout_of(&generate(&["--prompt", "Once", "--max-new-tokens", "8"])));
    assert_eq!(stdout_of(&run("tiny-org/qwen2-tiny", &["--echo"])), format!("Once{by_name}"));

    let missing = run("tiny-org/absent", &[]);
    assert_exit(&missing, 1);
    let err = stderr(&missing);
    assert!(
        err.contains("--model: `tiny-org/absent` is neither a directory nor a model in the Hugging Face cache")
            && err.contains("huggingface-cli download tiny-org/absent"),
        "{err}"
    );
}
