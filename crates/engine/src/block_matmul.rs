//! `y = x · Wᵀ` on CPU for weights in llama.cpp's block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
//! and the K-quants Q4_K, Q5_K, Q6_K), computed on the quantized bytes as they lie in the GGUF
//! file.
//!
//! candle computes Q4_1 and Q5_x one value at a time on x86, and its vectorised Q8_0 and
//! K-quant kernels quantize the activations to 8 bits first; its fastest (repacked) kernels
//! need rows of whole 256-wide super-blocks, which many small models' 576- or 960-wide rows are
//! not, and they run on a thread pool of their own that spins beside rayon's. Here each run of
//! 32 weights (a block, or a K-quant sub-block with its own scale) is widened to two 16-lane
//! f32 vectors in registers and multiplied with the f32 activations (AVX-512), so the only
//! rounding is the weights' own: the result is the product with the dequantized matrix, summed
//! in another order.
//!
//! A register tile covers up to four rows of `x` and four rows of `W`: each block is widened
//! once per tile and used for every row of `x` in it. Rows of `W` are shared out among threads.
//! From [`crate::int8_matmul::FROM_ROWS`] rows of `x` on (a batch of decodes, a prefill chunk),
//! CPUs with AVX-512 VNNI quantize `x` to 8 bits and multiply as integers, as llama.cpp does
//! ([`crate::int8_matmul`]). Elsewhere, from [`BlockFormat::widen_rows`] rows on, widening
//! every block once per four rows costs more than widening the matrix once: the product then
//! widens the rows of `W` a pair of panels at a time into cache and runs the packed f32 tiles
//! over them ([`widened_matmul`]).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape};

use crate::int8_matmul;
use crate::packed_matmul::{has_avx512, widened_matmul, SharedOut};

/// Weights per block.
const QK: usize = 32;
/// Rows of `x` and of `W` per register tile.
const TILE: usize = 4;

/// A block format this module computes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl BlockFormat {
    /// The GGUF types this module computes on, one a format.
    pub const DTYPES: [GgmlDType; 8] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];

    /// The format of `dtype`, when it is one of these and this CPU has the kernels
    /// (AVX-512F).
    pub fn of(dtype: GgmlDType) -> Option<Self> {
        if !has_avx512() {
            return None;
        }
        Some(match dtype {
            GgmlDType::Q4_0 => Self::Q4_0,
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q5_1 => Self::Q5_1,
            GgmlDType::Q8_0 => Self::Q8_0,
            GgmlDType::Q4K => Self::Q4K,
            GgmlDType::Q5K => Self::Q5K,
            GgmlDType::Q6K => Self::Q6K,
            _ => return None,
        })
    }

    /// Bytes per block (the layouts of ggml's `block_q*`).
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 2 + 16,
            Self::Q4_1 => 2 + 2 + 16,
            Self::Q5_0 => 2 + 4 + 16,
            Self::Q5_1 => 2 + 2 + 4 + 16,
            Self::Q8_0 => 2 + 32,
            Self::Q4K => 2 + 2 + 12 + 128,
            Self::Q5K => 2 + 2 + 12 + 32 + 128,
            Self::Q6K => 128 + 64 + 16 + 2,
        }
    }

    /// Rows of `x` from which [`matmul`] widens the matrix once for the call rather than
    /// each block once a tile: where the two cost the same on an AVX-512 server core, 2
    /// threads (`cargo run --release -p openinfer-engine --example widen_crossover`). Formats
    /// that are costly to widen gain more from widening once.
    pub fn widen_rows(self) -> usize {
        match self {
            Self::Q8_0 => 32,
            Self::Q4_0 => 24,
            Self::Q4_1 => 20,
            Self::Q5_0 | Self::Q5_1 => 14,
            Self::Q4K => 12,
            Self::Q5K | Self::Q6K => 8,
        }
    }

    /// Weights per block: 32, or 256 for the K-quants' super-blocks.
    pub fn block_weights(self) -> usize {
        match self {
            Self::Q4K | Self::Q5K | Self::Q6K => 256,
            _ => QK,
        }
    }
}

