//! Batched decode steps alone (for a profiler): `batch` sequences of 128 prompt tokens
//! prefilled, then `steps` timed decode steps; prints the timed window's CLOCK_MONOTONIC
//! bounds (for `perf record -k CLOCK_MONOTONIC` and `perf report --time`).
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo run --release -p openinfer-engine --example batch_decode \
//!     MODEL [BATCH STEPS KV REPEATS]
//! ```
//!
//! Defaults: a batch of 16, 200 steps, an f16 KV cache (`f32` for f32), 3 repeats.
use openinfer_core::SequenceId;
use openinfer_engine::{
    bench, engine::Engine, engine::EngineConfig, engine::SequenceRequest, Device, StepTimeBudget,
};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (batch, steps) = (num(2, 16), num(3, 200));
    let kv = match args.get(4).map(String::as_str) {
        Some("f32") => Some(openinfer_engine::DType::F32),
        _ => Some(openinfer_engine::DType::F16),
    };
    let cfg = EngineConfig {
        device: Device::Cpu,
        kv_cache_dtype: kv,
        max_batch_tokens: 128.max(batch),
        max_running: batch,
        step_time_budget: StepTimeBudget::Off,
        kv_cache_bytes: 1 << 30,
        ..Default::default()
    };
    let mut engine = Engine::load(std::path::Path::new(&args[1]), cfg, &|_, _| {}).unwrap();
    let vocab = engine.info().vocab_size;
    for r in 0..num(5, 3) as u64 {
        let ids: Vec<u64> = (0..batch as u64).map(|b| r * 1000 + b).collect();
        for &id in &ids {
            let mut q =
                SequenceRequest::greedy(SequenceId(id), bench::prompt(128, vocab, id), 4000);
            q.stopping.ignore_eos = true;
            engine.add(q).unwrap();
        }
        let mut started = std::collections::HashSet::new();
        while started.len() < batch {
            started.extend(engine.step().unwrap().tokens.iter().map(|t| t.id));
        }
        let t = Instant::now();
        eprintln!("start {t:?}");
        for _ in 0..steps {
            engine.step().unwrap();
        }
        let s = t.elapsed().as_secs_f64();
        eprintln!("end {:?}", Instant::now());
        println!(
            "{:.1} tok/s, {:.1} ms a step",
            (batch * steps) as f64 / s,
            s / steps as f64 * 1e3
        );
        for id in ids {
            engine.cancel(SequenceId(id));
        }
    }
}
