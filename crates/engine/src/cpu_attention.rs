//! Paged attention on CPU, for decodes and prefill chunks alike: each sequence's new tokens
//! (one for a decode, a chunk for a prefill) attend causally to its context, keys and values
//! read straight from the cache slots (no gather, no padding, no mask tensor), each KV head
//! serving its query heads (GQA). Scores are never stored whole: key blocks are folded into a
//! running softmax (as flash attention does), so memory stays flat with the context.
//!
//! Work is split over (sequence, tile of queries, KV heads) and, where that leaves too few
//! tasks to keep every thread busy (one long decode, a short chunk deep in a long prompt),
//! over ranges of the context too: each range's partial softmax (its running maximum, sum
//! and weighted values) is merged after (split-K, as flash-decoding does). The inner loops
//! take up to four rows at once, so that each key and value loaded serves every row and
//! the sums of products run in independent registers. They are written for AVX-512, with
//! plain loops beside them for other CPUs, chosen at run time. The tensor path in `model.rs`
//! does the same with general ops and serves GPUs.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape};
use rayon::prelude::*;

use crate::cpu_ops::{contiguous_input, f32_input};
use crate::fast_exp::exp;
use crate::packed_matmul::{PanelElem, SharedOut};

/// Keys folded into the running softmax at once.
const KEY_BLOCK: usize = 64;
/// Query rows (query tokens × query heads) of one task, about: every row of a task reads the
/// keys and values the task loads. A tile of few queries (a decode) takes several KV heads,
/// so that it reads whole cache rows, which lie in memory one after the other within a block
/// of slots (one head's part of each is a few lines, a row apart, the hardware prefetchers
/// do not follow; with a task per head a batch-16 decode spent a seventh of its time here).
const TILE_ROWS: usize = 32;
/// Tasks wanted per thread, so that tasks of unequal length even out.
const TASKS_PER_THREAD: usize = 4;
/// Keys of a context range below which a task's context is not split further.
const MIN_RANGE_KEYS: usize = 4 * KEY_BLOCK;

/// The op: inputs are `q [rows, heads * head_dim]` (each sequence's new tokens, sequences in
/// order), and the layer's K and V caches `[slots, kv_heads * head_dim]`; the output is
/// `[rows, heads * head_dim]`.
pub struct PagedAttention<'a> {
    /// Query heads.
    pub num_heads: usize,
    /// KV heads.
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Slots of every sequence's context, `max_ctx` per sequence (padding beyond its length).
    pub ctx_slots: &'a [u32],
    /// Context length of each sequence (cached + new tokens).
    pub ctx_lens: &'a [u32],
    /// New tokens of each sequence (its rows of `q`); the last `q_lens[b]` positions of its
    /// context.
    pub q_lens: &'a [u32],
    /// Stride of `ctx_slots` per sequence.
    pub max_ctx: usize,
    /// Sliding window: a query attends only the last `window` positions up to its own.
    pub window: Option<usize>,
}

/// One task: `queries` new tokens of sequence `seq` from its `first` one, for the KV heads
/// `kvs`, over the context positions `keys`.
#[derive(Debug, Clone)]
struct Task {
    seq: usize,
    kvs: std::ops::Range<usize>,
    first: usize,
    queries: usize,
    /// Row of the sequence's first new token in `q`.
    row: usize,
    /// Context positions this task folds in: all its queries see, or a range of them.
    keys: std::ops::Range<usize>,
    /// Where its partial result goes when its context is split: the first of its
    /// [`Task::rows`] rows in the partials, whose sums are merged after.
    partial: Option<usize>,
}

impl Task {
    /// Its query rows for `rep` query heads per KV head: KV head by KV head (the task's
    /// first, then the next), each its query tokens by query head.
    fn rows(&self, rep: usize) -> usize {
        self.kvs.len() * self.queries * rep
    }

    /// Where row `r` of those lives in `q` and the output (`[tokens, heads · head_dim]`): the
    /// token's row of the step and the query head.
    fn token_and_head(&self, r: usize, rep: usize) -> (usize, usize) {
        let per_kv = self.queries * rep;
        let (kv, i) = (self.kvs.start + r / per_kv, r % per_kv);
        (self.row + self.first + i / rep, kv * rep + i % rep)
    }
}

/// The tasks of one (sequence, tile of queries, KV heads) whose context was split, and where
/// their partials lie.
struct Split {
    task: Task,
    /// First row in the partials of each part, in context order.
    parts: Vec<usize>,
}

impl CustomOp3 for PagedAttention<'_> {
    fn name(&self) -> &'static str {
        "paged-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let q = f32_input(self.name(), s1, l1)?;
        match (s2, s3) {
            (CpuStorage::F32(k), CpuStorage::F32(v)) => self.forward(q, l1, (k, l2), (v, l3)),
            (CpuStorage::F16(k), CpuStorage::F16(v)) => self.forward(q, l1, (k, l2), (v, l3)),
            (CpuStorage::BF16(k), CpuStorage::BF16(v)) => self.forward(q, l1, (k, l2), (v, l3)),
            (k, v) => candle_core::bail!(
                "paged-attention: a {:?} K cache and a {:?} V cache (f32, f16 or bf16, both \
                 alike)",
                k.dtype(),
                v.dtype()
            ),
        }
    }
}

