//! The table a run ends with: each stage's key figures and wall time, printed, written
//! to `<output_dir>/summary.json` and logged to TensorBoard as text (`tb/summary`).
//!
//! A stage's figures are the metrics its recipe entry lists under `summary:`, or by
//! default every `eval/X` it reports with an `eval/initial_X` (shown as initial → final)
//! and, for an evaluator, its accuracies. A figure `P/X` is shown beside `P/initial_X`
//! when the stage reports that too.
use std::collections::BTreeMap;
use std::path::Path;

use plumb_core::checkpoint::write_file_atomically;
use plumb_host::log::TbWriter;
use serde::Serialize;

use crate::Failure;

/// One key figure: its value at the end of the stage and, when the stage measured it
/// before training, at the start.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figure {
    pub metric: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial: Option<f64>,
    pub value: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StageSummary {
    pub stage: String,
    pub uses: String,
    pub kind: String,
    /// Wall time of the stage, in this run or (for a stage finished before a resume) the
    /// run that finished it.
    pub seconds: Option<f64>,
    pub figures: Vec<Figure>,
    /// Metrics listed under `summary:` that the stage did not report.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct RunSummary {
    pub run: String,
    pub stages: Vec<StageSummary>,
    pub seconds: f64,
}

/// `P/initial_X` for `P/X` (`initial_X` for `X`).
fn initial_key(metric: &str) -> String {
    match metric.rsplit_once('/') {
        Some((prefix, name)) => format!("{prefix}/initial_{name}"),
        None => format!("initial_{metric}"),
    }
}

impl StageSummary {
    /// The figures of a stage from its final `metrics`, as `listed` (or by default).
    pub fn new(
        stage: &str,
        uses: &str,
        kind: &str,
        seconds: Option<f64>,
        metrics: &BTreeMap<String, f64>,
        listed: &[String],
    ) -> Self {
        let figure = |metric: &str| {
            metrics.get(metric).map(|&value| Figure {
                metric: metric.to_string(),
                initial: metrics.get(&initial_key(metric)).copied(),
                value,
            })
        };
        let (figures, missing) = if listed.is_empty() {
            let mut names: Vec<&str> = metrics
                .keys()
                .map(String::as_str)
                .filter(|k| !k.contains("initial_") && metrics.contains_key(&initial_key(k)))
                .filter(|k| k.starts_with("eval/"))
                .collect();
            if names.is_empty() && kind == "evaluator" {
                names = metrics.keys().map(String::as_str).filter(|k| k.ends_with("accuracy")).collect();
            }
            (names.into_iter().filter_map(figure).collect(), Vec::new())
        } else {
            let missing = listed.iter().filter(|m| !metrics.contains_key(*m)).cloned().collect();
            (listed.iter().filter_map(|m| figure(m)).collect(), missing)
        };
        Self { stage: stage.into(), uses: uses.into(), kind: kind.into(), seconds, figures, missing }
    }
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.4}")
    }
}

fn figure_text(f: &Figure) -> String {
    match f.initial {
        Some(initial) => format!("{} {} → {}", f.metric, number(initial), number(f.value)),
        None => format!("{} {}", f.metric, number(f.value)),
    }
}

fn duration(seconds: Option<f64>) -> String {
    match seconds {
        None => "-".into(),
        Some(s) if s < 60.0 => format!("{s:.1}s"),
        Some(s) => {
            let whole = s.round() as u64;
            format!("{}m {:02}s", whole / 60, whole % 60)
        }
    }
}

