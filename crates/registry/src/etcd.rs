//! etcd: worker registration under a lease, and router discovery by get + watch.
//!
//! Neither side ever gives up on etcd: while it is unreachable a worker keeps serving and
//! retries its registration, and a router keeps its last-known workers and retries its watch
//! (ARCHITECTURE §3: an etcd outage must not stop serving).

use std::collections::HashMap;
use std::time::Duration;

use openinfer_proto::etcd::etcdserverpb::LeaseKeepAliveRequest;
use openinfer_proto::etcd::mvccpb::event::EventType;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::client::{Etcd, EtcdError};
use crate::record::{WorkerRecord, WORKERS_PREFIX};
use crate::Change;

const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Endpoints, `http://host:port`.
    pub endpoints: Vec<String>,
    /// User and password, for etcd's authentication.
    pub auth: Option<(String, String)>,
    /// TLS towards etcd (endpoints become `https://`).
    pub tls: Option<Tls>,
    /// Bound on connecting and on each request.
    pub timeout: Duration,
    /// How often an HTTP/2 ping checks the connection while a watch or lease stream is open
    /// (none while idle). etcd answers pings more frequent than its
    /// `--grpc-keepalive-min-time` ([`MIN_KEEPALIVE`] unless configured) by closing the
    /// connection.
    pub keepalive: Duration,
}

/// etcd's default `--grpc-keepalive-min-time`: the most frequent pings it accepts.
pub const MIN_KEEPALIVE: Duration = Duration::from_secs(5);

/// The default ping interval: twice etcd's minimum (clock skew and a delayed ping stay
/// within it), so a dead etcd is noticed within about 13 s.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(10);

/// TLS material for etcd, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Tls {
    /// CA certificate(s) that sign etcd's server certificate.
    pub ca: Vec<u8>,
    /// Client certificate and key, when etcd requires client certificates.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// A registry URL that is not `etcd://HOST:PORT[,HOST:PORT]`.
#[derive(Debug, thiserror::Error)]
#[error("registry `{0}`: expected etcd://HOST:PORT[,HOST:PORT...]")]
pub struct UrlError(String);

impl EtcdConfig {
    /// Parses `etcd://host:port[,host:port]`.
    pub fn from_url(url: &str) -> Result<EtcdConfig, UrlError> {
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| UrlError(url.into()))?;
        let endpoints: Vec<String> = rest
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|e| format!("http://{e}"))
            .collect();
        if endpoints.is_empty() || rest.contains('/') {
            return Err(UrlError(url.into()));
        }
        Ok(EtcdConfig {
            endpoints,
            auth: None,
            tls: None,
            timeout: Duration::from_secs(3),
            keepalive: DEFAULT_KEEPALIVE,
        })
    }

    /// Speaks TLS to etcd with `tls`.
    pub fn with_tls(mut self, tls: Tls) -> Self {
        for e in &mut self.endpoints {
            if let Some(rest) = e.strip_prefix("http://") {
                *e = format!("https://{rest}");
            }
        }
        self.tls = Some(tls);
        self
    }
}

fn backoff(d: Duration) -> Duration {
    (d * 2).min(MAX_BACKOFF)
}

/// A worker's registration: its record, kept under a live lease until [`deregister`].
///
/// [`deregister`]: Registration::deregister
pub struct Registration {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    registered: tokio::sync::watch::Receiver<bool>,
}

impl Registration {
    /// Starts registering `record` with a lease of `ttl`, kept alive every `ttl / 3`.
    pub fn start(cfg: EtcdConfig, record: WorkerRecord, ttl: Duration) -> Registration {
        let (stop, stopped) = oneshot::channel();
        let (tx, registered) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(register(cfg, record, ttl, stopped, tx));
        Registration {
            stop: Some(stop),
            task,
            registered,
        }
    }

    /// Waits until the record is written (the first time).
    pub async fn registered(&mut self) {
        let _ = self.registered.wait_for(|r| *r).await;
    }

    /// Revokes the lease (the record disappears at once) and stops.
    pub async fn deregister(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

async fn register(
    cfg: EtcdConfig,
    record: WorkerRecord,
    ttl: Duration,
    mut stop: oneshot::Receiver<()>,
    registered: tokio::sync::watch::Sender<bool>,
) {
    let key = record.key();
    let value = match serde_json::to_string(&record) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode the worker record");
            return;
        }
    };
    let ttl_secs = ttl.as_secs().max(1) as i64;
    let mut wait = Duration::from_millis(100);
    let mut warned = false;
    loop {
        let attempt = async {
            let client = Etcd::connect(&cfg).await?;
            let lease = client.lease_grant(ttl_secs).await?;
            client.put(&key, &value, lease).await?;
            let (keeper, responses) = client.lease_keep_alive(lease).await?;
            Ok::<_, EtcdError>((client, lease, keeper, responses))
        };
        let outcome = tokio::select! {
            _ = &mut stop => return,
            r = attempt => r,
        };
        match outcome {
            Ok((client, lease, keeper, mut responses)) => {
                tracing::info!(%key, lease, ttl_s = ttl_secs, "registered in etcd");
                registered.send_replace(true);
                warned = false;
                wait = Duration::from_millis(100);
                let mut tick = tokio::time::interval(ttl / 3);
                let lost = loop {
                    tokio::select! {
                        _ = &mut stop => {
                            match tokio::time::timeout(cfg.timeout, client.lease_revoke(lease)).await {
                                Ok(Ok(_)) => tracing::info!(%key, "lease revoked; record removed"),
                                _ => tracing::warn!(%key, "cannot revoke the lease; the record expires with it"),
                            }
                            return;
                        }
                        _ = tick.tick() => {
                            if keeper.send(LeaseKeepAliveRequest { id: lease }).await.is_err() {
                                break "keep-alive stream closed".to_string();
                            }
                        }
                        msg = responses.message() => match msg {
                            Ok(Some(r)) if r.ttl > 0 => {}
                            Ok(Some(_)) => break "the lease expired".to_string(),
                            Ok(None) => break "keep-alive stream ended".to_string(),
                            Err(e) => break e.to_string(),
                        },
                    }
                };
                tracing::warn!(%key, reason = %lost, "lost the etcd lease; serving on and registering again");
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(%key, error = %e, "cannot register in etcd; serving on and retrying");
                    warned = true;
                } else {
                    tracing::debug!(%key, error = %e, retry_in = ?wait, "cannot register in etcd yet");
                }
            }
        }
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = backoff(wait);
    }
}

