//! Tensor-parallel groups (`openinfer worker --tp N`): one model replica split across N
//! rank processes.
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
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use openinfer_engine::tp::cpu::CpuCommunicator;
use openinfer_engine::tp::follower::Follower;
use openinfer_engine::tp::Communicator;
use openinfer_engine::{EngineConfig, EngineError, ModelDir};
use openinfer_registry::client::EtcdError;
use openinfer_registry::group::{RankKey, RankRecord, RendezvousError};
use openinfer_registry::EtcdConfig;

use crate::process::{hostname, runtime, shutdown_signal};

/// How a group is formed: `openinfer worker`'s `--tp*`, `--rank`, `--group-id` and
/// `--registry` flags.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// Ranks the model is split across.
    pub tp: usize,
    /// This process's rank (`None`: start and supervise this host's ranks).
    pub rank: Option<usize>,
    /// The collective backend (`None`: NCCL on CUDA devices, the CPU ring elsewhere).
    pub backend: Option<TpBackend>,
    /// Where a rank's collective listens, and the address it publishes.
    pub listen: SocketAddr,
    /// Hosts the group spans.
    pub nodes: usize,
    /// This host's index among them.
    pub node_rank: usize,
    /// Every rank's address, instead of a rendezvous through etcd.
    pub peers: Vec<SocketAddr>,
    /// How long ranks wait for each other.
    pub timeout: Duration,
    /// How long one collective that the host cannot interrupt (NCCL's) may take before its
    /// communicator is aborted.
    pub collective_timeout: Duration,
    /// The group's name in etcd.
    pub group_id: Option<String>,
    /// etcd, where ranks meet.
    pub registry: Option<EtcdConfig>,
    /// The compute device (`cuda...` gives each rank its own GPU).
    pub device: String,
    /// True for the sim engine, which has no model to split.
    pub sim: bool,
}

/// A collective backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TpBackend {
    /// Ranks in separate processes exchange tensors over TCP (a ring all-reduce).
    Cpu,
    /// NCCL between GPUs (needs a `--features cuda` build).
    Nccl,
}

