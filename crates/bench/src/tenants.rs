//! `openinfer bench --spawn-sim-workers N --tenant-mix heavy:10,light:0.2`: tenants at the
//! same priority sharing one sim cluster, each sending at a multiple of the cluster's
//! capacity. The tenant with the smallest share is the one watched: its time to first token
//! alone, beside the others with fair shares on, and beside them with fair shares off (first
//! come, first served: the peer), each phase on a fresh cluster in the same run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use openinfer_proto::v1 as pb;
use openinfer_proto::v1::inference_client::InferenceClient;
use serde::Serialize;
use tonic::transport::Channel;

use crate::args::BenchArgs;
use crate::child::ChildService;
use crate::stats::Summary;
use crate::workload::interarrival;

/// `name:multiple` pairs: each tenant's rate as a multiple of the cluster's capacity.
pub fn parse_tenant_mix(s: &str) -> Result<Vec<(String, f64)>, String> {
    let mut out: Vec<(String, f64)> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, share) = part
            .split_once(':')
            .ok_or_else(|| format!("`{part}`: expected NAME:MULTIPLE, e.g. heavy:10"))?;
        let share: f64 = share
            .parse()
            .map_err(|_| format!("`{part}`: the multiple of capacity must be a number"))?;
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !(valid && share.is_finite() && share > 0.0) {
            return Err(format!(
                "`{part}`: a tenant name of [A-Za-z0-9._-] and a positive multiple"
            ));
        }
        if out.iter().any(|(n, _)| n == name) {
            return Err(format!("tenant `{name}` is listed twice"));
        }
        out.push((name.to_string(), share));
    }
    if out.len() < 2 {
        return Err("--tenant-mix needs at least two tenants".into());
    }
    Ok(out)
}

/// One tenant's requests in one phase.
#[derive(Serialize, Default)]
struct TenantResult {
    rate_rps: f64,
    sent: usize,
    completed: usize,
    refused: usize,
    failed: usize,
    /// Completed requests a second over the phase.
    throughput_rps: f64,
    ttft_s: Summary,
}

#[derive(Serialize)]
struct Phase {
    name: &'static str,
    fair_share: bool,
    wall_seconds: f64,
    tenants: BTreeMap<String, TenantResult>,
}

#[derive(Serialize)]
struct MixRun {
    workers: usize,
    step_ms: f64,
    max_running_per_worker: usize,
    output_tokens: u32,
    capacity_rps: f64,
    watched: String,
    phases: Vec<Phase>,
    /// The watched tenant's p99 time to first token beside the others, over alone.
    p99_ratio_fair: f64,
    p99_ratio_fifo: f64,
}

fn key(tenant: &str) -> String {
    format!("bench-key-{tenant}")
}

