//! `openinfer serve`: router and worker in one process, with a static registry of one worker.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;

use openinfer_router::Router;
use openinfer_worker::process::{self, Membership};

use crate::args::{EngineKind, ServeArgs};

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let model = match &a.model {
        Some(m) if a.engine.engine == EngineKind::Model => Some(super::resolve_model(m)?),
        Some(m) => Some(m.clone()),
        None if a.engine.engine == EngineKind::Sim => None,
        None => {
            let cache = a.cache_dir.clone().unwrap_or_else(default_cache_dir);
            let dir = openinfer_bench::progress::preset_model(&cache, "tiny")?;
            tracing::info!(
                model = %dir.display(),
                "no --model given: serving the `tiny` demo model (random weights, for trying the API; pass --model DIR for a real one)"
            );
            Some(dir)
        }
    };
    // One registry, one endpoint: the router's metrics and the embedded worker's.
    let metrics = prometheus::Registry::new();
    let (handle, _engine_thread) = super::worker::start_engine(
        model.as_deref(),
        &a.engine,
        &a.worker,
        None,
        metrics.clone(),
    )?;
    super::runtime()?.block_on(async move {
        let listener = super::bind(a.listen).await?;
        // The worker listens on an ephemeral loopback port that only this router uses.
        let worker_listener = super::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let worker_addr = worker_listener.local_addr()?;
        let (stop_worker, worker_stopped) = tokio::sync::oneshot::channel::<()>();
        // The same life as `openinfer worker`'s, with no registry: only this process's router
        // uses the embedded worker, so it is ready at once and has nothing to drain once the
        // router has drained.
        let membership = Membership {
            registry: None,
            advertise: None,
            group_id: None,
            lease_ttl: std::time::Duration::ZERO,
            drain_grace: std::time::Duration::ZERO,
            revision: String::new(),
        };
        // The embedded worker listens on loopback for this process's router alone.
        let accept = openinfer_net::Accept {
            tls: None,
            max_connections: 16,
            handshake_timeout: openinfer_net::DEFAULT_HANDSHAKE_TIMEOUT,
            open: None,
        };
        let worker = tokio::spawn(process::serve(
            handle.clone(),
            worker_listener,
            accept,
            membership,
            async {
                let _ = worker_stopped.await;
            },
        ));
        let router = Router::start(super::router::config(&a.router), &metrics)?;
        let link = router.add_worker(worker_addr.to_string());
        // Ready means ready: announce the address once the embedded worker is linked.
        let linked = async {
            while router.models().serving() == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(60), linked)
            .await
            .context("the embedded worker did not connect to the router within a minute")?;
        tracing::info!(
            addr = %listener.local_addr()?,
            model = %handle.info().model,
            "serving openinfer.v1.Inference (router + worker in one process)"
        );
        super::serve_metrics(&a.metrics, super::ROUTER_METRICS, metrics).await?;
        let http = super::bind_http(&a.router).await?;
        router
            .serve_on(listener, http, super::shutdown_signal())
            .await?;
        // The router has drained: it lets go of the embedded worker, which then stops.
        drop(link);
        let _ = stop_worker.send(());
        worker.await??;
        anyhow::Ok(())
    })
}

/// `$XDG_CACHE_HOME/openinfer`, else `~/.cache/openinfer`, else `./.openinfer-cache`.
fn default_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("openinfer"))
        .unwrap_or_else(|| PathBuf::from(".openinfer-cache"))
}
