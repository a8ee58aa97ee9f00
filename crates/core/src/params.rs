//! Per-sequence parameters and outcomes.

use serde::{Deserialize, Serialize};

/// Identifies one sequence on one worker. The router chooses it; it is unique per worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SequenceId(pub u64);

impl std::fmt::Display for SequenceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "seq-{}", self.0)
    }
}

/// How the next token is chosen. `temperature` absent or 0 means greedy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Softmax temperature; absent or 0 selects greedy decoding.
    pub temperature: Option<f32>,
    /// Nucleus sampling: keep the smallest set of tokens whose probability sum reaches this.
    pub top_p: Option<f32>,
    /// Keep only the `top_k` most likely tokens (0 = no limit).
    pub top_k: Option<u32>,
    /// Drop tokens whose probability is below `min_p` times the most likely one's.
    pub min_p: Option<f32>,
    /// HF-style multiplicative penalty on tokens already in the prompt or output (1 = off).
    pub repetition_penalty: Option<f32>,
    /// OpenAI-style penalty proportional to how often a token was generated.
    pub frequency_penalty: Option<f32>,
    /// OpenAI-style penalty on any token generated at least once.
    pub presence_penalty: Option<f32>,
    /// Seed: the same seed gives the same output, whatever else is in the batch.
    pub seed: Option<u64>,
}

impl SamplingParams {
    /// True when the next token is the arg-max of the (penalised) logits.
    pub fn is_greedy(&self) -> bool {
        self.temperature.is_none_or(|t| t == 0.0)
    }

    /// True when any penalty changes the logits.
    pub fn has_penalties(&self) -> bool {
        self.repetition_penalty.is_some_and(|p| p != 1.0)
            || self.frequency_penalty.is_some_and(|p| p != 0.0)
            || self.presence_penalty.is_some_and(|p| p != 0.0)
    }
}

/// When a sequence stops.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoppingParams {
    /// Upper bound on generated tokens (counting those generated before a resume).
    pub max_new_tokens: u32,
    /// Stop strings: matched across token boundaries, never included in the output text.
    pub stop: Vec<String>,
    /// Keep generating after an end-of-sequence token.
    pub ignore_eos: bool,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FinishReason {
    /// `max_new_tokens` (or the model's context) reached.
    Length,
    /// A stop string matched.
    Stop,
    /// The model produced an end-of-sequence token.
    Eos,
    /// The caller cancelled it.
    Cancelled,
    /// It failed; the event carries a message.
    Error,
    /// Its KV was freed to make room; it is resumed later from prompt + generated tokens.
    Preempted,
    /// It was never started (no capacity or invalid input).
    Rejected,
}

impl FinishReason {
    /// The wire name used by the public API (`length`, `stop`, `eos`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::Eos => "eos",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Error => "error",
            FinishReason::Preempted => "preempted",
            FinishReason::Rejected => "rejected",
        }
    }
}
