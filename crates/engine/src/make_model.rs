//! Writes random-weight Hugging Face model directories (`config.json`, safetensors weights,
//! a byte-level BPE `tokenizer.json`, `tokenizer_config.json`, `generation_config.json`) for
//! demos, tests and benchmarks. Weights are streamed to disk tensor by tensor, so even the
//! `llama3-8b` preset needs little memory.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::Path;

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::config::Architecture;
use crate::error::{EngineError, Result};

/// The shape of a model to make.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// Architecture to declare in `config.json`.
    pub architecture: Architecture,
    /// Residual width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// KV heads.
    pub num_kv_heads: usize,
    /// Vocabulary (tokenizer and embedding rows).
    pub vocab_size: usize,
    /// Longest position.
    pub max_position_embeddings: usize,
    /// Rotary base.
    pub rope_theta: f64,
    /// Use Llama 3.1 rope scaling.
    pub llama3_rope_scaling: bool,
    /// Share embedding and lm_head.
    pub tie_word_embeddings: bool,
    /// dtype of the saved weights: "float32", "bfloat16" or "float16".
    pub dtype: String,
    /// Weight seed.
    pub seed: u64,
    /// Largest shard in bytes; bigger models are written sharded with an index.
    pub max_shard_bytes: u64,
}

/// Named shapes.
pub const PRESETS: &[&str] = &["tiny", "small", "llama3-8b"];

impl ModelSpec {
    /// A named preset: `tiny` (demo, ~1M parameters), `small` (~125M, for CPU benchmarks) or
    /// `llama3-8b` (Llama 3.1 8B shape, bf16, for GPU benchmarks).
    pub fn preset(name: &str) -> Option<Self> {
        let base = ModelSpec {
            architecture: Architecture::Llama,
            hidden_size: 128,
            intermediate_size: 384,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            vocab_size: 2048,
            max_position_embeddings: 2048,
            rope_theta: 10_000.0,
            llama3_rope_scaling: false,
            tie_word_embeddings: false,
            dtype: "float32".into(),
            seed: 0,
            max_shard_bytes: 4 << 30,
        };
        match name {
            "tiny" => Some(base),
            "small" => Some(ModelSpec {
                hidden_size: 768,
                intermediate_size: 2048,
                num_layers: 12,
                num_heads: 12,
                num_kv_heads: 4,
                vocab_size: 32000,
                max_position_embeddings: 4096,
                ..base
            }),
            "llama3-8b" => Some(ModelSpec {
                hidden_size: 4096,
                intermediate_size: 14336,
                num_layers: 32,
                num_heads: 32,
                num_kv_heads: 8,
                vocab_size: 128_256,
                max_position_embeddings: 131_072,
                rope_theta: 500_000.0,
                llama3_rope_scaling: true,
                dtype: "bfloat16".into(),
                ..base
            }),
            _ => None,
        }
    }

    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::Config(m));
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || self.hidden_size == 0
            || self.num_layers == 0
        {
            return bad("sizes must be positive".into());
        }
        if !self.hidden_size.is_multiple_of(self.num_heads)
            || !(self.hidden_size / self.num_heads).is_multiple_of(2)
        {
            return bad(format!(
                "hidden size {} must be an even multiple of the head count {}",
                self.hidden_size, self.num_heads
            ));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "kv heads {} must divide heads {}",
                self.num_kv_heads, self.num_heads
            ));
        }
        if self.vocab_size < 256 + SPECIAL.len() {
            return bad(format!(
                "vocab size must be at least {}",
                256 + SPECIAL.len()
            ));
        }
        if dtype_bytes(&self.dtype).is_none() {
            return bad(format!(
                "dtype {} is not one of float32, bfloat16, float16",
                self.dtype
            ));
        }
        Ok(())
    }

    fn tensors(&self) -> Vec<(String, Vec<usize>, Init)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let hd = h / self.num_heads;
        let (q, kv) = (self.num_heads * hd, self.num_kv_heads * hd);
        let mut t = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
            Init::Random,
        )];
        for l in 0..self.num_layers {
            let p = format!("model.layers.{l}");
            t.push((format!("{p}.input_layernorm.weight"), vec![h], Init::Ones));
            t.push((
                format!("{p}.self_attn.q_proj.weight"),
                vec![q, h],
                Init::Random,
            ));
            t.push((
                format!("{p}.self_attn.k_proj.weight"),
                vec![kv, h],
                Init::Random,
            ));
            t.push((
                format!("{p}.self_attn.v_proj.weight"),
                vec![kv, h],
                Init::Random,
            ));
            if self.architecture == Architecture::Qwen2 {
                t.push((format!("{p}.self_attn.q_proj.bias"), vec![q], Init::Random));
                t.push((format!("{p}.self_attn.k_proj.bias"), vec![kv], Init::Random));
                t.push((format!("{p}.self_attn.v_proj.bias"), vec![kv], Init::Random));
            }
            if self.architecture == Architecture::Qwen3 {
                let hd = self.hidden_size / self.num_heads;
                t.push((format!("{p}.self_attn.q_norm.weight"), vec![hd], Init::Ones));
                t.push((format!("{p}.self_attn.k_norm.weight"), vec![hd], Init::Ones));
            }
            t.push((
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, q],
                Init::Random,
            ));
            t.push((
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                Init::Ones,
            ));
            t.push((
                format!("{p}.mlp.gate_proj.weight"),
                vec![i, h],
                Init::Random,
            ));
            t.push((format!("{p}.mlp.up_proj.weight"), vec![i, h], Init::Random));
            t.push((
                format!("{p}.mlp.down_proj.weight"),
                vec![h, i],
                Init::Random,
            ));
        }
        t.push(("model.norm.weight".to_string(), vec![h], Init::Ones));
        if !self.tie_word_embeddings {
            t.push((
                "lm_head.weight".to_string(),
                vec![self.vocab_size, h],
                Init::Random,
            ));
        }
        t
    }

    fn config_json(&self) -> Value {
        let (arch, model_type) = match self.architecture {
            Architecture::Llama => ("LlamaForCausalLM", "llama"),
            Architecture::Mistral => ("MistralForCausalLM", "mistral"),
            Architecture::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
            Architecture::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
        };
        let mut c = json!({
            "architectures": [arch],
            "model_type": model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-5,
            "rope_theta": self.rope_theta,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.dtype,
            "bos_token_id": BOS,
            "eos_token_id": EOS,
            "initializer_range": INIT_STD,
        });
        if self.llama3_rope_scaling {
            c["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        }
        c
    }
}

#[derive(Clone, Copy)]
enum Init {
    Random,
    Ones,
}

const INIT_STD: f64 = 0.02;
const SPECIAL: [&str; 3] = ["<unk>", "<s>", "</s>"];
const BOS: u32 = 1;
const EOS: u32 = 2;

fn dtype_bytes(dtype: &str) -> Option<usize> {
    match dtype {
        "float32" => Some(4),
        "bfloat16" | "float16" => Some(2),
        _ => None,
    }
}

fn st_dtype(dtype: &str) -> &'static str {
    match dtype {
        "float32" => "F32",
        "bfloat16" => "BF16",
        _ => "F16",
    }
}

