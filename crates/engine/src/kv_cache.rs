//! Paged KV cache: fixed-size blocks of token slots, a free list, and one K and one V tensor
//! per layer indexed by slot (`block * block_size + offset`).
//!
//! [`BlockAllocator`] is the bookkeeping (used by the scheduler); [`KvCache`] holds the tensors.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Tensor};

use crate::error::{EngineError, Result};

pub use openinfer_core::prefix::{block_key, BlockKey};

/// What the prefix cache has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Full blocks held in the cache now (in use or not).
    pub cached_blocks: usize,
    /// Prompt tokens whose K/V came from the cache instead of a prefill.
    pub hit_tokens: u64,
    /// Prompt tokens admitted (the hit rate's denominator).
    pub prompt_tokens: u64,
    /// Cached blocks taken back to hold other tokens.
    pub evictions: u64,
}

/// Allocator of KV blocks, with a prefix cache.
///
/// A block is held by the sequences whose tables list it (reference-counted). Once its tokens
/// are all computed it may be registered under its [`BlockKey`]; a later sequence whose tokens
/// start the same way then shares it instead of computing it again. A registered block that
/// no sequence holds stays cached, and counts as free: it is evicted, least recently used
/// first (the deepest block of a sequence before its parents), only when a block is needed.
/// So caching never makes a sequence wait or be refused.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    free: Vec<u32>,
    total: usize,
    block_size: usize,
    caching: bool,
    /// Per block: how many tables list it.
    refs: Vec<u32>,
    /// Per block: its key, when registered.
    keys: Vec<Option<BlockKey>>,
    index: std::collections::HashMap<BlockKey, u32>,
    /// Registered blocks no table lists, by when they were last released.
    idle: std::collections::BTreeMap<u64, u32>,
    /// Per block: its entry in `idle`.
    idle_since: Vec<u64>,
    clock: u64,
    stats: PrefixCacheStats,
    /// Keys registered and evicted since [`take_events`](Self::take_events), for routers.
    events: CacheEvents,
}

/// Changes to the prefix cache's keys, as workers report them to routers (which place
/// requests where their prefixes are). Bounded: past [`MAX_EVENTS`] further changes are
/// dropped and `lossy` is set (a router's view is a placement hint, never a correctness
/// matter).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheEvents {
    /// Keys now cached.
    pub added: Vec<BlockKey>,
    /// Keys no longer cached.
    pub removed: Vec<BlockKey>,
    /// Some changes were dropped.
    pub lossy: bool,
}

/// Most key changes held between two reports.
pub const MAX_EVENTS: usize = 1 << 16;

impl CacheEvents {
    fn push(&mut self, added: bool, key: BlockKey) {
        if self.added.len() + self.removed.len() >= MAX_EVENTS {
            self.lossy = true;
            return;
        }
        if added {
            self.added.push(key);
        } else {
            self.removed.push(key);
        }
    }

    /// True when there is nothing to report.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && !self.lossy
    }
}

impl BlockAllocator {
    /// `total` blocks of `block_size` token slots each, without a prefix cache.
    pub fn new(total: usize, block_size: usize) -> Self {
        Self::with_prefix_cache(total, block_size, false)
    }

    /// `total` blocks of `block_size` token slots each; `caching` turns the prefix cache on.
    pub fn with_prefix_cache(total: usize, block_size: usize, caching: bool) -> Self {
        // Reverse so that low block numbers are handed out first (easier to read in traces).
        BlockAllocator {
            free: (0..total as u32).rev().collect(),
            total,
            block_size,
            caching,
            refs: vec![0; total],
            keys: vec![None; total],
            index: std::collections::HashMap::new(),
            idle: std::collections::BTreeMap::new(),
            idle_since: vec![0; total],
            clock: 0,
            stats: PrefixCacheStats::default(),
            events: CacheEvents::default(),
        }
    }

    /// Token slots per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the cache.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Whether the prefix cache is on.
    pub fn caching(&self) -> bool {
        self.caching
    }

