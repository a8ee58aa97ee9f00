//! The engine: continuous batching over a paged KV cache.
//!
//! Each [`Engine::step`] admits waiting sequences whose prompt fits in free KV blocks, schedules
//! one decode token for every running sequence and prefill chunks for the rest within the
//! per-step token budget, runs one batched forward, samples, detokenizes and reports what
//! happened. When a decode cannot get a block, the lowest-priority, most recently admitted
//! sequence is preempted (its KV freed, reported as [`FinishReason::Preempted`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device};
use openinfer_core::{FinishReason, SamplingParams, SequenceId, StoppingParams};

use crate::batch::SeqChunk;
use crate::config::ModelConfig;
use crate::detokenize::{Detokenizer, StopMatcher};
use crate::error::{EngineError, Result};
use crate::kv_cache::{bytes_per_block, BlockAllocator, KvCache};
use crate::model::{argmax_rows, Llama, Precision};
use crate::model_dir::ModelDir;
use crate::sampling::{self, SampleContext, TokenLogprob};
use crate::step_budget::StepTimeBudget;
use crate::step_scheduler::{Limits, Plan, Planned, Scheduled, StepScheduler};
use crate::tokenizer::Tokenizer;
use crate::tp::plan::StepPlan;
use crate::tp::{Communicator, Shard};

pub use openinfer_core::MAX_TOP_LOGPROBS;

/// Limits and resources of an engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Compute device.
    pub device: Device,
    /// Compute dtype; `None` picks f32 on CPU and bf16 on CUDA.
    pub dtype: Option<DType>,
    /// Token slots per KV block.
    pub block_size: usize,
    /// Bytes of KV cache to allocate (K and V, all layers).
    pub kv_cache_bytes: usize,
    /// What the KV cache holds; `None` holds the compute dtype. A half type holds twice the
    /// tokens in the same memory and halves what attention reads, at half-precision
    /// rounding of keys and values (llama.cpp's default is f16).
    pub kv_cache_dtype: Option<DType>,
    /// Most sequences running at once.
    pub max_running: usize,
    /// Token budget of one step (decode tokens plus prefill chunks).
    pub max_batch_tokens: usize,
    /// The most a step that carries running decodes may take: prefill chunks beside them
    /// are sized to it ([`StepTimeBudget`]).
    pub step_time_budget: StepTimeBudget,
    /// Most sequences waiting for KV blocks on this engine.
    pub max_waiting: usize,
    /// Longest sequence accepted; `None` uses the model's `max_position_embeddings`.
    pub max_model_len: Option<usize>,
    /// Keep the KV of full prompt blocks after their sequence ends, and reuse it for later
    /// sequences that start with the same tokens (and the same cache salt).
    pub prefix_cache: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            device: Device::Cpu,
            dtype: None,
            block_size: 16,
            kv_cache_bytes: 512 << 20,
            kv_cache_dtype: None,
            max_running: 64,
            max_batch_tokens: 512,
            step_time_budget: StepTimeBudget::default(),
            max_waiting: 256,
            max_model_len: None,
            prefix_cache: true,
        }
    }
}

/// A sequence to run (new, or resumed with tokens generated before).
#[derive(Debug, Clone)]
pub struct SequenceRequest {
    /// Unique id on this engine.
    pub id: SequenceId,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Tokens generated before a preemption or migration.
    pub generated: Vec<u32>,
    /// Bytes of generated text the client already received (resume state).
    pub emitted_text_bytes: usize,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Stopping parameters.
    pub stopping: StoppingParams,
    /// Report log-probabilities of chosen tokens.
    pub logprobs: bool,
    /// Also report this many alternatives.
    pub top_logprobs: u32,
    /// Higher runs first when memory is short.
    pub priority: i32,
    /// Separates its cached KV from other tenants' (the router sends the tenant's name): a
    /// sequence reuses cached blocks only of its own salt, since a cache hit is a timing side
    /// channel.
    pub cache_salt: String,
}

impl SequenceRequest {
    /// A new greedy sequence of at most `max_new_tokens` tokens that stops at eos; adjust the
    /// public fields for anything else.
    pub fn greedy(id: SequenceId, prompt: Vec<u32>, max_new_tokens: u32) -> Self {
        SequenceRequest {
            id,
            prompt,
            generated: Vec::new(),
            emitted_text_bytes: 0,
            sampling: SamplingParams::default(),
            stopping: StoppingParams {
                max_new_tokens,
                stop: Vec::new(),
                ignore_eos: false,
            },
            logprobs: false,
            top_logprobs: 0,
            priority: 0,
            cache_salt: String::new(),
        }
    }
}

