//! One module per subcommand.

mod generate;
mod make_model;
mod parity;
mod perplexity;
mod router;
mod serve;
mod worker;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use crate::args::{Command, EngineArgs};
use anyhow::Context;
use openinfer_engine::tp::Communicator;
use openinfer_engine::{
    parse_device, parse_dtype, parse_kv_cache_dtype, Engine, EngineConfig, ModelDir,
};

/// Runs a parsed subcommand.
pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Serve(a) => serve::run(a),
        Command::Router(a) => router::run(a),
        Command::Worker(a) => worker::run(a),
        Command::Generate(a) => generate::run(a),
        Command::MakeModel(a) => make_model::run(a),
        Command::Bench(a) => openinfer_bench::serving::run(a),
        Command::BenchEngine(a) => openinfer_bench::engine::run(a),
        Command::BenchRouter(a) => openinfer_bench::router::run(a),
        Command::Parity(a) => parity::run(a),
        Command::Perplexity(a) => perplexity::run(a),
    }
}

/// The local model `--model` names: the path, or the Hub id's files in the Hub cache
/// (downloaded with a progress bar when missing; `HF_ENDPOINT`, `HF_TOKEN`, `HF_HOME`).
pub fn resolve_model(model: &Path) -> anyhow::Result<std::path::PathBuf> {
    let hub = openinfer_engine::hub::HubConfig::from_env();
    openinfer_engine::hub::resolve(model, &hub)
        .with_context(|| format!("--model {}", model.display()))
}

/// The engine configuration the flags describe.
pub fn engine_config(a: &EngineArgs) -> anyhow::Result<EngineConfig> {
    let dtype = match &a.dtype {
        None => None,
        Some(s) => {
            Some(parse_dtype(s).with_context(|| format!("--dtype {s}: use f32, bf16 or f16"))?)
        }
    };
    let kv_cache_dtype = parse_kv_cache_dtype(&a.kv_cache_dtype)?;
    Ok(EngineConfig {
        device: parse_device(&a.device)?,
        dtype,
        block_size: a.block_size,
        kv_cache_bytes: a.kv_cache_memory.0 as usize,
        kv_cache_dtype,
        max_running: a.max_running,
        max_batch_tokens: a.max_batch_tokens,
        step_time_budget: a.step_time_budget,
        max_waiting: a.max_waiting,
        max_model_len: a.max_model_len,
        prefix_cache: a.prefix_cache,
    })
}

/// Loads the engine the flags describe, with a progress bar: the whole model, or rank 0's
/// shard of a tensor-parallel `group`.
pub fn load_engine(
    model: &Path,
    a: &EngineArgs,
    group: Option<Arc<dyn Communicator>>,
) -> anyhow::Result<Engine> {
    let cfg = engine_config(a)?;
    tracing::info!(model = %model.display(), "loading model");
    let pb = openinfer_bench::progress::bar(0, "loading");
    let progress = |done: usize, total: usize| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    };
    let engine = match group {
        None => Engine::load(model, cfg, &progress),
        Some(g) => ModelDir::open(model)
            .and_then(|dir| Engine::from_model_dir_in_group(dir, cfg, g, &progress)),
    }
    .with_context(|| format!("cannot load the model in {}", model.display()))?;
    pb.finish_and_clear();
    Ok(engine)
}

/// The etcd password: from --etcd-password-file, else OPENINFER_ETCD_PASSWORD.
fn etcd_password(a: &crate::args::RegistryArgs) -> anyhow::Result<String> {
    if let Some(path) = &a.etcd_password_file {
        // The error names the file, never its contents.
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --etcd-password-file {}", path.display()))?;
        let password = text.strip_suffix('\n').unwrap_or(&text);
        let password = password.strip_suffix('\r').unwrap_or(password);
        return Ok(password.to_string());
    }
    std::env::var(ETCD_PASSWORD_ENV).map_err(|_| {
        anyhow::anyhow!(
            "--etcd-user needs a password: give --etcd-password-file FILE or set {ETCD_PASSWORD_ENV}"
        )
    })
}