    /// Blocks no sequence holds (cached ones included: they are evicted when needed).
    pub fn free(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    /// What the prefix cache has done so far.
    pub fn stats(&self) -> PrefixCacheStats {
        PrefixCacheStats {
            cached_blocks: self.index.len(),
            ..self.stats
        }
    }

    /// Blocks needed to hold `tokens` token slots.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Grows `table` so that it covers `tokens` slots, from the free list first, then by
    /// evicting the least recently used cached blocks. On shortage nothing is taken and
    /// `false` is returned: the caller preempts or waits.
    #[must_use]
    pub fn grow(&mut self, table: &mut Vec<u32>, tokens: usize) -> bool {
        let need = self.blocks_for(tokens).saturating_sub(table.len());
        if need > self.free() {
            return false;
        }
        for _ in 0..need {
            let b = match self.free.pop() {
                Some(b) => b,
                None => self.evict(),
            };
            self.refs[b as usize] = 1;
            table.push(b);
        }
        true
    }

    /// Takes the least recently used idle cached block out of the cache.
    fn evict(&mut self) -> u32 {
        // `grow` checked that free() covers the need, and the free list is empty.
        let Some((_, b)) = self.idle.pop_first() else {
            unreachable!("grow checks free() first");
        };
        if let Some(key) = self.keys[b as usize].take() {
            self.index.remove(&key);
            self.events.push(false, key);
        }
        self.stats.evictions += 1;
        b
    }

    /// Releases every block of `table` and empties it: a block no other table lists goes back
    /// to the free list, or, when cached, to the idle cached blocks.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        // The deepest blocks first, so that they are evicted before their parents.
        for b in table.drain(..).rev() {
            let i = b as usize;
            self.refs[i] = self.refs[i].saturating_sub(1);
            if self.refs[i] > 0 {
                continue;
            }
            if self.keys[i].is_some() {
                self.clock += 1;
                self.idle_since[i] = self.clock;
                self.idle.insert(self.clock, b);
            } else {
                self.free.push(b);
            }
        }
    }

    /// The cached blocks that hold the longest run of `keys` (a sequence's full blocks, in
    /// order), without taking them.
    pub fn lookup(&self, keys: &[BlockKey]) -> Vec<u32> {
        keys.iter().map_while(|k| self.cached(k)).collect()
    }

    /// The cached block of `key`, if any (none while caching is off).
    pub fn cached(&self, key: &BlockKey) -> Option<u32> {
        if !self.caching {
            return None;
        }
        self.index.get(key).copied()
    }

    /// How many of `blocks` (from [`lookup`](Self::lookup)) no table lists now: sharing them
    /// takes them from the free count.
    pub fn idle_among(&self, blocks: &[u32]) -> usize {
        blocks
            .iter()
            .filter(|&&b| self.refs[b as usize] == 0)
            .count()
    }

    /// Appends cached `blocks` (from [`lookup`](Self::lookup)) to the empty `table`.
    pub fn share(&mut self, table: &mut Vec<u32>, blocks: &[u32]) {
        for &b in blocks {
            let i = b as usize;
            if self.refs[i] == 0 {
                self.idle.remove(&self.idle_since[i]);
            }
            self.refs[i] += 1;
            table.push(b);
        }
    }

    /// Counts an admitted prompt of `prompt` tokens of which `hit` came from the cache.
    pub fn count_admission(&mut self, prompt: usize, hit: usize) {
        self.stats.prompt_tokens += prompt as u64;
        self.stats.hit_tokens += hit as u64;
    }

    /// Registers full block `block` under `key`, unless the key is cached already (another
    /// sequence computed the same tokens at the same time: this block stays private).
    pub fn register(&mut self, block: u32, key: BlockKey) {
        if !self.caching || self.keys[block as usize].is_some() || self.index.contains_key(&key) {
            return;
        }
        self.index.insert(key, block);
        self.keys[block as usize] = Some(key);
        self.events.push(true, key);
    }

    /// The key changes since the last call.
    pub fn take_events(&mut self) -> CacheEvents {
        std::mem::take(&mut self.events)
    }
}

/// Bytes one block takes across all layers (K and V).
pub fn bytes_per_block(
    num_layers: usize,
    block_size: usize,
    num_kv_heads: usize,
    head_dim: usize,
    dtype: DType,
) -> usize {
    2 * num_layers * block_size * num_kv_heads * head_dim * dtype.size_in_bytes()
}