/// The model of preset `name` in `cache_dir/name`, made there on first use (random weights:
/// no download). `progress` sees bytes written and the total while it is made.
pub fn ensure_preset(
    cache_dir: &Path,
    name: &str,
    progress: &dyn Fn(u64, u64),
) -> Result<std::path::PathBuf> {
    let dir = cache_dir.join(name);
    if dir.join("config.json").exists() && dir.join("tokenizer.json").exists() {
        return Ok(dir);
    }
    let spec = ModelSpec::preset(name).ok_or_else(|| {
        EngineError::Config(format!(
            "unknown model preset `{name}`; the presets are {}",
            PRESETS.join(", ")
        ))
    })?;
    make_model(&spec, &dir, progress)?;
    Ok(dir)
}

/// The chat template of a made model: each turn `<|role|>` on its own line, then its text and
/// eos (`</s>`).
const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}";

/// Writes a model directory for `spec` into `out`. `progress(bytes_done, bytes_total)` is
/// called as weights are written.
pub fn make_model(spec: &ModelSpec, out: &Path, progress: &dyn Fn(u64, u64)) -> Result<()> {
    spec.check()?;
    std::fs::create_dir_all(out).map_err(|e| EngineError::io(out, e))?;
    let write_json = |name: &str, v: &Value| -> Result<()> {
        let p = out.join(name);
        let text = serde_json::to_string_pretty(v).expect("JSON values serialize");
        std::fs::write(&p, text).map_err(|e| EngineError::io(p, e))
    };
    write_json("config.json", &spec.config_json())?;
    write_json("tokenizer.json", &byte_level_bpe(spec.vocab_size))?;
    write_json(
        "tokenizer_config.json",
        &json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                "add_bos_token": true, "add_eos_token": false,
                "model_max_length": spec.max_position_embeddings,
                "chat_template": CHAT_TEMPLATE,
                "tokenizer_class": "PreTrainedTokenizerFast"}),
    )?;
    write_json(
        "generation_config.json",
        &json!({"bos_token_id": BOS, "eos_token_id": EOS}),
    )?;
    write_weights(spec, out, progress)
}

