//! `openinfer worker --tp N`: one model replica split across N rank processes.
//!
//! * With `--rank R` this process is one rank. It joins its group ([`join`]): it binds its
//!   collective listener, learns every rank's address (an etcd rendezvous under
//!   `/openinfer/v1/groups/{group_id}/ranks/`, or `--tp-peers`) and connects the ring. Rank 0
//!   then loads its shard into the engine, serves gRPC, and registers the group as one worker
//!   after its warm-up step, a forward that every rank must have loaded its shard to run. The
//!   other ranks load theirs and [`follow`] rank 0's steps.
//! * Without `--rank` this process starts the N ranks itself (one per device), or with
//!   `--tp-nodes M --tp-node-rank I` its host's share of them (ranks I·N/M ..), and
//!   [`supervise`]s them: SIGTERM drains rank 0 (which then stops the others); if any rank
//!   exits, the rest are stopped (rank 0 first, so that it leaves the registry at once and
//!   routers resume its sequences elsewhere) and the supervisor fails. The ranks of a group
//!   across hosts listen on their host's address (`--tp-listen`) and meet through etcd.

use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use openinfer_engine::tp::cpu::CpuCommunicator;
use openinfer_engine::tp::follower::Follower;
use openinfer_engine::tp::Communicator;
use openinfer_engine::ModelDir;
use openinfer_registry::group::{RankKey, RankRecord};
use openinfer_registry::EtcdConfig;

use crate::args::{EngineKind, TpArgs, TpBackend, WorkerArgs};

/// What this worker process is.
pub enum Role {
    /// The whole model, no group.
    Whole,
    /// Starts and supervises the ranks of a group.
    Supervisor,
    /// One rank of a group.
    Rank(usize),
}

/// This process's role, from `--tp` and `--rank`, with the flags checked.
pub fn role(a: &WorkerArgs) -> anyhow::Result<Role> {
    let t = &a.tp;
    if t.tp == 0 {
        bail!("--tp must be at least 1");
    }
    if t.tp == 1 {
        return Ok(Role::Whole);
    }
    if a.engine.engine == EngineKind::Sim {
        bail!("--tp splits a model; the sim engine has none (drop --tp or use --engine model)");
    }
    if backend(a) == TpBackend::Nccl && !cfg!(feature = "cuda") {
        bail!("the nccl backend needs a CUDA build (docs/tensor-parallel.md: building with CUDA); use --tp-backend cpu");
    }
    if t.tp_nodes == 0 || !t.tp.is_multiple_of(t.tp_nodes) {
        bail!(
            "--tp {} does not split evenly over --tp-nodes {}: every host runs the same number of ranks",
            t.tp,
            t.tp_nodes
        );
    }
    if t.tp_node_rank >= t.tp_nodes {
        bail!(
            "--tp-node-rank {} is outside --tp-nodes {}: hosts are 0..{}",
            t.tp_node_rank,
            t.tp_nodes,
            t.tp_nodes - 1
        );
    }
    if t.tp_nodes > 1 && t.tp_peers.is_empty() {
        if a.registry.registry.is_none() {
            bail!("a group across --tp-nodes {} hosts meets through etcd: give --registry (or every rank's address in --tp-peers)", t.tp_nodes);
        }
        if a.group_id.is_none() {
            bail!("a group across hosts needs --group-id, the same on every host of the group");
        }
        if t.tp_listen.ip().is_unspecified() {
            bail!(
                "--tp-listen {} is what the other hosts would be told to dial; give this host's own address (e.g. $(POD_IP))",
                t.tp_listen
            );
        }
    }
    if !t.tp_peers.is_empty() && t.tp_peers.len() != t.tp {
        bail!(
            "--tp-peers lists {} addresses for --tp {}: give one per rank, in rank order",
            t.tp_peers.len(),
            t.tp
        );
    }
    Ok(match t.rank {
        None => Role::Supervisor,
        Some(r) if r >= t.tp => bail!(
            "--rank {r} is outside --tp {}: ranks are 0..{}",
            t.tp,
            t.tp - 1
        ),
        Some(r) => Role::Rank(r),
    })
}

