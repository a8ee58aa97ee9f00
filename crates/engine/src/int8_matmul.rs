//! `y = x · Wᵀ` for weights in llama.cpp's block formats with the activations quantized to 8
//! bits too, multiplied as integers with AVX-512 VNNI (`vpdpbusd`: 64 byte products summed
//! into 16 lanes per instruction, where an f32 FMA does 16 products).
//!
//! This is llama.cpp's arithmetic for its quantized formats (activations in Q8_0 blocks of 32,
//! one f32 scale each), used here where it pays: from [`FROM_ROWS`] rows of `x` (a batch of
//! decodes, a prefill chunk), whose products on widened weights are bound by the
//! multiply-adds.
//!
//! Every format's weights are, run by run (32 weights; 16 for Q6_K, whose scales come per 16),
//! `w = s · u + o` with `u` an unsigned byte: Q8_0's signed values plus 128, the 4-, 5- or
//! 6-bit values of the others as they are, `o` their offset or minimum. So one kernel serves
//! them all: per run, `Σ x·w = dₓ · (s · Σ uᵢ·qᵢ + o · Σ qᵢ)` with the activations `dₓ · qᵢ`.
//! Each task unpacks a panel of 16 rows of `W` at a time into cache ([`Unpack`]), the 16 rows'
//! bytes interleaved four at a time (`[group of 4][row][4]`), so that one 64-byte load serves
//! 16 outputs; then every row of `x` runs over it.
//!
//! The only rounding beyond the weights' is the activations' (to 1/254 of each block's largest
//! magnitude); the result is not the product with the dequantized matrix to f32 precision, as
//! the other paths' is, but within what llama.cpp's users see on every product.

use crate::block_matmul::BlockFormat;
use crate::packed_matmul::SharedOut;

/// Values per activation block (Q8_0's).
const QK: usize = 32;
/// Rows of `W` (outputs) per panel: one 16-lane vector of sums.
const PANEL: usize = 16;
/// Rows of `x` per register tile.
const ROWS: usize = 8;

/// Rows of `x` from which [`crate::block_matmul::matmul`] takes this path: a batch of
/// decodes, a prefill chunk. Below, a step is bound by reading the weights, which the f32
/// paths do in one stream where this one reads 16 rows at a time: on SmolLM2-135M Q8_0, 2
/// threads, decode at batch 4 ran at 226–227 tok/s with f32 activations against 191–197
/// with int8, at batch 8 at 245–265 against 283–305 (`openinfer bench-engine --batch 4`, `8`).
/// From 8 rows it is faster in every format and at every size measured, prefill included
/// (2.3–3× the widened f32 panels at 128 rows: `examples/int8_speed`).
pub const FROM_ROWS: usize = 8;

/// True when this CPU has the instructions (AVX-512 F, BW, VL and VNNI, and F16C).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The activations in Q8_0 blocks: values, each block's scale, and the sum of the values of
/// each run of `run` (the term the weights' offsets multiply).
pub struct QuantizedRows {
    q: Vec<i8>,
    scale: Vec<f32>,
    sum: Vec<f32>,
    k: usize,
    run: usize,
}

impl QuantizedRows {
    /// `x` (`[m, k]`, `k` a multiple of 32) quantized block by block: scale = largest
    /// magnitude / 127, values rounded to nearest (even); sums kept per `run` values (16 or
    /// 32).
    ///
    /// # Panics
    /// When [`available`] is false, or the shapes do not fit.
    pub fn new(x: &[f32], m: usize, k: usize, run: usize) -> Self {
        assert!(
            available() && k.is_multiple_of(QK) && x.len() >= m * k && (run == 16 || run == QK),
            "int8-matmul: bad activations"
        );
        let mut q = vec![0i8; m * k];
        let mut scale = vec![0f32; m * k / QK];
        let mut sum = vec![0f32; m * k / run];
        for (((x, q), s), sums) in x[..m * k]
            .chunks_exact(QK)
            .zip(q.chunks_exact_mut(QK))
            .zip(&mut scale)
            .zip(sum.chunks_exact_mut(QK / run))
        {
            // SAFETY: `available()` held; each chunk holds a block.
            unsafe { quantize_block(x, q, s, sums) };
        }
        QuantizedRows {
            q,
            scale,
            sum,
            k,
            run,
        }
    }

