//! `plumb data filter`: curate a text corpus (quality heuristics, exact and near
//! deduplication) and report what each filter removed.
use std::path::PathBuf;

use plumb_core::checkpoint::write_file_atomically;
use plumb_core::data::curation::{count_words, curate, CurationConfig, CurationReport};
use plumb_core::data::read_documents;
use plumb_core::recipe::parse_section;

use crate::Failure;

#[derive(clap::Subcommand)]
pub enum Data {
    /// Filter corpora (documents separated by blank lines) into one curated corpus.
    Filter(FilterArgs),
}

#[derive(clap::Args)]
pub struct FilterArgs {
    /// Input corpora, read in order.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Where the surviving documents go.
    #[arg(long, short)]
    pub output: PathBuf,
    /// A YAML file with the thresholds (the `curation:` section of a pretrain stage);
    /// default: every filter on with its default thresholds.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

pub fn run(command: &Data) -> Result<(), Failure> {
    let Data::Filter(args) = command;
    let user = |e: plumb_core::Error| Failure::User(e.to_string());
    let config: CurationConfig = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| Failure::User(format!("{}: {e}", path.display())))?;
            parse_section(&text).map_err(|e| Failure::User(format!("{}: {e}", path.display())))?
        }
        None => CurationConfig::default(),
    };
    config.validate().map_err(user)?;
    let mut documents = Vec::new();
    for input in &args.inputs {
        documents.extend(read_documents(input).map_err(user)?);
    }
    let (kept, report) = curate(documents, &config, &count_words).map_err(user)?;
    check_outcome(&report)?;
    let mut text = kept.join("\n\n");
    text.push('\n');
    write_file_atomically(&args.output, text.as_bytes()).map_err(user)?;
    if let Some(path) = &args.report {
        let json = serde_json::to_string_pretty(&report).map_err(|e| Failure::Internal(e.to_string()))?;
        write_file_atomically(path, json.as_bytes()).map_err(user)?;
    }
    print!("{report}");
    println!("wrote {} documents to {}", kept.len(), args.output.display());
    Ok(())
}

/// A filter that removes most of the corpus is likely a threshold set for other text: warn,
/// naming it. Nothing left at all is an error, and no output is written.
fn check_outcome(report: &CurationReport) -> Result<(), Failure> {
    let input = report.input.documents;
    let share = |n: u64| 100.0 * n as f64 / input.max(1) as f64;
    for row in &report.filters {
        if 2 * row.removed.documents > input {
            tracing::warn!(
                "filter {} removed {} of {input} documents ({:.0}%); check its threshold (--config)",
                row.filter,
                row.removed.documents,
                share(row.removed.documents)
            );
        }
    }
    if report.kept.documents == 0 && input > 0 {
        let mut removers: Vec<_> = report.filters.iter().filter(|r| r.removed.documents > 0).collect();
        removers.sort_by_key(|r| std::cmp::Reverse(r.removed.documents));
        let by: Vec<String> = removers.iter().map(|r| format!("{} {}", r.filter, r.removed.documents)).collect();
        return Err(Failure::User(format!(
            "every one of the {input} documents was removed ({}); nothing written. Loosen those filters' \
             thresholds in a --config file (the `curation:` section of a pretrain stage)",
            by.join(", ")
        )));
    }
    Ok(())
}
