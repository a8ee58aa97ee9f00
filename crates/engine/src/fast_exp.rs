//! `e^x` without calls or branches, for the kernels that take it on every value (softmax in
//! attention, SiLU in the MLP): glibc's `expf` is a call per value, a tenth or less of what
//! sixteen lanes of [`exp16`] do.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Round-to-nearest with the 1.5·2^23 trick (no call, vectorizes).
const ROUND: f32 = 12_582_912.0;
/// `ln 2` in two parts (Cody and Waite), so that `x - n·ln 2` stays exact.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// At or below this, `exp` gives 0 (e^-87 is near f32's smallest normal).
const EXP_FLOOR: f32 = -87.0;
/// 1/k! for k = 0..=7: enough for `|r| ≤ ln 2 / 2` in f32.
const EXP_C: [f32; 8] = [
    1.0,
    1.0,
    0.5,
    0.166_666_67,
    0.041_666_668,
    0.008_333_334,
    0.001_388_888_9,
    0.000_198_412_7,
];

/// `e^x` for the x ≤ 0 that softmax passes (relative error about 1e-7; 0 at or below -87,
/// and for -inf), without branches or calls: `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, `2^n`
/// built in the exponent bits and `e^r` from its Taylor series. The AVX-512 path computes
/// the same in sixteen lanes.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let clamped = x.max(EXP_FLOOR);
    let n = (clamped * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (clamped - n * LN2_HI) - n * LN2_LO;
    let mut p = EXP_C[7];
    for &c in EXP_C[..7].iter().rev() {
        p = p * r + c;
    }
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x <= EXP_FLOOR {
        0.0
    } else {
        p * scale
    }
}

/// [`exp`] in sixteen lanes.
///
/// # Safety
/// The CPU has AVX-512F and FMA.
#[inline]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
pub(crate) unsafe fn exp16(x: __m512) -> __m512 {
    let floor = _mm512_set1_ps(EXP_FLOOR);
    let c = _mm512_max_ps(x, floor);
    let n = _mm512_sub_ps(
        _mm512_fmadd_ps(
            c,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
            _mm512_set1_ps(ROUND),
        ),
        _mm512_set1_ps(ROUND),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), c);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(EXP_C[7]);
    for &k in EXP_C[..7].iter().rev() {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(k));
    }
    let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_cvtps_epi32(n),
        _mm512_set1_epi32(127),
    ));
    let y = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
    _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, floor), y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_the_standard_library_where_softmax_calls_it() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -90.0 * i as f32 / 200_000.0;
            let (got, want) = (exp(x), x.exp());
            if x > -87.0 {
                worst = worst.max(((got - want) / want).abs());
            } else {
                assert!(got.abs() < 1e-37, "exp({x}) = {got}");
            }
        }
        assert!(worst < 1e-6, "relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }
}
