//! Which rank stopped: each rank of a group beats a counter of its own in the store (one
//! `add` a [`BEAT`]) from a thread of its own, and reads every rank's counters in one round
//! trip. When a collective fails, the ranks whose counters stopped moving are the ones that
//! died (or hang), and the error names them, however the run was launched: the survivors
//! need no launcher to tell them. A rank busy computing keeps beating, since the beat does
//! not run on the thread that computes.
//!
//! The first survivor to name a rank also writes it to the store (`stopped/{rank}`) and
//! waits two beats, so survivors that fail later (when it exits, and perhaps takes the
//! store with it) name the same rank.
//!
//! What it costs: two small store requests a beat per rank.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{DistError, Store};

/// How often each rank beats and reads the others.
const BEAT: Duration = Duration::from_millis(250);
/// A rank whose counter has not moved for this long, while the store still answered, has stopped.
const SILENCE: Duration = Duration::from_millis(1000);

/// What the beating thread has seen.
struct Seen {
    /// Each rank's last counter, and when it last moved.
    counts: Vec<i64>,
    moved: Vec<Instant>,
    /// The ranks another survivor named as stopped.
    named: Vec<bool>,
    /// The last time the store answered, and why it stopped answering.
    answered: Instant,
    store_error: Option<String>,
}

struct Shared {
    stop: AtomicBool,
    seen: Mutex<Seen>,
    store: Mutex<Store>,
    prefix: String,
}

pub(super) struct Heartbeat {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    rank: usize,
    /// Who serves the store ("rank 0", or torchrun's agent), for the error when it is gone.
    store_owner: &'static str,
}

impl Heartbeat {
    /// Beats this rank's counter (`{prefix}alive/{rank}`) once and makes its `stopped` key,
    /// so both exist before the group forms; call [`watch`](Self::watch) once every rank has
    /// (after the group's rendezvous).
    pub(super) fn first_beat(store: &Store, prefix: &str, rank: usize) -> Result<(), DistError> {
        store.add(&alive(prefix, rank), 1)?;
        store.add(&stopped(prefix, rank), 0).map(|_| ())
    }

    /// Starts the thread that beats for `rank` and reads all `world` counters over `store`
    /// (a connection of its own), served by `store_owner`.
    pub(super) fn watch(store: Store, prefix: &str, rank: usize, world: usize, store_owner: &'static str) -> Self {
        let now = Instant::now();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            seen: Mutex::new(Seen {
                counts: vec![0; world],
                moved: vec![now; world],
                named: vec![false; world],
                answered: now,
                store_error: None,
            }),
            store: Mutex::new(store),
            prefix: prefix.to_owned(),
        });
        let beating = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("plumb-heartbeat-{rank}"))
            .spawn(move || beat(&beating, rank, world))
            .ok();
        Self { shared, thread, rank, store_owner }
    }

    /// Why a collective failed, as far as the heartbeats tell: the ranks that stopped beating
    /// ("; rank 2 stopped answering (no heartbeat for 2.4 s)"), or that the store stopped
    /// answering; empty when every rank still beats (a rank that hangs but lives, or a
    /// failure of this rank's own). Waits up to [`SILENCE`] and two beats for a rank that
    /// died just now to fall silent.
    pub(super) fn diagnosis(&self) -> String {
        let deadline = Instant::now() + SILENCE + 2 * BEAT;
        loop {
            let (silent, store_error) = self.silent();
            if !silent.is_empty() || store_error.is_some() || Instant::now() >= deadline {
                if store_error.is_none() && !silent.is_empty() {
                    self.publish(&silent);
                }
                return describe(&silent, store_error.as_deref(), self.store_owner);
            }
            std::thread::sleep(BEAT / 2);
        }
    }

    /// Writes the silent ranks to the store and gives the others two beats to read them.
    fn publish(&self, silent: &[(usize, Duration)]) {
        let store = self.shared.store.lock().unwrap_or_else(|e| e.into_inner());
        for (rank, _) in silent {
            let _ = store.add(&stopped(&self.shared.prefix, *rank), 1);
        }
        drop(store);
        std::thread::sleep(2 * BEAT);
    }

    /// The other ranks silent for [`SILENCE`] before the store's last answer (or named by
    /// another survivor), with how long, and the store's error if it stopped answering.
    fn silent(&self) -> (Vec<(usize, Duration)>, Option<String>) {
        let seen = self.shared.seen.lock().unwrap_or_else(|e| e.into_inner());
        let silent = seen
            .moved
            .iter()
            .enumerate()
            .filter(|&(r, _)| r != self.rank)
            .filter_map(|(r, &moved)| {
                let quiet = seen.answered.saturating_duration_since(moved);
                (quiet >= SILENCE || seen.named[r]).then_some((r, quiet))
            })
            .collect();
        (silent, seen.store_error.clone())
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

fn alive(prefix: &str, rank: usize) -> String {
    format!("{prefix}alive/{rank}")
}

fn stopped(prefix: &str, rank: usize) -> String {
    format!("{prefix}stopped/{rank}")
}

/// The thread: beat, read every rank's counters, note what moved; until stopped, or until
/// the store stops answering.
fn beat(shared: &Shared, rank: usize, world: usize) {
    let keys: Vec<String> =
        (0..world).map(|r| alive(&shared.prefix, r)).chain((0..world).map(|r| stopped(&shared.prefix, r))).collect();
    while !shared.stop.load(Ordering::SeqCst) {
        let read = {
            let store = shared.store.lock().unwrap_or_else(|e| e.into_inner());
            store.add(&keys[rank], 1).and_then(|_| store.counters(&keys))
        };
        let now = Instant::now();
        let mut seen = shared.seen.lock().unwrap_or_else(|e| e.into_inner());
        match read {
            Ok(counts) => {
                let (alive, named) = counts.split_at(world);
                for r in 0..world {
                    if alive[r] != seen.counts[r] {
                        (seen.counts[r], seen.moved[r]) = (alive[r], now);
                    }
                    seen.named[r] |= named[r] > 0;
                }
                seen.answered = now;
            }
            Err(e) => {
                // The store is gone (its server stopped): nothing more to read.
                seen.store_error = Some(e.to_string());
                return;
            }
        }
        drop(seen);
        std::thread::park_timeout(BEAT);
    }
}

fn describe(silent: &[(usize, Duration)], store_error: Option<&str>, store_owner: &str) -> String {
    let mut out = String::new();
    for (rank, quiet) in silent {
        out.push_str(&format!("; rank {rank} stopped answering (no heartbeat for {:.1} s)", quiet.as_secs_f64()));
    }
    if let Some(error) = store_error {
        out.push_str(&format!("; the store, which {store_owner} serves, stopped answering ({error})"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_silent_ranks_and_the_store() {
        let quiet = [(2, Duration::from_millis(2400))];
        assert_eq!(describe(&quiet, None, "rank 0"), "; rank 2 stopped answering (no heartbeat for 2.4 s)");
        assert_eq!(describe(&[], Some("gone"), "rank 0"), "; the store, which rank 0 serves, stopped answering (gone)");
        assert_eq!(describe(&[], None, "rank 0"), "");
    }
}
