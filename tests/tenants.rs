//! Tenants across processes: a router with `--tenants` and a sim worker, driven over loopback.
//! API keys name tenants, caps and quotas refuse with their documented codes before any
//! tokenizing, the file is reloaded while the router serves, and no key reaches a log line.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::prom;
use openinfer_proto::v1 as pb;
use openinfer_proto::v1::inference_client::InferenceClient;
use openinfer_router::tenants::key_sha256;
use tonic::transport::Channel;
use tonic::Code;

/// `hello(max_new)` at `priority`, with `authorization: Bearer <key>` when a key is given.
fn authed(key: Option<&str>, max_new: u32, priority: i32) -> tonic::Request<pb::GenerateRequest> {
    let mut r = tonic::Request::new(pb::GenerateRequest {
        priority,
        ignore_eos: true,
        ..common::hello(max_new)
    });
    if let Some(k) = key {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {k}").parse().unwrap());
    }
    r
}

async fn call(
    c: &mut InferenceClient<Channel>,
    key: Option<&str>,
    max_new: u32,
    priority: i32,
) -> Result<pb::GenerateResponse, tonic::Status> {
    c.generate(authed(key, max_new, priority))
        .await
        .map(|r| r.into_inner())
}

/// Each tenant as a YAML entry: name, key, and extra fields.
fn tenants_yaml(tenants: &[(&str, &str, &str)]) -> String {
    let mut yaml = String::from("tenants:\n");
    for (name, key, extra) in tenants {
        yaml.push_str(&format!(
            "  - name: {name}\n    api_keys_sha256: [\"{}\"]\n",
            key_sha256(key)
        ));
        for line in extra.split(';').filter(|l| !l.is_empty()) {
            yaml.push_str(&format!("    {}\n", line.trim()));
        }
    }
    yaml
}

/// Replaces `path` atomically (a rename, as Kubernetes does with a mounted Secret).
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn metric(url: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    prom::value(&prom::parse(&prom::get(url)), name, labels)
}

