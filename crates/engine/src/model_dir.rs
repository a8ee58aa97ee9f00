//! A Hugging Face model directory: `config.json`, `model.safetensors` (or a sharded
//! `model.safetensors.index.json`), `tokenizer.json`, and the optional
//! `tokenizer_config.json` / `generation_config.json` that say which tokens are bos and eos and
//! whether to add bos. A GGUF file stands in for the whole directory.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::quantized::QTensor;
use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Tensor};
use safetensors::slice::TensorIndexer;
use safetensors::tensor as st;
use serde_json::Value;

use crate::config::{token_id_list, ModelConfig};
use crate::error::{EngineError, Result};
use crate::gguf::{is_gguf, GgufFile, GgufWeights};
use crate::tokenizer::Tokenizer;

/// An opened, checked model directory. Weights are memory-mapped, not yet loaded.
pub struct ModelDir {
    /// The directory.
    pub path: PathBuf,
    /// Parsed `config.json`.
    pub config: ModelConfig,
    /// Memory-mapped weights.
    pub weights: Weights,
    /// Tokenizer with bos/eos resolved.
    pub tokenizer: Tokenizer,
}

impl ModelDir {
    /// Opens `dir`, checking that every file the engine needs is present and well-formed. A
    /// GGUF file is opened as such ([`GgufFile`]).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let path = dir.as_ref().to_path_buf();
        if is_gguf(&path) {
            let GgufFile {
                config,
                weights,
                tokenizer,
            } = GgufFile::open(&path)?;
            return Ok(ModelDir {
                path,
                config,
                weights: Weights::Gguf(weights),
                tokenizer,
            });
        }
        if !path.is_dir() {
            return Err(EngineError::ModelFile {
                path,
                message: "not a directory or a GGUF file; pass a Hugging Face model directory (config.json, model.safetensors, tokenizer.json), a .gguf file, or make one with `openinfer make-model`".into(),
            });
        }
        let config = ModelConfig::from_file(&path.join("config.json"))?;
        let weights = Weights::Safetensors(Safetensors::open(&path)?);
        let tokenizer_config = read_optional_json(&path.join("tokenizer_config.json"))?;
        let generation_config = read_optional_json(&path.join("generation_config.json"))?;
        let tokenizer = Tokenizer::from_dir(
            &path,
            &config,
            tokenizer_config.as_ref(),
            generation_config.as_ref(),
        )?;
        Ok(ModelDir {
            path,
            config,
            weights,
            tokenizer,
        })
    }

    /// A short id for the model: the directory's name, or the GGUF file's without `.gguf`.
    pub fn model_id(&self) -> String {
        let name = match &self.weights {
            Weights::Gguf(_) => self.path.file_stem(),
            Weights::Safetensors(_) => self.path.file_name(),
        };
        name.map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    }
}

/// Reads an optional JSON file: absent is `None`, malformed is an error naming the file.
pub(crate) fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| EngineError::ModelFile {
                path: path.to_path_buf(),
                message: format!("not valid JSON: {e}"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(EngineError::io(path, e)),
    }
}

/// Token ids named by a field that may be an int or a list (generation/config files).
pub(crate) fn ids_field(v: &Value, path: &Path, field: &str) -> Result<Vec<u32>> {
    token_id_list(v.get(field)).ok_or_else(|| EngineError::ConfigField {
        path: path.to_path_buf(),
        field: field.into(),
        message: "expected a token id or a list of token ids".into(),
    })
}

/// A model's tensors, by their Hugging Face names.
pub enum Weights {
    /// Safetensors files of a Hugging Face directory, in their stored dtype.
    Safetensors(Safetensors),
    /// A GGUF file, quantized or not.
    Gguf(GgufWeights),
}

impl Weights {
    /// True when the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        match self {
            Weights::Safetensors(w) => w.contains(name),
            Weights::Gguf(w) => w.contains(name),
        }
    }

    /// Bytes of all weight files.
    pub fn total_bytes(&self) -> u64 {
        match self {
            Weights::Safetensors(w) => w.total_bytes(),
            Weights::Gguf(w) => w.total_bytes(),
        }
    }

    /// Loads tensor `name` onto `device` as `dtype` (dequantized), checking its shape.
    pub fn load(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        match self {
            Weights::Safetensors(w) => w.load(name, shape, dtype, device),
            Weights::Gguf(w) => w.load(name, shape, dtype, device),
        }
    }

    /// `len` rows (`dim` 0) or columns (`dim` 1) of tensor `name` from `start`; `shape` is the
    /// whole tensor's.
    #[allow(clippy::too_many_arguments)]
    pub fn load_slice(
        &self,
        name: &str,
        shape: &[usize],
        dim: usize,
        start: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        match self {
            Weights::Safetensors(w) => w.load_slice(name, shape, dim, start, len, dtype, device),
            Weights::Gguf(w) => Ok(w
                .load(name, shape, dtype, device)?
                .narrow(dim, start, len)?),
        }
    }

    /// Tensor `name` in its stored quantized format, when the checkpoint holds it quantized.
    pub fn quantized(&self, name: &str, shape: &[usize]) -> Result<Option<QTensor>> {
        match self {
            Weights::Gguf(w) if w.is_quantized(name) => w.qtensor(name, shape).map(Some),
            _ => Ok(None),
        }
    }

    /// The half-precision dtype the checkpoint stores matrix `name` in, for a GGUF file
    /// (whose tensors stay as stored when it is loaded without a dtype).
    pub fn stored_half(&self, name: &str) -> Option<DType> {
        match self {
            Weights::Gguf(w) => w.half_dtype(name),
            Weights::Safetensors(_) => None,
        }
    }

    /// True for a GGUF file.
    pub fn is_gguf(&self) -> bool {
        matches!(self, Weights::Gguf(_))
    }
}

