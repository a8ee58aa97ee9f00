//! `y = x · Wᵀ` on CPU with weights packed once at load time.
//!
//! A general GEMM packs the weight matrix on every call: for decode (a few rows of `x`) that
//! triples the memory traffic of a step bound by reading the weights, and for prefill it is a
//! sizeable share of the time. Here `W` (`[n, k]`, the HF layout) is packed once into panels of
//! [`NR`] output columns (`[panel][k][NR]`), so every call streams the weights sequentially
//! and a 6×16 register tile (12 FMAs per 8 loads with AVX2 + FMA, checked at run time) does the
//! arithmetic. Panels are shared out among threads; each writes its own output columns.
//! With AVX-512, panels go in pairs under 14-row tiles; from 15 rows of `x` up (batched decode,
//! prefill) a pair is taken [`BLOCK_STEPS`] steps of `k` at a time, so that only the first
//! tile of rows reads a block from memory and the others find it in the first-level cache.
//!
//! Panels hold f32, bf16 or f16 values ([`PanelElem`]): half-precision weights stay half
//! precision in memory (half the bytes a step reads) and are widened to f32 in registers, so
//! products accumulate in f32.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape};
use half::{bf16, f16};
use rayon::prelude::*;

/// Output columns per panel (two AVX vectors).
pub const NR: usize = 16;
/// Rows of `x` per register tile.
pub const MR: usize = 6;
/// Most rows of `x` per AVX-512 register tile, which spans two panels: 28 accumulators, a
/// vector of each panel and a broadcast row value fill the 32 registers. Up to 14 rows take
/// one pass over the weights (with 8 a tile, 12 rows took two, about 7 % slower); more are cut
/// into tiles of equal height ([`pair_blocked`]).
const MR_WIDE: usize = 14;

/// `$body` with the const `$r` set to `$rows` (1 to [`MR_WIDE`]; more is [`MR_WIDE`]): one
/// monomorphized kernel per tile height.
macro_rules! by_rows {
    ($rows:expr, $r:ident => $body:expr) => {
        by_rows!(@arms $rows, $r, $body, 1 2 3 4 5 6 7 8 9 10 11 12 13)
    };
    (@arms $rows:expr, $r:ident, $body:expr, $($n:literal)*) => {
        match $rows {
            $($n => {
                const $r: usize = $n;
                $body
            })*
            _ => {
                const $r: usize = MR_WIDE;
                $body
            }
        }
    };
}

/// True when the two-panel AVX-512 tile can run here.
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A value a panel can hold: widened to f32 for the arithmetic.
pub trait PanelElem: Copy + Send + Sync + 'static {
    /// Zero, for the padding of the last panel.
    const ZERO: Self;
    /// The value as f32.
    fn to_f32(self) -> f32;
    /// Eight consecutive values widened to f32 (the caller has AVX2 and F16C).
    ///
    /// # Safety
    /// `p` must be valid for eight reads.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// Sixteen consecutive values widened to f32 (the caller has AVX-512F).
    ///
    /// # Safety
    /// `p` must be valid for sixteen reads.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
    /// The lanes of `m` of [`load16`](Self::load16), zero elsewhere; reads only those lanes
    /// (the caller has AVX-512F, BW and VL).
    ///
    /// # Safety
    /// `p` must be valid for reads of the lanes `m` holds.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16_masked(
        p: *const Self,
        m: std::arch::x86_64::__mmask16,
    ) -> std::arch::x86_64::__m512;
}

impl PanelElem for f32 {
    const ZERO: Self = 0.0;
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_masked(
        p: *const Self,
        m: std::arch::x86_64::__mmask16,
    ) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_maskz_loadu_ps(m, p)
    }
}

impl PanelElem for bf16 {
    const ZERO: Self = bf16::ZERO;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // bf16 is the top half of an f32: widen to 32 bits and shift into place.
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_masked(
        p: *const Self,
        m: std::arch::x86_64::__mmask16,
    ) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let h = _mm256_maskz_loadu_epi16(m, p as *const i16);
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
    }
}

impl PanelElem for f16 {
    const ZERO: Self = f16::ZERO;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_masked(
        p: *const Self,
        m: std::arch::x86_64::__mmask16,
    ) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p as *const i16))
    }
}

