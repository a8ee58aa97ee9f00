//! Perplexity of a model over a text, by llama.cpp's `llama-perplexity` method: the text's
//! tokens are cut into windows of a fixed context (bos first when the model adds one), and
//! each window scores the tokens of its second half, so every scored token has at least half
//! a context before it. Numbers are comparable across formats of one model (f32, bf16, Q8_0,
//! Q4_K, ...) and with llama.cpp's at the same context.

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
    let first = context / 2;
    let bos = tok.bos_token_id.filter(|_| tok.add_bos_token);
    let mut nll: Vec<f64> = Vec::with_capacity(windows * (context - 1 - first));
    for w in 0..windows {
        let mut window = ids[w * context..(w + 1) * context].to_vec();
        if let Some(b) = bos {
            window[0] = b;
        }
        // Every row of the second half, not only the last.
        let scores = crate::scoring::score(&loaded, cfg.block_size, &window, first)?;
        nll.extend(scores.iter().map(|s| -f64::from(s.logprob)));
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