/// The `weight_map` of a `model.safetensors.index.json`: (tensor name, shard file) pairs.
pub(crate) fn weight_map(index_path: &Path) -> Result<Vec<(String, String)>> {
    let index = read_optional_json(index_path)?.unwrap_or(Value::Null);
    let map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| EngineError::ConfigField {
            path: index_path.to_path_buf(),
            field: "weight_map".into(),
            message: "missing or not an object of tensor name → shard file".into(),
        })?;
    map.iter()
        .map(|(name, file)| {
            let file = file.as_str().ok_or_else(|| EngineError::ConfigField {
                path: index_path.to_path_buf(),
                field: format!("weight_map.{name}"),
                message: "expected a file name".into(),
            })?;
            Ok((name.clone(), file.to_string()))
        })
        .collect()
}

/// Memory-mapped safetensors files and which file holds which tensor.
pub struct Safetensors {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    index: HashMap<String, usize>,
    /// The file (single file or index) that errors about missing tensors name.
    origin: PathBuf,
}

impl Safetensors {
    /// Opens `model.safetensors`, or the shards listed by `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let (origin, shard_of): (PathBuf, Vec<(String, String)>) = if index_path.exists() {
            let pairs = weight_map(&index_path)?;
            (index_path, pairs)
        } else if single.exists() {
            (single, Vec::new())
        } else {
            return Err(EngineError::ModelFile {
                path: single,
                message: "missing: the directory has neither model.safetensors nor model.safetensors.index.json (only safetensors weights are supported)".into(),
            });
        };

        let mut files = Vec::new();
        let mut index = HashMap::new();
        if shard_of.is_empty() {
            let st = mmap(&origin)?;
            for (name, _) in st.tensors() {
                index.insert(name, 0);
            }
            files.push((origin.clone(), st));
        } else {
            let names: BTreeSet<&str> = shard_of.iter().map(|(_, f)| f.as_str()).collect();
            let mut file_idx = HashMap::new();
            for name in names {
                let p = dir.join(name);
                if !p.exists() {
                    return Err(EngineError::ModelFile {
                        path: p,
                        message: format!("missing: listed as a shard in {}", origin.display()),
                    });
                }
                file_idx.insert(name.to_string(), files.len());
                files.push((p.clone(), mmap(&p)?));
            }
            for (tensor, file) in shard_of {
                index.insert(tensor, file_idx[&file]);
            }
        }
        Ok(Safetensors {
            files,
            index,
            origin,
        })
    }

    /// True when the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Bytes of all weight files.
    pub fn total_bytes(&self) -> u64 {
        self.files
            .iter()
            .filter_map(|(p, _)| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Loads tensor `name` onto `device` as `dtype`, checking its shape.
    pub fn load(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let (path, view) = self.view(name, shape)?;
        let t = view.load(&Device::Cpu).map_err(|e| EngineError::Weight {
            path,
            tensor: name.into(),
            message: e.to_string(),
        })?;
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }

    /// The file holding `name` and its bytes, checked to have `shape`.
    fn view(&self, name: &str, shape: &[usize]) -> Result<(PathBuf, st::TensorView<'_>)> {
        let Some(&fi) = self.index.get(name) else {
            return Err(EngineError::Weight {
                path: self.origin.clone(),
                tensor: name.into(),
                message: format!("missing (expected shape {shape:?})"),
            });
        };
        let (path, st) = &self.files[fi];
        let werr = |message: String| EngineError::Weight {
            path: path.clone(),
            tensor: name.into(),
            message,
        };
        let view = st.get(name).map_err(|e| werr(e.to_string()))?;
        if view.shape() != shape {
            return Err(werr(format!(
                "shape {:?} does not match the configuration, which implies {shape:?}",
                view.shape()
            )));
        }
        Ok((path.clone(), view))
    }
}

impl Safetensors {
    /// `len` rows (`dim` 0) or columns (`dim` 1) of tensor `name` from `start`, reading only
    /// those bytes; `shape` is the whole tensor's, checked as [`Weights::load`] does.
    #[allow(clippy::too_many_arguments)]
    pub fn load_slice(
        &self,
        name: &str,
        shape: &[usize],
        dim: usize,
        start: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        if start == 0 && len == shape[dim] {
            return self.load(name, shape, dtype, device);
        }
        let (path, view) = self.view(name, shape)?;
        let werr = |message: String| EngineError::Weight {
            path: path.clone(),
            tensor: name.into(),
            message,
        };
        let mut index: Vec<TensorIndexer> = shape.iter().map(|&n| (0..n).into()).collect();
        index[dim] = (start..start + len).into();
        let bytes: Vec<u8> = view
            .sliced_data(&index)
            .map_err(|e| {
                werr(format!(
                    "cannot take {start}..{} of dimension {dim}: {e:?}",
                    start + len
                ))
            })?
            .flatten()
            .copied()
            .collect();
        let mut sliced = shape.to_vec();
        sliced[dim] = len;
        let part =
            st::TensorView::new(view.dtype(), sliced, &bytes).map_err(|e| werr(e.to_string()))?;
        let t = part.load(&Device::Cpu).map_err(|e| werr(e.to_string()))?;
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }
}

fn mmap(path: &Path) -> Result<MmapedSafetensors> {
    // SAFETY: the file is only read; the engine does not modify model files while running,
    // and a concurrent writer is an operator error that safetensors' header checks bound.
    unsafe { MmapedSafetensors::new(path) }.map_err(|e| EngineError::ModelFile {
        path: path.to_path_buf(),
        message: format!("not a readable safetensors file: {e}"),
    })
}
