//! `y = x · Wᵀ` for Q8_0 weights with the activations quantized to 8 bits too, multiplied as
//! integers with AVX-512 VNNI (`vpdpbusd`: 64 byte products summed into 16 lanes per
//! instruction, where an f32 FMA does 16 products).
//!
//! This is llama.cpp's arithmetic for its quantized formats (activations in Q8_0 blocks of 32,
//! one f32 scale each), used here where it pays: a batch of decodes, a few rows of `x`, whose
//! products on widened weights are bound by the multiply-adds. Each task repacks a panel of 16
//! rows of `W` at a time into cache, the 16 rows' bytes interleaved four at a time
//! (`[block][group of 4][row][4]`, made unsigned by adding 128), so that one 64-byte load
//! serves 16 outputs; then every row of `x` runs over it. Per block, the integer sums are
//! corrected for the 128 (`128 · Σ x_q`), converted once and scaled by both blocks' scales.
//!
//! The only rounding beyond the weights' is the activations' (to 1/254 of each block's largest
//! magnitude); the result is not the product with the dequantized matrix to f32 precision, as
//! the other paths' is, but within what llama.cpp's users see on every product.

use rayon::prelude::*;

use crate::packed_matmul::SharedOut;

/// Values per Q8_0 block.
const QK: usize = 32;
/// Bytes per Q8_0 block: an f16 scale and 32 signed bytes.
const BLOCK_BYTES: usize = 2 + QK;
/// Rows of `W` (outputs) per panel: one 16-lane vector of sums.
const PANEL: usize = 16;
/// Rows of `x` per register tile.
const ROWS: usize = 8;
/// How many blocks ahead [`repack`] prefetches each row of a panel.
const PREFETCH_BLOCKS: usize = 8;

/// True when this CPU has the instructions (AVX-512 F, BW and VNNI).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The activations in Q8_0 blocks: values, each block's scale, and `128 · Σ` of its values
/// (the correction for the weights' unsigned bias).
pub struct QuantizedRows {
    q: Vec<i8>,
    scale: Vec<f32>,
    bias: Vec<i32>,
    k: usize,
}

impl QuantizedRows {
    /// `x` (`[m, k]`, `k` a multiple of 32) quantized block by block: scale = largest
    /// magnitude / 127, values rounded to nearest.
    pub fn new(x: &[f32], m: usize, k: usize) -> Self {
        assert!(
            k.is_multiple_of(QK) && x.len() >= m * k,
            "int8-matmul: bad activations"
        );
        let blocks = m * k / QK;
        let mut q = vec![0i8; m * k];
        let mut scale = vec![0f32; blocks];
        let mut bias = vec![0i32; blocks];
        for (((x, q), s), c) in x[..m * k]
            .chunks_exact(QK)
            .zip(q.chunks_exact_mut(QK))
            .zip(&mut scale)
            .zip(&mut bias)
        {
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in q.iter_mut().zip(x) {
                *q = (v * inv).round().clamp(-127.0, 127.0) as i8;
                sum += i32::from(*q);
            }
            *s = d;
            *c = 128 * sum;
        }
        QuantizedRows { q, scale, bias, k }
    }

    /// Value `t` of row `r`, as the activations' rounding left it.
    pub fn value(&self, r: usize, t: usize) -> f32 {
        f32::from(self.q[r * self.k + t]) * self.scale[(r * self.k + t) / QK]
    }
}

/// `x [m, k]` times the transpose of the Q8_0 matrix `w` (`n` rows of `k / 32` blocks) →
/// `[m, n]`, with `x` quantized to Q8_0 first ([`QuantizedRows`]).
///
/// # Panics
/// When [`available`] is false, or the shapes do not fit the slices.
pub fn q8_0(w: &[u8], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    assert!(available(), "int8-matmul needs AVX-512 VNNI");
    let row_bytes = k / QK * BLOCK_BYTES;
    assert!(w.len() >= n * row_bytes, "int8-matmul: short weights");
    let xq = QuantizedRows::new(x, m, k);
    let blocks = k / QK;
    // Every value is written below (each task its columns of every row), so never zeroed.
    let mut y = Vec::with_capacity(m * n);
    let out = SharedOut(y.spare_capacity_mut().as_mut_ptr() as *mut f32);
    let panels = n.div_ceil(PANEL);
    let per_task = panels.div_ceil(rayon::current_num_threads() * 4).max(1);
    (0..panels.div_ceil(per_task))
        .into_par_iter()
        .for_each_init(
            || (vec![0u8; blocks * QK * PANEL], vec![0f32; blocks * PANEL]),
            |(packed, scales), task| {
                for p in task * per_task..((task + 1) * per_task).min(panels) {
                    let col = p * PANEL;
                    let cols = PANEL.min(n - col);
                    // SAFETY: `available()` held; rows col..col+cols of `w` hold `blocks`
                    // blocks each; the buffers hold a panel.
                    unsafe {
                        repack(
                            &w[col * row_bytes..],
                            row_bytes,
                            cols,
                            blocks,
                            packed,
                            scales,
                        )
                    };
                    let mut i = 0;
                    while i < m {
                        let rows = ROWS.min(m - i);
                        // SAFETY: as above; rows i..i+rows and columns col..col+cols lie in
                        // `y` (m × n), and only this task writes these columns.
                        unsafe {
                            tile(
                                &xq,
                                i,
                                rows,
                                packed,
                                scales,
                                out.ptr().add(i * n + col),
                                n,
                                cols,
                            )
                        };
                        i += rows;
                    }
                }
            },
        );
    // SAFETY: the tasks wrote all m × n values.
    unsafe { y.set_len(m * n) };
    y
}

