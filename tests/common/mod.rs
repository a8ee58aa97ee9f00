//! Helpers shared by the cross-process tests: the `openinfer` binary, child processes that are
//! killed when a test ends, and the address each one logs when it is ready.

#![allow(dead_code)]

pub mod certs;
pub mod etcd;
pub mod kube;
pub mod otlp;
pub mod prom;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openinfer_proto::v1::inference_client::InferenceClient;
use openinfer_proto::worker::v1::{self as wpb, worker_client::WorkerClient};
use tonic::transport::Channel;

/// The `openinfer` binary of this build (`cargo test --workspace` builds it).
pub fn bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> → target/<profile>/openinfer
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join(format!("openinfer{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p openinfer-cli` first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// The Python with the third-party test clients and tools: `OPENINFER_TEST_PYTHON`, else
/// `target/test-venv/bin/python`, which `scripts/test.sh` makes from
/// `scripts/requirements-test.txt`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("OPENINFER_TEST_PYTHON") {
        return p.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-venv/bin/python");
    assert!(
        venv.exists(),
        "no test Python: run scripts/test.sh (it creates {}) or set OPENINFER_TEST_PYTHON",
        venv.display()
    );
    venv
}

/// A child process, killed when dropped (pass or fail).
pub struct Proc(pub Child);

impl Proc {
    /// Sends SIGTERM (a graceful stop).
    pub fn sigterm(&self) {
        let st = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Waits up to `within` for the process to exit on its own; panics with `what` if it
    /// does not.
    pub async fn exit_within(&mut self, within: Duration, what: &str) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(start.elapsed() < within, "{what} after {within:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A mebibyte.
pub const MB: u64 = 1 << 20;

/// A process's resident memory now and at its peak, in bytes (`/proc/PID/status`).
pub fn memory(proc: &Proc) -> (u64, u64) {
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

/// Writes the `tiny` preset model into `dir`.
pub fn make_tiny(dir: &Path) {
    let st = Command::new(bin())
        .args(["make-model", "--preset", "tiny", "--out"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success());
}

/// Runs `openinfer ARGS` and waits until it logs `addr=HOST:PORT`; its log lines are echoed
/// with `name` in front (the test harness shows them when a test fails).
pub fn spawn(name: &str, args: &[&str]) -> (Proc, String) {
    spawn_command(name, Command::new(bin()).args(args))
}

/// [`spawn`] for a prepared command (extra environment, say).
pub fn spawn_command(name: &str, cmd: &mut Command) -> (Proc, String) {
    let s = spawn_logged(name, cmd, false);
    (s.proc, s.addr)
}

/// A service started by [`spawn_service`].
pub struct Service {
    /// The process.
    pub proc: Proc,
    /// Its gRPC address.
    pub addr: String,
    /// Its `/metrics` URL.
    pub metrics: String,
    /// Its HTTP API's base URL (`http://HOST:PORT`), when started with `--http-listen`.
    pub http: String,
    /// Every line it has logged so far.
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl Service {
    /// The lines logged so far.
    pub fn log(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

/// `openinfer ARGS` as a [`Service`] (see [`spawn_service`]).
pub fn service(name: &str, args: &[&str]) -> Service {
    spawn_service(name, Command::new(bin()).args(args))
}

/// A `--engine sim` worker on an ephemeral port with steps of `step`, and `extra` flags.
pub fn sim_worker(step: &str, extra: &[&str]) -> (Proc, String) {
    let mut args = vec![
        "worker",
        "--engine",
        "sim",
        "--sim-step-time",
        step,
        "--listen",
        "127.0.0.1:0",
    ];
    args.extend(extra);
    spawn("sim worker", &args)
}

/// [`spawn_command`] for a service, also waiting for its metrics endpoint
/// (`metrics=http://…/metrics`) and keeping its log lines.
pub fn spawn_service(name: &str, cmd: &mut Command) -> Service {
    spawn_logged(name, cmd, true)
}

fn spawn_logged(name: &str, cmd: &mut Command, metrics: bool) -> Service {
    let set = |k: &str| cmd.get_envs().any(|(key, _)| key == k);
    let http = cmd.get_args().any(|a| a == "--http-listen");
    let defaults = [
        (
            "OPENINFER_LOG",
            "info,openinfer_router=debug,openinfer_registry=debug",
        ),
        ("OPENINFER_LOG_FORMAT", "text"),
        // Services on one host each take a free metrics port.
        ("OPENINFER_METRICS_LISTEN", "127.0.0.1:0"),
    ];
    let missing: Vec<_> = defaults.into_iter().filter(|(k, _)| !set(k)).collect();
    let mut child = cmd.envs(missing).stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let child = Proc(child);
    let (tx, rx) = std::sync::mpsc::channel();
    let tag = name.to_string();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let keep = metrics.then(|| lines.clone());
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{tag}: {line}");
            if let Some(k) = &keep {
                k.lock().unwrap().push(line.clone());
            }
            for key in ["addr=", "metrics=", "http="] {
                // Text lines say `addr=HOST:PORT`; JSON lines `"addr":"HOST:PORT"`.
                let json_key = format!("\"{}\":\"", &key[..key.len() - 1]);
                let value = line
                    .find(key)
                    .map(|i| &line[i + key.len()..])
                    .or_else(|| line.find(&json_key).map(|i| &line[i + json_key.len()..]))
                    .and_then(|v| v.split([' ', '"']).find(|s| !s.is_empty()));
                if let Some(v) = value {
                    let _ = tx.send((key, v.to_string()));
                }
            }
        }
    });
    let mut addr = None;
    let mut url = None;
    let mut base = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while addr.is_none() || (metrics && url.is_none()) || (http && base.is_none()) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(("addr=", v)) => addr = addr.or(Some(v)),
            Ok(("http=", v)) => base = base.or(Some(v)),
            Ok((_, v)) => url = url.or(Some(v)),
            Err(_) => panic!("{name} never announced its address (and metrics endpoint)"),
        }
    }
    Service {
        proc: child,
        addr: addr.unwrap_or_default(),
        metrics: url.unwrap_or_default(),
        http: base.unwrap_or_default(),
        lines,
    }
}

/// A worker on `model`, on an ephemeral port.
pub fn start_worker(model: &Path, extra: &[&str]) -> (Proc, String) {
    let model = model.to_str().unwrap();
    let mut args = vec!["worker", "--listen", "127.0.0.1:0", "--model", model];
    args.extend(extra);
    spawn("worker", &args)
}

/// A router in front of `workers`, on an ephemeral port.
pub fn start_router(workers: &[&str], extra: &[&str]) -> (Proc, String) {
    let list = workers.join(",");
    let mut args = vec!["router", "--listen", "127.0.0.1:0", "--workers", &list];
    args.extend(extra);
    spawn("router", &args)
}

/// A fresh `tiny` model in a temporary directory (kept while the guard lives).
pub fn tiny_model() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    make_tiny(&model);
    (tmp, model)
}

/// A client of the router's public API.
pub async fn router_client(addr: &str) -> InferenceClient<Channel> {
    InferenceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

/// A client of a worker's internal API.
pub async fn worker_client(addr: &str) -> WorkerClient<Channel> {
    WorkerClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

/// A worker's latest capacity report (in `Health`, `dispatched` counts every connection).
pub async fn capacity(client: &mut WorkerClient<Channel>) -> wpb::CapacityReport {
    client
        .health(wpb::HealthRequest {})
        .await
        .unwrap()
        .into_inner()
        .capacity
        .unwrap()
}

/// The `grpc.health.v1` status of `service` at `addr`, on a fresh connection.
pub async fn health(addr: &str, service: &str) -> i32 {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

/// Workers the router lists, over all models.
pub async fn workers_seen(client: &mut InferenceClient<Channel>) -> u32 {
    client
        .list_models(openinfer_proto::v1::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models
        .iter()
        .map(|m| m.workers)
        .sum()
}

/// Waits until the router lists at least `workers` workers.
pub async fn wait_for_workers(client: &mut InferenceClient<Channel>, workers: u32) {
    for _ in 0..200 {
        if workers_seen(client).await >= workers {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the router never saw {workers} workers");
}

/// A sim worker registering as `group` in the registry at `url`, with `extra` flags.
pub fn registered_worker(url: &str, group: &str, extra: &[&str]) -> (Proc, String) {
    let mut args = vec![
        "worker",
        "--engine",
        "sim",
        "--listen",
        "127.0.0.1:0",
        "--registry",
        url,
        "--group-id",
        group,
    ];
    args.extend(extra);
    spawn(&format!("worker {group}"), &args)
}

/// A sim worker (5 ms steps) registered in `etcd` with lease TTL 2 s and drain grace `grace`.
pub fn draining_worker(etcd: &etcd::EtcdServer, group: &str, grace: &str) -> (Proc, String) {
    registered_worker(
        &etcd.url(),
        group,
        &[
            "--sim-step-time",
            "5ms",
            "--lease-ttl",
            "2s",
            "--drain-grace",
            grace,
        ],
    )
}

/// A request for `max_new` tokens of "hello" (eos allowed).
pub fn hello(max_new: u32) -> openinfer_proto::v1::GenerateRequest {
    openinfer_proto::v1::GenerateRequest {
        prompt: "hello".into(),
        max_new_tokens: Some(max_new),
        ..Default::default()
    }
}

/// Streams `hello(n)` to the end: (token ids, text, finish reason).
pub async fn stream(
    mut client: InferenceClient<Channel>,
    n: u32,
) -> Result<(Vec<u32>, String, String), tonic::Status> {
    let mut s = client.generate_stream(hello(n)).await?.into_inner();
    let (mut ids, mut text, mut reason) = (Vec::new(), String::new(), String::new());
    while let Some(m) = s.message().await? {
        ids.extend(m.token_ids);
        text.push_str(&m.text);
        reason = m.finish_reason;
    }
    Ok((ids, text, reason))
}

/// A router following the registry at `url`, with `extra` flags.
pub fn registry_router(url: &str, extra: &[&str]) -> (Proc, String) {
    let mut args = vec!["router", "--listen", "127.0.0.1:0", "--registry", url];
    args.extend(extra);
    spawn("router", &args)
}

/// Waits until the router sees `n` workers; returns how long that took.
pub async fn until_workers(
    client: &mut InferenceClient<Channel>,
    n: u32,
    within: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        if workers_seen(client).await == n {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "router saw {} workers, not {n}, after {within:?}",
            workers_seen(client).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `service`'s `grpc.health.v1` status at `addr` is `status`, for at most `within`;
/// `what` says what the wait means when it fails.
pub async fn until_health(addr: &str, service: &str, status: i32, within: Duration, what: &str) {
    let start = Instant::now();
    while health(addr, service).await != status {
        assert!(start.elapsed() < within, "{what} (after {within:?})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// (prompt ids, max new tokens, expected ids) of every committed HF transformers reference
/// case of the fixture model `model` (tests/fixtures/expected).
pub fn reference_cases(model: &str) -> Vec<(Vec<u32>, u32, Vec<u32>)> {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    openinfer_engine::reference::read_all(&fixtures)
        .unwrap()
        .into_iter()
        .find(|r| r.model == model)
        .unwrap_or_else(|| panic!("no reference for {model}"))
        .cases
        .into_iter()
        .map(|c| (c.prompt_ids, c.max_new, c.expected))
        .collect()
}

/// A greedy request for exactly `max_new` tokens after `prompt_ids`.
pub fn greedy(prompt_ids: &[u32], max_new: u32) -> openinfer_proto::v1::GenerateRequest {
    openinfer_proto::v1::GenerateRequest {
        prompt_ids: prompt_ids.to_vec(),
        max_new_tokens: Some(max_new),
        temperature: Some(0.0),
        ignore_eos: true,
        ..Default::default()
    }
}

/// Sends every reference case of `model` through `client` at once (batched, greedy) and
/// asserts each answer is the reference's tokens; `what` names the setup in a failure.
pub async fn assert_reference_tokens(client: &InferenceClient<Channel>, model: &str, what: &str) {
    let calls = reference_cases(model)
        .into_iter()
        .map(|(prompt, max_new, want)| {
            let mut client = client.clone();
            async move {
                let got = client
                    .generate(greedy(&prompt, max_new))
                    .await
                    .unwrap()
                    .into_inner()
                    .token_ids;
                (got, want)
            }
        });
    for (i, (got, want)) in futures::future::join_all(calls)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(
            got, want,
            "{what}, case {i}: the tokens differ from the reference (tp=1)"
        );
    }
}

/// A raw HTTP/1.1 exchange with `base` (`http://HOST:PORT` or `HOST:PORT`): (status, head in
/// lower case, body).
pub fn http(base: &str, method: &str, path: &str, body: &str) -> (u16, String, String) {
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    std::io::Write::write_fmt(
        &mut s,
        format_args!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .unwrap();
    let mut raw = String::new();
    std::io::Read::read_to_string(&mut s, &mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}
