//! `openinfer bench`: drives a router the way serving systems are measured (after vLLM's
//! `bench serve`): a fixed concurrency or a fixed request rate (Poisson or gamma arrivals),
//! synthetic prompts, a priority mix; it reports latency percentiles, throughput, outcomes and
//! goodput against SLOs, overall and per priority, as a table and a JSON file.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use openinfer_proto::v1 as pb;
use openinfer_proto::v1::inference_client::InferenceClient;
use serde::Serialize;
use tonic::transport::Channel;

use crate::args::BenchArgs;
use crate::chart::{grouped_bars, lines, Group as Bars};
use crate::child::{memory, ChildService};
use crate::stats::{Slo, Summary};
use crate::workload::{interarrival, parse_priority_mix, priority_of, read_dataset, Prompt};

/// Words synthetic prompts are made of.
const WORDS: &[&str] = &[
    "the", "model", "serves", "many", "requests", "at", "once", "while", "each", "client", "waits",
    "for", "its", "answer", "to", "stream", "back", "token", "by", "and",
];

/// How one request went.
struct Outcome {
    priority: i32,
    result: Result<Done, Failure>,
}

struct Done {
    prompt_tokens: u32,
    output_tokens: u32,
    /// Seconds.
    ttft: f64,
    e2e: f64,
    /// Gaps between tokens after the first, seconds (a message with k tokens counts k gaps of
    /// its gap / k).
    itl: Vec<f64>,
    /// When it ended, in seconds from the start of its step.
    ended_at: f64,
}

enum Failure {
    /// Admission refused it (`RESOURCE_EXHAUSTED`).
    Refused,
    /// It ran past its deadline (`DEADLINE_EXCEEDED`, from the router or the client).
    Late,
    /// Anything else.
    Error(String),
}

/// Results of one group of requests (all, or one priority).
#[derive(Serialize)]
struct Group {
    requests: usize,
    completed: usize,
    refused: usize,
    /// Ended with `DEADLINE_EXCEEDED` (only with --deadline).
    late: usize,
    errors: usize,
    /// Prompt and generated tokens of the completed requests.
    input_tokens: u64,
    output_tokens: u64,
    /// Completed requests per second of the run.
    request_throughput: f64,
    output_tokens_per_s: f64,
    total_tokens_per_s: f64,
    ttft_ms: Summary,
    tpot_ms: Summary,
    itl_ms: Summary,
    e2e_ms: Summary,
    /// Completed requests meeting every SLO, per second.
    goodput: f64,
    slo_met: usize,
    /// The first error seen, if any (refusals are not errors).
    first_error: Option<String>,
}

/// How load is offered in one step.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
enum Load {
    /// This many requests in flight.
    Concurrency(usize),
    /// This many arrivals per second.
    Rate(f64),
}

impl Load {
    fn label(&self) -> String {
        match self {
            Load::Concurrency(c) => format!("concurrency {c}"),
            Load::Rate(r) => format!("{r} req/s"),
        }
    }
}

/// The whole run: one report per step.
#[derive(Serialize)]
struct Run {
    addr: String,
    /// The sim cluster this run started (--spawn-sim-workers).
    sim: Option<SimCluster>,
    steps: Vec<Report>,
    /// HF transformers `generate` at the concurrency steps' batch sizes (--hf-baseline).
    hf_transformers: Option<serde_json::Value>,
}

/// What a spawned sim cluster can do at best.
#[derive(Serialize)]
struct SimCluster {
    workers: usize,
    step_ms: f64,
    max_running_per_worker: usize,
    /// Requests per second when every slot is busy: workers × slots / (output tokens × step).
    capacity_rps: f64,
    /// End-to-end latency with no overhead at all: one step per output token.
    ideal_e2e_ms: f64,
}

/// Generated tokens, and those wasted on requests that did not complete.
#[derive(Serialize, Clone, Copy)]
struct TokenWork {
    generated: f64,
    wasted: f64,
}

/// Memory of the spawned server process (the router, or `openinfer serve`) after a step.
#[derive(Serialize)]
struct ServerMemory {
    process: &'static str,
    rss_mib: f64,
    peak_rss_mib: f64,
}

