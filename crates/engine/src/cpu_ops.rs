//! Small fused CPU kernels for element-wise work that general tensor ops would do on strided
//! views (slowly) or in several passes.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::fast_exp::exp;
#[cfg(target_arch = "x86_64")]
use crate::fast_exp::exp16;

/// The values of a CPU kernel's input: f32 and contiguous, or an error naming `op`.
pub(crate) fn f32_input<'a>(
    op: &str,
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(x) = s else {
        candle_core::bail!("{op}: f32 input only")
    };
    contiguous_input(op, x, l)
}

/// The values of `x` that the contiguous layout `l` covers; an error naming `op` otherwise.
pub(crate) fn contiguous_input<'a, E>(
    op: &str,
    x: &'a [E],
    l: &Layout,
) -> candle_core::Result<&'a [E]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: contiguous input only")
    };
    Ok(&x[start..end])
}

/// `silu(gate) * up` over the fused `[m, 2 * inter]` output of the gate/up projection
/// (gate in the first half of each row), giving `[m, inter]`. f32 on CPU.
pub struct SiluMul;

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_input(self.name(), s, l)?;
        let (m, width) = l.shape().dims2()?;
        if width % 2 != 0 {
            candle_core::bail!("silu-mul: odd width {width}")
        }
        let inter = width / 2;
        // Written whole below, so never zeroed first.
        let mut out = Vec::with_capacity(m * inter);
        out.spare_capacity_mut()
            .par_chunks_mut(inter)
            .zip(x.par_chunks(width))
            .for_each(|(o, row)| {
                let (gate, up) = row.split_at(inter);
                silu_mul_row(gate, up, o)
            });
        // SAFETY: every row was written above.
        unsafe { out.set_len(m * inter) };
        Ok((CpuStorage::F32(out), Shape::from((m, inter))))
    }
}

/// `o = silu(g) · u` over one row, as `g · s / (1 + e^-|g|) · u` with `s` 1 for `g ≥ 0`
/// and `e^-|g|` below (no overflow either way), sixteen lanes at a time where AVX-512 runs.
fn silu_mul_row(gate: &[f32], up: &[f32], o: &mut [Out]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if crate::packed_matmul::has_avx512() {
            // SAFETY: AVX-512F and FMA are present.
            done = unsafe { silu_mul_avx512(gate, up, o) };
        }
    }
    for ((o, &g), &u) in o[done..].iter_mut().zip(&gate[done..]).zip(&up[done..]) {
        let z = exp(-g.abs());
        o.write(g * if g >= 0.0 { 1.0 } else { z } / (1.0 + z) * u);
    }
}

/// [`silu_mul_row`] over the whole vectors of the row; returns how many values it wrote.
///
/// # Safety
/// The CPU has AVX-512F and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn silu_mul_avx512(gate: &[f32], up: &[f32], o: &mut [Out]) -> usize {
    use std::arch::x86_64::*;
    let n = o.len().min(gate.len()).min(up.len()) / 16 * 16;
    let one = _mm512_set1_ps(1.0);
    for i in (0..n).step_by(16) {
        // SAFETY: i + 16 <= n, which no slice is shorter than.
        let g = _mm512_loadu_ps(gate.as_ptr().add(i));
        let z = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
        let s = _mm512_mask_blend_ps(
            _mm512_cmp_ps_mask::<_CMP_GE_OQ>(g, _mm512_setzero_ps()),
            z,
            one,
        );
        let sig = _mm512_div_ps(s, _mm512_add_ps(one, z));
        let u = _mm512_loadu_ps(up.as_ptr().add(i));
        let out = o.as_mut_ptr().add(i) as *mut f32;
        _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_mul_ps(g, sig), u));
    }
    n
}

/// The residual sum `x + r` (`[rows, hidden]`) and its RMS norm scaled by `w` (`[hidden]`),
/// as a transformer block takes them between its halves: one pass over the rows on CPU in
/// f32, candle's ops elsewhere.
pub fn add_rms_norm(
    x: &Tensor,
    r: &Tensor,
    w: &Tensor,
    eps: f32,
) -> candle_core::Result<(Tensor, Tensor)> {
    if let Some(out) = add_rms_norm_cpu(x, r, w, eps)? {
        return Ok(out);
    }
    let sum = (x + r)?;
    let norm = candle_nn::ops::rms_norm(&sum, w, eps)?;
    Ok((sum, norm))
}