/// Panels in the weight's own precision.
enum Panels {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

/// A weight matrix `[n, k]` packed into `[n / NR][k][NR]` panels (the last one zero-padded),
/// in f32, bf16 or f16.
pub struct PackedWeight {
    data: Panels,
    n: usize,
    k: usize,
}

/// `w` (row-major `[n, k]`) as panels.
fn pack_panels<T: PanelElem>(w: &[T], n: usize, k: usize) -> Vec<T> {
    assert_eq!(
        w.len(),
        n * k,
        "packed-matmul: weight has {} values, not {n}×{k}",
        w.len()
    );
    let panels = n.div_ceil(NR);
    let mut data = vec![T::ZERO; panels * k * NR];
    data.par_chunks_mut(k * NR)
        .enumerate()
        .for_each(|(p, panel)| {
            for j in 0..NR.min(n - p * NR) {
                for (t, &v) in w[(p * NR + j) * k..][..k].iter().enumerate() {
                    panel[t * NR + j] = v;
                }
            }
        });
    data
}

impl PackedWeight {
    /// Packs `w`, row-major `[n, k]`.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        PackedWeight {
            data: Panels::F32(pack_panels(w, n, k)),
            n,
            k,
        }
    }

    /// Packs bf16 `w`, row-major `[n, k]`, keeping bf16.
    pub fn pack_bf16(w: &[bf16], n: usize, k: usize) -> Self {
        PackedWeight {
            data: Panels::Bf16(pack_panels(w, n, k)),
            n,
            k,
        }
    }

    /// Packs f16 `w`, row-major `[n, k]`, keeping f16.
    pub fn pack_f16(w: &[f16], n: usize, k: usize) -> Self {
        PackedWeight {
            data: Panels::F16(pack_panels(w, n, k)),
            n,
            k,
        }
    }

    /// The precision the panels hold.
    pub fn dtype(&self) -> DType {
        match self.data {
            Panels::F32(_) => DType::F32,
            Panels::Bf16(_) => DType::BF16,
            Panels::F16(_) => DType::F16,
        }
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
        match &self.data {
            Panels::F32(d) => self.matmul_panels(d, x, m),
            Panels::Bf16(d) => self.matmul_panels(d, x, m),
            Panels::F16(d) => self.matmul_panels(d, x, m),
        }
    }

    fn matmul_panels<T: PanelElem>(&self, data: &[T], x: &[f32], m: usize) -> Vec<f32> {
        product(&Stored { data, k: self.k }, self.n, self.k, x, m)
    }
}

/// `x [m, k] · Wᵀ` → `[m, n]` row-major, for the f32 matrix `W` `[n, k]` whose row `r`
/// `fill(r, row)` writes: for weights kept in another format. Each task widens the rows of
/// one or two panels into a scratch panel, which stays in cache while every row of `x` passes
/// over it, so the matrix is widened once a call and never written out whole.
pub fn widened_matmul(
    n: usize,
    k: usize,
    fill: impl Fn(usize, &mut [f32]) + Sync,
    x: &[f32],
    m: usize,
) -> Vec<f32> {
    product(&Widened { fill, n, k }, n, k, x, m)
}

/// Where a product's panels come from.
trait PanelSource: Sync {
    type Elem: PanelElem;
    /// Panels `first..first + count` (`count · k · NR` values), widened into `scratch` when
    /// they are not stored as panels.
    fn panels<'a>(
        &'a self,
        first: usize,
        count: usize,
        scratch: &'a mut Scratch,
    ) -> &'a [Self::Elem];
    /// Where panel `first` lies in memory when it is stored (to prefetch it), else null.
    fn stored(&self, _first: usize) -> *const Self::Elem {
        std::ptr::null()
    }
}

/// A task's working memory for [`Widened`] panels.
#[derive(Default)]
struct Scratch {
    /// The panels handed out.
    panels: Vec<f32>,
    /// One panel's rows, row-major `[NR, k]`.
    rows: Vec<f32>,
}

/// `rows` (row-major `[NR, k]`) as one panel `[k][NR]`.
fn rows_to_panel(rows: &[f32], k: usize, panel: &mut [f32]) {
    assert!(rows.len() >= NR * k && panel.len() >= k * NR);
    let mut t = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() {
            while t + NR <= k {
                // SAFETY: AVX-512F is present; columns t..t+16 of every row lie inside `rows`,
                // and rows t..t+16 of the panel inside `panel`.
                unsafe {
                    transpose16_avx512(rows.as_ptr().add(t), k, panel.as_mut_ptr().add(t * NR))
                };
                t += NR;
            }
        }
    }
    for t in t..k {
        for j in 0..NR {
            panel[t * NR + j] = rows[j * k + t];
        }
    }
}

