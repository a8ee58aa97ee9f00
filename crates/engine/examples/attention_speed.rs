//! How fast the CPU paged-attention kernel runs on the shapes serving meets: decodes of a
//! batch deep in their contexts, a prefill chunk after a long cached prefix, and a whole
//! prompt. Prints the median time of each and the arithmetic rate it reaches.
//!
//! ```sh
//! cargo run --release -p openinfer-engine --example attention_speed [HEADS KV_HEADS HEAD_DIM]
//! ```
//!
//! The default heads are SmolLM2-135M's (9 query heads over 3 KV heads of 64).

use std::time::Instant;

use candle_core::{Device, Tensor};
use openinfer_engine::cpu_attention::PagedAttention;

fn main() -> candle_core::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().map_err(candle_core::Error::wrap))
        .collect::<candle_core::Result<_>>()?;
    let (nh, nkv, hd) = match args[..] {
        [h, k, d] => (h, k, d),
        _ => (9, 3, 64),
    };
    // (name, [(context, new tokens)] of each sequence).
    let cases: [(&str, Vec<(usize, usize)>); 6] = [
        ("16 decodes at 160", vec![(160, 1); 16]),
        ("8 decodes at 512", vec![(512, 1); 8]),
        ("8 decodes at 2048", vec![(2048, 1); 8]),
        ("1 decode at 3000", vec![(3000, 1)]),
        (
            "decode + 10-token chunk at 3000",
            vec![(3000, 1), (3000, 10)],
        ),
        ("512-token prompt", vec![(512, 512)]),
    ];
    println!("{nh} heads over {nkv} KV heads of {hd}");
    println!("{:<34} {:>10} {:>10}", "case", "µs", "GFLOP/s");
    let d = Device::Cpu;
    for (name, seqs) in cases {
        let max_ctx = seqs.iter().map(|s| s.0).max().unwrap_or(1);
        let slots = seqs.len() * max_ctx;
        let val = |i: usize| ((i * 2654435761) % 1000) as f32 / 500.0 - 1.0;
        let kv_row = nkv * hd;
        let k = Tensor::from_vec((0..slots * kv_row).map(val).collect(), (slots, kv_row), &d)?;
        let v = Tensor::from_vec(
            (0..slots * kv_row).map(|i| val(i + 7)).collect(),
            (slots, kv_row),
            &d,
        )?;
        let rows: usize = seqs.iter().map(|s| s.1).sum();
        let q = Tensor::from_vec(
            (0..rows * nh * hd).map(|i| val(i + 13)).collect(),
            (rows, nh * hd),
            &d,
        )?;
        // Blocks of 16 slots, scattered, as the paged cache hands them out.
        let blocks = slots / 16;
        let ctx_slots: Vec<u32> = (0..slots)
            .map(|s| ((s / 16 * 7919 % blocks.max(1)) * 16 + s % 16) as u32)
            .collect();
        let ctx_lens: Vec<u32> = seqs.iter().map(|s| s.0 as u32).collect();
        let q_lens: Vec<u32> = seqs.iter().map(|s| s.1 as u32).collect();
        let op = PagedAttention {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            ctx_slots: &ctx_slots,
            ctx_lens: &ctx_lens,
            q_lens: &q_lens,
            max_ctx,
            window: None,
        };
        // Two products (scores, weighted sum) of a multiply and an add per key a query sees.
        let flops: f64 = seqs
            .iter()
            .map(|&(ctx, new)| {
                let seen: usize = (ctx - new + 1..=ctx).sum();
                (seen * nh * hd * 4) as f64
            })
            .sum();
        let mut times = Vec::new();
        for _ in 0..15 {
            let t = Instant::now();
            q.apply_op3_no_bwd(&k, &v, &op)?;
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "{name:<34} {:>10.0} {:>10.1}",
            median * 1e6,
            flops / median / 1e9
        );
    }
    Ok(())
}