    /// Value `t` of row `r`, as the activations' rounding left it.
    pub fn value(&self, r: usize, t: usize) -> f32 {
        f32::from(self.q[r * self.k + t]) * self.scale[(r * self.k + t) / QK]
    }
}

/// One block of 32 activations into `q`, its scale into `scale` and the sums of its runs
/// (one or two) into `sums`.
///
/// # Safety
/// AVX-512 F and BW are present; `x` and `q` hold 32 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_block(x: &[f32], q: &mut [i8], scale: &mut f32, sums: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(x.len() >= QK && q.len() >= QK);
    let (a, b) = (
        _mm512_loadu_ps(x.as_ptr()),
        _mm512_loadu_ps(x.as_ptr().add(16)),
    );
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    let d = amax / 127.0;
    let inv = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    // Rounded to nearest even (the default rounding); |x / d| <= 127, so no clamping.
    let (qa, qb) = (
        _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)),
        _mm512_cvtps_epi32(_mm512_mul_ps(b, inv)),
    );
    _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128(
        q.as_mut_ptr().add(16) as *mut __m128i,
        _mm512_cvtsepi32_epi8(qb),
    );
    *scale = d;
    match sums {
        [both] => *both = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)) as f32,
        [first, second] => {
            *first = _mm512_reduce_add_epi32(qa) as f32;
            *second = _mm512_reduce_add_epi32(qb) as f32;
        }
        _ => unreachable!("a block holds one or two runs"),
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn quantize_block(_: &[f32], _: &mut [i8], _: &mut f32, _: &mut [f32]) {
    unreachable!("int8-matmul runs only where available() is true")
}

/// `x [m, k]` times the transpose of `w` (`n` rows of `k` weights in `format`, as in
/// [`crate::block_matmul::matmul`]) → `[m, n]`, with `x` quantized to Q8_0 first
/// ([`QuantizedRows`]).
///
/// # Panics
/// When [`available`] is false, or the shapes do not fit the slices.
pub fn matmul(format: BlockFormat, w: &[u8], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    assert!(available(), "int8-matmul needs AVX-512 VNNI");
    let per_block = format.block_weights();
    let row_bytes = k / per_block * format.block_bytes();
    assert!(
        k.is_multiple_of(per_block) && w.len() >= n * row_bytes && x.len() >= m * k,
        "int8-matmul: k = {k} is not a multiple of {per_block}, or short input"
    );
    let run = run_of(format);
    let xq = QuantizedRows::new(x, m, k, run);
    let runs = k / run;
    // Every value is written below (each task its columns of every row), so never zeroed.
    let mut y = Vec::with_capacity(m * n);
    let out = SharedOut(y.spare_capacity_mut().as_mut_ptr() as *mut f32);
    let panels = n.div_ceil(PANEL);
    // Ranges of panels shrinking as the product ends, so the threads finish together.
    crate::guided::for_each_range(
        panels,
        1,
        1,
        || Panel::new(k, runs),
        |panel, range| {
            for p in range {
                let col = p * PANEL;
                let cols = PANEL.min(n - col);
                // SAFETY: `available()` held; rows col..col + cols of `w` hold a row's
                // blocks each (checked above).
                unsafe { panel.fill(format, &w[col * row_bytes..], row_bytes, cols) };
                let mut i = 0;
                while i < m {
                    let rows = ROWS.min(m - i);
                    // SAFETY: as above; rows i..i+rows and columns col..col+cols lie in
                    // `y` (m × n), and only this task writes these columns.
                    unsafe { tile(&xq, i, rows, panel, out.ptr().add(i * n + col), n, cols) };
                    i += rows;
                }
            }
        },
    );
    // SAFETY: the tasks wrote all m × n values.
    unsafe { y.set_len(m * n) };
    y
}

/// Weights per scale in `format`: 16 for Q6_K, 32 for the others.
fn run_of(format: BlockFormat) -> usize {
    match format {
        BlockFormat::Q6K => 16,
        _ => QK,
    }
}

