//! llama.cpp as the CPU peer of `openinfer bench-engine`: its own benchmarks on the same GGUF
//! file with the same threads, in the same run. `llama-bench` measures prompt processing and
//! the decode of one sequence after the prompt; `llama-batched-bench` the decode of a batch of
//! sequences, each after its own prompt. `scripts/build-llama-cpp.sh` builds both.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use openinfer_engine::bench::PhaseRates;
use serde::Deserialize;

use crate::stats::median;

/// What is measured, the same for both engines.
pub struct Settings {
    pub threads: usize,
    pub prompt_len: usize,
    pub decode_steps: usize,
    pub batch: usize,
    pub repeats: usize,
    /// What both caches hold, as llama.cpp names it (`-ctk` / `-ctv`): f32, f16 or bf16.
    pub kv_cache_type: &'static str,
}

/// The llama.cpp binaries in `bin`, when both benchmarks are there.
pub fn find(bin: &Path) -> Option<(PathBuf, PathBuf)> {
    let bench = bin.join("llama-bench");
    let batched = bin.join("llama-batched-bench");
    (bench.is_file() && batched.is_file()).then_some((bench, batched))
}

/// One test of `llama-bench -o json`.
#[derive(Deserialize)]
struct BenchTest {
    n_prompt: usize,
    n_gen: usize,
    n_depth: usize,
    avg_ts: f64,
}

/// One line of `llama-batched-bench --output-format jsonl`.
#[derive(Deserialize)]
struct BatchedLine {
    pl: usize,
    speed_tg: f64,
}

/// Runs llama.cpp's benchmarks on `model` (a GGUF file) with `s`.
pub fn measure(
    bench: &Path,
    batched: &Path,
    model: &Path,
    s: &Settings,
) -> anyhow::Result<PhaseRates> {
    let threads = s.threads.to_string();
    // Prompt processing from an empty context, and decode after a prompt of the same length
    // (`-d`: the context depth the generated tokens attend to).
    let out = run(Command::new(bench)
        .arg("-m")
        .arg(model)
        .args(["-t", &threads, "-o", "json", "-r", &s.repeats.to_string()])
        .args(bench_cache_type(s.kv_cache_type))
        .args([
            "-p",
            &s.prompt_len.to_string(),
            "-n",
            &s.decode_steps.to_string(),
        ])
        .args(["-d", &format!("0,{}", s.prompt_len)]))?;
    let (prefill, single) = bench_rates(&out, s.prompt_len, s.decode_steps)?;

    // A batch of sequences, each with its own prompt, then `decode_steps` steps of all.
    let ctx = s.batch * (s.prompt_len + s.decode_steps) + 64;
    let mut batch_rates = Vec::new();
    for _ in 0..s.repeats {
        let out = run(Command::new(batched)
            .arg("-m")
            .arg(model)
            .args(["-t", &threads, "-tb", &threads, "-c", &ctx.to_string()])
            .args(["-ctk", s.kv_cache_type, "-ctv", s.kv_cache_type])
            .args([
                "-npp",
                &s.prompt_len.to_string(),
                "-ntg",
                &s.decode_steps.to_string(),
            ])
            .args(["-npl", &s.batch.to_string(), "--output-format", "jsonl"]))?;
        batch_rates.push(batched_rate(&out, s.batch)?);
    }
    Ok(PhaseRates {
        prefill_tok_s: prefill,
        single_decode_tok_s: single,
        batch_decode_tok_s: median(batch_rates),
    })
}

/// `llama-bench`'s cache-type flags for `kv` (`-ctk`/`-ctv`): none for f32, which it does not
/// take (it keeps its f16 cache; one sequence's cache is a small part of what a step reads).
fn bench_cache_type(kv: &str) -> Vec<&str> {
    if kv == "f32" {
        Vec::new()
    } else {
        vec!["-ctk", kv, "-ctv", kv]
    }
}