/// Why a group could not form or keep going.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// The flags do not describe a group that can work; the message says what to change.
    #[error("{0}")]
    Config(String),
    /// A socket or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The ranks did not meet.
    #[error(transparent)]
    Rendezvous(#[from] RendezvousError),
    /// etcd failed.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The collective or the shard failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The group stopped with a rank missing.
    #[error("{0}")]
    Stopped(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> GroupError {
    let what = what.into();
    move |source| GroupError::Io { what, source }
}

macro_rules! refuse {
    ($($arg:tt)*) => { return Err(GroupError::Config(format!($($arg)*))) };
}

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
pub fn role(t: &GroupConfig) -> Result<Role, GroupError> {
    if t.tp == 0 {
        refuse!("--tp must be at least 1");
    }
    if t.tp == 1 {
        return Ok(Role::Whole);
    }
    if t.sim {
        refuse!("--tp splits a model; the sim engine has none (drop --tp or use --engine model)");
    }
    if backend(t) == TpBackend::Nccl && !cfg!(feature = "cuda") {
        refuse!("the nccl backend needs a CUDA build (docs/tensor-parallel.md: building with CUDA); use --tp-backend cpu");
    }
    if t.nodes == 0 || !t.tp.is_multiple_of(t.nodes) {
        refuse!(
            "--tp {} does not split evenly over --tp-nodes {}: every host runs the same number of ranks",
            t.tp,
            t.nodes
        );
    }
    if t.node_rank >= t.nodes {
        refuse!(
            "--tp-node-rank {} is outside --tp-nodes {}: hosts are 0..{}",
            t.node_rank,
            t.nodes,
            t.nodes - 1
        );
    }
    if t.nodes > 1 && t.peers.is_empty() {
        if t.registry.is_none() {
            refuse!("a group across --tp-nodes {} hosts meets through etcd: give --registry (or every rank's address in --tp-peers)", t.nodes);
        }
        if t.group_id.is_none() {
            refuse!("a group across hosts needs --group-id, the same on every host of the group");
        }
        if t.listen.ip().is_unspecified() {
            refuse!(
                "--tp-listen {} is what the other hosts would be told to dial; give this host's own address (e.g. $(POD_IP))",
                t.listen
            );
        }
    }
    if !t.peers.is_empty() && t.peers.len() != t.tp {
        refuse!(
            "--tp-peers lists {} addresses for --tp {}: give one per rank, in rank order",
            t.peers.len(),
            t.tp
        );
    }
    Ok(match t.rank {
        None => Role::Supervisor,
        Some(r) if r >= t.tp => refuse!(
            "--rank {r} is outside --tp {}: ranks are 0..{}",
            t.tp,
            t.tp - 1
        ),
        Some(r) => Role::Rank(r),
    })
}

/// The collective backend: the flag, else NCCL on CUDA devices and the CPU ring elsewhere.
fn backend(t: &GroupConfig) -> TpBackend {
    let cuda = t.device.starts_with("cuda");
    t.backend.unwrap_or(if cuda {
        TpBackend::Nccl
    } else {
        TpBackend::Cpu
    })
}

/// Joins rank `rank`'s group and returns its communicator.
pub fn join(t: &GroupConfig, rank: usize) -> Result<Arc<dyn Communicator>, GroupError> {
    let (size, timeout) = (t.tp, t.timeout);
    #[cfg(feature = "cuda")]
    let collective_timeout = t.collective_timeout;
    let backend = backend(t);
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
            TpBackend::Nccl => Arc::new(openinfer_engine::tp::nccl::NcclCommunicator::new(
                comm,
                openinfer_engine::tp::nccl::NcclDeadlines {
                    init: timeout,
                    collective: collective_timeout,
                },
            )?),
            #[cfg(not(feature = "cuda"))]
            TpBackend::Nccl => refuse!("the nccl backend needs a CUDA build"),
        };
        Ok::<_, GroupError>(comm)
    };
    if !t.peers.is_empty() {
        let me = t.peers[rank];
        let l = TcpListener::bind(me).map_err(io(format!(
            "rank {rank} cannot listen on {me}, its --tp-peers address"
        )))?;
        return connect(l, t.peers.clone());
    }
    let Some(cfg) = &t.registry else {
        refuse!("rank {rank} of --tp {size}: the ranks find each other through etcd (--registry) or --tp-peers; give one");
    };
    let Some(group) = t.group_id.as_deref() else {
        refuse!("--group-id names the group; give every rank of it the same one");
    };
    let l = TcpListener::bind(t.listen)
        .map_err(io(format!("rank {rank} cannot listen on {}", t.listen)))?;
    let addr = l.local_addr().map_err(io("the rank's listener"))?;
    let me = RankRecord {
        rank,
        size,
        addr: addr.to_string(),
    };
    tracing::info!(group, rank, collective = %me.addr, "waiting for the group's other ranks in etcd");
    runtime()
        .map_err(io("cannot start the async runtime"))?
        .block_on(async move {
            let key = RankKey::publish(cfg, group, &me).await?;
            let addrs = key.wait_for_ranks(group, size, timeout).await?;
            let addrs = addrs
                .iter()
                .map(|s| {
                    s.parse().map_err(|_| {
                        GroupError::Stopped(format!("a rank published a bad address `{s}`"))
                    })
                })
                .collect::<Result<Vec<SocketAddr>, _>>()?;
            let comm = tokio::task::spawn_blocking(move || connect(l, addrs))
                .await
                .map_err(|e| GroupError::Stopped(format!("joining the ring panicked: {e}")))??;
            key.release().await;
            Ok(comm)
        })
}

/// Runs a follower rank: loads its shard of `model` (`progress(done, total)` as it loads),
/// then runs every step rank 0 sends until rank 0 stops the group (`Ok`) or the group
/// breaks (an error).
pub fn follow(
    comm: Arc<dyn Communicator>,
    model: &Path,
    cfg: &EngineConfig,
    progress: &dyn Fn(usize, usize),
) -> Result<(), GroupError> {
    let rank = comm.rank();
    let dir = ModelDir::open(model)?;
    let follower = Follower::load(&dir, cfg, comm, progress)?;
    tracing::info!(
        rank,
        weight_mib = follower.weight_bytes() as f64 / (1 << 20) as f64,
        "shard loaded; following rank 0"
    );
    runtime().map_err(io("cannot start the async runtime"))?.block_on(async move {
        let mut run = tokio::task::spawn_blocking(move || follower.run());
        loop {
            tokio::select! {
                done = &mut run => {
                    done.map_err(|e| GroupError::Stopped(format!("rank {rank} panicked: {e}")))??;
                    tracing::info!(rank, "rank 0 stopped the group; exiting");
                    return Ok(());
                }
                () = shutdown_signal() => {
                    // Rank 0 drains the group and then stops it; leaving now would break the
                    // forward of the sequences it is finishing.
                    tracing::info!(rank, "waiting for rank 0 to stop the group");
                }
            }
        }
    })
}

/// The ranks this host runs: all of them, or its share of a group across `--tp-nodes` hosts.
pub fn local_ranks(t: &GroupConfig) -> std::ops::Range<usize> {
    let per_host = t.tp / t.nodes.max(1);
    t.node_rank * per_host..(t.node_rank + 1) * per_host
}

