//! A simulated engine: no model, a fixed step time instead of a forward pass. Everything else
//! is the real engine's: the same step scheduler (admission, KV blocks and their reserve,
//! preemption, prefill chunks within the token budget), so admission, credits and preemption
//! behave as on a model. Used to measure the router alone and to load-test a cluster on any
//! machine.
//!
//! Tokens cycle through the tokenization of a fixed English text, so the text deltas are
//! readable and resumed sequences continue exactly where they stopped. Stop strings and eos do
//! not apply: a sequence runs to `max_new_tokens`.

use std::time::{Duration, Instant};

use candle_core::DType;
use openinfer_core::{FinishReason, SequenceId};

use crate::backend::Backend;
use crate::engine::{Capacity, EngineInfo, Finished, SequenceRequest, StepOutput, TokenOutput};
use crate::error::{EngineError, Result};
use crate::kv_cache::BlockAllocator;
use crate::make_model::byte_level_bpe;
use crate::step_scheduler::{Limits, Plan, Scheduled, StepScheduler};
use crate::tokenizer::Tokenizer;

const TEXT: &str = "The quick brown fox jumps over the lazy dog, and the dog does not mind. ";

/// Shape and speed of a simulated engine.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Model id announced.
    pub model: String,
    /// Time one step takes, whatever the batch.
    pub step_time: Duration,
    /// KV blocks.
    pub total_blocks: usize,
    /// Slots per block.
    pub block_size: usize,
    /// Most running sequences.
    pub max_running: usize,
    /// Token budget of one step (decode tokens plus prefill chunks).
    pub max_batch_tokens: usize,
    /// Most sequences waiting for blocks.
    pub max_waiting: usize,
    /// Longest sequence.
    pub max_model_len: usize,
    /// Vocabulary of the byte-level tokenizer.
    pub vocab_size: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            model: "sim".into(),
            step_time: Duration::from_millis(10),
            total_blocks: 65_536,
            block_size: 16,
            max_running: 256,
            max_batch_tokens: crate::EngineConfig::default().max_batch_tokens,
            max_waiting: 256,
            max_model_len: 4096,
            vocab_size: 1024,
        }
    }
}

struct SimSeq {
    id: SequenceId,
    prompt_len: usize,
    /// Tokens generated, counting those before a resume.
    generated: usize,
    max_new: usize,
    priority: i32,
}

impl Scheduled for SimSeq {
    fn id(&self) -> SequenceId {
        self.id
    }
    fn tokens(&self) -> usize {
        self.prompt_len + self.generated
    }
    fn priority(&self) -> i32 {
        self.priority
    }
}

impl SimSeq {
    fn finished(&self, reason: FinishReason) -> Finished {
        Finished {
            id: self.id,
            reason,
            prompt_tokens: self.prompt_len,
            completion_tokens: self.generated,
            cached_prompt_tokens: 0,
            message: String::new(),
        }
    }
}

/// The simulated engine.
pub struct SimEngine {
    cfg: SimConfig,
    info: EngineInfo,
    tokenizer: Tokenizer,
    /// The token cycle and each token's text.
    cycle: Vec<(u32, String)>,
    sched: StepScheduler<SimSeq>,
    next_step: Option<Instant>,
}

