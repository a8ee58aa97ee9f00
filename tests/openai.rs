//! The OpenAI-compatible HTTP API, driven by the official `openai` Python client
//! (tests/python/openai_client.py) and by raw HTTP/1.1, against real routers, workers and
//! `serve` processes on loopback.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::prom;
use openinfer_proto::v1 as pb;
use openinfer_router::tenants::key_sha256;
use serde_json::{json, Value};

fn script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/openai_client.py")
}

/// Runs a scenario of the Python client to its end; its last stdout line, as JSON.
fn client(scenario: &str, base: &str, key: Option<&str>) -> Value {
    client_with(scenario, base, key, &[])
}

fn client_with(scenario: &str, base: &str, key: Option<&str>, env: &[(&str, &str)]) -> Value {
    let mut cmd = Command::new(common::python());
    cmd.arg(script())
        .args([scenario, base])
        .args(key)
        .envs(env.iter().copied());
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "openai_client.py {scenario} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("null")).unwrap()
}
use common::http;

/// A router in front of `workers` with the HTTP API on a free port, and `extra` flags.
fn http_router(workers: &str, extra: &[&str]) -> common::Service {
    let mut args = vec![
        "router",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        workers,
        "--http-listen",
        "127.0.0.1:0",
    ];
    args.extend(extra);
    common::service("router", &args)
}