/// Starts this host's ranks as child processes of this program (with this process's
/// arguments, each given its rank) and supervises them.
pub fn supervise(t: &GroupConfig) -> Result<(), GroupError> {
    let group = t
        .group_id
        .clone()
        .unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()));
    let peers: Vec<SocketAddr> = if !t.peers.is_empty() {
        t.peers.clone()
    } else if t.registry.is_some() {
        Vec::new() // the ranks meet in etcd
    } else {
        free_loopback_addrs(t.tp)?
    };
    let cuda = t.device.starts_with("cuda");
    let args = child_args(cuda);
    let exe = std::env::current_exe().map_err(io("cannot find the program to start the ranks"))?;
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
            .map_err(io(format!("cannot start rank {rank}")))?;
        tracing::info!(rank, pid = child.id(), group = %group, "started rank");
        ranks.push(child);
    }
    let result = runtime()
        .map_err(io("cannot start the async runtime"))?
        .block_on(watch_ranks(&mut ranks, local.start));
    stop_all(&mut ranks);
    result
}

/// Waits for SIGTERM (drains the group through rank 0) or for a rank to exit (stops the rest).
/// `ranks[i]` is rank `first + i`; on hosts without rank 0 (`first > 0`) SIGTERM only waits:
/// the followers stop when rank 0, on the group's first host, stops the group.
async fn watch_ranks(ranks: &mut [Child], first: usize) -> Result<(), GroupError> {
    let mut signal = std::pin::pin!(shutdown_signal());
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
                    Err(GroupError::Stopped(format!("ranks exited with {code:?} while draining")))
                };
            }
            _ = tick.tick() => {
                for (i, child) in ranks.iter_mut().enumerate() {
                    if let Some(status) = child.try_wait().map_err(io("cannot watch the ranks"))? {
                        let rank = first + i;
                        tracing::error!(rank, %status, "a rank exited; stopping the group");
                        // Rank 0 first: it leaves the registry and hands its sequences back.
                        // (Elsewhere the followers stop as the broken ring reaches them.)
                        if first == 0 {
                            terminate(&ranks[0]);
                        }
                        let _ = tokio::time::timeout(Duration::from_secs(10), wait_all(ranks)).await;
                        return Err(GroupError::Stopped(format!("rank {rank} exited ({status}); the group stopped")));
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
fn free_loopback_addrs(n: usize) -> Result<Vec<SocketAddr>, GroupError> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(io("cannot find free loopback ports for the ranks"))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map_err(io("loopback port")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(tp: usize) -> GroupConfig {
        GroupConfig {
            tp,
            rank: None,
            backend: None,
            listen: "127.0.0.1:0".parse().unwrap(),
            nodes: 1,
            node_rank: 0,
            peers: Vec::new(),
            timeout: Duration::from_secs(1),
            collective_timeout: Duration::from_secs(1),
            group_id: None,
            registry: None,
            device: "cpu".into(),
            sim: false,
        }
    }

    fn refused(g: &GroupConfig) -> String {
        match role(g) {
            Ok(_) => panic!("{g:?} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_group_across_hosts_splits_its_ranks_evenly() {
        let across = GroupConfig {
            nodes: 2,
            node_rank: 1,
            registry: Some(EtcdConfig::from_url("etcd://e:2379").unwrap()),
            group_id: Some("g".into()),
            listen: "10.0.0.7:0".parse().unwrap(),
            ..group(8)
        };
        assert!(matches!(role(&across).unwrap(), Role::Supervisor));
        assert_eq!(local_ranks(&across), 4..8);
        assert_eq!(local_ranks(&group(4)), 0..4);

        let uneven = GroupConfig {
            nodes: 3,
            ..group(4)
        };
        assert!(refused(&uneven).contains("does not split evenly"));
        let outside = GroupConfig {
            nodes: 2,
            node_rank: 2,
            ..group(4)
        };
        assert!(refused(&outside).contains("outside --tp-nodes 2"));
        let no_etcd = GroupConfig {
            nodes: 2,
            ..group(4)
        };
        assert!(refused(&no_etcd).contains("--registry"));
        let unnamed = GroupConfig {
            registry: across.registry.clone(),
            ..no_etcd
        };
        assert!(refused(&unnamed).contains("--group-id"));
        let wildcard = GroupConfig {
            group_id: Some("g".into()),
            listen: "0.0.0.0:0".parse().unwrap(),
            ..unnamed
        };
        assert!(refused(&wildcard).contains("this host's own address"));
        assert!(refused(&GroupConfig {
            sim: true,
            ..group(2)
        })
        .contains("sim engine"));
    }
}
