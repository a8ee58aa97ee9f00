//! Reference outputs of HF transformers for the committed fixture models
//! (`tests/fixtures/expected/{model}.json`, written by `scripts/make_fixtures.py`, beside the
//! model directories `tests/fixtures/{model}`): what `openinfer parity` and the parity tests
//! compare the engine with.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{EngineError, Result};

/// One reference case: a prompt and HF transformers' greedy output.
#[derive(Debug, Clone, Deserialize)]
pub struct Case {
    /// The prompt's token ids (bos included when the model adds one).
    pub prompt_ids: Vec<u32>,
    /// Tokens generated (eos ignored).
    #[serde(rename = "max_new_tokens")]
    pub max_new: u32,
    /// The greedy tokens.
    #[serde(rename = "output_ids")]
    pub expected: Vec<u32>,
    /// Their log-probabilities.
    #[serde(rename = "output_logprobs", default)]
    pub logprobs: Vec<f32>,
    /// The text transformers decodes them to.
    #[serde(rename = "output_text", default)]
    pub text: Option<String>,
}

/// The reference of one fixture model.
#[derive(Debug, Clone)]
pub struct Reference {
    /// Model name (the file's `model` field).
    pub model: String,
    /// Its model directory: `{fixtures}/{model}`.
    pub dir: PathBuf,
    /// Its cases.
    pub cases: Vec<Case>,
}

#[derive(Deserialize)]
struct File {
    model: String,
    cases: Vec<Case>,
}

/// Every reference under `{fixtures}/expected`, by model name.
pub fn read_all(fixtures: &Path) -> Result<Vec<Reference>> {
    let dir = fixtures.join("expected");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| EngineError::io(&dir, e))? {
        let path = entry.map_err(|e| EngineError::io(&dir, e))?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
        let file: File = serde_json::from_str(&text).map_err(|e| EngineError::ModelFile {
            path: path.clone(),
            message: format!("not a reference file (scripts/make_fixtures.py writes them): {e}"),
        })?;
        out.push(Reference {
            dir: fixtures.join(&file.model),
            model: file.model,
            cases: file.cases,
        });
    }
    if out.is_empty() {
        return Err(EngineError::ModelFile {
            path: dir,
            message: "no reference files (*.json) here".into(),
        });
    }
    out.sort_by(|a, b| a.model.cmp(&b.model));
    Ok(out)
}
