//! What a worker's engine loop drives: the real [`Engine`] or the [`SimEngine`], which makes
//! tokens at a fixed rate without a model (for router benchmarks and load tests).
//!
//! [`SimEngine`]: crate::sim::SimEngine

use openinfer_core::SequenceId;

use crate::engine::{Capacity, Engine, EngineInfo, Finished, SequenceRequest, StepOutput};
use crate::error::Result;
use crate::kv_cache::CacheEvents;
use crate::tokenizer::Tokenizer;

/// An iteration-level scheduler with a KV budget: sequences are added, stepped, cancelled or
/// preempted; every step reports tokens, completions and the capacity left.
pub trait Backend: Send + 'static {
    /// Static facts: model, limits, KV geometry.
    fn info(&self) -> &EngineInfo;
    /// The tokenizer prompts are encoded with.
    fn tokenizer(&self) -> &Tokenizer;
    /// True while any sequence waits or runs.
    fn has_work(&self) -> bool;
    /// Free KV blocks and sequence slots now.
    fn capacity(&self) -> Capacity;
    /// Checks and queues a sequence; nothing changes when it is refused.
    fn add(&mut self, req: SequenceRequest) -> Result<()>;
    /// Cancels a sequence, freeing its KV at once.
    fn cancel(&mut self, id: SequenceId) -> Option<Finished>;
    /// Preempts a sequence: frees its KV; the caller resumes it later.
    fn preempt(&mut self, id: SequenceId) -> Option<Finished>;
    /// Runs one step.
    fn step(&mut self) -> Result<StepOutput>;
    /// The prefix cache's key changes since the last call (none without a cache).
    fn take_cache_events(&mut self) -> CacheEvents {
        CacheEvents::default()
    }
    /// How often an idle engine must [`heartbeat`](Backend::heartbeat) (`None`: never).
    fn heartbeat_interval(&self) -> Option<std::time::Duration> {
        None
    }
    /// Checks, while idle, that everything the engine depends on is still there (the other
    /// ranks of its tensor-parallel group); an error means it can never step again.
    fn heartbeat(&mut self) -> Result<()> {
        Ok(())
    }
}

impl Backend for Engine {
    fn info(&self) -> &EngineInfo {
        Engine::info(self)
    }
    fn tokenizer(&self) -> &Tokenizer {
        Engine::tokenizer(self)
    }
    fn has_work(&self) -> bool {
        Engine::has_work(self)
    }
    fn capacity(&self) -> Capacity {
        Engine::capacity(self)
    }
    fn add(&mut self, req: SequenceRequest) -> Result<()> {
        Engine::add(self, req)
    }
    fn cancel(&mut self, id: SequenceId) -> Option<Finished> {
        Engine::cancel(self, id)
    }
    fn preempt(&mut self, id: SequenceId) -> Option<Finished> {
        Engine::preempt(self, id)
    }
    fn step(&mut self) -> Result<StepOutput> {
        Engine::step(self)
    }
    fn take_cache_events(&mut self) -> CacheEvents {
        Engine::take_cache_events(self)
    }
    fn heartbeat_interval(&self) -> Option<std::time::Duration> {
        Engine::heartbeat_interval(self)
    }
    fn heartbeat(&mut self) -> Result<()> {
        Engine::heartbeat(self)
    }
}
