//! Products of a few rows in every block format three ways: f32 activations on blocks widened
//! in registers (`tiled`), on panels widened into cache (`widened`), and int8 activations on
//! VNNI (`int8_matmul`), on the matrices of one layer (hidden 768: the K-quants need rows of
//! whole 256-wide super-blocks). Prints the time of each, summed over the layer's matrices,
//! and int8's speed-up over the faster of the other two (`int8_matmul::FROM_ROWS` is where
//! the engine switches, measured end to end, since a lone decode is bound by memory).
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo run --release -p openinfer-engine --example int8_speed [FORMAT]
//! ```
//!
//! `FORMAT` (`q4_0`, `q5_0`, `q8_0`, `q4k`, `q6k`, ...) picks one; all by default. Needs
//! AVX-512 VNNI.

use std::time::Instant;

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use openinfer_engine::block_matmul::{tiled, widened, BlockFormat};
use openinfer_engine::int8_matmul;

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
    if !int8_matmul::available() {
        eprintln!("this CPU has no AVX-512 VNNI");
        return Ok(());
    }
    let only = std::env::args().nth(1).map(|f| f.to_lowercase());
    println!("format  rows  tiled µs  widened µs  int8 µs  int8 speed-up");
    for dtype in BlockFormat::DTYPES {
        let name = format!("{dtype:?}").to_lowercase();
        if only.as_ref().is_some_and(|o| *o != name) {
            continue;
        }
        let Some(format) = BlockFormat::of(dtype) else {
            continue;
        };
        // q/k/v, o, gate+up, down of a 768-wide layer.
        let mut layer = Vec::new();
        for (n, k) in [(1280, 768), (768, 768), (4096, 768), (768, 2048)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
            layer.push((n, k, QTensor::quantize(&w, dtype)?.data()?.to_vec()));
        }
        for m in [1, 2, 4, 8, 12, 16, 32, 64, 128] {
            let (mut a, mut b, mut c) = (0.0, 0.0, 0.0);
            for (n, k, bytes) in &layer {
                let (n, k) = (*n, *k);
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
                    .collect();
                a += time(&|| tiled(format, bytes, n, k, &x, m));
                b += time(&|| widened(format, bytes, n, k, &x, m));
                c += time(&|| int8_matmul::matmul(format, bytes, n, k, &x, m));
            }
            println!(
                "{name:<6}  {m:>4}  {a:>8.0}  {b:>10.0}  {c:>7.0}  {:>12.2}x",
                a.min(b) / c
            );
        }
    }
    Ok(())
}
