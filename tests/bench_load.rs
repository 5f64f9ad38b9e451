//! `plumb bench load`: writes a shape's checkpoint once, loads it in a child process and
//! reports the child's peak RSS against the file size.
mod common;

use serde_json::Value;

#[test]
fn bench_load_writes_the_checkpoint_once_and_reports_peak_rss_against_the_file_size() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("quickstart-bf16");
    let run = |extra: &[&str]| -> Value {
        let mut args = vec!["bench", "load", "--json", "--shape", "quickstart", "--dtype", "bf16", "--dir"];
        args.push(checkpoint.to_str().unwrap());
        args.extend_from_slice(extra);
        let out = common::plumb(dir.path(), &args);
        common::assert_exit(&out, 0);
        serde_json::from_str(common::stdout(&out).trim()).unwrap()
    };
    let first = run(&[]);
    let weights = checkpoint.join("model.safetensors");
    let written = std::fs::metadata(&weights).unwrap().modified().unwrap();
    let file_bytes = std::fs::metadata(&weights).unwrap().len();
    assert_eq!(first["file_bytes"], file_bytes);
    let peak = first["peak_rss_bytes"].as_u64().unwrap();
    assert!(peak > file_bytes, "{first}");
    // serde_json's default float parser may be one ulp off the printed value.
    let ratio = first["peak_rss_over_file"].as_f64().unwrap();
    assert!((ratio - peak as f64 / file_bytes as f64).abs() < 1e-12 * ratio, "{first}");
    assert!(first["load_s"].as_f64().unwrap() > 0.0, "{first}");

    // Written once: the second run only loads.
    run(&[]);
    assert_eq!(std::fs::metadata(&weights).unwrap().modified().unwrap(), written);
    let config: Value = serde_json::from_slice(&std::fs::read(checkpoint.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");

    let alone = run(&["--in-process"]);
    assert_eq!(alone["dtype"], "bfloat16", "the dtype as every plumb output spells it");
    assert!(alone["peak_rss_bytes"].as_u64().unwrap() > file_bytes, "{alone}");
}