/// The K and V tensors of every layer: `[total_blocks * block_size, kv_heads * head_dim]`.
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl KvCache {
    /// Allocates the cache.
    pub fn new(
        num_layers: usize,
        slots: usize,
        row: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if slots == 0 {
            return Err(EngineError::Config(
                "the KV cache budget leaves no blocks; raise --kv-cache-memory".into(),
            ));
        }
        let mut k = Vec::with_capacity(num_layers);
        let mut v = Vec::with_capacity(num_layers);
        for _ in 0..num_layers {
            k.push(Tensor::zeros((slots, row), dtype, device)?);
            v.push(Tensor::zeros((slots, row), dtype, device)?);
        }
        Ok(KvCache { k, v })
    }

    /// Writes the new tokens' keys and values (`[tokens, row]`) of `layer` into their slots:
    /// token `i` into `slots[i]`. `slot_index` says the same as `[tokens, row]` (each row
    /// repeats the token's slot), for `scatter_set` on devices other than the CPU.
    pub fn write(
        &self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        slots: &[u32],
        slot_index: &Tensor,
    ) -> Result<()> {
        for (cache, new) in [(&self.k[layer], k), (&self.v[layer], v)] {
            // A cache may hold a narrower type than the model computes in (--kv-cache-dtype).
            let converted;
            let new = if new.dtype() == cache.dtype() {
                new
            } else {
                converted = new.to_dtype(cache.dtype())?;
                &converted
            };
            if cache.device().is_cpu() {
                // Rows may be strided (a view into the fused q/k/v output), not elements.
                let new = match new.stride() {
                    [_, 1] => new.clone(),
                    _ => new.contiguous()?,
                };
                cache.inplace_op2(&new, &SlotWrite { slots })?;
            } else {
                cache.scatter_set(slot_index, &new.contiguous()?, 0)?;
            }
        }
        Ok(())
    }

    /// The K and V tensors of `layer`.
    pub fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.k[layer], &self.v[layer])
    }

    /// Keys and values at `slots` (`[n]` u32): two `[n, row]` tensors in `dtype`.
    pub fn gather(&self, layer: usize, slots: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        Ok((
            self.k[layer].index_select(slots, 0)?.to_dtype(dtype)?,
            self.v[layer].index_select(slots, 0)?.to_dtype(dtype)?,
        ))
    }

    /// The type the cache holds.
    pub fn dtype(&self) -> DType {
        self.k.first().map_or(DType::F32, Tensor::dtype)
    }
}

/// Copies row `i` of a `[tokens, row]` tensor (rows may be strided) into row `slots[i]` of a
/// contiguous `[slots, row]` cache tensor, on CPU.
struct SlotWrite<'a> {
    slots: &'a [u32],
}

impl InplaceOp2 for SlotWrite<'_> {
    fn name(&self) -> &'static str {
        "kv-slot-write"
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        cl: &Layout,
        new: &CpuStorage,
        nl: &Layout,
    ) -> candle_core::Result<()> {
        let (capacity, row) = cl.shape().dims2()?;
        let (tokens, new_row) = nl.shape().dims2()?;
        let Some((start, _)) = cl.contiguous_offsets() else {
            candle_core::bail!("kv-slot-write: the cache tensor is not contiguous")
        };
        if new_row != row || tokens != self.slots.len() || nl.stride()[1] != 1 {
            candle_core::bail!(
                "kv-slot-write: {tokens} rows of {new_row} for {} slots of {row}",
                self.slots.len()
            )
        }
        if let Some(bad) = self.slots.iter().find(|&&s| s as usize >= capacity) {
            candle_core::bail!("kv-slot-write: slot {bad} outside a cache of {capacity}")
        }
        let plan = Rows {
            slots: self.slots,
            row,
            cache_start: start,
            new_start: nl.start_offset(),
            new_stride: nl.stride()[0],
        };
        match (cache, new) {
            (CpuStorage::F32(c), CpuStorage::F32(n)) => plan.copy(c, n),
            (CpuStorage::BF16(c), CpuStorage::BF16(n)) => plan.copy(c, n),
            (CpuStorage::F16(c), CpuStorage::F16(n)) => plan.copy(c, n),
            (c, n) => candle_core::bail!(
                "kv-slot-write: {:?} values into a {:?} cache",
                n.dtype(),
                c.dtype()
            ),
        }
    }
}

