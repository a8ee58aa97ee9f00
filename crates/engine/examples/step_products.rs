//! The packed products of one batched decode step of SmolLM2-135M's shapes (30 layers of
//! qkv, o, gate/up and down, then lm_head), every matrix its own: how long a step's products
//! take alone, against the whole step `bench-engine` measures.
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo run --release -p openinfer-engine --example step_products [ROWS]
//! ```
use std::time::Instant;

use openinfer_engine::packed_matmul::PackedWeight;

fn main() {
    let m: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    let shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)];
    let mut ws = Vec::new();
    for _ in 0..30 {
        for &(n, k) in &shapes {
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7919) % 1000) as f32 * 1e-3)
                .collect();
            ws.push(PackedWeight::pack(&w, n, k));
        }
    }
    let w: Vec<f32> = (0..49152 * 576)
        .map(|i| ((i * 7919) % 1000) as f32 * 1e-3)
        .collect();
    ws.push(PackedWeight::pack(&w, 49152, 576));
    let bytes: usize = ws.iter().map(|w| w.n() * w.k() * 4).sum();
    let x: Vec<f32> = (0..m * 1536).map(|i| (i % 13) as f32 * 0.1).collect();
    for _ in 0..5 {
        let reps = 10;
        let t = Instant::now();
        for _ in 0..reps {
            for w in &ws {
                std::hint::black_box(w.matmul(&x[..m * w.k()], m));
            }
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "{m} rows: {:.1} ms a step, {:.1} GB/s, {:.0} tok/s if products were all",
            s * 1e3,
            bytes as f64 / s / 1e9,
            m as f64 / s
        );
    }
}