impl PagedAttention<'_> {
    /// The op over K and V caches of element `E`.
    fn forward<E: PanelElem>(
        &self,
        q: &[f32],
        l1: &Layout,
        k: (&[E], &Layout),
        v: (&[E], &Layout),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (l2, l3) = (k.1, v.1);
        let k = contiguous_input(self.name(), k.0, l2)?;
        let v = contiguous_input(self.name(), v.0, l3)?;
        let (rows, width) = l1.shape().dims2()?;
        let (hd, nh, nkv) = (self.head_dim, self.num_heads, self.num_kv_heads);
        let kv_row = nkv * hd;
        let batch = self.ctx_lens.len();
        let consistent = width == nh * hd
            && nkv > 0
            && nh % nkv == 0
            && l2.shape().dims2()?.1 == kv_row
            && l3.shape().dims2()?.1 == kv_row
            && self.q_lens.len() == batch
            && self.ctx_slots.len() == batch * self.max_ctx
            && self.q_lens.iter().map(|&n| n as usize).sum::<usize>() == rows
            && self
                .q_lens
                .iter()
                .zip(self.ctx_lens)
                .all(|(&n, &c)| n >= 1 && n <= c && c as usize <= self.max_ctx);
        if !consistent {
            candle_core::bail!("paged-attention: inconsistent shapes")
        }
        let slots = k.len() / kv_row;
        if self.ctx_slots.iter().any(|&s| s as usize >= slots) || v.len() != k.len() {
            candle_core::bail!("paged-attention: a context slot lies outside the cache")
        }
        if k.len() > i32::MAX as usize {
            candle_core::bail!(
                "paged-attention: a layer's KV cache holds over 2^31 values; give this CPU \
                 worker a smaller --kv-cache-memory"
            )
        }
        let (tasks, splits, partial_rows) = self.plan(rayon::current_num_threads());
        let mut out = vec![0f32; rows * nh * hd];
        // Per partial row: its weighted values (head_dim), then its maximum and its sum.
        let mut partials = vec![0f32; partial_rows * (hd + 2)];
        let shared = SharedOut(out.as_mut_ptr());
        let shared_partials = SharedOut(partials.as_mut_ptr());
        let caches = Caches { q, k, v, kv_row };
        let avx512 = has_avx512();
        tasks
            .par_iter()
            .for_each_init(Scratch::default, |scratch, t| {
                // SAFETY: tasks write disjoint (row, head) blocks of `out`, or disjoint rows of
                // the partials, both of which outlive them; `avx512` was read off this CPU.
                unsafe {
                    self.run(
                        avx512,
                        t,
                        &caches,
                        scratch,
                        Dest {
                            out: shared,
                            partials: shared_partials,
                        },
                    )
                }
            });
        splits.par_iter().for_each(|split| {
            // SAFETY: each split writes its own (row, head) block of `out`.
            unsafe { self.merge(split, &partials, shared) }
        });
        Ok((CpuStorage::F32(out), Shape::from((rows, nh * hd))))
    }
}

impl PagedAttention<'_> {
    /// The first context position a query at `pos` sees.
    fn lowest(&self, pos: usize) -> usize {
        self.window.map_or(0, |w| (pos + 1).saturating_sub(w))
    }

    /// The step's tasks for `threads` threads, the splits among them, and how many partial
    /// rows those need. A tile's context is split into ranges when the tasks would
    /// otherwise be too few or too uneven for the threads: each range holds about the
    /// context a thread's share of tasks should read, and at least [`MIN_RANGE_KEYS`].
    fn plan(&self, threads: usize) -> (Vec<Task>, Vec<Split>, usize) {
        let (nh, nkv) = (self.num_heads, self.num_kv_heads);
        let rep = nh / nkv;
        let most = (TILE_ROWS / rep).max(1);
        let mut tiles = Vec::new();
        let mut row = 0;
        for (seq, &n) in self.q_lens.iter().enumerate() {
            let n = n as usize;
            let start = self.ctx_lens[seq] as usize - n;
            // Tiles of equal size: each task streams the whole context, so a short last
            // tile would cost nearly a full one.
            let tile = n.div_ceil(n.div_ceil(most));
            // KV heads a tile takes: as many as its rows allow.
            let heads = (TILE_ROWS / (tile * rep)).clamp(1, nkv);
            for first in (0..n).step_by(tile) {
                let queries = tile.min(n - first);
                let keys = self.lowest(start + first)..start + first + queries;
                for kv in (0..nkv).step_by(heads) {
                    tiles.push(Task {
                        seq,
                        kvs: kv..(kv + heads).min(nkv),
                        first,
                        queries,
                        row,
                        keys: keys.clone(),
                        partial: None,
                    });
                }
            }
            row += n;
        }
        // Reads counted in keys of one head.
        let reads: usize = tiles.iter().map(|t| t.keys.len() * t.kvs.len()).sum();
        let range = reads.div_ceil(TASKS_PER_THREAD * threads.max(1));
        let (mut tasks, mut splits, mut partial_rows) = (Vec::new(), Vec::new(), 0);
        for tile in tiles {
            // Each range at least MIN_RANGE_KEYS keys, whole key blocks.
            let keys = range
                .div_ceil(tile.kvs.len())
                .max(MIN_RANGE_KEYS)
                .next_multiple_of(KEY_BLOCK);
            let parts = tile.keys.len().div_ceil(keys);
            // One thread has nothing to balance: a split would only add the merge.
            if parts <= 1 || threads <= 1 {
                tasks.push(tile);
                continue;
            }
            // Ranges of equal length, so that no part is a sliver.
            let len = tile.keys.len().div_ceil(parts);
            let mut split = Split {
                task: tile.clone(),
                parts: Vec::new(),
            };
            for lo in tile.keys.clone().step_by(len) {
                split.parts.push(partial_rows);
                tasks.push(Task {
                    keys: lo..(lo + len).min(tile.keys.end),
                    partial: Some(partial_rows),
                    ..tile.clone()
                });
                partial_rows += tile.rows(rep);
            }
            splits.push(split);
        }
        (tasks, splits, partial_rows)
    }

    /// Writes a split tile's output: its parts' sums, each rescaled to the largest maximum.
    ///
    /// # Safety
    /// `out` must hold `[rows, heads * head_dim]` and no other task may write this tile's
    /// block.
    unsafe fn merge(&self, split: &Split, partials: &[f32], out: SharedOut) {
        let (hd, nh) = (self.head_dim, self.num_heads);
        let rep = nh / self.num_kv_heads;
        let t = &split.task;
        let mut acc = vec![0f32; hd];
        for r in 0..t.rows(rep) {
            let part = |p: usize| &partials[(p + r) * (hd + 2)..][..hd + 2];
            let max = split
                .parts
                .iter()
                .map(|&p| part(p)[hd])
                .fold(f32::NEG_INFINITY, f32::max);
            acc.fill(0.0);
            let mut sum = 0.0;
            for &p in &split.parts {
                let x = part(p);
                // A part none of whose keys this row sees has a maximum of -inf: weight 0.
                let w = exp(x[hd] - max);
                sum += w * x[hd + 1];
                for (a, &y) in acc.iter_mut().zip(&x[..hd]) {
                    *a += w * y;
                }
            }
            // Every row sees its own position in some part, so its sum is positive.
            self.write_row(t, r, &acc, sum, out);
        }
    }

    /// Writes row `r` of task `t` (its token and head: [`Task::token_and_head`]) into `out`:
    /// its weighted values over their softmax sum.
    ///
    /// # Safety
    /// `out` must hold `[rows, heads * head_dim]` and no other task may write that row's
    /// head; `sum` must be positive.
    unsafe fn write_row(&self, t: &Task, r: usize, acc: &[f32], sum: f32, out: SharedOut) {
        let (hd, nh) = (self.head_dim, self.num_heads);
        let rep = nh / self.num_kv_heads;
        let (token, h) = t.token_and_head(r, rep);
        let dst = out.ptr().add(token * nh * hd + h * hd);
        let inv = 1.0 / sum;
        for (d, a) in acc[..hd].iter().enumerate() {
            *dst.add(d) = a * inv;
        }
    }
}