/// One task's panel of 16 rows of `W`, interleaved for the kernel: `packed`
/// (`[group][row][4]`: group `g` holds weights `4g..4g + 4` of every row), `scales` and
/// `offsets` (`[run][row]`). Rows past a partial panel's end are zero, so their (unstored)
/// outputs are zero.
struct Panel {
    packed: Vec<u8>,
    scales: Vec<f32>,
    offsets: Vec<f32>,
}

impl Panel {
    fn new(k: usize, runs: usize) -> Self {
        Panel {
            packed: vec![0; PANEL * k],
            scales: vec![0.0; PANEL * runs],
            offsets: vec![0.0; PANEL * runs],
        }
    }

    /// Rows `0..cols` of `w` (`row_bytes` apart) in `format`, 16 rows at a time ([`Unpack`]).
    ///
    /// # Safety
    /// [`available`] is true.
    #[cfg(target_arch = "x86_64")]
    unsafe fn fill(&mut self, format: BlockFormat, w: &[u8], row_bytes: usize, cols: usize) {
        macro_rules! go {
            ($f:ident) => {
                unpack_panel::<$f>(self, w, row_bytes, cols)
            };
        }
        crate::block_matmul::dispatch!(format, go);
    }
}

/// How a block format is unpacked into the interleaved form, 16 rows at a time: each run's
/// bytes read row by row and transposed in registers ([`transpose_groups`]), the scales and
/// offsets gathered from every row at once (one lane a row).
#[cfg(target_arch = "x86_64")]
trait Unpack {
    /// Bytes per block.
    const BYTES: usize;
    /// Weights per block.
    const WEIGHTS: usize;
    /// Weights per scale and offset: 32, or 16 for Q6_K.
    const RUN: usize = QK;
    /// Weights `32s..32s + 32` of the block at `p` as unsigned bytes `u` (`w = s · u + o`).
    unsafe fn bytes(p: *const u8, s: usize) -> __m256i;
    /// The scales and offsets of the block at `base` of each row (`rows`: their byte offsets
    /// from `base`; `mask`: the rows that exist) into `scales` and `offsets`, 16 lanes a run.
    unsafe fn scales(
        base: *const u8,
        rows: __m512i,
        mask: __mmask16,
        scales: *mut f32,
        offsets: *mut f32,
    );
}

/// [`Panel::fill`] for one format.
///
/// # Safety
/// As [`Panel::fill`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
unsafe fn unpack_panel<F: Unpack>(p: &mut Panel, w: &[u8], row_bytes: usize, cols: usize) {
    use std::arch::x86_64::*;
    let blocks = row_bytes / F::BYTES;
    let runs = blocks * F::WEIGHTS / F::RUN;
    assert!(
        (1..=PANEL).contains(&cols)
            && row_bytes == blocks * F::BYTES
            && w.len() >= cols * row_bytes
            && p.packed.len() >= blocks * F::WEIGHTS * PANEL
            && p.scales.len() >= runs * PANEL
            && p.offsets.len() >= runs * PANEL
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
    // The next panel's rows (the next 16 · row_bytes bytes), a share of their lines a block,
    // so that they arrive while this panel is unpacked and multiplied: read across sixteen
    // rows a block at a time, the bytes do not form the streams the hardware prefetchers
    // follow.
    let next = w.as_ptr().wrapping_add(PANEL * row_bytes);
    let lines = (PANEL * row_bytes).div_ceil(64);
    for b in 0..blocks {
        let base = w.as_ptr().add(b * F::BYTES);
        for line in b * lines / blocks..(b + 1) * lines / blocks {
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(64 * line) as *const i8);
        }
        let run = b * F::WEIGHTS / F::RUN;
        F::scales(
            base,
            rows,
            mask,
            p.scales.as_mut_ptr().add(run * PANEL),
            p.offsets.as_mut_ptr().add(run * PANEL),
        );
        for s in 0..F::WEIGHTS / QK {
            let bytes: [__m256i; PANEL] = std::array::from_fn(|c| {
                if c < cols {
                    F::bytes(base.add(c * row_bytes), s)
                } else {
                    _mm256_setzero_si256()
                }
            });
            let groups = p.packed.as_mut_ptr().add((b * F::WEIGHTS + s * QK) * PANEL);
            transpose_groups(&bytes, groups);
        }
    }
}

