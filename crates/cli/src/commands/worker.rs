//! `openinfer worker`.

use std::path::Path;

use anyhow::Context;
use openinfer_engine::{SimConfig, SimEngine};
use openinfer_worker::{EngineHandle, LoopConfig, WorkerService};

use crate::args::{EngineArgs, EngineKind, WorkerArgs, WorkerLoopArgs};

pub fn run(a: WorkerArgs) -> anyhow::Result<()> {
    let handle = start_engine(a.model.as_deref(), &a.engine, &a.worker)?;
    super::runtime()?.block_on(async move {
        let listener = super::bind(a.listen).await?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, model = %handle.info().model, "worker serving openinfer.worker.v1");
        openinfer_worker::serve_on(
            WorkerService::new(handle),
            listener,
            super::shutdown_signal(),
        )
        .await?;
        anyhow::Ok(())
    })
}

/// Loads the model (or sets up the sim engine) and starts the engine thread.
pub fn start_engine(
    model: Option<&Path>,
    engine: &EngineArgs,
    worker: &WorkerLoopArgs,
) -> anyhow::Result<EngineHandle> {
    let cfg = LoopConfig {
        command_queue: worker.command_queue,
        connection_buffer: worker.connection_buffer,
        model_name: engine.served_model_name.clone(),
    };
    let handle = match engine.engine {
        EngineKind::Model => {
            let model = model.context("--model DIR is required (or --engine sim)")?;
            EngineHandle::spawn(super::load_engine(model, engine)?, cfg).0
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
                max_waiting: engine.max_waiting,
                max_model_len: engine.max_model_len.unwrap_or(4096),
                ..SimConfig::default()
            })?;
            tracing::info!(step_time = ?engine.sim_step_time, "sim engine: no model, fixed step time");
            EngineHandle::spawn(sim, cfg).0
        }
    };
    Ok(handle)
}
