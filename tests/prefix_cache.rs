//! Prefix caching across processes: workers report what their caches hold, and the router
//! places requests that share a prefix on the worker that holds it. Least-busy placement, its
//! peer, spreads the same requests over both workers.

mod common;

use common::prom;
use openinfer_proto::v1 as pb;

fn metric(url: &str, name: &str) -> f64 {
    prom::value(&prom::parse(&prom::get(url)), name, &[("model", "tiny")])
}

/// A system prompt of many blocks, then a question of its own.
fn request(i: usize) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: format!(
            "You are a careful assistant. Answer in one short sentence, cite nothing, and keep \
             to the facts of the question below. Question {i}: what is {i} plus {i}?"
        ),
        max_new_tokens: Some(24),
        ignore_eos: true,
        ..Default::default()
    }
}

/// Sends a warm-up request alone, then `pairs` pairs of concurrent requests sharing its
/// system prompt; returns (worker 1's, worker 2's) prompt tokens and prefix-cache hit tokens,
/// and the cached tokens the answers reported.
async fn run(cache_aware: bool, pairs: usize) -> ([f64; 2], [f64; 2], u32) {
    let (_dir, model) = common::tiny_model();
    let model = model.to_str().unwrap().to_owned();
    let workers: Vec<common::Service> = (0..2)
        .map(|_| {
            common::service(
                "worker",
                &["worker", "--listen", "127.0.0.1:0", "--model", &model],
            )
        })
        .collect();
    let list = format!("{},{}", workers[0].addr, workers[1].addr);
    let aware = cache_aware.to_string();
    let router = common::service(
        "router",
        &[
            "router",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            &list,
            "--cache-aware",
            &aware,
        ],
    );
    let mut client = common::router_client(&router.addr).await;
    common::wait_for_workers(&mut client, 2).await;
    client.generate(request(0)).await.unwrap();
    let mut cached = 0;
    for p in 0..pairs {
        let (mut c1, mut c2) = (client.clone(), client.clone());
        let (a, b) = tokio::join!(
            c1.generate(request(2 * p + 1)),
            c2.generate(request(2 * p + 2)),
        );
        for r in [a, b] {
            cached += r.unwrap().into_inner().usage.unwrap().cached_prompt_tokens;
        }
    }
    let read = |name| {
        [
            metric(&workers[0].metrics, name),
            metric(&workers[1].metrics, name),
        ]
    };
    (
        read("openinfer_worker_prompt_tokens_total"),
        read("openinfer_worker_prefix_cache_hit_tokens_total"),
        cached,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sharing_a_prefix_go_where_it_is_cached() {
    let (prompt, hits, cached) = run(true, 4).await;
    // The warm-up went to one worker; every later request followed its prefix there.
    let (holder, other) = if prompt[0] > 0.0 { (0, 1) } else { (1, 0) };
    assert_eq!(
        prompt[other], 0.0,
        "a request left the worker holding its prefix: {prompt:?}"
    );
    assert!(hits[holder] >= 8.0 * 32.0, "hits {hits:?}");
    assert!(
        cached >= 8 * 32,
        "answers reported {cached} cached prompt tokens"
    );

    // The peer: least-busy placement splits each concurrent pair over both workers, which
    // then compute the shared prefix twice.
    let (prompt, hits, _) = run(false, 4).await;
    assert!(
        prompt[0] > 0.0 && prompt[1] > 0.0,
        "least-busy placement used one worker: {prompt:?}"
    );
    assert!(hits[0] + hits[1] > 0.0);
}