/// Follows the worker records in etcd and reports changes on `tx` until it closes: a full
/// get, then a watch from the following revision; after any failure, a new get that is
/// diffed against what is known (so nothing is missed, compaction included), then a new watch.
/// Malformed records, and records whose model or group disagrees with their key, are ignored
/// with a warning.
pub fn discover(cfg: EtcdConfig, tx: mpsc::Sender<Change>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut known: HashMap<String, WorkerRecord> = HashMap::new();
        let mut wait = Duration::from_millis(100);
        let mut warned = false;
        loop {
            match follow(&cfg, &mut known, &tx).await {
                Ok(()) => return, // the router went away
                Err(e) => {
                    if tx.send(Change::Reachable(false)).await.is_err() {
                        return;
                    }
                    if !warned {
                        tracing::warn!(error = %e, workers = known.len(), "etcd unreachable; serving the last-known workers and retrying");
                        warned = true;
                    }
                }
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(wait).await;
            wait = backoff(wait);
            if wait == MAX_BACKOFF {
                warned = false;
            }
        }
    })
}

/// One session with etcd: resync, then watch until something breaks.
async fn follow(
    cfg: &EtcdConfig,
    known: &mut HashMap<String, WorkerRecord>,
    tx: &mpsc::Sender<Change>,
) -> Result<(), EtcdError> {
    let client = Etcd::connect(cfg).await?;
    let (kvs, revision) = client.get_prefix(WORKERS_PREFIX.as_bytes()).await?;
    let mut now: HashMap<String, WorkerRecord> = HashMap::new();
    for kv in kvs {
        let key = String::from_utf8_lossy(&kv.key).into_owned();
        if let Some(r) = checked(&key, &kv.value) {
            now.insert(key, r);
        }
    }
    let gone: Vec<String> = known
        .keys()
        .filter(|k| !now.contains_key(*k))
        .cloned()
        .collect();
    for key in gone {
        known.remove(&key);
        if tx.send(Change::Down { key }).await.is_err() {
            return Ok(());
        }
    }
    for (key, record) in now {
        if known.get(&key) != Some(&record) {
            known.insert(key.clone(), record.clone());
            if tx
                .send(Change::Up {
                    key,
                    record: Box::new(record),
                })
                .await
                .is_err()
            {
                return Ok(());
            }
        }
    }
    tracing::info!(
        workers = known.len(),
        revision,
        "etcd: synchronised; watching"
    );
    if tx.send(Change::Reachable(true)).await.is_err() {
        return Ok(());
    }

    let (_keep, mut stream) = client
        .watch_prefix(WORKERS_PREFIX.as_bytes(), revision + 1)
        .await?;
    while let Some(resp) = stream.message().await? {
        if resp.canceled {
            return Err(EtcdError::Stream(format!(
                "watch cancelled (compacted at {}): {}",
                resp.compact_revision, resp.cancel_reason
            )));
        }
        for ev in resp.events {
            let Some(kv) = ev.kv else { continue };
            let key = String::from_utf8_lossy(&kv.key).into_owned();
            let change = if ev.r#type == EventType::Delete as i32 {
                if known.remove(&key).is_none() {
                    continue;
                }
                Change::Down { key }
            } else {
                match checked(&key, &kv.value) {
                    Some(record) => {
                        known.insert(key.clone(), record.clone());
                        Change::Up {
                            key,
                            record: Box::new(record),
                        }
                    }
                    None => continue,
                }
            };
            if tx.send(change).await.is_err() {
                return Ok(());
            }
        }
    }
    Err(EtcdError::Stream("the watch stream ended".into()))
}

fn checked(key: &str, value: &[u8]) -> Option<WorkerRecord> {
    match WorkerRecord::parse(key, value) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(error = %e, "ignoring a worker record");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_urls_parse() {
        let c = EtcdConfig::from_url("etcd://127.0.0.1:2379,10.0.0.2:2379").unwrap();
        assert_eq!(
            c.endpoints,
            ["http://127.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        assert!(EtcdConfig::from_url("http://x:1").is_err());
        assert!(EtcdConfig::from_url("etcd://").is_err());
    }
}