/// Prefill (`prompt` tokens from an empty context) and decode (`steps` tokens after `prompt`)
/// rates from `llama-bench -o json`'s output.
fn bench_rates(out: &str, prompt: usize, steps: usize) -> anyhow::Result<(f64, f64)> {
    let tests: Vec<BenchTest> = serde_json::from_str(json_part(out, '['))
        .with_context(|| format!("llama-bench printed no JSON array:\n{out}"))?;
    let pick = |n_prompt: usize, n_gen: usize, n_depth: usize| {
        tests
            .iter()
            .find(|t| (t.n_prompt, t.n_gen, t.n_depth) == (n_prompt, n_gen, n_depth))
            .map(|t| t.avg_ts)
            .with_context(|| {
                format!("llama-bench reported no test p{n_prompt} n{n_gen} d{n_depth}:\n{out}")
            })
    };
    Ok((pick(prompt, 0, 0)?, pick(0, steps, prompt)?))
}

/// The decode rate of `batch` sequences from `llama-batched-bench --output-format jsonl`'s
/// output (it prints nothing when its context cannot hold the batch).
fn batched_rate(out: &str, batch: usize) -> anyhow::Result<f64> {
    out.lines()
        .filter_map(|l| serde_json::from_str::<BatchedLine>(l.trim()).ok())
        .find(|l| l.pl == batch)
        .map(|l| l.speed_tg)
        .with_context(|| {
            format!("llama-batched-bench printed no result for {batch} sequences:\n{out}")
        })
}

/// Runs `cmd` and returns its standard output; its standard error on failure.
fn run(cmd: &mut Command) -> anyhow::Result<String> {
    tracing::info!(command = ?cmd, "running llama.cpp");
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}):\n{}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `text` from the first `open` on (llama-bench may print log lines before its JSON).
fn json_part(text: &str, open: char) -> &str {
    text.find(open).map_or(text, |i| &text[i..])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `llama-bench -p 8 -n 4 -d 0,8 -o json` on `tests/fixtures/gguf/llama.gguf`, trimmed to
    /// a few of its fields.
    const BENCH: &str = r#"[
 {"model_type": "llama ?B all F32", "n_threads": 1, "n_prompt": 8, "n_gen": 0, "n_depth": 0, "avg_ts": 24395.450249, "stddev_ts": 0.0},
 {"model_type": "llama ?B all F32", "n_threads": 1, "n_prompt": 0, "n_gen": 4, "n_depth": 0, "avg_ts": 14612.299172, "stddev_ts": 0.0},
 {"model_type": "llama ?B all F32", "n_threads": 1, "n_prompt": 8, "n_gen": 0, "n_depth": 8, "avg_ts": 35198.873636, "stddev_ts": 0.0},
 {"model_type": "llama ?B all F32", "n_threads": 1, "n_prompt": 0, "n_gen": 4, "n_depth": 8, "avg_ts": 15561.780268, "stddev_ts": 0.0}
]"#;

    /// `llama-batched-bench -npp 8 -ntg 4 -npl 3 --output-format jsonl` on the same file.
    const BATCHED: &str = r#"
{"n_kv_max": 4608, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 1, "n_threads_batch": 1, "pp": 8, "tg": 4, "pl": 3, "n_kv": 36, "t_pp": 0.005204, "speed_pp": 4611.836914, "t_tg": 0.000855, "speed_tg": 14035.087891, "t": 0.006059, "speed": 5941.574219}
"#;

    #[test]
    fn llama_bench_keeps_its_own_cache_where_it_has_no_f32_one() {
        assert!(bench_cache_type("f32").is_empty());
        assert_eq!(bench_cache_type("f16"), ["-ctk", "f16", "-ctv", "f16"]);
        assert_eq!(bench_cache_type("bf16"), ["-ctk", "bf16", "-ctv", "bf16"]);
    }

    #[test]
    fn reads_the_rates_llama_cpp_prints() {
        let (prefill, decode) = bench_rates(&format!("log line\n{BENCH}"), 8, 4).unwrap();
        assert_eq!((prefill, decode), (24395.450249, 15561.780268));
        assert!(bench_rates(BENCH, 16, 4).is_err(), "no such prompt length");
        assert_eq!(batched_rate(BATCHED, 3).unwrap(), 14035.087891);
        assert!(batched_rate(BATCHED, 16).is_err());
        assert!(
            batched_rate("", 3).is_err(),
            "nothing printed: the context was too small"
        );
    }
}
