//! Models named by a Hugging Face Hub id: `org/name[@revision][:FILE]` is downloaded into the
//! Hub's cache (with the `hf-hub` crate) and opened from there, as transformers and vLLM do.
//!
//! * `org/name` or `org/name@revision`: the safetensors checkpoint (`config.json`, the
//!   tokenizer files, `model.safetensors` or the index and its shards).
//! * `org/name:FILE.gguf`: that GGUF file of the repository; `org/name:Q4_K_M` (llama.cpp's
//!   `-hf` form) the one GGUF file whose name holds that tag.
//!
//! `HF_ENDPOINT` (a mirror or a local server), `HF_TOKEN` (else the token file under
//! `HF_HOME`) and `HF_HOME` (the cache, `$HF_HOME/hub`) are honoured. Files already in the
//! cache for the revision are not downloaded again. A local path always wins over an id.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{Api, ApiBuilder};
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{EngineError, Result};

/// Files of a safetensors checkpoint that are fetched when the repository has them.
const OPTIONAL_FILES: [&str; 3] = [
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
];

/// What `--model` names on the Hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubModel {
    /// `org/name`.
    pub repo: String,
    /// A branch, tag or commit (default `main`).
    pub revision: String,
    /// A GGUF file name, or a quantization tag to find one by (`Q4_K_M`).
    pub file: Option<String>,
}

impl HubModel {
    /// Parses `org/name[@revision][:file]`; `None` when `s` is not shaped like a Hub id.
    pub fn parse(s: &str) -> Option<Self> {
        let (rest, file) = match s.split_once(':') {
            Some((r, f)) if !f.is_empty() => (r, Some(f.to_string())),
            Some(_) => return None,
            None => (s, None),
        };
        let (repo, revision) = match rest.split_once('@') {
            Some((r, v)) if !v.is_empty() => (r, v.to_string()),
            Some(_) => return None,
            None => (rest, "main".to_string()),
        };
        let (org, name) = repo.split_once('/')?;
        let part_ok = |p: &str| {
            !p.is_empty()
                && !p.starts_with('.')
                && !p.starts_with('-')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        (part_ok(org) && part_ok(name)).then(|| HubModel {
            repo: repo.to_string(),
            revision,
            file,
        })
    }
}

/// Where the Hub is and who asks: from `HF_ENDPOINT`, `HF_TOKEN` and `HF_HOME`.
#[derive(Clone)]
pub struct HubConfig {
    /// The Hub's URL (default `https://huggingface.co`).
    pub endpoint: Option<String>,
    /// The access token; never logged.
    pub token: Option<String>,
    /// The cache directory (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`).
    pub cache: Cache,
    /// Show a progress bar per file.
    pub progress: bool,
}

impl std::fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConfig")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("cache", &self.cache.path())
            .finish()
    }
}

impl HubConfig {
    /// The settings the environment gives.
    pub fn from_env() -> Self {
        let cache = Cache::from_env();
        HubConfig {
            endpoint: std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()),
            token: std::env::var("HF_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
                .or_else(|| cache.token()),
            cache,
            progress: true,
        }
    }

    fn api(&self) -> Result<Api> {
        let mut b = ApiBuilder::from_cache(self.cache.clone())
            .with_progress(self.progress)
            .with_token(self.token.clone());
        if let Some(e) = &self.endpoint {
            b = b.with_endpoint(e.trim_end_matches('/').to_string());
        }
        b.build()
            .map_err(|e| EngineError::Config(format!("cannot set up the Hub client: {e}")))
    }
}

/// The local model `--model` names: the path itself when it exists, else the Hub id's files,
/// downloaded (or found in the cache).
pub fn resolve(model: &Path, hub: &HubConfig) -> Result<PathBuf> {
    if model.exists() {
        return Ok(model.to_path_buf());
    }
    let Some(id) = model.to_str().and_then(HubModel::parse) else {
        return Err(EngineError::ModelFile {
            path: model.to_path_buf(),
            message: "does not exist, and is not a Hub id (org/name[@revision][:FILE.gguf])".into(),
        });
    };
    download(&id, hub)
}