/// Rows `0..cols` of `w` (`row_bytes` apart, `blocks` Q8_0 blocks each) into `packed`
/// (`[block][group][row][4]`, bytes + 128) and their scales into `scales` (`[block][row]`);
/// rows past `cols` are zero-scaled.
///
/// # Safety
/// AVX-512 F and BW are present; `w` holds `cols` rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,f16c")]
unsafe fn repack(
    w: &[u8],
    row_bytes: usize,
    cols: usize,
    blocks: usize,
    packed: &mut [u8],
    scales: &mut [f32],
) {
    use std::arch::x86_64::*;
    assert!(
        cols <= PANEL
            && w.len() >= (cols - 1) * row_bytes + blocks * BLOCK_BYTES
            && packed.len() >= blocks * QK * PANEL
            && scales.len() >= blocks * PANEL
    );
    let rows = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(row_bytes as i32),
    );
    let mask: __mmask16 = if cols == PANEL {
        0xFFFF
    } else {
        (1 << cols) - 1
    };
    let flip = _mm512_set1_epi8(-128);
    for b in 0..blocks {
        let block = w.as_ptr().add(b * BLOCK_BYTES);
        // Gathers do not train the hardware prefetchers: fetch each row's stream ahead.
        let ahead = block.wrapping_add(PREFETCH_BLOCKS * BLOCK_BYTES);
        for c in 0..cols {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(c * row_bytes) as *const i8);
        }
        // The scale is the block's first two bytes (the gather reads four: still inside it).
        let d = _mm512_mask_i32gather_epi32::<1>(
            _mm512_setzero_si512(),
            mask,
            rows,
            block as *const i32,
        );
        _mm512_storeu_ps(
            scales.as_mut_ptr().add(b * PANEL),
            _mm512_cvtph_ps(_mm512_cvtepi32_epi16(d)),
        );
        for g in 0..QK / 4 {
            let q = _mm512_mask_i32gather_epi32::<1>(
                _mm512_setzero_si512(),
                mask,
                rows,
                block.add(2 + 4 * g) as *const i32,
            );
            _mm512_storeu_si512(
                packed.as_mut_ptr().add((b * QK / 4 + g) * 64) as *mut _,
                _mm512_xor_si512(q, flip),
            );
        }
    }
}

