//! `config.json` of a Hugging Face model directory, checked and normalised into the one shape
//! the Llama-family model code needs.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{EngineError, Result};

/// The model families the engine runs. They share the Llama block; they differ in biases,
/// rope variants and attention windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `LlamaForCausalLM` (Llama 2, 3, 3.1, 3.2 and look-alikes).
    Llama,
    /// `MistralForCausalLM`.
    Mistral,
    /// `Qwen2ForCausalLM` (biases on q/k/v).
    Qwen2,
    /// `Qwen3ForCausalLM` (RMSNorm on each query and key head, `head_dim` apart from the
    /// hidden size).
    Qwen3,
}

impl Architecture {
    /// The HF class name.
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
        }
    }
}

/// How rotary frequencies are adjusted for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain rotary embedding.
    None,
    /// Positions divided by `factor`.
    Linear {
        /// Scale factor.
        factor: f64,
    },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        /// Scale factor for low frequencies.
        factor: f64,
        /// Wavelength boundary (as a divisor of the original context) below which...
        low_freq_factor: f64,
        /// ...and above which frequencies are interpolated.
        high_freq_factor: f64,
        /// Context length the model was pre-trained on.
        original_max_position_embeddings: f64,
    },
    /// Each rotary frequency divided by its own factor (GGUF's `rope_freqs` tensor, which
    /// llama.cpp's converter writes for Llama 3.1 scaling).
    Factors(Vec<f32>),
}