/// One generated token.
#[derive(Debug, Clone)]
pub struct TokenOutput {
    /// Its sequence.
    pub id: SequenceId,
    /// The token.
    pub token: u32,
    /// Text it completes (held-back stop-string prefixes excluded).
    pub text: String,
    /// Log-probabilities, when asked for.
    pub logprob: Option<TokenLogprob>,
}

/// A sequence that left the engine.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The sequence.
    pub id: SequenceId,
    /// Why.
    pub reason: FinishReason,
    /// Prompt length.
    pub prompt_tokens: usize,
    /// Tokens generated (resumed ones included).
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache when it was admitted.
    pub cached_prompt_tokens: usize,
    /// Detail for errors.
    pub message: String,
}

/// Free and used capacity, reported after every step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Blocks in the cache.
    pub total_blocks: usize,
    /// Blocks free now.
    pub free_blocks: usize,
    /// Slots per block.
    pub block_size: usize,
    /// Most running sequences.
    pub max_running: usize,
    /// Running now.
    pub running: usize,
    /// Waiting for blocks now.
    pub waiting: usize,
    /// Steps run so far.
    pub step: u64,
    /// What the prefix cache has done so far.
    pub prefix_cache: crate::kv_cache::PrefixCacheStats,
}

impl Capacity {
    /// Sequences that can still be accepted.
    pub fn free_slots(&self) -> usize {
        self.max_running.saturating_sub(self.running + self.waiting)
    }
}

/// What one step produced.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// Tokens generated this step, one per sampled sequence.
    pub tokens: Vec<TokenOutput>,
    /// Sequences that ended (including preempted ones).
    pub finished: Vec<Finished>,
    /// Capacity after the step.
    pub capacity: Capacity,
    /// Tokens that went through the forward pass.
    pub batch_tokens: usize,
    /// Sequences in the forward pass.
    pub batch_sequences: usize,
}

/// Static facts about a loaded engine.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    /// Model id (directory name).
    pub model: String,
    /// Architecture class name.
    pub architecture: String,
    /// Compute dtype.
    pub dtype: DType,
    /// What the KV cache holds.
    pub kv_cache_dtype: DType,
    /// Device description.
    pub device: String,
    /// Model vocabulary rows.
    pub vocab_size: usize,
    /// Longest sequence accepted.
    pub max_model_len: usize,
    /// KV blocks.
    pub total_blocks: usize,
    /// Slots per block.
    pub block_size: usize,
    /// Layers.
    pub num_layers: usize,
    /// KV heads.
    pub num_kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// Most running sequences.
    pub max_running: usize,
    /// Step token budget.
    pub max_batch_tokens: usize,
    /// End-of-sequence ids.
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<u32>,
    /// Whether text prompts get bos.
    pub add_bos_token: bool,
    /// Parameters of the model.
    pub num_parameters: usize,
    /// Ranks the model is split across (tensor parallelism).
    pub tp_size: usize,
    /// Bytes of weight matrices one decode step reads on this rank, as held in memory
    /// (quantized, half or f32): what bounds decode speed from memory bandwidth.
    pub step_weight_bytes: u64,
}

struct Sequence {
    id: SequenceId,
    prompt_len: usize,
    tokens: Vec<u32>,
    sampling: SamplingParams,
    stopping: StoppingParams,
    logprobs: Option<usize>,
    priority: i32,
    seed: u64,
    detok: Detokenizer,
    stop: StopMatcher,
    cache_salt: Vec<u8>,
    /// Tokens that came from the prefix cache at admission.
    cached: usize,
}

impl Scheduled for Sequence {
    fn id(&self) -> SequenceId {
        self.id
    }
    fn tokens(&self) -> usize {
        self.tokens.len()
    }
    fn priority(&self) -> i32 {
        self.priority
    }
    fn token_ids(&self) -> &[u32] {
        &self.tokens
    }
    fn cache_salt(&self) -> &[u8] {
        &self.cache_salt
    }
    fn admitted(&mut self, cached: usize) {
        self.cached = cached;
    }
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
    fn finished(&self, reason: FinishReason, message: String) -> Finished {
        Finished {
            id: self.id,
            reason,
            prompt_tokens: self.prompt_len,
            completion_tokens: self.generated(),
            cached_prompt_tokens: self.cached.min(self.prompt_len),
            message,
        }
    }
}

