//! The progress display of long work: a bar with step, loss, tokens/s and ETA on a
//! terminal, plain lines (about every 10 s, and at the end) when stdout is not one.
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use plumb_core::plugin::abi::ProgressUpdate;

const PLAIN_EVERY: Duration = Duration::from_secs(10);

pub struct Progress {
    label: String,
    bar: Option<ProgressBar>,
    started: Instant,
    last_line: Option<Instant>,
    /// The latest update not yet printed as a plain line.
    pending: Option<ProgressUpdate>,
}

impl Progress {
    /// A bar when stdout is a terminal, plain lines otherwise.
    pub fn new(label: &str) -> Self {
        Self::with_terminal(label, std::io::stdout().is_terminal())
    }

    pub fn with_terminal(label: &str, terminal: bool) -> Self {
        let bar = terminal.then(|| {
            let bar = ProgressBar::new(0);
            let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(label.to_owned());
            bar
        });
        Self { label: label.to_owned(), bar, started: Instant::now(), last_line: None, pending: None }
    }

    pub fn update(&mut self, update: &ProgressUpdate) {
        match &self.bar {
            Some(bar) => {
                bar.set_length(update.total);
                bar.set_position(update.position);
                bar.set_message(figures(update));
            }
            None => {
                let due = self.last_line.is_none_or(|t| t.elapsed() >= PLAIN_EVERY);
                if due || (update.total > 0 && update.position >= update.total) {
                    self.print_line(update);
                } else {
                    self.pending = Some(*update);
                }
            }
        }
    }

    fn print_line(&mut self, update: &ProgressUpdate) {
        self.last_line = Some(Instant::now());
        self.pending = None;
        let eta = eta(self.started.elapsed(), update).map(|d| format!(" eta {}", human(d))).unwrap_or_default();
        let of = if update.total > 0 { format!("/{}", update.total) } else { String::new() };
        println!("[{}] step {}{of} {}{eta}", self.label, update.position, figures(update));
    }

    /// Runs `f` (which prints) without tearing the bar.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.bar {
            Some(bar) => bar.suspend(f),
            None => f(),
        }
    }

    /// Ends the display, printing the last figures in plain mode.
    pub fn finish(&mut self) {
        match self.bar.take() {
            Some(bar) => bar.finish(),
            None => {
                if let Some(last) = self.pending.take() {
                    self.print_line(&last);
                }
            }
        }
    }
}

fn figures(update: &ProgressUpdate) -> String {
    let mut parts = Vec::new();
    if update.loss.is_finite() {
        parts.push(format!("loss {:.4}", update.loss));
    }
    if update.tokens_per_second.is_finite() {
        parts.push(format!("{:.0} tok/s", update.tokens_per_second));
    }
    if update.tokens_seen.is_finite() {
        parts.push(format!("{} tokens", count(update.tokens_seen)));
    }
    parts.join(" ")
}

/// 950, 12.3k, 4.56M, 1.20B.
fn count(n: f64) -> String {
    match n {
        n if n >= 1e9 => format!("{:.2}B", n / 1e9),
        n if n >= 1e6 => format!("{:.2}M", n / 1e6),
        n if n >= 1e3 => format!("{:.1}k", n / 1e3),
        n => format!("{n:.0}"),
    }
}

fn eta(elapsed: Duration, update: &ProgressUpdate) -> Option<Duration> {
    (update.position > 0 && update.total > update.position)
        .then(|| elapsed.mul_f64((update.total - update.position) as f64 / update.position as f64))
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_scales_remaining_work_by_elapsed_time() {
        let update = ProgressUpdate {
            position: 25,
            total: 100,
            loss: f64::NAN,
            tokens_per_second: f64::NAN,
            tokens_seen: f64::NAN,
        };
        assert_eq!(eta(Duration::from_secs(10), &update), Some(Duration::from_secs(30)));
        assert_eq!(human(Duration::from_secs(3725)), "1h02m");
        assert_eq!(human(Duration::from_secs(65)), "1m05s");
    }

    #[test]
    fn figures_leave_out_missing_values() {
        let update =
            ProgressUpdate { position: 1, total: 2, loss: 2.5, tokens_per_second: f64::NAN, tokens_seen: 1.5e6 };
        assert_eq!(figures(&update), "loss 2.5000 1.50M tokens");
    }
}