impl SimEngine {
    /// A simulated engine of the given shape.
    pub fn new(cfg: SimConfig) -> Result<Self> {
        if cfg.block_size == 0
            || cfg.total_blocks == 0
            || cfg.max_running == 0
            || cfg.max_batch_tokens == 0
        {
            return Err(EngineError::Config(
                "sim engine: block size, KV blocks, max running and max batch tokens must be positive".into(),
            ));
        }
        let json = serde_json::to_vec(&byte_level_bpe(cfg.vocab_size))
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let inner = tokenizers::Tokenizer::from_bytes(json)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let tokenizer = Tokenizer::from_parts(inner, Some(1), vec![2], true);
        let ids = tokenizer.encode_prompt(TEXT)?;
        let cycle = ids[1..]
            .iter()
            .map(|&id| Ok((id, tokenizer.decode(&[id])?)))
            .collect::<Result<Vec<_>>>()?;
        let info = EngineInfo {
            model: cfg.model.clone(),
            architecture: "sim".into(),
            dtype: DType::F32,
            kv_cache_dtype: DType::F32,
            device: format!("sim ({:?} per step)", cfg.step_time),
            vocab_size: cfg.vocab_size,
            max_model_len: cfg.max_model_len,
            total_blocks: cfg.total_blocks,
            block_size: cfg.block_size,
            num_layers: 0,
            num_kv_heads: 0,
            head_dim: 0,
            max_running: cfg.max_running,
            max_batch_tokens: cfg.max_batch_tokens,
            eos_token_ids: vec![2],
            bos_token_id: Some(1),
            add_bos_token: true,
            num_parameters: 0,
            tp_size: 1,
            step_weight_bytes: 0,
        };
        Ok(SimEngine {
            sched: StepScheduler::new(
                BlockAllocator::new(cfg.total_blocks, cfg.block_size),
                Limits {
                    max_running: cfg.max_running,
                    max_waiting: cfg.max_waiting,
                    max_batch_tokens: cfg.max_batch_tokens,
                    // Its step time does not depend on what a step carries.
                    step_time_budget: crate::StepTimeBudget::Off,
                },
            ),
            cfg,
            info,
            tokenizer,
            cycle,
            next_step: None,
        })
    }

    fn remove(&mut self, id: SequenceId, reason: FinishReason) -> Option<Finished> {
        self.sched.remove(id).map(|s| s.finished(reason))
    }

    /// Waits out the rest of the step time (the "compute").
    fn pace(&mut self) {
        let now = Instant::now();
        let due = match self.next_step {
            Some(t) if t > now => t,
            _ => now + self.cfg.step_time,
        };
        std::thread::sleep(due.saturating_duration_since(now));
        self.next_step = Some(due + self.cfg.step_time);
    }
}

impl Backend for SimEngine {
    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    fn has_work(&self) -> bool {
        self.sched.has_work()
    }

    fn capacity(&self) -> Capacity {
        self.sched.capacity()
    }

    fn add(&mut self, req: SequenceRequest) -> Result<()> {
        let bad = |field, message: &str| {
            Err(EngineError::InvalidRequest {
                field,
                message: message.into(),
            })
        };
        if req.prompt.is_empty() {
            return bad("prompt_ids", "the prompt is empty");
        }
        openinfer_core::check_length(
            req.prompt.len(),
            req.generated.len(),
            req.stopping.max_new_tokens,
            self.cfg.max_model_len,
            &self.cfg.model,
        )
        .map_err(|e| EngineError::InvalidRequest {
            field: e.field,
            message: e.message,
        })?;
        let idle = !self.has_work();
        self.sched.add(SimSeq {
            id: req.id,
            prompt_len: req.prompt.len(),
            generated: req.generated.len(),
            max_new: req.stopping.max_new_tokens as usize,
            priority: req.priority,
        })?;
        if idle {
            // Work after idleness takes a whole step, as a real forward would.
            self.next_step = None;
        }
        Ok(())
    }

    fn cancel(&mut self, id: SequenceId) -> Option<Finished> {
        self.remove(id, FinishReason::Cancelled)
    }

    fn preempt(&mut self, id: SequenceId) -> Option<Finished> {
        self.remove(id, FinishReason::Preempted)
    }

