//! `openinfer worker`: the flags become a [`GroupConfig`] and a [`Membership`]; the worker
//! crate runs the process (`openinfer_worker::process`) and its tensor-parallel group
//! (`openinfer_worker::group`).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use openinfer_engine::tp::Communicator;
use openinfer_engine::{SimConfig, SimEngine};
use openinfer_worker::group::{self, GroupConfig, Role};
use openinfer_worker::process::{self, Membership};
use openinfer_worker::{EngineHandle, LoopConfig};

use crate::args::{EngineArgs, EngineKind, TpBackend, WorkerArgs, WorkerLoopArgs};
use openinfer_net::{Accept, ServerTls};

pub fn run(mut a: WorkerArgs) -> anyhow::Result<()> {
    if let (Some(m), EngineKind::Model) = (&a.model, a.engine.engine) {
        a.model = Some(super::resolve_model(m)?);
    }
    let registry = super::etcd_config(&a.registry)?;
    // A bad address fails now, not after the model has loaded.
    process::advertised(a.advertise_addr.as_deref(), a.listen)?;
    // So do TLS files that do not load.
    let tls = a.worker_tls.files()?.map(|(cert, key, ca)| ServerTls {
        cert,
        key,
        client_ca: Some(ca),
    });
    if let Some(t) = &tls {
        t.load()?;
    }
    let tp = group_config(&a, registry.clone());
    let comm = match group::role(&tp)? {
        Role::Whole => None,
        Role::Supervisor => return Ok(group::supervise(&tp)?),
        Role::Rank(rank) => {
            let comm = group::join(&tp, rank)?;
            if rank > 0 {
                return follow(&a, comm);
            }
            Some(comm)
        }
    };
    let membership = Membership {
        registry,
        advertise: a.advertise_addr.clone(),
        group_id: a.group_id.clone(),
        lease_ttl: a.lease_ttl,
        drain_grace: a.drain_grace,
        revision: match (&a.model, a.engine.engine) {
            (Some(dir), EngineKind::Model) => process::model_revision(dir),
            _ => "sim".to_string(),
        },
    };
    let metrics = prometheus::Registry::new();
    let (handle, engine_thread) = start_engine(
        a.model.as_deref(),
        &a.engine,
        &a.worker,
        comm,
        metrics.clone(),
    )?;
    let served = super::runtime()?.block_on(async move {
        let listener = super::bind(a.listen).await?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, model = %handle.info().model, "worker serving openinfer.worker.v1");
        super::serve_metrics(&a.metrics, super::WORKER_METRICS, metrics).await?;
        let accept = Accept {
            tls: tls.map(|t| t.follow("worker TLS")).transpose()?,
            max_connections: a.max_connections,
            handshake_timeout: openinfer_net::DEFAULT_HANDSHAKE_TIMEOUT,
            open: None,
        };
        process::serve(
            handle,
            listener,
            accept,
            membership,
            process::shutdown_signal(),
        )
        .await?;
        anyhow::Ok(())
    });
    // Every handle is gone with the runtime: the engine thread ends, and in a group rank 0's
    // engine tells the other ranks to stop before this process exits.
    let _ = engine_thread.join();
    served
}

/// The group the `--tp*`, `--rank`, `--group-id` and `--registry` flags describe.
fn group_config(a: &WorkerArgs, registry: Option<openinfer_registry::EtcdConfig>) -> GroupConfig {
    let t = &a.tp;
    GroupConfig {
        tp: t.tp,
        rank: t.rank,
        backend: t.tp_backend.map(|b| match b {
            TpBackend::Cpu => group::TpBackend::Cpu,
            TpBackend::Nccl => group::TpBackend::Nccl,
        }),
        listen: t.tp_listen,
        nodes: t.tp_nodes,
        node_rank: t.tp_node_rank,
        peers: t.tp_peers.clone(),
        timeout: t.tp_timeout,
        collective_timeout: t.tp_collective_timeout,
        group_id: a.group_id.clone(),
        registry,
        device: a.engine.device.clone(),
        sim: a.engine.engine == EngineKind::Sim,
    }
}

/// Runs a follower rank (rank > 0) with a progress bar while its shard loads.
fn follow(a: &WorkerArgs, comm: Arc<dyn Communicator>) -> anyhow::Result<()> {
    let rank = comm.rank();
    let model = a
        .model
        .as_deref()
        .context("--model DIR is required (every rank loads its shard of it)")?;
    let cfg = super::engine_config(&a.engine)?;
    let pb = openinfer_bench::progress::bar(0, "loading shard");
    let followed = group::follow(comm, model, &cfg, &|done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    });
    pb.finish_and_clear();
    followed.with_context(|| format!("rank {rank} of the group over {}", model.display()))
}

/// Loads the model (or sets up the sim engine), warms it up and starts the engine thread; its
/// handle, and the thread, which ends once every handle is dropped.
pub fn start_engine(
    model: Option<&Path>,
    engine: &EngineArgs,
    worker: &WorkerLoopArgs,
    comm: Option<Arc<dyn Communicator>>,
    metrics: prometheus::Registry,
) -> anyhow::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    let chat_template = engine
        .chat_template
        .as_deref()
        .map(|p| {
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read --chat-template {}", p.display()))
        })
        .transpose()?;
    let cfg = LoopConfig {
        chat_template,
        command_queue: worker.command_queue,
        connection_buffer: worker.connection_buffer,
        refill_wait: worker.refill_wait.0,
        model_name: engine.served_model_name.clone(),
        registry: Some(metrics),
    };
    let started = match engine.engine {
        EngineKind::Model => {
            let model = model.context("--model DIR is required (or --engine sim)")?;
            process::warm_up(super::load_engine(model, engine, comm)?, cfg)
        }
        EngineKind::Sim => {
            let sim = SimEngine::new(SimConfig {
                model: engine
                    .served_model_name
                    .clone()
                    .unwrap_or_else(|| "sim".into()),
                step_time: engine.sim_step_time,
                total_blocks: engine.sim_kv_blocks,
                block_size: engine.block_size,
                max_running: engine.max_running,
                max_batch_tokens: engine.max_batch_tokens,
                max_waiting: engine.max_waiting,
                max_model_len: engine.max_model_len.unwrap_or(4096),
                ..SimConfig::default()
            })?;
            tracing::info!(step_time = ?engine.sim_step_time, "sim engine: no model, fixed step time");
            process::warm_up(sim, cfg)
        }
    };
    started.context("warm-up")
}