/// Runs the three phases and writes `bench-tenants.json` and `bench-tenants.svg`.
pub fn run(a: &BenchArgs, mix: &str) -> anyhow::Result<()> {
    let mix = parse_tenant_mix(mix).map_err(anyhow::Error::msg)?;
    let Some(workers) = a.spawn_sim_workers.filter(|&n| n > 0) else {
        bail!("--tenant-mix measures against a spawned sim cluster: give --spawn-sim-workers N");
    };
    let step = a.sim_step_time.as_secs_f64();
    let capacity = (workers * a.sim_max_running) as f64 / (f64::from(a.output_len) * step);
    let watched = mix
        .iter()
        .min_by(|x, y| x.1.total_cmp(&y.1))
        .map(|(n, _)| n.clone())
        .unwrap_or_default();
    let light_rate = mix.iter().find(|(n, _)| *n == watched).map_or(1.0, |t| t.1) * capacity;
    let duration = Duration::from_secs_f64(a.num_requests as f64 / light_rate);
    println!(
        "tenant mix: {workers} sim workers × {} slots, {:.1} ms steps, {} output tokens: capacity {capacity:.1} req/s; {} phases of {:.1} s; watching `{watched}`",
        a.sim_max_running,
        step * 1e3,
        a.output_len,
        3,
        duration.as_secs_f64()
    );
    std::fs::create_dir_all(&a.out)?;
    let file = a.out.join("bench-tenants.yaml");
    let mut yaml = String::from("tenants:\n");
    for (name, _) in &mix {
        yaml.push_str(&format!(
            "  - name: {name}\n    api_keys_sha256: [\"{}\"]\n",
            openinfer_router::tenants::key_sha256(&key(name))
        ));
    }
    std::fs::write(&file, yaml).with_context(|| format!("cannot write {}", file.display()))?;

    let alone: Vec<(String, f64)> = mix.iter().filter(|(n, _)| *n == watched).cloned().collect();
    let plan = [
        ("alone", true, &alone),
        ("fair shares", true, &mix),
        ("first come, first served", false, &mix),
    ];
    let mut phases = Vec::new();
    crate::runtime()?.block_on(async {
        for (name, fair, tenants) in plan {
            let mut procs = (0..workers)
                .map(|_| ChildService::sim_worker(a.sim_step_time, a.sim_max_running))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let addrs: Vec<&str> = procs.iter().map(|p| p.addr.as_str()).collect();
            let extra = vec![
                "--tenants".to_string(),
                file.display().to_string(),
                format!("--fair-share={fair}"),
            ];
            let router = ChildService::router(&addrs, &extra)?;
            let mut client = InferenceClient::new(crate::router::channel(&router.addr).await?);
            crate::router::ready(&mut client).await?;
            procs.push(router);
            let start = Instant::now();
            let results = drive(a, client, tenants, capacity, duration).await;
            let wall = start.elapsed().as_secs_f64();
            drop(procs);
            let phase = Phase {
                name,
                fair_share: fair,
                wall_seconds: wall,
                tenants: results,
            };
            print_phase(&phase);
            phases.push(phase);
        }
        anyhow::Ok(())
    })?;
    let p99 = |i: usize| {
        phases[i]
            .tenants
            .get(&watched)
            .map_or(f64::NAN, |t| t.ttft_s.p99)
    };
    let run = MixRun {
        workers,
        step_ms: step * 1e3,
        max_running_per_worker: a.sim_max_running,
        output_tokens: a.output_len,
        capacity_rps: capacity,
        p99_ratio_fair: p99(1) / p99(0),
        p99_ratio_fifo: p99(2) / p99(0),
        watched,
        phases,
    };
    println!(
        "`{}`'s p99 time to first token beside the others: {:.2}× alone with fair shares, {:.2}× first come, first served",
        run.watched, run.p99_ratio_fair, run.p99_ratio_fifo
    );
    std::fs::write(
        a.out.join("bench-tenants.json"),
        serde_json::to_string_pretty(&run)?,
    )?;
    std::fs::write(a.out.join("bench-tenants.svg"), chart(&run))?;
    tracing::info!(out = %a.out.display(), "wrote the results");
    Ok(())
}

/// Every tenant sends at its multiple of `capacity` for `duration` (gamma arrivals), each
/// request a stream under its key.
async fn drive(
    a: &BenchArgs,
    client: InferenceClient<Channel>,
    tenants: &[(String, f64)],
    capacity: f64,
    duration: Duration,
) -> BTreeMap<String, TenantResult> {
    let started = Instant::now();
    let mut senders = tokio::task::JoinSet::new();
    for (name, share) in tenants.iter().cloned() {
        let client = client.clone();
        let rate = share * capacity;
        let (output_len, burstiness) = (a.output_len, a.burstiness);
        let prompt =
            "tenants share the workers of one model ".repeat(a.input_len.div_ceil(7).max(1));
        senders.spawn(async move {
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_os_rng();
            let mut calls = tokio::task::JoinSet::new();
            while started.elapsed() < duration {
                let mut req = tonic::Request::new(pb::GenerateRequest {
                    prompt: prompt.clone(),
                    max_new_tokens: Some(output_len),
                    ignore_eos: true,
                    ..Default::default()
                });
                if let Ok(v) = format!("Bearer {}", key(&name)).parse() {
                    req.metadata_mut().insert("authorization", v);
                }
                let mut c = client.clone();
                calls.spawn(async move { ttft(&mut c, req).await });
                tokio::time::sleep(interarrival(&mut rng, rate, burstiness)).await;
            }
            let mut result = TenantResult {
                rate_rps: rate,
                ..Default::default()
            };
            let mut ttfts = Vec::new();
            while let Some(r) = calls.join_next().await {
                result.sent += 1;
                match r {
                    Ok(Ok(t)) => {
                        result.completed += 1;
                        ttfts.push(t);
                    }
                    Ok(Err(tonic::Code::ResourceExhausted)) => result.refused += 1,
                    _ => result.failed += 1,
                }
            }
            result.ttft_s = Summary::of(&ttfts);
            (name, result)
        });
    }
    let mut out = BTreeMap::new();
    while let Some(Ok((name, mut r))) = senders.join_next().await {
        r.throughput_rps = r.completed as f64 / started.elapsed().as_secs_f64();
        out.insert(name, r);
    }
    out
}

