//! The step scheduler that the [`Engine`] and the [`SimEngine`] share: which sequences wait
//! and which run, the KV blocks each holds, and what one step computes. The engines differ
//! only in the forward pass (a model, or a fixed step time) and in what a sequence carries
//! besides its token count.
//!
//! * [`StepScheduler::add`] queues a sequence (bounded by `max_waiting`, ids unique).
//! * [`StepScheduler::plan`] admits waiting sequences in arrival order while sequence slots
//!   and KV blocks allow (keeping 1% of the blocks spare once anything runs, so that running
//!   decodes can grow), gives every decode its next slot (preempting the lowest-priority,
//!   newest sequence when none is free), and fills the rest of the token budget with prefill
//!   chunks, sized beside running decodes to the step-time budget ([`crate::step_budget`]).
//! * [`StepScheduler::advance`] records what the forward computed, and how long it took.
//! * [`StepScheduler::remove`] takes a sequence out (finished, cancelled, preempted, failed)
//!   and frees its blocks.
//!
//! [`Engine`]: crate::Engine
//! [`SimEngine`]: crate::SimEngine

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use openinfer_core::SequenceId;

use crate::engine::Capacity;
use crate::error::{EngineError, Result};
use crate::kv_cache::{block_key, BlockAllocator, BlockKey};
use crate::step_budget::{ChunkSizer, StepTimeBudget};
use openinfer_core::prefix::prompt_keys;

/// What the scheduler needs to know of a sequence.
pub(crate) trait Scheduled {
    /// Its id, unique on the engine.
    fn id(&self) -> SequenceId;
    /// Tokens known: prompt and generated (the last generated one is not computed yet).
    fn tokens(&self) -> usize;
    /// Its priority; the lowest is preempted first.
    fn priority(&self) -> i32;
    /// Its token ids (prompt and generated), when the engine keeps them: the prefix cache
    /// keys blocks by them. A sequence whose ids are not all here is never cached.
    fn token_ids(&self) -> &[u32] {
        &[]
    }
    /// What separates its cached blocks from other tenants' (the tenant's name).
    fn cache_salt(&self) -> &[u8] {
        &[]
    }
    /// It was admitted, its first `cached` tokens' KV taken from the prefix cache.
    fn admitted(&mut self, _cached: usize) {}
}

/// A sequence with its place in the KV cache.
pub(crate) struct Slot<S> {
    /// The engine's sequence.
    pub seq: S,
    /// Tokens whose K/V are in the cache.
    pub computed: usize,
    /// Its block table.
    pub blocks: Vec<u32>,
    /// Its leading blocks registered in (or found in) the prefix cache.
    keyed: usize,
    /// The key of the last of them.
    last_key: Option<BlockKey>,
    /// Arrival order on this engine; the newest is preempted first within a priority.
    arrival: u64,
}

/// The bounds a step scheduler keeps.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Most sequences running at once.
    pub max_running: usize,
    /// Most sequences waiting for KV blocks.
    pub max_waiting: usize,
    /// Token budget of one step (decode tokens plus prefill chunks).
    pub max_batch_tokens: usize,
    /// The most a step with running decodes may take; prefill chunks are sized to it.
    pub step_time_budget: StepTimeBudget,
}

/// One sequence's share of a step: `len` tokens from its `computed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Planned {
    /// The sequence.
    pub id: SequenceId,
    /// Tokens it computes this step.
    pub len: usize,
}

/// What a step runs, and what it preempted to make room.
pub(crate) struct Plan<S> {
    /// Decodes first, then prefill chunks.
    pub work: Vec<Planned>,
    /// Sequences taken out for want of KV blocks (their blocks are free again).
    pub preempted: Vec<S>,
}

/// Waiting and running sequences over one block allocator.
pub(crate) struct StepScheduler<S> {
    alloc: BlockAllocator,
    limits: Limits,
    waiting: VecDeque<Slot<S>>,
    running: Vec<Slot<S>>,
    ids: HashSet<SequenceId>,
    arrivals: u64,
    steps: u64,
    sizer: ChunkSizer,
}

