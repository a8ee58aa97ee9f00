//! Choosing the next token from one row of logits: penalties, temperature, top-k, top-p,
//! min-p, seeded sampling, and log-probabilities of the raw model distribution.

use openinfer_core::SamplingParams;
use rand::{Rng, SeedableRng};

/// Log-probability of a chosen token and, optionally, of the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The chosen token.
    pub token_id: u32,
    /// Its log-probability under the model (before penalties and temperature).
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, best first.
    pub top: Vec<(u32, f32)>,
}

/// The context a choice depends on.
pub struct SampleContext<'a> {
    /// Prompt tokens (for the repetition penalty).
    pub prompt: &'a [u32],
    /// Tokens generated so far (for all penalties and the seed stream).
    pub generated: &'a [u32],
    /// Seed of this sequence's random stream.
    pub seed: u64,
    /// `Some(n)` to return log-probabilities with `n` alternatives.
    pub logprobs: Option<usize>,
}

/// Chooses the next token. `logits` is modified in place.
pub fn sample(
    logits: &mut [f32],
    params: &SamplingParams,
    ctx: &SampleContext<'_>,
) -> (u32, Option<TokenLogprob>) {
    let log_z = ctx.logprobs.map(|_| log_sum_exp(logits));
    let top = match (ctx.logprobs, log_z) {
        (Some(n), Some(z)) if n > 0 => top_n(logits, n)
            .into_iter()
            .map(|(i, l)| (i, l - z))
            .collect(),
        _ => Vec::new(),
    };
    let raw_logprob = |logits_before: f32| log_z.map(|z| logits_before - z);
    let raw: Option<Vec<f32>> = (log_z.is_some()
        && (params.has_penalties() || !params.is_greedy()))
    .then(|| logits.to_vec());

    apply_penalties(logits, params, ctx.prompt, ctx.generated);
    let token = if params.is_greedy() {
        argmax(logits)
    } else {
        let mut rng = rand::rngs::StdRng::seed_from_u64(mix(ctx.seed, ctx.generated.len() as u64));
        sample_filtered(logits, params, rng.random::<f32>())
    };
    let logprob = log_z.map(|_| {
        let l = raw
            .as_ref()
            .map_or(logits[token as usize], |r| r[token as usize]);
        TokenLogprob {
            token_id: token,
            logprob: raw_logprob(l).unwrap_or(f32::NEG_INFINITY),
            top,
        }
    });
    (token, logprob)
}

/// Index of the largest value (the first one on ties; NaN never wins over a number that
/// came before it).
pub fn argmax(xs: &[f32]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        if xs.len() >= 16 && crate::packed_matmul::has_avx512() {
            // SAFETY: AVX-512F is present and `xs` holds at least 16 values.
            return unsafe { argmax_avx512(xs) };
        }
    }
    argmax_from(xs, 0, 0)
}

/// [`argmax`] of `xs[from..]`, starting from the best index `best`, by the plain loop.
fn argmax_from(xs: &[f32], from: usize, best: usize) -> u32 {
    let mut best = best;
    for (i, &x) in xs.iter().enumerate().skip(from) {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// [`argmax`] sixteen lanes at a time: lane `j` keeps the best of values `j, j + 16, ...`
/// (the first on ties, as the plain loop), and the lanes are compared at the end, the lowest
/// index winning ties; the tail goes through the plain loop from there.
///
/// # Safety
/// AVX-512F is present and `xs.len() >= 16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn argmax_avx512(xs: &[f32]) -> u32 {
    use std::arch::x86_64::*;
    // The plain loop never moves off a NaN in first place.
    if xs[0].is_nan() {
        return 0;
    }
    let p = xs.as_ptr();
    // Every lane starts below any number at its first index: a lane whose values are all
    // -inf (or NaN) keeps that index, and loses to every lane holding a number.
    let mut best = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let mut idx = at;
    let step = _mm512_set1_epi32(16);
    let whole = xs.len() - xs.len() % 16;
    for i in (0..whole).step_by(16) {
        let x = _mm512_loadu_ps(p.add(i));
        let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, best);
        best = _mm512_mask_mov_ps(best, gt, x);
        idx = _mm512_mask_mov_epi32(idx, gt, at);
        at = _mm512_add_epi32(at, step);
    }
    let (mut vals, mut ids) = ([0f32; 16], [0u32; 16]);
    _mm512_storeu_ps(vals.as_mut_ptr(), best);
    _mm512_storeu_si512(ids.as_mut_ptr() as *mut _, idx);
    // The plain loop's answer over the lanes' winners: visited in index order, a later one
    // replaces the best only when strictly larger.
    let mut order: [usize; 16] = std::array::from_fn(|j| j);
    order.sort_by_key(|&j| ids[j]);
    let mut win = order[0];
    for &j in &order[1..] {
        if vals[j] > vals[win] {
            win = j;
        }
    }
    argmax_from(xs, whole, ids[win] as usize)
}

