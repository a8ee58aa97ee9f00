//! What the router knows of each model: limits and tokenizer (from its workers' `Info` and
//! `Tokenizer`), and how many workers serve it now. Read by every request, written by the
//! scheduler when workers come and go.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use openinfer_proto::worker::v1 as wpb;

/// A model's facts, as its workers report them.
pub struct ModelSpec {
    /// The model id clients name.
    pub id: String,
    /// Longest sequence (prompt + output).
    pub max_model_len: usize,
    /// Rows of the embedding: token ids must be below this.
    pub vocab_size: u32,
    /// KV block size, for credit accounting.
    pub block_size: usize,
    /// Prompt text longer than this cannot fit the context, whatever it says
    /// ([`crate::token_bound`]); `None` when the tokenizer gives no bound.
    pub max_prompt_bytes: Option<usize>,
    tokenizer: tokenizers::Tokenizer,
    bos_token_id: Option<u32>,
    add_bos_token: bool,
}

/// A worker's `Info` and `Tokenizer` answers did not make a usable model description.
#[derive(Debug, thiserror::Error)]
#[error("worker serves an unusable tokenizer for `{model}`: {message}")]
pub struct SpecError {
    model: String,
    message: String,
}

impl ModelSpec {
    /// Builds the spec from a worker's answers.
    pub fn new(info: &wpb::InfoResponse, tok: &wpb::TokenizerResponse) -> Result<Self, SpecError> {
        let spec_error = |e: &dyn std::fmt::Display| SpecError {
            model: info.model.clone(),
            message: e.to_string(),
        };
        let mut tokenizer = tok
            .tokenizer_json
            .parse::<tokenizers::Tokenizer>()
            .map_err(|e| spec_error(&e))?;
        // A prompt is never cut or padded behind the client's back: too long is refused.
        tokenizer
            .with_truncation(None)
            .map_err(|e| spec_error(&e))?
            .with_padding(None);
        let max_model_len = info.max_model_len as usize;
        Ok(ModelSpec {
            id: info.model.clone(),
            max_model_len,
            max_prompt_bytes: crate::token_bound::max_bytes_per_token(&tok.tokenizer_json)
                .map(|b| b.saturating_mul(max_model_len)),
            vocab_size: info.vocab_size,
            block_size: info.kv.map_or(16, |kv| kv.block_size.max(1) as usize),
            tokenizer,
            bos_token_id: tok.bos_token_id,
            add_bos_token: tok.add_bos_token,
        })
    }

    /// Token ids of a text prompt, exactly as the worker's engine would make them.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| e.to_string())?;
        Ok(openinfer_core::with_bos(
            enc.get_ids().to_vec(),
            self.bos_token_id,
            self.add_bos_token,
        ))
    }
}

/// One served model.
#[derive(Clone)]
pub struct ModelEntry {
    /// Its facts.
    pub spec: Arc<ModelSpec>,
    /// Workers connected now.
    pub workers: usize,
}

/// Every model the router has seen a worker for, by id.
#[derive(Clone, Default)]
pub struct ModelTable {
    inner: Arc<RwLock<BTreeMap<String, ModelEntry>>>,
}

impl ModelTable {
    /// The entry of `id`.
    pub fn get(&self, id: &str) -> Option<ModelEntry> {
        self.read().get(id).cloned()
    }

    /// All entries, by id.
    pub fn list(&self) -> Vec<ModelEntry> {
        self.read().values().cloned().collect()
    }

    /// Model ids, comma-separated (for error messages).
    pub fn names(&self) -> String {
        let names: Vec<String> = self.read().keys().cloned().collect();
        if names.is_empty() {
            "none yet (no worker has connected)".into()
        } else {
            names.join(", ")
        }
    }

    /// A worker of `spec.id` connected; the newest spec wins.
    pub fn worker_up(&self, spec: Arc<ModelSpec>) {
        let mut map = self.write();
        let entry = map.entry(spec.id.clone()).or_insert(ModelEntry {
            spec: spec.clone(),
            workers: 0,
        });
        entry.spec = spec;
        entry.workers += 1;
    }

    /// A worker of `model` went away. The model stays known (with no workers) so that its
    /// requests get `UNAVAILABLE`, not `NOT_FOUND`, while its workers restart.
    pub fn worker_down(&self, model: &str) {
        if let Some(e) = self.write().get_mut(model) {
            e.workers = e.workers.saturating_sub(1);
        }
    }

    /// Models with at least one worker.
    pub fn serving(&self) -> usize {
        self.read().values().filter(|e| e.workers > 0).count()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, ModelEntry>> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, ModelEntry>> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }
}
