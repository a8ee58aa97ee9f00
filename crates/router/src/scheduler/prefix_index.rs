//! Which workers hold which prefix-cache blocks, as their step messages report them
//! (`prefix_added`, `prefix_removed`). Placement asks how many of a request's leading blocks a
//! worker holds. Bounded by `--prefix-index-entries`: past it, the keys reported longest ago
//! are forgotten (a forgotten key only makes placement less informed).

use std::collections::{BTreeMap, HashMap};

use openinfer_core::prefix::BlockKey;

use super::state::WorkerId;

/// The router's view of every worker's prefix cache.
#[derive(Debug)]
pub struct PrefixIndex {
    entries: HashMap<BlockKey, Entry>,
    /// Keys by when they were last reported.
    order: BTreeMap<u64, BlockKey>,
    clock: u64,
    max_entries: usize,
}

#[derive(Debug)]
struct Entry {
    workers: Vec<WorkerId>,
    reported: u64,
}

impl PrefixIndex {
    /// An empty index of at most `max_entries` keys.
    pub fn new(max_entries: usize) -> Self {
        PrefixIndex {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            clock: 0,
            max_entries,
        }
    }

    /// Keys known now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no key is known.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Worker `w` cached `key`.
    pub fn added(&mut self, w: WorkerId, key: BlockKey) {
        if self.max_entries == 0 {
            return;
        }
        self.clock += 1;
        let clock = self.clock;
        match self.entries.get_mut(&key) {
            Some(e) => {
                self.order.remove(&e.reported);
                e.reported = clock;
                if !e.workers.contains(&w) {
                    e.workers.push(w);
                }
            }
            None => {
                self.entries.insert(
                    key,
                    Entry {
                        workers: vec![w],
                        reported: clock,
                    },
                );
            }
        }
        self.order.insert(clock, key);
        while self.entries.len() > self.max_entries {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
        }
    }

    /// Worker `w` evicted `key`.
    pub fn removed(&mut self, w: WorkerId, key: &BlockKey) {
        let Some(e) = self.entries.get_mut(key) else {
            return;
        };
        e.workers.retain(|&x| x != w);
        if e.workers.is_empty() {
            self.order.remove(&e.reported);
            self.entries.remove(key);
        }
    }

    /// Forgets everything worker `w` held (it went away, or its report was lossy).
    pub fn forget(&mut self, w: WorkerId) {
        let order = &mut self.order;
        self.entries.retain(|_, e| {
            e.workers.retain(|&x| x != w);
            let keep = !e.workers.is_empty();
            if !keep {
                order.remove(&e.reported);
            }
            keep
        });
    }

    /// How many of `keys` (a prompt's leading blocks, in order) worker `w` holds from the
    /// first on.
    pub fn held(&self, w: WorkerId, keys: &[BlockKey]) -> usize {
        keys.iter()
            .take_while(|k| self.entries.get(*k).is_some_and(|e| e.workers.contains(&w)))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u64) -> BlockKey {
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&i.to_le_bytes());
        k
    }

    #[test]
    fn held_counts_leading_blocks_per_worker_and_the_bound_forgets_the_oldest() {
        let (a, b) = (WorkerId(1), WorkerId(2));
        let mut ix = PrefixIndex::new(4);
        for i in 0..3 {
            ix.added(a, key(i));
        }
        ix.added(b, key(0));
        let keys = [key(0), key(1), key(2), key(9)];
        assert_eq!(ix.held(a, &keys), 3);
        assert_eq!(ix.held(b, &keys), 1);
        ix.removed(a, &key(1));
        assert_eq!(
            ix.held(a, &keys),
            1,
            "a run stops at the first block not held"
        );
        assert_eq!(ix.len(), 2, "key 1 is gone with its only holder");
        // Past the bound the keys reported longest ago go first.
        for i in 10..14 {
            ix.added(b, key(i));
        }
        assert_eq!(ix.len(), 4);
        assert_eq!(ix.held(b, &[key(0)]), 0, "the oldest report was forgotten");
        ix.forget(b);
        assert!(ix.is_empty());
    }
}
