//! `y = x · Wᵀ` for a few rows of `x` on CPU (decode steps).
//!
//! A general GEMM packs the whole weight matrix on every call, which for decode (one to a few
//! dozen rows) roughly triples the memory traffic of a step that is bound by reading the
//! weights. This kernel streams each weight row once and computes all of `x`'s dot products
//! with it while it is in L1, in parallel over weight rows. AVX2 + FMA are used when the CPU
//! has them (checked at run time), plain loops otherwise.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape};
use rayon::prelude::*;

/// Rows of `x` up to which [`SkinnyMatmul`] beats the general GEMM on CPU (measured with
/// `examples/mm_probe.rs`).
pub const MAX_ROWS: usize = 16;

/// The custom op: `x` is `[m, k]`, `w` is `[n, k]` (both contiguous f32), result `[m, n]`.
pub struct SkinnyMatmul;

impl CustomOp2 for SkinnyMatmul {
    fn name(&self) -> &'static str {
        "skinny-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (s1, s2) else {
            candle_core::bail!("skinny-matmul: f32 only")
        };
        let (Some((xs, xe)), Some((ws, we))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("skinny-matmul: contiguous inputs only")
        };
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("skinny-matmul: inner dimensions {k} and {k2} differ")
        }
        let y = matmul_t(&x[xs..xe], &w[ws..we], m, k, n);
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}

/// `x [m, k] · w [n, k]ᵀ` → `[m, n]` row-major.
pub fn matmul_t(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    // Each task owns a band of weight rows (a multiple of 4) and writes its outputs transposed
    // (`[n, m]`); bands are wide enough to amortise scheduling and narrow enough to balance.
    let band = (n / (rayon::current_num_threads() * 8)).clamp(16, 512) / 4 * 4;
    let mut yt = vec![0f32; n * m];
    yt.par_chunks_mut(band * m)
        .zip(w.par_chunks(band * k))
        .for_each(|(out, rows)| band_kernel(x, rows, out, m, k));
    let mut y = vec![0f32; m * n];
    for (j, col) in yt.chunks(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            y[i * n + j] = v;
        }
    }
    y
}

/// Outputs (transposed, `[rows, m]`) of one band of weight rows. Four weight rows at a time
/// stay in L1 while every row of `x` passes by, two at a time.
fn band_kernel(x: &[f32], rows: &[f32], out: &mut [f32], m: usize, k: usize) {
    let n = rows.len() / k;
    let mut r = 0;
    while r + 4 <= n {
        let w: [&[f32]; 4] = std::array::from_fn(|j| &rows[(r + j) * k..(r + j + 1) * k]);
        let mut i = 0;
        while i < m {
            let pair = if i + 1 < m { 2 } else { 1 };
            let x0 = &x[i * k..(i + 1) * k];
            let x1 = &x[(i + pair - 1) * k..(i + pair) * k];
            let d = dot_2x4(x0, x1, w);
            for j in 0..4 {
                out[(r + j) * m + i] = d[0][j];
                if pair == 2 {
                    out[(r + j) * m + i + 1] = d[1][j];
                }
            }
            i += pair;
        }
        r += 4;
    }
    for r in r..n {
        let row = &rows[r * k..(r + 1) * k];
        for i in 0..m {
            out[r * m + i] = dot_portable(row, &x[i * k..(i + 1) * k]);
        }
    }
}

/// Dot products of two `x` rows with four weight rows.
#[inline]
fn dot_2x4(x0: &[f32], x1: &[f32], w: [&[f32]; 4]) -> [[f32; 4]; 2] {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were just checked.
            return unsafe { dot_2x4_avx2(x0, x1, w) };
        }
    }
    [
        std::array::from_fn(|j| dot_portable(x0, w[j])),
        std::array::from_fn(|j| dot_portable(x1, w[j])),
    ]
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for j in 0..8 {
            acc[j] += a[c * 8 + j] * b[c * 8 + j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_2x4_avx2(x0: &[f32], x1: &[f32], w: [&[f32]; 4]) -> [[f32; 4]; 2] {
    use std::arch::x86_64::*;
    let k = x0.len();
    debug_assert!(x1.len() == k && w.iter().all(|r| r.len() == k));
    let mut acc0 = [_mm256_setzero_ps(); 4];
    let mut acc1 = [_mm256_setzero_ps(); 4];
    let mut t = 0;
    // SAFETY: every load reads 8 floats starting at most at `k - 8`, inside each slice of
    // length `k`.
    unsafe {
        while t + 8 <= k {
            let a = _mm256_loadu_ps(x0.as_ptr().add(t));
            let b = _mm256_loadu_ps(x1.as_ptr().add(t));
            for j in 0..4 {
                let v = _mm256_loadu_ps(w[j].as_ptr().add(t));
                acc0[j] = _mm256_fmadd_ps(a, v, acc0[j]);
                acc1[j] = _mm256_fmadd_ps(b, v, acc1[j]);
            }
            t += 8;
        }
    }
    let mut out = [[0f32; 4]; 2];
    for j in 0..4 {
        let mut l0 = [0f32; 8];
        let mut l1 = [0f32; 8];
        // SAFETY: storing 8 lanes into 8-element arrays.
        unsafe {
            _mm256_storeu_ps(l0.as_mut_ptr(), acc0[j]);
            _mm256_storeu_ps(l1.as_mut_ptr(), acc1[j]);
        }
        out[0][j] = l0.iter().sum::<f32>() + (t..k).map(|i| x0[i] * w[j][i]).sum::<f32>();
        out[1][j] = l1.iter().sum::<f32>() + (t..k).map(|i| x1[i] * w[j][i]).sum::<f32>();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_naive_product_for_odd_shapes() {
        for (m, k, n) in [
            (1, 7, 3),
            (3, 64, 100),
            (16, 768, 517),
            (5, 33, 1),
            (2, 8, 4),
            (7, 100, 9),
        ] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 104729) % 89) as f32 / 89.0 - 0.5)
                .collect();
            let y = matmul_t(&x, &w, m, k, n);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                        .sum();
                    assert!(
                        (y[i * n + j] as f64 - want).abs() < 1e-4,
                        "({m},{k},{n}) at ({i},{j})"
                    );
                }
            }
        }
    }
}