/// Sixteen rows of 32 bytes (eight groups of four each) into eight 64-byte lines at
/// `groups`: line `g` holds group `g` of every row, row `c` in lane `c`. An 8 × 8 transpose
/// of 32-bit lanes in each 256-bit half (rows 0–7 and 8–15), halves then recombined.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn transpose_groups(rows: &[__m256i; PANEL], groups: *mut u8) {
    use std::arch::x86_64::*;
    let z: [__m512i; 8] = std::array::from_fn(|i| {
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(rows[i]), rows[i + 8])
    });
    // t[2i] and t[2i + 1]: rows 2i and 2i + 1 interleaved (groups 0, 1, 4, 5 and 2, 3, 6, 7).
    let t: [__m512i; 8] = std::array::from_fn(|i| {
        let (a, b) = (z[i & !1], z[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_epi32(a, b)
        } else {
            _mm512_unpackhi_epi32(a, b)
        }
    });
    // u[j]: groups j and j + 4 of rows 0–3 (u[0..4]) or 4–7 (u[4..8]) of each half.
    let u: [__m512i; 8] = std::array::from_fn(|j| {
        let quad = j / 4 * 4;
        let (a, b) = (t[quad + (j % 4) / 2], t[quad + 2 + (j % 4) / 2]);
        if j % 2 == 0 {
            _mm512_unpacklo_epi64(a, b)
        } else {
            _mm512_unpackhi_epi64(a, b)
        }
    });
    // Group g < 4: the low 128 bits of each half of u[g] (rows 0–3, 8–11) and of u[g + 4]
    // (rows 4–7, 12–15); group g + 4 the high 128 bits.
    let low = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
    let high = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
    for g in 0..4 {
        let (a, b) = (u[g], u[g + 4]);
        put_group(groups, g, _mm512_permutex2var_epi64(a, low, b));
        put_group(groups, g + 4, _mm512_permutex2var_epi64(a, high, b));
    }
}

/// The four bytes at `base + at` of every row.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn gather4(base: *const u8, at: usize, rows: __m512i, mask: __mmask16) -> __m512i {
    use std::arch::x86_64::*;
    _mm512_mask_i32gather_epi32::<1>(
        _mm512_setzero_si512(),
        mask,
        rows,
        base.add(at) as *const i32,
    )
}

/// The low (`high` false) or high f16 of each lane, widened.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn f16_lanes(v: __m512i, high: bool) -> __m512 {
    use std::arch::x86_64::*;
    let v = if high { _mm512_srli_epi32(v, 16) } else { v };
    _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v))
}

/// Stores group `g` (64 bytes) at `groups`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn put_group(groups: *mut u8, g: usize, v: __m512i) {
    std::arch::x86_64::_mm512_storeu_si512(groups.add(64 * g) as *mut _, v)
}

/// Stores run `r`'s scales and offsets.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn put_run(scales: *mut f32, offsets: *mut f32, r: usize, s: __m512, o: __m512) {
    use std::arch::x86_64::*;
    _mm512_storeu_ps(scales.add(PANEL * r), s);
    _mm512_storeu_ps(offsets.add(PANEL * r), o);
}

/// Scales `d` and offsets `k · d` of a one-run block.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn put_scaled(scales: *mut f32, offsets: *mut f32, d: __m512, k: f32) {
    use std::arch::x86_64::*;
    put_run(scales, offsets, 0, d, _mm512_mul_ps(d, _mm512_set1_ps(k)));
}

/// The 32 four-bit values of the 16 bytes at `p`: low nibbles (weights 0–15), then high.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn nibbles32(p: *const u8) -> __m256i {
    use std::arch::x86_64::*;
    let q = _mm_loadu_si128(p as *const __m128i);
    let m = _mm_set1_epi8(0xF);
    _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m))
}