/// A model, its KV cache and the sequences it runs.
pub struct Engine {
    model: Llama,
    kv: KvCache,
    /// Waiting and running sequences, their KV blocks, each step's work.
    sched: StepScheduler<Sequence>,
    tokenizer: Tokenizer,
    info: EngineInfo,
    /// The other ranks of this engine's tensor-parallel group, told each step's inputs.
    group: Option<Arc<dyn Communicator>>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(g) = &self.group {
            // Followers stop on this; a group already broken has nobody left to tell.
            let _ = g.broadcast(&StepPlan::Stop.encode());
        }
    }
}

/// What loading a model directory (or one rank's shard of it) produces.
pub(crate) struct Loaded {
    pub model: Llama,
    pub kv: KvCache,
    pub total_blocks: usize,
    pub max_model_len: usize,
    pub dtype: DType,
}

impl Loaded {
    /// Loads this rank's shard (`comm`'s rank of its size; everything without one) and
    /// sizes its KV cache: `cfg.kv_cache_bytes` for the KV heads this rank holds.
    pub fn load(
        dir: &ModelDir,
        cfg: &EngineConfig,
        comm: Option<Arc<dyn Communicator>>,
        progress: &dyn Fn(usize, usize),
    ) -> Result<Self> {
        let mc = &dir.config;
        let shard = match &comm {
            Some(c) => Shard::new(mc, c.rank(), c.size())?,
            None => Shard::SINGLE,
        };
        let local = shard.local_config(mc);
        // A GGUF file without a dtype keeps its quantized tensors on CPU and computes in f32
        // (what candle's quantized kernels take); with a dtype, or on a GPU (its quantized
        // kernels are not wired here yet), it is dequantized at load. On CPU the arithmetic is
        // f32 whatever the weights' dtype: bf16 and f16 weights stay half in packed panels
        // and are widened in registers.
        let keep_quantized = dir.weights.is_gguf() && cfg.dtype.is_none() && cfg.device.is_cpu();
        let dtype = cfg
            .dtype
            .unwrap_or(if cfg.device.is_cpu() || keep_quantized {
                DType::F32
            } else {
                DType::BF16
            });
        let precision = Precision {
            compute: if cfg.device.is_cpu() {
                DType::F32
            } else {
                dtype
            },
            weights: dtype,
            keep_quantized,
        };
        if cfg.block_size == 0 || cfg.max_running == 0 || cfg.max_batch_tokens == 0 {
            return Err(EngineError::Config(
                "block size, max running sequences and max batch tokens must be positive".into(),
            ));
        }
        let kv_dtype = cfg.kv_cache_dtype.unwrap_or(precision.compute);
        if !matches!(kv_dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(EngineError::Config(format!(
                "a {kv_dtype:?} KV cache is not supported; use f32, f16 or bf16"
            )));
        }
        let per_block = bytes_per_block(
            local.num_layers,
            cfg.block_size,
            local.num_kv_heads,
            local.head_dim,
            kv_dtype,
        );
        let total_blocks = cfg.kv_cache_bytes / per_block;
        if total_blocks == 0 {
            return Err(EngineError::Config(format!(
                "--kv-cache-memory {} bytes holds no block of {per_block} bytes; raise it",
                cfg.kv_cache_bytes
            )));
        }
        let max_model_len = cfg
            .max_model_len
            .unwrap_or(mc.max_position_embeddings)
            .min(mc.max_position_embeddings)
            .min(total_blocks * cfg.block_size);
        let model = Llama::load(
            mc,
            shard,
            comm,
            &dir.weights,
            precision,
            &cfg.device,
            max_model_len + 1,
            progress,
        )?;
        tracing::info!(
            rank = shard.rank,
            tp = shard.size,
            weight_mib = model.weight_bytes() as f64 / f64::from(1 << 20),
            "weights loaded"
        );
        let kv = KvCache::new(
            local.num_layers,
            total_blocks * cfg.block_size,
            local.num_kv_heads * local.head_dim,
            kv_dtype,
            &cfg.device,
        )?;
        Ok(Loaded {
            model,
            kv,
            total_blocks,
            max_model_len,
            dtype,
        })
    }
}

