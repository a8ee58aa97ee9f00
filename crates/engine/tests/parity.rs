//! The engine reproduces the greedy tokens of HF transformers exactly (f32), for every
//! committed fixture model and prompt: alone, batched with the other prompts, with sequences
//! joining mid-run, under chunked prefill and small KV blocks.
//! Fixtures: `tests/fixtures/` (made by `scripts/make_fixtures.py`).

mod common;

use common::*;
use openinfer_core::FinishReason;
use openinfer_engine::EngineConfig;
use std::collections::HashMap;

fn cfg(block_size: usize, max_batch_tokens: usize) -> EngineConfig {
    EngineConfig {
        block_size,
        max_batch_tokens,
        kv_cache_bytes: 16 << 20,
        ..Default::default()
    }
}

fn check(model: &str, label: &str, cases: &[Case], got: &HashMap<u64, Outcome>) {
    for (i, c) in cases.iter().enumerate() {
        let o = &got[&(i as u64)];
        assert_eq!(
            o.tokens, c.expected,
            "{model} case {i} ({label}): tokens differ from HF transformers; finished: {:?}, preemptions {}", o.finished, o.preemptions
        );
        assert_eq!(o.finished.as_ref().unwrap().reason, FinishReason::Length);
    }
}

#[test]
fn every_case_alone_matches_transformers() {
    for (model, dir, cases) in models() {
        let mut engine = load(&dir, cfg(16, 512));
        assert_eq!(engine.info().dtype, candle_core::DType::F32);
        for (i, c) in cases.iter().enumerate() {
            let mut req = greedy(i as u64, &c.prompt_ids, c.max_new);
            req.logprobs = true;
            req.top_logprobs = 3;
            let got = run_all(&mut engine, vec![req]);
            let o = &got[&(i as u64)];
            assert_eq!(
                o.tokens, c.expected,
                "{model} case {i} alone: tokens differ from HF transformers"
            );
            for (j, (lp, want)) in o.logprobs.iter().zip(&c.logprobs).enumerate() {
                assert!(
                    (lp.logprob - want).abs() < 1e-3,
                    "{model} case {i} token {j}: logprob {} vs {want}",
                    lp.logprob
                );
                assert_eq!(lp.top[0].0, lp.token_id, "greedy picks the top-1 token");
            }
            // Streamed deltas add up to the decoded output, also where the random model
            // produces broken UTF-8 sequences.
            let decoded = engine.tokenizer().decode(&c.expected).unwrap();
            assert_eq!(
                o.text, decoded,
                "{model} case {i}: deltas concatenate to the decoded text"
            );
            if let Some(hf_text) = &c.text {
                // The fixture kept special tokens in its text; serving skips them.
                let mut hf_text = hf_text.clone();
                for t in engine
                    .tokenizer()
                    .inner()
                    .get_added_tokens_decoder()
                    .values()
                {
                    if t.special {
                        hf_text = hf_text.replace(&t.content, "");
                    }
                }
                assert_eq!(
                    o.text, hf_text,
                    "{model} case {i}: same text as transformers decodes"
                );
            }
            assert_eq!(
                engine.capacity().free_blocks,
                engine.capacity().total_blocks,
                "{model}: blocks returned"
            );
        }
    }
}

#[test]
fn all_cases_batched_match_transformers() {
    for (model, dir, cases) in models() {
        // Small blocks and a small step budget: multi-block tables and chunked prefill.
        let mut engine = load(&dir, cfg(4, 24));
        let reqs = requests(&cases);
        let got = run_all(&mut engine, reqs);
        check(&model, "batched, chunked prefill", &cases, &got);
    }
}

#[test]
fn sequences_joining_mid_run_match_transformers() {
    for (model, dir, cases) in models() {
        let mut engine = load(&dir, cfg(8, 64));
        let reqs: HashMap<u64, _> = cases
            .iter()
            .enumerate()
            .map(|(i, c)| (i as u64, greedy(i as u64, &c.prompt_ids, c.max_new)))
            .collect();
        let mut out = HashMap::new();
        // A new sequence joins every third step while the others decode.
        for i in 0..cases.len() as u64 {
            engine.add(reqs[&i].clone()).unwrap();
            for _ in 0..3 {
                step_once(&mut engine, &mut out, &reqs);
            }
        }
        drain(&mut engine, &mut out, &reqs);
        check(&model, "staggered joins", &cases, &out);
    }
}

#[test]
fn preemption_and_resume_keep_the_tokens() {
    for (model, dir, cases) in models() {
        // Room for the prompts and little more: the engine must preempt and resume.
        let c = &cases[0];
        let longest = cases
            .iter()
            .map(|c| c.prompt_ids.len() + c.max_new as usize)
            .max()
            .unwrap();
        let tmp = load(&dir, cfg(4, 64));
        let info = tmp.info().clone();
        drop(tmp);
        let per_block = openinfer_engine::kv_cache::bytes_per_block(
            info.num_layers,
            4,
            info.num_kv_heads,
            info.head_dim,
            candle_core::DType::F32,
        );
        // Every prompt fits at once (so all are admitted together) with 3 blocks to spare,
        // and the longest sequence fits alone: the decodes run out of room and preempt.
        let prompts: usize = cases.iter().map(|c| c.prompt_ids.len().div_ceil(4)).sum();
        let blocks = (prompts + 3).max(longest.div_ceil(4) + 3);
        let mut engine = load(
            &dir,
            EngineConfig {
                kv_cache_bytes: per_block * blocks,
                ..cfg(4, 64)
            },
        );
        let reqs = requests(&cases);
        let got = run_all(&mut engine, reqs);
        check(&model, "preempted and resumed", &cases, &got);
        let preempted: usize = got.values().map(|o| o.preemptions).sum();
        assert!(
            preempted > 0,
            "{model}: the tiny cache should force preemption ({} tokens max)",
            c.prompt_ids.len()
        );
        assert_eq!(engine.capacity().free_blocks, blocks);
    }
}
