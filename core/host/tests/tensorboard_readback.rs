//! Writes an event file with `TbWriter` and reads it back with official TensorBoard
//! (Python), checking tags, steps, values, text and hparams exactly.
//!
//! Needs a Python with `tensorboard` installed: `$PLUMB_TEST_PYTHON` (set by `./dev test`),
//! else the checkout's `.venv/bin/python`.

mod common;

use std::path::Path;
use std::process::Command;

use plumb_host::log::{HParamValue, TbWriter};
use serde_json::Value;

/// Reads the event files in argv[1] (the run) with TensorBoard's `EventAccumulator` and
/// plugin parsers, then asks the HParams dashboard's own backend (over argv[2], the
/// logdir) for its session groups, and prints JSON.
const READER: &str = r#"
import json, struct, sys
from google.protobuf import json_format
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, event_accumulator as ea
from tensorboard.backend.event_processing import plugin_event_multiplexer as pem
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment, list_session_groups
from tensorboard.plugins.hparams import metadata as hp_metadata
from tensorboard.plugins.text import text_plugin
from tensorboard.util import tensor_util

acc = ea.EventAccumulator(sys.argv[1], size_guidance={k: 0 for k in ea.DEFAULT_SIZE_GUIDANCE})
acc.Reload()
f32_bits = lambda v: struct.unpack("<I", struct.pack("<f", v))[0]

out = {"scalars": {}, "text": {}, "hparams": {}}
for tag in acc.Tags()["scalars"]:
    out["scalars"][tag] = [[e.step, e.value, f32_bits(e.value)] for e in acc.Scalars(tag)]

for tag in acc.PluginTagToContent("text"):
    events = []
    for e in acc.Tensors(tag):
        arr = tensor_util.make_ndarray(e.tensor_proto)
        events.append({
            "step": e.step,
            "dtype": e.tensor_proto.dtype,
            "shape": list(arr.shape),
            "text": arr.item().decode("utf-8"),
            "html": text_plugin.text_array_to_html(arr, enable_markdown=True),
        })
    out["text"][tag] = events

contents = acc.PluginTagToContent("hparams")
out["hparams"]["tags"] = sorted(contents)
exp = hp_metadata.parse_experiment_plugin_data(contents[hp_metadata.EXPERIMENT_TAG])
out["hparams"]["hparam_infos"] = [[i.name, api_pb2.DataType.Name(i.type)] for i in exp.hparam_infos]
out["hparams"]["metric_tags"] = [[m.name.group, m.name.tag] for m in exp.metric_infos]
start = hp_metadata.parse_session_start_info_plugin_data(contents[hp_metadata.SESSION_START_INFO_TAG])
values = {}
for name, v in start.hparams.items():
    kind = v.WhichOneof("kind")
    values[name] = [kind, getattr(v, kind)]
out["hparams"]["values"] = values
out["hparams"]["start_time_secs"] = start.start_time_secs
end = hp_metadata.parse_session_end_info_plugin_data(contents[hp_metadata.SESSION_END_INFO_TAG])
out["hparams"]["status"] = api_pb2.Status.Name(end.status)
out["hparams"]["end_time_secs"] = end.end_time_secs

# What the HParams dashboard requests: the experiment, then session groups with every
# hparam and metric as a column.
logdir = sys.argv[2]
mux = pem.EventMultiplexer()
mux.AddRunsFromDirectory(logdir)
mux.Reload()
tb = base_plugin.TBContext(logdir=logdir, multiplexer=mux,
                           data_provider=data_provider.MultiplexerDataProvider(mux, logdir))
bctx, rctx = backend_context.Context(tb), context.RequestContext()
exp = get_experiment.Handler(rctx, bctx, "", api_pb2.GetExperimentRequest()).run()
req = api_pb2.ListSessionGroupsRequest(
    start_index=0, slice_size=100,
    allowed_statuses=[api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE, api_pb2.STATUS_RUNNING],
    col_params=[api_pb2.ColParams(hparam=h.name) for h in exp.hparam_infos]
    + [api_pb2.ColParams(metric=m.name) for m in exp.metric_infos])
groups = list_session_groups.Handler(rctx, bctx, "", req).run()
out["dashboard"] = json_format.MessageToDict(groups, preserving_proto_field_name=True)
print(json.dumps(out))
"#;