impl Engine {
    /// Opens a model directory and loads it. `progress(done, total)` reports loading.
    pub fn load(dir: &Path, cfg: EngineConfig, progress: &dyn Fn(usize, usize)) -> Result<Self> {
        Self::from_model_dir(ModelDir::open(dir)?, cfg, progress)
    }

    /// Loads an opened model directory.
    pub fn from_model_dir(
        dir: ModelDir,
        cfg: EngineConfig,
        progress: &dyn Fn(usize, usize),
    ) -> Result<Self> {
        Self::build(dir, cfg, None, progress)
    }

    /// Loads rank 0's shard of a tensor-parallel group joined by `comm`. This engine
    /// schedules and samples for the group: before each forward it broadcasts the step's
    /// inputs, and the other ranks ([`Follower`](crate::tp::follower::Follower)) run the
    /// same forward on their shards. Dropping it stops the followers.
    pub fn from_model_dir_in_group(
        dir: ModelDir,
        cfg: EngineConfig,
        comm: Arc<dyn Communicator>,
        progress: &dyn Fn(usize, usize),
    ) -> Result<Self> {
        if comm.rank() != 0 {
            return Err(EngineError::Config(format!(
                "rank {} runs a follower, not an engine: only rank 0 schedules",
                comm.rank()
            )));
        }
        Self::build(dir, cfg, Some(comm), progress)
    }

    fn build(
        dir: ModelDir,
        cfg: EngineConfig,
        group: Option<Arc<dyn Communicator>>,
        progress: &dyn Fn(usize, usize),
    ) -> Result<Self> {
        let Loaded {
            model,
            kv,
            total_blocks,
            max_model_len,
            dtype,
        } = Loaded::load(&dir, &cfg, group.clone(), progress)?;
        let mc = &dir.config;
        let info = EngineInfo {
            model: dir.model_id(),
            architecture: mc.architecture.hf_name().into(),
            dtype,
            kv_cache_dtype: kv.dtype(),
            device: format!("{:?}", cfg.device.location()),
            vocab_size: mc.vocab_size,
            max_model_len,
            total_blocks,
            block_size: cfg.block_size,
            num_layers: mc.num_layers,
            num_kv_heads: mc.num_kv_heads,
            head_dim: mc.head_dim,
            max_running: cfg.max_running,
            max_batch_tokens: cfg.max_batch_tokens,
            eos_token_ids: dir.tokenizer.eos_token_ids.clone(),
            bos_token_id: dir.tokenizer.bos_token_id,
            add_bos_token: dir.tokenizer.add_bos_token,
            num_parameters: mc.num_parameters(),
            tp_size: group.as_ref().map_or(1, |g| g.size()),
            step_weight_bytes: model.step_weight_bytes() as u64,
        };
        tracing::info!(
            model = %info.model, architecture = %info.architecture, dtype = ?dtype,
            kv_cache_dtype = ?info.kv_cache_dtype, kv_blocks = total_blocks, block_size = cfg.block_size, max_model_len,
            "engine ready"
        );
        Ok(Engine {
            model,
            kv,
            sched: StepScheduler::new(
                BlockAllocator::with_prefix_cache(total_blocks, cfg.block_size, cfg.prefix_cache),
                Limits {
                    max_running: cfg.max_running,
                    max_waiting: cfg.max_waiting,
                    max_batch_tokens: cfg.max_batch_tokens,
                    step_time_budget: cfg.step_time_budget,
                },
            ),
            tokenizer: dir.tokenizer,
            info,
            group,
        })
    }

    /// How often an idle engine checks its tensor-parallel group (`None` without one).
    pub fn heartbeat_interval(&self) -> Option<std::time::Duration> {
        self.group
            .as_ref()
            .map(|_| std::time::Duration::from_secs(1))
    }

    /// Checks that every rank of the group still answers: a no-op step, then a barrier. An
    /// error means a rank is gone and the group can never step again.
    pub fn heartbeat(&mut self) -> Result<()> {
        if let Some(g) = &self.group {
            g.broadcast(&StepPlan::Ping.encode())?;
            g.barrier()?;
        }
        Ok(())
    }

    /// Static facts about the engine.
    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    /// The configuration of the loaded model.
    pub fn model_config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// True while any sequence waits or runs.
    pub fn has_work(&self) -> bool {
        self.sched.has_work()
    }

    /// Current capacity.
    pub fn capacity(&self) -> Capacity {
        self.sched.capacity()
    }

