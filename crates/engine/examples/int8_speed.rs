//! Q8_0 products of a few rows three ways: f32 activations on blocks widened in registers
//! (`tiled`), on panels widened into cache (`widened`), and int8 activations on VNNI
//! (`int8_matmul`), on the matrices of one SmolLM2-135M layer. Prints the time of each and
//! int8's speed-up over the faster of the other two.
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo run --release -p openinfer-engine --example int8_speed
//! ```
//!
//! Needs AVX-512 VNNI.

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use openinfer_engine::block_matmul::{tiled, widened, BlockFormat};

/// Best time of five runs of twenty calls, µs per call.
fn time(f: &dyn Fn() -> Vec<f32>) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..20 {
            std::hint::black_box(f());
        }
        best = best.min(t.elapsed().as_secs_f64() / 20.0);
    }
    best * 1e6
}

fn main() -> candle_core::Result<()> {
    let (Some(format), true) = (
        BlockFormat::of(GgmlDType::Q8_0),
        openinfer_engine::int8_matmul::available(),
    ) else {
        eprintln!("this CPU has no AVX-512 VNNI");
        return Ok(());
    };
    println!("matrix     rows  tiled µs  widened µs  int8 µs  int8 speed-up");
    // q/k/v, o, gate+up, down.
    for (n, k) in [(960, 576), (576, 576), (3072, 576), (576, 1536)] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        let bytes = QTensor::quantize(&w, GgmlDType::Q8_0)?.data()?.to_vec();
        for m in [2, 4, 8, 16, 24] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
                .collect();
            let a = time(&|| tiled(format, &bytes, n, k, &x, m));
            let b = time(&|| widened(format, &bytes, n, k, &x, m));
            let c = time(&|| openinfer_engine::int8_matmul::q8_0(&bytes, n, k, &x, m));
            println!(
                "{:<10} {m:>4}  {a:>8.0}  {b:>10.0}  {c:>7.0}  {:>12.2}x",
                format!("{n}x{k}"),
                a.min(b) / c
            );
        }
    }
    Ok(())
}