/// Groups tensors into shards and streams each shard's data.
fn write_weights(spec: &ModelSpec, out: &Path, progress: &dyn Fn(u64, u64)) -> Result<()> {
    let elem = dtype_bytes(&spec.dtype).expect("checked") as u64;
    let tensors = spec.tensors();
    let total: u64 = tensors
        .iter()
        .map(|(_, s, _)| s.iter().product::<usize>() as u64 * elem)
        .sum();
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0u64;
    for (i, (_, shape, _)) in tensors.iter().enumerate() {
        let bytes = shape.iter().product::<usize>() as u64 * elem;
        if size > 0 && size + bytes > spec.max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("one shard").push(i);
        size += bytes;
    }
    let n = shards.len();
    let name_of = |k: usize| {
        if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", k + 1)
        }
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
    let mut done = 0u64;
    let mut weight_map = BTreeMap::new();
    for (k, members) in shards.iter().enumerate() {
        let file = name_of(k);
        let path = out.join(&file);
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut offset = 0u64;
        for &i in members {
            let (name, shape, _) = &tensors[i];
            let bytes = shape.iter().product::<usize>() as u64 * elem;
            header.insert(
                name.clone(),
                json!({"dtype": st_dtype(&spec.dtype), "shape": shape, "data_offsets": [offset, offset + bytes]}),
            );
            offset += bytes;
            weight_map.insert(name.clone(), file.clone());
        }
        let mut header = serde_json::to_vec(&Value::Object(header)).expect("JSON values serialize");
        while !header.len().is_multiple_of(8) {
            header.push(b' ');
        }
        let f = std::fs::File::create(&path).map_err(|e| EngineError::io(&path, e))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        let io = |e| EngineError::io(&path, e);
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&header).map_err(io)?;
        for &i in members {
            let (_, shape, init) = &tensors[i];
            let count = shape.iter().product::<usize>();
            write_values(&mut w, count, *init, &spec.dtype, &mut rng).map_err(io)?;
            done += count as u64 * elem;
            progress(done, total);
        }
        w.flush().map_err(io)?;
    }
    if n > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let p = out.join("model.safetensors.index.json");
        std::fs::write(
            &p,
            serde_json::to_string_pretty(&index).expect("serializes"),
        )
        .map_err(|e| EngineError::io(p, e))?;
    }
    Ok(())
}

fn write_values(
    w: &mut impl Write,
    count: usize,
    init: Init,
    dtype: &str,
    rng: &mut rand::rngs::StdRng,
) -> std::io::Result<()> {
    // Uniform with the standard deviation of HF's normal init: cheap and bounded.
    let a = (INIT_STD * 3f64.sqrt()) as f32;
    let mut buf = Vec::with_capacity(1 << 16);
    let mut left = count;
    while left > 0 {
        let n = left.min(1 << 14);
        buf.clear();
        for _ in 0..n {
            let v = match init {
                Init::Ones => 1.0f32,
                Init::Random => rng.random_range(-a..a),
            };
            match dtype {
                "float32" => buf.extend_from_slice(&v.to_le_bytes()),
                "bfloat16" => buf.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                _ => buf.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
            }
        }
        w.write_all(&buf)?;
        left -= n;
    }
    Ok(())
}

/// Text the tokenizer's merges are learned from.
const CORPUS: &str = include_str!("make_model_corpus.txt");

/// GPT-2's reversible byte → printable character map used by byte-level BPE.
pub fn bytes_to_unicode() -> Vec<char> {
    let mut map = vec!['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).expect("latin-1 is valid")
        } else {
            extra += 1;
            char::from_u32(255 + extra).expect("valid code point")
        };
    }
    map
}

