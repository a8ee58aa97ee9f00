//! `openinfer bench --prefix-cache-compare`: what prefix caching and cache-aware placement buy.
//! One workload runs three times, each on fresh worker processes with the real engine behind a
//! fresh router:
//! 1. caching off, least-busy placement (the peer);
//! 2. caching on, least-busy placement;
//! 3. caching on, cache-aware placement.
//!
//! The workload is either shared prefixes (`--prefix-groups` system prompts of
//! `--prefix-words` words, each followed by `--prefix-questions` questions of
//! `--question-words` words, shuffled, like SGLang's generated-shared-prefix set) or
//! multi-turn conversations (`--turns` turns each, the history growing by every question and
//! its answer). It reports the prefill tokens the workers computed, the cache's hit rate, and
//! time to first token per run.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use openinfer_proto::v1 as pb;
use openinfer_proto::v1::inference_client::InferenceClient;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tonic::transport::Channel;

use crate::args::BenchArgs;
use crate::chart::{grouped_bars, Group};
use crate::child::ChildService;
use crate::stats::Summary;

/// The workload's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PrefixWorkload {
    /// System prompts shared by many questions.
    Shared,
    /// Conversations whose every turn repeats the history before it.
    MultiTurn,
}

struct Config {
    name: &'static str,
    prefix_cache: bool,
    cache_aware: bool,
}

const CONFIGS: [Config; 3] = [
    Config {
        name: "caching off, least busy",
        prefix_cache: false,
        cache_aware: false,
    },
    Config {
        name: "caching on, least busy",
        prefix_cache: true,
        cache_aware: false,
    },
    Config {
        name: "caching on, cache-aware",
        prefix_cache: true,
        cache_aware: true,
    },
];

#[derive(Serialize)]
struct ConfigResult {
    name: &'static str,
    prefix_cache: bool,
    cache_aware: bool,
    requests: usize,
    failed: usize,
    wall_seconds: f64,
    /// Milliseconds.
    ttft: Summary,
    /// Milliseconds.
    e2e: Summary,
    /// Prompt tokens the workers took in.
    prompt_tokens: f64,
    /// Of those, the ones whose KV came from a prefix cache.
    hit_tokens: f64,
    /// Prompt tokens the workers computed (prefill): prompt − hit.
    prefill_computed: f64,
    hit_rate: f64,
    /// Prefill computed over the peer's (caching off).
    prefill_vs_uncached: f64,
    /// The peer's TTFT p50 over this run's.
    ttft_p50_speedup: f64,
}

#[derive(Serialize)]
struct PrefixRun {
    workload: PrefixWorkload,
    model: String,
    workers: usize,
    concurrency: usize,
    output_tokens: u32,
    /// Of each prompt's words, the share it has in common with other prompts (its system
    /// prompt, or its conversation's history).
    shared_word_fraction: f64,
    configs: Vec<ConfigResult>,
}

/// What one request asked and what it got.
struct Timed {
    ttft: f64,
    e2e: f64,
    text: String,
}

