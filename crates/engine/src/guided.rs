//! Guided self-scheduling of a parallel loop: every thread of the pool takes ranges of the
//! items from one shared counter, each range a share of what is left, so ranges shrink as
//! the loop ends and the threads finish together.
//!
//! A fixed split (say eight equal tasks for two threads) leaves one thread waiting for the
//! other's last task at the end of every product: up to an eighth of it, and on two cores
//! the waiting thread has gone to sleep by then and must be woken for the next one. A batched
//! decode step runs about 150 such loops.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

/// The shared counter of a loop over `len` items.
struct Guided {
    next: AtomicUsize,
    len: usize,
    /// Each range is the remaining items over this.
    share: usize,
    /// The fewest items a range holds (but the last).
    min: usize,
    /// Ranges start on multiples of this.
    align: usize,
}

impl Guided {
    /// The next range of items, or `None` when all are taken.
    fn grab(&self) -> Option<Range<usize>> {
        let mut cur = self.next.load(Ordering::Relaxed);
        loop {
            if cur >= self.len {
                return None;
            }
            let take = (self.len - cur)
                .div_ceil(self.share)
                .max(self.min)
                .next_multiple_of(self.align);
            let end = (cur + take).min(self.len);
            match self
                .next
                .compare_exchange_weak(cur, end, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(cur..end),
                Err(now) => cur = now,
            }
        }
    }
}

/// Runs `body` over ranges that cover `0..len` once, on every thread of the current rayon
/// pool: each thread starts from its own `init()` and takes a range at a time, half its share
/// of what is left, at least `min` items, starting on a multiple of `align` (`min` a multiple
/// of it).
pub(crate) fn for_each_range<T>(
    len: usize,
    min: usize,
    align: usize,
    init: impl Fn() -> T + Sync,
    body: impl Fn(&mut T, Range<usize>) + Sync,
) {
    let threads = rayon::current_num_threads();
    let align = align.max(1);
    let queue = Guided {
        next: AtomicUsize::new(0),
        len,
        share: 2 * threads,
        min: min.max(1).next_multiple_of(align),
        align,
    };
    let run = || {
        let mut state = init();
        while let Some(r) = queue.grab() {
            body(&mut state, r);
        }
    };
    if threads <= 1 || len <= queue.min {
        run();
    } else {
        (0..threads).into_par_iter().for_each(|_| run());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn ranges_cover_every_item_once_aligned_and_shrinking() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for (len, min, align) in [
            (0, 4, 2),
            (1, 4, 2),
            (7, 4, 2),
            (192, 4, 2),
            (3072, 4, 2),
            (1000, 1, 1),
        ] {
            let seen = Mutex::new(Vec::new());
            pool.install(|| {
                for_each_range(len, min, align, || (), |_, r| seen.lock().unwrap().push(r))
            });
            let mut ranges = seen.into_inner().unwrap();
            ranges.sort_by_key(|r| r.start);
            let mut at = 0;
            for r in &ranges {
                assert_eq!(r.start, at, "{len}: a gap or an overlap at {at}");
                assert_eq!(r.start % align, 0);
                assert!(r.end == len || r.len() >= min, "{len}: a sliver {r:?}");
                at = r.end;
            }
            assert_eq!(at, len);
            // Taken in order, each range is no longer than the one before (within alignment).
            for w in ranges.windows(2) {
                assert!(w[1].len() <= w[0].len() + align, "{len}: {ranges:?}");
            }
            if len >= 192 {
                assert!(ranges.len() >= 8 && ranges[0].len() > ranges.last().unwrap().len());
            }
        }
    }
}
