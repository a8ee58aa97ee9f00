//! Cluster membership through a real etcd: workers register once ready and deregister on
//! SIGTERM, routers discover them within a second, a killed worker's streams finish on another
//! replica, and an etcd outage stops nothing.

mod common;

use std::time::{Duration, Instant};

use common::etcd::EtcdServer;
use common::{
    draining_worker, registered_worker, registry_router, router_client, stream, until_workers,
    workers_seen, Proc,
};
use futures::future::join_all;
use openinfer_proto::v1 as pb;
use openinfer_registry::client::Etcd;
use openinfer_registry::{EtcdConfig, WorkerRecord, WORKERS_PREFIX};
use tonic::transport::Channel;

/// A sim worker registered in `etcd` (lease TTL 2 s, default drain grace).
fn sim_worker(etcd: &EtcdServer, group: &str) -> (Proc, String) {
    draining_worker(etcd, group, "30s")
}

fn router(etcd: &EtcdServer) -> (Proc, String) {
    registry_router(&etcd.url(), &[])
}

async fn records(etcd: &EtcdServer) -> Vec<WorkerRecord> {
    let client = Etcd::connect(&EtcdConfig::from_url(&etcd.url()).unwrap())
        .await
        .unwrap();
    let (kvs, _) = client.get_prefix(WORKERS_PREFIX.as_bytes()).await.unwrap();
    kvs.iter()
        .map(|kv| WorkerRecord::parse(&String::from_utf8_lossy(&kv.key), &kv.value).unwrap())
        .collect()
}

