//! The OpenInferencev2 engine: Llama-family models in candle over a paged KV cache, with
//! continuous batching, chunked prefill, sampling and incremental detokenization.
//!
//! * [`model_dir`] opens and checks a Hugging Face model directory, or a GGUF file ([`gguf`]);
//!   [`hub`] downloads either from the Hugging Face Hub.
//! * [`model`] is the batched decoder; [`batch`] lays out one step's inputs.
//! * [`kv_cache`] holds the paged cache; `step_scheduler` decides what each step computes
//!   (admission, KV blocks, preemption, prefill chunks) for both engines; [`engine`] runs the
//!   steps on a model.
//! * [`sampling`] and [`detokenize`] turn logits into tokens and text.
//! * [`backend`] is what a worker drives: the [`Engine`] or the model-free [`sim`] engine.
//! * [`reference`] reads the committed HF transformers reference outputs; [`perplexity`]
//!   scores a text the way llama.cpp's `llama-perplexity` does, with [`scoring`]'s
//!   teacher-forced next-token scores.
//! * [`tp`] splits a model across ranks (tensor parallelism) and holds their collectives.
//! * [`make_model`] writes random-weight model directories for demos, tests and benchmarks.

pub mod backend;
pub mod batch;
pub mod bench;
pub mod block_matmul;
pub mod config;
pub mod cpu_attention;
pub mod cpu_ops;
pub mod detokenize;
pub mod engine;
pub mod error;
pub(crate) mod fast_exp;
pub mod gguf;
pub(crate) mod guided;
pub mod hub;
pub mod int8_matmul;
pub mod kv_cache;
pub mod make_model;
pub mod model;
pub mod model_dir;
pub mod packed_matmul;
pub mod perplexity;
pub(crate) mod pool;
pub mod reference;
pub mod rope;
pub mod sampling;
pub mod scoring;
pub mod sim;
pub mod step_budget;
mod step_scheduler;
pub mod tokenizer;
pub mod tp;

pub use backend::Backend;
pub use candle_core::{DType, Device};
pub use config::{Architecture, ModelConfig};
pub use engine::{
    Capacity, Engine, EngineConfig, EngineInfo, Finished, SequenceRequest, StepOutput, TokenOutput,
};
pub use error::{EngineError, Result};
pub use model_dir::ModelDir;
pub use sim::{SimConfig, SimEngine};
pub use step_budget::StepTimeBudget;
pub use tokenizer::{ChatFacts, Tokenizer};

/// Parses a dtype name as used on the command line and in `config.json`.
pub fn parse_dtype(s: &str) -> Option<DType> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "float32" | "fp32" => Some(DType::F32),
        "bf16" | "bfloat16" => Some(DType::BF16),
        "f16" | "float16" | "fp16" | "half" => Some(DType::F16),
        _ => None,
    }
}

/// Parses a `--kv-cache-dtype`: `auto` (the compute dtype: `None`) or a dtype that
/// [`parse_dtype`] reads.
pub fn parse_kv_cache_dtype(s: &str) -> Result<Option<DType>> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(None);
    }
    parse_dtype(s).map(Some).ok_or_else(|| {
        EngineError::Config(format!("--kv-cache-dtype {s}: use auto, f32, f16 or bf16"))
    })
}

/// Parses a device name: `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ => {
            let ordinal = match s.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| {
                        EngineError::Config(format!("bad device `{s}`; use cpu, cuda or cuda:N"))
                    })?,
                None => {
                    return Err(EngineError::Config(format!(
                        "bad device `{s}`; use cpu, cuda or cuda:N"
                    )))
                }
            };
            Device::new_cuda(ordinal).map_err(|e| {
                EngineError::Config(format!(
                    "cannot open {s}: {e} (build with `--features cuda` for GPU support)"
                ))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_cache_dtypes_parse_and_a_wrong_one_says_what_to_use() {
        assert_eq!(parse_kv_cache_dtype("auto").unwrap(), None);
        assert_eq!(parse_kv_cache_dtype("F16").unwrap(), Some(DType::F16));
        assert_eq!(parse_kv_cache_dtype("bfloat16").unwrap(), Some(DType::BF16));
        assert_eq!(parse_kv_cache_dtype("f32").unwrap(), Some(DType::F32));
        let err = parse_kv_cache_dtype("fp8").unwrap_err().to_string();
        assert!(
            err.contains("--kv-cache-dtype fp8: use auto, f32, f16 or bf16"),
            "{err}"
        );
    }
}