/// Where a task writes: the output, or the partials when its context is split.
#[derive(Clone, Copy)]
struct Dest {
    out: SharedOut,
    partials: SharedOut,
}

/// Whether this CPU runs the AVX-512 tasks (masked loads of 16-bit values need BW and VL).
fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The inputs a task reads: the caches hold `E` (f32, f16 or bf16), widened as they are read.
struct Caches<'a, E> {
    q: &'a [f32],
    k: &'a [E],
    v: &'a [E],
    kv_row: usize,
}

/// A task's working memory, reused across the tasks of one thread.
#[derive(Default)]
struct Scratch {
    /// The task's query rows, scaled by `1/√head_dim`, `[rows, head_dim]`.
    queries: Vec<f32>,
    /// Where the current key block's rows start in the cache, in values.
    offsets: Vec<u32>,
    /// Running output `[rows, head_dim]`.
    acc: Vec<f32>,
    /// Scores, then weights, of the current key block `[rows, KEY_BLOCK]`.
    scores: Vec<f32>,
    /// Running maximum and sum of each row.
    max: Vec<f32>,
    sum: Vec<f32>,
}

impl PagedAttention<'_> {
    /// Runs one task, with AVX-512 when `avx512` says this CPU has it.
    ///
    /// # Safety
    /// `out` must hold `[rows, heads * head_dim]`, no other task may write `t`'s block, and
    /// `avx512` must come from [`has_avx512`].
    unsafe fn run<E: PanelElem>(
        &self,
        avx512: bool,
        t: &Task,
        c: &Caches<E>,
        s: &mut Scratch,
        out: Dest,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            if avx512 {
                return self.run_avx512(t, c, s, out);
            }
        }
        self.task::<Portable, E>(t, c, s, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    unsafe fn run_avx512<E: PanelElem>(&self, t: &Task, c: &Caches<E>, s: &mut Scratch, out: Dest) {
        self.task::<Avx512, E>(t, c, s, out)
    }

    /// Online softmax over the key blocks of a task's context range: each block's keys and
    /// values are read once for all the task's rows.
    #[inline(always)]
    unsafe fn task<V: Simd, E: PanelElem>(
        &self,
        t: &Task,
        c: &Caches<E>,
        s: &mut Scratch,
        out: Dest,
    ) {
        let (hd, nh) = (self.head_dim, self.num_heads);
        let rep = nh / self.num_kv_heads;
        // Rows of one KV head, and of the task.
        let per_kv = t.queries * rep;
        let rows = t.rows(rep);
        let ctx = self.ctx_lens[t.seq] as usize;
        // Position of the sequence's first new token.
        let start = ctx - self.q_lens[t.seq] as usize;
        let slots = &self.ctx_slots[t.seq * self.max_ctx..][..ctx];
        let scale = 1.0 / (hd as f32).sqrt();
        let query = |r: usize| {
            let (token, h) = t.token_and_head(r, rep);
            &c.q[token * nh * hd + h * hd..][..hd]
        };
        s.queries.clear();
        for r in 0..rows {
            s.queries.extend(query(r).iter().map(|x| x * scale));
        }
        s.acc.clear();
        s.acc.resize(rows * hd, 0.0);
        s.scores.clear();
        s.scores.resize(per_kv * KEY_BLOCK, 0.0);
        s.max.clear();
        s.max.resize(rows, f32::NEG_INFINITY);
        s.sum.clear();
        s.sum.resize(rows, 0.0);
        let first_pos = start + t.first;
        // The task's heads in a cache row: values `cols` from the row's start.
        let cols = t.kvs.start * hd..t.kvs.end * hd;
        let row_at = |slot: u32| slot as usize * c.kv_row;
        // A key's heads are a few cache lines, a row of the cache apart from the next key's
        // unless their slots follow one another: too short a stream for the hardware
        // prefetchers. Ask for a block's keys and values (all at once, so that the loads
        // overlap) one block ahead.
        let fetch = |keys: std::ops::Range<usize>| {
            for &slot in &slots[keys] {
                prefetch(&c.k[row_at(slot)..][cols.clone()]);
                prefetch(&c.v[row_at(slot)..][cols.clone()]);
            }
        };
        fetch(t.keys.start..t.keys.end.min(t.keys.start + KEY_BLOCK));
        let mut block = t.keys.start;
        while block < t.keys.end {
            let n = KEY_BLOCK.min(t.keys.end - block);
            fetch(block + n..t.keys.end.min(block + n + KEY_BLOCK));
            s.offsets.clear();
            s.offsets.extend(
                slots[block..block + n]
                    .iter()
                    .map(|&slot| row_at(slot) as u32),
            );
            for (j, kv) in t.kvs.clone().enumerate() {
                // This KV head's rows, against its part of each cache row.
                let (k, v) = (&c.k[kv * hd..], &c.v[kv * hd..]);
                let these = j * per_kv..(j + 1) * per_kv;
                V::scores(
                    &s.queries[these.start * hd..these.end * hd],
                    hd,
                    k,
                    &s.offsets,
                    &mut s.scores,
                );
                for (i, r) in these.clone().enumerate() {
                    let pos = first_pos + i / rep;
                    // Keys this row sees in the block: [lo, hi); the others weigh 0.
                    let lo = self.lowest(pos).max(block) - block;
                    let hi = (pos + 1).min(block + n).saturating_sub(block);
                    let sc = &mut s.scores[i * KEY_BLOCK..][..n];
                    if lo >= hi {
                        sc.fill(0.0);
                        continue;
                    }
                    sc[..lo].fill(f32::NEG_INFINITY);
                    sc[hi..].fill(f32::NEG_INFINITY);
                    let block_max = sc[lo..hi].iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                    let new_max = s.max[r].max(block_max);
                    let rescale = exp(s.max[r] - new_max);
                    s.sum[r] = s.sum[r] * rescale + V::exp_sum(sc, new_max);
                    s.max[r] = new_max;
                    if rescale != 1.0 {
                        V::scale(&mut s.acc[r * hd..][..hd], rescale);
                    }
                }
                V::weighted_sum(
                    &s.scores,
                    hd,
                    v,
                    &s.offsets,
                    &mut s.acc[these.start * hd..these.end * hd],
                );
            }
            block += n;
        }
        if let Some(first) = t.partial {
            for r in 0..rows {
                let dst = out.partials.ptr().add((first + r) * (hd + 2));
                std::ptr::copy_nonoverlapping(s.acc[r * hd..].as_ptr(), dst, hd);
                *dst.add(hd) = s.max[r];
                *dst.add(hd + 1) = s.sum[r];
            }
            return;
        }
        for r in 0..rows {
            // Every row sees at least its own position, so its sum is positive.
            self.write_row(t, r, &s.acc[r * hd..], s.sum[r], out.out);
        }
    }
}

