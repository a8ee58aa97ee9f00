//! Following the tenants file: a new version is put in force when its contents change or on
//! `SIGHUP`. A version that does not parse is refused whole (logged, counted) and the one in
//! force stays, so a bad edit never locks every tenant out.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::metrics::RouterMetrics;

use super::{file, Quotas, Tenants};

/// Reloads `path` into `tenants` whenever it changes; forgets the quota use of tenants it no
/// longer lists; counts each attempt by result.
pub fn follow(
    path: PathBuf,
    tenants: Tenants,
    quotas: Arc<Mutex<Quotas>>,
    metrics: Arc<RouterMetrics>,
) -> tokio::task::JoinHandle<()> {
    let watched = vec![path.clone()];
    openinfer_net::watch::on_change(
        watched,
        openinfer_net::watch::POLL,
        move || match file::load(&path) {
            Ok(directory) => {
                let names: std::collections::HashSet<Arc<str>> =
                    directory.tenants().iter().map(|t| t.name.clone()).collect();
                tracing::info!(path = %path.display(), tenants = names.len(), "tenants file reloaded");
                for t in directory.tenants() {
                    metrics.tenant_known(&t.name);
                }
                tenants.replace(directory);
                quotas
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|n| names.contains(n));
                metrics.tenants_reloads.with_label_values(&["ok"]).inc();
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "tenants file refused; the previous version stays in force");
                metrics.tenants_reloads.with_label_values(&["error"]).inc();
            }
        },
    )
}
