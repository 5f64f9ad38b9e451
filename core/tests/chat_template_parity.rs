//! plumb's chat templates render, byte for byte, what Python's transformers renders for the same tokenizer
//! files (`AutoTokenizer.from_pretrained(dir).apply_chat_template(messages, tokenize=False, ...)`), and
//! the rendered prompts tokenize to the same ids.
//!
//! Fixtures (`fixtures/tokenizers/`): Llama 3.2 Instruct's and Qwen2.5 Instruct's chat templates as those
//! models ship them, with their special tokens over a tiny byte-level BPE (`make_fixtures.py`). Each is
//! checked as `chat_template.jinja` (newer transformers) and as `tokenizer_config.json`'s `chat_template`.
//!
//! Needs Python with transformers: `PLUMB_TEST_PYTHON`, else the workspace's `.venv/bin/python`.
//!
//!     cargo test -p plumb-core --test chat_template_parity
mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use plumb_core::tokenizer::{ChatMessage, Tokenizer};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Renders every case of every job with transformers; writes a JSON list of results to argv[1].
const RENDER_PY: &str = r#"
import json, sys
from transformers import AutoTokenizer, GenerationConfig

results = []
for job in json.load(sys.stdin):
    tokenizer = AutoTokenizer.from_pretrained(job["dir"])
    eos = GenerationConfig.from_pretrained(job["dir"]).eos_token_id
    rendered = [
        tokenizer.apply_chat_template(
            case["messages"], tokenize=False, add_generation_prompt=case["add_generation_prompt"], **case["variables"]
        )
        for case in job["cases"]
    ]
    results.append({
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "generation_eos_token_id": eos if isinstance(eos, list) else [eos],
        "rendered": rendered,
        "ids": [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered],
    })
with open(sys.argv[1], "w") as f:
    json.dump(results, f)
"#;

#[derive(Serialize)]
struct Case {
    name: &'static str,
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    /// Extra template variables: `apply_chat_template`'s keyword arguments.
    variables: Map<String, Value>,
}

#[derive(Serialize)]
struct Job<'a> {
    dir: &'a Path,
    cases: &'a [Case],
}

#[derive(Deserialize, Debug)]
struct Transformers {
    bos_token_id: Option<i64>,
    eos_token_id: Option<i64>,
    pad_token_id: Option<i64>,
    generation_eos_token_id: Vec<i64>,
    rendered: Vec<String>,
    ids: Vec<Vec<i64>>,
}

fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizers").join(family)
}

/// transformers' renders of `cases` for each directory, in one Python process (importing it takes seconds).
fn transformers(dirs: &[&Path], cases: &[Case]) -> Vec<Transformers> {
    let jobs: Vec<Job> = dirs.iter().map(|dir| Job { dir, cases }).collect();
    let out = tempfile::tempdir().unwrap();
    let result = out.path().join("rendered.json");
    let mut child = Command::new(common::python())
        .args(["-c", RENDER_PY])
        .arg(&result)
        // strftime_now formats local time in Python, UTC in plumb.
        .env("TZ", "UTC")
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting Python");
    child.stdin.take().unwrap().write_all(serde_json::to_string(&jobs).unwrap().as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "transformers failed:\n{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_str(&std::fs::read_to_string(&result).unwrap()).unwrap()
}

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage::new(role, content)
}

fn variables(json: Value) -> Map<String, Value> {
    match json {
        Value::Object(map) => map,
        _ => panic!("template variables are an object"),
    }
}

/// A tool in the OpenAI / transformers JSON-schema form. Keys are in sorted order because plumb's
/// variables pass through serde_json maps, which sort them (Python keeps insertion order).
fn weather_tool() -> Value {
    json!({
        "function": {
            "description": "Das Wetter für eine Stadt — heute oder später.",
            "name": "get_weather",
            "parameters": {
                "properties": {
                    "city": {"description": "Name der Stadt, z. B. \"Zürich\"", "type": "string"},
                    "days": {"default": 1, "maximum": 7.0, "type": "integer"},
                },
                "required": ["city"],
                "type": "object",
            },
        },
        "type": "function",
    })
}

const QUESTION: &str = "What is the capital of France?";

fn cases() -> Vec<Case> {
    let none = Map::new;
    vec![
        Case {
            name: "system and user, generation prompt",
            messages: vec![message("system", "  You answer in one word.\n"), message("user", QUESTION)],
            add_generation_prompt: true,
            variables: none(),
        },
        Case {
            name: "user only, generation prompt",
            messages: vec![message("user", QUESTION)],
            add_generation_prompt: true,
            variables: none(),
        },
        Case {
            name: "user only, no generation prompt",
            messages: vec![message("user", QUESTION)],
            add_generation_prompt: false,
            variables: none(),
        },
        Case {
            name: "multi-turn with assistant turns, as trained on",
            messages: vec![
                message("system", "You are terse."),
                message("user", QUESTION),
                message("assistant", " Paris. "),
                message("user", "And of Italy?"),
                message("assistant", "Rome."),
            ],
            add_generation_prompt: false,
            variables: none(),
        },
        Case {
            name: "multi-turn without system, generation prompt",
            messages: vec![
                message("user", "Hi!"),
                message("assistant", "Hello! How can I help?"),
                message("user", "A haiku."),
            ],
            add_generation_prompt: true,
            variables: none(),
        },
        Case {
            name: "non-ASCII content, quotes, tabs and newlines",
            messages: vec![
                message("system", "Antworte auf Deutsch. 日本語も可。"),
                message("user", "Grüß dich! Wie spät ist es in 東京? 🕰️\n\"Zitat\" — ‹שלום›\tEnde\n\n"),
            ],
            add_generation_prompt: true,
            variables: none(),
        },
        Case {
            name: "fixed date_string",
            messages: vec![message("user", QUESTION)],
            add_generation_prompt: true,
            variables: variables(json!({"date_string": "26 Jul 2024"})),
        },
        Case {
            name: "tools (the templates' tojson branches)",
            messages: vec![message("system", "Du hilfst beim Wetter."), message("user", "Wetter in Zürich?")],
            add_generation_prompt: true,
            variables: variables(json!({"tools": [weather_tool()]})),
        },
    ]
}