/// The environment variable an etcd password may come from.
const ETCD_PASSWORD_ENV: &str = "OPENINFER_ETCD_PASSWORD";

/// The etcd settings the flags describe (`None`: static membership).
pub fn etcd_config(
    a: &crate::args::RegistryArgs,
) -> anyhow::Result<Option<openinfer_registry::EtcdConfig>> {
    let Some(url) = &a.registry else {
        return Ok(None);
    };
    let mut cfg = openinfer_registry::EtcdConfig::from_url(url)?;
    let keepalive = a.etcd_keepalive.0;
    if keepalive.is_zero() {
        anyhow::bail!(
            "--etcd-keepalive must be positive (default {})",
            crate::args::Dur(openinfer_registry::etcd::DEFAULT_KEEPALIVE)
        );
    }
    if keepalive < openinfer_registry::etcd::MIN_KEEPALIVE {
        tracing::warn!(
            keepalive = ?keepalive,
            "--etcd-keepalive is below etcd's default minimum ping interval (5s); unless etcd's --grpc-keepalive-min-time is as low, etcd will close the connection"
        );
    }
    cfg.keepalive = keepalive;
    if a.etcd_password.is_some() {
        anyhow::bail!(
            "--etcd-password is refused: a password on the command line shows in `ps` (and \
             in every --tp rank's arguments); put it in a file for --etcd-password-file, or in \
             the OPENINFER_ETCD_PASSWORD environment variable"
        );
    }
    if let Some(user) = &a.etcd_user {
        cfg.auth = Some((user.clone(), etcd_password(a)?));
    }
    if let Some(ca) = &a.etcd_ca {
        let read =
            |p: &Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        let identity = match (&a.etcd_cert, &a.etcd_key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            _ => None,
        };
        cfg = cfg.with_tls(openinfer_registry::Tls {
            ca: read(ca)?,
            identity,
        });
    }
    Ok(Some(cfg))
}

/// The async runtime of the services.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    openinfer_worker::process::runtime().context("cannot start the async runtime")
}

/// Binds a TCP listener, with an error that says what to do.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}; pick a free address with --listen"))
}

/// The listener of `--http-listen`, when set; logs its URL (`http=http://…`).
pub async fn bind_http(
    a: &crate::args::RouterArgs,
) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    let Some(addr) = a.http_listen else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr}; pick a free address with --http-listen")
    })?;
    let scheme = if a.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(
        http = %format!("{scheme}://{}", listener.local_addr()?),
        "serving the OpenAI-compatible HTTP API"
    );
    Ok(Some(listener))
}

/// Starts the Prometheus `/metrics` endpoint for `registry` on `--metrics-listen`, else on
/// `default`, and logs its URL (`metrics=http://…/metrics`).
pub async fn serve_metrics(
    a: &crate::args::MetricsArgs,
    default: SocketAddr,
    registry: openinfer_telemetry::metrics::MetricsRegistry,
) -> anyhow::Result<SocketAddr> {
    use openinfer_telemetry::metrics;
    let listener = metrics::bind(
        a.metrics_listen.unwrap_or(default),
        a.metrics_listen.is_some(),
    )
    .await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = metrics::serve(listener, registry, std::future::pending()).await {
            tracing::error!(error = %e, "the metrics endpoint stopped");
        }
    });
    tracing::info!(metrics = %format!("http://{addr}/metrics"), "serving Prometheus metrics");
    Ok(addr)
}

/// The default metrics address of the router (and of `serve`).
pub const ROUTER_METRICS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 9464);

/// The default metrics address of a worker.
pub const WORKER_METRICS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 9465);

/// Resolves when SIGINT or SIGTERM arrives (router, worker and serve stop the same way).
pub use openinfer_worker::process::shutdown_signal;