impl<S: Scheduled> StepScheduler<S> {
    /// An empty scheduler over `alloc`.
    pub fn new(alloc: BlockAllocator, limits: Limits) -> Self {
        StepScheduler {
            alloc,
            limits,
            waiting: VecDeque::new(),
            running: Vec::new(),
            ids: HashSet::new(),
            arrivals: 0,
            steps: 0,
            sizer: ChunkSizer::new(limits.step_time_budget),
        }
    }

    /// Token slots per block.
    pub fn block_size(&self) -> usize {
        self.alloc.block_size()
    }

    /// True while any sequence waits or runs.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// The prefix cache's key changes since the last call.
    pub fn take_cache_events(&mut self) -> crate::kv_cache::CacheEvents {
        self.alloc.take_events()
    }

    /// Free blocks and slots now.
    pub fn capacity(&self) -> Capacity {
        Capacity {
            total_blocks: self.alloc.total(),
            free_blocks: self.alloc.free(),
            block_size: self.alloc.block_size(),
            max_running: self.limits.max_running,
            running: self.running.len(),
            waiting: self.waiting.len(),
            step: self.steps,
            prefix_cache: self.alloc.stats(),
        }
    }

    /// Queues `seq`; refused, with nothing changed, when its id is taken or the queue is
    /// full.
    pub fn add(&mut self, seq: S) -> Result<()> {
        let id = seq.id();
        if self.ids.contains(&id) {
            return Err(EngineError::DuplicateSequence(id.0));
        }
        if self.waiting.len() >= self.limits.max_waiting {
            return Err(EngineError::Capacity(format!(
                "{} sequences already wait for KV blocks on this worker",
                self.waiting.len()
            )));
        }
        self.arrivals += 1;
        self.ids.insert(id);
        self.waiting.push_back(Slot {
            seq,
            computed: 0,
            blocks: Vec::new(),
            keyed: 0,
            last_key: None,
            arrival: self.arrivals,
        });
        Ok(())
    }

    /// Takes `id` out, waiting or running, and frees its blocks.
    pub fn remove(&mut self, id: SequenceId) -> Option<S> {
        let slot = if let Some(i) = self.position(id) {
            self.running.remove(i)
        } else {
            let i = self.waiting.iter().position(|s| s.seq.id() == id)?;
            self.waiting.remove(i)?
        };
        Some(self.free(slot))
    }

    fn free(&mut self, mut slot: Slot<S>) -> S {
        self.alloc.release(&mut slot.blocks);
        self.ids.remove(&slot.seq.id());
        slot.seq
    }

    /// The running sequences, in admission order.
    pub fn running(&self) -> &[Slot<S>] {
        &self.running
    }

    /// The running sequences, to update what the engine keeps in them.
    pub fn running_mut(&mut self) -> &mut [Slot<S>] {
        &mut self.running
    }

    /// Where `id` is among the running sequences.
    pub fn position(&self, id: SequenceId) -> Option<usize> {
        self.running.iter().position(|s| s.seq.id() == id)
    }

