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
        .args([
            "-p",
            &s.prompt_len.to_string(),
            "-n",
            &s.decode_steps.to_string(),
        ])
        .args(["-d", &format!("0,{}", s.prompt_len)]))?;
    let tests: Vec<BenchTest> = serde_json::from_str(json_part(&out, '['))
        .with_context(|| format!("llama-bench printed no JSON array:\n{out}"))?;
    let pick = |prompt: usize, gen: usize, depth: usize| {
        tests
            .iter()
            .find(|t| t.n_prompt == prompt && t.n_gen == gen && t.n_depth == depth)
            .map(|t| t.avg_ts)
            .with_context(|| format!("llama-bench reported no test p{prompt} n{gen} d{depth}"))
    };
    let prefill = pick(s.prompt_len, 0, 0)?;
    let single = pick(0, s.decode_steps, s.prompt_len)?;

    // A batch of sequences, each with its own prompt, then `decode_steps` steps of all.
    let ctx = s.batch * (s.prompt_len + s.decode_steps) + 64;
    let mut batch_rates = Vec::new();
    for _ in 0..s.repeats {
        let out = run(Command::new(batched)
            .arg("-m")
            .arg(model)
            .args(["-t", &threads, "-tb", &threads, "-c", &ctx.to_string()])
            .args([
                "-npp",
                &s.prompt_len.to_string(),
                "-ntg",
                &s.decode_steps.to_string(),
            ])
            .args(["-npl", &s.batch.to_string(), "--output-format", "jsonl"]))?;
        let line = out
            .lines()
            .filter_map(|l| serde_json::from_str::<BatchedLine>(l.trim()).ok())
            .find(|l| l.pl == s.batch)
            .with_context(|| {
                format!(
                    "llama-batched-bench printed no result for {} sequences:\n{out}",
                    s.batch
                )
            })?;
        batch_rates.push(line.speed_tg);
    }
    Ok(PhaseRates {
        prefill_tok_s: prefill,
        single_decode_tok_s: single,
        batch_decode_tok_s: median(batch_rates),
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
