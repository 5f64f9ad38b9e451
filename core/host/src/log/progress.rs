//! The progress display of long work: a bar with step, loss, tokens/s and ETA on a
//! terminal, plain lines (about every 10 s, and at the end) when stdout is not one.
//!
//! The bar appears with the stage's first update (no empty `0/0` bar while it sets up),
//! stays where the work stopped (a run stopped with Ctrl-C shows the step it reached),
//! and its ETA comes from steps measured in this process: none until [`ETA_AFTER`]
//! steps have been timed, so neither set-up nor the steps of a resumed run's earlier
//! process skew it.
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use plumb_core::plugin::abi::ProgressUpdate;

const PLAIN_EVERY: Duration = Duration::from_secs(10);
/// Steps timed before an ETA is shown.
pub const ETA_AFTER: u64 = 3;

pub struct Progress {
    label: String,
    terminal: bool,
    bar: Option<ProgressBar>,
    /// When the first update came, and its position: the ETA's baseline.
    first: Option<(Instant, u64)>,
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
        Self { label: label.to_owned(), terminal, bar: None, first: None, last_line: None, pending: None }
    }

    fn new_bar(&self, update: &ProgressUpdate) -> ProgressBar {
        bar(&self.label, update.total)
    }

    pub fn update(&mut self, update: &ProgressUpdate) {
        let (started, first_position) = *self.first.get_or_insert((Instant::now(), update.position));
        if self.terminal && self.bar.is_none() {
            self.bar = Some(self.new_bar(update));
        }
        match &self.bar {
            Some(bar) => {
                bar.set_length(update.total);
                bar.set_position(update.position);
                let eta = eta(started.elapsed(), first_position, update).map(|d| format!(" eta {}", human(d)));
                bar.set_message(figures(update) + &eta.unwrap_or_default());
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
        let (started, first_position) = self.first.unwrap_or((Instant::now(), update.position));
        let eta =
            eta(started.elapsed(), first_position, update).map(|d| format!(" eta {}", human(d))).unwrap_or_default();
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

    /// Ends the display where the work got to (the bar is left, not filled up), printing
    /// the last figures in plain mode.
    pub fn finish(&mut self) {
        match self.bar.take() {
            Some(bar) => bar.abandon(),
            None => {
                if let Some(last) = self.pending.take() {
                    self.print_line(&last);
                }
            }
        }
    }
}

/// A bar on stderr in plumb's one style: `label [=====>    ] 3/10 message`.
fn bar(label: &str, total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(label.to_owned());
    bar
}

/// Progress of work a command does itself (`plumb bench`): the stages' bar on stderr, only
/// when stderr is a terminal, so stdout carries the results alone and a log or pipe gets
/// nothing. Cleared when done.
pub struct Counter {
    bar: Option<ProgressBar>,
}

impl Counter {
    /// `total` steps of work called `label`.
    pub fn new(label: &str, total: u64) -> Self {
        Self::with_terminal(label, total, std::io::stderr().is_terminal())
    }

    pub fn with_terminal(label: &str, total: u64, terminal: bool) -> Self {
        Self { bar: terminal.then(|| bar(label, total)) }
    }

    /// Says what runs now (`batch 64, repeat 2/3`).
    pub fn doing(&self, what: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(what.to_owned());
        }
    }

    /// One step done.
    pub fn step(&self) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }

    /// Runs `f` (which prints) without tearing the bar.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.bar {
            Some(bar) => bar.suspend(f),
            None => f(),
        }
    }

    /// Steps done so far.
    pub fn position(&self) -> Option<u64> {
        self.bar.as_ref().map(ProgressBar::position)
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
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

/// The time the remaining steps take at the pace of the steps timed since the first
/// update (at `first`, `elapsed` ago); none before [`ETA_AFTER`] of them.
fn eta(elapsed: Duration, first: u64, update: &ProgressUpdate) -> Option<Duration> {
    let timed = update.position.saturating_sub(first);
    (timed >= ETA_AFTER && update.total > update.position)
        .then(|| elapsed.mul_f64((update.total - update.position) as f64 / timed as f64))
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
        assert_eq!(eta(Duration::from_secs(10), 0, &update), Some(Duration::from_secs(30)));
        // A resumed run's earlier steps are not this process's pace.
        assert_eq!(eta(Duration::from_secs(10), 20, &update), Some(Duration::from_secs(150)));
        // Too few timed steps for an estimate.
        assert_eq!(eta(Duration::from_secs(10), 23, &update), None);
        assert_eq!(human(Duration::from_secs(3725)), "1h02m");
        assert_eq!(human(Duration::from_secs(65)), "1m05s");
    }

    fn at(position: u64) -> ProgressUpdate {
        ProgressUpdate { position, total: 10, loss: 1.0, tokens_per_second: f64::NAN, tokens_seen: f64::NAN }
    }

    #[test]
    fn the_bar_appears_with_the_first_update_and_stays_where_the_work_stopped() {
        let mut progress = Progress::with_terminal("sft", true);
        assert!(progress.bar.is_none(), "no bar before the stage reports anything");
        progress.update(&at(3));
        let bar = progress.bar.clone().expect("a bar once there is progress");
        assert_eq!((bar.position(), bar.length()), (3, Some(10)));
        progress.finish(); // e.g. stopped with Ctrl-C at step 3 of 10
        assert_eq!(bar.position(), 3, "finishing must not fill the bar up");
        assert!(bar.is_finished());
    }

    #[test]
    fn a_counter_draws_only_on_a_terminal_and_counts_steps() {
        let counter = Counter::with_terminal("bench", 3, true);
        counter.doing("batch 1");
        counter.step();
        counter.step();
        assert_eq!(counter.position(), Some(2));
        let quiet = Counter::with_terminal("bench", 3, false);
        quiet.step();
        assert_eq!(quiet.position(), None, "no bar when stderr is not a terminal");
    }

    #[test]
    fn figures_leave_out_missing_values() {
        let update =
            ProgressUpdate { position: 1, total: 2, loss: 2.5, tokens_per_second: f64::NAN, tokens_seen: 1.5e6 };
        assert_eq!(figures(&update), "loss 2.5000 1.50M tokens");
    }
}