/// `v` with 16 added to the bytes whose bit is set in the 32 bits at `p` (the fifth bits).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn with_fifth_bits(v: __m256i, p: *const u8) -> __m256i {
    use std::arch::x86_64::*;
    let qh = u32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)]);
    _mm256_mask_add_epi8(v, qh, v, _mm256_set1_epi8(16))
}

/// The low (`high` false) or high nibbles of the 32 bytes at `p`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn nibbles_at(p: *const u8, high: bool) -> __m256i {
    use std::arch::x86_64::*;
    let q = _mm256_loadu_si256(p as *const __m256i);
    let q = if high { _mm256_srli_epi16(q, 4) } else { q };
    _mm256_and_si256(q, _mm256_set1_epi8(0xF))
}

/// Scale and minimum (six bits each, as f32 lanes) of run `r` (0–7) of a Q4_K or Q5_K
/// super-block, from its 12 bytes of scales gathered as `sc` (ggml's `get_scale_min_k4`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn scale_min_k4(sc: [__m512i; 3], r: usize) -> (__m512, __m512) {
    use std::arch::x86_64::*;
    // Byte i of the twelve, in the low 8 bits of each lane.
    let byte = |i: usize| _mm512_srl_epi32(sc[i / 4], _mm_cvtsi32_si128(8 * (i % 4) as i32));
    let bits = |v: __m512i, m: i32| _mm512_and_si512(v, _mm512_set1_epi32(m));
    let (d, m) = if r < 4 {
        (bits(byte(r), 63), bits(byte(r + 4), 63))
    } else {
        let top = |v: __m512i| _mm512_slli_epi32(bits(_mm512_srli_epi32(v, 6), 3), 4);
        (
            _mm512_or_si512(bits(byte(r + 4), 0xF), top(byte(r - 4))),
            _mm512_or_si512(bits(_mm512_srli_epi32(byte(r + 4), 4), 0xF), top(byte(r))),
        )
    };
    (_mm512_cvtepi32_ps(d), _mm512_cvtepi32_ps(m))
}

/// The scales and offsets of a Q4_K or Q5_K super-block: d, dmin, then 12 bytes of six-bit
/// scales and minimums; run `r`: `d·sc_r·q − dmin·m_r`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn k_scales(
    base: *const u8,
    rows: __m512i,
    mask: __mmask16,
    scales: *mut f32,
    offsets: *mut f32,
) {
    use std::arch::x86_64::*;
    let head = gather4(base, 0, rows, mask);
    let (d, dmin) = (f16_lanes(head, false), f16_lanes(head, true));
    let sc = [4, 8, 12].map(|at| gather4(base, at, rows, mask));
    for r in 0..8 {
        let (s, m) = scale_min_k4(sc, r);
        let o = _mm512_mul_ps(dmin, _mm512_sub_ps(_mm512_setzero_ps(), m));
        put_run(scales, offsets, r, _mm512_mul_ps(d, s), o);
    }
}

/// Declares how a format is unpacked.
macro_rules! unpack {
    ($name:ident, $bytes:expr, $weights:expr, $run:expr,
     bytes |$p:ident, $s:ident| $bytes_body:block
     scales |$base:ident, $rows:ident, $mask:ident, $scales:ident, $offsets:ident| $scales_body:block) => {
        #[cfg(target_arch = "x86_64")]
        struct $name;
        #[cfg(target_arch = "x86_64")]
        impl Unpack for $name {
            const BYTES: usize = $bytes;
            const WEIGHTS: usize = $weights;
            const RUN: usize = $run;
            #[inline(always)]
            #[allow(unused_imports, unused_variables)]
            unsafe fn bytes($p: *const u8, $s: usize) -> __m256i {
                use std::arch::x86_64::*;
                $bytes_body
            }
            #[inline(always)]
            #[allow(unused_imports)]
            unsafe fn scales(
                $base: *const u8,
                $rows: __m512i,
                $mask: __mmask16,
                $scales: *mut f32,
                $offsets: *mut f32,
            ) {
                use std::arch::x86_64::*;
                $scales_body
            }
        }
    };
}

