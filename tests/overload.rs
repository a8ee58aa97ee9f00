//! Clients that push the router past what it can serve, as separate processes on loopback:
//! huge prompts, output nobody reads, oversized messages and deadlines under overload. Each
//! one must meet a clear refusal and leave the router's memory bounded.

mod common;

use std::time::{Duration, Instant};

use common::{router_client, start_router, start_worker, Proc};
use futures::future::join_all;
use openinfer_proto::v1 as pb;
use tonic::Code;

/// A process's resident memory now and at its peak, in bytes (`/proc/PID/status`).
fn memory(proc: &Proc) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{}/status", proc.0.id())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc status"))
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

const MB: u64 = 1 << 20;

/// Waits until `proc`'s resident memory is at most `bound`, or panics with what it was.
async fn until_rss_at_most(proc: &Proc, bound: u64, within: Duration, what: &str) {
    let end = Instant::now() + within;
    loop {
        let (rss, _) = memory(proc);
        if rss <= bound {
            return;
        }
        assert!(
            Instant::now() < end,
            "{what}: resident memory stayed at {} MB, above {} MB",
            rss / MB,
            bound / MB
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Text like a real document, `bytes` long.
fn document(bytes: usize) -> String {
    let words = "the router tokenizes what clients send before it checks the context, \
                 and one large prompt can cost many times its size in memory; ";
    words.repeat(bytes / words.len() + 1)[..bytes].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_four_megabyte_prompts_are_refused_without_the_router_s_memory_blowing_up() {
    let (_dir, model) = common::tiny_model();
    let (_worker, waddr) = start_worker(&model, &[]);
    let (router, addr) = start_router(&[&waddr], &[]);
    let mut client = router_client(&addr).await;
    common::wait_for_workers(&mut client, 1).await;
    // A served request first, so the baseline includes what serving costs.
    let ok = client
        .generate(pb::GenerateRequest {
            prompt: document(2000),
            max_new_tokens: Some(2),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.token_ids.len(), 2);
    let (baseline, _) = memory(&router);

    let prompt = document(4_000_000);
    let started = Instant::now();
    let answers = join_all((0..8).map(|_| {
        let mut client = client.clone();
        let prompt = prompt.clone();
        async move {
            client
                .generate(pb::GenerateRequest {
                    prompt,
                    max_new_tokens: Some(4),
                    ..Default::default()
                })
                .await
        }
    }))
    .await;
    let took = started.elapsed();
    for a in answers {
        let e = a.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().starts_with("prompt:"), "{}", e.message());
    }
    let (_, peak) = memory(&router);
    eprintln!(
        "router resident memory: baseline {} MB, peak {} MB",
        baseline / MB,
        peak / MB
    );
    assert!(
        peak < 300 * MB,
        "eight 4 MB prompts took the router to {} MB (baseline {} MB)",
        peak / MB,
        baseline / MB
    );
    assert!(took < Duration::from_secs(10), "refusing took {took:?}");
    until_rss_at_most(
        &router,
        baseline + 50 * MB,
        Duration::from_secs(10),
        "after the refusals",
    )
    .await;

    // A prompt that may fit is still tokenized and served.
    let ok = client
        .generate(pb::GenerateRequest {
            prompt: document(3000),
            max_new_tokens: Some(2),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.token_ids.len(), 2);
}