/// The collective backend: the flag, else NCCL on CUDA devices and the CPU ring elsewhere.
fn backend(a: &WorkerArgs) -> TpBackend {
    let cuda = a.engine.device.starts_with("cuda");
    a.tp.tp_backend.unwrap_or(if cuda {
        TpBackend::Nccl
    } else {
        TpBackend::Cpu
    })
}

/// Joins rank `rank`'s group and returns its communicator.
pub fn join(
    a: &WorkerArgs,
    rank: usize,
    registry: Option<&EtcdConfig>,
) -> anyhow::Result<Arc<dyn Communicator>> {
    let t = &a.tp;
    let (size, timeout) = (t.tp, t.tp_timeout);
    let backend = backend(a);
    let connect = move |listener: TcpListener, addrs: Vec<SocketAddr>| {
        tracing::info!(
            rank,
            tp = size,
            ?addrs,
            ?backend,
            "connecting the tensor-parallel ring"
        );
        let comm = CpuCommunicator::connect(rank, &addrs, listener, timeout)?;
        // Every rank is connected once this returns, so every rank has read the addresses.
        comm.barrier()?;
        let comm: Arc<dyn Communicator> = match backend {
            TpBackend::Cpu => Arc::new(comm),
            #[cfg(feature = "cuda")]
            TpBackend::Nccl => Arc::new(openinfer_engine::tp::nccl::NcclCommunicator::new(comm)?),
            #[cfg(not(feature = "cuda"))]
            TpBackend::Nccl => bail!("the nccl backend needs a CUDA build"),
        };
        anyhow::Ok(comm)
    };
    if !t.tp_peers.is_empty() {
        let me = t.tp_peers[rank];
        let l = TcpListener::bind(me).with_context(|| {
            format!("rank {rank} cannot listen on {me}, its --tp-peers address")
        })?;
        return connect(l, t.tp_peers.clone());
    }
    let Some(cfg) = registry else {
        bail!("rank {rank} of --tp {size}: the ranks find each other through etcd (--registry) or --tp-peers; give one");
    };
    let group = a
        .group_id
        .as_deref()
        .context("--group-id names the group; give every rank of it the same one")?;
    let l = TcpListener::bind(t.tp_listen)
        .with_context(|| format!("rank {rank} cannot listen on {}", t.tp_listen))?;
    let me = RankRecord {
        rank,
        size,
        addr: l.local_addr()?.to_string(),
    };
    tracing::info!(group, rank, collective = %me.addr, "waiting for the group's other ranks in etcd");
    super::runtime()?.block_on(async move {
        let key = RankKey::publish(cfg, group, &me).await?;
        let addrs = key.wait_for_ranks(group, size, timeout).await?;
        let addrs = addrs
            .iter()
            .map(|s| {
                s.parse()
                    .with_context(|| format!("a rank published a bad address `{s}`"))
            })
            .collect::<anyhow::Result<Vec<SocketAddr>>>()?;
        let comm = tokio::task::spawn_blocking(move || connect(l, addrs)).await??;
        key.release().await;
        Ok(comm)
    })
}

/// Runs a follower rank: loads its shard, then runs every step rank 0 sends until rank 0
/// stops the group (exit 0) or the group breaks (an error).
pub fn follow(a: &WorkerArgs, comm: Arc<dyn Communicator>) -> anyhow::Result<()> {
    let rank = comm.rank();
    let model = a
        .model
        .as_deref()
        .context("--model DIR is required (every rank loads its shard of it)")?;
    let cfg = super::engine_config(&a.engine)?;
    let dir = ModelDir::open(model)?;
    let pb = openinfer_bench::progress::bar(0, "loading shard");
    let follower = Follower::load(&dir, &cfg, comm, &|done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })
    .with_context(|| format!("rank {rank} cannot load its shard of {}", model.display()))?;
    pb.finish_and_clear();
    tracing::info!(
        rank,
        weight_mib = follower.weight_bytes() as f64 / (1 << 20) as f64,
        "shard loaded; following rank 0"
    );
    super::runtime()?.block_on(async move {
        let mut run = tokio::task::spawn_blocking(move || follower.run());
        loop {
            tokio::select! {
                done = &mut run => {
                    done??;
                    tracing::info!(rank, "rank 0 stopped the group; exiting");
                    return Ok(());
                }
                () = super::shutdown_signal() => {
                    // Rank 0 drains the group and then stops it; leaving now would break the
                    // forward of the sequences it is finishing.
                    tracing::info!(rank, "waiting for rank 0 to stop the group");
                }
            }
        }
    })
}