/// The 16×16 block at `src` (rows `stride` apart) transposed into `dst` (rows 16 apart).
///
/// # Safety
/// AVX-512F is present; `src` is valid for 16 reads on each of 16 rows, `dst` for 256 writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16_avx512(src: *const f32, stride: usize, dst: *mut f32) {
    use std::arch::x86_64::*;
    let mut r = [_mm512_setzero_ps(); 16];
    for (i, r) in r.iter_mut().enumerate() {
        *r = _mm512_loadu_ps(src.add(i * stride));
    }
    // Pairs of rows interleaved, then pairs of pairs, then 128-bit lanes twice: after the
    // last step vector i holds column i.
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for i in 0..4 {
        let (a, b, c, d) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
        r[4 * i] = _mm512_shuffle_ps::<0x44>(a, c);
        r[4 * i + 1] = _mm512_shuffle_ps::<0xEE>(a, c);
        r[4 * i + 2] = _mm512_shuffle_ps::<0x44>(b, d);
        r[4 * i + 3] = _mm512_shuffle_ps::<0xEE>(b, d);
    }
    for h in 0..2 {
        for i in 0..4 {
            t[8 * h + i] = _mm512_shuffle_f32x4::<0x88>(r[8 * h + i], r[8 * h + i + 4]);
            t[8 * h + i + 4] = _mm512_shuffle_f32x4::<0xDD>(r[8 * h + i], r[8 * h + i + 4]);
        }
    }
    for i in 0..8 {
        r[i] = _mm512_shuffle_f32x4::<0x88>(t[i], t[i + 8]);
        r[i + 8] = _mm512_shuffle_f32x4::<0xDD>(t[i], t[i + 8]);
    }
    for (i, r) in r.iter().enumerate() {
        _mm512_storeu_ps(dst.add(i * 16), *r);
    }
}

/// Panels packed at load.
struct Stored<'a, T> {
    data: &'a [T],
    k: usize,
}

impl<T: PanelElem> PanelSource for Stored<'_, T> {
    type Elem = T;
    fn panels<'a>(&'a self, first: usize, count: usize, _: &'a mut Scratch) -> &'a [T] {
        &self.data[first * self.k * NR..(first + count) * self.k * NR]
    }
    fn stored(&self, first: usize) -> *const T {
        self.data[first * self.k * NR..].as_ptr()
    }
}

/// Panels widened from rows for the call.
struct Widened<F> {
    fill: F,
    n: usize,
    k: usize,
}

impl<F: Fn(usize, &mut [f32]) + Sync> PanelSource for Widened<F> {
    type Elem = f32;
    fn panels<'a>(&'a self, first: usize, count: usize, s: &'a mut Scratch) -> &'a [f32] {
        let k = self.k;
        s.panels.resize(count * k * NR, 0.0);
        s.rows.resize(NR * k, 0.0);
        for (p, panel) in s.panels.chunks_exact_mut(k * NR).enumerate() {
            let base = (first + p) * NR;
            let real = NR.min(self.n.saturating_sub(base));
            for (j, row) in s.rows.chunks_exact_mut(k).enumerate() {
                if j < real {
                    (self.fill)(base + j, row);
                } else {
                    row.fill(0.0);
                }
            }
            rows_to_panel(&s.rows, k, panel);
        }
        &s.panels
    }
}

