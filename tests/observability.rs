//! Observability across real processes: one OpenTelemetry trace per request, exported over
//! OTLP/gRPC by the router and the workers to a receiver on loopback (joined through the
//! W3C `traceparent`, also across a migration); Prometheus metrics that move as requests are
//! served and pass `promtool check metrics`, and that every dashboard query and alert rule
//! names; JSON logs that carry the trace and request ids.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::etcd::EtcdServer;
use common::otlp::{Receiver, Span};
use common::{bin, prom, router_client, spawn_service, until_workers, worker_client, Service};
use openinfer_proto::v1 as pb;
use openinfer_proto::v1::inference_client::InferenceClient;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// `openinfer ARGS`, exporting spans to `endpoint` (flushed every 100 ms) when given.
fn service(name: &str, args: &[&str], endpoint: Option<&str>, env: &[(&str, &str)]) -> Service {
    let mut cmd = Command::new(bin());
    cmd.args(args).envs(env.iter().copied());
    if let Some(e) = endpoint {
        cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", e)
            .env("OTEL_BSP_SCHEDULE_DELAY", "100");
    }
    spawn_service(name, &mut cmd)
}

fn worker(model: &Path, endpoint: Option<&str>, extra: &[&str], env: &[(&str, &str)]) -> Service {
    let mut args = vec!["worker", "--listen", "127.0.0.1:0", "--model"];
    args.push(model.to_str().unwrap());
    args.extend(extra);
    service("worker", &args, endpoint, env)
}

fn router(workers: &[&str], endpoint: Option<&str>, env: &[(&str, &str)]) -> Service {
    let list = workers.join(",");
    service(
        "router",
        &["router", "--listen", "127.0.0.1:0", "--workers", &list],
        endpoint,
        env,
    )
}

fn request(prompt: &str, max_new: u32, request_id: &str) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: prompt.into(),
        max_new_tokens: Some(max_new),
        ignore_eos: true,
        request_id: request_id.into(),
        ..Default::default()
    }
}

/// `r` with a `traceparent` in its metadata.
fn traced<T>(r: T, traceparent: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(r);
    r.metadata_mut()
        .insert("traceparent", MetadataValue::try_from(traceparent).unwrap());
    r
}

/// The sampled `traceparent` of the test's own client span.
fn client_traceparent() -> String {
    format!("00-{TRACE}-{CLIENT_SPAN}-01")
}

/// A client of router `r` once it sees `workers` workers.
async fn ready_client(r: &Service, workers: u32) -> InferenceClient<Channel> {
    let mut client = router_client(&r.addr).await;
    until_workers(&mut client, workers, Duration::from_secs(30)).await;
    client
}

