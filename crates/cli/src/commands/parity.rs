//! `openinfer parity`: the engine against committed HF transformers references
//! (`tests/fixtures/expected/*.json`, made by `scripts/make_fixtures.py`), on any device and
//! dtype. It is how a build is checked on a machine without a Rust toolchain (a GPU host).
//!
//! * **f32** must generate the reference's greedy tokens, every one, with log-probabilities
//!   within the tolerance.
//! * **bf16 and f16** are judged teacher-forced: the reference's tokens are fed in, and at
//!   every step the engine's log-probability of the reference token must be within the
//!   tolerance and its own top token must agree with the reference's at least
//!   `--min-agreement` of the steps. (Free-running generation in half precision parts from
//!   the reference at the first near-tie, after which nothing is comparable; it is still run
//!   and its matching prefix reported.)
//!
//! A reference without log-probabilities, or an engine that gives none, fails.

use std::collections::HashMap;

use anyhow::{bail, Context};
use openinfer_core::SequenceId;
use openinfer_engine::model_dir::ModelDir;
use openinfer_engine::reference::{self, Case, Reference};
use openinfer_engine::scoring::{self, NextToken};
use openinfer_engine::{DType, Engine, SequenceRequest};
use serde::Serialize;

use crate::args::ParityArgs;

/// The default bounds of a dtype: largest |Δ logprob| at any step, and the least share of
/// steps whose top token is the reference's. f32 is exact. Half precision is judged
/// teacher-forced; on CPU (half weights, f32 arithmetic) the random-weight fixtures measure
/// up to 0.55 (bf16) and 0.06 (f16) with agreement from 0.875 (bf16) and 1.0 (f16), and a
/// GPU also rounds the activations, so the bounds leave room above those.
fn default_bounds(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::F32 => (1e-3, 1.0),
        DType::F16 => (0.25, 0.9),
        _ => (0.75, 0.8),
    }
}

/// One reference case and how the engine did.
#[derive(Serialize)]
struct CaseResult {
    model: String,
    case: usize,
    tokens: usize,
    /// Leading generated tokens equal to the reference.
    matched: usize,
    /// How the steps were compared: `greedy` (f32) or `teacher-forced`.
    judged: &'static str,
    /// Steps whose top token is the reference's: generated (f32) or teacher-forced.
    agreement: f32,
    /// Largest |logprob - reference| over every compared step (NaN when one was missing).
    max_logprob_diff: f32,
    passed: bool,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    failure: Option<String>,
}

#[derive(Serialize)]
struct Report {
    device: String,
    dtype: String,
    logprob_tolerance: f32,
    min_agreement: f32,
    cases: Vec<CaseResult>,
    passed: bool,
}

/// What one case generated: its tokens and their log-probabilities.
#[derive(Clone, Default)]
struct Generated {
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
}

/// Every case of one model, batched: what each generated, by case.
fn generate(engine: &mut Engine, cases: &[Case]) -> anyhow::Result<HashMap<usize, Generated>> {
    for (i, c) in cases.iter().enumerate() {
        let mut r = SequenceRequest::greedy(SequenceId(i as u64), c.prompt_ids.clone(), c.max_new);
        r.stopping.ignore_eos = true;
        r.logprobs = true;
        engine.add(r)?;
    }
    let mut out: HashMap<usize, Generated> = HashMap::new();
    while engine.has_work() {
        for t in engine.step()?.tokens {
            let e = out.entry(t.id.0 as usize).or_default();
            e.tokens.push(t.token);
            e.logprobs.push(t.logprob.map_or(f32::NAN, |l| l.logprob));
        }
    }
    Ok(out)
}

/// Largest |a - b| over the pairs; NaN when either side is missing or not a number.
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::NAN;
    }
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs())
        .try_fold(0.0f32, |m, d| (!d.is_nan()).then_some(m.max(d)))
        .unwrap_or(f32::NAN)
}

/// How the cases of one dtype are judged (see the module's docs).
struct Judge {
    exact: bool,
    tolerance: f32,
    min_agreement: f32,
}

