//! What the router knows of each model: limits and tokenizer (from its workers' `Info` and
//! `Tokenizer`), and how many workers serve it now. Read by every request, written by the
//! scheduler when workers come and go.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use openinfer_proto::worker::v1 as wpb;

use crate::chat_template::{ChatTemplate, TemplateError};
use crate::error::RouterError;

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
    /// Its chat template: `None` when it has none, an error when it does not compile.
    chat_template: Option<Result<ChatTemplate, TemplateError>>,
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
            chat_template: tok.chat_template.as_deref().map(|source| {
                let compiled =
                    ChatTemplate::new(source, tok.bos_token.clone(), tok.eos_token.clone());
                if let Err(e) = &compiled {
                    tracing::warn!(model = %info.model, error = %e, "chat requests will be refused");
                }
                compiled
            }),
        })
    }

    /// `messages` rendered with the model's chat template, ending with the assistant's
    /// header when `add_generation_prompt`.
    pub fn render_chat(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
    ) -> Result<String, RouterError> {
        let refused = |message: String| RouterError::invalid("messages", message);
        match &self.chat_template {
            None => Err(refused(format!(
                "model `{}` has no chat template (no chat_template.jinja, no chat_template in \
                 tokenizer_config.json), so it cannot take a conversation; send a `prompt` to \
                 /v1/completions, or start its workers with --chat-template FILE",
                self.id
            ))),
            Some(Err(e)) => Err(refused(format!(
                "model `{}`: {e}; fix it or start its workers with --chat-template FILE",
                self.id
            ))),
            Some(Ok(t)) => t
                .render(messages, add_generation_prompt)
                .map_err(|e| match e {
                    TemplateError::Raised(m) => refused(format!(
                        "the chat template of `{}` refuses this conversation: {m}",
                        self.id
                    )),
                    other => refused(format!("model `{}`: {other}", self.id)),
                }),
        }
    }

    /// Token ids of a prompt rendered by the chat template: the template wrote its special
    /// tokens (bos among them) itself, so none is added.
    pub fn encode_rendered(&self, text: &str) -> Result<Vec<u32>, String> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| e.to_string())?;
        Ok(enc.get_ids().to_vec())
    }

    /// Checks that every id of `ids` (the request's field `field`) is in the vocabulary.
    pub fn check_ids(&self, ids: &[u32], field: &'static str) -> Result<(), RouterError> {
        match ids.iter().enumerate().find(|(_, &t)| t >= self.vocab_size) {
            None => Ok(()),
            Some((i, t)) => Err(RouterError::invalid(
                field,
                format!(
                    "{field}[{i}] = {t} is outside the vocabulary of `{}` (ids 0..{})",
                    self.id, self.vocab_size
                ),
            )),
        }
    }

    /// Text of `ids`; special tokens are kept when `special`.
    pub fn decode(&self, ids: &[u32], special: bool) -> Result<String, String> {
        self.tokenizer
            .decode(ids, !special)
            .map_err(|e| e.to_string())
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
