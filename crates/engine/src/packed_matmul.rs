//! `y = x · Wᵀ` on CPU with weights packed once at load time.
//!
//! A general GEMM packs the weight matrix on every call: for decode (a few rows of `x`) that
//! triples the memory traffic of a step bound by reading the weights, and for prefill it is a
//! sizeable share of the time. Here `W` (`[n, k]`, the HF layout) is packed once into panels of
//! [`NR`] output columns (`[panel][k][NR]`), so every call streams the weights sequentially
//! and a 6×16 register tile (12 FMAs per 8 loads with AVX2 + FMA, checked at run time) does the
//! arithmetic. Panels are shared out among threads; each writes its own output columns.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use rayon::prelude::*;

/// Output columns per panel (two AVX vectors).
pub const NR: usize = 16;
/// Rows of `x` per register tile.
pub const MR: usize = 6;

/// A weight matrix `[n, k]` packed into `[n / NR][k][NR]` panels (the last one zero-padded).
pub struct PackedWeight {
    data: Vec<f32>,
    n: usize,
    k: usize,
}

impl PackedWeight {
    /// Packs `w`, row-major `[n, k]`.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(
            w.len(),
            n * k,
            "packed-matmul: weight has {} values, not {n}×{k}",
            w.len()
        );
        let panels = n.div_ceil(NR);
        let mut data = vec![0f32; panels * k * NR];
        data.par_chunks_mut(k * NR)
            .enumerate()
            .for_each(|(p, panel)| {
                for j in 0..NR.min(n - p * NR) {
                    let row = &w[(p * NR + j) * k..][..k];
                    for (t, &v) in row.iter().enumerate() {
                        panel[t * NR + j] = v;
                    }
                }
            });
        PackedWeight { data, n, k }
    }

    /// Output width.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input width.
    pub fn k(&self) -> usize {
        self.k
    }

    /// `x [m, k] · Wᵀ` → `[m, n]` row-major.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        assert!(
            x.len() >= m * k,
            "packed-matmul: x has {} values, not {m}×{k}",
            x.len()
        );
        let mut y = vec![0f32; m * n];
        let out = SharedOut(y.as_mut_ptr());
        let panels = n.div_ceil(NR);
        // Enough tasks to balance two to a few dozen threads, few enough to amortise them.
        let per_task = panels.div_ceil(rayon::current_num_threads() * 4).max(1);
        self.data
            .par_chunks(per_task * k * NR)
            .enumerate()
            .for_each(|(task, panels_of_task)| {
                for (q, panel) in panels_of_task.chunks(k * NR).enumerate() {
                    let col = (task * per_task + q) * NR;
                    let cols = NR.min(n - col);
                    let mut i = 0;
                    while i < m {
                        let rows = MR.min(m - i);
                        // SAFETY: rows i..i+rows and columns col..col+cols lie inside `x` and
                        // `y`, and only this task writes these columns.
                        unsafe {
                            tile(
                                &x[i * k..(i + rows) * k],
                                k,
                                panel,
                                out.ptr().add(i * n + col),
                                n,
                                rows,
                                cols,
                            )
                        };
                        i += rows;
                    }
                }
            });
        y
    }
}

/// A raw pointer that tasks writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: every task writes a disjoint set of columns.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// One `rows × NR` tile of `y` (only `cols` columns are stored).
///
/// # Safety
/// `y` must be valid for `rows` rows of stride `ldy` and `cols` columns, written by no one else.
unsafe fn tile(
    x: &[f32],
    k: usize,
    panel: &[f32],
    y: *mut f32,
    ldy: usize,
    rows: usize,
    cols: usize,
) {
    let mut acc = [[0f32; NR]; MR];
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            match rows {
                1 => tile_avx2::<1>(x, k, panel, &mut acc),
                2 => tile_avx2::<2>(x, k, panel, &mut acc),
                3 => tile_avx2::<3>(x, k, panel, &mut acc),
                4 => tile_avx2::<4>(x, k, panel, &mut acc),
                5 => tile_avx2::<5>(x, k, panel, &mut acc),
                _ => tile_avx2::<6>(x, k, panel, &mut acc),
            }
            store(&acc, y, ldy, rows, cols);
            return;
        }
    }
    for (r, acc) in acc.iter_mut().enumerate().take(rows) {
        for t in 0..k {
            let a = x[r * k + t];
            for (j, v) in acc.iter_mut().enumerate() {
                *v += a * panel[t * NR + j];
            }
        }
    }
    store(&acc, y, ldy, rows, cols);
}

/// # Safety
/// As [`tile`].
unsafe fn store(acc: &[[f32; NR]; MR], y: *mut f32, ldy: usize, rows: usize, cols: usize) {
    for (r, acc) in acc.iter().enumerate().take(rows) {
        std::ptr::copy_nonoverlapping(acc.as_ptr(), y.add(r * ldy), cols);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const R: usize>(x: &[f32], k: usize, panel: &[f32], out: &mut [[f32; NR]; MR]) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() >= R * k && panel.len() >= k * NR);
    let (xp, wp) = (x.as_ptr(), panel.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for t in 0..k {
        // SAFETY: t < k, so both panel loads and every x read stay inside the slices.
        let (w0, w1) = (
            _mm256_loadu_ps(wp.add(t * NR)),
            _mm256_loadu_ps(wp.add(t * NR + 8)),
        );
        for (r, acc) in acc.iter_mut().enumerate() {
            let a = _mm256_set1_ps(*xp.add(r * k + t));
            acc[0] = _mm256_fmadd_ps(a, w0, acc[0]);
            acc[1] = _mm256_fmadd_ps(a, w1, acc[1]);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        _mm256_storeu_ps(out[r].as_mut_ptr(), acc[0]);
        _mm256_storeu_ps(out[r].as_mut_ptr().add(8), acc[1]);
    }
}

/// The custom op: `x` `[m, k]` contiguous f32 → `[m, n]`.
pub struct PackedMatmul<'a>(pub &'a PackedWeight);

impl CustomOp1 for PackedMatmul<'_> {
    fn name(&self) -> &'static str {
        "packed-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s else {
            candle_core::bail!("packed-matmul: f32 only")
        };
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("packed-matmul: contiguous input only")
        };
        let (m, k) = l.shape().dims2()?;
        if k != self.0.k {
            candle_core::bail!(
                "packed-matmul: input width {k}, weight expects {}",
                self.0.k
            )
        }
        let y = self.0.matmul(&x[start..end], m);
        Ok((CpuStorage::F32(y), Shape::from((m, self.0.n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_naive_product_for_awkward_shapes() {
        for (m, k, n) in [
            (1, 7, 3),
            (3, 64, 100),
            (16, 768, 517),
            (5, 33, 1),
            (7, 100, 16),
            (13, 64, 33),
            (128, 40, 70),
        ] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 104729) % 89) as f32 / 89.0 - 0.5)
                .collect();
            let y = PackedWeight::pack(&w, n, k).matmul(&x, m);
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