fn req(max_new: u32) -> pb::GenerateRequest {
    common::hello(max_new)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_register_when_ready_and_routers_follow_within_a_second() {
    let etcd = EtcdServer::start();
    let (_router, addr) = router(&etcd);
    let mut client = router_client(&addr).await;
    assert_eq!(workers_seen(&mut client).await, 0);

    let (_a, a_addr) = sim_worker(&etcd, "a");
    let took = until_workers(&mut client, 1, Duration::from_secs(5)).await;
    let recs = records(&etcd).await;
    assert_eq!(recs.len(), 1);
    let r = &recs[0];
    assert_eq!((r.group_id.as_str(), r.model.as_str()), ("a", "sim"));
    assert_eq!(r.address, a_addr);
    assert_eq!(
        (r.tp_size, r.revision.as_str(), r.dtype.as_str()),
        (1, "sim", "f32")
    );
    assert!(r.kv_blocks > 0 && r.max_running > 0 && !r.version.is_empty());
    assert!(took < Duration::from_secs(3), "{took:?}");

    // A second worker is picked up within a second of its registration.
    let (b, _) = sim_worker(&etcd, "b");
    let start = Instant::now();
    while records(&etcd).await.len() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let registered = start.elapsed();
    let took = until_workers(&mut client, 2, Duration::from_secs(5)).await;
    assert!(
        took < Duration::from_secs(1),
        "seen {took:?} after registration ({registered:?})"
    );
    let r = client.generate(req(4)).await.unwrap().into_inner();
    assert_eq!(r.token_ids.len(), 4);

    // SIGTERM: the record goes at once (lease revoked), the router drops the worker within a
    // second, and the worker exits 0.
    b.sigterm();
    let took = until_workers(&mut client, 1, Duration::from_secs(1)).await;
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert_eq!(records(&etcd).await.len(), 1);
    let mut b = b;
    let status = b.0.wait().unwrap();
    assert!(status.success(), "worker exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_s_fifty_streams_finish_on_the_other_replica() {
    let etcd = EtcdServer::start();
    let (a, _) = sim_worker(&etcd, "a");
    let (b, _) = sim_worker(&etcd, "b");
    let mut procs = [Some(a), Some(b)];
    let (_router, addr) = router(&etcd);
    let mut client = router_client(&addr).await;
    until_workers(&mut client, 2, Duration::from_secs(10)).await;
    let expected = client.generate(req(200)).await.unwrap().into_inner();

    let streams = (0..50).map(|_| {
        let mut client = client.clone();
        async move {
            let mut s = client.generate_stream(req(200)).await?.into_inner();
            let (mut ids, mut text, mut reason) = (Vec::new(), String::new(), String::new());
            while let Some(m) = s.message().await? {
                ids.extend(m.token_ids);
                text.push_str(&m.text);
                reason = m.finish_reason;
            }
            Ok::<_, tonic::Status>((ids, text, reason))
        }
    });
    let run = tokio::spawn(join_all(streams));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // kill -9 one replica mid-stream.
    let killed = procs[0].take().unwrap();
    drop(killed);
    eprintln!("killed worker a (SIGKILL) with streams in flight");
    let results = run.await.unwrap();
    let mut received = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        let (ids, text, reason) = r.unwrap_or_else(|e| panic!("stream {i} failed: {e:?}"));
        received.push(ids.len());
        assert_eq!(reason, "length", "stream {i}");
        assert_eq!(ids, expected.token_ids, "stream {i}: no gap, no repeat");
        assert_eq!(text, expected.text, "stream {i}");
    }
    eprintln!("every client received 200 tokens: {received:?}");
    // The router stopped using it at once: new work succeeds right away.
    let r = client.generate(req(3)).await.unwrap().into_inner();
    assert_eq!(r.token_ids.len(), 3);
    // Its record disappears when the 2 s lease expires.
    let start = Instant::now();
    while records(&etcd).await.len() != 1 {
        assert!(
            start.elapsed() < Duration::from_secs(6),
            "record of the killed worker stayed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(procs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_outage_stops_nothing_and_both_sides_recover() {
    let mut etcd = EtcdServer::start();
    let (mut a, _) = sim_worker(&etcd, "a");
    let (mut router_proc, addr) = router(&etcd);
    let mut client = router_client(&addr).await;
    until_workers(&mut client, 1, Duration::from_secs(10)).await;

    etcd.stop();
    eprintln!("etcd stopped for 60 s");
    let start = Instant::now();
    let mut served = 0;
    while start.elapsed() < Duration::from_secs(60) {
        let r = client.generate(req(4)).await.unwrap().into_inner();
        assert_eq!(r.token_ids.len(), 4);
        served += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(a.0.try_wait().unwrap().is_none(), "the worker exited");
    assert!(
        router_proc.0.try_wait().unwrap().is_none(),
        "the router exited"
    );
    eprintln!("served {served} requests during the outage");

    etcd.resume();
    // The worker registers again, and the router watches again: a new worker is found.
    let start = Instant::now();
    while records(&etcd).await.is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the worker never re-registered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_b, _) = sim_worker(&etcd, "b");
    until_workers(&mut client, 2, Duration::from_secs(10)).await;
    let r = client.generate(req(4)).await.unwrap().into_inner();
    assert_eq!(r.token_ids.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_sigterm_refuses_new_work_and_finishes_its_streams() {
    let (_w, w_addr) = common::sim_worker("5ms", &[]);
    let (router_proc, addr) = common::start_router(&[&w_addr], &[]);
    let mut client = router_client(&addr).await;
    until_workers(&mut client, 1, Duration::from_secs(10)).await;
    let expected = client.generate(req(200)).await.unwrap().into_inner();

    let running = tokio::spawn(stream(client.clone(), 200));
    tokio::time::sleep(Duration::from_millis(200)).await;
    router_proc.sigterm();
    tokio::time::sleep(Duration::from_millis(100)).await;

    assert_eq!(
        common::health(&addr, "openinfer.v1.Inference").await,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );
    let refused = router_client(&addr)
        .await
        .generate(req(4))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");

    let (ids, text, reason) = running
        .await
        .unwrap()
        .expect("the in-flight stream finishes");
    assert_eq!(
        (ids, text, reason.as_str()),
        (expected.token_ids, expected.text, "length")
    );
    let mut router_proc = router_proc;
    let exit = router_proc.0.wait().unwrap();
    assert!(exit.success(), "router exit status {exit}");
}

/// A drain that runs out of `--drain-timeout` ends what is left with `UNAVAILABLE` and the
/// router exits 0, even with a client that never reads its stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_drain_ends_at_its_timeout_even_with_a_client_that_never_reads() {
    let (_w, w_addr) = common::sim_worker("50ms", &[]);
    let (router_proc, addr) = common::start_router(&[&w_addr], &["--drain-timeout", "2s"]);
    let mut client = router_client(&addr).await;
    until_workers(&mut client, 1, Duration::from_secs(10)).await;
    // 2,000 tokens at 50 ms a step: far longer than the drain.
    let reading = tokio::spawn(stream(client.clone(), 2000));
    let unread = router_client(&addr)
        .await
        .generate_stream(req(2000))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    router_proc.sigterm();
    let mut router_proc = router_proc;
    let exit = router_proc
        .exit_within(
            Duration::from_secs(8),
            "the router outlived its 2s drain timeout",
        )
        .await;
    assert!(exit.success(), "router exit status {exit}");
    assert!(
        start.elapsed() >= Duration::from_secs(2),
        "it did not wait for the drain"
    );
    let ended = reading.await.unwrap().unwrap_err();
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("shutting down"), "{ended:?}");
    drop(unread);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_sigterm_leaves_the_registry_and_hands_back_work_after_its_grace() {
    let etcd = EtcdServer::start();
    let (a, _) = draining_worker(&etcd, "a", "300ms");
    let (_b, _) = draining_worker(&etcd, "b", "300ms");
    let (_router, addr) = router(&etcd);
    let mut client = router_client(&addr).await;
    until_workers(&mut client, 2, Duration::from_secs(10)).await;
    let expected = client.generate(req(400)).await.unwrap().into_inner();

    let streams: Vec<_> = (0..10)
        .map(|_| tokio::spawn(stream(client.clone(), 400)))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    a.sigterm();
    let mut a = a;
    let exit = a.0.wait().unwrap();
    let took = start.elapsed();
    assert!(exit.success(), "worker exit status {exit}");
    assert!(
        took < Duration::from_secs(2),
        "drain took {took:?} with a 300 ms grace"
    );
    assert_eq!(records(&etcd).await.len(), 1, "its record left with it");
    for (i, s) in streams.into_iter().enumerate() {
        let (ids, text, reason) = s
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("stream {i}: {e:?}"));
        assert_eq!(reason, "length");
        assert_eq!(ids, expected.token_ids, "stream {i}");
        assert_eq!(text, expected.text, "stream {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_steady_load_loses_nothing() {
    let etcd = EtcdServer::start();
    let mut workers = [
        draining_worker(&etcd, "a", "10s").0,
        draining_worker(&etcd, "b", "10s").0,
    ];
    let (_router, addr) = router(&etcd);
    let mut client = router_client(&addr).await;
    until_workers(&mut client, 2, Duration::from_secs(10)).await;
    let expected = client.generate(req(60)).await.unwrap().into_inner();

    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let load: Vec<_> = (0..8)
        .map(|_| {
            let client = client.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut done = Vec::new();
                while !*stop.borrow() {
                    done.push(stream(client.clone(), 60).await);
                }
                done
            })
        })
        .collect();
    for (i, group) in ["a", "b"].into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(300)).await;
        workers[i].sigterm();
        let exit = workers[i].0.wait().unwrap();
        assert!(exit.success(), "worker {group} exit status {exit}");
        eprintln!("restarted worker {group}");
        workers[i] = draining_worker(&etcd, group, "10s").0;
        until_workers(&mut client, 2, Duration::from_secs(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_tx.send(true).unwrap();
    let mut total = 0;
    for task in load {
        for r in task.await.unwrap() {
            let (ids, text, reason) = r.unwrap_or_else(|e| panic!("a client got {e:?}"));
            assert_eq!(reason, "length");
            assert_eq!(ids, expected.token_ids);
            assert_eq!(text, expected.text);
            total += 1;
        }
    }
    eprintln!("{total} streams, all complete, during two worker restarts");
    assert!(total > 16, "{total} streams ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_with_client_certificates() {
    let etcd = EtcdServer::start_tls();
    let url = etcd.url();
    let c = etcd.certs();
    let path = |f: &str| c.join(f).to_str().unwrap().to_string();
    let (ca, cert, key) = (path("ca.pem"), path("client.pem"), path("client.key"));
    let tls = ["--etcd-ca", &ca, "--etcd-cert", &cert, "--etcd-key", &key];
    let (_w, _) = registered_worker(&url, "tls", &tls);
    let (_r, addr) = registry_router(&url, &tls);
    let mut client = router_client(&addr).await;
    until_workers(&mut client, 1, Duration::from_secs(10)).await;
    assert_eq!(
        client
            .generate(req(3))
            .await
            .unwrap()
            .into_inner()
            .token_ids
            .len(),
        3
    );

    // Without a client certificate etcd refuses it; the worker serves on and keeps trying.
    let (mut bare, _) = registered_worker(&url, "bare", &["--etcd-ca", &ca]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(workers_seen(&mut client).await, 1);
    assert!(bare.0.try_wait().unwrap().is_none(), "the worker exited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_password_authentication_and_bad_records_are_ignored() {
    use openinfer_proto::etcd::etcdserverpb::{self as epb, auth_client::AuthClient};
    let etcd = EtcdServer::start();
    let url = etcd.url();
    let plain = EtcdConfig::from_url(&url).unwrap();
    let endpoint = plain.endpoints[0].clone();
    let mut auth = AuthClient::new(
        Channel::from_shared(endpoint)
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let _ = auth
        .role_add(epb::AuthRoleAddRequest {
            name: "root".into(),
        })
        .await;
    auth.user_add(epb::AuthUserAddRequest {
        name: "root".into(),
        password: "s3cret".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    auth.user_grant_role(epb::AuthUserGrantRoleRequest {
        user: "root".into(),
        role: "root".into(),
    })
    .await
    .unwrap();
    auth.auth_enable(epb::AuthEnableRequest {}).await.unwrap();

    // The password comes from a file (or the environment), never from the arguments.
    let secrets = tempfile::tempdir().unwrap();
    let (good, bad) = (secrets.path().join("good"), secrets.path().join("bad"));
    std::fs::write(&good, "s3cret\n").unwrap();
    std::fs::write(&bad, "nope").unwrap();
    let file = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let good = file(&good);
    let creds = ["--etcd-user", "root", "--etcd-password-file", &good];
    let (w, _) = registered_worker(&url, "authed", &creds);
    let router_svc = common::spawn_service(
        "router",
        std::process::Command::new(common::bin())
            .args([
                "router",
                "--listen",
                "127.0.0.1:0",
                "--registry",
                &url,
                "--etcd-user",
                "root",
            ])
            .env("OPENINFER_ETCD_PASSWORD", "s3cret"),
    );
    let router_log = router_svc.lines.clone();
    let (mut router_proc, addr) = (router_svc.proc, router_svc.addr.clone());
    let mut client = router_client(&addr).await;
    until_workers(&mut client, 1, Duration::from_secs(10)).await;
    for pid in [w.0.id(), router_proc.0.id()] {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains("s3cret"),
            "the password is in the arguments of {pid}"
        );
    }
    let refused = std::process::Command::new(common::bin())
        .args([
            "router",
            "--workers",
            "127.0.0.1:1",
            "--registry",
            &url,
            "--etcd-user",
            "root",
            "--etcd-password",
            "s3cret",
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("--etcd-password-file"), "{why}");

    // A wrong password registers nothing, and the worker serves on.
    let bad = file(&bad);
    let (mut wrong, _) = registered_worker(
        &url,
        "wrong",
        &["--etcd-user", "root", "--etcd-password-file", &bad],
    );

    // Records that are not JSON, or that sit under another model's prefix, are ignored.
    let mut cfg = plain.clone();
    cfg.auth = Some(("root".into(), "s3cret".into()));
    let admin = Etcd::connect(&cfg).await.unwrap();
    admin
        .put(&format!("{WORKERS_PREFIX}sim/garbage"), "{not json", 0)
        .await
        .unwrap();
    let mut theirs: WorkerRecord = {
        let (kvs, _) = admin.get_prefix(WORKERS_PREFIX.as_bytes()).await.unwrap();
        serde_json::from_slice(&kvs[0].value).unwrap()
    };
    theirs.address = "127.0.0.1:1".into();
    admin
        .put(
            &format!("{WORKERS_PREFIX}other-model/authed"),
            &serde_json::to_string(&theirs).unwrap(),
            0,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(workers_seen(&mut client).await, 1);
    let models = client
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(models.len(), 1, "{models:?}");
    assert_eq!(
        client
            .generate(req(3))
            .await
            .unwrap()
            .into_inner()
            .token_ids
            .len(),
        3
    );
    assert!(
        router_proc.0.try_wait().unwrap().is_none(),
        "the router exited"
    );
    assert!(wrong.0.try_wait().unwrap().is_none(), "the worker exited");
    let log = router_log.lock().unwrap();
    assert!(
        !log.is_empty() && !log.iter().any(|l| l.contains("s3cret")),
        "the password reached the router's log"
    );
}

/// The `grpc.health.v1` states Kubernetes' probes read (docs/deploy.md): a warm worker that
/// etcd has not seen yet is alive but not ready, it turns ready once registered, and both turn
/// NOT_SERVING when it drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_is_ready_once_registered_and_neither_alive_nor_ready_while_draining() {
    use tonic_health::pb::health_check_response::ServingStatus::{NotServing, Serving};
    const READY: &str = "openinfer.worker.v1.Worker";
    let mut etcd = EtcdServer::start();
    etcd.stop();
    // A drain grace long enough to watch the drain on a loaded machine.
    let (worker, w_addr) = draining_worker(&etcd, "a", "10s");
    assert_eq!(common::health(&w_addr, "").await, Serving as i32);
    assert_eq!(common::health(&w_addr, READY).await, NotServing as i32);

    etcd.resume();
    common::until_health(
        &w_addr,
        READY,
        Serving as i32,
        Duration::from_secs(20),
        "the worker never turned ready after etcd came back",
    )
    .await;
    assert_eq!(records(&etcd).await.len(), 1, "ready means registered");

    // A stream keeps the worker busy through its drain.
    let (_router, addr) = router(&etcd);
    let mut client = router_client(&addr).await;
    until_workers(&mut client, 1, Duration::from_secs(10)).await;
    let running = tokio::spawn(stream(client.clone(), 2000));
    tokio::time::sleep(Duration::from_millis(200)).await;
    worker.sigterm();
    common::until_health(
        &w_addr,
        READY,
        NotServing as i32,
        Duration::from_secs(5),
        "still ready while draining",
    )
    .await;
    assert_eq!(common::health(&w_addr, "").await, NotServing as i32);
    drop(running);
}

/// Model ids may contain `/` (`meta-llama/Llama-3.1-8B-Instruct`, as the chart's examples
/// serve): the router counts a worker leaving under the model its record named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_of_a_model_id_with_a_slash_is_counted_under_that_model_when_it_leaves() {
    const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";
    let etcd = EtcdServer::start();
    let router = common::service(
        "router",
        &[
            "router",
            "--listen",
            "127.0.0.1:0",
            "--registry",
            &etcd.url(),
        ],
    );
    let (worker, _) = registered_worker(
        &etcd.url(),
        "g-slash",
        &["--served-model-name", MODEL, "--drain-grace", "0s"],
    );
    let mut client = router_client(&router.addr).await;
    until_workers(&mut client, 1, Duration::from_secs(10)).await;
    worker.sigterm();
    until_workers(&mut client, 0, Duration::from_secs(10)).await;

    // The link goes when the worker's stream ends; the count when etcd reports the key gone.
    let counted = |labels: &[(&str, &str)]| {
        let samples = common::prom::parse(&common::prom::get(&router.metrics));
        common::prom::value(
            &samples,
            "openinfer_router_worker_registrations_total",
            labels,
        )
    };
    let start = Instant::now();
    while counted(&[("model", MODEL), ("event", "down")]) != 1.0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the departure was never counted under {MODEL}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(counted(&[("model", MODEL), ("event", "up")]), 1.0);
    assert_eq!(
        counted(&[("model", "Llama-3.1-8B-Instruct")]),
        0.0,
        "a departure counted under half the model id"
    );
}

/// etcd closes connections that ping more often than its `--grpc-keepalive-min-time` (5 s by
/// default): on a default-configured etcd the router's watch and the worker's lease stay up
/// for a minute, with no resync and no re-registration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_connections_stay_up_for_a_minute_on_a_default_configured_etcd() {
    let etcd = EtcdServer::start();
    let url = etcd.url();
    let router = common::service(
        "router",
        &["router", "--listen", "127.0.0.1:0", "--registry", &url],
    );
    let worker = common::service(
        "worker",
        &[
            "worker",
            "--engine",
            "sim",
            "--listen",
            "127.0.0.1:0",
            "--registry",
            &url,
            "--group-id",
            "steady",
        ],
    );
    let mut client = router_client(&router.addr).await;
    until_workers(&mut client, 1, Duration::from_secs(10)).await;
    let count = |lines: &[String], what: &str| lines.iter().filter(|l| l.contains(what)).count();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        let (r, w) = (router.log(), worker.log());
        let at = start.elapsed();
        assert_eq!(
            count(&r, "etcd: synchronised"),
            1,
            "the router's watch reconnected and re-read everything within {at:?}"
        );
        assert_eq!(
            count(&r, "etcd unreachable"),
            0,
            "the router lost etcd within {at:?}"
        );
        assert_eq!(
            count(&w, "lost the etcd lease"),
            0,
            "the worker lost its lease stream within {at:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(count(&worker.log(), "registered in etcd"), 1);
}

/// A deleted record means the worker is gone for new work: the router stops counting it at
/// once (new requests get `UNAVAILABLE`, not a wait for their deadline), and when the record
/// comes back (a worker registering again after its lease expired in an etcd stall) the
/// router holds one link to it, not one more per stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_record_stops_new_work_and_a_returning_worker_gets_one_link() {
    let etcd = EtcdServer::start();
    let (_worker, _) = registered_worker(&etcd.url(), "once", &[]);
    let (_router, addr) = router(&etcd);
    let mut client = router_client(&addr).await;
    until_workers(&mut client, 1, Duration::from_secs(10)).await;
    let etcd_client = Etcd::connect(&EtcdConfig::from_url(&etcd.url()).unwrap())
        .await
        .unwrap();
    let (kvs, _) = etcd_client
        .get_prefix(WORKERS_PREFIX.as_bytes())
        .await
        .unwrap();
    let (key, value) = (
        String::from_utf8(kvs[0].key.clone()).unwrap(),
        String::from_utf8(kvs[0].value.clone()).unwrap(),
    );
    for round in 0..3 {
        etcd_client.delete(&key).await.unwrap();
        until_workers(&mut client, 0, Duration::from_secs(5)).await;
        let start = Instant::now();
        let refused = client.generate(req(4)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "round {round}: refused only after {:?}",
            start.elapsed()
        );
        etcd_client.put(&key, &value, 0).await.unwrap();
        until_workers(&mut client, 1, Duration::from_secs(5)).await;
        let done = client.generate(req(4)).await.unwrap().into_inner();
        assert_eq!(done.finish_reason, "length", "round {round}");
    }
    // Counted once, however long the links take to settle.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        assert_eq!(workers_seen(&mut client).await, 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// With every worker of its model lost mid-stream, a stream waits for a replacement for one
/// queue timeout, then ends with `UNAVAILABLE`; it never hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_every_worker_is_lost_ends_after_the_queue_timeout() {
    let (mut worker, w_addr) = common::sim_worker("20ms", &[]);
    let (_router, addr) = common::start_router(&[&w_addr], &["--queue-timeout", "2s"]);
    let mut client = router_client(&addr).await;
    until_workers(&mut client, 1, Duration::from_secs(10)).await;
    let mut s = client
        .generate_stream(req(2000))
        .await
        .unwrap()
        .into_inner();
    // Tokens flow; then the only worker dies.
    assert!(!s.message().await.unwrap().unwrap().token_ids.is_empty());
    worker.0.kill().unwrap();
    let start = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream hung after its only worker was lost");
    let status = ended.expect_err("the stream cannot finish without a worker");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "it did not wait for a replacement: {:?}",
        start.elapsed()
    );
}

/// A client deadline that runs out while tokens are being generated ends the unary call with
/// `DEADLINE_EXCEEDED` from the router (not tonic's `CANCELLED "Timeout expired"`), and the
/// sequence is cancelled on its worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_runs_out_mid_generation_is_deadline_exceeded() {
    let (_w, w_addr) = common::sim_worker("20ms", &[]);
    // Once it knows the pace the router would refuse these requests up front (overload.rs);
    // a worker that slows down after admission is what leaves a request generating at its
    // deadline, as here with deadline admission off.
    let (_router, addr) = common::start_router(&[&w_addr], &["--deadline-admission", "false"]);
    let mut client = router_client(&addr).await;
    until_workers(&mut client, 1, Duration::from_secs(10)).await;
    // 500 tokens at 20 ms a step take 10 s; the deadline is 1 s.
    let mut r = tonic::Request::new(req(500));
    r.set_timeout(Duration::from_secs(1));
    let start = Instant::now();
    let status = client.generate(r).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("generated tokens"), "{status:?}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    // A stream ends the same way: its tokens so far, then DEADLINE_EXCEEDED.
    let mut r = tonic::Request::new(req(500));
    r.set_timeout(Duration::from_secs(1));
    let start = Instant::now();
    let mut stream = client.generate_stream(r).await.unwrap().into_inner();
    let mut tokens = 0;
    let status = loop {
        match stream.message().await {
            Ok(Some(m)) => tokens += m.token_ids.len(),
            Ok(None) => panic!("the stream ended without an error after {tokens} tokens"),
            Err(e) => break e,
        }
    };
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(
        status
            .message()
            .contains(&format!("after {tokens} generated tokens")),
        "{tokens} tokens, then {status:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    // The worker's slots come back: the next request runs.
    let done = client.generate(req(4)).await.unwrap().into_inner();
    assert_eq!(done.finish_reason, "length");
}