/// The ranks this host runs: all of them, or its share of a group across `--tp-nodes` hosts.
pub fn local_ranks(t: &TpArgs) -> std::ops::Range<usize> {
    let per_host = t.tp / t.tp_nodes.max(1);
    t.tp_node_rank * per_host..(t.tp_node_rank + 1) * per_host
}

/// Starts this host's ranks as child processes and supervises them.
pub fn supervise(a: &WorkerArgs) -> anyhow::Result<()> {
    let t = &a.tp;
    let group = a
        .group_id
        .clone()
        .unwrap_or_else(|| format!("{}-{}", super::hostname(), std::process::id()));
    let peers: Vec<SocketAddr> = if !t.tp_peers.is_empty() {
        t.tp_peers.clone()
    } else if a.registry.registry.is_some() {
        Vec::new() // the ranks meet in etcd
    } else {
        free_loopback_addrs(t.tp)?
    };
    let cuda = a.engine.device.starts_with("cuda");
    let args = child_args(cuda);
    let exe = std::env::current_exe().context("cannot find the openinfer binary")?;
    let local = local_ranks(t);
    let mut ranks = Vec::with_capacity(local.len());
    for rank in local.clone() {
        let mut cmd = Command::new(&exe);
        cmd.args(&args)
            .env("OPENINFER_RANK", rank.to_string())
            .env("OPENINFER_GROUP_ID", &group);
        if !peers.is_empty() {
            let list: Vec<String> = peers.iter().map(ToString::to_string).collect();
            cmd.env("OPENINFER_TP_PEERS", list.join(","));
        }
        if cuda {
            cmd.env("OPENINFER_DEVICE", format!("cuda:{}", rank - local.start));
        }
        stop_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start rank {rank}"))?;
        tracing::info!(rank, pid = child.id(), group = %group, "started rank");
        ranks.push(child);
    }
    let result = super::runtime()?.block_on(watch_ranks(&mut ranks, local.start));
    stop_all(&mut ranks);
    result
}

/// Waits for SIGTERM (drains the group through rank 0) or for a rank to exit (stops the rest).
/// `ranks[i]` is rank `first + i`; on hosts without rank 0 (`first > 0`) SIGTERM only waits:
/// the followers stop when rank 0, on the group's first host, stops the group.
async fn watch_ranks(ranks: &mut [Child], first: usize) -> anyhow::Result<()> {
    let mut signal = std::pin::pin!(super::shutdown_signal());
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            () = &mut signal => {
                if first == 0 {
                    tracing::info!("draining the group through rank 0");
                    terminate(&ranks[0]);
                } else {
                    tracing::info!("waiting for rank 0, on the group's first host, to stop the group");
                }
                let code = wait_all(ranks).await;
                return if code.iter().all(|c| *c == Some(0)) {
                    Ok(())
                } else {
                    bail!("ranks exited with {code:?} while draining")
                };
            }
            _ = tick.tick() => {
                for (i, child) in ranks.iter_mut().enumerate() {
                    if let Some(status) = child.try_wait()? {
                        let rank = first + i;
                        tracing::error!(rank, %status, "a rank exited; stopping the group");
                        // Rank 0 first: it leaves the registry and hands its sequences back.
                        // (Elsewhere the followers stop as the broken ring reaches them.)
                        if first == 0 {
                            terminate(&ranks[0]);
                        }
                        let _ = tokio::time::timeout(Duration::from_secs(10), wait_all(ranks)).await;
                        bail!("rank {rank} exited ({status}); the group stopped");
                    }
                }
            }
        }
    }
}

