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
use openinfer_engine::{
    bench, engine::Engine, engine::EngineConfig, DType, Device, StepTimeBudget,
};

fn main() -> openinfer_engine::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (batch, steps) = (num(2, 16), num(3, 200));
    let kv = match args.get(4).map(String::as_str) {
        Some("f32") => DType::F32,
        _ => DType::F16,
    };
    let cfg = EngineConfig {
        device: Device::Cpu,
        kv_cache_dtype: Some(kv),
        max_batch_tokens: 128.max(batch),
        max_running: batch,
        step_time_budget: StepTimeBudget::Off,
        kv_cache_bytes: 1 << 30,
        ..Default::default()
    };
    let model = args
        .get(1)
        .expect("usage: batch_decode MODEL [BATCH STEPS KV REPEATS]");
    let mut engine = Engine::load(std::path::Path::new(model), cfg, &|_, _| {})?;
    for r in 0..num(5, 3) as u64 {
        let (tokens, window) = bench::decode_window(&mut engine, batch, 128, steps, r)?;
        eprintln!("start {:?}", window.start);
        eprintln!("end {:?}", window.end);
        let secs = (window.end - window.start).as_secs_f64();
        println!(
            "{:.1} tok/s, {:.1} ms a step",
            tokens as f64 / secs,
            secs / steps as f64 * 1e3
        );
    }
    Ok(())
}