fn read_back(run_dir: &Path, logdir: &Path) -> Value {
    let python = common::python();
    let out = Command::new(&python)
        .arg("-c")
        .arg(READER)
        .arg(run_dir)
        .arg(logdir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(
        out.status.success(),
        "{} failed reading {} (is tensorboard installed? `./dev test` installs it):\n{}",
        python.display(),
        run_dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad JSON from the reader ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// `[[step, f32 bits]]` of what we logged, the exactness TensorBoard stores (f32).
fn expected(points: &[(i64, f64)]) -> Vec<(i64, u32)> {
    points.iter().map(|&(step, v)| (step, (v as f32).to_bits())).collect()
}

fn read_scalars(json: &Value, tag: &str) -> Vec<(i64, u32)> {
    let events = json["scalars"][tag].as_array().unwrap_or_else(|| panic!("no scalars for {tag}: {json}"));
    events.iter().map(|e| (e[0].as_i64().unwrap(), e[2].as_u64().unwrap() as u32)).collect()
}

#[test]
fn official_tensorboard_reads_scalars_text_and_hparams() {
    let tmp = tempfile::tempdir().unwrap();
    let logdir = tmp.path().join("runs");
    let dir = logdir.join("exp1"); // created by TbWriter, parents included

    let train_loss: Vec<(i64, f64)> = (0..6).map(|i| (i * 10, 2.0 / (1.0 + i as f64))).collect();
    let learning_rate: Vec<(i64, f64)> = (0..6).map(|i| (i * 10, 3e-4 * (1.0 - i as f64 / 10.0))).collect();
    let eval_loss: Vec<(i64, f64)> = vec![(0, 2.25), (25, 0.4375), (50, 0.123456789)];
    let text = "Réponse: naïve café — 日本語 🚀\nsecond line with **bold**";

    let writer = TbWriter::create(&dir).unwrap();
    writer.hparams(
        &[
            ("lr".to_string(), HParamValue::Number(3e-4)),
            ("optimizer".to_string(), HParamValue::Text("adamw".to_string())),
            ("use_lora".to_string(), HParamValue::Bool(true)),
            ("batch_size".to_string(), HParamValue::Number(0.0)), // oneof 0 must survive
        ],
        &["eval/loss".to_string()],
    );
    for (&(step, loss), &(_, lr)) in train_loss.iter().zip(&learning_rate) {
        writer.scalar("train/loss", step, loss);
        writer.scalar("train/learning_rate", step, lr);
    }
    for &(step, loss) in &eval_loss {
        writer.scalar("eval/loss", step, loss);
    }
    writer.text("samples/completion", 50, text);
    writer.close().unwrap();

    let json = read_back(&dir, &logdir);

    // Scalars: exact tags, steps and f32 values.
    let mut tags: Vec<_> = json["scalars"].as_object().unwrap().keys().cloned().collect();
    tags.sort();
    assert_eq!(tags, ["eval/loss", "train/learning_rate", "train/loss"]);
    assert_eq!(read_scalars(&json, "train/loss"), expected(&train_loss));
    assert_eq!(read_scalars(&json, "train/learning_rate"), expected(&learning_rate));
    assert_eq!(read_scalars(&json, "eval/loss"), expected(&eval_loss));

    // Text: one scalar DT_STRING (7) tensor under the text plugin, decoded exactly.
    let texts = json["text"].as_object().unwrap();
    assert_eq!(texts.keys().collect::<Vec<_>>(), ["samples/completion"]);
    let events = texts["samples/completion"].as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["step"], 50);
    assert_eq!(events[0]["dtype"], 7);
    assert_eq!(events[0]["shape"], serde_json::json!([]));
    assert_eq!(events[0]["text"], text);
    let html = events[0]["html"].as_str().unwrap();
    assert!(html.contains("<strong>bold</strong>") && html.contains("日本語"), "{html}");

    // Hparams: the three plugin summaries, parsed by the plugin's own parsers.
    let hp = &json["hparams"];
    assert_eq!(
        hp["tags"],
        serde_json::json!(["_hparams_/experiment", "_hparams_/session_end_info", "_hparams_/session_start_info"])
    );
    assert_eq!(
        hp["hparam_infos"],
        serde_json::json!([
            ["lr", "DATA_TYPE_FLOAT64"],
            ["optimizer", "DATA_TYPE_STRING"],
            ["use_lora", "DATA_TYPE_BOOL"],
            ["batch_size", "DATA_TYPE_FLOAT64"],
        ])
    );
    assert_eq!(hp["metric_tags"], serde_json::json!([["", "eval/loss"]]));
    assert_eq!(
        hp["values"],
        serde_json::json!({
            "lr": ["number_value", 3e-4],
            "optimizer": ["string_value", "adamw"],
            "use_lora": ["bool_value", true],
            "batch_size": ["number_value", 0.0],
        })
    );
    assert_eq!(hp["status"], "STATUS_SUCCESS");
    let (start, end) = (hp["start_time_secs"].as_f64().unwrap(), hp["end_time_secs"].as_f64().unwrap());
    assert!(start > 1.6e9 && end >= start, "start {start}, end {end}");

    // The HParams dashboard: one session group (the run), its hparams, and eval/loss at
    // its last step beside them.
    let groups = json["dashboard"]["session_groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "{}", json["dashboard"]);
    let group = &groups[0];
    assert_eq!(group["name"], "exp1");
    assert_eq!(
        group["hparams"],
        serde_json::json!({"lr": 3e-4, "optimizer": "adamw", "use_lora": true, "batch_size": 0.0})
    );
    let metrics = group["metric_values"].as_array().unwrap();
    assert_eq!(metrics.len(), 1, "{group}");
    assert_eq!(metrics[0]["name"]["tag"], "eval/loss");
    let (last_step, last_loss) = eval_loss[eval_loss.len() - 1];
    assert_eq!(metrics[0]["training_step"], last_step);
    assert_eq!(metrics[0]["value"].as_f64().unwrap(), last_loss as f32 as f64);
    assert_eq!(group["sessions"][0]["status"], "STATUS_SUCCESS");
}
