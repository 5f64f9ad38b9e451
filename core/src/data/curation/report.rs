//! What curation removed, filter by filter: a table for the terminal, JSON through serde,
//! markdown for TensorBoard's text tab, and scalars for its charts.
use std::fmt;

use serde::Serialize;

use super::Rejection;

/// A number of documents and their tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub documents: u64,
    pub tokens: u64,
}

impl Counts {
    /// Counts one more document of `tokens` tokens.
    pub(super) fn add(&mut self, tokens: usize) {
        self.documents += 1;
        self.tokens += tokens as u64;
    }

    fn minus(self, other: Counts) -> Counts {
        Counts {
            documents: self.documents.saturating_sub(other.documents),
            tokens: self.tokens.saturating_sub(other.tokens),
        }
    }
}

/// One filter's row: what it removed, and what was left after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FilterStats {
    /// `quality.<rule>` (the config key of its threshold), `exact_dedup` or `near_dedup`.
    pub filter: String,
    pub removed: Counts,
    pub remaining: Counts,
}

impl FilterStats {
    pub(super) fn new(filter: String) -> Self {
        Self { filter, removed: Counts::default(), remaining: Counts::default() }
    }
}

/// The outcome of curation. Every enabled filter has a row, in the order filters run, even
/// when it removed nothing; each removed document counts in exactly one row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CurationReport {
    pub input: Counts,
    pub filters: Vec<FilterStats>,
    pub kept: Counts,
    /// Every removed document and why, in input order. Filled by
    /// [`curate`](super::curate); a [`Curator`](super::Curator) hands each reason back from
    /// `check` and leaves this empty. Not in the JSON (it can be as long as the corpus):
    /// serialise it on its own, e.g. as JSON lines.
    #[serde(skip)]
    pub rejections: Vec<Rejection>,
}

impl CurationReport {
    /// Fills in `remaining` and `kept` from the removals.
    pub(super) fn new(input: Counts, mut filters: Vec<FilterStats>) -> Self {
        let mut left = input;
        for row in &mut filters {
            left = left.minus(row.removed);
            row.remaining = left;
        }
        Self { input, filters, kept: left, rejections: Vec::new() }
    }

    /// The row of `filter` (`"quality.min_words"`, `"exact_dedup"`, `"near_dedup"`).
    pub fn filter(&self, filter: &str) -> Option<&FilterStats> {
        self.filters.iter().find(|row| row.filter == filter)
    }

    /// The report as a markdown table, for TensorBoard's text tab.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        for (i, row) in self.rows().iter().enumerate() {
            let cells: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(col, cell)| if col == 0 && i > 0 { format!("`{cell}`") } else { cell.clone() })
                .collect();
            out.push_str(&format!("| {} |\n", cells.join(" | ")));
            if i == 0 {
                out.push_str("|:--|--:|--:|--:|--:|\n");
            }
        }
        out
    }

    /// Scalars for TensorBoard: `curation/input/documents`, `curation/<filter>/documents_removed`,
    /// `curation/<filter>/tokens_removed`, `curation/kept/documents`, `curation/kept/tokens`.
    pub fn scalars(&self) -> Vec<(String, f64)> {
        let mut out = vec![
            ("curation/input/documents".to_owned(), self.input.documents as f64),
            ("curation/input/tokens".to_owned(), self.input.tokens as f64),
        ];
        for row in &self.filters {
            out.push((format!("curation/{}/documents_removed", row.filter), row.removed.documents as f64));
            out.push((format!("curation/{}/tokens_removed", row.filter), row.removed.tokens as f64));
        }
        out.push(("curation/kept/documents".to_owned(), self.kept.documents as f64));
        out.push(("curation/kept/tokens".to_owned(), self.kept.tokens as f64));
        out
    }

    /// Header, input, one row per filter, kept. Percentages are of the input.
    fn rows(&self) -> Vec<[String; 5]> {
        let percent = |part: u64, whole: u64| {
            if whole == 0 {
                format!("{part}")
            } else {
                format!("{part} ({:.1}%)", 100.0 * part as f64 / whole as f64)
            }
        };
        let mut rows = vec![
            ["filter", "documents removed", "tokens removed", "documents left", "tokens left"].map(String::from),
            [
                "input".into(),
                String::new(),
                String::new(),
                self.input.documents.to_string(),
                self.input.tokens.to_string(),
            ],
        ];
        for row in &self.filters {
            rows.push([
                row.filter.clone(),
                percent(row.removed.documents, self.input.documents),
                percent(row.removed.tokens, self.input.tokens),
                row.remaining.documents.to_string(),
                row.remaining.tokens.to_string(),
            ]);
        }
        rows.push([
            "kept".into(),
            String::new(),
            String::new(),
            percent(self.kept.documents, self.input.documents),
            percent(self.kept.tokens, self.input.tokens),
        ]);
        rows
    }
}

/// A plain-text table, columns aligned (filter names left, numbers right).
impl fmt::Display for CurationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows = self.rows();
        let mut widths = [0usize; 5];
        for row in &rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        for row in &rows {
            let mut line = format!("{:<w$}", row[0], w = widths[0]);
            for (cell, &width) in row.iter().zip(&widths).skip(1) {
                line.push_str(&format!("  {cell:>width$}"));
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> CurationReport {
        let mut rows = vec![FilterStats::new("quality.min_words".into()), FilterStats::new("exact_dedup".into())];
        rows[0].removed = Counts { documents: 1, tokens: 10 };
        rows[1].removed = Counts { documents: 2, tokens: 40 };
        CurationReport::new(Counts { documents: 8, tokens: 200 }, rows)
    }

    #[test]
    fn remaining_and_kept_follow_the_removals() {
        let r = report();
        assert_eq!(r.filters[0].remaining, Counts { documents: 7, tokens: 190 });
        assert_eq!(r.filters[1].remaining, Counts { documents: 5, tokens: 150 });
        assert_eq!(r.kept, Counts { documents: 5, tokens: 150 });
        assert_eq!(r.filter("exact_dedup").map(|f| f.removed.documents), Some(2));
    }

    #[test]
    fn renders_as_table_markdown_and_json() {
        let r = report();
        let table = r.to_string();
        assert_eq!(
            table,
            "\
filter             documents removed  tokens removed  documents left  tokens left
input                                                              8          200
quality.min_words          1 (12.5%)       10 (5.0%)               7          190
exact_dedup                2 (25.0%)      40 (20.0%)               5          150
kept                                                       5 (62.5%)  150 (75.0%)
"
        );
        let md = r.to_markdown();
        assert!(md.starts_with("| filter | documents removed | tokens removed | documents left | tokens left |\n|:--|"));
        assert!(md.contains("| `exact_dedup` | 2 (25.0%) | 40 (20.0%) | 5 | 150 |\n"), "{md}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["kept"], serde_json::json!({"documents": 5, "tokens": 150}));
        assert_eq!(json["filters"][0]["filter"], "quality.min_words");
        assert!(json.get("rejections").is_none());
        let scalars = r.scalars();
        assert!(scalars.contains(&("curation/exact_dedup/tokens_removed".to_owned(), 40.0)));
    }
}
