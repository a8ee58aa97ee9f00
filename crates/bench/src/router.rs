//! `openinfer bench-router`: what the router costs. Against `--engine sim` workers (tokens at a
//! fixed step time, no model), it measures
//! 1. time to first token through the router's gRPC API, through its OpenAI-compatible HTTP
//!    API (server-sent events) and straight to the worker's `Execute` stream, sampled in turn
//!    in the same run;
//! 2. one router holding many concurrent streams of each API, with the router's memory.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use openinfer_proto::v1 as pb;
use openinfer_proto::v1::inference_client::InferenceClient;
use openinfer_proto::worker::v1 as wpb;
use openinfer_proto::worker::v1::worker_client::WorkerClient;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::args::BenchRouterArgs;
use crate::chart::{grouped_bars, Group};
use crate::child::{memory, ChildService};
use crate::sse::{Event, SseStream};
use crate::stats::Summary;

/// The prompt of every request (the router tokenizes it; the direct path sends its ids).
const PROMPT: &str = "Hello, how are you today? Tell me a story about a fox.";

#[derive(Serialize)]
struct Report {
    ttft: TtftReport,
    streams: Vec<StreamsReport>,
}

#[derive(Serialize)]
struct TtftReport {
    samples: usize,
    sim_step_ms: f64,
    /// Milliseconds.
    direct: Summary,
    /// Milliseconds.
    router: Summary,
    /// Router p50 minus direct p50, milliseconds.
    added_p50_ms: f64,
    /// Router p99 minus direct p99, milliseconds.
    added_p99_ms: f64,
    /// Milliseconds, through the HTTP API (`/v1/completions`, streamed).
    http: Summary,
    /// HTTP p50 minus gRPC p50, milliseconds: what the HTTP face adds.
    http_added_p50_ms: f64,
    /// HTTP p99 minus gRPC p99, milliseconds.
    http_added_p99_ms: f64,
}

#[derive(Serialize)]
struct StreamsReport {
    /// `grpc` (HTTP/2 streams over `connections`) or `http` (server-sent events, one
    /// connection each).
    api: Api,
    streams: usize,
    tokens_per_stream: u32,
    sim_step_ms: f64,
    connections: usize,
    router_rss_idle_bytes: u64,
    /// The same load, run again on the same router: memory must not keep growing.
    rounds: Vec<Round>,
}

#[derive(Serialize)]
struct Round {
    completed: usize,
    failed: usize,
    /// Most streams open at once (first token seen, final message not yet).
    peak_concurrent: usize,
    wall_seconds: f64,
    /// Milliseconds.
    ttft: Summary,
    /// The router's peak resident memory so far (VmHWM).
    router_rss_peak_bytes: u64,
    /// (peak − idle) ÷ streams.
    bytes_per_stream: f64,
}

/// The API a benchmark's streams use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// `openinfer.v1.Inference/GenerateStream`.
    Grpc,
    /// `POST /v1/completions` with `stream: true`.
    Http,
}

