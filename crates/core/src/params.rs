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
    /// Every reason.
    pub const ALL: [FinishReason; 7] = [
        FinishReason::Length,
        FinishReason::Stop,
        FinishReason::Eos,
        FinishReason::Cancelled,
        FinishReason::Error,
        FinishReason::Preempted,
        FinishReason::Rejected,
    ];

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

/// Most alternatives a request may ask log-probabilities for.
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// A request field that breaks its rule; the message says what to send instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidField {
    /// The offending field, as named in the public API.
    pub field: &'static str,
    /// What is wrong and what to do.
    pub message: String,
}

impl InvalidField {
    /// A broken rule on `field`.
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        InvalidField {
            field,
            message: message.into(),
        }
    }
}

impl SamplingParams {
    /// Checks every parameter's range (the same rules on the router and the worker).
    pub fn check(&self) -> Result<(), InvalidField> {
        let bad = |field, message: &str| Err(InvalidField::new(field, message));
        if self
            .temperature
            .is_some_and(|t| !(t >= 0.0 && t.is_finite()))
        {
            return bad("temperature", "must be a finite number ≥ 0 (0 = greedy)");
        }
        if self.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
            return bad("top_p", "must be in (0, 1]");
        }
        if self.min_p.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
            return bad("min_p", "must be in [0, 1]");
        }
        if self
            .repetition_penalty
            .is_some_and(|p| !(p > 0.0 && p.is_finite()))
        {
            return bad(
                "repetition_penalty",
                "must be a finite number > 0 (1 = off)",
            );
        }
        if self
            .frequency_penalty
            .is_some_and(|p| !(-2.0..=2.0).contains(&p))
        {
            return bad("frequency_penalty", "must be in [-2, 2]");
        }
        if self
            .presence_penalty
            .is_some_and(|p| !(-2.0..=2.0).contains(&p))
        {
            return bad("presence_penalty", "must be in [-2, 2]");
        }
        Ok(())
    }
}

/// Checks the number of log-probability alternatives asked for.
pub fn check_top_logprobs(top_logprobs: u32) -> Result<(), InvalidField> {
    if top_logprobs > MAX_TOP_LOGPROBS {
        return Err(InvalidField::new(
            "top_logprobs",
            format!("at most {MAX_TOP_LOGPROBS}"),
        ));
    }
    Ok(())
}

/// The length rules of a sequence, the same wherever one is checked (the router before it
/// queues a request, the engine and the sim engine when a sequence arrives, resumed or not):
/// the prompt leaves room in the context, at least one token is asked for, and prompt plus
/// output (`max_new_tokens`, or what a resumed sequence already generated if that is more)
/// fit the context. `model` names the model in the messages.
pub fn check_length(
    prompt: usize,
    generated: usize,
    max_new_tokens: u32,
    context: usize,
    model: &str,
) -> Result<(), InvalidField> {
    if prompt >= context {
        return Err(InvalidField::new(
            "prompt",
            format!("{prompt} tokens leave no room to generate in the context of `{model}` ({context} tokens); shorten it"),
        ));
    }
    if max_new_tokens == 0 {
        return Err(InvalidField::new("max_new_tokens", "must be at least 1"));
    }
    let room = context - prompt;
    if (max_new_tokens as usize).max(generated) > room {
        return Err(InvalidField::new(
            "max_new_tokens",
            format!("prompt ({prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context of `{model}` ({context} tokens); at most {room} fit"),
        ));
    }
    Ok(())
}

/// Prepends `bos` when the model wants one and the tokenizer did not add it.
pub fn with_bos(mut ids: Vec<u32>, bos: Option<u32>, add_bos: bool) -> Vec<u32> {
    if let (true, Some(bos)) = (add_bos, bos) {
        if ids.first() != Some(&bos) {
            ids.insert(0, bos);
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_rules_name_the_field_to_change() {
        assert!(check_length(10, 0, 5, 16, "m").is_ok());
        assert!(check_length(10, 0, 6, 16, "m").is_ok());
        let field = |r: Result<(), InvalidField>| r.unwrap_err().field;
        assert_eq!(field(check_length(16, 0, 1, 16, "m")), "prompt");
        assert_eq!(field(check_length(10, 0, 0, 16, "m")), "max_new_tokens");
        let e = check_length(10, 0, 7, 16, "m").unwrap_err();
        assert_eq!(e.field, "max_new_tokens");
        assert!(
            e.message.contains("at most 6 fit") && e.message.contains("`m`"),
            "{e}"
        );
        // A resumed sequence counts what it already generated.
        assert_eq!(field(check_length(10, 7, 5, 16, "m")), "max_new_tokens");
    }
}
