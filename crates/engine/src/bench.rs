//! Engine speed measurements and the machine ceilings they are compared with.
//!
//! Each phase is measured the way `scripts/bench_hf.py` measures HF transformers, so the two
//! can be put side by side: prefill of one prompt, decode of one sequence, decode of a batch
//! (decode phase only, after an untimed prefill).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use openinfer_core::SequenceId;

use crate::engine::{Engine, SequenceRequest};
use crate::error::{EngineError, Result};
use crate::packed_matmul::PackedWeight;

/// Tokens per second of each phase.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PhaseRates {
    /// Prefill of one prompt.
    pub prefill_tok_s: f64,
    /// Decode of one sequence.
    pub single_decode_tok_s: f64,
    /// Decode of a batch (tokens of all sequences).
    pub batch_decode_tok_s: f64,
}

/// What the machine can do at best.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Ceilings {
    /// Memory copy bandwidth, bytes/s (read + write counted).
    pub memory_bandwidth: f64,
    /// Matmul rate in the compute dtype, FLOP/s.
    pub matmul_flops: f64,
}

fn request(id: u64, prompt: Vec<u32>, max_new: u32) -> SequenceRequest {
    let mut r = SequenceRequest::greedy(SequenceId(id), prompt, max_new);
    r.stopping.ignore_eos = true;
    r
}

/// Deterministic prompt tokens that avoid the first ids (special tokens).
pub fn prompt(len: usize, vocab: usize, salt: u64) -> Vec<u32> {
    (0..len)
        .map(|i| 16 + (crate::sampling::mix(salt, i as u64) % (vocab as u64 - 16)) as u32)
        .collect()
}

fn step_until_idle(engine: &mut Engine) -> Result<()> {
    while engine.has_work() {
        engine.step()?;
    }
    Ok(())
}

/// Seconds of one prefill of `prompt_len` tokens (the engine's step budget must cover it).
pub fn prefill_seconds(engine: &mut Engine, prompt_len: usize, salt: u64) -> Result<f64> {
    let vocab = engine.info().vocab_size;
    engine.add(request(u64::MAX - salt, prompt(prompt_len, vocab, salt), 1))?;
    let t = Instant::now();
    step_until_idle(engine)?;
    Ok(t.elapsed().as_secs_f64())
}

/// Tokens produced and seconds taken by `steps` decode steps of `batch` sequences of
/// `prompt_len` tokens, after an untimed prefill. No sequence finishes inside the timed window,
/// so every timed step decodes the whole batch.
pub fn decode_tokens_and_seconds(
    engine: &mut Engine,
    batch: usize,
    prompt_len: usize,
    steps: usize,
    salt: u64,
) -> Result<(usize, f64)> {
    let (tokens, window) = decode_window(engine, batch, prompt_len, steps, salt)?;
    Ok((tokens, (window.end - window.start).as_secs_f64()))
}

/// [`decode_tokens_and_seconds`] with the timed window's bounds (for a profiler's time
/// filter) in place of its length.
pub fn decode_window(
    engine: &mut Engine,
    batch: usize,
    prompt_len: usize,
    steps: usize,
    salt: u64,
) -> Result<(usize, std::ops::Range<Instant>)> {
    let vocab = engine.info().vocab_size;
    let ids: Vec<SequenceId> = (0..batch as u64)
        .map(|b| SequenceId(salt * 1000 + b))
        .collect();
    // Room for however many steps the batch mates' prefill takes, plus the timed steps: a
    // sequence that finished early would leave the timed steps short of a batch.
    let room = engine.info().max_model_len.saturating_sub(prompt_len);
    let max_new = room.max(steps + batch + 1) as u32;
    for id in &ids {
        engine.add(request(id.0, prompt(prompt_len, vocab, id.0), max_new))?;
    }
    // Prefill (untimed) until every sequence of the batch has its first token.
    let mut started = std::collections::HashSet::new();
    while started.len() < batch {
        started.extend(engine.step()?.tokens.iter().map(|t| t.id));
    }
    let t = Instant::now();
    let mut tokens = 0;
    for _ in 0..steps {
        let n = engine.step()?.tokens.len();
        if n != batch {
            return Err(EngineError::Config(format!(
                "a timed decode step gave {n} tokens for a batch of {batch} (a sequence \
                 finished or was preempted); use fewer --decode-steps, a shorter \
                 --prompt-len or a smaller --batch"
            )));
        }
        tokens += n;
    }
    let end = Instant::now();
    for id in ids {
        engine.cancel(id);
    }
    Ok((tokens, t..end))
}

/// Memory bandwidth of copying a 256 MiB buffer with `threads` threads.
pub fn memory_bandwidth(threads: usize) -> f64 {
    let n = 64 << 20; // f32 elements
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    let threads = threads.max(1);
    let chunk = n.div_ceil(threads);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        std::thread::scope(|s| {
            for (d, sr) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
                s.spawn(move || d.copy_from_slice(sr));
            }
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    (2 * n * 4) as f64 / best
}

/// Copy bandwidth of a device's memory (read + write counted): a 1 GiB tensor copied on
/// `device`, best of 5.
pub fn device_copy_bandwidth(device: &Device) -> Result<f64> {
    let n = 256 << 20; // f32 elements
    let src = Tensor::ones(n, DType::F32, device)?;
    src.copy()?; // warm-up
    device.synchronize()?;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let dst = src.copy()?;
        device.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64());
        drop(dst);
    }
    Ok((2 * n * 4) as f64 / best)
}

/// Matmul rate in `dtype` of a 1024³ product on `device` (4096³ on GPUs, which a small
/// product cannot fill): the faster of candle's GEMM and, for f32 on CPU, the engine's own
/// packed kernel, which outruns candle's where the CPU has AVX-512.
pub fn matmul_flops(device: &Device, dtype: DType) -> Result<f64> {
    let n = if device.is_cpu() { 1024 } else { 4096 };
    let a = Tensor::ones((n, n), dtype, device)?;
    let b = Tensor::ones((n, n), dtype, device)?;
    let candle = best_of_5(|| {
        let c = a.matmul(&b)?;
        Ok(c.device().synchronize()?)
    })?;
    let mut best = candle;
    if device.is_cpu() && dtype == DType::F32 {
        let w = PackedWeight::pack(&vec![1.0; n * n], n, n);
        let x = vec![1.0f32; n * n];
        best = best.min(best_of_5(|| {
            std::hint::black_box(w.matmul(&x, n));
            Ok(())
        })?);
    }
    Ok(2.0 * (n * n * n) as f64 / best)
}

/// Seconds of the fastest of five runs of `f`, after one untimed run.
fn best_of_5(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}