impl Judge {
    /// One case's result: what `generated` (and, in half precision, the teacher-forced
    /// scores `forced`) show against the reference `c`, and why it failed if it did.
    fn verdict(&self, c: &Case, generated: &Generated, forced: Option<&[NextToken]>) -> CaseResult {
        let n = c.expected.len();
        let matched = generated
            .tokens
            .iter()
            .zip(&c.expected)
            .take_while(|(a, b)| a == b)
            .count();
        let (judged, agreement, diff) = match forced {
            None => (
                "greedy",
                matched as f32 / n.max(1) as f32,
                max_diff(&generated.logprobs, &c.logprobs),
            ),
            Some(f) => {
                let agree = f
                    .iter()
                    .zip(&c.expected)
                    .filter(|(s, t)| s.top == **t)
                    .count();
                let logprobs: Vec<f32> = f.iter().map(|s| s.logprob).collect();
                (
                    "teacher-forced",
                    agree as f32 / n.max(1) as f32,
                    max_diff(&logprobs, &c.logprobs),
                )
            }
        };
        let failure = if c.logprobs.len() != n {
            Some(format!(
                "the reference has {} log-probabilities for {n} tokens; regenerate it with scripts/make_fixtures.py",
                c.logprobs.len()
            ))
        } else if self.exact && (matched != n || generated.tokens.len() != n) {
            Some(format!("{matched} of {n} greedy tokens match"))
        } else if diff.is_nan() {
            Some("the engine gave no log-probability for some step".to_string())
        } else if diff > self.tolerance {
            Some(format!("|Δ logprob| {diff:.5} > {}", self.tolerance))
        } else if !self.exact && agreement < self.min_agreement {
            Some(format!(
                "the top token agrees at {agreement:.3} of the steps < {}",
                self.min_agreement
            ))
        } else {
            None
        };
        CaseResult {
            model: String::new(),
            case: 0,
            tokens: n,
            matched,
            judged,
            agreement,
            max_logprob_diff: diff,
            passed: failure.is_none(),
            failure,
        }
    }
}

pub fn run(a: ParityArgs) -> anyhow::Result<()> {
    let engine_cfg = super::engine_config(&a.engine)?;
    let mut report = Report {
        device: a.engine.device.clone(),
        dtype: String::new(),
        logprob_tolerance: 0.0,
        min_agreement: 0.0,
        cases: Vec::new(),
        passed: true,
    };
    for Reference { model, dir, cases } in reference::read_all(&a.fixtures)? {
        let mut engine = Engine::load(&dir, engine_cfg.clone(), &|_, _| {})
            .with_context(|| format!("cannot load {}", dir.display()))?;
        let dtype = engine.info().dtype;
        let exact = dtype == DType::F32;
        let (tolerance, min_agreement) = default_bounds(dtype);
        let judge = Judge {
            exact,
            tolerance: a.logprob_tolerance.unwrap_or(tolerance),
            min_agreement: a.min_agreement.unwrap_or(min_agreement),
        };
        report.dtype = format!("{dtype:?}").to_lowercase();
        report.logprob_tolerance = judge.tolerance;
        report.min_agreement = judge.min_agreement;
        let got = generate(&mut engine, &cases)?;
        drop(engine);
        let forced = if exact {
            None
        } else {
            let pairs: Vec<(Vec<u32>, Vec<u32>)> = cases
                .iter()
                .map(|c| (c.prompt_ids.clone(), c.expected.clone()))
                .collect();
            let dir =
                ModelDir::open(&dir).with_context(|| format!("cannot open {}", dir.display()))?;
            Some(scoring::teacher_forced(&dir, &engine_cfg, &pairs)?)
        };
        for (i, c) in cases.iter().enumerate() {
            let generated = got.get(&i).cloned().unwrap_or_default();
            let mut r = judge.verdict(c, &generated, forced.as_ref().map(|f| f[i].as_slice()));
            (r.model, r.case) = (model.clone(), i);
            report.passed &= r.passed;
            println!(
                "{model:<10} case {i}: {:>3}/{} generated as the reference, {} agreement {:.3}, max |Δ logprob| {:.5}{}",
                r.matched,
                r.tokens,
                r.judged,
                r.agreement,
                r.max_logprob_diff,
                r.failure.as_ref().map(|f| format!("  FAILED: {f}")).unwrap_or_default()
            );
            report.cases.push(r);
        }
    }
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(
        a.out.join("parity.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!(
        "{} on {} in {}: {}",
        if report.passed { "passed" } else { "FAILED" },
        report.device,
        report.dtype,
        if report.dtype == "f32" {
            format!(
                "every greedy token as the reference, |Δ logprob| ≤ {}",
                report.logprob_tolerance
            )
        } else {
            format!(
                "teacher-forced, |Δ logprob| ≤ {} at every step and the top token agreeing at ≥ {} of them",
                report.logprob_tolerance, report.min_agreement
            )
        }
    );
    if !report.passed {
        bail!(
            "parity failed (see {})",
            a.out.join("parity.json").display()
        );
    }
    Ok(())
}