/// The processes a run started, stopped when dropped.
struct Spawned {
    /// Kept to keep them running.
    _procs: Vec<ChildService>,
    addr: String,
    /// The process whose memory is reported, and what it is.
    server: (u32, &'static str),
    sim: Option<SimCluster>,
}

impl Spawned {
    fn start(a: &BenchArgs) -> anyhow::Result<Option<Spawned>> {
        if let Some(n) = a.spawn_sim_workers {
            if n == 0 || a.sim_max_running == 0 || a.sim_step_time.is_zero() {
                bail!(
                    "--spawn-sim-workers, --sim-max-running and --sim-step-time must be positive"
                );
            }
            let mut procs = (0..n)
                .map(|_| ChildService::sim_worker(a.sim_step_time, a.sim_max_running))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let addrs: Vec<&str> = procs.iter().map(|p| p.addr.as_str()).collect();
            let router = ChildService::router(&addrs, &[])?;
            let step = a.sim_step_time.as_secs_f64();
            let sim = SimCluster {
                workers: n,
                step_ms: step * 1e3,
                max_running_per_worker: a.sim_max_running,
                capacity_rps: (n * a.sim_max_running) as f64 / (f64::from(a.output_len) * step),
                ideal_e2e_ms: f64::from(a.output_len) * step * 1e3,
            };
            println!(
                "sim cluster: {n} workers × {} slots, {:.1} ms steps: capacity {:.1} req/s at {} output tokens, ideal e2e {:.0} ms",
                a.sim_max_running, sim.step_ms, sim.capacity_rps, a.output_len, sim.ideal_e2e_ms
            );
            let (addr, pid) = (router.addr.clone(), router.pid());
            procs.push(router);
            return Ok(Some(Spawned {
                _procs: procs,
                addr,
                server: (pid, "router"),
                sim: Some(sim),
            }));
        }
        if !a.spawn {
            return Ok(None);
        }
        let mut args = vec!["serve".to_string(), "--listen".into(), "127.0.0.1:0".into()];
        if let Some(m) = &a.model {
            args.push("--model".into());
            args.push(m.display().to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let serve = ChildService::spawn("server", &args)?;
        Ok(Some(Spawned {
            addr: serve.addr.clone(),
            server: (serve.pid(), "serve"),
            _procs: vec![serve],
            sim: None,
        }))
    }

    /// The router's generated and wasted token counters so far (the router is the last
    /// process started: `router`, or `serve` with the router inside).
    fn token_work(&self) -> Option<TokenWork> {
        let router = self._procs.last()?;
        let read = |name| router.counter(name).ok();
        Some(TokenWork {
            generated: read("openinfer_router_generation_tokens_total")?,
            wasted: read("openinfer_router_wasted_tokens_total")?,
        })
    }

    fn memory(&self) -> Option<ServerMemory> {
        let (pid, process) = self.server;
        let (rss, peak) = memory(pid)?;
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        Some(ServerMemory {
            process,
            rss_mib: mib(rss),
            peak_rss_mib: mib(peak),
        })
    }
}

#[derive(Serialize)]
struct Report {
    load: Load,
    mode: String,
    num_requests: usize,
    input_words: usize,
    output_tokens: u32,
    /// What was read of `--dataset` (prompts, records, skipped and dropped ones).
    dataset: Option<String>,
    /// Prompt lengths in tokens of the completed requests (from their usage), when prompts
    /// come from a dataset: the synthetic word count says nothing then.
    prompt_tokens: Option<TokenLengths>,
    priority_mix: String,
    slo: Slo,
    wall_seconds: f64,
    /// The spawned server's memory after the step (--spawn, --spawn-sim-workers).
    server_memory: Option<ServerMemory>,
    /// Tokens the spawned router saw generated in the step, and how many of them went to
    /// requests that then did not complete (--spawn, --spawn-sim-workers).
    router_tokens: Option<TokenWork>,
    /// The client deadline of every request, in seconds (--deadline).
    deadline_seconds: Option<f64>,
    /// Goodput against the spawned sim cluster's capacity (--spawn-sim-workers).
    goodput_of_capacity: Option<f64>,
    /// Goodput in each whole window of `GOODPUT_WINDOW_S` seconds of the step, requests/s:
    /// whether it held for the whole run, not just on average.
    goodput_by_window: Vec<f64>,
    overall: Group,
    by_priority: BTreeMap<i32, Group>,
}

/// Token lengths of prompts: mean, median, 90th percentile and longest.
#[derive(Serialize)]
struct TokenLengths {
    mean: f64,
    p50: f64,
    p90: f64,
    max: f64,
}

impl TokenLengths {
    fn of(outcomes: &[Outcome]) -> Option<Self> {
        let v: Vec<f64> = outcomes
            .iter()
            .filter_map(|o| o.result.as_ref().ok())
            .map(|d| f64::from(d.prompt_tokens))
            .collect();
        let s = Summary::of(&v);
        (s.n > 0).then(|| TokenLengths {
            mean: s.mean,
            p50: s.p50,
            p90: s.p90,
            max: v.iter().copied().fold(0.0, f64::max),
        })
    }
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    if let Some(mix) = &a.tenant_mix {
        return crate::tenants::run(&a, mix);
    }
    if a.prefix_cache_compare {
        return crate::prefix::run(&a);
    }
    if a.num_requests == 0 || a.output_len == 0 || a.input_len == 0 {
        bail!("--num-requests, --input-len and --output-len must be positive");
    }
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if a.rate.iter().any(|&r| !positive(r)) || !positive(a.burstiness) {
        bail!("--rate and --burstiness must be positive");
    }
    let steps: Vec<Load> = if a.sweep {
        [1, 2, 4, 8, 16, 32].map(Load::Concurrency).to_vec()
    } else if !a.rate.is_empty() {
        a.rate.iter().map(|&r| Load::Rate(r)).collect()
    } else {
        a.concurrency
            .iter()
            .map(|&c| Load::Concurrency(c.max(1)))
            .collect()
    };
    let mix = parse_priority_mix(&a.priority_mix).map_err(anyhow::Error::msg)?;
    let mut slo = Slo::parse(&a.slo).map_err(anyhow::Error::msg)?;
    // A request done after its deadline is no good to its client, whatever the server said.
    if let Some(d) = a.deadline {
        let d = d.as_secs_f64();
        slo.e2e = Some(slo.e2e.map_or(d, |e| e.min(d)));
    }
    let (dataset, dataset_read) = match &a.dataset {
        Some(path) => {
            let d = read_dataset(path).map_err(anyhow::Error::msg)?;
            let read = format!("{}: {}", path.display(), d.describe());
            tracing::info!(dataset = %read, "dataset read");
            (d.prompts, Some(read))
        }
        None => (Vec::new(), None),
    };
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    crate::runtime()?.block_on(async move {
        let mut spawned = Spawned::start(&a)?;
        let addr = spawned.as_ref().map_or(a.addr.clone(), |s| s.addr.clone());
        let mut client = InferenceClient::new(crate::router::channel(&addr).await?);
        crate::router::ready(&mut client).await?;

        let mut run = Run {
            addr,
            sim: spawned.as_mut().and_then(|s| s.sim.take()),
            steps: Vec::new(),
            hf_transformers: None,
        };
        for load in steps {
            let before = spawned.as_ref().and_then(Spawned::token_work);
            let start = Instant::now();
            let outcomes = drive(&a, load, client.clone(), &mix, &dataset).await;
            let wall = start.elapsed().as_secs_f64();
            let mut report = report(&a, load, &outcomes, wall, &slo);
            report.dataset = dataset_read.clone();
            report.server_memory = spawned.as_ref().and_then(Spawned::memory);
            let after = spawned.as_ref().and_then(Spawned::token_work);
            report.router_tokens = before.zip(after).map(|(b, a)| TokenWork {
                generated: a.generated - b.generated,
                wasted: a.wasted - b.wasted,
            });
            report.goodput_of_capacity = run
                .sim
                .as_ref()
                .map(|s| report.overall.goodput / s.capacity_rps);
            print_table(&report);
            run.steps.push(report);
        }
        drop(spawned);
        if a.hf_baseline {
            run.hf_transformers = hf_baseline(&a, &run)?;
            print_hf(&run);
        }
        let path = a.out.join("bench.json");
        std::fs::write(&path, serde_json::to_string_pretty(&run)?)?;
        if run.steps.len() > 1 {
            std::fs::write(a.out.join("bench.svg"), chart(&run))?;
        }
        if let Some(svg) = hf_chart(&run) {
            std::fs::write(a.out.join("bench-hf.svg"), svg)?;
        }
        tracing::info!(out = %a.out.display(), "wrote the results");
        anyhow::Ok(())
    })
}

/// Request `i`: the dataset's entry `i` (cycling) or a synthetic prompt; its priority.
fn report(a: &BenchArgs, load: Load, outcomes: &[Outcome], wall: f64, slo: &Slo) -> Report {
    let mut by_priority: BTreeMap<i32, Vec<&Outcome>> = BTreeMap::new();
    for o in outcomes {
        by_priority.entry(o.priority).or_default().push(o);
    }
    Report {
        load,
        mode: match load {
            Load::Rate(r) => format!("rate {r}/s, burstiness {}", a.burstiness),
            Load::Concurrency(c) => format!("concurrency {c}"),
        },
        num_requests: a.num_requests,
        input_words: a.input_len,
        output_tokens: a.output_len,
        dataset: None,
        prompt_tokens: a.dataset.as_ref().and_then(|_| TokenLengths::of(outcomes)),
        priority_mix: a.priority_mix.clone(),
        slo: *slo,
        wall_seconds: wall,
        server_memory: None,
        router_tokens: None,
        goodput_by_window: goodput_by_window(outcomes, wall, slo),
        deadline_seconds: a.deadline.map(|d| d.as_secs_f64()),
        goodput_of_capacity: None,
        overall: group(&outcomes.iter().collect::<Vec<_>>(), wall, slo),
        by_priority: by_priority
            .into_iter()
            .map(|(p, os)| (p, group(&os, wall, slo)))
            .collect(),
    }
}

/// Seconds in each window of [`goodput_by_window`].
const GOODPUT_WINDOW_S: f64 = 10.0;

/// Requests per second that ended meeting every objective, in each whole window of
/// [`GOODPUT_WINDOW_S`] seconds of a step that took `wall` seconds.
fn goodput_by_window(outcomes: &[Outcome], wall: f64, slo: &Slo) -> Vec<f64> {
    let windows = (wall / GOODPUT_WINDOW_S) as usize;
    let mut good = vec![0usize; windows];
    for o in outcomes {
        if let Ok(d) = &o.result {
            let w = (d.ended_at / GOODPUT_WINDOW_S) as usize;
            if w < windows && slo.met(d.ttft, tpot(d), d.e2e) {
                good[w] += 1;
            }
        }
    }
    good.into_iter()
        .map(|n| n as f64 / GOODPUT_WINDOW_S)
        .collect()
}

/// Latency percentiles against load, one line each.
fn chart(run: &Run) -> String {
    let labels: Vec<String> = run.steps.iter().map(|r| r.load.label()).collect();
    let pick = |f: fn(&Group) -> f64| run.steps.iter().map(|r| f(&r.overall)).collect();
    lines(
        "Latency against load (lower is better)",
        "milliseconds",
        &labels,
        &[
            ("TTFT p50", pick(|g| g.ttft_ms.p50)),
            ("TTFT p99", pick(|g| g.ttft_ms.p99)),
            ("E2E p50", pick(|g| g.e2e_ms.p50)),
            ("E2E p99", pick(|g| g.e2e_ms.p99)),
        ],
    )
}

fn request(
    a: &BenchArgs,
    i: usize,
    mix: &[(i32, f64)],
    dataset: &[Prompt],
) -> (i32, pb::GenerateRequest) {
    let (prompt, output_len, priority) = match dataset.get(i % dataset.len().max(1)) {
        Some(p) => (
            p.prompt.clone(),
            p.output_len.unwrap_or(a.output_len).min(a.output_len),
            p.priority,
        ),
        None => {
            let words: Vec<&str> = (0..a.input_len)
                .map(|k| WORDS[(i * 7 + k * 3) % WORDS.len()])
                .collect();
            (words.join(" "), a.output_len, None)
        }
    };
    let priority = priority.unwrap_or_else(|| priority_of(mix, i));
    let req = pb::GenerateRequest {
        model: a.model_name.clone(),
        prompt,
        max_new_tokens: Some(output_len),
        ignore_eos: true,
        priority,
        ..Default::default()
    };
    (priority, req)
}

/// Runs every request, at the configured concurrency or rate.
async fn drive(
    a: &BenchArgs,
    load: Load,
    client: InferenceClient<Channel>,
    mix: &[(i32, f64)],
    dataset: &[Prompt],
) -> Vec<Outcome> {
    let pb = crate::progress::bar(a.num_requests as u64, "requests");
    let deadline = a.deadline;
    let step_start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    match load {
        Load::Rate(rate) => {
            let mut rng = rand::rng();
            for i in 0..a.num_requests {
                let (priority, req) = request(a, i, mix, dataset);
                let (mut client, pb) = (client.clone(), pb.clone());
                tasks.spawn(async move {
                    let o = one(&mut client, req, priority, deadline, step_start).await;
                    pb.inc(1);
                    vec![o]
                });
                tokio::time::sleep(interarrival(&mut rng, rate, a.burstiness)).await;
            }
        }
        Load::Concurrency(concurrency) => {
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..concurrency {
                let (mut client, next, pb) = (client.clone(), next.clone(), pb.clone());
                let reqs: Vec<(i32, pb::GenerateRequest)> = (0..a.num_requests)
                    .map(|i| request(a, i, mix, dataset))
                    .collect();
                tasks.spawn(async move {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some((priority, req)) = reqs.get(i).cloned() else {
                            return done;
                        };
                        done.push(one(&mut client, req, priority, deadline, step_start).await);
                        pb.inc(1);
                    }
                });
            }
        }
    }
    let mut outcomes = Vec::with_capacity(a.num_requests);
    while let Some(r) = tasks.join_next().await {
        outcomes.extend(r.unwrap_or_default());
    }
    pb.finish_and_clear();
    outcomes
}

/// Sends one streaming request and times it.
async fn one(
    client: &mut InferenceClient<Channel>,
    req: pb::GenerateRequest,
    priority: i32,
    deadline: Option<Duration>,
    step_start: Instant,
) -> Outcome {
    let failure = |s: tonic::Status| match s.code() {
        tonic::Code::ResourceExhausted => Failure::Refused,
        tonic::Code::DeadlineExceeded => Failure::Late,
        _ => Failure::Error(format!("{:?}: {}", s.code(), s.message())),
    };
    let start = Instant::now();
    let mut req = tonic::Request::new(req);
    if let Some(d) = deadline {
        req.set_timeout(d);
    }
    let result = async {
        let mut stream = client
            .generate_stream(req)
            .await
            .map_err(failure)?
            .into_inner();
        let (mut ttft, mut last, mut itl, mut tokens) = (None, start, Vec::new(), 0u32);
        while let Some(m) = stream.message().await.map_err(failure)? {
            let now = Instant::now();
            let k = m.token_ids.len();
            if k > 0 {
                if ttft.is_none() {
                    ttft = Some((now - start).as_secs_f64());
                    // Tokens that arrived with the first one have no gap of their own.
                    itl.extend(std::iter::repeat_n(0.0, k - 1));
                } else {
                    let gap = (now - last).as_secs_f64() / k as f64;
                    itl.extend(std::iter::repeat_n(gap, k));
                }
                last = now;
                tokens += k as u32;
            }
            if !m.finish_reason.is_empty() {
                return Ok(Done {
                    ended_at: (now - step_start).as_secs_f64(),
                    prompt_tokens: m.usage.map_or(0, |u| u.prompt_tokens),
                    output_tokens: tokens,
                    ttft: ttft.unwrap_or_default(),
                    e2e: (now - start).as_secs_f64(),
                    itl,
                });
            }
        }
        Err(Failure::Error(
            "the stream ended without a final message".into(),
        ))
    }
    .await;
    Outcome { priority, result }
}

fn tpot(d: &Done) -> f64 {
    if d.output_tokens > 1 {
        (d.e2e - d.ttft) / f64::from(d.output_tokens - 1)
    } else {
        0.0
    }
}

fn group(outcomes: &[&Outcome], wall: f64, slo: &Slo) -> Group {
    let done: Vec<&Done> = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().ok())
        .collect();
    let refused = outcomes
        .iter()
        .filter(|o| matches!(o.result, Err(Failure::Refused)))
        .count();
    let late = outcomes
        .iter()
        .filter(|o| matches!(o.result, Err(Failure::Late)))
        .count();
    let errors = outcomes
        .iter()
        .filter(|o| matches!(o.result, Err(Failure::Error(_))))
        .count();
    let ms = |f: &dyn Fn(&Done) -> f64| {
        Summary::of(&done.iter().map(|d| f(d) * 1e3).collect::<Vec<_>>())
    };
    let itl: Vec<f64> = done
        .iter()
        .flat_map(|d| d.itl.iter().map(|g| g * 1e3))
        .collect();
    let out: u64 = done.iter().map(|d| u64::from(d.output_tokens)).sum();
    let input: u64 = done.iter().map(|d| u64::from(d.prompt_tokens)).sum();
    let total = out + input;
    let slo_met = done
        .iter()
        .filter(|d| slo.met(d.ttft, tpot(d), d.e2e))
        .count();
    let per_s = |n: f64| if wall > 0.0 { n / wall } else { 0.0 };
    Group {
        requests: outcomes.len(),
        completed: done.len(),
        refused,
        late,
        errors,
        input_tokens: input,
        output_tokens: out,
        request_throughput: per_s(done.len() as f64),
        output_tokens_per_s: per_s(out as f64),
        total_tokens_per_s: per_s(total as f64),
        ttft_ms: ms(&|d| d.ttft),
        tpot_ms: ms(&tpot),
        itl_ms: Summary::of(&itl),
        e2e_ms: ms(&|d| d.e2e),
        goodput: per_s(slo_met as f64),
        slo_met,
        first_error: outcomes.iter().find_map(|o| match &o.result {
            Err(Failure::Error(e)) => Some(e.clone()),
            _ => None,
        }),
    }
}

fn print_table(r: &Report) {
    match (&r.dataset, &r.prompt_tokens) {
        (Some(d), t) => {
            println!(
                "{} requests, {}, priorities {}, {:.2} s; dataset {d}",
                r.num_requests, r.mode, r.priority_mix, r.wall_seconds
            );
            if let Some(t) = t {
                println!(
                    "prompt tokens: mean {:.1}, p50 {:.0}, p90 {:.0}, max {:.0}",
                    t.mean, t.p50, t.p90, t.max
                );
            }
        }
        (None, _) => println!(
            "{} requests, {}, {} prompt words, {} output tokens, priorities {}, {:.2} s",
            r.num_requests, r.mode, r.input_words, r.output_tokens, r.priority_mix, r.wall_seconds
        ),
    }
    println!(
        "{:<9} {:>5} {:>5} {:>5} {:>5} {:>5} {:>7} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "group",
        "reqs",
        "ok",
        "refus",
        "late",
        "err",
        "req/s",
        "out t/s",
        "ttft p50",
        "ttft p99",
        "tpot p50",
        "itl p99",
        "e2e p50",
        "e2e p99",
        "goodput"
    );
    let row = |name: String, g: &Group| {
        println!(
            "{name:<9} {:>5} {:>5} {:>5} {:>5} {:>5} {:>7.2} {:>8.1} {:>9.1} {:>9.1} {:>9.2} {:>9.2} {:>9.1} {:>9.1} {:>8.2}",
            g.requests, g.completed, g.refused, g.late, g.errors, g.request_throughput,
            g.output_tokens_per_s, g.ttft_ms.p50, g.ttft_ms.p99, g.tpot_ms.p50, g.itl_ms.p99,
            g.e2e_ms.p50, g.e2e_ms.p99, g.goodput
        );
    };
    row("all".into(), &r.overall);
    for (p, g) in &r.by_priority {
        row(format!("prio {p}"), g);
    }
    println!(
        "latencies in ms; late: DEADLINE_EXCEEDED; goodput: requests/s meeting every SLO given \
         with --slo, and done within --deadline"
    );
    if let Some(share) = r.goodput_of_capacity {
        println!(
            "goodput: {:.1} % of the sim cluster's capacity",
            share * 100.0
        );
    }
    let windows = &r.goodput_by_window;
    if windows.len() > 1 {
        let (min, max) = windows
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), &g| (lo.min(g), hi.max(g)));
        println!(
            "goodput by {GOODPUT_WINDOW_S} s window: {} (min {min:.2}, max {max:.2} req/s)",
            windows
                .iter()
                .map(|g| format!("{g:.1}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    if let Some(t) = &r.router_tokens {
        let share = if t.generated > 0.0 {
            t.wasted / t.generated * 100.0
        } else {
            0.0
        };
        println!(
            "router: {:.0} tokens generated, {:.0} of them ({share:.1} %) wasted on requests that did not complete",
            t.generated, t.wasted
        );
    }
    if let Some(m) = &r.server_memory {
        println!(
            "{} process memory: {:.1} MiB resident, {:.1} MiB peak",
            m.process, m.rss_mib, m.peak_rss_mib
        );
    }
}

/// The concurrency steps, as batch sizes for the HF baseline.
fn batch_sizes(run: &Run) -> Vec<usize> {
    run.steps
        .iter()
        .filter_map(|r| match r.load {
            Load::Concurrency(c) => Some(c),
            Load::Rate(_) => None,
        })
        .collect()
}

/// HF transformers `generate` at the concurrency steps' batch sizes, with the run's mean
/// prompt length and output length (scripts/bench_hf_generate.py).
fn hf_baseline(a: &BenchArgs, run: &Run) -> anyhow::Result<Option<serde_json::Value>> {
    let batches = batch_sizes(run);
    if batches.is_empty() {
        bail!("--hf-baseline compares batch sizes: use --concurrency or --sweep, not --rate");
    }
    let (input, done) = run.steps.iter().fold((0, 0), |(t, n), r| {
        (t + r.overall.input_tokens, n + r.overall.completed)
    });
    if done == 0 {
        bail!("no request completed, so there is nothing to compare with HF transformers");
    }
    let model = a.model.as_ref().context("--hf-baseline needs --model")?;
    let list: Vec<String> = batches.iter().map(usize::to_string).collect();
    let prompt_len = (input as f64 / done as f64).round().max(1.0);
    crate::python::run_script(
        &a.python,
        "bench_hf_generate.py",
        model,
        crate::python::threads(a.threads),
        &[
            ("--prompt-len", prompt_len.to_string()),
            ("--output-len", a.output_len.to_string()),
            ("--batches", list.join(",")),
        ],
    )
}

/// HF's figures for batch size `batch`: (output tokens/s, TTFT ms, end-to-end ms).
fn hf_at(hf: &serde_json::Value, batch: usize) -> Option<(f64, f64, f64)> {
    let b = hf["batches"]
        .as_array()?
        .iter()
        .find(|b| b["batch"].as_u64() == Some(batch as u64))?;
    Some((
        b["output_tok_s"].as_f64()?,
        b["ttft_ms"].as_f64()?,
        b["e2e_ms"].as_f64()?,
    ))
}

/// openinfer beside HF transformers, one row per concurrency / batch size.
fn print_hf(run: &Run) {
    let Some(hf) = &run.hf_transformers else {
        return;
    };
    println!(
        "beside HF transformers generate (static batches of the same size, {} prompt tokens):",
        hf["prompt_len"]
    );
    println!(
        "{:>6} {:>10} {:>10} {:>7} {:>10} {:>10} {:>10} {:>10}",
        "batch", "out t/s", "HF t/s", "ratio", "ttft p50", "HF ttft", "e2e p50", "HF e2e"
    );
    for r in &run.steps {
        let Load::Concurrency(c) = r.load else {
            continue;
        };
        let Some((tps, ttft, e2e)) = hf_at(hf, c) else {
            continue;
        };
        let g = &r.overall;
        println!(
            "{c:>6} {:>10.1} {tps:>10.1} {:>6.2}× {:>10.1} {ttft:>10.1} {:>10.1} {e2e:>10.1}",
            g.output_tokens_per_s,
            g.output_tokens_per_s / tps,
            g.ttft_ms.p50,
            g.e2e_ms.p50
        );
    }
    println!("t/s: output tokens per second; latencies in ms");
}

/// Output tokens/s of openinfer and HF transformers per batch size.
fn hf_chart(run: &Run) -> Option<String> {
    let hf = run.hf_transformers.as_ref()?;
    let groups: Vec<Bars> = run
        .steps
        .iter()
        .filter_map(|r| match r.load {
            Load::Concurrency(c) => Some(Bars {
                label: format!("batch {c}"),
                values: vec![
                    Some(r.overall.output_tokens_per_s),
                    hf_at(hf, c).map(|h| h.0),
                ],
            }),
            Load::Rate(_) => None,
        })
        .collect();
    Some(grouped_bars(
        "Output tokens/s: openinfer (continuous batching) vs HF generate (static batch)",
        &["openinfer", "HF transformers"],
        &groups,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(priority: i32, ttft: f64, e2e: f64, tokens: u32) -> Outcome {
        Outcome {
            priority,
            result: Ok(Done {
                prompt_tokens: 10,
                output_tokens: tokens,
                ttft,
                e2e,
                itl: vec![(e2e - ttft) / f64::from(tokens - 1); tokens as usize - 1],
                ended_at: e2e,
            }),
        }
    }

    #[test]
    fn goodput_is_counted_per_window_and_late_ones_apart() {
        // (end-to-end latency, when it ended) in seconds.
        let ended = |e2e: f64, at: f64| {
            let mut o = done(0, 0.1, e2e, 10);
            if let Ok(d) = &mut o.result {
                d.ended_at = at;
            }
            o
        };
        let mut outcomes = vec![
            ended(1.0, 1.0),
            ended(2.0, 5.0),
            ended(6.0, 8.0), // over the 4 s deadline: no good to its client
            ended(1.0, 12.0),
            ended(1.0, 24.0), // in the partial third window
        ];
        outcomes.push(Outcome {
            priority: 0,
            result: Err(Failure::Late),
        });
        let slo = Slo::parse("e2e=4s").unwrap();
        assert_eq!(GOODPUT_WINDOW_S, 10.0);
        assert_eq!(goodput_by_window(&outcomes, 25.0, &slo), [0.2, 0.1]);
        let all: Vec<&Outcome> = outcomes.iter().collect();
        let g = group(&all, 25.0, &slo);
        assert_eq!((g.completed, g.late, g.slo_met), (5, 1, 4));
    }

    #[test]
    fn groups_count_outcomes_and_goodput_by_hand() {
        let outcomes = [
            done(0, 0.1, 1.0, 10),  // tpot 0.1
            done(0, 0.3, 1.2, 10),  // ttft misses the SLO
            done(5, 0.05, 2.05, 5), // tpot 0.5 misses the SLO
            Outcome {
                priority: 0,
                result: Err(Failure::Refused),
            },
            Outcome {
                priority: 5,
                result: Err(Failure::Error("Internal: boom".into())),
            },
        ];
        let slo = Slo::parse("ttft=200ms,tpot=200ms").unwrap();
        let all: Vec<&Outcome> = outcomes.iter().collect();
        let g = group(&all, 2.0, &slo);
        assert_eq!((g.requests, g.completed, g.refused, g.errors), (5, 3, 1, 1));
        assert_eq!(g.slo_met, 1);
        assert!((g.goodput - 0.5).abs() < 1e-12);
        assert!((g.request_throughput - 1.5).abs() < 1e-12);
        // 25 output tokens and 30 prompt tokens over 2 s.
        assert!((g.output_tokens_per_s - 12.5).abs() < 1e-12);
        assert!((g.total_tokens_per_s - 27.5).abs() < 1e-12);
        // TPOTs 100, 100, 500 ms: median 100.
        assert!((g.tpot_ms.p50 - 100.0).abs() < 1e-9);
        assert!((g.ttft_ms.mean - 150.0).abs() < 1e-9);
        assert_eq!(g.first_error.as_deref(), Some("Internal: boom"));
    }

    #[test]
    fn hf_figures_are_found_by_batch_size() {
        let hf = serde_json::json!({"batches": [
            {"batch": 1, "ttft_ms": 20.0, "e2e_ms": 500.0, "output_tok_s": 64.0},
            {"batch": 4, "ttft_ms": 60.0, "e2e_ms": 800.0, "output_tok_s": 320.0},
        ]});
        assert_eq!(hf_at(&hf, 4), Some((320.0, 60.0, 800.0)));
        assert_eq!(hf_at(&hf, 2), None);
        assert_eq!(hf_at(&serde_json::json!({}), 1), None);
    }
}
