//! A GGUF file (llama.cpp's format): the model's configuration, tokenizer, chat template and
//! tensors, quantized or not, in one file.
//!
//! The file is read into the same three things a Hugging Face directory gives
//! ([`ModelConfig`], weights by their HF names, [`Tokenizer`]), so the model code is shared.
//! Two things differ from a converted HF checkpoint and are undone here: llama.cpp's
//! converter interleaves the rows of each query and key head of `llama` models (its rotary
//! embedding pairs neighbours, HF's pairs halves), and Llama 3.1 scaling arrives as a
//! `rope_freqs` tensor of per-frequency factors.

mod tokenizer;

use std::borrow::Cow;
use std::cell::RefCell;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::{EngineError, Result};
use crate::tokenizer::Tokenizer;

/// True when `path` names a GGUF file (by its magic number, whatever its extension).
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file()
        && File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && &magic == b"GGUF"
}

/// An opened GGUF file: its metadata read and checked, its tensors not yet loaded.
pub struct GgufFile {
    /// The model's shape, from `{arch}.*` metadata.
    pub config: ModelConfig,
    /// The tensors, named as in a Hugging Face checkpoint.
    pub weights: GgufWeights,
    /// The tokenizer stored in `tokenizer.ggml.*`, with the chat template.
    pub tokenizer: Tokenizer,
}

impl GgufFile {
    /// Reads and checks the metadata of `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let ferr = |message: String| EngineError::ModelFile {
            path: path.to_path_buf(),
            message,
        };
        let reader = RefCell::new(BufReader::new(
            File::open(path).map_err(|e| EngineError::io(path, e))?,
        ));
        let content = Content::read(&mut *reader.borrow_mut())
            .map_err(|e| ferr(format!("not a readable GGUF file: {e}")))?;
        let meta = Meta {
            path,
            content: &content,
            reader: &reader,
        };
        let config = meta.config()?;
        let tokenizer = tokenizer::from_gguf(&meta, &config)?;
        let permute_qk = matches!(meta.arch()?.as_str(), "llama" | "mistral")
            .then_some((config.num_heads, config.num_kv_heads));
        Ok(GgufFile {
            config,
            tokenizer,
            weights: GgufWeights {
                path: path.to_path_buf(),
                reader: Mutex::new(reader.into_inner()),
                content,
                permute_qk,
            },
        })
    }
}

/// Reads typed metadata values, turning every problem into an error naming the file and key.
pub(crate) struct Meta<'a> {
    path: &'a Path,
    content: &'a Content,
    /// The file's reader, for the few tensors the configuration is read from.
    reader: &'a RefCell<BufReader<File>>,
}

impl<'a> Meta<'a> {
    fn err(&self, key: &str, message: impl Into<String>) -> EngineError {
        EngineError::ConfigField {
            path: self.path.to_path_buf(),
            field: key.to_string(),
            message: message.into(),
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.content.metadata.get(key)
    }

    fn arch(&self) -> Result<String> {
        Ok(self.string("general.architecture")?.to_string())
    }

    pub(crate) fn string(&self, key: &str) -> Result<&'a str> {
        self.string_opt(key)?
            .ok_or_else(|| self.err(key, "missing; llama.cpp's converter always writes it"))
    }