/// Downloads what `id` names and returns the local directory (safetensors) or file (GGUF).
pub fn download(id: &HubModel, hub: &HubConfig) -> Result<PathBuf> {
    let api = hub.api()?;
    let repo = api.repo(Repo::with_revision(
        id.repo.clone(),
        RepoType::Model,
        id.revision.clone(),
    ));
    let herr = |what: &str, e: hf_hub::api::sync::ApiError| {
        EngineError::ModelFile {
        path: PathBuf::from(format!("{}@{}", id.repo, id.revision)),
        message: format!(
            "{what}: {e} (check the id and revision, HF_TOKEN for a gated or private model, and HF_ENDPOINT)"
        ),
    }
    };
    let info = repo
        .info()
        .map_err(|e| herr("cannot read the repository's file list", e))?;
    let files: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let fetch = |name: &str| {
        repo.get(name)
            .map_err(|e| herr(&format!("cannot download {name}"), e))
    };
    tracing::info!(repo = %id.repo, revision = %id.revision, commit = %info.sha, "fetching the model from the Hub");
    if let Some(wanted) = &id.file {
        let name = pick_gguf(&files, wanted).map_err(|message| EngineError::ModelFile {
            path: PathBuf::from(&id.repo),
            message,
        })?;
        return fetch(name);
    }
    let config = fetch("config.json")?;
    if !files.contains(&"tokenizer.json") {
        return Err(EngineError::ModelFile {
            path: PathBuf::from(&id.repo),
            message: "has no tokenizer.json (the engine needs a fast tokenizer); pick a GGUF file with org/name:FILE.gguf if the repository has one".into(),
        });
    }
    fetch("tokenizer.json")?;
    for name in OPTIONAL_FILES {
        if files.contains(&name) {
            fetch(name)?;
        }
    }
    let index = "model.safetensors.index.json";
    if files.contains(&index) {
        let path = fetch(index)?;
        for shard in shards_of(&path)? {
            fetch(&shard)?;
        }
    } else if files.contains(&"model.safetensors") {
        fetch("model.safetensors")?;
    } else {
        let ggufs: Vec<&&str> = files.iter().filter(|f| f.ends_with(".gguf")).collect();
        return Err(EngineError::ModelFile {
            path: PathBuf::from(&id.repo),
            message: if ggufs.is_empty() {
                "has no safetensors weights (model.safetensors or model.safetensors.index.json)"
                    .into()
            } else {
                format!("has no safetensors weights; it has GGUF files {ggufs:?}: name one with org/name:FILE.gguf")
            },
        });
    }
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// The GGUF file of `files` that `wanted` names: the file itself, or the one whose name holds
/// the quantization tag (case-insensitive).
fn pick_gguf<'a>(files: &[&'a str], wanted: &str) -> std::result::Result<&'a str, String> {
    if let Some(f) = files.iter().find(|f| **f == wanted) {
        return Ok(f);
    }
    let tag = wanted.to_ascii_lowercase();
    let hits: Vec<&str> = files
        .iter()
        .copied()
        .filter(|f| f.ends_with(".gguf") && f.to_ascii_lowercase().contains(&tag))
        .collect();
    match hits.as_slice() {
        [one] => Ok(one),
        [] => Err(format!(
            "has no file {wanted} and no GGUF file with `{wanted}` in its name; its GGUF files: {:?}",
            files.iter().filter(|f| f.ends_with(".gguf")).collect::<Vec<_>>()
        )),
        many => Err(format!(
            "`{wanted}` matches several GGUF files {many:?}; name one exactly"
        )),
    }
}

/// The shard files a `model.safetensors.index.json` lists.
fn shards_of(index: &Path) -> Result<Vec<String>> {
    let mut shards: Vec<String> = crate::model_dir::weight_map(index)?
        .into_iter()
        .map(|(_, file)| file)
        .filter(|f| !f.contains('/') && !f.contains(".."))
        .collect();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ids_and_leaves_paths_alone() {
        let m = HubModel::parse("Qwen/Qwen3-0.6B").unwrap();
        assert_eq!(
            (m.repo.as_str(), m.revision.as_str(), m.file),
            ("Qwen/Qwen3-0.6B", "main", None)
        );
        let m = HubModel::parse("org/name@v1.2:model-Q4_K_M.gguf").unwrap();
        assert_eq!(m.revision, "v1.2");
        assert_eq!(m.file.as_deref(), Some("model-Q4_K_M.gguf"));
        for not_an_id in [
            "./models/x",
            "/abs/path",
            "a/b/c",
            "name",
            "org/",
            "org/na me",
            "org/name@",
            "org/name:",
        ] {
            assert_eq!(HubModel::parse(not_an_id), None, "{not_an_id}");
        }
    }

    #[test]
    fn picks_a_gguf_file_by_name_or_tag() {
        let files = ["README.md", "m-Q4_K_M.gguf", "m-Q8_0.gguf", "m-q4_k_s.gguf"];
        assert_eq!(pick_gguf(&files, "m-Q8_0.gguf"), Ok("m-Q8_0.gguf"));
        assert_eq!(pick_gguf(&files, "q4_k_m"), Ok("m-Q4_K_M.gguf"));
        assert!(pick_gguf(&files, "Q4_K").unwrap_err().contains("several"));
        assert!(pick_gguf(&files, "Q2_K").unwrap_err().contains("no file"));
    }
}