/// Calls `$go!(Format)` with the type of `$format`'s widening.
macro_rules! dispatch {
    ($format:expr, $go:ident) => {
        match $format {
            BlockFormat::Q4_0 => $go!(Q4_0),
            BlockFormat::Q4_1 => $go!(Q4_1),
            BlockFormat::Q5_0 => $go!(Q5_0),
            BlockFormat::Q5_1 => $go!(Q5_1),
            BlockFormat::Q8_0 => $go!(Q8_0),
            BlockFormat::Q4K => $go!(Q4K),
            BlockFormat::Q5K => $go!(Q5K),
            BlockFormat::Q6K => $go!(Q6K),
        }
    };
}
pub(crate) use dispatch;

/// `x [m, k]` (row-major f32) times the transpose of `w`, `n` rows of `k` weights in `format`
/// (`w` holds `n · k / 32` blocks, row after row) → `[m, n]` row-major: from
/// [`int8_matmul::FROM_ROWS`] rows (a batch of decodes, a prefill chunk) in int8 where the
/// CPU has VNNI ([`int8_matmul`]); otherwise [`tiled`] below [`BlockFormat::widen_rows`] rows
/// and [`widened`] from there.
///
/// # Panics
/// When `k` is not a multiple of the format's block or the slices are shorter than the shapes
/// say.
pub fn matmul(format: BlockFormat, w: &[u8], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    if m >= int8_matmul::FROM_ROWS && int8_matmul::available() {
        // It checks the shapes itself.
        int8_matmul::matmul(format, w, n, k, x, m)
    } else if m >= format.widen_rows() {
        widened(format, w, n, k, x, m)
    } else {
        tiled(format, w, n, k, x, m)
    }
}

/// [`matmul`] with the matrix widened once, a pair of panels at a time, and multiplied by the
/// packed f32 tiles ([`widened_matmul`]).
pub fn widened(format: BlockFormat, w: &[u8], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    checked_row_bytes(format, w, n, k, x, m);
    widened_matmul(n, k, |r, row| dequantize_row(format, w, k, r, row), x, m)
}

/// Bytes per row of `w`, checking the shapes.
fn checked_row_bytes(
    format: BlockFormat,
    w: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
) -> usize {
    let per_block = format.block_weights();
    assert!(
        k.is_multiple_of(per_block),
        "block-matmul: k = {k} is not a multiple of {per_block}"
    );
    let row_bytes = k / per_block * format.block_bytes();
    assert!(
        w.len() >= n * row_bytes && x.len() >= m * k,
        "block-matmul: short input"
    );
    row_bytes
}

/// [`matmul`] with each block widened in registers once per tile of four rows of `x`.
pub fn tiled(format: BlockFormat, w: &[u8], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    let row_bytes = checked_row_bytes(format, w, n, k, x, m);
    // Every value is written below (each task its columns of every row), so never zeroed.
    let mut y = Vec::with_capacity(m * n);
    let out = SharedOut(y.spare_capacity_mut().as_mut_ptr() as *mut f32);
    // Ranges of column tiles shrinking as the product ends, so the threads finish together.
    crate::guided::for_each_range(
        n.div_ceil(TILE),
        1,
        1,
        || (),
        |_, range| {
            let end = (range.end * TILE).min(n);
            let mut j = range.start * TILE;
            while j < end {
                let cols = TILE.min(end - j);
                let mut i = 0;
                while i < m {
                    let rows = TILE.min(m - i);
                    let tile = Tile {
                        x: &x[i * k..(i + rows) * k],
                        w: &w[j * row_bytes..(j + cols) * row_bytes],
                        k,
                        row_bytes,
                    };
                    // SAFETY: the CPU has AVX-512F (`BlockFormat::of`); rows i..i+rows and columns
                    // j..j+cols lie inside `y`, and only this task writes these columns.
                    unsafe { tile.run(format, rows, cols, out.ptr().add(i * n + j), n) };
                    i += rows;
                }
                j += cols;
            }
        },
    );
    // SAFETY: the tasks wrote all m × n values.
    unsafe { y.set_len(m * n) };
    y
}

