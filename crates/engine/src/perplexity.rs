//! Perplexity of a model over a text, by llama.cpp's `llama-perplexity` method: the text's
//! tokens are cut into windows of a fixed context (bos first when the model adds one), and
//! each window scores the tokens of its second half, so every scored token has at least half
//! a context before it. Numbers are comparable across formats of one model (f32, bf16, Q8_0,
//! Q4_K, ...) and with llama.cpp's at the same context.

use candle_core::{DType, Tensor, D};

use crate::batch::SeqChunk;
use crate::engine::{EngineConfig, Loaded};
use crate::error::{EngineError, Result};
use crate::model_dir::ModelDir;

/// What a perplexity run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Perplexity {
    /// Tokens per window.
    pub context: usize,
    /// Windows scored.
    pub windows: usize,
    /// Tokens of the text.
    pub text_tokens: usize,
    /// Tokens scored (`windows * (context - 1 - context / 2)`).
    pub scored_tokens: usize,
    /// Mean negative log-likelihood per scored token (nats).
    pub mean_nll: f64,
    /// `exp(mean_nll)`.
    pub perplexity: f64,
    /// Standard error of the perplexity (from the spread of the per-token NLL).
    pub perplexity_stderr: f64,
}

/// Scores `text` with the model in `dir` in windows of `context` tokens (at most
/// `max_windows` of them). `progress(done, total)` is told after each window.
pub fn perplexity(
    dir: &ModelDir,
    cfg: &EngineConfig,
    text: &str,
    context: usize,
    max_windows: Option<usize>,
    progress: &dyn Fn(usize, usize),
) -> Result<Perplexity> {
    if context < 4 {
        return Err(EngineError::Config(format!(
            "--context {context} is too short; use at least 4 tokens (llama.cpp's default is 512)"
        )));
    }
    let tok = &dir.tokenizer;
    let ids = tok
        .inner()
        .encode(text, false)
        .map_err(|e| EngineError::Tokenizer(e.to_string()))?
        .get_ids()
        .to_vec();
    let mut windows = ids.len() / context;
    if let Some(m) = max_windows {
        windows = windows.min(m);
    }
    if windows == 0 {
        return Err(EngineError::Config(format!(
            "the text has {} tokens, fewer than one window of {context}; give a longer text or a shorter --context",
            ids.len()
        )));
    }
    let loaded = Loaded::load(dir, cfg, None, &|_, _| {})?;
    if context > loaded.max_model_len {
        return Err(EngineError::Config(format!(
            "--context {context} is longer than the model's {} tokens (or the KV cache's); shorten it or raise --kv-cache-memory",
            loaded.max_model_len
        )));
    }
    let model = &loaded.model;
    let blocks: Vec<u32> = (0..context.div_ceil(cfg.block_size) as u32).collect();
    let first = context / 2;
    let bos = tok.bos_token_id.filter(|_| tok.add_bos_token);
    let device = model.device().clone();
    let mut nll: Vec<f64> = Vec::with_capacity(windows * (context - 1 - first));
    for w in 0..windows {
        let mut window = ids[w * context..(w + 1) * context].to_vec();
        if let Some(b) = bos {
            window[0] = b;
        }
        let chunk = SeqChunk {
            tokens: &window,
            start_pos: 0,
            block_table: &blocks,
            want_logits: true,
        };
        let mut batch = model.step_batch(&[chunk], cfg.block_size)?;
        // Every row of the second half, not only the last.
        let rows: Vec<u32> = (first as u32..context as u32 - 1).collect();
        batch.logit_rows = Tensor::new(rows.as_slice(), &device)?;
        let logits = model.forward(&batch, &loaded.kv)?.to_dtype(DType::F32)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let next: Vec<u32> = window[first + 1..].to_vec();
        let next = Tensor::new(next.as_slice(), &device)?.unsqueeze(1)?;
        let picked = logp.gather(&next, 1)?.squeeze(1)?.to_vec1::<f32>()?;
        nll.extend(picked.iter().map(|&l| -f64::from(l)));
        progress(w + 1, windows);
    }
    let n = nll.len() as f64;
    let mean = nll.iter().sum::<f64>() / n;
    let var = nll.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    let ppl = mean.exp();
    Ok(Perplexity {
        context,
        windows,
        text_tokens: ids.len(),
        scored_tokens: nll.len(),
        mean_nll: mean,
        perplexity: ppl,
        perplexity_stderr: ppl * (var / n).sqrt(),
    })
}