/// [`add_rms_norm`] on contiguous f32 CPU tensors; `None` for anything else.
fn add_rms_norm_cpu(
    x: &Tensor,
    r: &Tensor,
    w: &Tensor,
    eps: f32,
) -> candle_core::Result<Option<(Tensor, Tensor)>> {
    let Ok((rows, hidden)) = x.dims2() else {
        return Ok(None);
    };
    if r.dims() != x.dims() || w.dims() != [hidden] || hidden == 0 {
        return Ok(None);
    }
    let (xs, xl) = x.storage_and_layout();
    let (rs, rl) = r.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (Some(xv), Some(rv), Some(wv)) = (cpu_f32(&xs, xl), cpu_f32(&rs, rl), cpu_f32(&ws, wl))
    else {
        return Ok(None);
    };
    // Written whole below, so never zeroed first.
    let (mut sum, mut norm) = (
        Vec::with_capacity(rows * hidden),
        Vec::with_capacity(rows * hidden),
    );
    sum.spare_capacity_mut()
        .par_chunks_mut(hidden)
        .zip(norm.spare_capacity_mut().par_chunks_mut(hidden))
        .zip(xv.par_chunks(hidden).zip(rv.par_chunks(hidden)))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|((s, n), (x, r))| add_rms_norm_row(x, r, wv, eps, s, n));
    // SAFETY: every row of both was written above.
    unsafe {
        sum.set_len(rows * hidden);
        norm.set_len(rows * hidden);
    }
    let device = x.device();
    Ok(Some((
        Tensor::from_vec(sum, (rows, hidden), device)?,
        Tensor::from_vec(norm, (rows, hidden), device)?,
    )))
}

/// The values of a contiguous f32 CPU tensor ([`f32_input`]); `None` for any other.
fn cpu_f32<'a>(s: &'a Storage, l: &Layout) -> Option<&'a [f32]> {
    match s {
        Storage::Cpu(c) => f32_input("add-rms-norm", c, l).ok(),
        _ => None,
    }
}

/// Rows of [`add_rms_norm`] a parallel task takes at least (a row is a few hundred
/// nanoseconds of work).
const ROWS_PER_TASK: usize = 8;

/// One row of [`add_rms_norm`], with AVX-512 where it runs (the same arithmetic in the same
/// order either way: sixteen partial sums of squares).
fn add_rms_norm_row(x: &[f32], r: &[f32], w: &[f32], eps: f32, s: &mut [Out], n: &mut [Out]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::packed_matmul::has_avx512() {
            // SAFETY: AVX-512F is present.
            return unsafe { add_rms_norm_row_avx512(x, r, w, eps, s, n) };
        }
    }
    add_rms_norm_row_portable(x, r, w, eps, s, n)
}

/// [`add_rms_norm_row_portable`] compiled for AVX-512 (its loops vectorize to 16 lanes).
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn add_rms_norm_row_avx512(
    x: &[f32],
    r: &[f32],
    w: &[f32],
    eps: f32,
    s: &mut [Out],
    n: &mut [Out],
) {
    add_rms_norm_row_portable(x, r, w, eps, s, n)
}

/// Lanes of the partial sums in [`add_rms_norm_row`].
const LANES: usize = 16;

/// [`add_rms_norm_row`] in plain loops: the sum of squares in [`LANES`] partial sums, then
/// each sum and its norm written once.
#[inline(always)]
fn add_rms_norm_row_portable(
    x: &[f32],
    r: &[f32],
    w: &[f32],
    eps: f32,
    s: &mut [Out],
    n: &mut [Out],
) {
    let mut acc = [0f32; LANES];
    let (mut xs, mut rs) = (x.chunks_exact(LANES), r.chunks_exact(LANES));
    for (x, r) in (&mut xs).zip(&mut rs) {
        for ((a, x), r) in acc.iter_mut().zip(x).zip(r) {
            *a += (x + r) * (x + r);
        }
    }
    for ((a, x), r) in acc.iter_mut().zip(xs.remainder()).zip(rs.remainder()) {
        *a += (x + r) * (x + r);
    }
    let squares: f32 = acc.iter().sum();
    let scale = 1.0 / (squares / x.len() as f32 + eps).sqrt();
    for ((((s, n), x), r), w) in s.iter_mut().zip(n).zip(x).zip(r).zip(w) {
        let v = x + r;
        s.write(v);
        n.write(v * scale * w);
    }
}