/// Row `r` of the `[n, k]` matrix `w` in `format`, dequantized into `out` (`k` values).
pub fn dequantize_row(format: BlockFormat, w: &[u8], k: usize, r: usize, out: &mut [f32]) {
    let row_bytes = k / format.block_weights() * format.block_bytes();
    let row = &w[r * row_bytes..(r + 1) * row_bytes];
    assert!(
        out.len() >= k && k.is_multiple_of(format.block_weights()),
        "block-matmul: bad row"
    );
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! go {
            ($f:ident) => {
                // SAFETY: `BlockFormat::of` found AVX-512F; `row` holds the row's blocks and
                // `out` k values.
                unsafe { widen_row::<$f>(row, &mut out[..k]) }
            };
        }
        dispatch!(format, go);
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("block-matmul runs only where BlockFormat::of found AVX-512");
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,f16c,fma")]
unsafe fn widen_row<F: Widen>(row: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::*;
    for (b, o) in out.chunks_exact_mut(QK).enumerate() {
        let (w0, w1) = F::widen(row.as_ptr().add(b / F::SUBS * F::BYTES), b % F::SUBS);
        _mm512_storeu_ps(o.as_mut_ptr(), w0);
        _mm512_storeu_ps(o.as_mut_ptr().add(16), w1);
    }
}

/// The custom op: `x` `[m, k]` contiguous f32 → `[m, n]`, for a quantized matrix in `format`.
pub struct BlockMatmul<'a> {
    pub format: BlockFormat,
    pub w: &'a QTensor,
}

impl CustomOp1 for BlockMatmul<'_> {
    fn name(&self) -> &'static str {
        "block-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = crate::cpu_ops::f32_input(self.name(), s, l)?;
        let (m, k) = l.shape().dims2()?;
        let (n, wk) = self.w.shape().dims2()?;
        if k != wk || k % self.format.block_weights() != 0 {
            candle_core::bail!("block-matmul: input width {k}, weight [{n}, {wk}]")
        }
        let y = matmul(self.format, &self.w.data()?, n, k, x, m);
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}

/// Up to [`TILE`] rows of `x` against up to [`TILE`] rows of `W`.
struct Tile<'a> {
    x: &'a [f32],
    w: &'a [u8],
    k: usize,
    row_bytes: usize,
}

impl Tile<'_> {
    /// # Safety
    /// AVX-512F is present; `y` is valid for `rows` rows of stride `ldy` and `cols` columns.
    unsafe fn run(&self, format: BlockFormat, rows: usize, cols: usize, y: *mut f32, ldy: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            macro_rules! go {
                ($f:ident) => {
                    self.run_as::<$f>(rows, cols, y, ldy)
                };
            }
            dispatch!(format, go);
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (format, rows, cols, y, ldy);
            unreachable!("block-matmul runs only where BlockFormat::of found AVX-512");
        }
    }

    /// [`Tile::run`] for the weights as `F` lays them out.
    ///
    /// # Safety
    /// As [`Tile::run`].
    #[cfg(target_arch = "x86_64")]
    unsafe fn run_as<F: Widen>(&self, rows: usize, cols: usize, y: *mut f32, ldy: usize) {
        let mut acc = [[0f32; TILE]; TILE];
        match (rows, cols) {
            (1, 1) => self.avx512::<F, 1, 1>(&mut acc),
            (1, 2) => self.avx512::<F, 1, 2>(&mut acc),
            (1, 3) => self.avx512::<F, 1, 3>(&mut acc),
            (1, _) => self.avx512::<F, 1, 4>(&mut acc),
            (2, 1) => self.avx512::<F, 2, 1>(&mut acc),
            (2, 2) => self.avx512::<F, 2, 2>(&mut acc),
            (2, 3) => self.avx512::<F, 2, 3>(&mut acc),
            (2, _) => self.avx512::<F, 2, 4>(&mut acc),
            (3, 1) => self.avx512::<F, 3, 1>(&mut acc),
            (3, 2) => self.avx512::<F, 3, 2>(&mut acc),
            (3, 3) => self.avx512::<F, 3, 3>(&mut acc),
            (3, _) => self.avx512::<F, 3, 4>(&mut acc),
            (_, 1) => self.avx512::<F, 4, 1>(&mut acc),
            (_, 2) => self.avx512::<F, 4, 2>(&mut acc),
            (_, 3) => self.avx512::<F, 4, 3>(&mut acc),
            (_, _) => self.avx512::<F, 4, 4>(&mut acc),
        }
        for (r, acc) in acc.iter().enumerate().take(rows) {
            std::ptr::copy_nonoverlapping(acc.as_ptr(), y.add(r * ldy), cols);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,f16c,fma")]
    #[allow(clippy::needless_range_loop)] // r and c index x, W and the accumulators alike
    unsafe fn avx512<F: Widen, const R: usize, const C: usize>(
        &self,
        out: &mut [[f32; TILE]; TILE],
    ) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let (xp, wp) = (self.x.as_ptr(), self.w.as_ptr());
        for b in 0..self.k / QK {
            let mut xs = [[_mm512_setzero_ps(); 2]; R];
            for (r, xs) in xs.iter_mut().enumerate() {
                // SAFETY: row r < R of x has k values; b·32 + 32 <= k.
                let p = xp.add(r * self.k + b * QK);
                *xs = [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))];
            }
            for c in 0..C {
                // SAFETY: row c < C of W holds k / (32·SUBS) blocks of F::BYTES.
                let p = wp.add(c * self.row_bytes + b / F::SUBS * F::BYTES);
                if b % F::SUBS == 0 {
                    // The same block of the next tile's row: rows are only a few hundred
                    // bytes on small models, too short for the hardware prefetcher to ramp up.
                    let next = p.wrapping_add(TILE * self.row_bytes);
                    let mut line = 0;
                    while line < F::BYTES {
                        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(line) as *const i8);
                        line += 64;
                    }
                }
                let (w0, w1) = F::widen(p, b % F::SUBS);
                for r in 0..R {
                    acc[r][c] = _mm512_fmadd_ps(xs[r][0], w0, acc[r][c]);
                    acc[r][c] = _mm512_fmadd_ps(xs[r][1], w1, acc[r][c]);
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                out[r][c] = _mm512_reduce_add_ps(acc[r][c]);
            }
        }
    }
}