    /// Admits what fits, then picks this step's work (see the module documentation).
    pub fn plan(&mut self) -> Plan<S> {
        self.admit();
        let mut preempted = Vec::new();
        let mut work = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            let tokens = self.running[i].seq.tokens();
            if tokens - self.running[i].computed != 1 {
                i += 1;
                continue;
            }
            let mut blocks = std::mem::take(&mut self.running[i].blocks);
            let grown = self.alloc.grow(&mut blocks, tokens);
            self.running[i].blocks = blocks;
            if grown {
                work.push(Planned {
                    id: self.running[i].seq.id(),
                    len: 1,
                });
                i += 1;
                continue;
            }
            // `i` runs, so there is always a victim.
            let Some(victim) = self.victim() else { break };
            let slot = self.running.remove(victim);
            let seq = self.free(slot);
            tracing::debug!(sequence = %seq.id(), "preempted: KV cache full");
            work.retain(|p: &Planned| p.id != seq.id());
            preempted.push(seq);
            if victim < i {
                i -= 1;
            }
        }
        let mut budget = self.limits.max_batch_tokens.saturating_sub(work.len());
        let decodes = work.len();
        let mut secs = self.sizer.prefill_secs(decodes);
        for slot in &self.running {
            let remaining = slot.seq.tokens() - slot.computed;
            if remaining <= 1 {
                continue;
            }
            // The first chunk gets at least the floor, even past the budget.
            let spent = work.len() > decodes && secs.is_some_and(|u| u <= 0.0);
            let fits = self.sizer.tokens_within(secs, slot.computed, budget);
            let len = remaining.min(fits);
            if len == 0 || spent {
                break;
            }
            budget -= len;
            secs = secs.map(|u| u - self.sizer.cost(slot.computed, len));
            work.push(Planned {
                id: slot.seq.id(),
                len,
            });
        }
        Plan { work, preempted }
    }

    /// Moves waiting sequences into the running set, in arrival order, while slots and KV
    /// blocks allow. A sequence starts from the longest run of its leading full blocks the
    /// prefix cache holds (never its last token: the step must compute it for its logits).
    fn admit(&mut self) {
        let watermark = self.alloc.total().div_ceil(100);
        while self.running.len() < self.limits.max_running {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let tokens = front.seq.tokens();
            let (hit, last_key) = self.cached_prefix(&front.seq);
            let need = self.alloc.blocks_for(tokens).saturating_sub(hit.len());
            let spare = if self.running.is_empty() {
                0
            } else {
                watermark
            };
            if self.alloc.free() - self.alloc.idle_among(&hit) < need + spare {
                break;
            }
            let Some(mut slot) = self.waiting.pop_front() else {
                break;
            };
            self.alloc.share(&mut slot.blocks, &hit);
            if !self.alloc.grow(&mut slot.blocks, tokens) {
                self.alloc.release(&mut slot.blocks);
                self.waiting.push_front(slot);
                break;
            }
            slot.computed = hit.len() * self.alloc.block_size();
            slot.keyed = hit.len();
            slot.last_key = last_key;
            self.alloc.count_admission(tokens, slot.computed);
            slot.seq.admitted(slot.computed);
            self.running.push(slot);
        }
    }

    /// The cached blocks holding the longest run of `seq`'s leading full blocks (its last
    /// token excluded), and the key of the last of them.
    fn cached_prefix(&self, seq: &S) -> (Vec<u32>, Option<BlockKey>) {
        let ids = seq.token_ids();
        if !self.alloc.caching() || ids.len() != seq.tokens() {
            return (Vec::new(), None);
        }
        let keys = prompt_keys(seq.cache_salt(), ids, self.alloc.block_size());
        let hit = self.alloc.lookup(&keys);
        let last = hit.len().checked_sub(1).map(|i| keys[i]);
        (hit, last)
    }

    /// The running sequence to preempt: lowest priority, then latest arrival.
    fn victim(&self) -> Option<usize> {
        (0..self.running.len()).min_by_key(|&i| {
            let s = &self.running[i];
            (s.seq.priority(), std::cmp::Reverse(s.arrival))
        })
    }

    /// Records that the forward computed `work` in `elapsed`, registers the blocks it filled
    /// in the prefix cache, and counts the step.
    pub fn advance(&mut self, work: &[Planned], elapsed: Duration) {
        let decodes = work.iter().filter(|p| p.len == 1).count();
        let len: HashMap<SequenceId, usize> = work.iter().map(|p| (p.id, p.len)).collect();
        let chunks: Vec<(usize, usize)> = self
            .running
            .iter()
            .filter_map(|s| Some((s.computed, *len.get(&s.seq.id())?)))
            .filter(|&(_, n)| n > 1)
            .collect();
        let prefill: usize = chunks.iter().map(|c| c.1).sum();
        tracing::trace!(
            decodes,
            prefill,
            elapsed_ms = elapsed.as_secs_f64() * 1e3,
            "step"
        );
        self.sizer.observe(decodes, &chunks, elapsed);
        let bs = self.alloc.block_size();
        for slot in &mut self.running {
            slot.computed += len.get(&slot.seq.id()).copied().unwrap_or(0);
            let ids = slot.seq.token_ids();
            if !self.alloc.caching() || ids.len() != slot.seq.tokens() {
                continue;
            }
            while (slot.keyed + 1) * bs <= slot.computed {
                let i = slot.keyed;
                let key = block_key(
                    slot.seq.cache_salt(),
                    slot.last_key.as_ref(),
                    &ids[i * bs..(i + 1) * bs],
                );
                self.alloc.register(slot.blocks[i], key);
                slot.last_key = Some(key);
                slot.keyed += 1;
            }
        }
        self.steps += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sequence of `tokens` known tokens.
    struct Seq {
        id: u64,
        tokens: usize,
        priority: i32,
    }

    impl Scheduled for Seq {
        fn id(&self) -> SequenceId {
            SequenceId(self.id)
        }
        fn tokens(&self) -> usize {
            self.tokens
        }
        fn priority(&self) -> i32 {
            self.priority
        }
    }

    fn seq(id: u64, tokens: usize) -> Seq {
        Seq {
            id,
            tokens,
            priority: 0,
        }
    }

    fn sched(blocks: usize, max_running: usize, max_batch_tokens: usize) -> StepScheduler<Seq> {
        sched_within(blocks, max_running, max_batch_tokens, StepTimeBudget::Off)
    }

    /// [`sched`] with a step-time budget.
    fn sched_within(
        blocks: usize,
        max_running: usize,
        max_batch_tokens: usize,
        step_time_budget: StepTimeBudget,
    ) -> StepScheduler<Seq> {
        StepScheduler::new(
            BlockAllocator::new(blocks, 4),
            Limits {
                max_running,
                max_waiting: 2,
                max_batch_tokens,
                step_time_budget,
            },
        )
    }

    /// Runs a plan as a forward would: computes it, and every sequence whose input is then
    /// complete gets its next token.
    fn forward(s: &mut StepScheduler<Seq>, work: &[Planned]) {
        forward_in(s, work, Duration::ZERO);
    }

    /// [`forward`], taking `elapsed`.
    fn forward_in(s: &mut StepScheduler<Seq>, work: &[Planned], elapsed: Duration) {
        s.advance(work, elapsed);
        for slot in s.running_mut() {
            if slot.computed == slot.seq.tokens {
                slot.seq.tokens += 1;
            }
        }
    }

    #[test]
    fn beside_running_decodes_prefill_chunks_keep_to_the_step_time_budget() {
        for (budget, chunk) in [
            (StepTimeBudget::Relative(2.0), 40),
            (StepTimeBudget::Off, 63),
        ] {
            let mut s = sched_within(64, 4, 64, budget);
            let ms = |x: f64| Duration::from_secs_f64(x / 1000.0);
            s.add(seq(1, 4)).unwrap();
            let work = s.plan().work;
            assert_eq!(
                work,
                [Planned {
                    id: SequenceId(1),
                    len: 4
                }]
            );
            // A quarter of a millisecond per prefill token; a decode step takes 10 ms.
            forward_in(&mut s, &work, ms(1.0));
            let work = s.plan().work;
            forward_in(&mut s, &work, ms(10.0));
            s.add(seq(2, 100)).unwrap();
            let work = s.plan().work;
            assert_eq!(
                work,
                [
                    Planned {
                        id: SequenceId(1),
                        len: 1
                    },
                    Planned {
                        id: SequenceId(2),
                        len: chunk
                    }
                ],
                "{budget}: twice a decode step leaves 10 ms, 40 tokens"
            );
        }
    }

    #[test]
    fn duplicates_and_a_full_queue_are_refused_and_change_nothing() {
        let mut s = sched(8, 4, 64);
        s.add(seq(1, 3)).unwrap();
        assert!(matches!(
            s.add(seq(1, 3)),
            Err(EngineError::DuplicateSequence(1))
        ));
        s.add(seq(2, 3)).unwrap();
        assert!(matches!(s.add(seq(3, 3)), Err(EngineError::Capacity(_))));
        assert_eq!(s.capacity().waiting, 2);
        // A removed id is free again.
        assert!(s.remove(SequenceId(1)).is_some());
        s.add(seq(1, 3)).unwrap();
    }

    #[test]
    fn admission_keeps_a_reserve_once_anything_runs_and_respects_max_running() {
        // 200 blocks: the reserve is 2. The first sequence may take every block.
        let mut s = sched(200, 2, 10_000);
        s.add(seq(1, 4 * 198)).unwrap();
        s.add(seq(2, 4)).unwrap();
        let plan = s.plan();
        assert_eq!(plan.work.len(), 1, "the second would eat into the reserve");
        assert_eq!(s.capacity().free_blocks, 2);
        assert_eq!(s.capacity().waiting, 1);
        s.remove(SequenceId(1));
        s.add(seq(3, 4)).unwrap();
        s.add(seq(4, 4)).unwrap_err(); // the queue holds two
        s.plan();
        assert_eq!(s.capacity().running, 2);
        assert_eq!(s.capacity().free_blocks, 198);
        s.add(seq(4, 4)).unwrap();
        s.plan();
        assert_eq!(s.capacity().running, 2, "max_running");
        assert_eq!(s.capacity().waiting, 1);
    }

    #[test]
    fn decodes_come_first_and_prefill_fills_the_token_budget_in_chunks() {
        let mut s = sched(64, 8, 6);
        s.add(seq(1, 2)).unwrap();
        let work = s.plan().work;
        assert_eq!(
            work,
            [Planned {
                id: SequenceId(1),
                len: 2
            }]
        );
        forward(&mut s, &work);
        s.add(seq(2, 10)).unwrap();
        let work = s.plan().work;
        assert_eq!(
            work,
            [
                Planned {
                    id: SequenceId(1),
                    len: 1
                },
                Planned {
                    id: SequenceId(2),
                    len: 5
                },
            ],
            "one decode token, then the rest of the budget as a prefill chunk"
        );
        forward(&mut s, &work);
        let work = s.plan().work;
        assert_eq!(
            work[1],
            Planned {
                id: SequenceId(2),
                len: 5
            }
        );
        forward(&mut s, &work);
        // Sequence 2's prompt is in the cache and it has its first token: both decode.
        assert!(s.plan().work.iter().all(|p| p.len == 1));
    }

    #[test]
    fn a_decode_without_a_block_preempts_the_lowest_priority_sequence() {
        // Four blocks of four slots (one kept spare at admission); three one-block sequences.
        let mut s = sched(4, 8, 64);
        let mut work = Vec::new();
        // (The queue holds two; the third arrives after a step.)
        for batch in [&[(1, 1), (2, 0)][..], &[(3, 1)]] {
            for &(id, priority) in batch {
                let tokens = 4;
                s.add(Seq {
                    id,
                    tokens,
                    priority,
                })
                .unwrap();
            }
            work = s.plan().work;
        }
        assert_eq!(work.len(), 3);
        assert_eq!(s.capacity().free_blocks, 1);
        forward(&mut s, &work);
        // Every decode now needs a second block; one is free.
        let plan = s.plan();
        let preempted: Vec<u64> = plan.preempted.iter().map(|q| q.id).collect();
        assert_eq!(preempted, [2], "the lowest priority, though not the newest");
        let planned: Vec<u64> = plan.work.iter().map(|p| p.id.0).collect();
        assert_eq!(planned, [1, 3]);
        assert_eq!(s.capacity().free_blocks, 0);
        // Every block comes back.
        s.remove(SequenceId(1));
        s.remove(SequenceId(3));
        assert_eq!(s.capacity().free_blocks, 4);
        assert!(!s.has_work());
    }
}
