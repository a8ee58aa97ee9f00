//! `openinfer worker`.

use anyhow::Context;
use openinfer_worker::{EngineHandle, LoopConfig, WorkerService};

use crate::args::WorkerArgs;

pub fn run(a: WorkerArgs) -> anyhow::Result<()> {
    let engine = super::load_engine(&a.engine)?;
    let (handle, _engine_thread) = EngineHandle::spawn(
        engine,
        LoopConfig {
            command_queue: a.command_queue,
            connection_buffer: a.connection_buffer,
        },
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {}; pick a free address with --listen",
                    a.listen
                )
            })?;
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