/// A block format's weights widened to f32, scale (and minimum) applied.
#[cfg(target_arch = "x86_64")]
trait Widen {
    /// Bytes per block.
    const BYTES: usize;
    /// Runs of 32 weights per block.
    const SUBS: usize;
    /// Weights 0–15 and 16–31 of run `s` of the block at `p`.
    unsafe fn widen(p: *const u8, s: usize) -> (__m512, __m512);
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{__m128i, __m512, __m512i};

/// The bits of the little-endian f16 at `p` (a scale or minimum).
#[inline(always)]
unsafe fn f16_bits(p: *const u8) -> i16 {
    i16::from_le_bytes([*p, *p.add(1)])
}

/// The f16 at `p` in every lane.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn splat_f16(p: *const u8) -> __m512 {
    use std::arch::x86_64::*;
    _mm512_cvtph_ps(_mm256_set1_epi16(f16_bits(p)))
}

/// The 16 bytes at `p` as 32-bit lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn bytes16(p: *const u8) -> __m512i {
    use std::arch::x86_64::*;
    _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i))
}

/// The low and high nibbles of the 16 bytes at `p`, as 32-bit lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> (__m512i, __m512i) {
    use std::arch::x86_64::*;
    let b = bytes16(p);
    (
        _mm512_and_si512(b, _mm512_set1_epi32(0xF)),
        _mm512_srli_epi32(b, 4),
    )
}

/// Adds 16 to the lanes whose bit is set in the block's 32 high bits (`qh` at `p`): weights
/// 0–15 take bits 0–15, weights 16–31 bits 16–31.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn fifth_bits(p: *const u8, (lo, hi): (__m512i, __m512i)) -> (__m512i, __m512i) {
    use std::arch::x86_64::*;
    let qh = u32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)]);
    let sixteen = _mm512_set1_epi32(16);
    (
        _mm512_mask_add_epi32(lo, qh as u16, lo, sixteen),
        _mm512_mask_add_epi32(hi, (qh >> 16) as u16, hi, sixteen),
    )
}

/// `d · (q − offset) + m` for both halves.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn scale(
    (lo, hi): (__m512i, __m512i),
    offset: i32,
    d: __m512,
    m: __m512,
) -> (__m512, __m512) {
    use std::arch::x86_64::*;
    // No closures in these helpers: a closure does not inherit the caller's target features,
    // and its intrinsics would be calls.
    let o = _mm512_set1_epi32(offset);
    (
        _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(lo, o)), m),
        _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(hi, o)), m),
    )
}

/// Declares a format's widening type.
macro_rules! widen {
    ($name:ident, $bytes:expr, $subs:expr, |$p:ident, $s:ident| $body:block) => {
        #[cfg(target_arch = "x86_64")]
        struct $name;
        #[cfg(target_arch = "x86_64")]
        impl Widen for $name {
            const BYTES: usize = $bytes;
            const SUBS: usize = $subs;
            #[inline(always)]
            #[allow(unused_variables, unused_imports)]
            unsafe fn widen($p: *const u8, $s: usize) -> (__m512, __m512) {
                use std::arch::x86_64::*;
                $body
            }
        }
    };
}

