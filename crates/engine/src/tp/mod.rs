//! Tensor parallelism: one model replica split across `size` ranks (ARCHITECTURE §5).
//!
//! * [`Shard`] says which rank this is and what it holds: a contiguous range of attention
//!   heads (and their KV heads, replicated when there are fewer KV heads than ranks) and of
//!   MLP columns. Embeddings, norms and lm_head are replicated.
//! * [`Communicator`] is the collective every rank of a group calls in the same order: a sum
//!   all-reduce after each row-parallel projection (o and down), and a broadcast of each
//!   step's inputs from rank 0, so that every rank runs the same forward.
//! * [`cpu::CpuCommunicator`] implements it over TCP between processes (a ring);
//!   `nccl::NcclCommunicator` (CUDA builds) sums on the GPUs through NCCL.
//! * [`plan::StepPlan`] is what rank 0 broadcasts; [`follower::Follower`] runs the forward
//!   on the other ranks.
//! * [`watchdog::Watchdog`] holds collectives the host cannot interrupt (NCCL's) to a
//!   deadline, and aborts their communicator when one passes.

pub mod cpu;
pub mod follower;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod plan;
pub mod watchdog;

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};

/// This rank's place in a tensor-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// 0-based rank; rank 0 leads.
    pub rank: usize,
    /// Ranks in the group.
    pub size: usize,
}

impl Shard {
    /// The whole model on one device.
    pub const SINGLE: Shard = Shard { rank: 0, size: 1 };

    /// What rank `rank` of a `size`-rank group holds of a model of shape `cfg`, checking that
    /// the shape divides: heads by `size`, KV heads by `size` (or `size` by KV heads, which
    /// are then replicated) and the MLP width by `size`.
    pub fn new(cfg: &ModelConfig, rank: usize, size: usize) -> Result<Shard> {
        let bad = |what: String| {
            Err(EngineError::Config(format!(
                "tensor parallelism {size} does not fit this model: {what}; pick a tp that divides it"
            )))
        };
        if size == 0 || rank >= size {
            return Err(EngineError::Config(format!(
                "rank {rank} is outside a group of {size}"
            )));
        }
        let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
        if !nh.is_multiple_of(size) {
            return bad(format!("{nh} attention heads do not divide by {size}"));
        }
        if !nkv.is_multiple_of(size) && !size.is_multiple_of(nkv) {
            return bad(format!(
                "{nkv} KV heads neither divide by {size} nor divide {size}"
            ));
        }
        if !cfg.intermediate_size.is_multiple_of(size) {
            return bad(format!(
                "the MLP width {} does not divide by {size}",
                cfg.intermediate_size
            ));
        }
        Ok(Shard { rank, size })
    }

    /// Attention heads on this rank, and the first one.
    pub fn heads(&self, cfg: &ModelConfig) -> (usize, usize) {
        let n = cfg.num_heads / self.size;
        (self.rank * n, n)
    }

    /// KV heads on this rank, and the first one. With fewer KV heads than ranks each rank
    /// holds the one KV head its query heads use.
    pub fn kv_heads(&self, cfg: &ModelConfig) -> (usize, usize) {
        let nkv = cfg.num_kv_heads;
        if nkv >= self.size {
            let n = nkv / self.size;
            (self.rank * n, n)
        } else {
            (self.rank * nkv / self.size, 1)
        }
    }

    /// MLP columns on this rank, and the first one.
    pub fn mlp(&self, cfg: &ModelConfig) -> (usize, usize) {
        let n = cfg.intermediate_size / self.size;
        (self.rank * n, n)
    }

    /// The shape this rank computes with: its heads, KV heads and MLP width.
    pub fn local_config(&self, cfg: &ModelConfig) -> ModelConfig {
        ModelConfig {
            num_heads: self.heads(cfg).1,
            num_kv_heads: self.kv_heads(cfg).1,
            intermediate_size: self.mlp(cfg).1,
            ..cfg.clone()
        }
    }
}

/// Collective operations among the ranks of one tensor-parallel group. Every rank calls the
/// same operations in the same order; a rank that stops answering fails every other rank's
/// next call (the group then ends: its worker deregisters and the router resumes its
/// sequences elsewhere).
pub trait Communicator: Send + Sync {
    /// This rank.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn size(&self) -> usize;
    /// The element-wise sum of `t` over every rank, on every rank (same shape and dtype).
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Rank 0's `bytes`, on every rank (the others pass an empty slice).
    fn broadcast(&self, bytes: &[u8]) -> Result<Vec<u8>>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()> {
        let one = Tensor::ones(1, DType::F32, &Device::Cpu)?;
        self.all_reduce_sum(&one)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    fn cfg(nh: usize, nkv: usize, inter: usize) -> ModelConfig {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/llama3/config.json");
        ModelConfig {
            num_heads: nh,
            num_kv_heads: nkv,
            intermediate_size: inter,
            ..ModelConfig::from_file(&path).unwrap()
        }
    }

    #[test]
    fn shards_divide_heads_kv_heads_and_mlp() {
        let c = cfg(8, 2, 128);
        let s = Shard::new(&c, 1, 2).unwrap();
        assert_eq!(s.heads(&c), (4, 4));
        assert_eq!(s.kv_heads(&c), (1, 1));
        assert_eq!(s.mlp(&c), (64, 64));
        // More ranks than KV heads: each rank holds the KV head its query heads use.
        for rank in 0..4 {
            let s = Shard::new(&c, rank, 4).unwrap();
            let (q0, nq) = s.heads(&c);
            let (kv0, nkv) = s.kv_heads(&c);
            assert_eq!(nkv, 1);
            let group = c.num_heads / c.num_kv_heads;
            assert!((q0..q0 + nq).all(|h| h / group == kv0), "rank {rank}");
        }
        let local = Shard::new(&c, 3, 4).unwrap().local_config(&c);
        assert_eq!(
            (local.num_heads, local.num_kv_heads, local.intermediate_size),
            (2, 1, 32)
        );
    }

    #[test]
    fn shapes_that_do_not_divide_are_refused_with_the_reason() {
        let msg = |c: &ModelConfig, size| Shard::new(c, 0, size).unwrap_err().to_string();
        assert!(msg(&cfg(6, 2, 128), 4).contains("6 attention heads"));
        assert!(msg(&cfg(12, 3, 128), 2).contains("3 KV heads"));
        assert!(msg(&cfg(8, 2, 100), 8).contains("MLP width 100"));
        assert!(Shard::new(&cfg(8, 2, 128), 2, 2).is_err());
    }
}
