//! `openinfer router`.

use openinfer_net::{ClientTls, ServerTls};
use openinfer_router::{Router, RouterConfig};

use crate::args::{RouterArgs, RouterCmdArgs};

pub fn run(a: RouterCmdArgs) -> anyhow::Result<()> {
    let registry = super::etcd_config(&a.registry)?;
    super::runtime()?.block_on(async move {
        let listener = super::bind(a.listen).await?;
        let metrics = prometheus::Registry::new();
        let mut cfg = config(&a.router);
        cfg.worker_tls = a.worker_tls.files()?.map(|(cert, key, ca)| ClientTls {
            cert,
            key,
            ca,
            server_name: a.worker_tls_server_name.clone(),
        });
        let router = Router::start(cfg, &metrics)?;
        // Static workers stay linked as long as their handles live: the whole run.
        let _static: Vec<_> = a
            .workers
            .iter()
            .map(|w| router.add_worker(w.trim().to_string()))
            .collect();
        if let Some(cfg) = registry {
            let (tx, rx) = tokio::sync::mpsc::channel(1024);
            openinfer_registry::etcd::discover(cfg, tx);
            router.follow_registry(rx);
        }
        tracing::info!(addr = %listener.local_addr()?, workers = ?a.workers, registry = ?a.registry.registry, "router serving openinfer.v1.Inference");
        super::serve_metrics(&a.metrics, super::ROUTER_METRICS, metrics).await?;
        let http = super::bind_http(&a.router).await?;
        router
            .serve_on(listener, http, super::shutdown_signal())
            .await?;
        anyhow::Ok(())
    })
}

/// The router configuration the flags describe.
pub fn config(a: &RouterArgs) -> RouterConfig {
    RouterConfig {
        default_model: a.default_model.clone(),
        max_queued_requests: a.max_queued_requests,
        max_queue_per_priority: a.max_queue_per_priority,
        max_queued_tokens: a.max_queued_tokens,
        sheddable_share: a.sheddable_share,
        default_queue_timeout: a.queue_timeout.0,
        aging_step: (!a.aging_step.0.is_zero()).then_some(a.aging_step.0),
        preemption: a.preemption,
        cache_aware: a.cache_aware,
        cache_balance_slack: a.cache_balance_slack,
        prefix_index_entries: a.prefix_index_entries,
        deadline_admission: a.deadline_admission,
        max_resumes: a.max_resumes,
        retry_pushback: a.retry_pushback.0,
        default_max_new_tokens: a.default_max_new_tokens,
        max_choices: a.max_choices,
        max_stop_strings: a.max_stop_strings,
        max_stop_bytes: a.max_stop_bytes,
        max_request_bytes: a.max_request_bytes.0 as usize,
        tokenizer_threads: a.tokenizer_threads as usize,
        max_unread_output: a.max_unread_output.0 as usize,
        worker_queue: a.worker_queue,
        scheduler_queue: a.scheduler_queue,
        max_concurrent_streams: a.max_concurrent_streams,
        drain_timeout: a.drain_timeout.0,
        tenants_file: a.tenants.clone(),
        fair_share: a.fair_share,
        fair_input_weight: a.fair_input_weight,
        fair_output_weight: a.fair_output_weight,
        tls: a
            .tls_cert
            .clone()
            .zip(a.tls_key.clone())
            .map(|(cert, key)| ServerTls {
                cert,
                key,
                client_ca: a.tls_client_ca.clone(),
            }),
        max_connections: a.max_connections,
        max_header_bytes: a.max_header_bytes.0.min(u32::MAX.into()) as u32,
        handshake_timeout: a.handshake_timeout.0,
        keepalive_interval: a.keepalive_interval.0,
        keepalive_timeout: a.keepalive_timeout.0,
        max_connection_age: (!a.max_connection_age.0.is_zero()).then_some(a.max_connection_age.0),
        ..RouterConfig::default()
    }
}