/// Waits until `/health` answers 200 (a worker is linked).
async fn healthy(base: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while http(base, "GET", "/health", "").0 != 200 {
        assert!(Instant::now() < deadline, "the router never became healthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn error_of(body: &str) -> Value {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["error"].clone()
}

fn metric(url: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    prom::value(&prom::parse(&prom::get(url)), name, labels)
}

/// The suite of the official client against a router and a worker of a model with a real
/// chat template; then the greedy chat output through HTTP equals the gRPC output for the
/// same rendered prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_client_gets_completions_chat_streams_and_errors() {
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen2");
    let (_worker, worker_addr) = common::start_worker(&model, &[]);
    let router = http_router(&worker_addr, &[]);
    let base = router.http.clone();
    healthy(&base).await;

    let suite = tokio::task::spawn_blocking(move || client("suite", &base, None))
        .await
        .unwrap();
    let ids: Vec<u32> = serde_json::from_value(suite["prompt_ids"].clone()).unwrap();
    let mut grpc = common::router_client(&router.addr).await;
    let direct = grpc
        .generate(pb::GenerateRequest {
            prompt_ids: ids,
            max_new_tokens: Some(suite["chat_tokens"].as_u64().unwrap() as u32),
            temperature: Some(0.0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(direct.text, suite["chat_text"].as_str().unwrap());

    // The same requests went through the one path: counted by the router's metrics.
    let ok = metric(
        &router.metrics,
        "openinfer_router_requests_total",
        &[("model", "qwen2"), ("outcome", "success")],
    );
    assert!(ok >= 15.0, "{ok} successful requests counted");
    let invalid = metric(
        &router.metrics,
        "openinfer_router_requests_total",
        &[("model", "unknown"), ("outcome", "invalid")],
    );
    assert!(
        invalid >= 1.0,
        "the unknown model is not counted: {invalid}"
    );
}

/// `serve --http-listen` with the sim engine: a client that hangs up mid-stream has its
/// sequence cancelled on the worker within a step (its KV freed), a stream whose router stops
/// under it ends with an error event, and a model without a chat template refuses chat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_cancels_on_disconnect_and_ends_a_broken_stream_with_an_error_event() {
    let serve = common::service(
        "serve",
        &[
            "serve",
            "--engine",
            "sim",
            "--sim-step-time",
            "10ms",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--drain-timeout",
            "300ms",
        ],
    );
    let base = serve.http.clone();

    // No template: chat is refused with a 400 that says so; completions work.
    let (status, _, body) = http(
        &base,
        "POST",
        "/v1/chat/completions",
        r#"{"messages": [{"role": "user", "content": "hi"}]}"#,
    );
    assert_eq!(status, 400, "{body}");
    let e = error_of(&body);
    assert_eq!(e["param"], "messages");
    assert!(
        e["message"].as_str().unwrap().contains("no chat template"),
        "{e}"
    );

    let b = base.clone();
    let closed = tokio::task::spawn_blocking(move || client("disconnect", &b, None))
        .await
        .unwrap();
    assert_eq!(closed["closed"], true);
    let freed_by = Instant::now() + Duration::from_secs(2);
    loop {
        let used = metric(
            &serve.metrics,
            "openinfer_worker_kv_blocks_used",
            &[("model", "sim")],
        );
        if used == 0.0 {
            break;
        }
        assert!(
            Instant::now() < freed_by,
            "KV still held after the client left: {used} blocks"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The client read 5 tokens; the worker made at most one step's more (plus the one in
    // flight), not the 1,500 asked for.
    let made = metric(
        &serve.metrics,
        "openinfer_worker_generation_tokens_total",
        &[("model", "sim")],
    );
    assert!(
        made <= 7.0,
        "the worker generated {made} tokens for a client that read 5"
    );
    assert_eq!(
        metric(
            &serve.metrics,
            "openinfer_router_requests_total",
            &[("model", "sim"), ("outcome", "cancelled")],
        ),
        1.0
    );

    // A stream the router stops under: an error event, not a silent end.
    let mut py = Command::new(common::python())
        .arg(script())
        .args(["midstream", &base])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(py.stdout.take().unwrap()).lines();
    let first = tokio::task::spawn_blocking(move || {
        let first = lines.next().unwrap().unwrap();
        (first, lines)
    });
    let (first, mut lines) = tokio::time::timeout(Duration::from_secs(30), first)
        .await
        .expect("the stream never started")
        .unwrap();
    assert!(first.contains("streaming"), "{first}");
    serve.proc.sigterm();
    let last = tokio::task::spawn_blocking(move || lines.next().unwrap().unwrap())
        .await
        .unwrap();
    let last: Value = serde_json::from_str(&last).unwrap();
    assert!(
        last["error"].as_str().unwrap().contains("shutting down"),
        "{last}"
    );
    assert!(py.wait().unwrap().success());
}

/// Tenants over HTTP: a wrong key is 401, a priority over the cap 403, and a tenant over its
/// concurrency gets 429 with `retry-after-ms`, which the client honours before it retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_keys_caps_and_quota_pushback_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tenants.yaml");
    let key = "sk-http-0123456789";
    std::fs::write(
        &file,
        format!(
            "tenants:\n  - name: web\n    api_keys_sha256: [\"{}\"]\n    max_priority: 2\n    max_concurrent: 1\n",
            key_sha256(key)
        ),
    )
    .unwrap();
    let (_sim, sim_addr) = common::sim_worker("20ms", &[]);
    let router = http_router(&sim_addr, &["--tenants", file.to_str().unwrap()]);
    let base = router.http.clone();
    healthy(&base).await;
    let (status, _, body) = http(&base, "GET", "/v1/models", "");
    assert_eq!(status, 401, "{body}");
    assert_eq!(error_of(&body)["type"], "authentication_error");

    let b = base.clone();
    client_blocking("auth", &b, key).await;
    let b = base.clone();
    let retried = client_blocking("retry", &b, key).await;
    assert!(retried["retry_after_ms"].as_u64().unwrap() > 0, "{retried}");
    assert!(
        metric(
            &router.metrics,
            "openinfer_router_tenant_requests_total",
            &[("tenant", "web"), ("outcome", "refused")],
        ) >= 1.0
    );
}

async fn client_blocking(scenario: &'static str, base: &str, key: &'static str) -> Value {
    let base = base.to_owned();
    tokio::task::spawn_blocking(move || client(scenario, &base, Some(key)))
        .await
        .unwrap()
}

/// Refusals before any worker: 503 with Retry-After while no worker is linked, 400 over
/// --max-request-bytes, 404 for a path that does not exist; the shape is OpenAI's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_refusals_take_openai_s_shape_and_codes() {
    // A worker that never answers: the router has no model to serve.
    let router = http_router(
        "127.0.0.1:1",
        &["--max-request-bytes", "2048", "--retry-pushback", "1500ms"],
    );
    let base = router.http.clone();
    let (status, head, body) = http(&base, "GET", "/health", "");
    assert_eq!(status, 503, "{head}{body}");
    let (status, head, body) = http(
        &base,
        "POST",
        "/v1/completions",
        r#"{"prompt": "hi", "max_tokens": 2}"#,
    );
    assert_eq!(status, 503, "{body}");
    assert!(head.contains("retry-after: 2\r\n"), "{head}");
    assert!(head.contains("retry-after-ms: 1500"), "{head}");
    let e = error_of(&body);
    for k in ["message", "type", "param", "code"] {
        assert!(e.get(k).is_some(), "no {k} in {e}");
    }
    let big = json!({"prompt": "x".repeat(4096)}).to_string();
    let (status, _, body) = http(&base, "POST", "/v1/completions", &big);
    assert_eq!(status, 400, "{body}");
    assert!(error_of(&body)["message"]
        .as_str()
        .unwrap()
        .contains("--max-request-bytes"));
    let (status, _, body) = http(&base, "POST", "/v1/embeddings", "{}");
    assert_eq!(status, 404, "{body}");
    let (status, _, body) = http(&base, "POST", "/v1/completions", "{not json");
    assert_eq!(status, 400, "{body}");
    assert_eq!(error_of(&body)["param"], "body");
}

/// The embedded default: `serve --http-listen` on the model it makes itself renders a chat
/// with its template, bos written once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_renders_chat_with_one_bos() {
    let cache = tempfile::tempdir().unwrap();
    let serve = common::service(
        "serve",
        &[
            "serve",
            "--cache-dir",
            cache.path().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ],
    );
    let body = r#"{"messages": [{"role": "user", "content": "hi"}]}"#;
    let (status, _, tokens) = http(&serve.http, "POST", "/tokenize", body);
    assert_eq!(status, 200, "{tokens}");
    let tokens: Value = serde_json::from_str(&tokens).unwrap();
    let ids: Vec<u32> = serde_json::from_value(tokens["tokens"].clone()).unwrap();
    assert_eq!(ids[0], 1, "the template's bos: {ids:?}");
    assert_ne!(ids[1], 1, "bos twice: {ids:?}");
    let (status, _, text) = http(
        &serve.http,
        "POST",
        "/detokenize",
        &json!({"tokens": ids}).to_string(),
    );
    assert_eq!(status, 200);
    let text: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(text["prompt"], "<s><|user|>\nhi</s>\n<|assistant|>\n");
    let (status, _, answer) = http(
        &serve.http,
        "POST",
        "/v1/chat/completions",
        r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}"#,
    );
    assert_eq!(status, 200, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(
        answer["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        ids.len()
    );
}

/// The HTTP API on TLS from the router's --tls-cert files: the official client gets an answer
/// when it trusts the CA, and cannot connect when it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_speaks_tls_from_the_same_files() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::certs::Ca::new(&dir.path().join("ca"), "ca");
    let (cert, key) = ca.leaf("server", "serverAuth");
    let (_sim, sim_addr) = common::sim_worker("2ms", &[]);
    let router = http_router(
        &sim_addr,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(router.http.starts_with("https://"), "{}", router.http);
    let base = router.http.clone();
    let ca_pem = ca.pem();
    let done = tokio::task::spawn_blocking(move || {
        client_with(
            "tls",
            &base,
            None,
            &[("OPENINFER_TEST_CA", ca_pem.to_str().unwrap())],
        )
    })
    .await
    .unwrap();
    assert_eq!(done["ok"], true);
}

/// `--chat-template FILE` on the worker replaces the model's template (here the sim model,
/// which has none): the router renders conversations with the file's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_template_file_replaces_the_model_s() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("template.jinja");
    std::fs::write(
        &file,
        "{%- for m in messages %}[{{ m.role | upper }}] {{ m.content | trim }}\n{% endfor %}\
         {%- if add_generation_prompt %}[ASSISTANT]{% endif %}",
    )
    .unwrap();
    let (_sim, sim_addr) = common::sim_worker("2ms", &["--chat-template", file.to_str().unwrap()]);
    let router = http_router(&sim_addr, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let messages = r#"{"messages": [{"role": "system", "content": " be brief "}, {"role": "user", "content": "hi"}]}"#;
    let tokens = loop {
        let (status, _, body) = http(&router.http, "POST", "/tokenize", messages);
        if status == 200 {
            break serde_json::from_str::<Value>(&body).unwrap()["tokens"].clone();
        }
        assert!(Instant::now() < deadline, "{status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (status, _, body) = http(
        &router.http,
        "POST",
        "/detokenize",
        &json!({ "tokens": tokens }).to_string(),
    );
    assert_eq!(status, 200, "{body}");
    let text: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(text["prompt"], "[SYSTEM] be brief\n[USER] hi\n[ASSISTANT]");
    let (status, _, body) = http(&router.http, "POST", "/v1/chat/completions", messages);
    assert_eq!(status, 200, "{body}");
}
