//! Rewards end to end through the binary: names and configs checked by `plumb validate`
//! before any compute, rule rewards and a user's own reward (examples/custom_reward.rs)
//! scored through the host, and a remote reward served by an HTTP server in this test
//! feeding PPO, then failing it without losing the last checkpoint.
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn prompts(dir: &Path) -> PathBuf {
    let starts =
        ["One day, Lily", "Tom and his dog", "The sun was", "Once upon a time", "Mia found a", "The little bird"];
    let lines: Vec<String> = starts.iter().cycle().take(16).map(|s| format!("{{\"prompt\": \"{s}\"}}")).collect();
    write(dir, "prompts.jsonl", &(lines.join("\n") + "\n"))
}

/// The line (1-based) of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).expect("needle in recipe") + 1
}

#[test]
fn a_stage_naming_an_undefined_reward_fails_at_validate() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = prompts(dir.path());
    let text = format!(
        r#"run: {{output_dir: {out}, device: cpu}}
plugins:
  - name: rlhf
rewards:
  - name: judge
    uses: rlhf.remote
    config: {{url: 'http://127.0.0.1:9/score'}}
  - name: short
    uses: rlhf.length
    config: {{target: 20}}
stages:
  - name: ppo
    uses: rlhf.ppo
    model: {model}
    config:
      data: {{train: {prompts}}}
      reward:
        - {{name: short, weight: 0.1}}
        - {{name: judg}}
      max_steps: 2
"#,
        out = dir.path().join("run").display(),
        // Validate looks for the model's config.json only.
        model = dir.path().display(),
        prompts = prompts.display(),
    );
    std::fs::write(dir.path().join("config.json"), "{}").unwrap();
    let recipe = write(dir.path(), "ppo.yaml", &text);
    let out = plumb(dir.path(), &["validate", recipe.to_str().unwrap()]);
    assert_exit(&out, 1);
    let at = format!("{}:{}:", recipe.display(), line_of(&text, "{name: judg}"));
    let expected = "stages[0].config.reward[1].name: reward `judg` is not defined in the recipe's `rewards:` \
                    (defined: judge, short); did you mean `judge`?";
    let err = stderr(&out);
    assert!(err.contains(&at) && err.contains(expected), "expected {at}..: {expected}\nin {err}");
    assert!(!dir.path().join("run").exists(), "validate makes no run directory");
}

#[test]
fn a_bad_regex_fails_at_validate_naming_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "run: {{output_dir: {}, device: cpu}}\nplugins:\n  - name: rlhf\n  - name: probe\n    path: {}\nrewards:\n  \
         - name: format\n    uses: rlhf.regex\n    config:\n      pattern: '#### ([0-9]+'\nstages:\n  - name: s\n    \
         uses: probe.score\n    config: {{reward: format, responses: []}}\n",
        dir.path().join("run").display(),
        library("libplumb_probe.so").display()
    );
    let recipe = write(dir.path(), "bad.yaml", &text);
    let out = plumb(dir.path(), &["validate", recipe.to_str().unwrap()]);
    assert_exit(&out, 1);
    let at = format!("{}:{}:", recipe.display(), line_of(&text, "pattern:"));
    let err = stderr(&out);
    assert!(
        err.contains(&at) && err.contains("rewards[0].config.pattern: not a valid regex: "),
        "expected {at}\nin {err}"
    );
    assert!(stderr(&out).contains("unclosed group"), "{}", stderr(&out));
}

/// The scores the probe stage `name` reported (its metrics `score/<i>`).
fn reported(run: &Path, name: &str) -> Vec<f64> {
    let report = stage_report(run, name);
    let metrics = report["metrics"].as_object().unwrap();
    (0..metrics.len()).map(|i| metrics[&format!("score/{i}")].as_f64().unwrap()).collect()
}