/// Where [`SlotWrite`] copies from and to.
struct Rows<'a> {
    slots: &'a [u32],
    row: usize,
    cache_start: usize,
    new_start: usize,
    new_stride: usize,
}

impl Rows<'_> {
    /// The copy; an error at the first row that lies outside either buffer (which layouts
    /// that passed [`SlotWrite`]'s checks do not make), instead of a panic.
    fn copy<T: Copy>(&self, cache: &mut [T], new: &[T]) -> candle_core::Result<()> {
        for (i, &slot) in self.slots.iter().enumerate() {
            let from = self.new_start + i * self.new_stride;
            let to = self.cache_start + slot as usize * self.row;
            match (
                cache.get_mut(to..to + self.row),
                new.get(from..from + self.row),
            ) {
                (Some(dst), Some(src)) => dst.copy_from_slice(src),
                _ => candle_core::bail!("kv-slot-write: row {i} lies outside its buffer"),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_blocks_are_shared_counted_free_and_evicted_deepest_first() {
        let mut a = BlockAllocator::with_prefix_cache(4, 2, true);
        let keys: Vec<BlockKey> = (0..3u32)
            .scan(None, |parent: &mut Option<BlockKey>, i| {
                let k = block_key(b"t", parent.as_ref(), &[i, i]);
                *parent = Some(k);
                Some(k)
            })
            .collect();
        let mut t1 = Vec::new();
        assert!(a.grow(&mut t1, 6));
        for (b, k) in t1.iter().zip(&keys) {
            a.register(*b, *k);
        }
        assert_eq!(a.lookup(&keys), t1, "every full block is found");
        let other_root = block_key(b"t", None, &[9, 9]);
        assert!(
            a.lookup(&[other_root, keys[1]]).is_empty(),
            "a run stops at its first miss"
        );
        // A second table shares the first two blocks while the first still holds them.
        let hit = a.lookup(&keys[..2]);
        assert_eq!(a.idle_among(&hit), 0);
        let mut t2 = Vec::new();
        a.share(&mut t2, &hit);
        assert!(a.grow(&mut t2, 5));
        assert_eq!(a.free(), 0);
        a.release(&mut t1);
        // Its third block is idle and cached: free, but still found.
        assert_eq!(a.free(), 1);
        assert_eq!(a.lookup(&keys).len(), 3);
        a.release(&mut t2);
        assert_eq!(a.free(), 4, "every block is free again, cached or not");
        assert_eq!(a.stats().cached_blocks, 3);
        // Taking two blocks evicts the least recently released cached blocks first: the
        // third block of the chain went idle before the first two.
        let mut t3 = Vec::new();
        assert!(a.grow(&mut t3, 4));
        assert_eq!(a.stats().evictions, 1);
        assert_eq!(a.lookup(&keys).len(), 2, "the root and its child stay");
        // Salts separate tenants.
        assert_ne!(
            block_key(b"a", None, &[1, 2]),
            block_key(b"b", None, &[1, 2])
        );
        // Off, nothing is found.
        let mut off = BlockAllocator::new(2, 2);
        let mut t = Vec::new();
        assert!(off.grow(&mut t, 2));
        off.register(t[0], keys[0]);
        assert!(off.lookup(&keys).is_empty());
    }

    #[test]
    fn grow_and_release_account_every_block() {
        let mut a = BlockAllocator::new(4, 16);
        let mut t1 = Vec::new();
        assert!(a.grow(&mut t1, 17)); // two blocks
        assert_eq!((t1.len(), a.free()), (2, 2));
        assert!(a.grow(&mut t1, 32)); // still two
        assert_eq!(t1.len(), 2);
        let mut t2 = Vec::new();
        assert!(!a.grow(&mut t2, 48), "three blocks do not fit in two");
        assert!(
            t2.is_empty() && a.free() == 2,
            "a failed grow takes nothing"
        );
        assert!(a.grow(&mut t2, 32));
        assert_eq!(a.free(), 0);
        a.release(&mut t1);
        assert!(t1.is_empty());
        assert_eq!(a.free(), 2);
        let mut all: Vec<u32> = t2.clone();
        let mut t3 = Vec::new();
        assert!(a.grow(&mut t3, 32));
        all.extend(&t3);
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3], "no block is handed out twice");
    }
}
