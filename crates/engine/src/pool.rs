//! A step on rayon's pool with the pool's other threads kept awake.
//!
//! A step makes many short parallel calls (about 330 a batched decode step of a 30-layer
//! model), with a little serial work between them. Between calls rayon's idle threads spin a
//! few dozen rounds and then sleep, and every call after a sleep pays a futex wake-up, in a VM
//! an interrupt to a halted virtual CPU, before the other threads join in: on 2 cores about
//! 100 sleeps a batch-16 step. As OpenMP runtimes (and so llama.cpp) do, the other threads
//! instead spin for the length of the step, taking each call's work as soon as it is offered,
//! and hand the CPU to the OS scheduler every few dozen idle rounds so that threads outside
//! the pool (the server's) still run.

use std::sync::atomic::{AtomicBool, Ordering};

/// Idle rounds between two yields of the CPU to the OS scheduler.
const SPINS_PER_YIELD: u32 = 64;

/// Runs `f` on a thread of the current rayon pool while the pool's other threads wait for
/// its parallel work spinning instead of sleeping; returns what `f` returns.
pub(crate) fn hot<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
        // The scope's body runs on a pool thread: this one.
        let caller = rayon::current_thread_index();
        for _ in 1..rayon::current_num_threads() {
            let done = &done;
            s.spawn(move |_| {
                // Taken back by the caller itself (while it waited for its own work): spinning
                // there would wait for `f`, which that very thread runs.
                if rayon::current_thread_index() == caller {
                    return;
                }
                let mut idle = 0u32;
                while !done.load(Ordering::Acquire) {
                    match rayon::yield_now() {
                        Some(rayon::Yield::Executed) => idle = 0,
                        _ => {
                            idle = idle.wrapping_add(1);
                            if idle.is_multiple_of(SPINS_PER_YIELD) {
                                std::thread::yield_now();
                            } else {
                                std::hint::spin_loop();
                            }
                        }
                    }
                }
            });
        }
        let out = f();
        done.store(true, Ordering::Release);
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// Parallel work inside, on pools of one to four threads, finishes with the right answer
    /// (a spinner taken back by the caller would hang it), and so do two steps at once on one
    /// pool.
    #[test]
    fn parallel_work_inside_finishes_on_any_pool() {
        for threads in 1..=4 {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let sum = |n: u64| (0..n).into_par_iter().map(|i| i * i).sum::<u64>();
            let want: u64 = (0..10_000u64).map(|i| i * i).sum();
            for _ in 0..50 {
                assert_eq!(pool.install(|| hot(|| sum(10_000))), want);
            }
            let (a, b) = pool.join(|| hot(|| sum(10_000)), || hot(|| sum(10_000)));
            assert_eq!((a, b), (want, want));
        }
    }
}
