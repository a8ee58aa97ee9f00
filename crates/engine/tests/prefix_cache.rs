//! With the prefix cache on, every output equals the output with it off, token for token in
//! f32, for every fixture model. The prompts share prefixes of different lengths (whole
//! blocks, and one that ends inside a block). They run one after another (later ones reuse
//! earlier ones' blocks), all at once, and with a KV budget so small that sequences are
//! preempted and resume. Another tenant's salt never reuses a block.

mod common;

use std::collections::HashMap;

use common::*;
use openinfer_engine::engine::SequenceRequest;
use openinfer_engine::{Engine, EngineConfig};

const BLOCK: usize = 4;

fn cfg(prefix_cache: bool, kv_cache_bytes: usize) -> EngineConfig {
    EngineConfig {
        block_size: BLOCK,
        max_batch_tokens: 24,
        kv_cache_bytes,
        prefix_cache,
        ..Default::default()
    }
}

/// Prompts over one shared stem: the stem cut after 2 and 3 whole blocks, after 2 blocks
/// and 3 tokens (inside a block), and whole, each followed by a suffix of its own; the stem
/// alone; and one prompt that shares nothing.
fn prompts(stem_from: &[u32], vocab: u32) -> Vec<Vec<u32>> {
    let stem: Vec<u32> = stem_from
        .iter()
        .copied()
        .cycle()
        .take(6 * BLOCK + 1)
        .collect();
    let suffix = |i: u32| -> Vec<u32> { (0..5).map(|j| (7 + 31 * i + 3 * j) % vocab).collect() };
    let mut out = Vec::new();
    for (i, cut) in [2 * BLOCK, 3 * BLOCK, 2 * BLOCK + 3, stem.len()]
        .into_iter()
        .enumerate()
    {
        let mut p = stem[..cut].to_vec();
        p.extend(suffix(i as u32));
        out.push(p);
    }
    out.push(stem.clone());
    out.push((0..17).map(|j| (101 + 13 * j) % vocab).collect());
    out
}

fn requests(prompts: &[Vec<u32>], salt: &str) -> Vec<SequenceRequest> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut r = greedy(i as u64, p, 8);
            r.cache_salt = salt.into();
            r
        })
        .collect()
}

fn tokens(out: &HashMap<u64, Outcome>) -> Vec<Vec<u32>> {
    (0..out.len() as u64)
        .map(|i| out[&i].tokens.clone())
        .collect()
}

/// Runs the requests one after another on `engine`.
fn one_by_one(engine: &mut Engine, reqs: Vec<SequenceRequest>) -> Vec<Vec<u32>> {
    let mut out = HashMap::new();
    for r in reqs {
        let id = r.id.0;
        out.insert(id, run_all(engine, vec![r]).remove(&id).unwrap());
    }
    tokens(&out)
}

#[test]
fn outputs_with_the_prefix_cache_equal_outputs_without_it() {
    for (model, dir, cases) in models() {
        let vocab = load(&dir, cfg(false, 4 << 20)).info().vocab_size as u32;
        let prompts = prompts(&cases[0].prompt_ids, vocab);
        let reference = one_by_one(&mut load(&dir, cfg(false, 4 << 20)), requests(&prompts, ""));

        // One after another: each reuses what the earlier ones left.
        let mut cached = load(&dir, cfg(true, 4 << 20));
        assert_eq!(
            one_by_one(&mut cached, requests(&prompts, "")),
            reference,
            "{model}: one by one"
        );
        let stats = cached.capacity().prefix_cache;
        assert!(
            stats.hit_tokens >= (2 + 3 + 2 + 6 + 6) as u64 * BLOCK as u64 / 2,
            "{model}: the shared stems were not reused: {stats:?}"
        );
        assert!(stats.hit_tokens < stats.prompt_tokens);

        // All at once, on a warm cache and then again: shared blocks in use by several.
        let out = run_all(&mut cached, requests(&prompts, ""));
        assert_eq!(tokens(&out), reference, "{model}: batched, warm");
        let mut cold = load(&dir, cfg(true, 4 << 20));
        let out = run_all(&mut cold, requests(&prompts, ""));
        assert_eq!(tokens(&out), reference, "{model}: batched, cold");

        // Another tenant's salt reuses nothing.
        let before = cached.capacity().prefix_cache.hit_tokens;
        one_by_one(&mut cached, requests(&prompts[..1], "another tenant"));
        assert_eq!(
            cached.capacity().prefix_cache.hit_tokens,
            before,
            "{model}: a block crossed tenants"
        );

        // A KV budget of a few blocks: sequences are preempted and resume, reusing their own
        // blocks when they are still cached; the output does not change.
        let i = cached.info();
        let block_bytes = openinfer_engine::kv_cache::bytes_per_block(
            i.num_layers,
            i.block_size,
            i.num_kv_heads,
            i.head_dim,
            i.dtype,
        );
        let mut tight = load(&dir, cfg(true, 14 * block_bytes));
        let out = run_all(&mut tight, requests(&prompts, ""));
        assert!(
            out.values().map(|o| o.preemptions).sum::<usize>() > 0,
            "{model}: nothing was preempted; shrink the budget"
        );
        assert_eq!(tokens(&out), reference, "{model}: preempted and resumed");
        assert!(tight.capacity().prefix_cache.evictions > 0);
        // Every block is free once nothing runs, cached or not.
        assert_eq!(
            tight.capacity().free_blocks,
            tight.capacity().total_blocks,
            "{model}"
        );
    }
}