    fn step(&mut self) -> Result<StepOutput> {
        let Plan { work, preempted } = self.sched.plan();
        let mut finished: Vec<Finished> = preempted
            .iter()
            .map(|s| s.finished(FinishReason::Preempted))
            .collect();
        let mut tokens = Vec::new();
        if !work.is_empty() {
            // The "forward pass".
            self.pace();
            self.sched.advance(&work, self.cfg.step_time);
        }
        let max_model_len = self.cfg.max_model_len;
        let mut ended = Vec::new();
        for slot in self.sched.running_mut() {
            let s = &mut slot.seq;
            // Sampled when its input is complete: prefill done, or a decode just computed
            // (only this step's work can leave a sequence with every token computed).
            if slot.computed != s.tokens() {
                continue;
            }
            let (token, text) = self.cycle[s.generated % self.cycle.len()].clone();
            s.generated += 1;
            tokens.push(TokenOutput {
                id: s.id,
                token,
                text,
                logprob: None,
            });
            if s.generated >= s.max_new || s.tokens() >= max_model_len {
                ended.push(s.id);
            }
        }
        for id in ended {
            finished.extend(self.remove(id, FinishReason::Length));
        }
        Ok(StepOutput {
            batch_tokens: work.iter().map(|p| p.len).sum(),
            batch_sequences: work.len(),
            tokens,
            finished,
            capacity: self.capacity(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(id: u64, prompt: usize, max_new: u32) -> SequenceRequest {
        SequenceRequest::greedy(SequenceId(id), vec![5; prompt], max_new)
    }

    #[test]
    fn one_token_per_step_at_the_step_time_and_blocks_come_back() {
        let mut e = SimEngine::new(SimConfig {
            step_time: Duration::from_millis(5),
            ..SimConfig::default()
        })
        .unwrap();
        let total = e.capacity().free_blocks;
        e.add(seq(1, 10, 4)).unwrap();
        e.add(seq(2, 3, 2)).unwrap();
        let start = Instant::now();
        let mut text = String::new();
        let mut finished = Vec::new();
        while e.has_work() {
            let out = e.step().unwrap();
            text.extend(
                out.tokens
                    .iter()
                    .filter(|t| t.id.0 == 1)
                    .map(|t| t.text.clone()),
            );
            finished.extend(out.finished);
        }
        assert!(
            start.elapsed() >= Duration::from_millis(20),
            "4 steps of 5 ms"
        );
        assert!(TEXT.starts_with(&text), "{text:?}");
        assert_eq!(finished.len(), 2);
        assert!(finished.iter().all(|f| f.reason == FinishReason::Length));
        assert_eq!(e.capacity().free_blocks, total);
    }

    #[test]
    fn a_full_cache_preempts_the_newest_lowest_priority_sequence() {
        let mut e = SimEngine::new(SimConfig {
            step_time: Duration::ZERO,
            total_blocks: 3,
            block_size: 4,
            ..SimConfig::default()
        })
        .unwrap();
        e.add(seq(1, 3, 20)).unwrap();
        e.add(seq(2, 3, 20)).unwrap();
        let mut preempted = Vec::new();
        for _ in 0..8 {
            preempted.extend(
                e.step()
                    .unwrap()
                    .finished
                    .into_iter()
                    .filter(|f| f.reason == FinishReason::Preempted)
                    .map(|f| f.id.0),
            );
        }
        assert_eq!(preempted, [2]);
        assert!(e.preempt(SequenceId(1)).is_some());
        assert_eq!(e.capacity().free_blocks, 3);
    }

    /// The sim schedules as the engine does (one step scheduler): long prompts are prefilled
    /// in chunks of the token budget, and admission keeps the engine's free-block reserve.
    #[test]
    fn prefill_is_chunked_and_admission_keeps_the_reserve_as_on_the_engine() {
        let mut e = SimEngine::new(SimConfig {
            step_time: Duration::ZERO,
            total_blocks: 10,
            block_size: 4,
            max_batch_tokens: 4,
            ..SimConfig::default()
        })
        .unwrap();
        e.add(seq(1, 10, 5)).unwrap();
        let steps: Vec<usize> = (0..3).map(|_| e.step().unwrap().tokens.len()).collect();
        assert_eq!(
            steps,
            [0, 0, 1],
            "10 prompt tokens in chunks of 4, then a token"
        );
        // 3 blocks held, 7 free: a 7-block prompt would leave no reserve and waits.
        e.add(seq(2, 28, 1)).unwrap();
        e.step().unwrap();
        assert_eq!(e.capacity().waiting, 1);
        assert_eq!(e.capacity().running, 1);
    }
}
