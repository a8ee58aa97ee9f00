//! `openinfer` child processes started by benchmarks: each is killed when dropped, and is ready
//! once it logs the address it listens on.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

/// A running `openinfer` service in a child process.
pub struct ChildService {
    child: Child,
    /// The address it listens on.
    pub addr: String,
    /// Its Prometheus endpoint (`http://HOST:PORT/metrics`), once it logged one.
    pub metrics: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    /// Its HTTP API's address (`HOST:PORT`), once it logged one (`--http-listen`).
    http: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl ChildService {
    /// Runs `openinfer ARGS` and waits (up to a minute) for its `addr=` log line.
    pub fn spawn(name: &str, args: &[&str]) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find the openinfer binary")?;
        let mut child = Command::new(exe)
            .args(args)
            .env("OPENINFER_LOG", "info")
            .env("OPENINFER_LOG_FORMAT", "text")
            // Benchmark children are scraped by nobody: any free loopback port will do.
            .env("OPENINFER_METRICS_LISTEN", "127.0.0.1:0")
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start the {name}"))?;
        let stderr = child.stderr.take().context("child stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        let name_ = name.to_string();
        let metrics = std::sync::Arc::new(std::sync::Mutex::new(None));
        let metrics_ = metrics.clone();
        let http = std::sync::Arc::new(std::sync::Mutex::new(None));
        let http_ = http.clone();
        std::thread::spawn(move || {
            let mut last = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                tracing::debug!(target: "openinfer::child", "{name_}: {line}");
                if let Some(i) = line.find("metrics=") {
                    let url = line[i + 8..].split_whitespace().next().unwrap_or_default();
                    if let Ok(mut m) = metrics_.lock() {
                        *m = Some(url.to_string());
                    }
                }
                if let Some(i) = line.find("http=http://") {
                    let addr = line[i + 12..].split_whitespace().next().unwrap_or_default();
                    if let Ok(mut h) = http_.lock() {
                        *h = Some(addr.to_string());
                    }
                }
                if let Some(i) = line.find("addr=") {
                    let addr = line[i + 5..].split_whitespace().next().unwrap_or_default();
                    let _ = tx.send(Ok(addr.to_string()));
                }
                last = line;
            }
            // It exited before announcing an address: pass on its last words.
            let _ = tx.send(Err(last));
        });
        let mut svc = ChildService {
            child,
            addr: String::new(),
            metrics,
            http,
        };
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(addr)) => svc.addr = addr,
            Ok(Err(last)) => bail!("the {name} exited at start: {last}"),
            Err(_) => bail!(
                "the {name} did not start within a minute (run with --log debug to see its log)"
            ),
        }
        Ok(svc)
    }

    /// A `--engine sim` worker on a free loopback port: one token per sequence every `step`,
    /// `slots` running sequences at most (and as many waiting).
    ///
    /// A sim step takes `step` whatever it holds, so its token budget is set to hold every
    /// running sequence's decode and a whole prompt besides: a request's prompt then takes one
    /// step, as the capacity the benchmarks print assumes (a model's budget would chunk long
    /// prompts and cap the batch at `--max-batch-tokens` decodes).
    pub fn sim_worker(step: Duration, slots: usize) -> anyhow::Result<Self> {
        let step = format!("{}us", step.as_micros());
        let budget = (slots + SIM_PROMPT_BUDGET).to_string();
        let slots = slots.to_string();
        Self::spawn(
            "sim worker",
            &[
                "worker",
                "--engine",
                "sim",
                "--listen",
                "127.0.0.1:0",
                "--sim-step-time",
                &step,
                "--max-running",
                &slots,
                "--max-waiting",
                &slots,
                "--max-batch-tokens",
                &budget,
            ],
        )
    }

    /// A router on a free loopback port in front of `workers`, with `extra` flags (other
    /// settings come from its defaults and `OPENINFER_*` variables).
    pub fn router(workers: &[&str], extra: &[String]) -> anyhow::Result<Self> {
        let list = workers.join(",");
        let mut args = vec!["router", "--listen", "127.0.0.1:0", "--workers", &list];
        args.extend(extra.iter().map(String::as_str));
        Self::spawn("router", &args)
    }

    /// Its HTTP API's address (`HOST:PORT`), waiting up to ten seconds for it to be logged.
    pub fn http_addr(&self) -> anyhow::Result<String> {
        for _ in 0..1000 {
            if let Some(a) = self.http.lock().ok().and_then(|h| h.clone()) {
                return Ok(a);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("the service logged no HTTP API address (is --http-listen set?)")
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The sum of every sample of counter `name` on its metrics endpoint (0 when absent).
    pub fn counter(&self, name: &str) -> anyhow::Result<f64> {
        let url = self
            .metrics
            .lock()
            .ok()
            .and_then(|m| m.clone())
            .context("the child has not logged its metrics endpoint")?;
        let text = http_get(&url)?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }
}

/// The body of a plain `GET` of an `http://HOST:PORT/PATH` URL (HTTP/1.0, loopback).
fn http_get(url: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").context("not an http:// URL")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = std::net::TcpStream::connect(host)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (_, body) = response
        .split_once("\r\n\r\n")
        .context("a malformed HTTP response")?;
    Ok(body.to_string())
}

/// Prompt tokens a sim worker's step takes beside its decodes (a generous prompt, or a
/// thousand short ones).
const SIM_PROMPT_BUDGET: usize = 32_768;

impl Drop for ChildService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident and peak resident memory of a process, in bytes (Linux `/proc`).
pub fn memory(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}
