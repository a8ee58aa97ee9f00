//! The tokenizer of a model directory, with bos/eos resolved from `tokenizer_config.json`,
//! `generation_config.json` and `config.json`.

use std::path::Path;

use serde_json::Value;

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::model_dir::ids_field;

/// A `tokenizer.json` plus the special-token facts the engine needs.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Ids of the `<0xNN>` tokens of a byte-fallback BPE (SentencePiece) vocabulary, sorted.
    byte_tokens: Vec<u32>,
    /// The beginning-of-sequence token, when the model has one.
    pub bos_token_id: Option<u32>,
    /// Every token that ends generation.
    pub eos_token_ids: Vec<u32>,
    /// Whether text prompts start with bos.
    pub add_bos_token: bool,
    /// The chat template and the special-token texts it is rendered with.
    pub chat: ChatFacts,
}

/// What rendering a conversation needs: the model's chat template (from `chat_template.jinja`,
/// or `chat_template` in `tokenizer_config.json`, a string or the named list's `default`) and
/// the texts of its bos and eos tokens.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChatFacts {
    /// The Jinja source, when the model has one.
    pub template: Option<String>,
    /// Text of the bos token (`bos_token` in `tokenizer_config.json`).
    pub bos_token: Option<String>,
    /// Text of the eos token.
    pub eos_token: Option<String>,
}

impl ChatFacts {
    /// Reads the facts of the model directory `dir`.
    pub fn from_dir(dir: &Path, tokenizer_config: Option<&Value>) -> Result<Self> {
        let text = |field: &str| -> Option<String> {
            let v = tokenizer_config?.get(field)?;
            v.as_str()
                .or_else(|| v.get("content")?.as_str())
                .map(str::to_owned)
        };
        let jinja = dir.join("chat_template.jinja");
        let template = if jinja.exists() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| EngineError::io(&jinja, e))?)
        } else {
            match tokenizer_config.and_then(|t| t.get("chat_template")) {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Array(named)) => named
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str())
                    .map(str::to_owned),
                Some(other) => {
                    return Err(EngineError::ConfigField {
                        path: dir.join("tokenizer_config.json"),
                        field: "chat_template".into(),
                        message: format!(
                            "expected a string or a list of {{\"name\", \"template\"}}, found {}",
                            kind(other)
                        ),
                    })
                }
            }
        };
        Ok(ChatFacts {
            template,
            bos_token: text("bos_token"),
            eos_token: text("eos_token"),
        })
    }

    /// These facts with the template replaced by the file `path` (`--chat-template`).
    pub fn with_template_file(mut self, path: &Path) -> Result<Self> {
        self.template = Some(std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?);
        Ok(self)
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` from `dir` and resolves the special tokens.
    pub fn from_dir(
        dir: &Path,
        config: &ModelConfig,
        tokenizer_config: Option<&Value>,
        generation_config: Option<&Value>,
    ) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(EngineError::ModelFile {
                path,
                message: "missing: the engine needs a Hugging Face fast tokenizer (tokenizer.json)"
                    .into(),
            });
        }
        let inner =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| EngineError::ModelFile {
                path: path.clone(),
                message: format!("not a valid tokenizer: {e}"),
            })?;
        let tc_path = dir.join("tokenizer_config.json");
        let gc_path = dir.join("generation_config.json");
        let token_named = |field: &str| -> Option<u32> {
            let v = tokenizer_config?.get(field)?;
            let text = v.as_str().or_else(|| v.get("content")?.as_str())?;
            inner.token_to_id(text)
        };

        let mut bos = token_named("bos_token");
        let mut eos: Vec<u32> = Vec::new();
        if let Some(gc) = generation_config {
            if bos.is_none() {
                bos = ids_field(gc, &gc_path, "bos_token_id")?.first().copied();
            }
            eos.extend(ids_field(gc, &gc_path, "eos_token_id")?);
        }
        bos = bos.or(config.bos_token_id);
        eos.extend(&config.eos_token_ids);
        eos.extend(token_named("eos_token"));
        eos.sort_unstable();
        eos.dedup();

        let add_bos_token = match tokenizer_config.and_then(|t| t.get("add_bos_token")) {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(EngineError::ConfigField {
                    path: tc_path,
                    field: "add_bos_token".into(),
                    message: format!("expected true or false, found {other}"),
                })
            }
        };
        if add_bos_token && bos.is_none() {
            return Err(EngineError::ConfigField {
                path: tc_path,
                field: "bos_token".into(),
                message: "add_bos_token is true but no bos token is named in tokenizer_config.json, generation_config.json or config.json".into(),
            });
        }
        let vocab = inner.get_vocab_size(true);
        if let Some(bad) = eos
            .iter()
            .chain(bos.iter())
            .find(|&&id| id as usize >= config.vocab_size)
        {
            return Err(EngineError::ConfigField {
                path: dir.join("generation_config.json"),
                field: "eos_token_id".into(),
                message: format!("special token id {bad} is outside the model's vocabulary ({} rows; tokenizer has {vocab})", config.vocab_size),
            });
        }
        Ok(Tokenizer {
            chat: ChatFacts::from_dir(dir, tokenizer_config)?,
            byte_tokens: byte_tokens(&inner),
            inner,
            bos_token_id: bos,
            eos_token_ids: eos,
            add_bos_token,
        })
    }

    /// A tokenizer with its special tokens given directly.
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        bos_token_id: Option<u32>,
        eos_token_ids: Vec<u32>,
        add_bos_token: bool,
    ) -> Self {
        Tokenizer {
            byte_tokens: byte_tokens(&inner),
            inner,
            bos_token_id,
            eos_token_ids,
            add_bos_token,
            chat: ChatFacts::default(),
        }
    }

    /// Token ids of `text` as a prompt: the tokenizer's own special tokens, plus bos when the
    /// model wants one and the tokenizer did not add it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(openinfer_core::with_bos(
            enc.get_ids().to_vec(),
            self.bos_token_id,
            self.add_bos_token,
        ))
    }

    /// True when `ids` end in a run of byte tokens of a byte-fallback vocabulary (`<0x0A>`),
    /// which decodes as a whole: into U+FFFD for every byte once one of them is invalid
    /// UTF-8. Special tokens, which decoding skips, do not end a run.
    pub fn ends_in_byte_run(&self, ids: &[u32]) -> bool {
        if self.byte_tokens.is_empty() {
            return false;
        }
        let added = self.inner.get_added_vocabulary();
        let skipped = |id: u32| {
            added
                .simple_id_to_token(id)
                .is_some_and(|t| added.is_special_token(&t))
        };
        ids.iter()
            .rev()
            .find(|&&id| !skipped(id))
            .is_some_and(|id| self.byte_tokens.binary_search(id).is_ok())
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// True when `id` ends generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_token_ids.contains(&id)
    }

    /// Entries in the tokenizer's vocabulary (special tokens included).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// The ids of `inner`'s `<0x00>`..`<0xFF>` tokens when its model is a byte-fallback BPE.
fn byte_tokens(inner: &tokenizers::Tokenizer) -> Vec<u32> {
    match inner.get_model() {
        tokenizers::ModelWrapper::BPE(bpe) if bpe.byte_fallback => {
            let mut ids: Vec<u32> = (0..=255u8)
                .filter_map(|b| inner.token_to_id(&format!("<0x{b:02X}>")))
                .collect();
            ids.sort_unstable();
            ids
        }
        _ => Vec::new(),
    }
}
