//! Paged KV cache: fixed-size blocks of token slots, a free list, and one K and one V tensor
//! per layer indexed by slot (`block * block_size + offset`).
//!
//! [`BlockAllocator`] is the bookkeeping (used by the scheduler); [`KvCache`] holds the tensors.

use candle_core::{DType, Device, Tensor};

use crate::error::{EngineError, Result};

/// Free-list allocator of KV blocks.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    free: Vec<u32>,
    total: usize,
    block_size: usize,
}

impl BlockAllocator {
    /// `total` blocks of `block_size` token slots each.
    pub fn new(total: usize, block_size: usize) -> Self {
        // Reverse so that low block numbers are handed out first (easier to read in traces).
        BlockAllocator {
            free: (0..total as u32).rev().collect(),
            total,
            block_size,
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

    /// Blocks not held by any sequence.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `tokens` token slots.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Grows `table` so that it covers `tokens` slots. On shortage nothing is taken and
    /// `false` is returned: the caller preempts or waits.
    #[must_use]
    pub fn grow(&mut self, table: &mut Vec<u32>, tokens: usize) -> bool {
        let need = self.blocks_for(tokens).saturating_sub(table.len());
        if need > self.free.len() {
            return false;
        }
        let at = self.free.len() - need;
        table.extend(self.free.drain(at..));
        true
    }

    /// Returns every block of `table` to the free list and empties it.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        self.free.append(table);
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

    /// Writes the new tokens' keys and values (`[tokens, row]`) of `layer` into their slots.
    /// `slot_index` is `[tokens, row]` (each row repeats the token's slot).
    pub fn write(&self, layer: usize, k: &Tensor, v: &Tensor, slot_index: &Tensor) -> Result<()> {
        self.k[layer].scatter_set(slot_index, &k.contiguous()?, 0)?;
        self.v[layer].scatter_set(slot_index, &v.contiguous()?, 0)?;
        Ok(())
    }

    /// The K and V tensors of `layer`.
    pub fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.k[layer], &self.v[layer])
    }

    /// Keys and values at `slots` (`[n]` u32): two `[n, row]` tensors.
    pub fn gather(&self, layer: usize, slots: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.k[layer].index_select(slots, 0)?,
            self.v[layer].index_select(slots, 0)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
