//! Tensor parallelism on CPU: a group of 2 or 4 ranks (rank 0's engine plus follower ranks in
//! threads, joined by the TCP ring collective) produces exactly the greedy tokens of HF
//! transformers, as one rank does, for every fixture model whose head counts allow it. Each
//! rank holds about 1/tp of the sharded weights.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use openinfer_engine::tp::cpu::CpuCommunicator;
use openinfer_engine::tp::follower::Follower;
use openinfer_engine::tp::{Communicator, Shard};
use openinfer_engine::{Engine, EngineConfig, ModelDir};

fn cfg() -> EngineConfig {
    EngineConfig {
        block_size: 4,
        max_batch_tokens: 24,
        kv_cache_bytes: 16 << 20,
        ..Default::default()
    }
}

/// `n` ranks joined on loopback, in rank order.
fn group(n: usize) -> Vec<Arc<dyn Communicator>> {
    CpuCommunicator::local_group(n, Duration::from_secs(30))
        .unwrap()
        .into_iter()
        .map(|c| Arc::new(c) as Arc<dyn Communicator>)
        .collect()
}

#[test]
fn tp_2_and_4_produce_the_greedy_tokens_of_tp_1() {
    let mut ran = 0;
    for (model, dir, cases) in models() {
        let whole_bytes = ModelDir::open(&dir).unwrap().weights.total_bytes();
        for tp in [2, 4] {
            let mc = ModelDir::open(&dir).unwrap().config;
            if Shard::new(&mc, 0, tp).is_err() {
                continue;
            }
            let mut comms = group(tp);
            let leader = comms.remove(0);
            let followers: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    let dir = dir.clone();
                    std::thread::spawn(move || {
                        let f =
                            Follower::load(&ModelDir::open(&dir).unwrap(), &cfg(), c, &|_, _| {})
                                .unwrap();
                        let bytes = f.weight_bytes();
                        f.run().map(|()| bytes)
                    })
                })
                .collect();
            let mut engine = Engine::from_model_dir_in_group(
                ModelDir::open(&dir).unwrap(),
                cfg(),
                leader,
                &|_, _| {},
            )
            .unwrap();
            let reqs = requests(&cases);
            let got = run_all(&mut engine, reqs);
            // Again: the prompts' full blocks now come from the prefix cache, which every rank
            // holds in the same blocks.
            let again = run_all(&mut engine, requests(&cases));
            let hit = engine.capacity().prefix_cache.hit_tokens;
            drop(engine); // stops the followers
            assert!(hit > 0, "{model} tp={tp}: the second run reused nothing");
            for (i, c) in cases.iter().enumerate() {
                for (run, out) in [("cold", &got), ("warm", &again)] {
                    assert_eq!(
                        out[&(i as u64)].tokens,
                        c.expected,
                        "{model} tp={tp} case {i} ({run} cache): tokens differ from tp=1 / HF transformers"
                    );
                }
            }
            for f in followers {
                let bytes = f.join().unwrap().unwrap();
                // The shard plus the replicated embeddings, norms and lm_head: well under the
                // whole model, and at least its 1/tp share.
                assert!(
                    bytes < whole_bytes as usize && bytes >= whole_bytes as usize / tp,
                    "{model} tp={tp}: a follower holds {bytes} of {whole_bytes} bytes"
                );
            }
            ran += 1;
        }
    }
    assert!(ran >= 6, "only {ran} (model, tp) pairs ran");
}
