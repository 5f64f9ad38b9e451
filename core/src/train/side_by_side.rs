//! Two halves of a training step that share no parameter (PPO's policy and value model),
//! each forward and backward on a thread of its own.
//!
//! On a CPU a small model's ops are launch-bound: spread over every core by libtorch's
//! OpenMP pool, each op pays a fork and a join worth more than its arithmetic. Two
//! single-threaded halves at once keep both cores on arithmetic instead. The gradients
//! are those of one backward through the sum, as the halves share no tensor that either
//! writes.
use crate::model::recompute;

/// Runs `here` on this thread and `there` on a second one at the same time, each with one
/// intra-op thread; the thread count comes back after. The recipe's activation
/// checkpointing (a per-thread switch) holds on the second thread too. A panic on either
/// side is resumed here once both have ended.
pub fn side_by_side<A, B: Send>(here: impl FnOnce() -> A, there: impl FnOnce() -> B + Send) -> (A, B) {
    let _threads = OneIntraOpThread::enter();
    let checkpointing = recompute::enabled();
    std::thread::scope(|scope| {
        let other = scope.spawn(move || {
            tch::set_num_threads(1);
            let _checkpointing = recompute::enable(checkpointing);
            there()
        });
        let a = here();
        match other.join() {
            Ok(b) => (a, b),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// One intra-op thread for this thread until dropped, then the count it had.
///
/// A loop that runs [`side_by_side`] holds one around its whole span, the updates between
/// the halves included: a parallel region of libtorch's OpenMP pool leaves the pool's
/// other threads spinning for a while after it ends (libgomp's GOMP_SPINCOUNT), and a spin
/// that runs into the next side-by-side forward takes the second half's core. (Measured:
/// PPO's training phase about 20% faster on a 2-core machine.)
pub struct OneIntraOpThread {
    threads: i32,
}

impl OneIntraOpThread {
    pub fn enter() -> Self {
        let threads = tch::get_num_threads();
        tch::set_num_threads(1);
        Self { threads }
    }
}

impl Drop for OneIntraOpThread {
    fn drop(&mut self) {
        tch::set_num_threads(self.threads);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_side_runs_with_one_thread_and_the_count_comes_back() {
        let before = tch::get_num_threads();
        let (here, there) = side_by_side(tch::get_num_threads, tch::get_num_threads);
        assert_eq!((here, there), (1, 1));
        assert_eq!(tch::get_num_threads(), before);
    }

    #[test]
    fn the_second_side_keeps_the_activation_checkpointing_switch() {
        let _on = recompute::enable(true);
        let (_, there) = side_by_side(|| (), recompute::enabled);
        assert!(there);
    }
}