/// The product of `x` `[m, k]` with the `[n, k]` matrix `src` holds as panels.
fn product<S: PanelSource>(src: &S, n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    assert!(
        x.len() >= m * k,
        "packed-matmul: x has {} values, not {m}×{k}",
        x.len()
    );
    // Every value is written below (each task its columns of every row), so never zeroed.
    let mut y = Vec::with_capacity(m * n);
    let out = SharedOut(y.spare_capacity_mut().as_mut_ptr() as *mut f32);
    let panels = n.div_ceil(NR);
    let wide = has_avx512();
    // From two tiles of rows up, a pair of panels is taken a block of steps at a time.
    let blocked = wide && m > MR_WIDE;
    // Ranges of panels shrinking as the product ends, so the threads finish together; pairs
    // where the AVX-512 tile takes two, and at least [`MIN_TASK_PANELS`] (a range prefetches
    // its next pair along the way).
    crate::guided::for_each_range(
        panels,
        MIN_TASK_PANELS,
        if wide { 2 } else { 1 },
        || (Scratch::default(), Vec::new()),
        |(scratch, sums), range| {
            let (first, count) = (range.start, range.len());
            let mut q = 0;
            while q < count {
                let col = (first + q) * NR;
                let pair = wide && q + 1 < count;
                let (width, step, held) = if pair {
                    (2 * NR, MR_WIDE, 2)
                } else {
                    (NR, MR, 1)
                };
                let cols = width.min(n - col);
                let data = src.panels(first + q, held, scratch);
                let panel = |h: usize| &data[h * k * NR..(h + 1) * k * NR];
                // The task's next pair of stored panels, fetched during the last tile of rows
                // of this one: that tile reads this pair from cache, so the memory would
                // otherwise idle while it computes (batched decode reads every weight once
                // per step and has only a tile or two of rows).
                let next = if pair && q + 3 < count {
                    src.stored(first + q + 2)
                } else {
                    std::ptr::null()
                };
                if pair && blocked {
                    // SAFETY: rows 0..m and columns col..col+cols lie inside `x` and `y`, and
                    // only this task writes these columns.
                    unsafe {
                        pair_blocked(
                            x,
                            k,
                            m,
                            panel(0),
                            panel(1),
                            next,
                            sums,
                            out.ptr().add(col),
                            n,
                            cols,
                        )
                    };
                    q += held;
                    continue;
                }
                let mut i = 0;
                while i < m {
                    let rows = step.min(m - i);
                    let ahead = if i + rows == m {
                        next
                    } else {
                        std::ptr::null()
                    };
                    let (xs, y) = (&x[i * k..(i + rows) * k], unsafe {
                        // SAFETY: row i and column col lie inside `y` (m × n).
                        out.ptr().add(i * n + col)
                    });
                    // SAFETY: rows i..i+rows and columns col..col+cols lie inside `x` and `y`,
                    // and only this task writes these columns.
                    unsafe {
                        if pair {
                            tile_pair(xs, k, panel(0), panel(1), ahead, y, n, rows, cols)
                        } else {
                            tile(xs, k, panel(0), y, n, rows, cols)
                        }
                    };
                    i += rows;
                }
                q += held;
            }
        },
    );
    // SAFETY: the tasks wrote all m × n values.
    unsafe { y.set_len(m * n) };
    y
}