fn log_sum_exp(xs: &[f32]) -> f32 {
    let m = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = xs.iter().map(|&x| ((x - m) as f64).exp()).sum();
    m + s.ln() as f32
}

fn top_n(xs: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<(u32, f32)> = xs.iter().enumerate().map(|(i, &x)| (i as u32, x)).collect();
    let n = n.min(idx.len());
    if n < idx.len() {
        idx.select_nth_unstable_by(n, |a, b| b.1.total_cmp(&a.1));
        idx.truncate(n);
    }
    idx.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    idx
}

/// HF repetition penalty over prompt + output, then OpenAI frequency/presence penalties over
/// the output.
fn apply_penalties(logits: &mut [f32], p: &SamplingParams, prompt: &[u32], generated: &[u32]) {
    if !p.has_penalties() {
        return;
    }
    if let Some(r) = p.repetition_penalty.filter(|&r| r != 1.0) {
        let mut seen = std::collections::HashSet::new();
        for &t in prompt.iter().chain(generated) {
            if seen.insert(t) {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / r } else { *l * r };
                }
            }
        }
    }
    let freq = p.frequency_penalty.unwrap_or(0.0);
    let pres = p.presence_penalty.unwrap_or(0.0);
    if freq != 0.0 || pres != 0.0 {
        let mut counts = std::collections::HashMap::<u32, u32>::new();
        for &t in generated {
            *counts.entry(t).or_default() += 1;
        }
        for (t, c) in counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= freq * c as f32 + pres;
            }
        }
    }
}

