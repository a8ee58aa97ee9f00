//! One module per subcommand.

mod bench_engine;
mod make_model;
mod worker;

use crate::args::{Command, EngineArgs};
use anyhow::Context;
use openinfer_engine::{parse_device, parse_dtype, Engine, EngineConfig};

/// Runs a parsed subcommand.
pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Worker(a) => worker::run(a),
        Command::MakeModel(a) => make_model::run(a),
        Command::BenchEngine(a) => bench_engine::run(a),
    }
}

/// The engine configuration the flags describe.
pub fn engine_config(a: &EngineArgs) -> anyhow::Result<EngineConfig> {
    let dtype = match &a.dtype {
        None => None,
        Some(s) => {
            Some(parse_dtype(s).with_context(|| format!("--dtype {s}: use f32, bf16 or f16"))?)
        }
    };
    Ok(EngineConfig {
        device: parse_device(&a.device)?,
        dtype,
        block_size: a.block_size,
        kv_cache_bytes: a.kv_cache_memory as usize,
        max_running: a.max_running,
        max_batch_tokens: a.max_batch_tokens,
        max_waiting: a.max_waiting,
        max_model_len: a.max_model_len,
    })
}

/// Loads the engine the flags describe, with a progress bar.
pub fn load_engine(a: &EngineArgs) -> anyhow::Result<Engine> {
    let cfg = engine_config(a)?;
    tracing::info!(model = %a.model.display(), "loading model");
    let pb = crate::progress::bar(0, "loading");
    let engine = Engine::load(&a.model, cfg, &|done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })
    .with_context(|| format!("cannot load the model in {}", a.model.display()))?;
    pb.finish_and_clear();
    Ok(engine)
}

/// Resolves when SIGINT or SIGTERM arrives.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown signal received");
}