const KEYS: [&str; 5] = [
    "sk-capped-0123456789",
    "sk-rpm-0123456789",
    "sk-tpm-0123456789",
    "sk-conc-0123456789",
    "sk-rotated-0123456789",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_caps_and_quotas_hold_and_the_file_reloads_while_serving() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tenants.yaml");
    let [capped, rpm, tpm, conc, rotated] = KEYS;
    let first = tenants_yaml(&[
        ("capped", capped, "max_priority: 5"),
        ("rpm", rpm, "requests_per_minute: 3"),
        ("tpm", tpm, "tokens_per_minute: 40"),
        ("conc", conc, "max_concurrent: 1"),
    ]);
    std::fs::write(&file, &first).unwrap();
    let (_worker, waddr) = common::sim_worker("10ms", &[]);
    let router = common::service(
        "router",
        &[
            "router",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            &waddr,
            "--tenants",
            file.to_str().unwrap(),
        ],
    );
    let mut c = common::router_client(&router.addr).await;
    common::wait_for_workers(&mut c, 1).await;
    let tokenized = || {
        metric(
            &router.metrics,
            "openinfer_router_prompts_tokenized_total",
            &[],
        )
    };

    // Served: a key names its tenant.
    let ok = call(&mut c, Some(capped), 4, 5).await.unwrap();
    assert_eq!(ok.token_ids.len(), 4);
    let before = tokenized();

    // Refusals that cost no tokenizer time.
    let code = |r: Result<pb::GenerateResponse, tonic::Status>| r.unwrap_err();
    let none = code(call(&mut c, None, 4, 0).await);
    assert_eq!(none.code(), Code::Unauthenticated, "{none:?}");
    assert!(none.message().contains("Bearer"), "{}", none.message());
    let wrong = code(call(&mut c, Some("sk-wrong"), 4, 0).await);
    assert_eq!(wrong.code(), Code::Unauthenticated, "{wrong:?}");
    let above = code(call(&mut c, Some(capped), 4, 6).await);
    assert_eq!(above.code(), Code::PermissionDenied, "{above:?}");
    assert!(
        above.message().contains("max_priority of 5"),
        "{}",
        above.message()
    );

    for _ in 0..3 {
        call(&mut c, Some(rpm), 2, 0).await.unwrap();
    }
    let over = code(call(&mut c, Some(rpm), 2, 0).await);
    assert_eq!(over.code(), Code::ResourceExhausted, "{over:?}");
    assert!(
        over.message().contains("requests_per_minute of 3"),
        "{}",
        over.message()
    );
    let pushback: u64 = over
        .metadata()
        .get("grpc-retry-pushback-ms")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60_000).contains(&pushback), "pushback {pushback} ms");
    assert_eq!(
        tokenized(),
        before + 3.0,
        "only the admitted requests were tokenized"
    );

    // Tokens: prompt + max_new_tokens reserved up front; more than the whole quota is a bad
    // request, not a retry.
    call(&mut c, Some(tpm), 30, 0).await.unwrap();
    let over = code(call(&mut c, Some(tpm), 30, 0).await);
    assert_eq!(over.code(), Code::ResourceExhausted, "{over:?}");
    assert!(
        over.message().contains("tokens_per_minute of 40"),
        "{}",
        over.message()
    );
    assert!(over.metadata().get("grpc-retry-pushback-ms").is_some());
    let huge = code(call(&mut c, Some(tpm), 100, 0).await);
    assert_eq!(huge.code(), Code::InvalidArgument, "{huge:?}");
    assert!(
        huge.message().contains("max_new_tokens"),
        "{}",
        huge.message()
    );

    // Concurrency: a second request while one runs is refused; once it ends, one is let in.
    let mut long = c
        .generate_stream(authed(Some(conc), 2000, 0))
        .await
        .unwrap()
        .into_inner();
    long.message().await.unwrap().unwrap();
    let busy = code(call(&mut c, Some(conc), 2, 0).await);
    assert_eq!(busy.code(), Code::ResourceExhausted, "{busy:?}");
    assert!(
        busy.message().contains("max_concurrent"),
        "{}",
        busy.message()
    );
    drop(long);
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = call(&mut c, Some(conc), 2, 0).await {
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(
            Instant::now() < deadline,
            "the cancelled stream never gave its slot back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Counted per tenant, with bounded labels.
    let m = |name, labels: &[(&str, &str)]| metric(&router.metrics, name, labels);
    assert_eq!(
        m(
            "openinfer_router_tenant_requests_total",
            &[("tenant", "rpm"), ("outcome", "success")]
        ),
        3.0
    );
    assert_eq!(
        m(
            "openinfer_router_tenant_requests_total",
            &[("tenant", "rpm"), ("outcome", "refused")]
        ),
        1.0
    );
    assert_eq!(
        m(
            "openinfer_router_auth_failures_total",
            &[("reason", "missing")]
        ),
        1.0
    );
    assert_eq!(
        m(
            "openinfer_router_auth_failures_total",
            &[("reason", "unknown")]
        ),
        1.0
    );
    assert_eq!(
        m(
            "openinfer_router_auth_failures_total",
            &[("reason", "priority_cap")]
        ),
        1.0
    );
    assert_eq!(
        m(
            "openinfer_router_admission_refusals_total",
            &[("model", "sim"), ("reason", "tenant_requests")]
        ),
        1.0
    );
    assert_eq!(
        m(
            "openinfer_router_tenant_tokens_total",
            &[("tenant", "capped"), ("kind", "completion")]
        ),
        4.0
    );

    // Rotation: the file now lists a new key for `capped` and drops the old one.
    replace(
        &file,
        &tenants_yaml(&[
            ("capped", rotated, "max_priority: 5"),
            ("rpm", rpm, "requests_per_minute: 3"),
        ]),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(&mut c, Some(rotated), 2, 0).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the rotated key was never let in"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let old = code(call(&mut c, Some(capped), 2, 0).await);
    assert_eq!(
        old.code(),
        Code::Unauthenticated,
        "the dropped key still works: {old:?}"
    );

    // A broken edit is refused whole; the version in force stays.
    replace(
        &file,
        "tenants:\n  - name: capped\n    api_keys_sha256: [\"not-a-hash\"]\n",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while m(
        "openinfer_router_tenants_reloads_total",
        &[("result", "error")],
    ) < 1.0
    {
        assert!(Instant::now() < deadline, "the broken file was never read");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    call(&mut c, Some(rotated), 2, 0).await.unwrap();

    // The tenant is on the request's log lines; no key is anywhere in the log.
    let log = router.log();
    assert!(
        log.iter().any(|l| l.contains("tenant=\"rpm\"")),
        "no log line names the tenant"
    );
    for key in KEYS.iter().chain(["sk-wrong"].iter()) {
        assert!(
            !log.iter().any(|l| l.contains(key)),
            "a key reached the log"
        );
    }
    let exposition = prom::get(&router.metrics);
    for key in KEYS {
        assert!(!exposition.contains(key) && !exposition.contains(&key_sha256(key)));
    }
}

/// Seconds from sending `hello(max_new)` as `key`'s to its first token.
async fn ttft(mut c: InferenceClient<Channel>, key: &str, max_new: u32) -> f64 {
    let start = Instant::now();
    let mut s = c
        .generate_stream(authed(Some(key), max_new, 0))
        .await
        .unwrap()
        .into_inner();
    let mut first = None;
    while let Some(m) = s.message().await.unwrap() {
        if first.is_none() && !m.token_ids.is_empty() {
            first = Some(start.elapsed().as_secs_f64());
        }
    }
    first.expect("no token")
}

/// The light tenant's p99 time to first token over `n` requests sent `every` apart on
/// average (spread from a quarter to 1.75 of it, so that arrivals fall anywhere in a step).
async fn light_ttft(c: &InferenceClient<Channel>, n: usize, every: Duration) -> f64 {
    let mut tasks = Vec::new();
    for i in 0..n {
        let spread = 0.25 + 1.5 * (i as f64 * 0.618_034).fract();
        tokio::time::sleep(every.mul_f64(spread)).await;
        tasks.push(tokio::spawn(ttft(c.clone(), "sk-light", 4)));
    }
    let mut t: Vec<f64> = Vec::new();
    for task in tasks {
        t.push(task.await.unwrap());
    }
    t.sort_by(f64::total_cmp);
    t[(t.len() * 99).div_ceil(100) - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_light_tenant_keeps_its_time_to_first_token_beside_one_at_ten_times_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tenants.yaml");
    std::fs::write(
        &file,
        tenants_yaml(&[("heavy", "sk-heavy", ""), ("light", "sk-light", "")]),
    )
    .unwrap();
    // Eight slots, 50 ms steps: two-token requests finish four a step, 80 a second.
    let (_worker, waddr) = common::sim_worker("50ms", &["--max-running", "8"]);
    // A level holds 40: the heavy tenant alone overfills it, and must not lock the light one
    // out.
    let (_router, addr) = common::start_router(
        &[&waddr],
        &[
            "--tenants",
            file.to_str().unwrap(),
            "--max-queue-per-priority",
            "40",
        ],
    );
    let c = common::router_client(&addr).await;
    common::wait_for_workers(&mut c.clone(), 1).await;

    // A fifth of capacity: four-token requests at 4 a second use 16 of 80 slot-steps.
    let every = Duration::from_millis(250);
    let alone = light_ttft(&c, 30, every).await;

    // The heavy tenant keeps ten times the worker's slots busy: 80 requests always in flight
    // (refused ones retried after the pushback).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let heavy: Vec<_> = (0..80)
        .map(|_| {
            let (mut c, stop) = (c.clone(), stop.clone());
            tokio::spawn(async move {
                let mut served = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match call(&mut c, Some("sk-heavy"), 2, 0).await {
                        Ok(_) => served += 1,
                        // Refused or shed: back off for the pushback, as gRPC clients do.
                        Err(e) => {
                            let ms = e
                                .metadata()
                                .get("grpc-retry-pushback-ms")
                                .and_then(|v| v.to_str().ok()?.parse().ok())
                                .unwrap_or(100);
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                        }
                    }
                }
                served
            })
        })
        .collect();
    // Until the queue is deep: the heavy tenant alone fills the worker.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let beside = light_ttft(&c, 30, every).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut heavy_served = 0;
    for h in heavy {
        heavy_served += h.await.unwrap();
    }
    eprintln!(
        "light p99 ttft alone {alone:.3}s, beside heavy {beside:.3}s; heavy served {heavy_served}"
    );
    assert!(
        heavy_served > 100,
        "the heavy tenant was barely served: {heavy_served}"
    );
    assert!(
        beside <= 2.0 * alone,
        "the light tenant's p99 time to first token went from {alone:.3}s alone to {beside:.3}s beside the heavy one"
    );
}