#[test]
fn rule_rewards_and_a_users_own_reward_score_through_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let responses = r#"["We had fun and smiled. #### 3", "The dog was sad and lost.", "ok"]"#;
    let stage = |name: &str, reward: &str| {
        format!("  - name: {name}\n    uses: probe.score\n    config: {{reward: {reward}, responses: {responses}}}\n")
    };
    let text = format!(
        "run: {{output_dir: {out}, device: cpu}}\nplugins:\n  - name: rlhf\n  - name: probe\n    path: {probe}\n  \
         - name: lexicon\n    path: {lexicon}\nrewards:\n  \
         - {{name: cheerful, uses: lexicon.sentiment, config: {{}}}}\n  \
         - {{name: format, uses: rlhf.regex, config: {{pattern: '#### [0-9]+$', match: 1, no_match: -1}}}}\n  \
         - {{name: short, uses: rlhf.length, config: {{unit: words, target: 2, over: 0.5, under: 1}}}}\n\
         stages:\n{}{}{}",
        stage("cheerful", "cheerful"),
        stage("format", "format"),
        stage("short", "short"),
        out = dir.path().join("run").display(),
        probe = library("libplumb_probe.so").display(),
        lexicon = library("examples/libcustom_reward.so").display(),
    );
    let recipe = write(dir.path(), "rules.yaml", &text);
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap()]);
    assert_exit(&out, 0);
    let run = dir.path().join("run");
    // fun, smiled: +2; sad, lost: −2; none.
    assert_eq!(reported(&run, "cheerful"), [2.0, -2.0, 0.0]);
    assert_eq!(reported(&run, "format"), [1.0, -1.0, -1.0]);
    // words 7, 6, 1 against 2: −0.5·5, −0.5·4, −1·1
    assert_eq!(reported(&run, "short"), [-2.5, -2.0, -1.0]);
}

/// An HTTP scorer on 127.0.0.1: each request is answered by `answer(n, request)`, `n`
/// counting from 1; the mean of every list of scores it sent is kept.
struct Judge {
    url: String,
    requests: Arc<AtomicUsize>,
    means: Arc<Mutex<Vec<f64>>>,
}

type Answer = fn(usize, &serde_json::Value) -> (u16, String);

fn judge(answer: Answer) -> Judge {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/score", listener.local_addr().unwrap());
    let (requests, means) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(Vec::new())));
    let (r, m) = (Arc::clone(&requests), Arc::clone(&means));
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (r, m) = (Arc::clone(&r), Arc::clone(&m));
            std::thread::spawn(move || serve(stream, &r, &m, answer));
        }
    });
    Judge { url, requests, means }
}

fn serve(stream: TcpStream, requests: &AtomicUsize, means: &Mutex<Vec<f64>>, answer: Answer) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let (mut length, mut line) = (0, String::new());
    while reader.read_line(&mut line).unwrap_or(0) > 0 && line.trim_end() != "" {
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().unwrap();
        }
        line.clear();
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    let n = requests.fetch_add(1, Ordering::SeqCst) + 1;
    let (status, reply) = answer(n, &serde_json::from_slice(&body).unwrap());
    if status == 200 {
        let scores: serde_json::Value = serde_json::from_str(&reply).unwrap();
        let scores: Vec<f64> = scores["scores"].as_array().unwrap().iter().map(|s| s.as_f64().unwrap()).collect();
        means.lock().unwrap().push(scores.iter().sum::<f64>() / scores.len() as f64);
    }
    let reason = if status == 200 { "OK" } else { "Internal Server Error" };
    let head = format!("HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", reply.len());
    let mut stream = stream;
    let _ = stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(reply.as_bytes()));
}

/// Scores each response with its number of words.
fn words(request: &serde_json::Value) -> String {
    let pairs = request["pairs"].as_array().unwrap();
    let scores: Vec<usize> = pairs.iter().map(|p| p["response"].as_str().unwrap().split_whitespace().count()).collect();
    serde_json::json!({ "scores": scores }).to_string()
}

fn tiny_policy(dir: &Path) -> PathBuf {
    let corpus = small_corpus(dir, 200);
    let recipe = write(
        dir,
        "base.yaml",
        &format!(
            "run:\n  output_dir: {}\n  seed: 5\n  device: cpu\nplugins:\n  - name: pretrain\nstages:\n{}",
            dir.join("base").display(),
            tiny_pretrain_stage("pretrain", &corpus, 24)
        ),
    );
    assert_exit(&plumb(dir, &["run", recipe.to_str().unwrap()]), 0);
    dir.join("base/pretrain/final")
}