// block_q4_0: d, qs[16]; w = d·(q − 8).
unpack!(Q4_0, 18, 32, 32,
    bytes |p, s| { nibbles32(p.add(2)) }
    scales |base, rows, mask, scales, offsets| {
        put_scaled(scales, offsets, f16_lanes(gather4(base, 0, rows, mask), false), -8.0);
    }
);
// block_q4_1: d, m, qs[16]; w = d·q + m.
unpack!(Q4_1, 20, 32, 32,
    bytes |p, s| { nibbles32(p.add(4)) }
    scales |base, rows, mask, scales, offsets| {
        let head = gather4(base, 0, rows, mask);
        put_run(scales, offsets, 0, f16_lanes(head, false), f16_lanes(head, true));
    }
);
// block_q5_0: d, qh (the fifth bits), qs[16]; w = d·(q − 16).
unpack!(Q5_0, 22, 32, 32,
    bytes |p, s| { with_fifth_bits(nibbles32(p.add(6)), p.add(2)) }
    scales |base, rows, mask, scales, offsets| {
        put_scaled(scales, offsets, f16_lanes(gather4(base, 0, rows, mask), false), -16.0);
    }
);
// block_q5_1: d, m, qh, qs[16]; w = d·q + m.
unpack!(Q5_1, 24, 32, 32,
    bytes |p, s| { with_fifth_bits(nibbles32(p.add(8)), p.add(4)) }
    scales |base, rows, mask, scales, offsets| {
        let head = gather4(base, 0, rows, mask);
        put_run(scales, offsets, 0, f16_lanes(head, false), f16_lanes(head, true));
    }
);
// block_q8_0: d, qs[32] signed; w = d·((q + 128) − 128).
unpack!(Q8_0, 34, 32, 32,
    bytes |p, s| {
        let q = _mm256_loadu_si256(p.add(2) as *const __m256i);
        _mm256_xor_si256(q, _mm256_set1_epi8(-128))
    }
    scales |base, rows, mask, scales, offsets| {
        put_scaled(scales, offsets, f16_lanes(gather4(base, 0, rows, mask), false), -128.0);
    }
);
// block_q4_K: d, dmin, scales[12], qs[128]; runs 2i and 2i + 1 the low and high nibbles of
// bytes 32i..32i + 32 of qs.
unpack!(Q4K, 144, 256, 32,
    bytes |p, s| { nibbles_at(p.add(16 + 32 * (s / 2)), s % 2 == 1) }
    scales |base, rows, mask, scales, offsets| {
        k_scales(base, rows, mask, scales, offsets);
    }
);
// block_q5_K: d, dmin, scales[12], qh[32] (bit s of byte l: run s's weight l), qs[128].
unpack!(Q5K, 176, 256, 32,
    bytes |p, s| {
        let v = nibbles_at(p.add(48 + 32 * (s / 2)), s % 2 == 1);
        let qh = _mm256_loadu_si256(p.add(16) as *const __m256i);
        let bit = _mm256_test_epi8_mask(qh, _mm256_set1_epi8((1u8 << s) as i8));
        _mm256_mask_add_epi8(v, bit, v, _mm256_set1_epi8(16))
    }
    scales |base, rows, mask, scales, offsets| {
        k_scales(base, rows, mask, scales, offsets);
    }
);
// block_q6_K: ql[128], qh[64], scales[16] (signed, one per 16 weights), d; w = d·sc·(q − 32).
// Run 4h + g (32 weights) takes the low (g < 2) or high nibbles of ql[64h + 32(g % 2)..] and
// bits 2g..2g + 2 of qh[32h..].
unpack!(Q6K, 210, 256, 16,
    bytes |p, s| {
        let (h, g) = (s / 4, s % 4);
        let low = nibbles_at(p.add(64 * h + 32 * (g % 2)), g >= 2);
        let qh = _mm256_loadu_si256(p.add(128 + 32 * h) as *const __m256i);
        let two = _mm256_and_si256(
            _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * g as i32)),
            _mm256_set1_epi8(3),
        );
        _mm256_or_si256(low, _mm256_slli_epi16(two, 4))
    }
    scales |base, rows, mask, scales, offsets| {
        // d is the block's last two bytes: read the four that end there.
        let d = f16_lanes(gather4(base, 206, rows, mask), true);
        for i in 0..4 {
            let sc = gather4(base, 192 + 4 * i, rows, mask);
            for t in 0..4 {
                // Byte t of the lane, sign-extended.
                let shifted = _mm512_sll_epi32(sc, _mm_cvtsi32_si128(24 - 8 * t as i32));
                let s = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_srai_epi32(shifted, 24)));
                put_run(scales, offsets, 4 * i + t, s, _mm512_mul_ps(s, _mm512_set1_ps(-32.0)));
            }
        }
    }
);

