//! A real third-party client: Python `grpcio` with `grpc_requests`, which learns the API through
//! server reflection (v1alpha) and sends JSON-shaped requests with no generated code.
//!
//! The Python is [`common::python`].

mod common;

use std::path::PathBuf;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_drives_the_router_through_reflection() {
    let (_dir, model) = common::tiny_model();
    let (_w1, w1) = common::start_worker(&model, &[]);
    let (_w2, w2) = common::start_worker(&model, &[]);
    let (_router, addr) = common::start_router(&[&w1, &w2], &[]);
    common::wait_for_workers(&mut common::router_client(&addr).await, 2).await;

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/reflection_client.py");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(common::python())
            .arg(script)
            .arg(&addr)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python client failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {stdout}\n{stderr}"));

    let services: Vec<&str> = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    for s in [
        "openinfer.v1.Inference",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(services.contains(&s), "{s} missing from {services:?}");
    }
    assert_eq!(v["models"]["models"][0]["id"], "tiny");
    assert_eq!(v["health"]["status"], "SERVING");

    // JSON mapping: uint32 lists are numbers, finish_reason a string, usage nested.
    let unary = &v["unary"];
    assert_eq!(unary["finish_reason"], "length");
    assert_eq!(unary["token_ids"].as_array().unwrap().len(), 8);
    assert_eq!(unary["usage"]["completion_tokens"], 8);
    let stream = v["stream"].as_array().unwrap();
    let streamed: Vec<&serde_json::Value> = stream
        .iter()
        .flat_map(|m| m["token_ids"].as_array().into_iter().flatten())
        .collect();
    let unary_ids: Vec<&serde_json::Value> =
        unary["token_ids"].as_array().unwrap().iter().collect();
    assert_eq!(streamed, unary_ids, "streamed tokens equal the unary ones");
    assert_eq!(stream.last().unwrap()["finish_reason"], "length");

    assert_eq!(v["ids_unary"]["usage"]["prompt_tokens"], 3);
    assert_eq!(v["invalid"]["code"], "INVALID_ARGUMENT");
    assert!(v["invalid"]["details"]
        .as_str()
        .unwrap()
        .starts_with("top_p:"));
}