    pub(crate) fn string_opt(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(key, format!("expected a string, found {v:?}"))),
        }
    }

    pub(crate) fn u64_opt(&self, key: &str) -> Result<Option<u64>> {
        let v = match self.get(key) {
            None => return Ok(None),
            Some(v) => v,
        };
        let n = match v {
            Value::U8(n) => Some(u64::from(*n)),
            Value::U16(n) => Some(u64::from(*n)),
            Value::U32(n) => Some(u64::from(*n)),
            Value::U64(n) => Some(*n),
            Value::I8(n) => u64::try_from(*n).ok(),
            Value::I16(n) => u64::try_from(*n).ok(),
            Value::I32(n) => u64::try_from(*n).ok(),
            Value::I64(n) => u64::try_from(*n).ok(),
            _ => None,
        };
        n.map(Some).ok_or_else(|| {
            self.err(
                key,
                format!("expected a non-negative integer (a list per layer is not supported), found {v:?}"),
            )
        })
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.u64_opt(key)? {
            Some(0) => Err(self.err(key, "must be positive")),
            n => Ok(n.map(|n| n as usize)),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .ok_or_else(|| self.err(key, "missing; it is required for this architecture"))
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(f64::from(*x))),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => Err(self.err(key, format!("expected a number, found {v:?}"))),
        }
    }

    pub(crate) fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(key, format!("expected true or false, found {v:?}"))),
        }
    }

    pub(crate) fn strings(&self, key: &str) -> Result<Option<Vec<&'a str>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.as_str()),
                    other => Err(self.err(key, format!("expected strings, found {other:?}"))),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(self.err(key, format!("expected a list of strings, found {v:?}"))),
        }
    }

    pub(crate) fn numbers(&self, key: &str) -> Result<Option<Vec<f64>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::F32(x) => Ok(f64::from(*x)),
                    Value::F64(x) => Ok(*x),
                    Value::I32(x) => Ok(f64::from(*x)),
                    Value::U32(x) => Ok(f64::from(*x)),
                    Value::I8(x) => Ok(f64::from(*x)),
                    Value::U8(x) => Ok(f64::from(*x)),
                    Value::I16(x) => Ok(f64::from(*x)),
                    Value::U16(x) => Ok(f64::from(*x)),
                    other => Err(self.err(key, format!("expected numbers, found {other:?}"))),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(self.err(key, format!("expected a list of numbers, found {v:?}"))),
        }
    }

    fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The `[rows, cols]` (or `[n]`) shape of a stored tensor.
    fn tensor_dims(&self, name: &str) -> Option<Vec<usize>> {
        self.content
            .tensor_infos
            .get(name)
            .map(|t| t.shape.dims().to_vec())
    }

    /// The model's shape, from `{arch}.*` keys (as llama.cpp's `llm_load_hparams` reads them).
    fn config(&self) -> Result<ModelConfig> {
        let arch = self.arch()?;
        let architecture = match arch.as_str() {
            "llama" | "mistral" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            "qwen3" => Architecture::Qwen3,
            other => {
                return Err(self.err(
                    "general.architecture",
                    format!("`{other}` is not supported; supported: llama (Llama, Mistral and look-alikes), qwen2, qwen3"),
                ))
            }
        };
        let key = |k: &str| format!("{arch}.{k}");
        let hidden_size = self.usize(&key("embedding_length"))?;
        let num_heads = self.usize(&key("attention.head_count"))?;
        let num_kv_heads = self
            .usize_opt(&key("attention.head_count_kv"))?
            .unwrap_or(num_heads);
        if num_heads % num_kv_heads != 0 {
            return Err(self.err(
                &key("attention.head_count_kv"),
                format!("{num_kv_heads} does not divide the head count ({num_heads})"),
            ));
        }
        let head_dim = match self.usize_opt(&key("attention.key_length"))? {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(self.err(
                    &key("attention.head_count"),
                    format!("{num_heads} does not divide the embedding length ({hidden_size}) and no key_length is given"),
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(self.err(
                &key("attention.key_length"),
                format!("{head_dim} must be even for rotary embeddings"),
            ));
        }
        if let Some(rot) = self.usize_opt(&key("rope.dimension_count"))? {
            if rot != head_dim {
                return Err(self.err(
                    &key("rope.dimension_count"),
                    format!("partial rotary embedding ({rot} of {head_dim} dimensions) is not supported"),
                ));
            }
        }
        let vocab_size = match self.usize_opt(&key("vocab_size"))? {
            Some(n) => n,
            None => self
                .tensor_dims("token_embd.weight")
                .and_then(|d| d.first().copied())
                .ok_or_else(|| {
                    self.err(
                        "token_embd.weight",
                        "missing: the file has no token embedding",
                    )
                })?,
        };
        let rope_scaling = if let Some(dims) = self.tensor_dims("rope_freqs.weight") {
            if dims != [head_dim / 2] {
                return Err(self.err(
                    "rope_freqs.weight",
                    format!("shape {dims:?}; expected [{}]", head_dim / 2),
                ));
            }
            let t = self.dense("rope_freqs.weight")?;
            RopeScaling::Factors(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
        } else {
            match self.string_opt(&key("rope.scaling.type"))? {
                None | Some("none") => RopeScaling::None,
                Some("linear") => RopeScaling::Linear {
                    factor: self.f64_opt(&key("rope.scaling.factor"))?.ok_or_else(|| {
                        self.err(&key("rope.scaling.factor"), "missing for linear scaling")
                    })?,
                },
                Some(other) => {
                    return Err(self.err(
                        &key("rope.scaling.type"),
                        format!("`{other}` is not supported; supported: none, linear, and Llama 3.1 factors (rope_freqs)"),
                    ))
                }
            }
        };
        let qkv_bias = self.has_tensor("blk.0.attn_q.bias");
        let token = |k: &str| -> Result<Option<u32>> {
            Ok(self
                .u64_opt(&format!("tokenizer.ggml.{k}"))?
                .map(|n| n as u32))
        };
        let mut eos_token_ids: Vec<u32> = ["eos_token_id", "eot_token_id", "eom_token_id"]
            .iter()
            .map(|k| token(k))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect();
        eos_token_ids.sort_unstable();
        eos_token_ids.dedup();
        Ok(ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: self.usize(&key("feed_forward_length"))?,
            num_layers: self.usize(&key("block_count"))?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: self
                .f64_opt(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            rope_theta: self.f64_opt(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: self.usize_opt(&key("context_length"))?.unwrap_or(4096),
            tie_word_embeddings: !self.has_tensor("output.weight"),
            qkv_bias,
            o_bias: self.has_tensor("blk.0.attn_output.bias"),
            mlp_bias: self.has_tensor("blk.0.ffn_up.bias"),
            qk_norm: self.has_tensor("blk.0.attn_q_norm.weight"),
            sliding_window: None,
            saved_dtype: Some("gguf".into()),
            bos_token_id: token("bos_token_id")?,
            eos_token_ids,
        })
    }

    /// A small tensor read whole and dequantized (metadata-like tensors).
    fn dense(&self, name: &str) -> Result<Tensor> {
        let q = self
            .content
            .tensor(&mut *self.reader.borrow_mut(), name, &Device::Cpu)
            .map_err(|e| self.err(name, e.to_string()))?;
        Ok(q.dequantize(&Device::Cpu)?)
    }
}

/// The tensors of a GGUF file, looked up by their Hugging Face names.
pub struct GgufWeights {
    path: PathBuf,
    reader: Mutex<BufReader<File>>,
    content: Content,
    /// Query and key rows are interleaved per head (llama.cpp's `llama` layout): the query
    /// and key head counts to undo it with.
    permute_qk: Option<(usize, usize)>,
}

/// The GGUF name of a Hugging Face tensor name, as llama.cpp's converter maps them.
fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let module = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{module}.{kind}"))
}

impl GgufWeights {
    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn werr(&self, tensor: &str, message: impl Into<String>) -> EngineError {
        EngineError::Weight {
            path: self.path.clone(),
            tensor: tensor.into(),
            message: message.into(),
        }
    }

    /// True when the file holds the HF-named tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.content.tensor_infos.contains_key(&g))
    }

    /// Bytes of the file.
    pub fn total_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    /// Tensor `name` as stored (quantized or not), checked to have `shape`, with the rows of
    /// query and key heads back in Hugging Face order.
    pub fn qtensor(&self, name: &str, shape: &[usize]) -> Result<QTensor> {
        let g = gguf_name(name).ok_or_else(|| self.werr(name, "has no GGUF counterpart"))?;
        let Some(info) = self.content.tensor_infos.get(&g) else {
            return Err(self.werr(name, format!("missing (`{g}`; expected shape {shape:?})")));
        };
        if info.shape.dims() != shape {
            return Err(self.werr(
                name,
                format!(
                    "`{g}` has shape {:?}, which does not match the configuration's {shape:?}",
                    info.shape.dims()
                ),
            ));
        }
        let q = {
            let mut reader = self
                .reader
                .lock()
                .map_err(|_| self.werr(name, "the file reader was poisoned by a panic"))?;
            info.read(&mut *reader, self.content.tensor_data_offset, &Device::Cpu)
                .map_err(|e| self.werr(name, format!("`{g}`: {e}")))?
        };
        let heads = self.permute_qk.and_then(|(q_heads, kv_heads)| {
            if g.ends_with("attn_q.weight") {
                Some(q_heads)
            } else if g.ends_with("attn_k.weight") {
                Some(kv_heads)
            } else {
                None
            }
        });
        match heads {
            Some(heads) => unpermute_rows(&q, heads).map_err(|e| self.werr(name, e.to_string())),
            None => Ok(q),
        }
    }

    /// The half-precision dtype tensor `name` is stored in (f16 or bf16), if it is.
    pub fn half_dtype(&self, name: &str) -> Option<DType> {
        let info = self.content.tensor_infos.get(&gguf_name(name)?)?;
        match info.ggml_dtype {
            GgmlDType::F16 => Some(DType::F16),
            GgmlDType::BF16 => Some(DType::BF16),
            _ => None,
        }
    }

    /// True when tensor `name` is stored in a quantized format (not f32, f16 or bf16).
    pub fn is_quantized(&self, name: &str) -> bool {
        gguf_name(name)
            .and_then(|g| self.content.tensor_infos.get(&g))
            .is_some_and(|t| {
                !matches!(
                    t.ggml_dtype,
                    GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
                )
            })
    }

    /// Tensor `name` dequantized, as `dtype` on `device`.
    pub fn load(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let q = self.qtensor(name, shape)?;
        Ok(q.dequantize(&Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    }
}

/// Undoes llama.cpp's `permute` of a `[heads * head_dim, cols]` query or key matrix: within a
/// head, stored row `2i + j` is Hugging Face row `j * head_dim / 2 + i`. Rows are whole blocks
/// of any quantized format, so the bytes move as they are.
fn unpermute_rows(q: &QTensor, heads: usize) -> candle_core::Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        candle_core::bail!("{rows} rows do not split into {heads} heads of even width");
    }
    let dtype = q.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    if data.len() != rows * row_bytes {
        candle_core::bail!("{} bytes for {rows} rows of {row_bytes}", data.len());
    }
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let stored = h * hd + 2 * i + j;
                let hf = h * hd + j * half + i;
                out[hf * row_bytes..(hf + 1) * row_bytes]
                    .copy_from_slice(&data[stored * row_bytes..(stored + 1) * row_bytes]);
            }
        }
    }
    let storage = QStorage::from_data(Cow::Owned(out), &Device::Cpu, dtype)?;
    QTensor::new(storage, (rows, cols))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_as_llama_cpp_s_converter_writes_them() {
        for (hf, g) in [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("lm_head.weight", "output.weight"),
            ("model.layers.3.self_attn.q_proj.bias", "blk.3.attn_q.bias"),
            (
                "model.layers.0.self_attn.k_norm.weight",
                "blk.0.attn_k_norm.weight",
            ),
            (
                "model.layers.12.mlp.down_proj.weight",
                "blk.12.ffn_down.weight",
            ),
            (
                "model.layers.1.post_attention_layernorm.weight",
                "blk.1.ffn_norm.weight",
            ),
        ] {
            assert_eq!(gguf_name(hf).as_deref(), Some(g));
        }
        assert_eq!(gguf_name("model.layers.1.mlp.experts.weight"), None);
    }

    #[test]
    fn unpermuting_inverts_llama_cpp_s_permute() {
        // 2 heads of width 4, 32 columns (one Q8_0 block per row): row r holds value r.
        let (heads, hd, cols) = (2, 4, 32);
        let rows = heads * hd;
        let hf: Vec<f32> = (0..rows)
            .flat_map(|r| std::iter::repeat_n(r as f32, cols))
            .collect();
        // llama.cpp: reshape(heads, 2, hd/2) → swapaxes(1, 2).
        let mut stored = Vec::new();
        for h in 0..heads {
            for i in 0..hd / 2 {
                for j in 0..2 {
                    let r = h * hd + j * hd / 2 + i;
                    stored.extend_from_slice(&hf[r * cols..(r + 1) * cols]);
                }
            }
        }
        let t = Tensor::from_vec(stored, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        let back = unpermute_rows(&q, heads)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        let back: Vec<f32> = back.flatten_all().unwrap().to_vec1().unwrap();
        for (a, b) in back.iter().zip(&hf) {
            assert!((a - b).abs() < 0.05, "{a} vs {b}");
        }
    }
}
