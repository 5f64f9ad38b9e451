//! How `plumb bench` prints its figures: for a person, a table with aligned columns and
//! units, printed when the measuring is done; with `--json`, one JSON object per line as
//! each figure is measured (what scripts and `bench/*.py` compare against).
use serde_json::Value;

/// How a column's values are written.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unit {
    /// As it is: a string, `yes`/`no` for a boolean, a number as JSON writes it.
    Text,
    /// A whole number.
    Integer,
    /// A number with this many decimals.
    Decimals(usize),
    /// A fraction as a percentage with one decimal: 0.425 → `42.5%`.
    Percent,
    /// A byte count in decimal units: `1.71 GB`, `512.0 kB`.
    Bytes,
}

/// One column: the JSON key it shows, its header (with the unit, where the cells do not
/// carry it) and how its values are written.
#[derive(Clone, Copy, Debug)]
pub struct Column {
    pub key: &'static str,
    pub header: &'static str,
    pub unit: Unit,
}

pub const fn column(key: &'static str, header: &'static str, unit: Unit) -> Column {
    Column { key, header, unit }
}

/// The figures of one `plumb bench` run.
pub struct Report {
    json: bool,
    columns: &'static [Column],
    notes: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Report {
    pub fn new(json: bool, columns: &'static [Column]) -> Self {
        Self { json, columns, notes: Vec::new(), rows: Vec::new() }
    }

    /// A line of figures: printed now as JSON (`--json`), else kept as a row of the table.
    pub fn add(&mut self, line: &Value) {
        if self.json {
            println!("{line}");
        } else {
            self.rows.push(self.columns.iter().map(|c| cell(line.get(c.key), c.unit)).collect());
        }
    }

    /// A line about the whole run (the shape measured): printed now as JSON (`--json`),
    /// else as `key: value, ...` above the table.
    pub fn note(&mut self, line: &Value) {
        if self.json {
            println!("{line}");
        } else if let Some(object) = line.as_object() {
            let pairs: Vec<String> =
                object.iter().map(|(k, v)| format!("{k}: {}", cell(Some(v), Unit::Text))).collect();
            self.notes.push(pairs.join(", "));
        }
    }

    /// The table (nothing with `--json`, whose lines are already out): a header, then a
    /// row per line; text columns aligned left, numbers right, two spaces between.
    pub fn table(&self) -> String {
        if self.json {
            return String::new();
        }
        let widths: Vec<usize> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                self.rows.iter().map(|r| r[i].chars().count()).chain([c.header.chars().count()]).max().unwrap_or(0)
            })
            .collect();
        let line = |cells: Vec<&str>| {
            let padded: Vec<String> = cells
                .iter()
                .zip(self.columns.iter().zip(&widths))
                .map(|(text, (column, &width))| match column.unit {
                    Unit::Text => format!("{text:<width$}"),
                    _ => format!("{text:>width$}"),
                })
                .collect();
            padded.join("  ").trim_end().to_owned() + "\n"
        };
        let mut out: String = self.notes.iter().map(|n| format!("{n}\n")).collect();
        if !self.notes.is_empty() {
            out.push('\n');
        }
        out += &line(self.columns.iter().map(|c| c.header).collect());
        for row in &self.rows {
            out += &line(row.iter().map(String::as_str).collect());
        }
        out
    }

    /// Prints the table (nothing more with `--json`).
    pub fn print(&self) {
        print!("{}", self.table());
    }
}

/// One value as `unit` writes it; `-` where there is none (`null`, or not measured).
fn cell(value: Option<&Value>, unit: Unit) -> String {
    let Some(value) = value.filter(|v| !v.is_null()) else { return "-".into() };
    let number = value.as_f64();
    match (unit, number) {
        (Unit::Text, _) => match value {
            Value::String(s) => s.clone(),
            Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
            other => other.to_string(),
        },
        (Unit::Integer, Some(n)) => format!("{}", n.round() as i64),
        (Unit::Decimals(d), Some(n)) => format!("{n:.d$}"),
        (Unit::Percent, Some(n)) => format!("{:.1}%", n * 100.0),
        (Unit::Bytes, Some(n)) => bytes(n),
        (_, None) => value.to_string(),
    }
}

/// Bytes in decimal units with two decimals from kB up.
fn bytes(n: f64) -> String {
    match n {
        n if n >= 1e9 => format!("{:.2} GB", n / 1e9),
        n if n >= 1e6 => format!("{:.2} MB", n / 1e6),
        n if n >= 1e3 => format!("{:.2} kB", n / 1e3),
        n => format!("{n:.0} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const COLUMNS: &[Column] = &[
        column("model", "model", Unit::Text),
        column("batch", "batch", Unit::Integer),
        column("tokens_per_s", "tokens/s", Unit::Decimals(1)),
        column("ttft_ms", "TTFT (ms)", Unit::Decimals(2)),
        column("share", "share", Unit::Percent),
        column("rss", "peak RSS", Unit::Bytes),
        column("compact", "compact", Unit::Text),
    ];

    #[test]
    fn the_table_aligns_text_left_and_numbers_right_with_units() {
        let mut report = Report::new(false, COLUMNS);
        report.note(&json!({"case": "shape", "layers": 4}));
        report.add(&json!({"model": "llama-125m", "batch": 1, "tokens_per_s": 123.456, "ttft_ms": 5.0,
                           "share": 0.4251, "rss": 2.07e9, "compact": true}));
        report.add(&json!({"model": "q", "batch": 64, "tokens_per_s": 10234.0, "ttft_ms": null,
                           "share": 1.0, "rss": 512_000, "compact": false}));
        assert_eq!(
            report.table(),
            "case: shape, layers: 4\n\
             \n\
             model       batch  tokens/s  TTFT (ms)   share   peak RSS  compact\n\
             llama-125m      1     123.5       5.00   42.5%    2.07 GB  yes\n\
             q              64   10234.0          -  100.0%  512.00 kB  no\n"
        );
    }

    #[test]
    fn json_lines_are_printed_as_they_come_and_no_table_follows() {
        let mut report = Report::new(true, COLUMNS);
        report.add(&json!({"model": "q", "batch": 1}));
        assert_eq!(report.table(), "");
        assert!(report.rows.is_empty());
    }

    #[test]
    fn missing_values_are_a_dash_and_bytes_take_decimal_units() {
        assert_eq!(cell(None, Unit::Decimals(2)), "-");
        assert_eq!(cell(Some(&json!(null)), Unit::Text), "-");
        assert_eq!(cell(Some(&json!("cpu")), Unit::Text), "cpu");
        assert_eq!(cell(Some(&json!(7.6)), Unit::Integer), "8");
        assert_eq!(bytes(1_710_000_000.0), "1.71 GB");
        assert_eq!(bytes(999.0), "999 B");
    }
}
