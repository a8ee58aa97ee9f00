//! A rank other than 0 of a tensor-parallel group: it loads its shard, then runs the forward
//! of every step rank 0 broadcasts, until rank 0 stops the group or a rank is lost.

use std::sync::Arc;

use super::plan::StepPlan;
use super::Communicator;
use crate::engine::{EngineConfig, Loaded};
use crate::error::{EngineError, Result};
use crate::model_dir::ModelDir;

/// One follower rank: its shard of the model and of the KV cache.
pub struct Follower {
    loaded: Loaded,
    block_size: usize,
    comm: Arc<dyn Communicator>,
}

impl Follower {
    /// Loads `comm`'s rank's shard of the model in `dir`, with the same engine settings as
    /// rank 0 (they size the KV cache, which must match rank 0's block for block).
    pub fn load(
        dir: &ModelDir,
        cfg: &EngineConfig,
        comm: Arc<dyn Communicator>,
        progress: &dyn Fn(usize, usize),
    ) -> Result<Self> {
        if comm.rank() == 0 {
            return Err(EngineError::Config(
                "rank 0 runs the engine, not a follower".into(),
            ));
        }
        Ok(Follower {
            loaded: Loaded::load(dir, cfg, Some(comm.clone()), progress)?,
            block_size: cfg.block_size,
            comm,
        })
    }

    /// Bytes of weights this rank holds.
    pub fn weight_bytes(&self) -> usize {
        self.loaded.model.weight_bytes()
    }

    /// Runs steps until rank 0 stops the group (`Ok`) or the group breaks (`Err`).
    pub fn run(&self) -> Result<()> {
        let model = &self.loaded.model;
        loop {
            let plan = StepPlan::decode(&self.comm.broadcast(&[])?)?;
            let chunks = match plan {
                StepPlan::Stop => return Ok(()),
                StepPlan::Ping => {
                    self.comm.barrier()?;
                    continue;
                }
                StepPlan::Step(chunks) => chunks,
            };
            let chunks: Vec<_> = chunks.iter().map(|c| c.as_chunk()).collect();
            let batch = model.step_batch(&chunks, self.block_size)?;
            model.forward(&batch, &self.loaded.kv)?;
        }
    }
}