// block_q4_0: d, qs[16] (weight j in the low nibble of byte j, weight 16 + j in its high one).
widen!(Q4_0, 18, 1, |p, s| {
    scale(nibbles(p.add(2)), 8, splat_f16(p), _mm512_setzero_ps())
});
// block_q4_1: d, m, qs[16].
widen!(Q4_1, 20, 1, |p, s| {
    scale(nibbles(p.add(4)), 0, splat_f16(p), splat_f16(p.add(2)))
});
// block_q5_0: d, qh (the fifth bits), qs[16].
widen!(Q5_0, 22, 1, |p, s| {
    let q = fifth_bits(p.add(2), nibbles(p.add(6)));
    scale(q, 16, splat_f16(p), _mm512_setzero_ps())
});
// block_q5_1: d, m, qh, qs[16].
widen!(Q5_1, 24, 1, |p, s| {
    let q = fifth_bits(p.add(4), nibbles(p.add(8)));
    scale(q, 0, splat_f16(p), splat_f16(p.add(2)))
});
// block_q8_0: d, qs[32] (signed).
widen!(Q8_0, 34, 1, |p, s| {
    let d = splat_f16(p);
    let lo = _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(2) as *const __m128i));
    let hi = _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(18) as *const __m128i));
    (
        _mm512_mul_ps(d, _mm512_cvtepi32_ps(lo)),
        _mm512_mul_ps(d, _mm512_cvtepi32_ps(hi)),
    )
});

/// Scale and minimum of run `s` (0–7) of a Q4_K or Q5_K super-block: six bits each, packed
/// in 12 bytes at `sc` (ggml's `get_scale_min_k4`).
#[inline(always)]
unsafe fn scale_min_k4(s: usize, sc: *const u8) -> (f32, f32) {
    let at = |i: usize| *sc.add(i);
    let (d, m) = if s < 4 {
        (at(s) & 63, at(s + 4) & 63)
    } else {
        (
            (at(s + 4) & 0xF) | ((at(s - 4) >> 6) << 4),
            (at(s + 4) >> 4) | ((at(s) >> 6) << 4),
        )
    };
    (f32::from(d), f32::from(m))
}

/// `d·sc·q − dmin·m` for run `s` of the Q4_K or Q5_K super-block at `p`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn scale_k(p: *const u8, s: usize, q: (__m512i, __m512i)) -> (__m512, __m512) {
    use std::arch::x86_64::*;
    let (sc, m) = scale_min_k4(s, p.add(4));
    let d = _mm512_mul_ps(splat_f16(p), _mm512_set1_ps(sc));
    let min = _mm512_mul_ps(splat_f16(p.add(2)), _mm512_set1_ps(-m));
    scale(q, 0, d, min)
}

/// The low nibbles (even runs) or high nibbles (odd runs) of run `s`'s 32 bytes at `qs`:
/// runs 2i and 2i + 1 share bytes 32i..32i + 32.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn k_nibbles(qs: *const u8, s: usize) -> (__m512i, __m512i) {
    use std::arch::x86_64::*;
    let q = qs.add(s / 2 * 32);
    let (a, b) = (bytes16(q), bytes16(q.add(16)));
    if s.is_multiple_of(2) {
        let mask = _mm512_set1_epi32(0xF);
        (_mm512_and_si512(a, mask), _mm512_and_si512(b, mask))
    } else {
        (_mm512_srli_epi32(a, 4), _mm512_srli_epi32(b, 4))
    }
}

// block_q4_K: d, dmin, scales[12], qs[128].
widen!(Q4K, 144, 8, |p, s| {
    scale_k(p, s, k_nibbles(p.add(16), s))
});
/// Sets bit 4 of each lane of `q` to bit `s` of the matching byte of the 16 at `h`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn with_fifth_bit(q: __m512i, h: *const u8, s: __m128i) -> __m512i {
    use std::arch::x86_64::*;
    let five = _mm512_and_si512(_mm512_srl_epi32(bytes16(h), s), _mm512_set1_epi32(1));
    _mm512_or_si512(q, _mm512_slli_epi32(five, 4))
}