/// Rows `first..first + rows` of `x` over one repacked panel: `cols` outputs of each row.
///
/// # Safety
/// AVX-512 F, BW and VNNI are present; `y` is valid for `rows` rows of stride `ldy` and
/// `cols` columns, written by no one else.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    x: &QuantizedRows,
    first: usize,
    rows: usize,
    packed: &[u8],
    scales: &[f32],
    y: *mut f32,
    ldy: usize,
    cols: usize,
) {
    let mut out = [[0f32; PANEL]; ROWS];
    match rows {
        1 => tile_rows::<1>(x, first, packed, scales, &mut out),
        2 => tile_rows::<2>(x, first, packed, scales, &mut out),
        3 => tile_rows::<3>(x, first, packed, scales, &mut out),
        4 => tile_rows::<4>(x, first, packed, scales, &mut out),
        5 => tile_rows::<5>(x, first, packed, scales, &mut out),
        6 => tile_rows::<6>(x, first, packed, scales, &mut out),
        7 => tile_rows::<7>(x, first, packed, scales, &mut out),
        _ => tile_rows::<8>(x, first, packed, scales, &mut out),
    }
    for (r, o) in out.iter().enumerate().take(rows) {
        std::ptr::copy_nonoverlapping(o.as_ptr(), y.add(r * ldy), cols);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_rows<const R: usize>(
    x: &QuantizedRows,
    first: usize,
    packed: &[u8],
    scales: &[f32],
    out: &mut [[f32; PANEL]; ROWS],
) {
    use std::arch::x86_64::*;
    let k = x.k;
    let blocks = k / QK;
    debug_assert!(
        x.q.len() >= (first + R) * k
            && packed.len() >= blocks * QK * PANEL
            && scales.len() >= blocks * PANEL
    );
    let (qp, pp) = (x.q.as_ptr().add(first * k), packed.as_ptr());
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..blocks {
        let mut sums = [_mm512_setzero_si512(); R];
        for g in 0..QK / 4 {
            // SAFETY: group g of block b lies inside the panel, and bytes b·32 + 4g .. + 4 of
            // each row inside `x`.
            let wv = _mm512_loadu_si512(pp.add((b * QK / 4 + g) * 64) as *const _);
            for (r, s) in sums.iter_mut().enumerate() {
                let four = std::ptr::read_unaligned(qp.add(r * k + b * QK + 4 * g) as *const i32);
                *s = _mm512_dpbusd_epi32(*s, wv, _mm512_set1_epi32(four));
            }
        }
        let ws = _mm512_loadu_ps(scales.as_ptr().add(b * PANEL));
        for (r, (a, s)) in acc.iter_mut().zip(&sums).enumerate() {
            let at = (first + r) * blocks + b;
            let exact = _mm512_sub_epi32(*s, _mm512_set1_epi32(x.bias[at]));
            let scale = _mm512_mul_ps(ws, _mm512_set1_ps(x.scale[at]));
            *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), scale, *a);
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        _mm512_storeu_ps(o.as_mut_ptr(), *a);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn repack(_: &[u8], _: usize, _: usize, _: usize, _: &mut [u8], _: &mut [f32]) {
    unreachable!("int8-matmul runs only where available() is true")
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    _: &QuantizedRows,
    _: usize,
    _: usize,
    _: &[u8],
    _: &[f32],
    _: *mut f32,
    _: usize,
    _: usize,
) {
    unreachable!("int8-matmul runs only where available() is true")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// Against f64 sums of the dequantized weights and the activations as quantized (the
    /// same arithmetic: only summation order differs), and against the f32 product (what
    /// quantizing the activations costs), for odd shapes: a partial panel, row tiles of 8
    /// and a remainder.
    #[test]
    fn matches_the_product_of_the_quantized_activations() {
        if !available() {
            return;
        }
        for (m, k, n) in [
            (2, 32, 1),
            (3, 96, 37),
            (8, 64, 16),
            (11, 160, 70),
            (16, 576, 33),
        ] {
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 104729) % 89) as f32 / 89.0 - 0.3)
                .collect();
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
                .collect();
            let wt = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&wt, GgmlDType::Q8_0).unwrap();
            let dense: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let got = q8_0(&q.data().unwrap(), n, k, &x, m);
            let xq = QuantizedRows::new(&x, m, k);
            for r in 0..m {
                for c in 0..n {
                    let row = &dense[c * k..(c + 1) * k];
                    let exact: f64 = (0..k)
                        .map(|t| f64::from(xq.value(r, t)) * f64::from(row[t]))
                        .sum();
                    let f32_product: f64 = (0..k)
                        .map(|t| f64::from(x[r * k + t]) * f64::from(row[t]))
                        .sum();
                    let norm: f64 = (0..k)
                        .map(|t| f64::from(x[r * k + t]).abs() * f64::from(row[t]).abs())
                        .sum();
                    let g = f64::from(got[r * n + c]);
                    assert!(
                        (g - exact).abs() <= 1e-5 * (1.0 + norm),
                        "({m},{k},{n}) [{r},{c}]: {g} vs {exact}"
                    );
                    assert!(
                        (g - f32_product).abs() <= 0.01 * norm,
                        "({m},{k},{n}) [{r},{c}]: {g} vs the f32 product {f32_product}"
                    );
                }
            }
        }
    }

    /// `block_matmul::matmul` takes this path for Q8_0 from twelve rows up to its widening
    /// threshold, and keeps f32 activations below (a lone decode, a few).
    #[test]
    fn q8_0_batches_below_the_widening_threshold_take_this_path() {
        use crate::block_matmul::{matmul, tiled, BlockFormat};
        let (Some(format), true) = (BlockFormat::of(GgmlDType::Q8_0), available()) else {
            return;
        };
        let (n, k) = (40, 64);
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        let bytes = QTensor::quantize(&w, GgmlDType::Q8_0)
            .unwrap()
            .data()
            .unwrap()
            .to_vec();
        for m in [1, 11, 12, 16, format.widen_rows() - 1] {
            let x: Vec<f32> = (0..m * k).map(|i| (i % 17) as f32 * 0.1 - 0.8).collect();
            let want = if m < 12 {
                tiled(format, &bytes, n, k, &x, m)
            } else {
                q8_0(&bytes, n, k, &x, m)
            };
            assert_eq!(matmul(format, &bytes, n, k, &x, m), want, "{m} rows");
        }
    }

    #[test]
    fn quantized_activations_keep_each_block_to_its_largest_value() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.1).collect();
        let q = QuantizedRows::new(&x, 1, 64);
        for (t, &v) in x.iter().enumerate() {
            let d = q.scale[t / QK];
            assert!(
                (q.value(0, t) - v).abs() <= d / 2.0 + 1e-7,
                "{t}: {} vs {v}",
                q.value(0, t)
            );
        }
        let zeros = QuantizedRows::new(&[0.0; 32], 1, 32);
        assert_eq!((zeros.value(0, 5), zeros.bias[0]), (0.0, 0));
    }
}
