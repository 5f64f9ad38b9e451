//! SFT data formatting, checked against transformers and token by token:
//!
//! - each format (alpaca, prompt/completion, multi-turn messages) renders through the
//!   Llama-3.2 and Qwen2.5 chat templates to exactly transformers' `apply_chat_template`
//!   text and ids;
//! - the label mask covers exactly each assistant turn (its end-of-turn marker included);
//! - malformed lines are reported with their line numbers, or skipped and counted.
//!
//! Needs Python with transformers: `PLUMB_TEST_PYTHON`, else the workspace's `.venv/bin/python`.
use std::path::{Path, PathBuf};
use std::process::Command;

use plumb_core::tokenizer::{ChatMessage, Tokenizer};
use plumb_sft::formats::{read_jsonl, Conversation, Fields, Format, OnMalformed};
use plumb_sft::template::{render_with_spans, tokenize, use_template, Example, TemplateChoice, TrainOn};

fn here() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests")
}

fn tokenizer_dir(family: &str) -> PathBuf {
    here().join("../../../core/tests/fixtures/tokenizers").join(family)
}

fn python() -> PathBuf {
    if let Ok(python) = std::env::var("PLUMB_TEST_PYTHON") {
        return PathBuf::from(python);
    }
    let venv = here().join("../../../.venv/bin/python");
    assert!(venv.exists(), "needs Python with transformers: set PLUMB_TEST_PYTHON or run `./dev test`");
    venv
}

/// Every fixture conversation: (file, conversations).
fn fixtures() -> Vec<(&'static str, Vec<Conversation>)> {
    let read = |file: &str, format, fields: Fields| {
        read_jsonl(&here().join("fixtures").join(file), format, &fields, OnMalformed::Stop).unwrap().0
    };
    vec![
        ("alpaca.jsonl", read("alpaca.jsonl", Format::Alpaca, Fields::default())),
        (
            "prompt_completion.jsonl",
            read(
                "prompt_completion.jsonl",
                Format::PromptCompletion,
                Fields { prompt: "question".into(), completion: "answer".into(), ..Fields::default() },
            ),
        ),
        ("messages.jsonl", read("messages.jsonl", Format::Messages, Fields::default())),
    ]
}

fn variables() -> serde_json::Map<String, serde_json::Value> {
    serde_json::json!({"date_string": "26 Jul 2024"}).as_object().unwrap().clone()
}

fn format(tokenizer: &Tokenizer, messages: &[ChatMessage], train_on: TrainOn) -> (String, Example) {
    let template = tokenizer.chat_template().unwrap();
    let (text, spans) = render_with_spans(template, messages, &variables()).unwrap();
    let example = tokenize(tokenizer, &text, &spans, train_on).unwrap();
    (text, example)
}

/// The runs of consecutive trained tokens.
fn trained_runs(example: &Example) -> Vec<Vec<i64>> {
    let mut runs: Vec<Vec<i64>> = Vec::new();
    let mut previous = false;
    for (&id, &trained) in example.ids.iter().zip(&example.trained) {
        if trained {
            if !previous {
                runs.push(Vec::new());
            }
            runs.last_mut().unwrap().push(id);
        }
        previous = trained;
    }
    runs
}

/// What each assistant turn looks like in the family's template, end-of-turn marker included.
fn rendered_answer(family: &str, content: &str) -> String {
    match family {
        "llama3.2" => format!("{content}<|eot_id|>"),
        "qwen2.5" => format!("{content}<|im_end|>\n"),
        other => panic!("no expectation for {other}"),
    }
}