/// A raw pointer that tasks writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: every task writes a disjoint set of columns.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// One `rows × NR` tile of `y` (only `cols` columns are stored).
///
/// # Safety
/// `y` must be valid for `rows` rows of stride `ldy` and `cols` columns, written by no one else.
unsafe fn tile<T: PanelElem>(
    x: &[f32],
    k: usize,
    panel: &[T],
    y: *mut f32,
    ldy: usize,
    rows: usize,
    cols: usize,
) {
    let mut acc = [[0f32; NR]; MR];
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            match rows {
                1 => tile_avx2::<T, 1>(x, k, panel, &mut acc),
                2 => tile_avx2::<T, 2>(x, k, panel, &mut acc),
                3 => tile_avx2::<T, 3>(x, k, panel, &mut acc),
                4 => tile_avx2::<T, 4>(x, k, panel, &mut acc),
                5 => tile_avx2::<T, 5>(x, k, panel, &mut acc),
                _ => tile_avx2::<T, 6>(x, k, panel, &mut acc),
            }
            store(&acc, y, ldy, rows, cols);
            return;
        }
    }
    for (r, acc) in acc.iter_mut().enumerate().take(rows) {
        for t in 0..k {
            let a = x[r * k + t];
            for (j, v) in acc.iter_mut().enumerate() {
                *v += a * panel[t * NR + j].to_f32();
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
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<T: PanelElem, const R: usize>(
    x: &[f32],
    k: usize,
    panel: &[T],
    out: &mut [[f32; NR]; MR],
) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() >= R * k && panel.len() >= k * NR);
    let (xp, wp) = (x.as_ptr(), panel.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for t in 0..k {
        // SAFETY: t < k, so both panel loads and every x read stay inside the slices.
        let (w0, w1) = (T::load8(wp.add(t * NR)), T::load8(wp.add(t * NR + 8)));
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

/// One `rows × 2·NR` tile of `y` over two adjacent panels (only `cols` columns are stored),
/// with AVX-512: one 16-wide vector of each panel per step of `k`, every row of `x`
/// broadcast against both. Unless `ahead` is null, the two panels from there are prefetched
/// into the second-level cache along the way.
///
/// # Safety
/// As [`tile`], and the CPU has AVX-512F ([`has_avx512`]).
#[allow(clippy::too_many_arguments)]
unsafe fn tile_pair<T: PanelElem>(
    x: &[f32],
    k: usize,
    a: &[T],
    b: &[T],
    ahead: *const T,
    y: *mut f32,
    ldy: usize,
    rows: usize,
    cols: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::_MM_HINT_T1;
        debug_assert!(x.len() >= rows * k && a.len() >= k * NR && b.len() >= k * NR);
        if rows == 1 {
            let mut one = [0f32; 2 * NR];
            vec_pair_avx512::<T>(x, k, a, b, &mut one);
            store_row(&one, y, cols);
            return;
        }
        let mut acc = [[0f32; 2 * NR]; MR_WIDE];
        let (xp, ap, bp, next_b) = (
            x.as_ptr(),
            a.as_ptr(),
            b.as_ptr(),
            ahead.wrapping_add(k * NR),
        );
        // All of `k` as one block, prefetching the two panels from `ahead` into the
        // second-level cache.
        macro_rules! go {
            ($pf:expr) => {
                by_rows!(rows, R => pair_block_avx512::<T, R, $pf, _MM_HINT_T1>(
                    xp, k, k, ap, bp, ahead, next_b, &mut acc, false,
                ))
            };
        }
        if ahead.is_null() {
            go!(false)
        } else {
            go!(true)
        }
        for (r, acc) in acc.iter().enumerate().take(rows) {
            store_row(acc, y.add(r * ldy), cols);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, k, a, b, y, ldy, rows, cols);
        unreachable!("tile_pair runs only where has_avx512() is true");
    }
}

/// The first `cols` of a row of a two-panel tile's sums, stored at `y`: a copy of constant
/// length where the pair is whole, so that it compiles to two vector moves, not a call.
///
/// # Safety
/// `y` is valid for `cols` (at most `2 · NR`) writes.
#[inline(always)]
unsafe fn store_row(acc: &[f32; 2 * NR], y: *mut f32, cols: usize) {
    if cols == 2 * NR {
        std::ptr::copy_nonoverlapping(acc.as_ptr(), y, 2 * NR);
    } else {
        std::ptr::copy_nonoverlapping(acc.as_ptr(), y, cols);
    }
}

/// The fewest panels a thread takes at a time (but the last range).
const MIN_TASK_PANELS: usize = 4;

/// Steps of `k` a [`pair_blocked`] block takes: both panels' part of it (16 KB in f32) stays in
/// the first-level cache while every tile of rows passes over it.
const BLOCK_STEPS: usize = 128;

/// `m` (more than [`MR_WIDE`]) rows of `x` over a pair of panels, in blocks of [`BLOCK_STEPS`] steps of
/// `k`: the first tile of rows streams a block from memory, the others read it from the
/// first-level cache, and the last prefetches the next block (the next pair's first one after
/// the last, from `next` unless null), so the memory never idles for a whole pass over the
/// panels. Each tile's running sums wait in `acc` between blocks.
///
/// # Safety
/// As [`tile`], and the CPU has AVX-512F ([`has_avx512`]).
#[allow(clippy::too_many_arguments)]
unsafe fn pair_blocked<T: PanelElem>(
    x: &[f32],
    k: usize,
    m: usize,
    a: &[T],
    b: &[T],
    next: *const T,
    acc: &mut Vec<[[f32; 2 * NR]; MR_WIDE]>,
    y: *mut f32,
    ldy: usize,
    cols: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::_MM_HINT_T0;
        debug_assert!(m > MR_WIDE && x.len() >= m * k);
        // Tiles of equal height (16 rows: two of 8): a short last tile would pass over the
        // block from cache for little arithmetic, and its prefetches of the next block would
        // bunch up (14 + 2 was slower than 8 + 8).
        let tiles = m.div_ceil(MR_WIDE);
        let height = m.div_ceil(tiles);
        // The first block writes every tile's sums without reading them: no need to zero.
        if acc.len() < tiles {
            acc.resize(tiles, [[0.0; 2 * NR]; MR_WIDE]);
        }
        // Only this call's tiles (the buffer may hold more from a call with more rows).
        let acc = &mut acc[..tiles];
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        for t0 in (0..k).step_by(BLOCK_STEPS) {
            let len = BLOCK_STEPS.min(k - t0);
            let (pa, pb) = if t0 + BLOCK_STEPS < k {
                (
                    ap.add((t0 + BLOCK_STEPS) * NR),
                    bp.add((t0 + BLOCK_STEPS) * NR),
                )
            } else if !next.is_null() {
                (next, next.wrapping_add(k * NR))
            } else {
                (std::ptr::null(), std::ptr::null())
            };
            for (h, acc) in acc.iter_mut().enumerate() {
                let rows = height.min(m - h * height);
                let xs = x.as_ptr().add(h * height * k + t0);
                let (wa, wb) = (ap.add(t0 * NR), bp.add(t0 * NR));
                let load = t0 > 0;
                macro_rules! go {
                    ($pf:expr) => {
                        by_rows!(rows, R => pair_block_avx512::<T, R, $pf, _MM_HINT_T0>(
                            xs, k, len, wa, wb, pa, pb, acc, load,
                        ))
                    };
                }
                // The last tile of the block finds it in cache: it fetches the next one.
                if h + 1 == tiles && !pa.is_null() {
                    go!(true)
                } else {
                    go!(false)
                }
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            for (r, acc) in acc
                .iter()
                .enumerate()
                .take(m.saturating_sub(h * height).min(height))
            {
                store_row(acc, y.add((h * height + r) * ldy), cols);
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, k, m, a, b, next, acc, y, ldy, cols);
        unreachable!("pair_blocked runs only where has_avx512() is true");
    }
}

/// `len` steps of `k` from `R` rows of `x` (`ldx` apart) over two panels' rows from `a` and
/// `b`, with AVX-512: one 16-wide vector of each panel per step, every row broadcast against
/// both; added to `out` (read first when `load`). When `PREFETCH`, as many rows of the panels
/// at `pa` and `pb` are prefetched with `HINT` along the way.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn pair_block_avx512<T: PanelElem, const R: usize, const PREFETCH: bool, const HINT: i32>(
    x: *const f32,
    ldx: usize,
    len: usize,
    a: *const T,
    b: *const T,
    pa: *const T,
    pb: *const T,
    out: &mut [[f32; 2 * NR]; MR_WIDE],
    load: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    if load {
        for (r, acc) in acc.iter_mut().enumerate() {
            acc[0] = _mm512_loadu_ps(out[r].as_ptr());
            acc[1] = _mm512_loadu_ps(out[r].as_ptr().add(NR));
        }
    }
    for t in 0..len {
        if PREFETCH {
            // A hint: it reads nothing, so an address past the weights would do no harm.
            _mm_prefetch::<HINT>(pa.wrapping_add(t * NR) as *const i8);
            _mm_prefetch::<HINT>(pb.wrapping_add(t * NR) as *const i8);
        }
        let (w0, w1) = (T::load16(a.add(t * NR)), T::load16(b.add(t * NR)));
        for (r, acc) in acc.iter_mut().enumerate() {
            let v = _mm512_set1_ps(*x.add(r * ldx + t));
            acc[0] = _mm512_fmadd_ps(v, w0, acc[0]);
            acc[1] = _mm512_fmadd_ps(v, w1, acc[1]);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        _mm512_storeu_ps(out[r].as_mut_ptr(), acc[0]);
        _mm512_storeu_ps(out[r].as_mut_ptr().add(NR), acc[1]);
    }
}

/// [`pair_block_avx512`] for one row of `x` (decode): bound by reading the panels, so four
/// steps of `k` at a time go into separate accumulators, which hides the FMA latency that one
/// chain per panel would wait on.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn vec_pair_avx512<T: PanelElem>(
    x: &[f32],
    k: usize,
    a: &[T],
    b: &[T],
    out: &mut [f32; 2 * NR],
) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() >= k && a.len() >= k * NR && b.len() >= k * NR);
    let (xp, ap, bp) = (x.as_ptr(), a.as_ptr(), b.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); 2]; 4];
    let whole = k - k % 4;
    let mut t = 0;
    while t < whole {
        for (u, acc) in acc.iter_mut().enumerate() {
            // SAFETY: t + u < k.
            let v = _mm512_set1_ps(*xp.add(t + u));
            acc[0] = _mm512_fmadd_ps(v, T::load16(ap.add((t + u) * NR)), acc[0]);
            acc[1] = _mm512_fmadd_ps(v, T::load16(bp.add((t + u) * NR)), acc[1]);
        }
        t += 4;
    }
    for t in whole..k {
        let v = _mm512_set1_ps(*xp.add(t));
        acc[0][0] = _mm512_fmadd_ps(v, T::load16(ap.add(t * NR)), acc[0][0]);
        acc[0][1] = _mm512_fmadd_ps(v, T::load16(bp.add(t * NR)), acc[0][1]);
    }
    for (j, o) in out.chunks_exact_mut(NR).enumerate() {
        let sum = _mm512_add_ps(
            _mm512_add_ps(acc[0][j], acc[1][j]),
            _mm512_add_ps(acc[2][j], acc[3][j]),
        );
        _mm512_storeu_ps(o.as_mut_ptr(), sum);
    }
}

