//! Paged decode attention on CPU: one query token per sequence, keys and values read straight
//! from the cache slots (no gather, no padding), each KV head serving its query heads (GQA),
//! in parallel over (sequence, KV head).
//!
//! The tensor path in `model.rs` does the same with general ops and is used for prefill chunks
//! and on GPUs; on CPU its many small ops cost far more than the arithmetic.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape};
use rayon::prelude::*;

/// The op: inputs are `q [batch, heads * head_dim]`, and the layer's K and V caches
/// `[slots, kv_heads * head_dim]`; the output is `[batch, heads * head_dim]`.
pub struct DecodeAttention<'a> {
    /// Query heads.
    pub num_heads: usize,
    /// KV heads.
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Slots of every sequence's context, `max_ctx` per sequence (padding beyond its length).
    pub ctx_slots: &'a [u32],
    /// Context length of each sequence (cached + the new token).
    pub ctx_lens: &'a [u32],
    /// Stride of `ctx_slots` per sequence.
    pub max_ctx: usize,
    /// Sliding window: only the last `window` positions are attended.
    pub window: Option<usize>,
}

impl CustomOp3 for DecodeAttention<'_> {
    fn name(&self) -> &'static str {
        "paged-decode-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (s1, s2, s3) else {
            candle_core::bail!("paged-decode-attention: f32 only")
        };
        let (Some((qs, qe)), Some((ks, ke)), Some((vs, ve))) = (
            l1.contiguous_offsets(),
            l2.contiguous_offsets(),
            l3.contiguous_offsets(),
        ) else {
            candle_core::bail!("paged-decode-attention: contiguous inputs only")
        };
        let (q, k, v) = (&q[qs..qe], &k[ks..ke], &v[vs..ve]);
        let (batch, width) = l1.shape().dims2()?;
        let (hd, nh, nkv) = (self.head_dim, self.num_heads, self.num_kv_heads);
        let row = nkv * hd;
        if width != nh * hd || l2.shape().dims2()?.1 != row || self.ctx_lens.len() != batch {
            candle_core::bail!("paged-decode-attention: inconsistent shapes")
        }
        let rep = nh / nkv;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = vec![0f32; batch * nh * hd];
        // One task per (sequence, KV head): its `rep` query heads are contiguous in `out`.
        out.par_chunks_mut(rep * hd)
            .enumerate()
            .for_each(|(task, o)| {
                let (b, g) = (task / nkv, task % nkv);
                let len = self.ctx_lens[b] as usize;
                let start = self.window.map_or(0, |w| len.saturating_sub(w));
                let slots = &self.ctx_slots[b * self.max_ctx + start..b * self.max_ctx + len];
                let mut scores = vec![0f32; slots.len()];
                for r in 0..rep {
                    let h = g * rep + r;
                    let qh = &q[(b * nh + h) * hd..][..hd];
                    let mut max = f32::NEG_INFINITY;
                    for (s, &slot) in scores.iter_mut().zip(slots) {
                        let kh = &k[slot as usize * row + g * hd..][..hd];
                        *s = qh.iter().zip(kh).map(|(a, b)| a * b).sum::<f32>() * scale;
                        max = max.max(*s);
                    }
                    let mut sum = 0f32;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    let oh = &mut o[r * hd..(r + 1) * hd];
                    oh.fill(0.0);
                    for (&p, &slot) in scores.iter().zip(slots) {
                        let vh = &v[slot as usize * row + g * hd..][..hd];
                        let p = p / sum;
                        for (acc, x) in oh.iter_mut().zip(vh) {
                            *acc += p * x;
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((batch, nh * hd))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Naive attention of one query over explicit key/value rows.
    fn naive(q: &[f32], ks: &[&[f32]], vs: &[&[f32]]) -> Vec<f32> {
        let scale = 1.0 / (q.len() as f32).sqrt();
        let s: Vec<f32> = ks
            .iter()
            .map(|k| q.iter().zip(*k).map(|(a, b)| a * b).sum::<f32>() * scale)
            .collect();
        let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f32 = e.iter().sum();
        (0..q.len())
            .map(|d| e.iter().zip(vs).map(|(p, v)| p / z * v[d]).sum())
            .collect()
    }

    #[test]
    fn matches_naive_attention_with_gqa_padding_and_window() {
        let (nh, nkv, hd, slots) = (4, 2, 8, 40);
        let val = |i: usize| ((i * 2654435761) % 1000) as f32 / 500.0 - 1.0;
        let k: Vec<f32> = (0..slots * nkv * hd).map(val).collect();
        let v: Vec<f32> = (0..slots * nkv * hd).map(|i| val(i + 7)).collect();
        let q: Vec<f32> = (0..2 * nh * hd).map(|i| val(i + 13)).collect();
        // Two sequences: 5 and 9 positions, scattered slots, padded to 9.
        let ctx_slots: Vec<u32> = vec![3, 17, 4, 30, 11, 0, 0, 0, 0, 1, 2, 5, 6, 7, 20, 21, 22, 39];
        let ctx_lens = vec![5u32, 9];
        for window in [None, Some(3)] {
            let op = DecodeAttention {
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
                ctx_slots: &ctx_slots,
                ctx_lens: &ctx_lens,
                max_ctx: 9,
                window,
            };
            let d = Device::Cpu;
            let out = Tensor::from_slice(&q, (2, nh * hd), &d)
                .unwrap()
                .apply_op3_no_bwd(
                    &Tensor::from_slice(&k, (slots, nkv * hd), &d).unwrap(),
                    &Tensor::from_slice(&v, (slots, nkv * hd), &d).unwrap(),
                    &op,
                )
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for b in 0..2 {
                let len = ctx_lens[b] as usize;
                let start = window.map_or(0, |w| len.saturating_sub(w));
                let used = &ctx_slots[b * 9 + start..b * 9 + len];
                for h in 0..nh {
                    let g = h / (nh / nkv);
                    let row =
                        |t: &[f32], s: u32| t[s as usize * nkv * hd + g * hd..][..hd].to_vec();
                    let ks: Vec<Vec<f32>> = used.iter().map(|&s| row(&k, s)).collect();
                    let vs: Vec<Vec<f32>> = used.iter().map(|&s| row(&v, s)).collect();
                    let want = naive(
                        &q[(b * nh + h) * hd..][..hd],
                        &ks.iter().map(Vec::as_slice).collect::<Vec<_>>(),
                        &vs.iter().map(Vec::as_slice).collect::<Vec<_>>(),
                    );
                    for (a, w) in out[b][h * hd..(h + 1) * hd].iter().zip(&want) {
                        assert!((a - w).abs() < 1e-5, "window {window:?} seq {b} head {h}");
                    }
                }
            }
        }
    }
}
