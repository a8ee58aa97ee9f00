//! `openinfer worker`.

use std::path::Path;

use openinfer_worker::{EngineHandle, LoopConfig, WorkerService};

use crate::args::{EngineArgs, WorkerArgs, WorkerLoopArgs};

pub fn run(a: WorkerArgs) -> anyhow::Result<()> {
    let handle = start_engine(&a.model, &a.engine, &a.worker)?;
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

/// Loads the model and starts the engine thread.
pub fn start_engine(
    model: &Path,
    engine: &EngineArgs,
    worker: &WorkerLoopArgs,
) -> anyhow::Result<EngineHandle> {
    let engine_ = super::load_engine(model, engine)?;
    let (handle, _engine_thread) = EngineHandle::spawn(
        engine_,
        LoopConfig {
            command_queue: worker.command_queue,
            connection_buffer: worker.connection_buffer,
            model_name: engine.served_model_name.clone(),
        },
    );
    Ok(handle)
}
