//! A simulated engine: no model, one token per running sequence per step at a fixed step time,
//! with real KV-block accounting (so admission, credits and preemption behave as on a model).
//! Used to measure the router alone and to load-test a cluster on any machine.
//!
//! Tokens cycle through the tokenization of a fixed English text, so the text deltas are
//! readable and resumed sequences continue exactly where they stopped. Stop strings and eos do
//! not apply: a sequence runs to `max_new_tokens`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use candle_core::DType;
use openinfer_core::{FinishReason, SequenceId};

use crate::backend::Backend;
use crate::engine::{Capacity, EngineInfo, Finished, SequenceRequest, StepOutput, TokenOutput};
use crate::error::{EngineError, Result};
use crate::kv_cache::BlockAllocator;
use crate::make_model::byte_level_bpe;
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
    blocks: Vec<u32>,
    priority: i32,
    arrival: u64,
}

impl SimSeq {
    fn len(&self) -> usize {
        self.prompt_len + self.generated
    }

    fn finished(&self, reason: FinishReason) -> Finished {
        Finished {
            id: self.id,
            reason,
            prompt_tokens: self.prompt_len,
            completion_tokens: self.generated,
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
    alloc: BlockAllocator,
    running: Vec<SimSeq>,
    waiting: VecDeque<SimSeq>,
    steps: u64,
    arrivals: u64,
    next_step: Option<Instant>,
}

impl SimEngine {
    /// A simulated engine of the given shape.
    pub fn new(cfg: SimConfig) -> Result<Self> {
        if cfg.block_size == 0 || cfg.total_blocks == 0 || cfg.max_running == 0 {
            return Err(EngineError::Config(
                "sim engine: block size, KV blocks and max running must be positive".into(),
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
            device: format!("sim ({:?} per step)", cfg.step_time),
            vocab_size: cfg.vocab_size,
            max_model_len: cfg.max_model_len,
            total_blocks: cfg.total_blocks,
            block_size: cfg.block_size,
            num_layers: 0,
            num_kv_heads: 0,
            head_dim: 0,
            max_running: cfg.max_running,
            max_batch_tokens: cfg.max_running,
            eos_token_ids: vec![2],
            bos_token_id: Some(1),
            add_bos_token: true,
            num_parameters: 0,
            tp_size: 1,
        };
        Ok(SimEngine {
            alloc: BlockAllocator::new(cfg.total_blocks, cfg.block_size),
            cfg,
            info,
            tokenizer,
            cycle,
            running: Vec::new(),
            waiting: VecDeque::new(),
            steps: 0,
            arrivals: 0,
            next_step: None,
        })
    }

    fn take(&mut self, id: SequenceId) -> Option<SimSeq> {
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            return Some(self.running.swap_remove(i));
        }
        let i = self.waiting.iter().position(|s| s.id == id)?;
        self.waiting.remove(i)
    }

    fn remove(&mut self, id: SequenceId, reason: FinishReason) -> Option<Finished> {
        let mut seq = self.take(id)?;
        self.alloc.release(&mut seq.blocks);
        Some(seq.finished(reason))
    }

    /// Moves waiting sequences into the batch while slots and blocks last.
    fn admit(&mut self) {
        while self.running.len() < self.cfg.max_running {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            let need = seq.len() + 1;
            if !self.alloc.grow(&mut seq.blocks, need) {
                self.waiting.push_front(seq);
                break;
            }
            self.running.push(seq);
        }
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
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    fn capacity(&self) -> Capacity {
        Capacity {
            total_blocks: self.alloc.total(),
            free_blocks: self.alloc.free(),
            block_size: self.cfg.block_size,
            max_running: self.cfg.max_running,
            running: self.running.len(),
            waiting: self.waiting.len(),
            step: self.steps,
        }
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
        let max_new = req.stopping.max_new_tokens as usize;
        if self
            .running
            .iter()
            .chain(&self.waiting)
            .any(|s| s.id == req.id)
        {
            return Err(EngineError::DuplicateSequence(req.id.0));
        }
        if self.waiting.len() >= self.cfg.max_waiting {
            return Err(EngineError::Capacity(format!(
                "{} sequences already wait on this worker",
                self.waiting.len()
            )));
        }
        if !self.has_work() {
            // Work after idleness takes a whole step, as a real forward would.
            self.next_step = None;
        }
        self.arrivals += 1;
        self.waiting.push_back(SimSeq {
            id: req.id,
            prompt_len: req.prompt.len(),
            generated: req.generated.len(),
            max_new,
            blocks: Vec::new(),
            priority: req.priority,
            arrival: self.arrivals,
        });
        Ok(())
    }

    fn cancel(&mut self, id: SequenceId) -> Option<Finished> {
        self.remove(id, FinishReason::Cancelled)
    }

    fn preempt(&mut self, id: SequenceId) -> Option<Finished> {
        self.remove(id, FinishReason::Preempted)
    }

    fn step(&mut self) -> Result<StepOutput> {
        self.admit();
        self.pace();
        self.steps += 1;
        let mut out = StepOutput {
            tokens: Vec::with_capacity(self.running.len()),
            finished: Vec::new(),
            capacity: self.capacity(),
            batch_tokens: self.running.len(),
            batch_sequences: self.running.len(),
        };
        // Each sequence needs room for the token after this one; on shortage the
        // lowest-priority, newest sequence is preempted, as on the real engine.
        let mut i = 0;
        while i < self.running.len() {
            let need = self.running[i].len() + 2;
            let mut blocks = std::mem::take(&mut self.running[i].blocks);
            let grown = self.alloc.grow(&mut blocks, need);
            self.running[i].blocks = blocks;
            if grown {
                i += 1;
                continue;
            }
            let victim = (0..self.running.len())
                .min_by_key(|&j| {
                    let s = &self.running[j];
                    (s.priority, std::cmp::Reverse(s.arrival))
                })
                .unwrap_or(i);
            let mut seq = self.running.swap_remove(victim);
            self.alloc.release(&mut seq.blocks);
            out.finished.push(seq.finished(FinishReason::Preempted));
            i = 0;
        }
        let mut k = 0;
        while k < self.running.len() {
            let s = &mut self.running[k];
            let (token, text) = self.cycle[s.generated % self.cycle.len()].clone();
            s.generated += 1;
            out.tokens.push(TokenOutput {
                id: s.id,
                token,
                text,
                logprob: None,
            });
            if s.generated >= s.max_new {
                let mut seq = self.running.swap_remove(k);
                self.alloc.release(&mut seq.blocks);
                out.finished.push(seq.finished(FinishReason::Length));
            } else {
                k += 1;
            }
        }
        out.capacity = self.capacity();
        Ok(out)
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
}