/// Temperature, top-k, min-p and top-p, then inverse-CDF sampling with `u` in [0, 1).
fn sample_filtered(logits: &[f32], p: &SamplingParams, u: f32) -> u32 {
    let temp = p.temperature.unwrap_or(1.0);
    let k = p
        .top_k
        .filter(|&k| k > 0)
        .map_or(logits.len(), |k| k as usize);
    let mut cand = top_n(logits, k);
    let max = cand[0].1;
    let mut probs: Vec<f64> = cand
        .iter()
        .map(|&(_, l)| (((l - max) / temp) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|x| *x /= total);
    if let Some(min_p) = p.min_p.filter(|&m| m > 0.0) {
        let cut = probs[0] * min_p as f64;
        let keep = probs.iter().take_while(|&&x| x >= cut).count().max(1);
        cand.truncate(keep);
        probs.truncate(keep);
    }
    if let Some(top_p) = p.top_p.filter(|&t| t < 1.0) {
        let mut acc = 0.0;
        let keep = probs
            .iter()
            .position(|&x| {
                acc += x;
                acc >= top_p as f64
            })
            .map_or(probs.len(), |i| i + 1);
        cand.truncate(keep);
        probs.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut target = u as f64 * total;
    for (i, &x) in probs.iter().enumerate() {
        if target < x {
            return cand[i].0;
        }
        target -= x;
    }
    cand[cand.len() - 1].0
}

/// SplitMix64 of `seed` and `step`: each position of a seeded sequence gets its own stream,
/// so the output does not depend on batch mates and a resumed sequence continues identically.
pub fn mix(seed: u64, step: u64) -> u64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_matches_the_plain_loop_on_ties_infinities_nan_and_tails() {
        let mut state = 7u64;
        let mut next = || {
            state = mix(state, 1);
            state
        };
        for len in [1, 15, 16, 17, 31, 32, 33, 100, 257, 49_152] {
            for case in 0..12 {
                let xs: Vec<f32> = (0..len)
                    .map(|_| match (case, next() % 10) {
                        // Few distinct values: ties everywhere.
                        (0..=3, r) => (r % 3) as f32,
                        (4..=5, 0) => f32::NEG_INFINITY,
                        (6..=7, 0) => f32::NAN,
                        (8, _) => f32::NEG_INFINITY,
                        (9, r) if r < 5 => f32::NAN,
                        (9, _) => f32::NEG_INFINITY,
                        _ => (next() % 1000) as f32 / 7.0 - 60.0,
                    })
                    .collect();
                for first in [None, Some(f32::NAN), Some(f32::NEG_INFINITY)] {
                    let mut xs = xs.clone();
                    if let Some(v) = first {
                        xs[0] = v;
                    }
                    assert_eq!(
                        argmax(&xs),
                        argmax_from(&xs, 0, 0),
                        "len {len}, case {case}, first {first:?}: {xs:?}"
                    );
                }
            }
        }
    }

    fn ctx<'a>(generated: &'a [u32], seed: u64) -> SampleContext<'a> {
        SampleContext {
            prompt: &[],
            generated,
            seed,
            logprobs: None,
        }
    }

    fn params(t: f32) -> SamplingParams {
        SamplingParams {
            temperature: Some(t),
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_argmax_and_reports_logprobs() {
        let mut l = vec![0.0, 3.0, 1.0, 2.0];
        let c = SampleContext {
            logprobs: Some(2),
            ..ctx(&[], 0)
        };
        let (t, lp) = sample(&mut l, &SamplingParams::default(), &c);
        assert_eq!(t, 1);
        let lp = lp.unwrap();
        let z = (0f32.exp() + 3f32.exp() + 1f32.exp() + 2f32.exp()).ln();
        assert!((lp.logprob - (3.0 - z)).abs() < 1e-5);
        assert_eq!(lp.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_keeps_the_nucleus() {
        for seed in 0..50 {
            let mut l = vec![1.0, 5.0, 4.9, 0.0];
            let p = SamplingParams {
                top_k: Some(1),
                ..params(1.0)
            };
            assert_eq!(sample(&mut l, &p, &ctx(&[], seed)).0, 1);
            let mut l = vec![0.0, 10.0, 9.0, -5.0];
            let p = SamplingParams {
                top_p: Some(0.5),
                ..params(1.0)
            };
            assert_eq!(
                sample(&mut l, &p, &ctx(&[], seed)).0,
                1,
                "p(1) ≈ 0.73 ≥ 0.5 alone"
            );
            let mut l = vec![0.0, 10.0, 9.9, -5.0];
            let p = SamplingParams {
                min_p: Some(0.5),
                ..params(1.0)
            };
            assert!([1, 2].contains(&sample(&mut l, &p, &ctx(&[], seed)).0));
        }
    }

    #[test]
    fn same_seed_same_choice_and_seeds_differ() {
        let base: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = params(1.0);
        let a: Vec<u32> = (0..20)
            .map(|s| sample(&mut base.clone(), &p, &ctx(&[], s)).0)
            .collect();
        let b: Vec<u32> = (0..20)
            .map(|s| sample(&mut base.clone(), &p, &ctx(&[], s)).0)
            .collect();
        assert_eq!(a, b);
        assert!(
            a.iter().collect::<std::collections::HashSet<_>>().len() > 5,
            "{a:?}"
        );
    }

    #[test]
    fn penalties_move_logits_as_specified() {
        let mut l = vec![2.0, -2.0, 1.0];
        let p = SamplingParams {
            repetition_penalty: Some(2.0),
            ..Default::default()
        };
        apply_penalties(&mut l, &p, &[0], &[1]);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
        let mut l = vec![0.0, 0.0, 0.0];
        let p = SamplingParams {
            frequency_penalty: Some(0.5),
            presence_penalty: Some(1.0),
            ..Default::default()
        };
        apply_penalties(&mut l, &p, &[2], &[1, 1, 0]);
        assert_eq!(l, vec![-1.5, -2.0, 0.0]);
    }

    #[test]
    fn temperature_sampling_follows_the_distribution() {
        // p = softmax([0, ln 3]) = [0.25, 0.75].
        let l = vec![0.0, 3f32.ln()];
        let n = 4000;
        let ones = (0..n)
            .filter(|&s| sample(&mut l.clone(), &params(1.0), &ctx(&[], s)).0 == 1)
            .count();
        let f = ones as f64 / n as f64;
        assert!((f - 0.75).abs() < 0.03, "{f}");
    }
}