/// One half (16 weights at byte `o`) of a Q6_K run: the low (`high` false) or high nibbles of
/// `ql`, two bits of `qh` at `shift`, times `d · sc`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q6k_half(
    ql: *const u8,
    qh: *const u8,
    high: bool,
    shift: __m128i,
    d: __m512,
    sc: i8,
) -> __m512 {
    use std::arch::x86_64::*;
    let l = bytes16(ql);
    let nib = if high {
        _mm512_srli_epi32(l, 4)
    } else {
        _mm512_and_si512(l, _mm512_set1_epi32(0xF))
    };
    let two = _mm512_and_si512(_mm512_srl_epi32(bytes16(qh), shift), _mm512_set1_epi32(3));
    let q = _mm512_sub_epi32(
        _mm512_or_si512(nib, _mm512_slli_epi32(two, 4)),
        _mm512_set1_epi32(32),
    );
    _mm512_mul_ps(
        _mm512_mul_ps(d, _mm512_set1_ps(f32::from(sc))),
        _mm512_cvtepi32_ps(q),
    )
}

// block_q5_K: d, dmin, scales[12], qh[32] (bit s of byte l is the fifth bit of run s's
// weight l), qs[128].
widen!(Q5K, 176, 8, |p, s| {
    let (lo, hi) = k_nibbles(p.add(48), s);
    let bit = _mm_cvtsi32_si128(s as i32);
    let q = (
        with_fifth_bit(lo, p.add(16), bit),
        with_fifth_bit(hi, p.add(32), bit),
    );
    scale_k(p, s, q)
});
// block_q6_K: ql[128], qh[64], scales[16] (signed, one per 16 weights), d. Run 4h + g takes
// the low (g < 2) or high nibbles of ql[64h + 32(g % 2)..], bits 2g..2g + 2 of qh[32h..] and
// scales 8h + 2g, 8h + 2g + 1.
widen!(Q6K, 210, 8, |p, s| {
    let (h, g) = (s / 4, s % 4);
    let ql = p.add(64 * h + 32 * (g % 2));
    let qh = p.add(128 + 32 * h);
    let sc = p.add(192 + 8 * h + 2 * g) as *const i8;
    let d = splat_f16(p.add(208));
    let shift = _mm_cvtsi32_si128(2 * g as i32);
    (
        q6k_half(ql, qh, g >= 2, shift, d, *sc),
        q6k_half(ql.add(16), qh.add(16), g >= 2, shift, d, *sc.add(1)),
    )
});

/// Test data shared by this module's tests and `int8_matmul`'s.
#[cfg(test)]
pub(crate) mod test_data {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// A weight matrix `[n, k]` quantized to `dtype`, and an input `[m, k]`: fixed values,
    /// varied enough that every quantized bit matters.
    pub(crate) fn case(dtype: GgmlDType, m: usize, k: usize, n: usize) -> (QTensor, Vec<f32>) {
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 104729) % 89) as f32 / 89.0 - 0.3)
            .collect();
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
            .collect();
        let w = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        (QTensor::quantize(&w, dtype).unwrap(), x)
    }
}

#[cfg(test)]
mod tests {
    use super::test_data::case;
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn matches_the_dequantized_product_for_every_format_and_odd_shapes() {
        let Some(_) = BlockFormat::of(GgmlDType::Q8_0) else {
            return; // no AVX-512 here: the kernels are not used
        };
        for dtype in BlockFormat::DTYPES {
            let format = BlockFormat::of(dtype).unwrap();
            assert_eq!(
                (format.block_bytes(), format.block_weights()),
                (dtype.type_size(), dtype.block_size())
            );
            let b = format.block_weights();
            for (m, k, n) in [
                (1, b, 1),
                (1, 3 * b, 37),
                (3, 2 * b, 9),
                (5, b, 16),
                (9, 5 * b, 7),
                (21, 2 * b, 70),
            ] {
                let (q, x) = case(dtype, m, k, n);
                let dense = q.dequantize(&Device::Cpu).unwrap();
                let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
                let want: Vec<f32> = xt
                    .matmul(&dense.t().unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let bytes = q.data().unwrap();
                let rows: Vec<f32> = dense.flatten_all().unwrap().to_vec1().unwrap();
                let mut row = vec![0f32; k];
                for r in 0..n {
                    dequantize_row(format, &bytes, k, r, &mut row);
                    assert_eq!(row, rows[r * k..(r + 1) * k], "{dtype:?} row {r}");
                }
                for (how, got) in [
                    ("tiled", tiled(format, &bytes, n, k, &x, m)),
                    ("widened", widened(format, &bytes, n, k, &x, m)),
                ] {
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() < 1e-3 * (1.0 + b.abs()),
                            "{dtype:?} {how} ({m},{k},{n}) at {i}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}