/// A byte-level BPE `tokenizer.json` with exactly `vocab_size` entries: three special tokens,
/// the 256 byte symbols, merges learned from a built-in corpus, then synthetic merges (valid
/// pairs of existing tokens) until the vocabulary is full.
pub fn byte_level_bpe(vocab_size: usize) -> Value {
    let b2u = bytes_to_unicode();
    let mut vocab: Vec<String> = SPECIAL.iter().map(|s| s.to_string()).collect();
    vocab.extend(b2u.iter().map(|c| c.to_string()));
    let mut known: HashSet<String> = vocab.iter().cloned().collect();
    let mut merges: Vec<(String, String)> = Vec::new();

    // Words as sequences of byte symbols, with their counts.
    let mut words: HashMap<Vec<String>, usize> = HashMap::new();
    for (i, w) in CORPUS.split(' ').enumerate() {
        let text = if i == 0 {
            w.to_string()
        } else {
            format!(" {w}")
        };
        let sym: Vec<String> = text.bytes().map(|b| b2u[b as usize].to_string()).collect();
        *words.entry(sym).or_default() += 1;
    }
    let mut words: Vec<(Vec<String>, usize)> = words.into_iter().collect();
    words.sort();
    while vocab.len() < vocab_size {
        let mut pairs: HashMap<(&str, &str), usize> = HashMap::new();
        for (w, c) in &words {
            for p in w.windows(2) {
                *pairs.entry((&p[0], &p[1])).or_default() += c;
            }
        }
        let best = pairs
            .into_iter()
            .filter(|&(_, c)| c >= 2)
            .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)))
            .map(|((a, b), _)| (a.to_string(), b.to_string()));
        let Some((a, b)) = best else { break };
        let merged = format!("{a}{b}");
        for (w, _) in words.iter_mut() {
            let mut i = 0;
            while i + 1 < w.len() {
                if w[i] == a && w[i + 1] == b {
                    w[i] = merged.clone();
                    w.remove(i + 1);
                }
                i += 1;
            }
        }
        if known.insert(merged.clone()) {
            vocab.push(merged);
        }
        merges.push((a, b));
    }
    // Fill up with synthetic merges of existing tokens (deterministic order).
    let base: Vec<String> = vocab[SPECIAL.len()..].to_vec();
    'fill: for a in base
        .iter()
        .chain(vocab.clone().iter().skip(SPECIAL.len() + 256))
    {
        for b in &base {
            if vocab.len() >= vocab_size {
                break 'fill;
            }
            let merged = format!("{a}{b}");
            if known.insert(merged.clone()) {
                vocab.push(merged);
                merges.push((a.clone(), b.clone()));
            }
        }
    }
    let vocab_map: serde_json::Map<String, Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<Value> = SPECIAL
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab_map,
            "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    #[test]
    fn presets_have_the_documented_shapes() {
        let params = |name: &str| {
            let spec = ModelSpec::preset(name).unwrap();
            spec.check().unwrap();
            let cfg =
                ModelConfig::from_json(&spec.config_json(), Path::new("config.json")).unwrap();
            let from_tensors: usize = spec
                .tensors()
                .iter()
                .map(|(_, s, _)| s.iter().product::<usize>())
                .sum();
            assert_eq!(cfg.num_parameters(), from_tensors, "{name}");
            from_tensors
        };
        let small = params("small");
        assert!(
            (120_000_000..135_000_000).contains(&small),
            "small has {small} parameters"
        );
        let big = params("llama3-8b");
        assert!(
            (8_000_000_000..8_100_000_000).contains(&big),
            "llama3-8b has {big} parameters"
        );
        assert!(params("tiny") < 2_000_000);
        assert!(ModelSpec::preset("huge").is_none());
    }

    #[test]
    fn tokenizer_has_exact_vocab_and_round_trips_any_text() {
        let v = byte_level_bpe(1000);
        let tok = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&v).unwrap()).unwrap();
        assert_eq!(tok.get_vocab_size(true), 1000);
        for text in [
            "Hello world, the quick brown fox.",
            "café naïve 日本語 🙂",
            "  spaces\n\ttabs",
        ] {
            let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
            assert_eq!(tok.decode(&ids, false).unwrap(), text);
            assert!(ids.len() < text.len() || !text.is_ascii() || text.starts_with(' '));
        }
    }
}