    /// The prefix cache's key changes since the last call (for routers' placement).
    pub fn take_cache_events(&mut self) -> crate::kv_cache::CacheEvents {
        self.sched.take_cache_events()
    }

    /// Checks `req` and queues it. Nothing changes when it is refused.
    pub fn add(&mut self, req: SequenceRequest) -> Result<()> {
        self.validate(&req)?;
        let prompt_len = req.prompt.len();
        let mut tokens = req.prompt;
        tokens.extend(&req.generated);
        let pending = if req.generated.is_empty() {
            String::new()
        } else {
            let text = self.tokenizer.decode(&req.generated)?;
            text.get(req.emitted_text_bytes.min(text.len())..)
                .unwrap_or_default()
                .to_string()
        };
        let seed = req.sampling.seed.unwrap_or_else(rand::random);
        self.sched.add(Sequence {
            id: req.id,
            prompt_len,
            detok: Detokenizer::new(&tokens),
            tokens,
            logprobs: req.logprobs.then_some(req.top_logprobs as usize),
            sampling: req.sampling,
            stop: StopMatcher::new(req.stopping.stop.clone(), pending),
            stopping: req.stopping,
            priority: req.priority,
            seed,
            cache_salt: req.cache_salt.into_bytes(),
            cached: 0,
        })
    }

