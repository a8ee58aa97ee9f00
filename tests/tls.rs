//! TLS across processes, with certificates minted per test: Python `grpcio` against a router
//! serving TLS and mutual TLS (plaintext refused), a certificate rotation that leaves an open
//! stream running, and router ↔ worker mutual TLS.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::certs::Ca;
use openinfer_proto::v1 as pb;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Replaces `to` with `from` by a rename, as a Secret volume update does.
fn replace(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// Whether a Generate over TLS trusting only `ca` succeeds at `addr`.
async fn served_with(addr: &str, ca: &Path) -> bool {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name("localhost");
    let Ok(endpoint) = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
    else {
        return false;
    };
    let Ok(channel) = endpoint
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
    else {
        return false;
    };
    pb::inference_client::InferenceClient::new(channel)
        .generate(common::hello(2))
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_over_tls_and_mtls_and_a_rotation_that_drops_no_stream() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(&dir.path().join("ca"), "ca");
    let other = Ca::new(&dir.path().join("other"), "other");
    let next = Ca::new(&dir.path().join("next"), "next");
    let (server_cert, server_key) = ca.leaf("server", "serverAuth");
    let (client_cert, client_key) = ca.leaf("client", "clientAuth");
    let (other_cert, other_key) = other.leaf("client", "clientAuth");
    let (next_cert, next_key) = next.leaf("server", "serverAuth");
    // What the router reads: a copy, replaced during the test.
    let live = dir.path().join("live");
    std::fs::create_dir_all(&live).unwrap();
    let (cert, key) = (live.join("tls.crt"), live.join("tls.key"));
    replace(&server_cert, &cert);
    replace(&server_key, &key);

    let (_worker, waddr) = common::sim_worker("20ms", &[]);
    let (_tls_router, tls_addr) =
        common::start_router(&[&waddr], &["--tls-cert", s(&cert), "--tls-key", s(&key)]);
    let ca_pem = ca.pem();
    let (_mtls_router, mtls_addr) = common::start_router(
        &[&waddr],
        &[
            "--tls-cert",
            s(&server_cert),
            "--tls-key",
            s(&server_key),
            "--tls-client-ca",
            s(&ca_pem),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !served_with(&tls_addr, &ca_pem).await {
        assert!(Instant::now() < deadline, "the TLS router never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/tls_client.py");
    let mut py = tokio::process::Command::new(common::python())
        .arg(script)
        .args([&tls_addr, &mtls_addr])
        .args([
            &ca_pem,
            &client_cert,
            &client_key,
            &other_cert,
            &other_key,
            &next.pem(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = py.stdin.take().unwrap();
    let mut lines = BufReader::new(py.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("the Python client never reached its rotation")
        .unwrap()
        .unwrap_or_default();
    assert_eq!(line, "ROTATE", "{line}");

    // Rotate to a certificate of another CA; wait until new connections get it.
    replace(&next_cert, &cert);
    replace(&next_key, &key);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !served_with(&tls_addr, &next.pem()).await {
        assert!(
            Instant::now() < deadline,
            "the rotated certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stdin.write_all(b"go\n").await.unwrap();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("the Python client never finished")
        .unwrap()
        .unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON ({e}): {line}"));
    eprintln!("{v:#}");

    assert_eq!(v["tls"]["ok"]["finish_reason"], "length", "{v}");
    assert_eq!(
        v["plaintext"]["code"], "UNAVAILABLE",
        "plaintext was served: {v}"
    );
    assert_eq!(v["mtls"]["ok"]["finish_reason"], "length", "{v}");
    assert_eq!(
        v["mtls_no_cert"]["code"], "UNAVAILABLE",
        "served without a client certificate: {v}"
    );
    assert_eq!(
        v["mtls_other_ca"]["code"], "UNAVAILABLE",
        "served a client of another CA: {v}"
    );
    assert_eq!(
        v["stream_across_rotation"]["tokens"], 150,
        "the open stream broke: {v}"
    );
    assert_eq!(v["new_ca"]["ok"]["finish_reason"], "length", "{v}");
    assert_eq!(
        v["old_ca"]["code"], "UNAVAILABLE",
        "the old certificate is still served: {v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_and_worker_speak_mutual_tls_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let (wcert, wkey) = ca.leaf("worker", "serverAuth");
    let (rcert, rkey) = ca.leaf("router", "clientAuth");
    let other = Ca::new(&dir.path().join("other"), "other");
    let (ocert, okey) = other.leaf("router", "clientAuth");
    let ca_pem = ca.pem();
    let (_worker, waddr) = common::sim_worker(
        "5ms",
        &[
            "--worker-tls-cert",
            s(&wcert),
            "--worker-tls-key",
            s(&wkey),
            "--worker-tls-ca",
            s(&ca_pem),
        ],
    );
    let tls_flags = |cert: &Path, key: &Path| {
        vec![
            "--worker-tls-cert".to_string(),
            s(cert).into(),
            "--worker-tls-key".into(),
            s(key).into(),
            "--worker-tls-ca".into(),
            s(&ca_pem).into(),
        ]
    };
    let flags = tls_flags(&rcert, &rkey);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (_router, addr) = common::start_router(&[&waddr], &flags);
    let mut c = common::router_client(&addr).await;
    common::wait_for_workers(&mut c, 1).await;
    let r = c.generate(common::hello(4)).await.unwrap().into_inner();
    assert_eq!(r.finish_reason, "length");

    // A router speaking plaintext, or presenting a certificate of another CA, never links.
    let (_plain, plain_addr) = common::start_router(&[&waddr], &[]);
    let flags = tls_flags(&ocert, &okey);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (_stranger, stranger_addr) = common::start_router(&[&waddr], &flags);
    for addr in [plain_addr, stranger_addr] {
        let mut c = common::router_client(&addr).await;
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            assert_eq!(
                common::workers_seen(&mut c).await,
                0,
                "a router without the right certificate reached the worker"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let refused = c.generate(common::hello(2)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    }
}