/// The custom op: `x` `[m, k]` contiguous f32 → `[m, n]`.
pub struct PackedMatmul<'a>(pub &'a PackedWeight);

impl CustomOp1 for PackedMatmul<'_> {
    fn name(&self) -> &'static str {
        "packed-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = crate::cpu_ops::f32_input(self.name(), s, l)?;
        let (m, k) = l.shape().dims2()?;
        if k != self.0.k {
            candle_core::bail!(
                "packed-matmul: input width {k}, weight expects {}",
                self.0.k
            )
        }
        let y = self.0.matmul(x, m);
        Ok((CpuStorage::F32(y), Shape::from((m, self.0.n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(y: &[f32], x: &[f32], w: &[f32], (m, k, n): (usize, usize, usize), tol: f64) {
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum();
                assert!(
                    (y[i * n + j] as f64 - want).abs() < tol,
                    "({m},{k},{n}) at ({i},{j})"
                );
            }
        }
    }

    #[test]
    fn rows_become_a_panel() {
        for k in [16, 40, 7, 96] {
            let rows: Vec<f32> = (0..NR * k).map(|i| i as f32).collect();
            let mut panel = vec![0f32; k * NR];
            rows_to_panel(&rows, k, &mut panel);
            for t in 0..k {
                for j in 0..NR {
                    assert_eq!(panel[t * NR + j], rows[j * k + t], "k {k}, ({t}, {j})");
                }
            }
        }
    }

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
            // Blocks of steps with a short last one; tiles of equal height: 10 + 10, 8 + 7,
            // 10 + 10 + 9, four of 11.
            (20, 300, 70),
            (15, 130, 64),
            (29, 300, 70),
            (44, 129, 40),
            // One pass of the tallest tile; many ranges of panels shared out.
            (14, 200, 96),
            (9, 129, 64),
            (3, 64, 2000),
        ] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 104729) % 89) as f32 / 89.0 - 0.5)
                .collect();
            let y = PackedWeight::pack(&w, n, k).matmul(&x, m);
            check(&y, &x, &w, (m, k, n), 1e-4);
            // The same matrix widened from rows for the call.
            let y = widened_matmul(n, k, |r, row| row.copy_from_slice(&w[r * k..][..k]), &x, m);
            check(&y, &x, &w, (m, k, n), 1e-4);
            // Half-precision panels: the same product of the rounded weights, summed in f32.
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let rounded: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            let p = PackedWeight::pack_bf16(&wb, n, k);
            assert_eq!(p.dtype(), DType::BF16);
            check(&p.matmul(&x, m), &x, &rounded, (m, k, n), 1e-4);
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let rounded: Vec<f32> = wh.iter().map(|v| v.to_f32()).collect();
            check(
                &PackedWeight::pack_f16(&wh, n, k).matmul(&x, m),
                &x,
                &rounded,
                (m, k, n),
                1e-4,
            );
        }
    }
}
