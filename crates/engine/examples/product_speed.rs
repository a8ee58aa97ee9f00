//! Packed f32 products of a few rows, with the matrix in cache (the same one again and again)
//! and streamed from memory (a different copy each time, ~600 MB of them): how far a batched
//! decode's products are from overlapping their weight reads with their arithmetic.
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo run --release -p openinfer-engine --example product_speed [N K ROWS]
//! ```
//!
//! Defaults: SmolLM2-135M's fused gate/up (3072 × 576) at 16 rows.

use std::time::Instant;

use openinfer_engine::packed_matmul::PackedWeight;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (n, k, m) = (num(1, 3072), num(2, 576), num(3, 16));
    let copies = (600 << 20) / (n * k * 4) + 1;
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919) % 1000) as f32 * 1e-3)
        .collect();
    let ws: Vec<PackedWeight> = (0..copies).map(|_| PackedWeight::pack(&w, n, k)).collect();
    let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
    let flops = 2.0 * (n * k * m) as f64;
    let bytes = (n * k * 4) as f64;
    println!("{n}×{k}, {m} rows: in cache | streamed");
    for _ in 0..3 {
        let reps = 50;
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(ws[0].matmul(&x, m));
        }
        let hot = t.elapsed().as_secs_f64() / reps as f64;
        let t = Instant::now();
        for w in &ws {
            std::hint::black_box(w.matmul(&x, m));
        }
        let cold = t.elapsed().as_secs_f64() / copies as f64;
        println!(
            "{:.0} µs ({:.0} GFLOP/s) | {:.0} µs ({:.0} GFLOP/s, {:.1} GB/s of weights)",
            hot * 1e6,
            flops / hot / 1e9,
            cold * 1e6,
            flops / cold / 1e9,
            bytes / cold / 1e9
        );
    }
}