#[test]
fn every_format_renders_as_transformers_and_the_labels_cover_exactly_the_answers() {
    for family in ["llama3.2", "qwen2.5"] {
        let dir = tokenizer_dir(family);
        let mut tokenizer = Tokenizer::from_dir(&dir).unwrap();
        use_template(&TemplateChoice::Model, &mut tokenizer, &dir).unwrap();
        let conversations: Vec<(&str, Conversation)> =
            fixtures().into_iter().flat_map(|(file, cs)| cs.into_iter().map(move |c| (file, c))).collect();

        let json: Vec<_> = conversations.iter().map(|(_, c)| &c.messages).collect();
        let input = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(input.path(), serde_json::to_string(&json).unwrap()).unwrap();
        let out = Command::new(python()).arg(here().join("reference.py")).arg(&dir).arg(input.path()).output().unwrap();
        assert!(out.status.success(), "reference.py: {}", String::from_utf8_lossy(&out.stderr));
        let reference: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();

        for ((file, conversation), expected) in conversations.iter().zip(&reference) {
            let at = format!("{family}, {file} line {}", conversation.line);
            let (text, example) = format(&tokenizer, &conversation.messages, TrainOn::Responses);
            assert_eq!(text, expected["text"].as_str().unwrap(), "{at}: rendered text");
            let ids: Vec<i64> = serde_json::from_value(expected["ids"].clone()).unwrap();
            assert_eq!(example.ids, ids, "{at}: token ids");

            // Token by token: each run of trained tokens is one assistant turn, exactly.
            let answers: Vec<Vec<i64>> = conversation
                .messages
                .iter()
                .filter(|m| m.role == "assistant")
                .map(|m| tokenizer.encode(&rendered_answer(family, &m.content)).unwrap())
                .collect();
            assert_eq!(trained_runs(&example), answers, "{at}: trained tokens");
            assert_eq!(example.targets(), answers.iter().map(Vec::len).sum::<usize>(), "{at}");

            let (_, all) = format(&tokenizer, &conversation.messages, TrainOn::All);
            assert_eq!(all.ids, example.ids);
            assert!(all.trained[1..].iter().all(|&t| t) && !all.trained[0], "{at}: train_on all");
        }
    }
}

#[test]
fn the_default_template_trains_on_answers_and_their_eos() {
    let dir = tokenizer_dir("qwen2.5");
    let mut tokenizer = Tokenizer::from_dir(&dir).unwrap();
    use_template(&TemplateChoice::Default, &mut tokenizer, &dir).unwrap();
    let messages = &fixtures()[2].1[0].messages; // system, user, assistant, user, assistant
    let (text, example) = format(&tokenizer, messages, TrainOn::Responses);
    assert_eq!(
        text,
        "You are a helpful assistant.\n\n### Instruction:\nWhat is the capital of France?\n\n### Response:\nParis.<|im_end|>\n\n\
         ### Instruction:\nThank you!\n\n### Response:\nYou're welcome.<|im_end|>\n\n"
    );
    let answers: Vec<Vec<i64>> = ["Paris.<|im_end|>\n\n", "You're welcome.<|im_end|>\n\n"]
        .iter()
        .map(|a| tokenizer.encode(a).unwrap())
        .collect();
    assert_eq!(trained_runs(&example), answers);
}

#[test]
fn a_template_that_rewrites_earlier_turns_is_refused_with_its_name() {
    // Keeps only the last assistant turn: the first one's tokens are not where rendering put them.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("last_only.jinja");
    std::fs::write(
        &file,
        "{% for m in messages %}{% if m.role != 'assistant' or loop.last %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}",
    )
    .unwrap();
    let mut tokenizer = Tokenizer::from_dir(&tokenizer_dir("qwen2.5")).unwrap();
    use_template(&TemplateChoice::File(file.clone()), &mut tokenizer, dir.path()).unwrap();
    let messages = &fixtures()[2].1[0].messages;
    let err = render_with_spans(tokenizer.chat_template().unwrap(), messages, &variables()).unwrap_err().to_string();
    assert!(err.contains("last_only.jinja") && err.contains("cannot locate assistant turn 2"), "{err}");
}

#[test]
fn malformed_lines_are_reported_with_their_numbers_or_skipped_and_counted() {
    let file = here().join("fixtures/malformed.jsonl");
    let err = read_jsonl(&file, Format::Alpaca, &Fields::default(), OnMalformed::Stop).unwrap_err().to_string();
    assert!(
        err.contains("malformed.jsonl") && err.contains("line 3: field `output`: expected a string, found a number"),
        "{err}"
    );
    assert!(err.contains("on_malformed: skip"), "{err}");

    let (kept, skipped) = read_jsonl(&file, Format::Alpaca, &Fields::default(), OnMalformed::Skip).unwrap();
    assert_eq!(kept.iter().map(|c| c.line).collect::<Vec<_>>(), [1, 4, 7]);
    let lines: Vec<usize> = skipped.lines.iter().map(|(n, _)| *n).collect();
    assert_eq!(lines, [3, 5, 6]);
    assert!(skipped.lines[1].1.starts_with("not JSON"));
    assert_eq!(skipped.lines[2].1, "expected a JSON object, found a list");
    assert!(skipped.to_string().contains("skipped 3 malformed line(s)"));
}