    fn validate(&self, req: &SequenceRequest) -> Result<()> {
        let bad = |field: &'static str, message: String| {
            Err(EngineError::InvalidRequest { field, message })
        };
        if req.prompt.is_empty() {
            return bad(
                "prompt_ids",
                "the prompt is empty; give at least one token".into(),
            );
        }
        let vocab = self.info.vocab_size as u32;
        if let Some(t) = req
            .prompt
            .iter()
            .chain(&req.generated)
            .find(|&&t| t >= vocab)
        {
            return bad(
                "prompt_ids",
                format!("token id {t} is outside the vocabulary (size {vocab})"),
            );
        }
        openinfer_core::check_length(
            req.prompt.len(),
            req.generated.len(),
            req.stopping.max_new_tokens,
            self.info.max_model_len,
            &self.info.model,
        )
        .and_then(|()| req.sampling.check())
        .and_then(|()| openinfer_core::check_top_logprobs(req.top_logprobs))
        .map_err(|e| EngineError::InvalidRequest {
            field: e.field,
            message: e.message,
        })?;
        Ok(())
    }

    /// Cancels `id`, freeing its KV blocks now. `None` when it is not on this engine.
    pub fn cancel(&mut self, id: SequenceId) -> Option<Finished> {
        self.remove(id, FinishReason::Cancelled)
    }

    /// Preempts `id`: frees its KV; the caller resumes it later from prompt + generated.
    pub fn preempt(&mut self, id: SequenceId) -> Option<Finished> {
        self.remove(id, FinishReason::Preempted)
    }

    fn remove(&mut self, id: SequenceId, reason: FinishReason) -> Option<Finished> {
        self.retire(id, reason, String::new())
    }

    /// Takes `id` out of the scheduler (freeing its blocks) with `reason`.
    fn retire(
        &mut self,
        id: SequenceId,
        reason: FinishReason,
        message: String,
    ) -> Option<Finished> {
        self.sched
            .remove(id)
            .map(|seq| seq.finished(reason, message))
    }

    /// Runs one engine step. With nothing to do it returns an empty output at once.
    pub fn step(&mut self) -> Result<StepOutput> {
        let Plan {
            work: plan,
            preempted,
        } = self.sched.plan();
        let mut finished: Vec<Finished> = preempted
            .iter()
            .map(|s| s.finished(FinishReason::Preempted, "KV cache full".into()))
            .collect();
        let mut tokens: Vec<TokenOutput> = Vec::new();
        let (batch_tokens, batch_sequences) = (plan.iter().map(|p| p.len).sum(), plan.len());
        if !plan.is_empty() {
            match self.run(&plan) {
                Ok(t) => tokens = t,
                // The group is broken: no forward can run any more. The sequences stay as
                // they are; the worker stops and routers resume them elsewhere.
                Err(e @ EngineError::Collective(_)) => return Err(e),
                Err(e) => {
                    // A failed forward leaves the cache of the planned sequences unusable:
                    // fail them, keep serving the rest.
                    tracing::error!(error = %e, "engine step failed");
                    for p in &plan {
                        finished.extend(self.retire(p.id, FinishReason::Error, e.to_string()));
                    }
                }
            }
        }
        self.collect_finished(&mut tokens, &mut finished);
        Ok(StepOutput {
            tokens,
            finished,
            capacity: self.capacity(),
            batch_tokens,
            batch_sequences,
        })
    }

    /// Runs the forward pass for `plan` and samples the sequences whose input is complete.
    fn run(&mut self, plan: &[Planned]) -> Result<Vec<TokenOutput>> {
        let started = Instant::now();
        let running = self.sched.running();
        let index: HashMap<SequenceId, usize> = running
            .iter()
            .enumerate()
            .map(|(i, s)| (s.seq.id, i))
            .collect();
        let rows: Vec<usize> = plan.iter().map(|p| index[&p.id]).collect();
        let chunks: Vec<SeqChunk> = plan
            .iter()
            .zip(&rows)
            .map(|(p, &r)| {
                let s = &running[r];
                SeqChunk {
                    tokens: &s.seq.tokens[s.computed..s.computed + p.len],
                    start_pos: s.computed,
                    block_table: &s.blocks,
                    want_logits: s.computed + p.len == s.seq.tokens.len(),
                }
            })
            .collect();
        let batch = self.model.step_batch(&chunks, self.sched.block_size())?;
        let sampled: Vec<usize> = plan
            .iter()
            .zip(&rows)
            .filter(|(p, &r)| running[r].computed + p.len == running[r].seq.tokens.len())
            .map(|(_, &r)| r)
            .collect();
        if let Some(g) = &self.group {
            g.broadcast(&StepPlan::of(&chunks).encode())?;
        }
        let logits = self.model.forward(&batch, &self.kv)?;
        self.sched.advance(plan, started.elapsed());
        if sampled.is_empty() {
            return Ok(Vec::new());
        }
        let running = self.sched.running_mut();
        let all_greedy = sampled.iter().all(|&r| {
            let s = &running[r].seq;
            s.sampling.is_greedy() && !s.sampling.has_penalties() && s.logprobs.is_none()
        });
        let choices: Vec<(u32, Option<TokenLogprob>)> = if all_greedy {
            argmax_rows(&logits)?
                .into_iter()
                .map(|t| (t, None))
                .collect()
        } else {
            let mut rows_cpu = logits.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
            sampled
                .iter()
                .zip(rows_cpu.iter_mut())
                .map(|(&r, row)| {
                    let s = &running[r].seq;
                    sampling::sample(
                        row,
                        &s.sampling,
                        &SampleContext {
                            prompt: &s.tokens[..s.prompt_len],
                            generated: &s.tokens[s.prompt_len..],
                            seed: s.seed,
                            logprobs: s.logprobs,
                        },
                    )
                })
                .collect()
        };
        let mut out = Vec::with_capacity(sampled.len());
        for (&r, (token, logprob)) in sampled.iter().zip(choices) {
            let s = &mut running[r].seq;
            s.tokens.push(token);
            let delta = s.detok.push(&self.tokenizer, token)?;
            out.push(TokenOutput {
                id: s.id,
                token,
                text: delta,
                logprob,
            });
        }
        Ok(out)
    }

    /// Applies stop conditions to the tokens just produced, fixes up their text, and retires
    /// the sequences that ended.
    fn collect_finished(&mut self, tokens: &mut [TokenOutput], finished: &mut Vec<Finished>) {
        for t in tokens.iter_mut() {
            let Some(i) = self.sched.position(t.id) else {
                continue;
            };
            let s = &mut self.sched.running_mut()[i].seq;
            let outcome = s.stop.push(&t.text);
            t.text = outcome.emit;
            let reason = if outcome.stopped {
                Some(FinishReason::Stop)
            } else if !s.stopping.ignore_eos && self.tokenizer.is_eos(t.token) {
                Some(FinishReason::Eos)
            } else if s.generated() >= s.stopping.max_new_tokens as usize
                || s.tokens.len() >= self.info.max_model_len
            {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(reason) = reason {
                if reason != FinishReason::Stop {
                    match s.detok.flush(&self.tokenizer) {
                        Ok(rest) => {
                            let outcome = s.stop.push(&rest);
                            t.text.push_str(&outcome.emit);
                        }
                        Err(e) => tracing::warn!(error = %e, "detokenizer flush failed"),
                    }
                    t.text.push_str(&s.stop.flush());
                }
                finished.extend(self.retire(t.id, reason, String::new()));
            }
        }
    }
}