/// Waits for every rank; their exit codes.
async fn wait_all(ranks: &mut [Child]) -> Vec<Option<i32>> {
    let mut codes = vec![None; ranks.len()];
    loop {
        let mut running = false;
        for (i, c) in ranks.iter_mut().enumerate() {
            match c.try_wait() {
                Ok(Some(s)) => codes[i] = s.code(),
                Ok(None) => running = true,
                Err(_) => {}
            }
        }
        if !running {
            return codes;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Kills whatever rank still runs.
fn stop_all(ranks: &mut [Child]) {
    for c in ranks.iter_mut() {
        if let Ok(None) = c.try_wait() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Has the kernel send the child SIGTERM when this process dies, however it dies: ranks never
/// outlive their supervisor (rank 0 drains, the others wait for it to stop the group).
fn stop_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the
        // parent; it runs in the child between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

/// Sends SIGTERM (a graceful stop) to `child`.
fn terminate(child: &Child) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill(2) with a pid this process spawned and has not reaped; it has no memory
    // effects in this process.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

/// This process's arguments for a rank: the same, less `--device` on CUDA (each rank gets
/// its own device through OPENINFER_DEVICE).
fn child_args(cuda: bool) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip = false;
    for arg in std::env::args_os().skip(1) {
        if std::mem::take(&mut skip) {
            continue;
        }
        if cuda && arg == "--device" {
            skip = true;
            continue;
        }
        if cuda && arg.to_string_lossy().starts_with("--device=") {
            continue;
        }
        out.push(arg);
    }
    out
}

/// `n` loopback addresses free right now, for ranks that meet without etcd.
fn free_loopback_addrs(n: usize) -> anyhow::Result<Vec<SocketAddr>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("cannot find free loopback ports for the ranks")?;
    listeners
        .iter()
        .map(|l| l.local_addr().context("loopback port"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{Cli, Command};
    use clap::Parser;

    fn worker(flags: &[&str]) -> WorkerArgs {
        let argv = ["openinfer", "worker", "--model", "/m"].iter().chain(flags);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Worker(a) => a,
            _ => unreachable!(),
        }
    }

    fn refused(flags: &[&str]) -> String {
        match role(&worker(flags)) {
            Ok(_) => panic!("{flags:?} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_group_across_hosts_splits_its_ranks_evenly() {
        let across = [
            "--tp",
            "8",
            "--tp-nodes",
            "2",
            "--tp-node-rank",
            "1",
            "--registry",
            "etcd://e:2379",
            "--group-id",
            "g",
            "--tp-listen",
            "10.0.0.7",
        ];
        let a = worker(&across);
        assert!(matches!(role(&a).unwrap(), Role::Supervisor));
        assert_eq!(local_ranks(&a.tp), 4..8);
        assert_eq!(a.tp.tp_listen.to_string(), "10.0.0.7:0");
        assert_eq!(local_ranks(&worker(&["--tp", "4"]).tp), 0..4);

        assert!(refused(&["--tp", "4", "--tp-nodes", "3"]).contains("does not split evenly"));
        let outside = refused(&["--tp", "4", "--tp-nodes", "2", "--tp-node-rank", "2"]);
        assert!(outside.contains("outside --tp-nodes 2"), "{outside}");
        assert!(refused(&["--tp", "4", "--tp-nodes", "2"]).contains("--registry"));
        let unnamed = [
            "--tp",
            "4",
            "--tp-nodes",
            "2",
            "--registry",
            "etcd://e:2379",
        ];
        assert!(refused(&unnamed).contains("--group-id"));
        let mut wildcard = unnamed.to_vec();
        wildcard.extend(["--group-id", "g", "--tp-listen", "0.0.0.0:0"]);
        assert!(refused(&wildcard).contains("this host's own address"));
    }
}
