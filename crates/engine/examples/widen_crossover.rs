//! Where widening a quantized matrix once per product starts to beat widening each block once
//! per tile of rows (`BlockFormat::widen_rows`): times both for every format at 1 to 32 rows
//! of input, on the matrices of one transformer layer, and prints the ratio.
//!
//! ```sh
//! cargo run --release -p openinfer-engine --example widen_crossover [HIDDEN]   # default 768
//! ```
//!
//! `HIDDEN` must be a multiple of 256 (the K-quants' super-block). Needs AVX-512.

use std::time::Instant;

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use openinfer_engine::block_matmul::{tiled, widened, BlockFormat};

fn main() -> candle_core::Result<()> {
    let hidden: usize = match std::env::args().nth(1) {
        Some(h) => h.parse().map_err(candle_core::Error::wrap)?,
        None => 768,
    };
    // q/k/v (grouped, a third of the heads for k and v), o, gate+up, down.
    let inter = hidden * 8 / 3 / 256 * 256;
    let shapes = [
        (hidden + 2 * hidden / 3 / 64 * 64, hidden),
        (hidden, hidden),
        (2 * inter, hidden),
        (hidden, inter),
    ];
    let widest = shapes.iter().map(|s| s.1).max().unwrap_or(hidden);
    println!("format  rows  tiled µs  widened µs  widened / tiled");
    for dtype in BlockFormat::DTYPES {
        let Some(format) = BlockFormat::of(dtype) else {
            println!("no AVX-512 on this CPU: the block kernels do not run here");
            return Ok(());
        };
        let mut layer = Vec::new();
        for &(n, k) in &shapes {
            let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
            layer.push((n, k, QTensor::quantize(&w, dtype)?.data()?.to_vec()));
        }
        for m in [1usize, 4, 8, 12, 16, 20, 24, 32, 64] {
            let x: Vec<f32> = (0..m * widest)
                .map(|i| (i % 97) as f32 / 97.0 - 0.5)
                .collect();
            let reps = 400 / m + 5;
            let (mut a, mut b) = (0.0, 0.0);
            for _ in 0..reps {
                for (n, k, w) in &layer {
                    let t = Instant::now();
                    std::hint::black_box(tiled(format, w, *n, *k, &x, m));
                    a += t.elapsed().as_secs_f64();
                    let t = Instant::now();
                    std::hint::black_box(widened(format, w, *n, *k, &x, m));
                    b += t.elapsed().as_secs_f64();
                }
            }
            let per = 1e6 / reps as f64;
            println!(
                "{:6}  {m:4}  {:8.0}  {:10.0}  {:15.2}{}",
                format!("{dtype:?}"),
                a * per,
                b * per,
                b / a,
                if m == format.widen_rows() {
                    "   <- widen_rows"
                } else {
                    ""
                }
            );
        }
    }
    Ok(())
}