/// Asks for the cache lines of `x` ahead of their use.
#[inline(always)]
fn prefetch<E>(x: &[E]) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..x.len()).step_by((64 / std::mem::size_of::<E>()).max(1)) {
        // SAFETY: a prefetch of an address inside `x`; it never faults.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                x.as_ptr().add(line) as *const i8,
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// The vector work of a task, per instruction set. Callers run the methods only where the
/// set is available. Rows are `[rows, head_dim]`; `scores` and weights are `[rows,
/// KEY_BLOCK]`; `offsets` says where each key's (or value's) head starts in its cache.
trait Simd {
    /// `scores[r][j] = queries[r] · keys[j]`, for every row and key.
    unsafe fn scores<E: PanelElem>(
        queries: &[f32],
        hd: usize,
        k: &[E],
        offsets: &[u32],
        scores: &mut [f32],
    );
    /// `acc[r] += Σ_j weights[r][j] · values[j]`, for every row.
    unsafe fn weighted_sum<E: PanelElem>(
        weights: &[f32],
        hd: usize,
        v: &[E],
        offsets: &[u32],
        acc: &mut [f32],
    );
    /// `x *= s`.
    unsafe fn scale(x: &mut [f32], s: f32);
    /// `x[i] = exp(x[i] - shift)`; returns their sum.
    unsafe fn exp_sum(x: &mut [f32], shift: f32) -> f32;
}

/// Plain loops, for CPUs without AVX-512.
struct Portable;

impl Simd for Portable {
    unsafe fn scores<E: PanelElem>(
        queries: &[f32],
        hd: usize,
        k: &[E],
        offsets: &[u32],
        scores: &mut [f32],
    ) {
        for (r, q) in queries.chunks_exact(hd).enumerate() {
            for (j, &o) in offsets.iter().enumerate() {
                let key = &k[o as usize..][..hd];
                scores[r * KEY_BLOCK + j] = q.iter().zip(key).map(|(a, b)| a * b.to_f32()).sum();
            }
        }
    }

    unsafe fn weighted_sum<E: PanelElem>(
        weights: &[f32],
        hd: usize,
        v: &[E],
        offsets: &[u32],
        acc: &mut [f32],
    ) {
        for (r, a) in acc.chunks_exact_mut(hd).enumerate() {
            for (j, &o) in offsets.iter().enumerate() {
                let p = weights[r * KEY_BLOCK + j];
                for (x, &y) in a.iter_mut().zip(&v[o as usize..][..hd]) {
                    *x += p * y.to_f32();
                }
            }
        }
    }

    unsafe fn scale(x: &mut [f32], s: f32) {
        x.iter_mut().for_each(|v| *v *= s);
    }

    unsafe fn exp_sum(x: &mut [f32], shift: f32) -> f32 {
        x.iter_mut()
            .map(|v| {
                *v = exp(*v - shift);
                *v
            })
            .sum()
    }
}

/// AVX-512: sixteen lanes, the tail of a row under a lane mask.
#[cfg(target_arch = "x86_64")]
struct Avx512;

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Avx512, Simd, KEY_BLOCK};
    use crate::fast_exp::exp16;
    use crate::packed_matmul::PanelElem;

    /// Columns of a weighted sum held in registers: four vectors.
    const COLS: usize = 64;

    /// Lanes `i..len` of a 16-lane step, as a mask.
    #[inline(always)]
    fn lanes(i: usize, len: usize) -> __mmask16 {
        let left = len.saturating_sub(i);
        if left >= 16 {
            0xffff
        } else {
            (1u16 << left) - 1
        }
    }

    /// Lane `i` of the result is the sum of `v[i]`'s lanes: pairs of vectors interleaved and
    /// added, halving their count four times.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn sums16(v: &[__m512; 16]) -> __m512 {
        // Each 128-bit chunk of s[i] holds partial sums of v[2i], v[2i+1], v[2i], v[2i+1].
        let s: [__m512; 8] = std::array::from_fn(|i| {
            let (a, b) = (v[2 * i], v[2 * i + 1]);
            _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
        });
        // Each 128-bit chunk of t[i] holds partial sums of v[4i..4i+4].
        let t: [__m512; 4] = std::array::from_fn(|i| {
            let (a, b) = (_mm512_castps_pd(s[2 * i]), _mm512_castps_pd(s[2 * i + 1]));
            _mm512_add_ps(
                _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
            )
        });
        // Chunks 0 and 1 of u[i] hold halves of v[8i..8i+4], chunks 2 and 3 of v[8i+4..8i+8].
        let fold = |a: __m512, b: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
            )
        };
        let u = [fold(t[0], t[1]), fold(t[2], t[3])];
        fold(u[0], u[1])
    }

    /// `R` rows (1 to 4) against `16 / R` keys at a time: sixteen sums of products in
    /// registers, each key loaded once for all the rows, then added across lanes together
    /// ([`sums16`]). Sum `i` is row `i / (16 / R)`, key `i % (16 / R)`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    unsafe fn scores_rows<E: PanelElem, const R: usize>(
        queries: &[f32],
        hd: usize,
        k: &[E],
        offsets: &[u32],
        scores: &mut [f32],
    ) {
        let per = 16 / R;
        debug_assert!(
            queries.len() >= R * hd && scores.len() >= (R - 1) * KEY_BLOCK + offsets.len()
        );
        for j0 in (0..offsets.len()).step_by(per) {
            let keys = &offsets[j0..offsets.len().min(j0 + per)];
            // Always `per` keys (a short step repeats its first; those lanes are not
            // stored), so that the loops unroll and the sums stay in registers.
            let at: [usize; 16] =
                std::array::from_fn(|i| *keys.get(i).unwrap_or(&keys[0]) as usize);
            let mut acc = [_mm512_setzero_ps(); 16];
            for c0 in (0..hd).step_by(16) {
                let m = lanes(c0, hd);
                let q: [__m512; R] = std::array::from_fn(|r| {
                    _mm512_maskz_loadu_ps(m, queries.as_ptr().add(r * hd + c0))
                });
                for j in 0..per {
                    let kv = E::load16_masked(k.as_ptr().add(at[j] + c0), m);
                    for r in 0..R {
                        acc[r * per + j] = _mm512_fmadd_ps(q[r], kv, acc[r * per + j]);
                    }
                }
            }
            let sums = sums16(&acc);
            for r in 0..R {
                // Lanes r·per.. of `sums` land on this row's scores from key j0.
                let dst = scores
                    .as_mut_ptr()
                    .wrapping_add(r * KEY_BLOCK + j0)
                    .wrapping_sub(r * per);
                let mask = lanes(0, keys.len()) << (r * per);
                _mm512_mask_storeu_ps(dst, mask, sums);
            }
        }
    }

    /// `R` rows (1 to 4) of `acc += weights · values`, 64 columns at a time: each value
    /// loaded once for all the rows, `4·R` sums in registers, independent of one another.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    unsafe fn weighted_sum_rows<E: PanelElem, const R: usize>(
        weights: &[f32],
        hd: usize,
        v: &[E],
        offsets: &[u32],
        acc: &mut [f32],
    ) {
        debug_assert!(acc.len() >= R * hd && weights.len() >= (R - 1) * KEY_BLOCK + offsets.len());
        for c0 in (0..hd).step_by(COLS) {
            let masks: [__mmask16; 4] = std::array::from_fn(|i| lanes(c0 + 16 * i, hd));
            let dst = acc.as_mut_ptr().add(c0);
            let mut a: [[__m512; 4]; R] = std::array::from_fn(|r| {
                std::array::from_fn(|i| _mm512_maskz_loadu_ps(masks[i], dst.add(r * hd + 16 * i)))
            });
            for (j, &o) in offsets.iter().enumerate() {
                let src = v.as_ptr().add(o as usize + c0);
                let x: [__m512; 4] =
                    std::array::from_fn(|i| E::load16_masked(src.add(16 * i), masks[i]));
                for (r, a) in a.iter_mut().enumerate() {
                    let p = _mm512_set1_ps(*weights.get_unchecked(r * KEY_BLOCK + j));
                    for (a, &x) in a.iter_mut().zip(&x) {
                        *a = _mm512_fmadd_ps(p, x, *a);
                    }
                }
            }
            for (r, a) in a.iter().enumerate() {
                for (i, &a) in a.iter().enumerate() {
                    _mm512_mask_storeu_ps(dst.add(r * hd + 16 * i), masks[i], a);
                }
            }
        }
    }

    impl Simd for Avx512 {
        /// Up to four rows at once ([`scores_rows`]).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
        unsafe fn scores<E: PanelElem>(
            queries: &[f32],
            hd: usize,
            k: &[E],
            offsets: &[u32],
            scores: &mut [f32],
        ) {
            let rows = queries.len() / hd;
            let mut r = 0;
            while r < rows {
                let q = &queries[r * hd..];
                let dst = &mut scores[r * KEY_BLOCK..];
                match rows - r {
                    1 => scores_rows::<E, 1>(q, hd, k, offsets, dst),
                    2 => scores_rows::<E, 2>(q, hd, k, offsets, dst),
                    3 => scores_rows::<E, 3>(q, hd, k, offsets, dst),
                    _ => scores_rows::<E, 4>(q, hd, k, offsets, dst),
                }
                r += 4;
            }
        }

        /// Up to four rows at once ([`weighted_sum_rows`]).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
        unsafe fn weighted_sum<E: PanelElem>(
            weights: &[f32],
            hd: usize,
            v: &[E],
            offsets: &[u32],
            acc: &mut [f32],
        ) {
            let rows = acc.len() / hd;
            let mut r = 0;
            while r < rows {
                let w = &weights[r * KEY_BLOCK..];
                let a = &mut acc[r * hd..];
                match rows - r {
                    1 => weighted_sum_rows::<E, 1>(w, hd, v, offsets, a),
                    2 => weighted_sum_rows::<E, 2>(w, hd, v, offsets, a),
                    3 => weighted_sum_rows::<E, 3>(w, hd, v, offsets, a),
                    _ => weighted_sum_rows::<E, 4>(w, hd, v, offsets, a),
                }
                r += 4;
            }
        }

        #[inline]
        #[target_feature(enable = "avx512f,fma")]
        unsafe fn scale(x: &mut [f32], s: f32) {
            let s = _mm512_set1_ps(s);
            for i in (0..x.len()).step_by(16) {
                let m = lanes(i, x.len());
                let dst = x.as_mut_ptr().add(i);
                _mm512_mask_storeu_ps(dst, m, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, dst)));
            }
        }

        #[inline]
        #[target_feature(enable = "avx512f,fma")]
        unsafe fn exp_sum(x: &mut [f32], shift: f32) -> f32 {
            let shift = _mm512_set1_ps(shift);
            let mut sum = _mm512_setzero_ps();
            for i in (0..x.len()).step_by(16) {
                let m = lanes(i, x.len());
                let dst = x.as_mut_ptr().add(i);
                let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, dst), shift));
                _mm512_mask_storeu_ps(dst, m, e);
                sum = _mm512_mask_add_ps(sum, m, sum, e);
            }
            _mm512_reduce_add_ps(sum)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    /// Naive attention of one query over explicit key/value rows.
    fn naive(q: &[f32], ks: &[&[f32]], vs: &[&[f32]]) -> Vec<f32> {
        let scale = 1.0 / (q.len() as f32).sqrt();
        let s: Vec<f32> = ks
            .iter()
            .map(|k| q.iter().zip(*k).map(|(a, b)| a * b).sum::<f32>() * scale)
            .collect();
        let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f32 = e.iter().sum();
        (0..q.len())
            .map(|d| e.iter().zip(vs).map(|(p, v)| p / z * v[d]).sum())
            .collect()
    }

    /// One case of [`Simd::scores`] and [`Simd::weighted_sum`].
    struct Products<'a> {
        queries: &'a [f32],
        hd: usize,
        offsets: &'a [u32],
        weights: &'a [f32],
        what: &'a str,
    }

    impl Products<'_> {
        /// The AVX-512 products over `cache` against the plain loops over its values in f32.
        ///
        /// # Safety
        /// The CPU has AVX-512 (F, BW, VL).
        #[cfg(target_arch = "x86_64")]
        unsafe fn check<E: PanelElem>(&self, cache: &[E]) {
            let (q, hd, o, what) = (self.queries, self.hd, self.offsets, self.what);
            let wide: Vec<f32> = cache.iter().map(|v| v.to_f32()).collect();
            let rows = q.len() / hd;
            let (mut a, mut b) = (vec![0f32; rows * KEY_BLOCK], vec![0f32; rows * KEY_BLOCK]);
            Avx512::scores(q, hd, cache, o, &mut a);
            Portable::scores(q, hd, &wide, o, &mut b);
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() <= 1e-4 * y.abs().max(1.0),
                    "{}: scores, {what}",
                    std::any::type_name::<E>()
                );
            }
            let (mut x, mut y) = (q.to_vec(), q.to_vec());
            Avx512::weighted_sum(self.weights, hd, cache, o, &mut x);
            Portable::weighted_sum(self.weights, hd, &wide, o, &mut y);
            for (p, q) in x.iter().zip(&y) {
                assert!(
                    (p - q).abs() <= 1e-3 * q.abs().max(1.0),
                    "{}: weighted sum, {what}",
                    std::any::type_name::<E>()
                );
            }
        }
    }

    /// The AVX-512 operations against the plain loops, on widths, rows and key counts with
    /// and without a tail, over f32, f16 and bf16 caches.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_operations_match_the_plain_loops() {
        if !has_avx512() {
            return;
        }
        let val = |i: usize| ((i * 2654435761) % 1000) as f32 / 100.0 - 5.0;
        for (hd, rows, keys) in [
            (64, 3, 64),
            (20, 11, 17),
            (80, 9, 1),
            (128, 1, 33),
            (32, 6, 40),
        ] {
            let row = 3 * hd;
            let cache: Vec<f32> = (0..100 * row).map(val).collect();
            let offsets: Vec<u32> = (0..keys)
                .map(|j| ((j * 37) % 100 * row + hd) as u32)
                .collect();
            let queries: Vec<f32> = (0..rows * hd).map(|i| val(i + 3) / 10.0).collect();
            let what = format!("head {hd}, {rows} rows, {keys} keys");
            let weights: Vec<f32> = (0..rows * KEY_BLOCK).map(|i| val(i) / 50.0).collect();
            let products = Products {
                queries: &queries,
                hd,
                offsets: &offsets,
                weights: &weights,
                what: &what,
            };
            // Half-precision caches: the same products as their values widened to f32.
            let f16s: Vec<half::f16> = cache.iter().map(|&x| half::f16::from_f32(x)).collect();
            let bf16s: Vec<half::bf16> = cache.iter().map(|&x| half::bf16::from_f32(x)).collect();
            // SAFETY: the CPU has AVX-512 (checked above).
            unsafe {
                products.check(&cache);
                products.check(&f16s);
                products.check(&bf16s);
                let (mut x, mut y) = (queries.clone(), queries.clone());
                Avx512::scale(&mut x, 3.0);
                Portable::scale(&mut y, 3.0);
                for (p, q) in x.iter().zip(&y) {
                    assert!((p - q).abs() <= 1e-3 * q.abs().max(1.0), "scale, {what}");
                }
                let mut x: Vec<f32> = (0..keys).map(|i| val(i) - 5.0).collect();
                x[0] = f32::NEG_INFINITY;
                let mut y = x.clone();
                let (s, want) = (Avx512::exp_sum(&mut x, 2.0), Portable::exp_sum(&mut y, 2.0));
                assert!(
                    (s - want).abs() <= 1e-5 * want.max(1e-30),
                    "exp sum, {what}"
                );
                for (p, q) in x.iter().zip(&y) {
                    assert!(
                        (p - q).abs() <= 1e-6 * q.max(1e-30),
                        "exp, {what}: {p} vs {q}"
                    );
                }
            }
        }
    }

    /// Five sequences in one call (decodes and prefill chunks after a cached prefix, short
    /// and long enough to be split into context ranges, and a whole prompt), scattered slots,
    /// GQA, head widths that are and are not a multiple of the vector width, contexts longer
    /// than a key block, with and without a sliding window, on one thread (no ranges) and
    /// on sixteen (the long contexts split).
    #[test]
    fn matches_naive_causal_attention_for_decodes_and_prefill_chunks() {
        for threads in [1, 16] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(naive_attention_matches);
        }
    }

    fn naive_attention_matches() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            naive_attention_matches_in(dtype);
        }
    }

    /// As above, with K and V caches of `dtype`: the same result as their values in f32.
    fn naive_attention_matches_in(dtype: DType) {
        let val = |i: usize| ((i * 2654435761) % 1000) as f32 / 500.0 - 1.0;
        let d = Device::Cpu;
        for (nh, nkv, hd) in [(4, 2, 8), (6, 2, 20), (3, 3, 64)] {
            let slots = 1900;
            let cache = |f: &dyn Fn(usize) -> f32| {
                let t = Tensor::from_vec(
                    (0..slots * nkv * hd).map(f).collect::<Vec<f32>>(),
                    (slots, nkv * hd),
                    &d,
                )
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
                let exact = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                (t, exact.to_vec1::<f32>().unwrap())
            };
            let (k_cache, k) = cache(&val);
            let (v_cache, v) = cache(&|i| val(i + 7));
            // (context, new tokens) of each sequence.
            let seqs = [(150usize, 1usize), (140, 37), (70, 70), (700, 1), (650, 9)];
            let max_ctx = 700;
            let rows: usize = seqs.iter().map(|s| s.1).sum();
            let q: Vec<f32> = (0..rows * nh * hd).map(|i| val(i + 13)).collect();
            // A permutation of the slots, so that no context is contiguous.
            let perm = |i: usize| ((i * 7919 + 3) % slots) as u32;
            let mut ctx_slots = vec![0u32; seqs.len() * max_ctx];
            for (b, &(ctx, _)) in seqs.iter().enumerate() {
                for p in 0..ctx {
                    ctx_slots[b * max_ctx + p] = perm(b * 380 + p);
                }
            }
            let ctx_lens: Vec<u32> = seqs.iter().map(|s| s.0 as u32).collect();
            let q_lens: Vec<u32> = seqs.iter().map(|s| s.1 as u32).collect();
            for window in [None, Some(3), Some(100)] {
                let op = PagedAttention {
                    num_heads: nh,
                    num_kv_heads: nkv,
                    head_dim: hd,
                    ctx_slots: &ctx_slots,
                    ctx_lens: &ctx_lens,
                    q_lens: &q_lens,
                    max_ctx,
                    window,
                };
                let out = Tensor::from_slice(&q, (rows, nh * hd), &d)
                    .unwrap()
                    .apply_op3_no_bwd(&k_cache, &v_cache, &op)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                let mut row = 0;
                for (b, &(ctx, new)) in seqs.iter().enumerate() {
                    for i in 0..new {
                        let pos = ctx - new + i;
                        let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                        let used = &ctx_slots[b * max_ctx + lo..b * max_ctx + pos + 1];
                        for h in 0..nh {
                            let g = h / (nh / nkv);
                            let at = |t: &[f32], s: u32| {
                                t[s as usize * nkv * hd + g * hd..][..hd].to_vec()
                            };
                            let ks: Vec<Vec<f32>> = used.iter().map(|&s| at(&k, s)).collect();
                            let vs: Vec<Vec<f32>> = used.iter().map(|&s| at(&v, s)).collect();
                            let want = naive(
                                &q[(row + i) * nh * hd + h * hd..][..hd],
                                &ks.iter().map(Vec::as_slice).collect::<Vec<_>>(),
                                &vs.iter().map(Vec::as_slice).collect::<Vec<_>>(),
                            );
                            let got = &out[row + i][h * hd..(h + 1) * hd];
                            for (a, w) in got.iter().zip(&want) {
                                assert!(
                                    (a - w).abs() < 1e-5,
                                    "{dtype:?} {nh}/{nkv}x{hd} window {window:?} seq {b} token \
                                     {i} head {h}: {a} vs {w}"
                                );
                            }
                        }
                    }
                    row += new;
                }
            }
        }
    }

    /// Few tasks over long contexts are split into ranges that cover each tile's context
    /// once, in order; many tasks, or short contexts, are not.
    #[test]
    fn long_contexts_are_split_into_ranges_that_cover_them_once() {
        let ctx_lens = [3000u32, 3000, 40];
        let q_lens = [1u32, 10, 40];
        let op = PagedAttention {
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            ctx_slots: &[],
            ctx_lens: &ctx_lens,
            q_lens: &q_lens,
            max_ctx: 3000,
            window: None,
        };
        let (tasks, splits, partial_rows) = op.plan(2);
        assert!(tasks.len() >= 2 * 4, "{} tasks for 2 threads", tasks.len());
        assert!(
            splits.iter().all(|s| s.task.seq < 2),
            "the short prompt is not split"
        );
        assert_eq!(
            splits.len(),
            4,
            "the decode's one tile of every KV head, the chunk's tile of each"
        );
        let decode = splits.iter().find(|s| s.task.seq == 0).unwrap();
        assert_eq!(decode.task.kvs, 0..3);
        assert!(splits
            .iter()
            .filter(|s| s.task.seq == 1)
            .all(|s| s.task.kvs.len() == 1 && s.task.queries == 10));
        let mut rows = 0;
        for split in &splits {
            let parts: Vec<&Task> = tasks
                .iter()
                .filter(|t| t.partial.is_some_and(|p| split.parts.contains(&p)))
                .collect();
            assert_eq!(parts.len(), split.parts.len());
            assert_eq!(parts[0].keys.start, split.task.keys.start);
            assert_eq!(parts.last().unwrap().keys.end, split.task.keys.end);
            assert!(parts.windows(2).all(|w| w[0].keys.end == w[1].keys.start));
            assert!(parts.iter().all(|t| t.keys.len() >= MIN_RANGE_KEYS / 2));
            rows += parts.len() * split.task.rows(3);
        }
        assert_eq!(rows, partial_rows);
        assert!(op.plan(1).1.is_empty(), "one thread has tasks enough");
        let busy = [40u32; 64];
        let many = PagedAttention {
            ctx_lens: &busy,
            q_lens: &[1; 64],
            ..op
        };
        assert!(
            many.plan(2).1.is_empty(),
            "64 short decodes are enough tasks"
        );
    }

    #[test]
    fn inconsistent_lengths_and_slots_outside_the_cache_are_refused() {
        let d = Device::Cpu;
        let q = Tensor::zeros((2, 8), candle_core::DType::F32, &d).unwrap();
        let kv = Tensor::zeros((4, 8), candle_core::DType::F32, &d).unwrap();
        let run = |slots: &[u32], ctx: &[u32], new: &[u32]| {
            let op = PagedAttention {
                num_heads: 2,
                num_kv_heads: 2,
                head_dim: 4,
                ctx_slots: slots,
                ctx_lens: ctx,
                q_lens: new,
                max_ctx: 2,
                window: None,
            };
            q.apply_op3_no_bwd(&kv, &kv, &op).map(|_| ())
        };
        assert!(run(&[0, 1], &[2], &[2]).is_ok());
        assert!(
            run(&[0, 1], &[2], &[1]).is_err(),
            "rows do not match q_lens"
        );
        assert!(
            run(&[0, 1], &[1], &[2]).is_err(),
            "more new tokens than context"
        );
        assert!(
            run(&[0, 9], &[2], &[2]).is_err(),
            "slot 9 is outside the cache"
        );
    }
}