pub fn run(a: BenchRouterArgs) -> anyhow::Result<()> {
    if a.samples == 0
        || a.streams == 0
        || a.stream_tokens == 0
        || a.connections == 0
        || a.rounds == 0
    {
        bail!("--samples, --streams, --stream-tokens, --connections and --rounds must be positive");
    }
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let rt = crate::runtime()?;
    let ttft = rt.block_on(ttft_phase(&a))?;
    let mut streams = Vec::new();
    for &api in &a.stream_apis {
        streams.push(rt.block_on(streams_phase(&a, api))?);
    }
    let report = Report { ttft, streams };
    print_table(&report);
    std::fs::write(
        a.out.join("bench-router.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(a.out.join("bench-router.svg"), chart(&report))?;
    tracing::info!(out = %a.out.display(), "wrote bench-router.json and bench-router.svg");
    Ok(())
}

/// Router flags that let `queue` requests wait.
fn queue_flags(queue: usize) -> Vec<String> {
    let q = queue.to_string();
    ["--max-queued-requests", &q, "--max-queue-per-priority", &q]
        .map(String::from)
        .to_vec()
}

pub(super) async fn channel(addr: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot connect to {addr}"))
}

/// Waits until the router has a worker.
pub(super) async fn ready(client: &mut InferenceClient<Channel>) -> anyhow::Result<()> {
    for _ in 0..600 {
        let models = client
            .list_models(pb::ListModelsRequest {})
            .await?
            .into_inner()
            .models;
        if models.iter().any(|m| m.workers > 0) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the router never connected to its worker")
}

fn request(max_new_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: PROMPT.into(),
        max_new_tokens: Some(max_new_tokens),
        ..Default::default()
    }
}

async fn ttft_phase(a: &BenchRouterArgs) -> anyhow::Result<TtftReport> {
    let worker = ChildService::sim_worker(a.ttft_step_time, 64)?;
    let router = ChildService::router(&[worker.addr.as_str()], &http_flags(queue_flags(1024)))?;
    let http = router.http_addr()?;
    let mut client = InferenceClient::new(channel(&router.addr).await?);
    ready(&mut client).await?;

    // The direct path: one Execute stream, as a router holds it, and the same prompt's ids.
    let mut direct = WorkerClient::new(channel(&worker.addr).await?);
    let tokenizer = direct
        .tokenizer(wpb::TokenizerRequest {})
        .await?
        .into_inner();
    let prompt_ids = tokenizer
        .tokenizer_json
        .parse::<tokenizers::Tokenizer>()
        .map_err(|e| anyhow::anyhow!("worker tokenizer: {e}"))?
        .encode(PROMPT, true)
        .map_err(|e| anyhow::anyhow!("tokenize: {e}"))?
        .get_ids()
        .to_vec();
    let (tx, rx) = mpsc::channel(16);
    let mut events = direct.execute(ReceiverStream::new(rx)).await?.into_inner();
    events.message().await?; // the capacity report on connect

    let warmup = (a.samples / 10).max(5);
    let pb = crate::progress::bar((a.samples + warmup) as u64, "ttft samples");
    let (mut d, mut r, mut h) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..a.samples + warmup {
        // Direct: dispatch one sequence, wait for its token.
        let start = Instant::now();
        tx.send(wpb::ExecuteRequest {
            kind: Some(wpb::execute_request::Kind::Dispatch(wpb::Dispatch {
                backlog: false,
                sequences: vec![wpb::SequenceSpec {
                    sequence_id: i as u64,
                    prompt_ids: prompt_ids.clone(),
                    stopping: Some(wpb::StoppingParams {
                        max_new_tokens: 1,
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
            })),
        })
        .await?;
        let direct_ttft = loop {
            let m = events.message().await?.context("worker stream ended")?;
            if m.tokens.iter().any(|t| t.sequence_id == i as u64) {
                break start.elapsed();
            }
        };
        // Through the router.
        let start = Instant::now();
        let mut stream = client.generate_stream(request(1)).await?.into_inner();
        let router_ttft = loop {
            let m = stream.message().await?.context("router stream ended")?;
            if !m.token_ids.is_empty() {
                break start.elapsed();
            }
        };
        while stream.message().await?.is_some() {}
        // Through the HTTP API: a new connection per request, as OpenAI clients often do.
        let start = Instant::now();
        let mut sse = SseStream::completion(&http, PROMPT, 1).await?;
        let Some(Event::Chunk { .. }) = sse.next().await? else {
            bail!("the HTTP stream ended before its token");
        };
        let http_ttft = start.elapsed();
        while sse.next().await?.is_some() {}
        if i >= warmup {
            d.push(direct_ttft.as_secs_f64() * 1e3);
            r.push(router_ttft.as_secs_f64() * 1e3);
            h.push(http_ttft.as_secs_f64() * 1e3);
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    let (direct, router, http) = (Summary::of(&d), Summary::of(&r), Summary::of(&h));
    Ok(TtftReport {
        samples: a.samples,
        sim_step_ms: a.ttft_step_time.as_secs_f64() * 1e3,
        added_p50_ms: router.p50 - direct.p50,
        added_p99_ms: router.p99 - direct.p99,
        http_added_p50_ms: http.p50 - router.p50,
        http_added_p99_ms: http.p99 - router.p99,
        direct,
        router,
        http,
    })
}

/// Router flags that also serve the HTTP API on a free port.
fn http_flags(mut flags: Vec<String>) -> Vec<String> {
    flags.extend(["--http-listen".into(), "127.0.0.1:0".into()]);
    flags
}

async fn streams_phase(a: &BenchRouterArgs, api: Api) -> anyhow::Result<StreamsReport> {
    let worker = ChildService::sim_worker(a.stream_step_time, a.streams)?;
    let router =
        ChildService::router(&[worker.addr.as_str()], &http_flags(queue_flags(a.streams)))?;
    let http = router.http_addr()?;
    let mut clients = Vec::new();
    for _ in 0..a.connections {
        clients.push(InferenceClient::new(channel(&router.addr).await?));
    }
    ready(&mut clients[0]).await?;
    let pid = router.pid();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (idle, _) = memory(pid).context("cannot read the router's memory from /proc")?;

    let mut rounds = Vec::new();
    for round in 0..a.rounds {
        let pb = crate::progress::bar(
            a.streams as u64,
            &format!("{api:?} streams, round {}", round + 1),
        );
        let mut r = streams_round(a, api, &clients, &http, &pb).await;
        pb.finish_and_clear();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (_, hwm) = memory(pid).context("cannot read the router's memory from /proc")?;
        r.router_rss_peak_bytes = hwm;
        r.bytes_per_stream = hwm.saturating_sub(idle) as f64 / a.streams as f64;
        rounds.push(r);
    }
    Ok(StreamsReport {
        api,
        streams: a.streams,
        tokens_per_stream: a.stream_tokens,
        sim_step_ms: a.stream_step_time.as_secs_f64() * 1e3,
        connections: a.connections,
        router_rss_idle_bytes: idle,
        rounds,
    })
}

/// Opens every stream at once and reads them all to the end.
async fn streams_round(
    a: &BenchRouterArgs,
    api: Api,
    clients: &[InferenceClient<Channel>],
    http: &str,
    pb: &indicatif::ProgressBar,
) -> Round {
    let open = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..a.streams {
        let mut client = clients[i % clients.len()].clone();
        let (open, peak, pb) = (open.clone(), peak.clone(), pb.clone());
        let tokens = a.stream_tokens;
        let http = http.to_owned();
        tasks.spawn(async move {
            if api == Api::Http {
                return sse_round_trip(&http, tokens, &open, &peak, &pb).await;
            }
            let start = Instant::now();
            let mut stream = client.generate_stream(request(tokens)).await?.into_inner();
            let mut ttft = None;
            let mut got = 0;
            while let Some(m) = stream.message().await? {
                if ttft.is_none() && !m.token_ids.is_empty() {
                    ttft = Some(start.elapsed().as_secs_f64() * 1e3);
                    let now = open.fetch_add(1, Ordering::Relaxed) + 1;
                    peak.fetch_max(now, Ordering::Relaxed);
                }
                got += m.token_ids.len();
            }
            open.fetch_sub(1, Ordering::Relaxed);
            pb.inc(1);
            anyhow::ensure!(
                got == tokens as usize,
                "stream ended after {got} of {tokens} tokens"
            );
            anyhow::Ok(ttft.unwrap_or_default())
        });
    }
    let (mut ttfts, mut failed) = (Vec::new(), 0);
    while let Some(res) = tasks.join_next().await {
        match res {
            Ok(Ok(t)) => ttfts.push(t),
            Ok(Err(e)) => {
                failed += 1;
                tracing::debug!(error = %e, "stream failed");
            }
            Err(e) => {
                failed += 1;
                tracing::debug!(error = %e, "stream task failed");
            }
        }
    }
    Round {
        completed: ttfts.len(),
        failed,
        peak_concurrent: peak.load(Ordering::Relaxed),
        wall_seconds: start.elapsed().as_secs_f64(),
        ttft: Summary::of(&ttfts),
        router_rss_peak_bytes: 0,
        bytes_per_stream: 0.0,
    }
}

/// One streamed completion through the HTTP API, read to `[DONE]`: its time to first token.
async fn sse_round_trip(
    addr: &str,
    tokens: u32,
    open: &AtomicUsize,
    peak: &AtomicUsize,
    pb: &indicatif::ProgressBar,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut stream = SseStream::completion(addr, PROMPT, tokens).await?;
    let mut ttft = None;
    let mut finished = false;
    let mut done = false;
    while let Some(e) = stream.next().await? {
        match e {
            Event::Chunk { finished: f, .. } => {
                if ttft.is_none() {
                    ttft = Some(start.elapsed().as_secs_f64() * 1e3);
                    let now = open.fetch_add(1, Ordering::Relaxed) + 1;
                    peak.fetch_max(now, Ordering::Relaxed);
                }
                finished |= f;
            }
            Event::Done => done = true,
        }
    }
    open.fetch_sub(1, Ordering::Relaxed);
    pb.inc(1);
    anyhow::ensure!(
        finished && done,
        "the stream ended without its finish and [DONE]"
    );
    Ok(ttft.unwrap_or_default())
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn print_table(r: &Report) {
    let t = &r.ttft;
    println!(
        "time to first token, {} samples each, sim step {:.1} ms (ms)",
        t.samples, t.sim_step_ms
    );
    println!(
        "{:<22} {:>8} {:>8} {:>8} {:>8}",
        "path", "mean", "p50", "p90", "p99"
    );
    for (name, s) in [
        ("direct to worker", &t.direct),
        ("router, gRPC", &t.router),
        ("router, HTTP (SSE)", &t.http),
    ] {
        println!(
            "{name:<22} {:>8.3} {:>8.3} {:>8.3} {:>8.3}",
            s.mean, s.p50, s.p90, s.p99
        );
    }
    println!(
        "router adds {:.3} ms at p50 ({}), {:.3} ms at p99",
        t.added_p50_ms,
        if t.added_p50_ms < 1.0 {
            "under 1 ms"
        } else {
            "OVER 1 ms"
        },
        t.added_p99_ms
    );
    println!(
        "HTTP adds {:.3} ms at p50 over gRPC ({}), {:.3} ms at p99",
        t.http_added_p50_ms,
        if t.http_added_p50_ms < 1.0 {
            "under 1 ms"
        } else {
            "OVER 1 ms"
        },
        t.http_added_p99_ms
    );
    for s in &r.streams {
        print_streams(s);
    }
}

fn print_streams(s: &StreamsReport) {
    println!();
    println!(
        "{} concurrent {:?} streams × {} tokens over {} connections, sim step {:.0} ms; router idle RSS {:.1} MiB",
        s.streams,
        s.api,
        s.tokens_per_stream,
        if s.api == Api::Http { s.streams } else { s.connections },
        s.sim_step_ms,
        mib(s.router_rss_idle_bytes)
    );
    println!(
        "{:<6} {:>9} {:>6} {:>9} {:>7} {:>9} {:>9} {:>14} {:>11}",
        "round",
        "completed",
        "failed",
        "peak open",
        "wall s",
        "ttft p50",
        "ttft p99",
        "peak RSS MiB",
        "KiB/stream"
    );
    for (i, x) in s.rounds.iter().enumerate() {
        println!(
            "{:<6} {:>9} {:>6} {:>9} {:>7.2} {:>9.1} {:>9.1} {:>14.1} {:>11.1}",
            i + 1,
            x.completed,
            x.failed,
            x.peak_concurrent,
            x.wall_seconds,
            x.ttft.p50,
            x.ttft.p99,
            mib(x.router_rss_peak_bytes),
            x.bytes_per_stream / 1024.0
        );
    }
}

fn chart(r: &Report) -> String {
    let t = &r.ttft;
    let groups = [
        ("mean", t.direct.mean, t.router.mean, t.http.mean),
        ("p50", t.direct.p50, t.router.p50, t.http.p50),
        ("p90", t.direct.p90, t.router.p90, t.http.p90),
        ("p99", t.direct.p99, t.router.p99, t.http.p99),
    ]
    .into_iter()
    .map(|(label, d, r, h)| Group {
        label: format!("TTFT {label} (ms)"),
        values: vec![Some(d), Some(r), Some(h)],
    })
    .collect::<Vec<_>>();
    let peak = r
        .streams
        .iter()
        .map(|s| {
            let rss = s
                .rounds
                .iter()
                .map(|x| x.router_rss_peak_bytes)
                .max()
                .unwrap_or_default();
            format!("{:?} {:.0} MiB", s.api, mib(rss))
        })
        .collect::<Vec<_>>()
        .join(", ");
    grouped_bars(
        &format!(
            "Time to first token, sim step {:.1} ms (lower is better); {} streams: router peak RSS {peak}",
            t.sim_step_ms,
            r.streams.first().map_or(0, |s| s.streams),
        ),
        &["direct to worker", "router, gRPC", "router, HTTP (SSE)"],
        &groups,
    )
}