impl RunSummary {
    /// The table as plain text, one line per figure.
    pub fn table(&self) -> String {
        let name_width = self.stages.iter().map(|s| s.stage.len()).max().unwrap_or(0).max(5);
        let uses_width = self.stages.iter().map(|s| s.uses.len()).max().unwrap_or(0).max(4);
        let mut out = format!("run {} finished in {}:\n", self.run, duration(Some(self.seconds)));
        out += &format!("  {:<name_width$}  {:<uses_width$}  {:>8}  key figures\n", "stage", "uses", "time");
        for s in &self.stages {
            let mut lines: Vec<String> = s.figures.iter().map(figure_text).collect();
            lines.extend(s.missing.iter().map(|m| format!("{m} (not reported)")));
            if lines.is_empty() {
                lines.push("-".into());
            }
            for (i, line) in lines.iter().enumerate() {
                let (name, uses, time) = match i {
                    0 => (s.stage.as_str(), s.uses.as_str(), duration(s.seconds)),
                    _ => ("", "", String::new()),
                };
                out += &format!("  {name:<name_width$}  {uses:<uses_width$}  {time:>8}  {line}\n");
            }
        }
        out
    }

    /// The table as markdown, for TensorBoard's text tab.
    fn markdown(&self) -> String {
        let mut out = String::from("| stage | uses | time | key figures |\n|---|---|---|---|\n");
        for s in &self.stages {
            let figures: Vec<String> = s.figures.iter().map(figure_text).collect();
            out += &format!("| {} | {} | {} | {} |\n", s.stage, s.uses, duration(s.seconds), figures.join("<br>"));
        }
        out
    }

    /// Writes `summary.json` and the TensorBoard text into `output_dir`.
    pub fn write(&self, output_dir: &Path) -> Result<(), Failure> {
        let json = serde_json::to_string_pretty(self).unwrap_or_default() + "\n";
        write_file_atomically(&output_dir.join("summary.json"), json.as_bytes())
            .map_err(|e| Failure::User(e.to_string()))?;
        let tensorboard =
            TbWriter::create(&output_dir.join("tb").join("summary")).map_err(|e| Failure::User(e.to_string()))?;
        tensorboard.restart_at(0);
        tensorboard.text("summary", 0, &self.markdown());
        tensorboard.close().map_err(|e| Failure::Internal(format!("TensorBoard summary: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs.iter().map(|&(k, v)| (k.to_string(), v)).collect()
    }

    #[test]
    fn default_figures_pair_initial_and_final() {
        let m = metrics(&[
            ("eval/loss", 0.5),
            ("eval/initial_loss", 6.2),
            ("eval/format_compliance", 1.0),
            ("eval/initial_format_compliance", 0.0),
            ("train/loss", 0.4),
            ("time/seconds", 3.0),
        ]);
        let s = StageSummary::new("sft", "sft.sft", "stage", Some(3.0), &m, &[]);
        let names: Vec<&str> = s.figures.iter().map(|f| f.metric.as_str()).collect();
        assert_eq!(names, ["eval/format_compliance", "eval/loss"]);
        assert_eq!(s.figures[0].initial, Some(0.0));
        assert_eq!(s.figures[1].value, 0.5);
    }

    #[test]
    fn evaluators_show_their_accuracies_and_listed_metrics_come_in_order() {
        let m = metrics(&[("direct/strict/accuracy", 0.1), ("direct/strict/ci95_low", 0.05), ("time/seconds", 2.0)]);
        let s = StageSummary::new("cot", "cot.gsm8k", "evaluator", None, &m, &[]);
        assert_eq!(s.figures, [Figure { metric: "direct/strict/accuracy".into(), initial: None, value: 0.1 }]);
        let listed = ["time/seconds".to_string(), "nope".to_string(), "direct/strict/accuracy".to_string()];
        let s = StageSummary::new("cot", "cot.gsm8k", "evaluator", None, &m, &listed);
        let names: Vec<&str> = s.figures.iter().map(|f| f.metric.as_str()).collect();
        assert_eq!(names, ["time/seconds", "direct/strict/accuracy"]);
        assert_eq!(s.missing, ["nope"]);
        let run = RunSummary { run: "r".into(), stages: vec![s], seconds: 75.0 };
        let table = run.table();
        assert!(table.starts_with("run r finished in 1m 15s:\n"), "{table}");
        assert!(table.contains("nope (not reported)"), "{table}");
    }
}
