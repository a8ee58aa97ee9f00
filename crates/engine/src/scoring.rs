//! Next-token scores of a given token sequence (teacher forcing): one forward over the whole
//! sequence, and for each scored position the log-probability the model gives the token that
//! follows there and the model's own top choice. [`perplexity`](crate::perplexity) scores
//! text with it; `openinfer parity` holds half precision to a reference with it, position by
//! position, whatever the model would have generated itself.

use candle_core::{DType, Tensor, D};

use crate::batch::SeqChunk;
use crate::engine::{EngineConfig, Loaded};
use crate::error::{EngineError, Result};
use crate::model_dir::ModelDir;

/// The model's view of one position of a scored sequence.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct NextToken {
    /// Log-probability of the token that follows in the sequence.
    pub logprob: f32,
    /// The token the model ranks first there.
    pub top: u32,
}

/// Scores positions `from..tokens.len() - 1` of `tokens` (each against the token after it)
/// in one forward from position 0, in the KV cache's first blocks.
pub(crate) fn score(
    loaded: &Loaded,
    block_size: usize,
    tokens: &[u32],
    from: usize,
) -> Result<Vec<NextToken>> {
    if tokens.len() < 2 || from + 1 >= tokens.len() {
        return Ok(Vec::new());
    }
    if tokens.len() > loaded.max_model_len {
        return Err(EngineError::Config(format!(
            "{} tokens to score, more than the model's {} (or the KV cache's); shorten them or raise --kv-cache-memory",
            tokens.len(),
            loaded.max_model_len
        )));
    }
    let model = &loaded.model;
    let device = model.device().clone();
    let blocks: Vec<u32> = (0..tokens.len().div_ceil(block_size) as u32).collect();
    let chunk = SeqChunk {
        tokens,
        start_pos: 0,
        block_table: &blocks,
        want_logits: true,
    };
    let mut batch = model.step_batch(&[chunk], block_size)?;
    let rows: Vec<u32> = (from as u32..tokens.len() as u32 - 1).collect();
    batch.logit_rows = Tensor::new(rows.as_slice(), &device)?;
    let logits = model.forward(&batch, &loaded.kv)?.to_dtype(DType::F32)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let next = Tensor::new(&tokens[from + 1..], &device)?.unsqueeze(1)?;
    let picked = logp.gather(&next, 1)?.squeeze(1)?.to_vec1::<f32>()?;
    let top = logp.argmax(D::Minus1)?.to_vec1::<u32>()?;
    Ok(picked
        .into_iter()
        .zip(top)
        .map(|(logprob, top)| NextToken { logprob, top })
        .collect())
}

/// Teacher-forced scores of `continuation` after `prompt`, for each `(prompt, continuation)`
/// case, with the model in `dir`: entry `i` of a case is the model's view of
/// `continuation[i]` after the prompt and `continuation[..i]`.
pub fn teacher_forced(
    dir: &ModelDir,
    cfg: &EngineConfig,
    cases: &[(Vec<u32>, Vec<u32>)],
) -> Result<Vec<Vec<NextToken>>> {
    let loaded = Loaded::load(dir, cfg, None, &|_, _| {})?;
    cases
        .iter()
        .map(|(prompt, continuation)| {
            if prompt.is_empty() {
                return Err(EngineError::Config(
                    "a teacher-forced case needs at least one prompt token".into(),
                ));
            }
            let tokens: Vec<u32> = prompt.iter().chain(continuation).copied().collect();
            score(&loaded, cfg.block_size, &tokens, prompt.len() - 1)
        })
        .collect()
}