fn named<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn one<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    let found = named(spans, name);
    assert_eq!(found.len(), 1, "one `{name}` span: {spans:#?}");
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_per_request_joins_the_router_s_and_the_worker_s_spans() {
    let (receiver, endpoint) = Receiver::start().await;
    let (_dir, model) = common::tiny_model();
    let w = worker(&model, Some(&endpoint), &[], &[]);
    let r = router(&[&w.addr], Some(&endpoint), &[]);
    let mut client = ready_client(&r, 1).await;

    // A unary call that continues the client's trace.
    let mut req = request("The quick brown fox", 6, "obs-unary");
    req.temperature = Some(0.5);
    req.seed = Some(7);
    req.priority = 3;
    let parent = client_traceparent();
    let resp = client
        .generate(traced(req, &parent))
        .await
        .unwrap()
        .into_inner();
    let usage = resp.usage.unwrap();
    assert_eq!(usage.completion_tokens, 6);

    // A client that does not record its trace (flags 00): nothing is exported for it.
    let unsampled = "0af7651916cd43dd8448eb211c80319c";
    client
        .generate(traced(
            request("hello", 2, "obs-unsampled"),
            &format!("00-{unsampled}-b7ad6b7169203331-00"),
        ))
        .await
        .unwrap();

    let spans = receiver
        .wait_for(TRACE, |s| {
            [
                "text_completion tiny",
                "validate",
                "queue",
                "dispatch",
                "prefill",
                "decode",
            ]
            .iter()
            .all(|n| s.iter().any(|x| x.name == *n))
        })
        .await;

    // The router's span: named `{operation} {model}`, child of the client's span.
    let root = one(&spans, "text_completion tiny");
    assert_eq!(root.service, "openinfer-router");
    assert_eq!(root.parent_id, CLIENT_SPAN);
    assert_eq!(root.attr("gen_ai.operation.name"), "text_completion");
    assert_eq!(root.attr("gen_ai.request.model"), "tiny");
    assert_eq!(root.attr("gen_ai.request.max_tokens"), "6");
    assert_eq!(root.attr("gen_ai.request.temperature"), "0.5");
    assert_eq!(
        root.attr("gen_ai.usage.input_tokens"),
        usage.prompt_tokens.to_string()
    );
    assert_eq!(
        root.attr("gen_ai.usage.output_tokens"),
        usage.completion_tokens.to_string()
    );
    assert_eq!(
        root.attr("gen_ai.response.finish_reasons"),
        resp.finish_reason
    );
    assert_eq!(root.attr("openinfer.priority"), "3");
    assert_eq!(root.attr("request_id"), "obs-unary");
    assert_eq!(root.attr("trace_id"), TRACE);

    // Its children: validation, queue wait (position, priority), dispatch.
    for name in ["validate", "queue", "dispatch"] {
        assert_eq!(one(&spans, name).parent_id, root.span_id, "{name}");
        assert_eq!(one(&spans, name).service, "openinfer-router");
    }
    let queue = one(&spans, "queue");
    assert_eq!(queue.attr("openinfer.queue_position"), "0");
    assert_eq!(queue.attr("openinfer.priority"), "3");
    let dispatch = one(&spans, "dispatch");
    assert_eq!(dispatch.attr("openinfer.worker"), w.addr);

    // The worker's spans hang under the dispatch: prefill, then one decode span.
    let prefill = one(&spans, "prefill");
    let decode = one(&spans, "decode");
    for s in [prefill, decode] {
        assert_eq!(s.service, "openinfer-worker");
        assert_eq!(s.parent_id, dispatch.span_id, "{}", s.name);
        assert_eq!(s.attr("request_id"), "obs-unary");
    }
    assert_eq!(
        prefill.attr("openinfer.prompt_tokens"),
        usage.prompt_tokens.to_string()
    );
    assert!(
        prefill.end <= decode.start + 1_000_000,
        "prefill ends as decode starts"
    );
    assert_eq!(
        decode.attr("openinfer.decode_steps"),
        "5",
        "6 tokens: 1 from prefill"
    );
    assert_eq!(decode.attr("gen_ai.usage.output_tokens"), "6");
    assert_eq!(decode.attr("gen_ai.response.finish_reasons"), "length");

    // A stream without a traceparent starts a trace of its own, shared by both processes.
    let mut stream = client
        .generate_stream(request("Once upon a time", 4, "obs-stream"))
        .await
        .unwrap()
        .into_inner();
    while stream.message().await.unwrap().is_some() {}
    let trace = loop {
        let found = receiver
            .all()
            .into_iter()
            .find(|s| s.attributes.get("request_id").map(String::as_str) == Some("obs-stream"));
        if let Some(s) = found {
            break s.trace_id;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let spans = receiver
        .wait_for(&trace, |s| {
            ["text_completion tiny", "dispatch", "decode"]
                .iter()
                .all(|n| s.iter().any(|x| x.name == *n))
        })
        .await;
    let root = one(&spans, "text_completion tiny");
    assert_eq!(root.parent_id, "", "a new trace starts at the router");
    assert_eq!(root.attr("rpc.method"), "GenerateStream");
    assert_eq!(
        one(&spans, "decode").parent_id,
        one(&spans, "dispatch").span_id
    );

    assert!(
        receiver.trace(unsampled).is_empty(),
        "an unsampled client trace is not exported"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_migrated_to_another_worker_stays_one_trace() {
    let (receiver, endpoint) = Receiver::start().await;
    let sim = [
        "worker",
        "--engine",
        "sim",
        "--sim-step-time",
        "20ms",
        "--drain-grace",
        "100ms",
        "--listen",
        "127.0.0.1:0",
    ];
    let a = service("worker a", &sim, Some(&endpoint), &[]);
    let b = service("worker b", &sim, Some(&endpoint), &[]);
    let r = router(&[&a.addr, &b.addr], Some(&endpoint), &[]);
    let client = ready_client(&r, 2).await;

    let parent = client_traceparent();
    let mut c = client.clone();
    let call = tokio::spawn(async move {
        c.generate(traced(request("hello", 60, "obs-migrated"), &parent))
            .await
            .map(|r| r.into_inner())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Drain the worker that runs it: its sequence is handed back and resumed on the other.
    let mut first = None;
    for w in [&a, &b] {
        if common::capacity(&mut worker_client(&w.addr).await)
            .await
            .running_sequences
            > 0
        {
            first = Some(w);
        }
    }
    let first = first.expect("one worker runs the request");
    first.proc.sigterm();
    let resp = call.await.unwrap().unwrap();
    assert_eq!(resp.usage.unwrap().completion_tokens, 60);

    let spans = receiver
        .wait_for(TRACE, |s| {
            named(s, "dispatch").len() == 2
                && named(s, "decode").len() == 2
                && named(s, "text_completion sim").len() == 1
        })
        .await;
    let root = one(&spans, "text_completion sim");
    let dispatches = named(&spans, "dispatch");
    assert!(dispatches.iter().all(|d| d.parent_id == root.span_id));
    let workers: BTreeSet<&str> = dispatches
        .iter()
        .map(|d| d.attr("openinfer.worker"))
        .collect();
    assert_eq!(workers.len(), 2, "dispatched to both workers");
    let requeued = dispatches
        .iter()
        .find(|d| d.attr("openinfer.worker") == first.addr)
        .unwrap();
    assert_eq!(
        requeued.attr("openinfer.finish"),
        "preempted",
        "handed back by the drain"
    );
    let resumed = dispatches
        .iter()
        .find(|d| d.attr("openinfer.worker") != first.addr)
        .unwrap();
    assert_ne!(resumed.attr("openinfer.resumed_tokens"), "0");
    // Each worker's spans hang under the dispatch that sent the sequence there.
    for d in &dispatches {
        let under: Vec<_> = spans.iter().filter(|s| s.parent_id == d.span_id).collect();
        assert!(
            under.iter().any(|s| s.name == "prefill") && under.iter().any(|s| s.name == "decode"),
            "worker spans under the dispatch to {}: {under:#?}",
            d.attr("openinfer.worker")
        );
    }
    let migrations = prom::value(
        &prom::parse(&prom::get(&r.metrics)),
        "openinfer_router_migrations_total",
        &[("model", "sim")],
    );
    assert_eq!(migrations, 1.0);
}

/// Every `openinfer_*` metric name in `text` (histogram series names reduced to their
/// family).
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("openinfer_") {
        let start = i + at;
        let end = start
            + text[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(text.len() - start);
        // Only whole identifiers (not the tail of another one).
        let whole =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if whole {
            let name = &text[start..end];
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            out.insert(family.to_string());
        }
        i = end;
    }
    out
}

fn promtool_check_metrics(text: &str, what: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs (scripts/test.sh installs Debian's prometheus package)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics on the {what}'s metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_as_requests_are_served_and_every_dashboard_query_names_one() {
    let etcd = EtcdServer::start();
    let (_dir, model) = common::tiny_model();
    let registry = etcd.url();
    let w = worker(
        &model,
        None,
        &["--registry", &registry, "--group-id", "g1"],
        &[],
    );
    let r = service(
        "router",
        &["router", "--listen", "127.0.0.1:0", "--registry", &registry],
        None,
        &[],
    );
    let mut client = ready_client(&r, 1).await;

    let before_r = prom::parse(&prom::get(&r.metrics));
    let before_w = prom::parse(&prom::get(&w.metrics));
    let (mut prompt, mut generated) = (0.0, 0.0);
    for i in 0..3u32 {
        let u = client
            .generate(request("The quick brown fox", 3 + i, "m"))
            .await
            .unwrap()
            .into_inner()
            .usage
            .unwrap();
        prompt += f64::from(u.prompt_tokens);
        generated += f64::from(u.completion_tokens);
    }
    let bad = client
        .generate(pb::GenerateRequest {
            model: "no-such-model".into(),
            prompt: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::NotFound);

    let router_text = prom::get(&r.metrics);
    let worker_text = prom::get(&w.metrics);
    let (after_r, after_w) = (prom::parse(&router_text), prom::parse(&worker_text));
    let moved =
        |before: &[prom::Sample], after: &[prom::Sample], name: &str, labels: &[(&str, &str)]| {
            prom::value(after, name, labels) - prom::value(before, name, labels)
        };
    let tiny = [("model", "tiny")];
    let router_moved =
        |name: &str, labels: &[(&str, &str)]| moved(&before_r, &after_r, name, labels);
    assert_eq!(
        router_moved(
            "openinfer_router_requests_total",
            &[("model", "tiny"), ("outcome", "success")]
        ),
        3.0
    );
    assert_eq!(
        router_moved(
            "openinfer_router_requests_total",
            &[("model", "unknown"), ("outcome", "invalid")]
        ),
        1.0
    );
    assert_eq!(
        router_moved("openinfer_router_prompt_tokens_total", &tiny),
        prompt
    );
    assert_eq!(
        router_moved("openinfer_router_generation_tokens_total", &tiny),
        generated
    );
    for h in [
        "openinfer_router_time_to_first_token_seconds_count",
        "openinfer_router_request_duration_seconds_count",
        "openinfer_router_queue_time_seconds_count",
    ] {
        assert_eq!(router_moved(h, &tiny), 3.0, "{h}");
    }
    assert_eq!(
        router_moved("openinfer_router_inter_token_latency_seconds_count", &tiny),
        generated - 3.0,
        "one gap per token after the first"
    );
    // Gauges and counters read as they stand now.
    let up = [("model", "tiny"), ("event", "up")];
    for (samples, name, labels, want) in [
        (&after_r, "openinfer_router_workers", &tiny[..], 1.0),
        (&after_r, "openinfer_router_registry_up", &[], 1.0),
        (
            &after_r,
            "openinfer_router_worker_registrations_total",
            &up,
            1.0,
        ),
        (&after_r, "openinfer_router_queue_depth", &tiny, 0.0),
        (&after_w, "openinfer_worker_running_sequences", &tiny, 0.0),
        (&after_w, "openinfer_worker_kv_blocks_used", &tiny, 0.0),
        (&after_w, "openinfer_worker_connections", &tiny, 1.0),
    ] {
        assert_eq!(prom::value(samples, name, labels), want, "{name}");
    }
    for (samples, name) in [
        (&after_r, "openinfer_router_worker_kv_blocks_capacity"),
        (&after_w, "openinfer_worker_kv_blocks_capacity"),
    ] {
        assert!(prom::value(samples, name, &tiny) > 0.0, "{name}");
    }

    let worker_moved = |name: &str| moved(&before_w, &after_w, name, &tiny);
    assert_eq!(
        worker_moved("openinfer_worker_generation_tokens_total"),
        generated
    );
    assert_eq!(worker_moved("openinfer_worker_prompt_tokens_total"), prompt);
    assert!(worker_moved("openinfer_worker_batch_size_count") >= generated / 3.0);
    assert!(worker_moved("openinfer_worker_step_duration_seconds_count") >= generated / 3.0);
    assert_eq!(
        moved(
            &before_w,
            &after_w,
            "openinfer_worker_sequences_total",
            &[("model", "tiny"), ("outcome", "length")]
        ),
        3.0
    );

    promtool_check_metrics(&router_text, "router");
    promtool_check_metrics(&worker_text, "worker");

    // Every metric a dashboard query or an alert rule names is one the services export.
    let exported: BTreeSet<String> = prom::families(&router_text)
        .union(&prom::families(&worker_text))
        .cloned()
        .collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dashboard =
        std::fs::read_to_string(root.join("deploy/grafana/openinfer-dashboard.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&json, &mut exprs);
    assert!(exprs.len() >= 10, "the dashboard has its queries");
    let mut named = BTreeSet::new();
    for e in &exprs {
        let names = names_in(e);
        assert!(!names.is_empty(), "query names no openinfer_ metric: {e}");
        named.extend(names);
    }
    let rules =
        std::fs::read_to_string(root.join("deploy/prometheus/openinfer-alerts.yml")).unwrap();
    named.extend(names_in(&rules));
    let missing: Vec<_> = named.difference(&exported).collect();
    assert!(missing.is_empty(), "named but not exported: {missing:?}");
}

/// Every `expr` string in a Grafana dashboard.
fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_inside_a_request_carry_its_trace_and_request_ids() {
    let (_dir, model) = common::tiny_model();
    let json = [
        ("OPENINFER_LOG_FORMAT", "json"),
        (
            "OPENINFER_LOG",
            "info,openinfer_router=debug,openinfer_worker=debug",
        ),
    ];
    let w = worker(&model, None, &[], &json);
    let r = router(&[&w.addr], None, &json);
    let mut client = ready_client(&r, 1).await;
    client
        .generate(traced(
            request("hello", 3, "obs-json"),
            &client_traceparent(),
        ))
        .await
        .unwrap();
    // An invalid request logs inside its span too.
    let _ = client
        .generate(request("", 3, "obs-json-bad"))
        .await
        .unwrap_err();

    let mut seen = (0, 0);
    for _ in 0..100 {
        let parsed = |s: &Service| -> Vec<serde_json::Value> {
            s.log()
                .iter()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
                .collect()
        };
        let (rl, wl) = (parsed(&r), parsed(&w));
        let ours = |lines: &[serde_json::Value]| {
            lines
                .iter()
                .filter(|l| l["request_id"] == "obs-json")
                .inspect(|l| assert_eq!(l["trace_id"], TRACE, "{l}"))
                .count()
        };
        seen = (ours(&rl), ours(&wl));
        for l in rl.iter().chain(&wl) {
            let in_request = l["spans"].as_array().is_some_and(|s| {
                s.iter().any(|n| {
                    [
                        "request", "validate", "queue", "dispatch", "prefill", "decode", "sequence",
                    ]
                    .contains(&n.as_str().unwrap_or(""))
                })
            });
            if in_request {
                assert!(
                    l["trace_id"].as_str().is_some_and(|t| t.len() == 32)
                        && l["request_id"].is_string(),
                    "a line inside a request without its ids: {l}"
                );
            }
        }
        let bad = rl
            .iter()
            .any(|l| l["request_id"] == "obs-json-bad" && l["trace_id"].is_string());
        if seen.0 > 0 && seen.1 > 0 && bad {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("request log lines (router, worker) = {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tensor_parallel_group_joins_the_trace_through_rank_0() {
    let (receiver, endpoint) = Receiver::start().await;
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/llama");
    // Without --rank the worker starts the two ranks itself; they inherit the OTEL_* settings.
    let group = service(
        "tp=2",
        &[
            "worker",
            "--tp",
            "2",
            "--model",
            model.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        Some(&endpoint),
        &[],
    );
    let r = router(&[&group.addr], Some(&endpoint), &[]);
    let mut client = ready_client(&r, 1).await;
    let resp = client
        .generate(traced(
            pb::GenerateRequest {
                prompt_ids: vec![1, 15, 43, 31],
                max_new_tokens: Some(4),
                ignore_eos: true,
                ..Default::default()
            },
            &client_traceparent(),
        ))
        .await
        .unwrap()
        .into_inner();
    let spans = receiver
        .wait_for(TRACE, |s| {
            ["text_completion llama", "dispatch", "prefill", "decode"]
                .iter()
                .all(|n| s.iter().any(|x| x.name == *n))
        })
        .await;
    let dispatch = one(&spans, "dispatch");
    let decode = one(&spans, "decode");
    assert_eq!(one(&spans, "prefill").parent_id, dispatch.span_id);
    assert_eq!(decode.parent_id, dispatch.span_id);
    assert_eq!(
        decode.attr("gen_ai.usage.output_tokens"),
        resp.usage.unwrap().completion_tokens.to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_name_and_the_sampler_come_from_the_otel_variables() {
    let (receiver, endpoint) = Receiver::start().await;
    let sim = [
        "worker",
        "--engine",
        "sim",
        "--sim-step-time",
        "1ms",
        "--listen",
        "127.0.0.1:0",
    ];
    // The worker samples nothing, whatever its parent says; the router has its own name.
    let w = service(
        "worker",
        &sim,
        Some(&endpoint),
        &[("OTEL_TRACES_SAMPLER", "always_off")],
    );
    let r = router(
        &[&w.addr],
        Some(&endpoint),
        &[("OTEL_SERVICE_NAME", "edge-router")],
    );
    let mut client = ready_client(&r, 1).await;
    client
        .generate(traced(
            request("hello", 3, "obs-sampler"),
            &client_traceparent(),
        ))
        .await
        .unwrap();
    let spans = receiver
        .wait_for(TRACE, |s| s.iter().any(|x| x.name == "text_completion sim"))
        .await;
    assert!(
        spans.iter().all(|s| s.service == "edge-router"),
        "{spans:#?}"
    );
    // The worker's spans would have come with the router's (both flush every 100 ms).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let worker_spans: Vec<_> = receiver
        .all()
        .into_iter()
        .filter(|s| s.service != "edge-router")
        .collect();
    assert!(
        worker_spans.is_empty(),
        "always_off exports nothing: {worker_spans:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_worker_client_s_traceparent_on_the_execute_stream_parents_its_sequences() {
    use openinfer_proto::worker::v1 as wpb;
    let (receiver, endpoint) = Receiver::start().await;
    let w = service(
        "worker",
        &[
            "worker",
            "--engine",
            "sim",
            "--sim-step-time",
            "1ms",
            "--listen",
            "127.0.0.1:0",
        ],
        Some(&endpoint),
        &[],
    );
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut stream = worker_client(&w.addr)
        .await
        .execute(traced(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            &client_traceparent(),
        ))
        .await
        .unwrap()
        .into_inner();
    let spec = wpb::SequenceSpec {
        sequence_id: 1,
        prompt_ids: vec![1, 2, 3],
        stopping: Some(wpb::StoppingParams {
            max_new_tokens: 3,
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    tx.send(wpb::ExecuteRequest {
        kind: Some(wpb::execute_request::Kind::Dispatch(wpb::Dispatch {
            backlog: false,
            sequences: vec![spec],
        })),
    })
    .await
    .unwrap();
    while let Some(m) = stream.message().await.unwrap() {
        if !m.finished.is_empty() {
            break;
        }
    }
    let spans = receiver
        .wait_for(TRACE, |s| s.iter().any(|x| x.name == "decode"))
        .await;
    assert_eq!(one(&spans, "prefill").parent_id, CLIENT_SPAN);
    assert_eq!(one(&spans, "decode").parent_id, CLIENT_SPAN);
}
