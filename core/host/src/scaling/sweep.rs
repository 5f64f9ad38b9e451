//! The table of a finished sweep: per point its settings, N, D, C = 6ND and final
//! validation loss, read from each point's `report.json`; written as `sweep.csv` (for
//! people and spreadsheets) and `sweep.json` (what `plumb scaling fit` reads).
use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Point;
use crate::recipe::sweep::SweepPoint;

/// The metric names a stage's report gives N, D and the loss under (the pretrain stage's).
pub const N_METRIC: &str = "model/non_embedding_parameters";
pub const D_METRIC: &str = "train/tokens";
pub const LOSS_METRIC: &str = "eval/loss";

/// One finished point of a sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepRow {
    pub stage: String,
    pub settings: BTreeMap<String, serde_json::Value>,
    /// Non-embedding parameters.
    pub n: f64,
    /// Training tokens.
    pub d: f64,
    /// 6ND, FLOPs.
    pub c: f64,
    /// Final validation loss.
    pub loss: f64,
}

impl SweepRow {
    pub fn point(&self) -> Point {
        Point { n: self.n, d: self.d, loss: self.loss }
    }
}

/// Reads each point's report in `output_dir` and writes `sweep.csv` and `sweep.json` there.
pub fn write_table(output_dir: &Path, points: &[SweepPoint]) -> Result<Vec<SweepRow>, String> {
    let mut rows = Vec::with_capacity(points.len());
    for point in points {
        let file = output_dir.join(&point.stage).join("report.json");
        let report: serde_json::Value = std::fs::read(&file)
            .map_err(|e| e.to_string())
            .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
            .map_err(|e| format!("{}: {e}", file.display()))?;
        let metric = |name: &str| {
            report["metrics"][name].as_f64().ok_or_else(|| {
                format!("{}: no metric `{name}`; a sweep needs a stage that reports {N_METRIC}, {D_METRIC} and {LOSS_METRIC} (pretrain.* does)", file.display())
            })
        };
        let (n, d, loss) = (metric(N_METRIC)?, metric(D_METRIC)?, metric(LOSS_METRIC)?);
        let settings = point
            .settings
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::to_value(v).unwrap_or(serde_json::Value::Null)))
            .collect();
        rows.push(SweepRow { stage: point.stage.clone(), settings, n, d, c: 6.0 * n * d, loss });
    }
    let json = serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())? + "\n";
    write(&output_dir.join("sweep.json"), &json)?;
    let mut csv = String::from("stage,settings,n_non_embedding,tokens,compute_flops,eval_loss\n");
    for row in &rows {
        let settings = serde_json::to_string(&row.settings).unwrap_or_default().replace('"', "\"\"");
        csv.push_str(&format!("{},\"{settings}\",{},{},{:e},{}\n", row.stage, row.n, row.d, row.c, row.loss));
    }
    write(&output_dir.join("sweep.csv"), &csv)?;
    Ok(rows)
}

/// The rows of the sweep in `run_dir` (its `sweep.json`).
pub fn read_table(run_dir: &Path) -> Result<Vec<SweepRow>, String> {
    let file = run_dir.join("sweep.json");
    let bytes = std::fs::read(&file).map_err(|e| {
        format!("{}: {e}; is {} the output directory of a recipe with a `sweep:`?", file.display(), run_dir.display())
    })?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", file.display()))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    plumb_core::checkpoint::write_file_atomically(path, text.as_bytes()).map_err(|e| e.to_string())
}
