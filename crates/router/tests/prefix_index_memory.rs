//! The router's prefix index holds its bound at 10^6 distinct prefixes: what it allocates
//! stays proportional to `--prefix-index-entries`, not to the prefixes ever reported (a
//! counting allocator measures it).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use openinfer_core::prefix::block_key;
use openinfer_router::scheduler::prefix_index::PrefixIndex;
use openinfer_router::scheduler::WorkerId;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; only sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's layout, as `GlobalAlloc::alloc` requires.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn a_million_distinct_prefixes_stay_within_the_bound() {
    const BOUND: usize = 50_000;
    let before = LIVE.load(Ordering::Relaxed);
    let mut index = PrefixIndex::new(BOUND);
    let mut peak = 0isize;
    for i in 0..1_000_000u32 {
        // Distinct prompts from four tenants on eight workers.
        let key = block_key(&[(i % 4) as u8], None, &[i, i / 7]);
        index.added(WorkerId(u64::from(i % 8)), key);
        if i % 10_000 == 0 {
            peak = peak.max(LIVE.load(Ordering::Relaxed) - before);
        }
    }
    assert_eq!(index.len(), BOUND);
    let held = LIVE.load(Ordering::Relaxed) - before;
    peak = peak.max(held);
    let per_entry = peak as f64 / BOUND as f64;
    println!("{BOUND} entries: {held} bytes held, {peak} at most ({per_entry:.0} bytes per entry)");
    assert!(
        per_entry < 400.0,
        "the index took {peak} bytes for {BOUND} entries ({per_entry:.0} per entry)"
    );
}