/// Runs the comparison.
pub fn run(a: &BenchArgs) -> anyhow::Result<()> {
    if a.prefix_workers == 0 || a.prefix_words == 0 || a.output_len == 0 {
        bail!("--prefix-workers, --prefix-words and --output-len must be positive");
    }
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let model = match &a.prefix_model {
        Some(m) => m.clone(),
        None => {
            let pb = crate::progress::bar(0, "making the model");
            let dir = openinfer_engine::make_model::ensure_preset(
                &a.cache_dir,
                &a.prefix_preset,
                &|done, total| {
                    pb.set_length(total);
                    pb.set_position(done);
                },
            )?;
            pb.finish_and_clear();
            dir
        }
    };
    let concurrency = a.concurrency.first().copied().unwrap_or(4).max(1);
    let rt = crate::runtime()?;
    let mut configs: Vec<ConfigResult> = Vec::new();
    for c in &CONFIGS {
        let r = rt.block_on(run_config(a, c, &model, concurrency))?;
        configs.push(r);
    }
    let (peer_prefill, peer_p50) = (configs[0].prefill_computed, configs[0].ttft.p50);
    for c in &mut configs {
        c.prefill_vs_uncached = c.prefill_computed / peer_prefill.max(1.0);
        c.ttft_p50_speedup = peer_p50 / c.ttft.p50.max(1e-9);
    }
    // Of each prompt's words, those it shares with other prompts: its system prompt (shared),
    // or the history before its question (multi-turn, on average over the turns).
    let (prefix, question) = (a.prefix_words as f64, a.question_words as f64);
    let shared_word_fraction = match a.prefix_workload {
        PrefixWorkload::Shared => prefix / (prefix + question),
        PrefixWorkload::MultiTurn => {
            let per_turn = question + f64::from(a.output_len);
            let turns = a.turns.max(1) as f64;
            let mean_history = prefix + per_turn * (turns - 1.0) / 2.0;
            mean_history / (mean_history + question)
        }
    };
    let report = PrefixRun {
        workload: a.prefix_workload,
        model: model.display().to_string(),
        workers: a.prefix_workers,
        concurrency,
        output_tokens: a.output_len,
        shared_word_fraction,
        configs,
    };
    print_table(&report);
    std::fs::write(
        a.out.join("bench-prefix.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(a.out.join("bench-prefix.svg"), chart(&report))?;
    tracing::info!(out = %a.out.display(), "wrote bench-prefix.json and bench-prefix.svg");
    Ok(())
}

async fn run_config(
    a: &BenchArgs,
    c: &Config,
    model: &std::path::Path,
    concurrency: usize,
) -> anyhow::Result<ConfigResult> {
    let model = model.display().to_string();
    let cache = c.prefix_cache.to_string();
    let workers = (0..a.prefix_workers)
        .map(|_| {
            ChildService::spawn(
                "worker",
                &[
                    "worker",
                    "--listen",
                    "127.0.0.1:0",
                    "--model",
                    &model,
                    "--prefix-cache",
                    &cache,
                ],
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let addrs: Vec<&str> = workers.iter().map(|w| w.addr.as_str()).collect();
    let router =
        ChildService::router(&addrs, &["--cache-aware".into(), c.cache_aware.to_string()])?;
    let mut client = InferenceClient::new(crate::router::channel(&router.addr).await?);
    all_linked(&mut client, a.prefix_workers).await?;
    let start = Instant::now();
    let timed = match a.prefix_workload {
        PrefixWorkload::Shared => shared(a, &client, concurrency, c.name).await,
        PrefixWorkload::MultiTurn => multi_turn(a, &client, concurrency, c.name).await,
    };
    let wall_seconds = start.elapsed().as_secs_f64();
    let failed = timed.iter().filter(|t| t.is_err()).count();
    let ok: Vec<&Timed> = timed.iter().filter_map(|t| t.as_ref().ok()).collect();
    let sum = |name| -> anyhow::Result<f64> {
        workers
            .iter()
            .map(|w| w.counter(name))
            .sum::<anyhow::Result<f64>>()
    };
    let prompt_tokens = sum("openinfer_worker_prompt_tokens_total")?;
    let hit_tokens = sum("openinfer_worker_prefix_cache_hit_tokens_total")?;
    let ms = |f: fn(&Timed) -> f64| ok.iter().map(|t| f(t) * 1e3).collect::<Vec<f64>>();
    Ok(ConfigResult {
        name: c.name,
        prefix_cache: c.prefix_cache,
        cache_aware: c.cache_aware,
        requests: timed.len(),
        failed,
        wall_seconds,
        ttft: Summary::of(&ms(|t| t.ttft)),
        e2e: Summary::of(&ms(|t| t.e2e)),
        prompt_tokens,
        hit_tokens,
        prefill_computed: prompt_tokens - hit_tokens,
        hit_rate: hit_tokens / prompt_tokens.max(1.0),
        prefill_vs_uncached: 1.0,
        ttft_p50_speedup: 1.0,
    })
}

/// Waits until the router has linked `n` workers.
async fn all_linked(client: &mut InferenceClient<Channel>, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let models = client
            .list_models(pb::ListModelsRequest {})
            .await?
            .into_inner()
            .models;
        if models.iter().map(|m| m.workers as usize).sum::<usize>() >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the router linked fewer than {n} workers within two minutes");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Words of a synthetic text, from a fixed list, drawn with `rng`.
fn words<R: Rng>(rng: &mut R, n: usize) -> String {
    const WORDS: &[&str] = &[
        "the",
        "model",
        "answers",
        "questions",
        "about",
        "rivers",
        "mountains",
        "cities",
        "history",
        "and",
        "science",
        "with",
        "care",
        "using",
        "short",
        "clear",
        "sentences",
        "every",
        "reply",
        "cites",
        "facts",
        "from",
        "documents",
        "given",
        "above",
        "when",
        "asked",
        "it",
        "explains",
        "its",
        "reasoning",
        "step",
        "by",
        "in",
        "plain",
        "words",
    ];
    (0..n)
        .map(|_| WORDS[rng.random_range(0..WORDS.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

/// The shared-prefix prompts, shuffled the same way for every run.
fn shared_prompts(a: &BenchArgs) -> Vec<String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut prompts = Vec::new();
    for g in 0..a.prefix_groups {
        let system = format!("System {g}: {}", words(&mut rng, a.prefix_words));
        for q in 0..a.prefix_questions {
            prompts.push(format!(
                "{system}\nQuestion {q}: {}",
                words(&mut rng, a.question_words)
            ));
        }
    }
    prompts.shuffle(&mut rng);
    prompts
}

async fn shared(
    a: &BenchArgs,
    client: &InferenceClient<Channel>,
    concurrency: usize,
    label: &str,
) -> Vec<anyhow::Result<Timed>> {
    let prompts = Arc::new(shared_prompts(a));
    let pb = crate::progress::bar(prompts.len() as u64, label);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (mut client, prompts, next, pb) =
            (client.clone(), prompts.clone(), next.clone(), pb.clone());
        let output = a.output_len;
        tasks.spawn(async move {
            let mut done = Vec::new();
            while let Some(p) = prompts.get(next.fetch_add(1, Ordering::Relaxed)) {
                done.push(one(&mut client, p.clone(), output).await);
                pb.inc(1);
            }
            done
        });
    }
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        out.extend(r.unwrap_or_default());
    }
    pb.finish_and_clear();
    out
}

async fn multi_turn(
    a: &BenchArgs,
    client: &InferenceClient<Channel>,
    concurrency: usize,
    label: &str,
) -> Vec<anyhow::Result<Timed>> {
    let conversations = a.prefix_groups.max(1) * concurrency;
    let pb = crate::progress::bar((conversations * a.turns) as u64, label);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..conversations {
        let (mut client, pb) = (client.clone(), pb.clone());
        let mut rng = rand::rngs::StdRng::seed_from_u64(100 + c as u64);
        let mut history = format!("System: {}", words(&mut rng, a.prefix_words));
        let questions: Vec<String> = (0..a.turns)
            .map(|_| words(&mut rng, a.question_words))
            .collect();
        let output = a.output_len;
        tasks.spawn(async move {
            let mut done = Vec::new();
            for (t, q) in questions.iter().enumerate() {
                history.push_str(&format!("\nUser {t}: {q}\nAssistant:"));
                let r = one(&mut client, history.clone(), output).await;
                if let Ok(timed) = &r {
                    history.push_str(&timed.text);
                }
                done.push(r);
                pb.inc(1);
            }
            done
        });
    }
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        out.extend(r.unwrap_or_default());
    }
    pb.finish_and_clear();
    out
}

/// One streamed request: its time to first token, its end-to-end time and its text.
async fn one(
    client: &mut InferenceClient<Channel>,
    prompt: String,
    output: u32,
) -> anyhow::Result<Timed> {
    let start = Instant::now();
    let mut stream = client
        .generate_stream(pb::GenerateRequest {
            prompt,
            max_new_tokens: Some(output),
            ignore_eos: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut ttft = None;
    let mut text = String::new();
    while let Some(m) = stream.message().await? {
        if ttft.is_none() && !m.token_ids.is_empty() {
            ttft = Some(start.elapsed().as_secs_f64());
        }
        text.push_str(&m.text);
        if !m.finish_reason.is_empty() {
            return Ok(Timed {
                ttft: ttft.unwrap_or_default(),
                e2e: start.elapsed().as_secs_f64(),
                text,
            });
        }
    }
    bail!("the stream ended without a final message")
}

fn print_table(r: &PrefixRun) {
    println!(
        "prefix caching, {:?} workload on {} workers ({}), concurrency {}, {} output tokens; {:.0} % of prompt words shared",
        r.workload,
        r.workers,
        r.model,
        r.concurrency,
        r.output_tokens,
        r.shared_word_fraction * 100.0
    );
    println!(
        "{:<26} {:>8} {:>6} {:>10} {:>10} {:>8} {:>10} {:>9} {:>9} {:>9} {:>8}",
        "run",
        "requests",
        "failed",
        "prompt tok",
        "prefill",
        "hit rate",
        "prefill ÷",
        "ttft p50",
        "ttft p99",
        "e2e p50",
        "p50 ×"
    );
    for c in &r.configs {
        println!(
            "{:<26} {:>8} {:>6} {:>10.0} {:>10.0} {:>7.1}% {:>10.2} {:>9.1} {:>9.1} {:>9.1} {:>8.2}",
            c.name,
            c.requests,
            c.failed,
            c.prompt_tokens,
            c.prefill_computed,
            c.hit_rate * 100.0,
            c.prefill_vs_uncached,
            c.ttft.p50,
            c.ttft.p99,
            c.e2e.p50,
            c.ttft_p50_speedup
        );
    }
}

fn chart(r: &PrefixRun) -> String {
    type Measure = fn(&ConfigResult) -> f64;
    let measures: [(&str, Measure); 3] = [
        ("TTFT p50 (ms)", |c| c.ttft.p50),
        ("TTFT p99 (ms)", |c| c.ttft.p99),
        ("prefill tokens ÷ 100", |c| c.prefill_computed / 100.0),
    ];
    let groups = measures
        .into_iter()
        .map(|(label, f)| Group {
            label: label.into(),
            values: r.configs.iter().map(|c| Some(f(c))).collect(),
        })
        .collect::<Vec<_>>();
    let names: Vec<&str> = r.configs.iter().map(|c| c.name).collect();
    grouped_bars(
        &format!(
            "Prefix caching: {:?} workload, {} workers (lower is better)",
            r.workload, r.workers
        ),
        &names,
        &groups,
    )
}