fn scalars(tb: &Path, tag: &str) -> Vec<f64> {
    let events = read_tensorboard(tb);
    let series = events["scalars"][tag].as_array().unwrap_or_else(|| panic!("no {tag} in {events}"));
    series.iter().map(|e| e[1].as_f64().unwrap()).collect()
}

#[test]
fn a_remote_reward_feeds_ppo_and_a_failing_one_stops_it_with_the_last_checkpoint_intact() {
    let dir = tempfile::tempdir().unwrap();
    let policy = tiny_policy(dir.path());
    let prompts = prompts(dir.path());
    // Three good answers (steps 1-3), then the judge is overloaded for good.
    let failing = judge(|n, request| if n <= 3 { (200, words(request)) } else { (500, "overloaded".into()) });
    let text = format!(
        r#"run: {{output_dir: {out}, seed: 11, device: cpu}}
plugins:
  - name: rlhf
rewards:
  - name: judge
    uses: rlhf.remote
    config: {{url: '{url}', retries: 1, backoff_s: 0.01, timeout_s: 30, batch_size: 8}}
stages:
  - name: ppo
    uses: rlhf.ppo
    model: {model}
    config:
      data: {{train: {prompts}}}
      reward: [{{name: judge, weight: 2.0}}]
      max_prompt_length: 16
      max_new_tokens: 8
      batch_size: 8
      num_minibatches: 2
      micro_batch_size: 4
      ppo_epochs: 1
      optimizer: {{lr: 1.0e-3}}
      schedule: {{warmup_steps: 0}}
      max_steps: 5
      log_every: 1
      checkpoint: {{every: 2, keep: 10}}
"#,
        out = dir.path().join("run").display(),
        url = failing.url,
        model = policy.display(),
        prompts = prompts.display(),
    );
    let recipe = write(dir.path(), "ppo.yaml", &text);
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap()]);
    assert!(!out.status.success(), "{}", stderr(&out));
    let expected =
        format!("reward `judge`: POST {}: HTTP 500 Internal Server Error after 2 attempts: overloaded", failing.url);
    assert!(stderr(&out).contains(&expected), "expected {expected}\nin {}", stderr(&out));
    assert_eq!(failing.requests.load(Ordering::SeqCst), 3 + 2, "three scored steps, then the first try and one retry");

    // The scores that arrived are the ones the stage logged, each under its own tag, and
    // weighted in the total.
    let tb = dir.path().join("run/tb/ppo");
    let sent = failing.means.lock().unwrap().clone();
    let logged = scalars(&tb, "objective/scores/judge");
    assert_eq!(logged.len(), 3);
    for ((l, s), total) in logged.iter().zip(&sent).zip(scalars(&tb, "objective/scores")) {
        assert!((l - s).abs() < 1e-5 && (total - 2.0 * s).abs() < 1e-5, "logged {l}, total {total}, sent {s}");
    }

    // Nothing trained is lost: step 2's checkpoint is intact, and a resume against a
    // judge that works takes it up.
    let checkpoints: Vec<String> = std::fs::read_dir(dir.path().join("run/ppo/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(checkpoints, ["step-00000002"]);
    let healthy = judge(|_, request| (200, words(request)));
    let url = format!("rewards.0.config.url={}", healthy.url);
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap(), "--resume", &url]);
    assert_exit(&out, 0);
    assert!(stderr(&out).contains("resuming from step 2"), "{}", stderr(&out));
    assert_eq!(healthy.requests.load(Ordering::SeqCst), 3, "steps 3 to 5");
}

#[test]
fn the_custom_reward_recipe_validates() {
    let lexicon = format!("plugins.2.path={}", library("examples/libcustom_reward.so").display());
    let out = plumb(&repo_root(), &["validate", "recipes/custom_reward.yaml", &lexicon]);
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("uses: lexicon.sentiment"), "{}", stdout(&out));
}