/// A copy of `family`'s fixture with the template moved from chat_template.jinja into tokenizer_config.json.
fn with_template_in_config(family: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(family)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let template = std::fs::read_to_string(dir.path().join("chat_template.jinja")).unwrap();
    std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();
    let config_file = dir.path().join("tokenizer_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&config_file).unwrap()).unwrap();
    config["chat_template"] = json!(template);
    std::fs::write(&config_file, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    dir
}

fn render_all(tokenizer: &Tokenizer, cases: &[Case]) -> Vec<String> {
    let template = tokenizer.chat_template().expect("the fixture has a chat template");
    cases.iter().map(|c| template.render_with(&c.messages, c.add_generation_prompt, &c.variables).unwrap()).collect()
}

/// Renders `family`'s cases from both layouts in plumb and transformers and compares everything; returns
/// plumb's renders of the chat_template.jinja layout for exact-string checks.
fn assert_parity(family: &str) -> Vec<String> {
    let cases = cases();
    let config_layout = with_template_in_config(family);
    let dirs = [fixture(family), config_layout.path().to_path_buf()];
    let tokenizers: Vec<Tokenizer> = dirs.iter().map(|dir| Tokenizer::from_dir(dir).unwrap()).collect();
    // Renders before and after Python's: Llama 3.2 prints today's date, and the day may turn in between.
    let before: Vec<Vec<String>> = tokenizers.iter().map(|t| render_all(t, &cases)).collect();
    let python = transformers(&[&dirs[0], &dirs[1]], &cases);
    let after: Vec<Vec<String>> = tokenizers.iter().map(|t| render_all(t, &cases)).collect();

    for (d, (tokenizer, python)) in tokenizers.iter().zip(&python).enumerate() {
        let layout = if d == 0 { "chat_template.jinja" } else { "tokenizer_config.json" };
        for (i, case) in cases.iter().enumerate() {
            let expected = &python.rendered[i];
            let ours = if &before[d][i] == expected { &before[d][i] } else { &after[d][i] };
            assert_eq!(ours, expected, "{family} ({layout}): {}", case.name);
            assert_eq!(&tokenizer.encode(ours).unwrap(), &python.ids[i], "{family} ({layout}): ids of {}", case.name);
        }
        assert_eq!(tokenizer.bos_id(), python.bos_token_id, "{family}: bos");
        assert_eq!(tokenizer.eos_id(), python.eos_token_id, "{family}: eos");
        assert_eq!(tokenizer.pad_id(), python.pad_token_id.or(python.eos_token_id), "{family}: pad, else eos");
        let mut stop = tokenizer.eos_ids();
        stop.sort();
        let mut python_stop = python.generation_eos_token_id.clone();
        python_stop.sort();
        assert_eq!(stop, python_stop, "{family}: every stop id");
    }
    before.into_iter().next().unwrap()
}

#[test]
fn llama_3_2_instruct_renders_as_in_transformers() {
    let ours = assert_parity("llama3.2");
    let header = |role: &str| format!("<|start_header_id|>{role}<|end_header_id|>\n\n");
    let system = format!(
        "<|begin_of_text|>{}Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n",
        header("system")
    );
    assert_eq!(ours[6], format!("{system}<|eot_id|>{}{QUESTION}<|eot_id|>{}", header("user"), header("assistant")));
    // The system message is trimmed into the system turn; the date line is today's.
    let today = &ours[0];
    assert!(today.starts_with(&format!(
        "<|begin_of_text|>{}Cutting Knowledge Date: December 2023\nToday Date: ",
        header("system")
    )));
    assert!(today.ends_with(&format!(
        "\n\nYou answer in one word.<|eot_id|>{}{QUESTION}<|eot_id|>{}",
        header("user"),
        header("assistant")
    )));
    assert!(
        ours[7].contains("    \"function\": {\n        \"description\": \"Das Wetter für eine Stadt"),
        "{}",
        ours[7]
    );
}

#[test]
fn qwen_2_5_instruct_renders_as_in_transformers() {
    let ours = assert_parity("qwen2.5");
    let default_system =
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n";
    assert_eq!(ours[1], format!("{default_system}<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"));
    assert_eq!(ours[2], format!("{default_system}<|im_start|>user\n{QUESTION}<|im_end|>\n"));
    assert_eq!(
        ours[3],
        format!(
            "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n\
             <|im_start|>assistant\n Paris. <|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n\
             <|im_start|>assistant\nRome.<|im_end|>\n"
        )
    );
    assert!(
        ours[7].contains(
            r#"<tools>
{"function": {"description": "Das Wetter für eine Stadt — heute oder später.", "name": "get_weather", "#
        ),
        "{}",
        ours[7]
    );
}
