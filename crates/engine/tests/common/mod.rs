//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use openinfer_core::{FinishReason, SequenceId};
use openinfer_engine::engine::SequenceRequest;
use openinfer_engine::sampling::TokenLogprob;
use openinfer_engine::{Engine, EngineConfig, Finished};

/// `tests/fixtures` at the workspace root.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// What one sequence produced.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub tokens: Vec<u32>,
    pub text: String,
    pub deltas: Vec<String>,
    pub logprobs: Vec<TokenLogprob>,
    pub finished: Option<Finished>,
    pub preemptions: usize,
}

/// A greedy request for `max_new` tokens that ignores eos.
pub fn greedy(id: u64, prompt: &[u32], max_new: u32) -> SequenceRequest {
    let mut r = SequenceRequest::greedy(SequenceId(id), prompt.to_vec(), max_new);
    r.stopping.ignore_eos = true;
    r
}

/// A greedy request per case, with the case's index as its id.
pub fn requests(cases: &[Case]) -> Vec<SequenceRequest> {
    cases
        .iter()
        .enumerate()
        .map(|(i, c)| greedy(i as u64, &c.prompt_ids, c.max_new))
        .collect()
}

/// Steps until no work is left (bounded), collecting every sequence's output. Preempted
/// sequences are resumed from prompt + generated tokens, as the router does.
pub fn drain(
    engine: &mut Engine,
    outcomes: &mut HashMap<u64, Outcome>,
    requests: &HashMap<u64, SequenceRequest>,
) {
    for _ in 0..100_000 {
        if !engine.has_work() {
            return;
        }
        step_once(engine, outcomes, requests);
    }
    panic!("engine did not finish");
}

/// One step, recording outputs and resuming preempted sequences.
pub fn step_once(
    engine: &mut Engine,
    outcomes: &mut HashMap<u64, Outcome>,
    requests: &HashMap<u64, SequenceRequest>,
) {
    let out = engine.step().expect("step");
    for t in out.tokens {
        let o = outcomes.entry(t.id.0).or_default();
        o.tokens.push(t.token);
        o.text.push_str(&t.text);
        o.deltas.push(t.text);
        o.logprobs.extend(t.logprob);
    }
    for f in out.finished {
        let o = outcomes.entry(f.id.0).or_default();
        if f.reason == FinishReason::Preempted {
            o.preemptions += 1;
            let mut req = requests[&f.id.0].clone();
            req.generated = o.tokens.clone();
            req.emitted_text_bytes = o.text.len();
            engine.add(req).expect("resume");
        } else {
            o.finished = Some(f);
        }
    }
}

/// Adds every request, then drains.
pub fn run_all(engine: &mut Engine, reqs: Vec<SequenceRequest>) -> HashMap<u64, Outcome> {
    let map: HashMap<u64, SequenceRequest> = reqs.iter().map(|r| (r.id.0, r.clone())).collect();
    for r in reqs {
        engine.add(r).expect("add");
    }
    let mut out = HashMap::new();
    drain(engine, &mut out, &map);
    out
}

/// Loads a model directory on CPU in f32 with `cfg`'s limits.
pub fn load(dir: &Path, cfg: EngineConfig) -> Engine {
    Engine::load(dir, cfg, &|_, _| {}).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

pub use openinfer_engine::reference::Case;

/// Every fixture model with its cases: (name, directory, cases), by name.
pub fn models() -> Vec<(String, PathBuf, Vec<Case>)> {
    let out: Vec<(String, PathBuf, Vec<Case>)> = openinfer_engine::reference::read_all(&fixtures())
        .expect("tests/fixtures/expected holds the references")
        .into_iter()
        .map(|r| (r.model, r.dir, r.cases))
        .collect();
    assert!(
        out.len() >= 7,
        "expected fixtures for llama, llama2, llama3, llama3.2, mistral, qwen2 and qwen3, found {}",
        out.len()
    );
    out
}
