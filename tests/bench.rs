//! `plumb bench` prints a table with aligned columns and units for a person, and with
//! `--json` the same figures as one JSON object per line; dtypes and devices are spelled
//! as everywhere else (`float32`, `cpu`).
mod common;

use common::*;

const GENERATE: &[&str] = &[
    "bench",
    "generate",
    "--shape",
    "quickstart",
    "--device",
    "cpu",
    "--batch",
    "1,2",
    "--prompt-len",
    "4",
    "--new-tokens",
    "4",
    "--repeats",
    "1",
];

#[test]
fn bench_prints_an_aligned_table_with_units() {
    let out = plumb(&repo_root(), GENERATE);
    assert_exit(&out, 0);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "a header and a row per batch size:\n{text}");
    let header = lines[0];
    for title in ["model", "device", "dtype", "batch", "time (s)", "tokens/s", "TTFT (ms)"] {
        assert!(header.contains(title), "`{title}` missing from the header:\n{text}");
    }
    // Text columns start under their header, numbers end under theirs.
    let start = |line: &str, word: &str| line.find(word).unwrap();
    for row in &lines[1..] {
        assert_eq!(start(row, "quickstart"), start(header, "model"), "{text}");
        assert_eq!(start(row, "cpu"), start(header, "device"), "{text}");
        assert_eq!(start(row, "float32"), start(header, "dtype"), "{text}");
        let end_of = |column: &str| start(header, column) + column.len();
        let cells: Vec<(usize, &str)> = row.match_indices(|c: char| !c.is_whitespace()).collect();
        // The batch size (1 or 2) ends where the `batch` header ends.
        let batch_end = end_of("batch");
        assert!(cells.iter().any(|&(i, c)| i + 1 == batch_end && (c == "1" || c == "2")), "{text}");
    }
    assert!(!text.contains('{'), "no JSON without --json:\n{text}");
}

#[test]
fn bench_json_prints_one_object_per_line_with_the_dtype_spelled_as_pytorch_does() {
    let mut args = GENERATE.to_vec();
    args.push("--json");
    let out = plumb(&repo_root(), &args);
    assert_exit(&out, 0);
    let lines: Vec<serde_json::Value> =
        stdout(&out).lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(lines.len(), 2);
    for (line, batch) in lines.iter().zip([1, 2]) {
        assert_eq!(line["case"], "generate");
        assert_eq!(line["batch"], batch);
        assert_eq!((line["device"].as_str(), line["dtype"].as_str()), (Some("cpu"), Some("float32")));
        assert_eq!(line["generated_tokens"], 4 * batch);
        assert!(line["tokens_per_s"].as_f64().unwrap() > 0.0, "{line}");
    }
    // --dtype takes the same words, short forms too, and names them back the one way.
    let mut args = GENERATE.to_vec();
    args.extend(["--json", "--dtype", "bf16"]);
    let out = stdout(&plumb(&repo_root(), &args));
    for line in out.lines() {
        let line: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(line["dtype"], "bfloat16");
    }
    let bad = plumb(&repo_root(), &["bench", "generate", "--dtype", "bfloat", "--device", "cpu"]);
    assert_exit(&bad, 1);
    assert!(stderr(&bad).contains("--dtype: unknown dtype `bfloat`; expected float32, bfloat16 or float16"));
}

#[test]
fn bench_train_memory_runs_the_step_three_ways_and_prints_what_each_saves() {
    let args = ["bench", "train", "--shape", "quickstart", "--device", "cpu", "--batch", "2", "--seq", "16"];
    let out = plumb(&repo_root(), &[&args[..], &["--steps", "1", "--warmup", "0", "--memory"]].concat());
    assert_exit(&out, 0);
    let text = stdout(&out);
    let lines: Vec<serde_json::Value> =
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    assert_eq!(lines.len(), 5, "three runs and two comparisons:\n{text}");
    let ways: Vec<(&str, bool)> = lines[..3]
        .iter()
        .map(|l| (l["head"].as_str().unwrap(), l["activation_checkpointing"].as_bool().unwrap()))
        .collect();
    assert_eq!(ways, [("whole", false), ("chunked", false), ("chunked", true)]);
    assert_eq!(lines[3]["case"], "train-memory");
    assert_eq!(lines[4]["case"], "train-checkpointing");
    for key in ["peak_rss_bytes_off", "peak_rss_bytes_on", "saved_bytes", "step_s_off", "step_s_on", "time_ratio"] {
        assert!(lines[4][key].is_number(), "{key}: {}", lines[4]);
    }
}

