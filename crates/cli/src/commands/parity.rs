//! `openinfer parity`: the engine's greedy outputs against committed HF transformers
//! references (`tests/fixtures/expected/*.json`, made by `scripts/make_fixtures.py`), on any
//! device and dtype. It is how a build is checked on a machine without a Rust toolchain (a GPU
//! host): f32 must give the same tokens; bf16 and f16 are held to a log-probability tolerance
//! over the tokens that match, and their first divergence is reported.

use std::collections::HashMap;

use anyhow::{bail, Context};
use openinfer_core::SequenceId;
use openinfer_engine::reference::{self, Case, Reference};
use openinfer_engine::{DType, Engine, SequenceRequest};
use serde::Serialize;

use crate::args::ParityArgs;

/// One reference case and how the engine did.
#[derive(Serialize)]
struct CaseResult {
    model: String,
    case: usize,
    tokens: usize,
    /// Leading tokens equal to the reference.
    matched: usize,
    /// Largest |logprob - reference| over the matched tokens.
    max_logprob_diff: f32,
    passed: bool,
}

#[derive(Serialize)]
struct Report {
    device: String,
    dtype: String,
    logprob_tolerance: f32,
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

pub fn run(a: ParityArgs) -> anyhow::Result<()> {
    let engine_cfg = super::engine_config(&a.engine)?;
    let mut report = Report {
        device: a.engine.device.clone(),
        dtype: String::new(),
        logprob_tolerance: 0.0,
        cases: Vec::new(),
        passed: true,
    };
    for Reference { model, dir, cases } in reference::read_all(&a.fixtures)? {
        let mut engine = Engine::load(&dir, engine_cfg.clone(), &|_, _| {})
            .with_context(|| format!("cannot load {}", dir.display()))?;
        let dtype = engine.info().dtype;
        let exact = dtype == DType::F32;
        let tolerance = a
            .logprob_tolerance
            .unwrap_or(if exact { 1e-3 } else { 0.5 });
        report.dtype = format!("{dtype:?}").to_lowercase();
        report.logprob_tolerance = tolerance;
        let got = generate(&mut engine, &cases)?;
        for (i, c) in cases.iter().enumerate() {
            let Generated { tokens, logprobs } = got.get(&i).cloned().unwrap_or_default();
            let matched = tokens
                .iter()
                .zip(&c.expected)
                .take_while(|(a, b)| a == b)
                .count();
            let max_diff = logprobs
                .iter()
                .zip(&c.logprobs)
                .take(matched)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            let all = matched == c.expected.len() && tokens.len() == c.expected.len();
            let passed = max_diff <= tolerance && (all || !exact);
            report.passed &= passed;
            println!(
                "{model:<10} case {i}: {matched:>3}/{} tokens as the reference, max |Δ logprob| {max_diff:.5}{}",
                c.expected.len(),
                if passed { "" } else { "  FAILED" }
            );
            report.cases.push(CaseResult {
                model: model.clone(),
                case: i,
                tokens: c.expected.len(),
                matched,
                max_logprob_diff: max_diff,
                passed,
            });
        }
    }
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(
        a.out.join("parity.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!(
        "{} on {} in {}: f32 must match every token; other dtypes are held to |Δ logprob| ≤ {} over the tokens that match",
        if report.passed { "passed" } else { "FAILED" },
        report.device,
        report.dtype,
        report.logprob_tolerance
    );
    if !report.passed {
        bail!(
            "parity failed (see {})",
            a.out.join("parity.json").display()
        );
    }
    Ok(())
}