/// Streams one request to its end; its time to first token.
async fn ttft(
    client: &mut InferenceClient<Channel>,
    req: tonic::Request<pb::GenerateRequest>,
) -> Result<f64, tonic::Code> {
    let start = Instant::now();
    let mut stream = client
        .generate_stream(req)
        .await
        .map_err(|s| s.code())?
        .into_inner();
    let mut first = None;
    while let Some(m) = stream.message().await.map_err(|s| s.code())? {
        if first.is_none() && !m.token_ids.is_empty() {
            first = Some(start.elapsed().as_secs_f64());
        }
        if !m.finish_reason.is_empty() {
            return first.ok_or(tonic::Code::Internal);
        }
    }
    Err(tonic::Code::Internal)
}

fn print_phase(p: &Phase) {
    println!("\n{} ({:.1} s)", p.name, p.wall_seconds);
    println!(
        "{:<12} {:>9} {:>7} {:>9} {:>8} {:>7} {:>11} {:>11}",
        "tenant", "rate/s", "sent", "completed", "refused", "failed", "ttft p50 ms", "ttft p99 ms"
    );
    for (name, t) in &p.tenants {
        println!(
            "{:<12} {:>9.1} {:>7} {:>9} {:>8} {:>7} {:>11.1} {:>11.1}",
            name,
            t.rate_rps,
            t.sent,
            t.completed,
            t.refused,
            t.failed,
            t.ttft_s.p50 * 1e3,
            t.ttft_s.p99 * 1e3
        );
    }
}

fn chart(run: &MixRun) -> String {
    let series: Vec<&str> = run.phases.iter().map(|p| p.name).collect();
    let watched = |f: fn(&TenantResult) -> f64| {
        run.phases
            .iter()
            .map(|p| p.tenants.get(&run.watched).map(f))
            .collect()
    };
    let groups = vec![
        crate::chart::Group {
            label: format!("{} ttft p50 (s)", run.watched),
            values: watched(|t| t.ttft_s.p50),
        },
        crate::chart::Group {
            label: format!("{} ttft p99 (s)", run.watched),
            values: watched(|t| t.ttft_s.p99),
        },
        crate::chart::Group {
            label: format!("{} completed (req/s)", run.watched),
            values: watched(|t| t.throughput_rps),
        },
    ];
    crate::chart::grouped_bars(
        &format!(
            "Tenant `{}` alone and beside the others (sim cluster, capacity {:.0} req/s)",
            run.watched, run.capacity_rps
        ),
        &series,
        &groups,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_mixes_parse_or_say_what_is_wrong() {
        assert_eq!(
            parse_tenant_mix("heavy:10, light:0.2").unwrap(),
            [("heavy".to_string(), 10.0), ("light".to_string(), 0.2)]
        );
        for (bad, says) in [
            ("heavy:10", "at least two"),
            ("heavy:10,light", "NAME:MULTIPLE"),
            ("heavy:x,light:1", "number"),
            ("heavy:0,light:1", "positive"),
            ("a b:1,light:1", "[A-Za-z0-9._-]"),
            ("a:1,a:2", "twice"),
        ] {
            let e = parse_tenant_mix(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