/// `plumb bench allreduce` starts its ranks itself (as `plumb run --nproc`); rank 0 alone
/// prints, a line per size, and the bus bandwidth is the algorithm bandwidth × 2(n−1)/n.
#[test]
fn bench_allreduce_launches_its_ranks_and_prints_the_bandwidth_of_each_size() {
    for nproc in ["2", "3"] {
        let args = ["bench", "allreduce", "--nproc", nproc, "--max-mib", "2", "--repeats", "2", "--json"];
        let out = plumb_with_env(&repo_root(), &args, &[("PLUMB_DIST_TIMEOUT", "30")]);
        assert_exit(&out, 0);
        let text = stdout(&out);
        let lines: Vec<serde_json::Value> =
            text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
        assert_eq!(lines.len(), 3, "the setup and 1 and 2 MiB, from rank 0 alone:\n{text}");
        let n: f64 = nproc.parse().unwrap();
        assert_eq!((lines[0]["case"].as_str(), lines[0]["world_size"].as_f64()), (Some("allreduce-setup"), Some(n)));
        for (line, mib) in lines[1..].iter().zip([1u64, 2]) {
            assert_eq!(line["case"], "allreduce");
            assert_eq!(line["bytes"].as_u64(), Some(mib << 20), "{line}");
            assert_eq!(line["world_size"].as_f64(), Some(n), "{line}");
            let figure = |key: &str| line[key].as_f64().unwrap_or_else(|| panic!("{key}: {line}"));
            for key in ["time_ms", "algbw_gb_s", "busbw_gb_s"] {
                assert!(figure(key) > 0.0 && figure(key).is_finite(), "{key}: {line}");
            }
            let algbw = (mib << 20) as f64 / (figure("time_ms") / 1e3) / 1e9;
            assert!((figure("algbw_gb_s") - algbw).abs() <= 1e-9 * algbw, "{line}");
            assert!((figure("busbw_gb_s") - algbw * 2.0 * (n - 1.0) / n).abs() <= 1e-9 * algbw, "{line}");
        }
    }
    // The table, for a person; sizes that make no range are the user's error.
    let out = plumb(&repo_root(), &["bench", "allreduce", "--max-mib", "1", "--repeats", "1"]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(text.contains("size (MiB)") && text.contains("busbw (GB/s)"), "{text}");
    let bad = plumb(&repo_root(), &["bench", "allreduce", "--min-mib", "4", "--max-mib", "2"]);
    assert_exit(&bad, 1);
    assert!(stderr(&bad).contains("expected 1 <= min <= max"), "{}", stderr(&bad));
}

#[test]
fn generate_beside_transformers_paces_both_sides_and_names_a_python_that_fails() {
    let args = |python: &str| -> Vec<String> {
        let mut args: Vec<String> = GENERATE.iter().map(|s| s.to_string()).collect();
        let repeats = args.iter().position(|a| a == "--repeats").unwrap() + 1;
        args[repeats] = "3".into();
        args.extend(["--transformers", python].map(String::from));
        args
    };
    let python = python();
    let out = plumb(&repo_root(), &args(&python.display().to_string()).iter().map(String::as_str).collect::<Vec<_>>());
    assert_exit(&out, 0);
    let lines: Vec<serde_json::Value> =
        stdout(&out).lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(lines.len(), 2, "{}", stdout(&out));
    for (line, batch) in lines.iter().zip([1, 2]) {
        assert_eq!(line["case"], "generate-vs-transformers");
        assert_eq!((line["batch"].as_i64(), line["repeats"].as_i64()), (Some(batch), Some(3)), "{line}");
        let (plumb_s, hf_s) = (line["plumb_s"].as_f64().unwrap(), line["transformers_s"].as_f64().unwrap());
        assert!(plumb_s > 0.0 && hf_s > 0.0, "{line}");
        assert!((line["speedup"].as_f64().unwrap() - hf_s / plumb_s).abs() < 1e-9, "{line}");
    }

    // A "Python" that exits at once: the error names the command and says what it did.
    let out = plumb(&repo_root(), &args("false").iter().map(String::as_str).collect::<Vec<_>>());
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(
        err.contains("\"false\"") && err.contains("hf_generate.py") && err.contains("ended without a result"),
        "{err}"
    );
}