/// Rows `first..first + rows` of `x` over one interleaved panel: `cols` outputs of each row.
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
    panel: &Panel,
    y: *mut f32,
    ldy: usize,
    cols: usize,
) {
    let mut out = [[0f32; PANEL]; ROWS];
    macro_rules! go {
        ($run:literal) => {
            match rows {
                1 => tile_rows::<1, $run>(x, first, panel, &mut out),
                2 => tile_rows::<2, $run>(x, first, panel, &mut out),
                3 => tile_rows::<3, $run>(x, first, panel, &mut out),
                4 => tile_rows::<4, $run>(x, first, panel, &mut out),
                5 => tile_rows::<5, $run>(x, first, panel, &mut out),
                6 => tile_rows::<6, $run>(x, first, panel, &mut out),
                7 => tile_rows::<7, $run>(x, first, panel, &mut out),
                _ => tile_rows::<8, $run>(x, first, panel, &mut out),
            }
        };
    }
    if x.run == 16 {
        go!(16)
    } else {
        go!(32)
    }
    for (r, o) in out.iter().enumerate().take(rows) {
        std::ptr::copy_nonoverlapping(o.as_ptr(), y.add(r * ldy), cols);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_rows<const R: usize, const RUN: usize>(
    x: &QuantizedRows,
    first: usize,
    panel: &Panel,
    out: &mut [[f32; PANEL]; ROWS],
) {
    use std::arch::x86_64::*;
    let k = x.k;
    let (blocks, runs) = (k / QK, k / RUN);
    assert!(
        x.q.len() >= (first + R) * k
            && x.sum.len() >= (first + R) * runs
            && x.scale.len() >= (first + R) * blocks
            && panel.packed.len() >= k * PANEL
            && panel.scales.len() >= runs * PANEL
            && panel.offsets.len() >= runs * PANEL
            && x.run == RUN
    );
    let (qp, pp) = (x.q.as_ptr().add(first * k), panel.packed.as_ptr());
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..blocks {
        let mut t = [_mm512_setzero_ps(); R];
        for h in 0..QK / RUN {
            let run = b * (QK / RUN) + h;
            let mut sums = [_mm512_setzero_si512(); R];
            for g in run * RUN / 4..(run + 1) * RUN / 4 {
                // SAFETY: group g lies inside the panel, and bytes 4g .. 4g + 4 of each row
                // inside `x`.
                let wv = _mm512_loadu_si512(pp.add(g * 64) as *const _);
                for (r, s) in sums.iter_mut().enumerate() {
                    let four = std::ptr::read_unaligned(qp.add(r * k + 4 * g) as *const i32);
                    *s = _mm512_dpbusd_epi32(*s, wv, _mm512_set1_epi32(four));
                }
            }
            let ws = _mm512_loadu_ps(panel.scales.as_ptr().add(run * PANEL));
            let wo = _mm512_loadu_ps(panel.offsets.as_ptr().add(run * PANEL));
            for (r, (t, s)) in t.iter_mut().zip(&sums).enumerate() {
                let sum = _mm512_set1_ps(*x.sum.get_unchecked((first + r) * runs + run));
                *t = _mm512_fmadd_ps(ws, _mm512_cvtepi32_ps(*s), _mm512_fmadd_ps(wo, sum, *t));
            }
        }
        for (r, (a, t)) in acc.iter_mut().zip(&t).enumerate() {
            let d = _mm512_set1_ps(*x.scale.get_unchecked((first + r) * blocks + b));
            *a = _mm512_fmadd_ps(*t, d, *a);
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        _mm512_storeu_ps(o.as_mut_ptr(), *a);
    }
}

#[cfg(not(target_arch = "x86_64"))]
impl Panel {
    unsafe fn fill(&mut self, _: BlockFormat, _: &[u8], _: usize, _: usize) {
        unreachable!("int8-matmul runs only where available() is true")
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn tile(_: &QuantizedRows, _: usize, _: usize, _: &Panel, _: *mut f32, _: usize, _: usize) {
    unreachable!("int8-matmul runs only where available() is true")
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{__m256i, __m512, __m512i, __mmask16};

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// For every format, against f64 sums of the dequantized weights and the activations as
    /// quantized (the same arithmetic: only summation order differs), and against the f32
    /// product (what quantizing the activations costs), for odd shapes: a partial panel, row
    /// tiles of 8 and a remainder, several panels per task.
    #[test]
    fn matches_the_product_of_the_quantized_activations() {
        if !available() {
            return;
        }
        for dtype in BlockFormat::DTYPES {
            let format = BlockFormat::of(dtype).unwrap();
            let b = format.block_weights();
            for (m, k, n) in [
                (2, b, 1),
                (3, 3 * b, 37),
                (8, 2 * b, 16),
                (11, 5 * b, 70),
                (16, 18 * QK / b * b + b, 33),
            ] {
                let (q, x) = crate::block_matmul::test_data::case(dtype, m, k, n);
                let dense: Vec<f32> = q
                    .dequantize(&Device::Cpu)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let got = matmul(format, &q.data().unwrap(), n, k, &x, m);
                let xq = QuantizedRows::new(&x, m, k, run_of(format));
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
                            "{dtype:?} ({m},{k},{n}) [{r},{c}]: {g} vs {exact}"
                        );
                        assert!(
                            (g - f32_product).abs() <= 0.01 * norm,
                            "{dtype:?} ({m},{k},{n}) [{r},{c}]: {g} vs the f32 product {f32_product}"
                        );
                    }
                }
            }
        }
    }

    /// `block_matmul::matmul` takes this path from [`FROM_ROWS`] up for every format, and
    /// keeps f32 activations below (a lone decode, a few).
    #[test]
    fn batches_and_prefill_take_this_path() {
        use crate::block_matmul::{matmul as block, tiled};
        if !available() {
            return;
        }
        for dtype in BlockFormat::DTYPES {
            let format = BlockFormat::of(dtype).unwrap();
            let (n, k) = (40, format.block_weights() * 2);
            let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
            let bytes = QTensor::quantize(&w, dtype)
                .unwrap()
                .data()
                .unwrap()
                .to_vec();
            for m in [1, FROM_ROWS - 1, FROM_ROWS, 16, 100] {
                let x: Vec<f32> = (0..m * k).map(|i| (i % 17) as f32 * 0.1 - 0.8).collect();
                let want = if m >= FROM_ROWS {
                    matmul(format, &bytes, n, k, &x, m)
                } else {
                    tiled(format, &bytes, n, k, &x, m)
                };
                assert_eq!(
                    block(format, &bytes, n, k, &x, m),
                    want,
                    "{dtype:?}, {m} rows"
                );
            }
        }
    }

    #[test]
    fn quantized_activations_keep_each_block_to_its_largest_value() {
        if !available() {
            return;
        }
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.1).collect();
        let q = QuantizedRows::new(&x, 1, 64, 16);
        for (t, &v) in x.iter().enumerate() {
            let d = q.scale[t / QK];
            assert!(
                (q.value(0, t) - v).abs() <= d / 2.0 + 1e-7,
                "{t}: {} vs {v}",
                q.value(0, t)
            );
        }
        for (j, &sum) in q.sum.iter().enumerate() {
            let want: i32 = q.q[16 * j..16 * (j + 1)]
                .iter()
                .map(|&v| i32::from(v))
                .sum();
            assert_eq!(sum, want as f32, "run {j}");
        }
        let zeros = QuantizedRows::new(&[0.0; 32], 1, 32, 32);
        assert_eq!((zeros.value(0, 5), zeros.sum[0]), (0.0, 0.0));
    }
}