/// An output value not yet written.
type Out = std::mem::MaybeUninit<f32>;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn silu_mul_matches_tensor_ops() {
        let x = Tensor::arange(-40f32, 40f32, &Device::Cpu)
            .unwrap()
            .affine(0.1, 0.0)
            .unwrap()
            .reshape((4, 20))
            .unwrap();
        let fused = x.apply_op1_no_bwd(&SiluMul).unwrap();
        let want =
            (x.narrow(1, 0, 10).unwrap().silu().unwrap() * x.narrow(1, 10, 10).unwrap()).unwrap();
        let diff = (fused - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "{diff}");
    }

    /// Rows whose halves hold two whole vectors and a tail, over the range where e^-|g|
    /// runs from 1 to below f32's normals, against f64.
    #[test]
    fn silu_mul_is_exact_to_f32_over_the_whole_range() {
        let inter = 37;
        let rows = 50;
        let x: Vec<f32> = (0..rows * 2 * inter)
            .map(|i| {
                let (r, c) = (i / (2 * inter), i % (2 * inter));
                if c < inter {
                    (r * inter + c) as f32 * 0.07 - 65.0
                } else {
                    1.0 + (c % 7) as f32 * 0.25
                }
            })
            .collect();
        let t = Tensor::from_vec(x.clone(), (rows, 2 * inter), &Device::Cpu).unwrap();
        let got = t
            .apply_op1_no_bwd(&SiluMul)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (i, &got) in got.iter().enumerate() {
            let (r, c) = (i / inter, i % inter);
            let (g, u) = (
                x[r * 2 * inter + c] as f64,
                x[r * 2 * inter + inter + c] as f64,
            );
            let want = g / (1.0 + (-g).exp()) * u;
            assert!(
                (got as f64 - want).abs() <= 1e-6 * want.abs() + 1e-37,
                "silu({g}) * {u}: {got} vs {want}"
            );
        }
        let nan = Tensor::from_vec(vec![f32::NAN; 32], (1, 32), &Device::Cpu).unwrap();
        let out = nan
            .apply_op1_no_bwd(&SiluMul)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(out[0].iter().all(|v| v.is_nan()));
    }

    /// Against candle's add and `rms_norm`, for rows that are and are not a multiple of the
    /// lanes, one row (decode) and many (prefill).
    #[test]
    fn add_rms_norm_matches_tensor_ops() {
        for (rows, hidden) in [(1, 64), (3, 37), (40, 576)] {
            let v = |salt: usize| {
                let data: Vec<f32> = (0..rows * hidden)
                    .map(|i| (((i * 7919 + salt) % 1000) as f32 - 500.0) * 0.01)
                    .collect();
                Tensor::from_vec(data, (rows, hidden), &Device::Cpu).unwrap()
            };
            let (x, r) = (v(1), v(2));
            let w = Tensor::from_vec(
                (0..hidden)
                    .map(|i| 0.5 + i as f32 * 0.01)
                    .collect::<Vec<_>>(),
                hidden,
                &Device::Cpu,
            )
            .unwrap();
            let (sum, norm) = add_rms_norm(&x, &r, &w, 1e-5).unwrap();
            let want_sum = (&x + &r).unwrap();
            let want_norm = candle_nn::ops::rms_norm(&want_sum, &w, 1e-5).unwrap();
            for (got, want, what) in [(sum, want_sum, "sum"), (norm, want_norm, "norm")] {
                let (got, want) = (
                    got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                        "{what}: {g} vs {w}"
                    );
                }
            }
        }
    }
}