/// The normalised model configuration.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Model family.
    pub architecture: Architecture,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA when fewer than query heads).
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Rows of the embedding matrix.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary base.
    pub rope_theta: f64,
    /// Rotary scaling.
    pub rope_scaling: RopeScaling,
    /// Longest position the model supports.
    pub max_position_embeddings: usize,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections have biases.
    pub qkv_bias: bool,
    /// o projection has a bias (Llama `attention_bias`).
    pub o_bias: bool,
    /// MLP projections have biases (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Queries and keys are RMS-normalised per head before rotary embedding (Qwen3).
    pub qk_norm: bool,
    /// Sliding attention window, when the model uses one.
    pub sliding_window: Option<usize>,
    /// dtype the checkpoint was saved in (`torch_dtype` / `dtype`), if stated.
    pub saved_dtype: Option<String>,
    /// `bos_token_id` from config.json, if any.
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` from config.json (int or list), if any.
    pub eos_token_ids: Vec<u32>,
}

/// Reads fields of one JSON object, turning every problem into an error naming file and field.
struct Fields<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn err(&self, field: &str, message: impl Into<String>) -> EngineError {
        EngineError::ConfigField {
            path: self.path.to_path_buf(),
            field: field.to_string(),
            message: message.into(),
        }
    }

    fn get(&self, field: &str) -> Option<&'a Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, field: &str) -> Result<Option<usize>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(field, format!("expected a positive integer, found {v}"))),
        }
    }

    fn usize(&self, field: &str) -> Result<usize> {
        self.usize_opt(field)?
            .ok_or_else(|| self.err(field, "missing; it is required for this architecture"))
    }

    fn f64_opt(&self, field: &str) -> Result<Option<f64>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected a number, found {v}"))),
        }
    }

    fn bool_opt(&self, field: &str) -> Result<Option<bool>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected true or false, found {v}"))),
        }
    }

    fn token_ids(&self, field: &str) -> Result<Vec<u32>> {
        token_id_list(self.get(field))
            .ok_or_else(|| self.err(field, "expected a token id or a list of token ids"))
    }
}

/// Parses a token id given as an integer or a list of integers (`null` → empty).
pub(crate) fn token_id_list(v: Option<&Value>) -> Option<Vec<u32>> {
    match v {
        None | Some(Value::Null) => Some(Vec::new()),
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_u64().map(|n| n as u32))
            .collect::<Option<Vec<_>>>(),
        Some(_) => None,
    }
}

impl ModelConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::ModelFile {
            path: path.to_path_buf(),
            message: format!("cannot read the model configuration ({e}); a Hugging Face model directory needs config.json"),
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|e| EngineError::ModelFile {
            path: path.to_path_buf(),
            message: format!("not valid JSON: {e}"),
        })?;
        Self::from_json(&value, path)
    }

    /// Checks a parsed `config.json`; `path` is used in error messages.
    pub fn from_json(value: &Value, path: &Path) -> Result<Self> {
        let obj = value.as_object().ok_or_else(|| EngineError::ModelFile {
            path: path.to_path_buf(),
            message: "expected a JSON object".into(),
        })?;
        let f = Fields { path, obj };
        let architecture = architecture(&f)?;
        let hidden_size = f.usize("hidden_size")?;
        let num_heads = f.usize("num_attention_heads")?;
        let num_kv_heads = f.usize_opt("num_key_value_heads")?.unwrap_or(num_heads);
        if num_heads % num_kv_heads != 0 {
            return Err(f.err(
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads ({num_heads})"),
            ));
        }
        let head_dim = match f.usize_opt("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(f.err(
                    "num_attention_heads",
                    format!("{num_heads} does not divide hidden_size ({hidden_size}) and no head_dim is given"),
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(f.err(
                "head_dim",
                format!("{head_dim} must be even for rotary embeddings"),
            ));
        }
        if let Some(act) = f.get("hidden_act").or_else(|| f.get("hidden_activation")) {
            if act.as_str() != Some("silu") {
                return Err(f.err(
                    "hidden_act",
                    format!("{act} is not supported; only \"silu\" is"),
                ));
            }
        }
        // transformers ≥ 5 nests rope settings in `rope_parameters`; older files use
        // `rope_theta` + `rope_scaling`.
        let rope_params = f.get("rope_parameters").and_then(Value::as_object);
        let rope_theta = match rope_params.and_then(|p| p.get("rope_theta")) {
            Some(v) => v
                .as_f64()
                .ok_or_else(|| f.err("rope_parameters.rope_theta", "expected a number"))?,
            None => f.f64_opt("rope_theta")?.unwrap_or(10_000.0),
        };
        let (scaling_field, scaling) = match rope_params {
            Some(p) => ("rope_parameters", Some(p)),
            None => (
                "rope_scaling",
                match f.get("rope_scaling") {
                    None => None,
                    Some(v) => Some(
                        v.as_object()
                            .ok_or_else(|| f.err("rope_scaling", "expected an object or null"))?,
                    ),
                },
            ),
        };
        let rope_scaling = rope_scaling(&f, scaling_field, scaling)?;
        let tie_word_embeddings = f.bool_opt("tie_word_embeddings")?.unwrap_or(false);
        let attention_bias = f.bool_opt("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };
        let mlp_bias = f.bool_opt("mlp_bias")?.unwrap_or(false);
        let sliding_window = match architecture {
            Architecture::Qwen2 | Architecture::Qwen3
                if !f.bool_opt("use_sliding_window")?.unwrap_or(false) =>
            {
                None
            }
            Architecture::Llama => None,
            _ => f.usize_opt("sliding_window")?,
        };
        let rms_norm_eps = f.f64_opt("rms_norm_eps")?.unwrap_or(1e-6);
        let saved_dtype = f
            .get("dtype")
            .or_else(|| f.get("torch_dtype"))
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_layers: f.usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: f.usize("vocab_size")?,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: f.usize_opt("max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings,
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm: architecture == Architecture::Qwen3,
            sliding_window,
            saved_dtype,
            bos_token_id: f.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: f.token_ids("eos_token_id")?,
        })
    }

    /// Parameters in the weights (for reporting and benchmarks).
    pub fn num_parameters(&self) -> usize {
        let embed = self.vocab_size * self.hidden_size;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.lm_head_parameters()
        };
        embed + head + self.layer_parameters() + self.hidden_size
    }

    /// Parameters of all decoder layers (the weights every token passes through).
    pub fn layer_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let attn = h * q + 2 * h * kv + q * h;
        let mlp = 3 * h * self.intermediate_size;
        let qk_norm = if self.qk_norm { 2 * self.head_dim } else { 0 };
        self.num_layers * (attn + mlp + 2 * h + qk_norm)
    }

    /// Parameters of the output projection (shared with the embedding when tied).
    pub fn lm_head_parameters(&self) -> usize {
        self.vocab_size * self.hidden_size
    }
}

fn architecture(f: &Fields) -> Result<Architecture> {
    let names: Vec<&str> = f
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let model_type = f.get("model_type").and_then(Value::as_str);
    let by_name = names.iter().find_map(|n| match *n {
        "LlamaForCausalLM" => Some(Architecture::Llama),
        "MistralForCausalLM" => Some(Architecture::Mistral),
        "Qwen2ForCausalLM" => Some(Architecture::Qwen2),
        "Qwen3ForCausalLM" => Some(Architecture::Qwen3),
        _ => None,
    });
    let by_type = match model_type {
        Some("llama") => Some(Architecture::Llama),
        Some("mistral") => Some(Architecture::Mistral),
        Some("qwen2") => Some(Architecture::Qwen2),
        Some("qwen3") => Some(Architecture::Qwen3),
        _ => None,
    };
    by_name.or(by_type).ok_or_else(|| {
        f.err(
            "architectures",
            format!(
                "unsupported architecture {names:?} (model_type {model_type:?}); supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"
            ),
        )
    })
}

fn rope_scaling(f: &Fields, field: &str, obj: Option<&Map<String, Value>>) -> Result<RopeScaling> {
    let Some(obj) = obj else {
        return Ok(RopeScaling::None);
    };
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |name: &str| -> Result<f64> {
        obj.get(name)
            .and_then(Value::as_f64)
            .ok_or_else(|| f.err(&format!("{field}.{name}"), "missing or not a number"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => Err(f.err(
            &format!("{field}.rope_type"),
            format!(
                "rope scaling \"{other}\" is not supported; supported: default, linear, llama3"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 128
        })
    }

    fn parse(v: &Value) -> Result<ModelConfig> {
        ModelConfig::from_json(v, Path::new("config.json"))
    }

    #[test]
    fn parses_llama_defaults() {
        let c = parse(&base()).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_theta, 10_000.0);
        assert_eq!(c.rope_scaling, RopeScaling::None);
        assert!(!c.qkv_bias && !c.tie_word_embeddings);
    }

    #[test]
    fn reads_llama3_scaling_in_both_layouts() {
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let old = parse(&v).unwrap();
        let mut w = base();
        w["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let new = parse(&w).unwrap();
        assert_eq!(old.rope_scaling, new.rope_scaling);
        assert_eq!(new.rope_theta, 500000.0);
    }

    #[test]
    fn errors_name_the_field() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = parse(&v).unwrap_err().to_string();
        assert!(
            e.contains("config.json") && e.contains("`hidden_size`"),
            "{e}"
        );

        let mut v = base();
        v["architectures"] = json!(["GPT2LMHeadModel"]);
        let e = parse(&v).unwrap_err().to_string();
        assert!(
            e.contains("`architectures`") && e.contains("GPT2LMHeadModel"),
            "{e}"
        );

        let mut v = base();
        v["num_key_value_heads"] = json!(3);
        assert!(parse(&v)
            .unwrap_err()
            .to_string()
            .contains("`num_key_value_heads`"));

        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        assert!(parse(&v)
            .unwrap_err()
            .to_string()
            .contains("rope_scaling.rope_type"));
    }

    #[test]
    fn qwen2_has_qkv_bias_and_eos_lists_parse() {
        let mut v = base();
        v["architectures"] = json!(["Qwen2ForCausalLM"]);
        v["eos_token_id"] = json!([5, 7]);
        let c = parse(&v).unwrap();
        assert!(c.qkv_bias && !c.o_bias);
        assert_eq!(c.eos_token_ids, vec![5, 7]);
    }

    #[test]
    fn qwen3_has_qk_norm_no_bias_and_its_own_head_dim() {
        let mut v = base();
        v["architectures"] = json!(["Qwen3ForCausalLM"]);
        v["head_dim"] = json!(32);
        v["sliding_window"] = json!(64);
        let c = parse(&v).unwrap();
        assert_eq!(c.architecture, Architecture::Qwen3);
        assert!(c.qk_norm && !c.qkv_bias && !c.o_bias);
        assert_eq!(c.head_dim, 32);
        assert_eq!(
            c.sliding_window, None,
            "use_sliding_window is false by default"
        );
    }
}
