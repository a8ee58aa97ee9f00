//! A small etcd v3 client over the generated `etcdserverpb` code: just what membership needs
//! (prefix get, put with lease, lease grant / keep-alive / revoke, prefix watch, password
//! authentication).

use std::time::Duration;

use openinfer_proto::etcd::etcdserverpb as pb;
use openinfer_proto::etcd::etcdserverpb::auth_client::AuthClient;
use openinfer_proto::etcd::etcdserverpb::kv_client::KvClient;
use openinfer_proto::etcd::etcdserverpb::lease_client::LeaseClient;
use openinfer_proto::etcd::etcdserverpb::watch_client::WatchClient;
use openinfer_proto::etcd::mvccpb::KeyValue;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Streaming;

use crate::etcd::EtcdConfig;

/// A failed etcd call.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// An endpoint URL is malformed.
    #[error("bad etcd endpoint: {0}")]
    Endpoint(String),
    /// etcd answered with an error.
    #[error("etcd: {0}")]
    Status(#[from] tonic::Status),
    /// etcd did not answer in time.
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    /// A stream ended or was cancelled.
    #[error("etcd: {0}")]
    Stream(String),
}

/// A connection to an etcd cluster (any of its endpoints).
#[derive(Clone)]
pub struct Etcd {
    channel: Channel,
    token: Option<MetadataValue<Ascii>>,
    timeout: Duration,
}

/// The end of the key range that holds every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Etcd {
    /// Connects (and authenticates, when a user is configured).
    pub async fn connect(cfg: &EtcdConfig) -> Result<Etcd, EtcdError> {
        let tls = cfg.tls.as_ref().map(|t| {
            let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&t.ca));
            if let Some((cert, key)) = &t.identity {
                c = c.identity(Identity::from_pem(cert, key));
            }
            c
        });
        let endpoints = cfg
            .endpoints
            .iter()
            .map(|e| {
                let ep = Endpoint::from_shared(e.clone())
                    .map_err(|e| EtcdError::Endpoint(e.to_string()))?
                    .connect_timeout(cfg.timeout)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(cfg.keepalive)
                    .keep_alive_timeout(cfg.timeout)
                    // etcd refuses pings on a connection with no stream open.
                    .keep_alive_while_idle(false);
                match &tls {
                    Some(t) => ep.tls_config(t.clone()).map_err(|e| {
                        EtcdError::Endpoint(format!(
                            "{e}: check --etcd-ca / --etcd-cert / --etcd-key"
                        ))
                    }),
                    None => Ok(ep),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let channel = Channel::balance_list(endpoints.into_iter());
        let mut etcd = Etcd {
            channel,
            token: None,
            timeout: cfg.timeout,
        };
        if let Some((name, password)) = &cfg.auth {
            let mut auth = AuthClient::new(etcd.channel.clone());
            let resp = etcd
                .timed(auth.authenticate(pb::AuthenticateRequest {
                    name: name.clone(),
                    password: password.clone(),
                }))
                .await?;
            etcd.token = Some(
                resp.into_inner()
                    .token
                    .parse()
                    .map_err(|_| EtcdError::Stream("etcd returned an unusable token".into()))?,
            );
        } else {
            // Fail here, not on first use, when no endpoint answers.
            etcd.get_prefix(b"/openinfer/v1/health-check/").await?;
        }
        Ok(etcd)
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = &self.token {
            r.metadata_mut().insert("token", t.clone());
        }
        r
    }

    async fn timed<T>(
        &self,
        call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<tonic::Response<T>, EtcdError> {
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| EtcdError::Timeout(self.timeout))?
            .map_err(EtcdError::from)
    }

    /// Every key under `prefix`, and the store's revision.
    pub async fn get_prefix(&self, prefix: &[u8]) -> Result<(Vec<KeyValue>, i64), EtcdError> {
        let mut kv = KvClient::new(self.channel.clone());
        let resp = self
            .timed(kv.range(self.request(pb::RangeRequest {
                key: prefix.to_vec(),
                range_end: prefix_end(prefix),
                ..Default::default()
            })))
            .await?
            .into_inner();
        let revision = resp.header.map_or(0, |h| h.revision);
        Ok((resp.kvs, revision))
    }

    /// Writes `key` attached to `lease` (0: none).
    pub async fn put(&self, key: &str, value: &str, lease: i64) -> Result<(), EtcdError> {
        let mut kv = KvClient::new(self.channel.clone());
        self.timed(kv.put(self.request(pb::PutRequest {
            key: key.into(),
            value: value.into(),
            lease,
            ..Default::default()
        })))
        .await?;
        Ok(())
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: &str) -> Result<(), EtcdError> {
        let mut kv = KvClient::new(self.channel.clone());
        self.timed(kv.delete_range(self.request(pb::DeleteRangeRequest {
            key: key.into(),
            ..Default::default()
        })))
        .await?;
        Ok(())
    }

    /// A new lease of `ttl` seconds.
    pub async fn lease_grant(&self, ttl: i64) -> Result<i64, EtcdError> {
        let mut lease = LeaseClient::new(self.channel.clone());
        let resp = self
            .timed(lease.lease_grant(self.request(pb::LeaseGrantRequest { ttl, id: 0 })))
            .await?
            .into_inner();
        if !resp.error.is_empty() {
            return Err(EtcdError::Stream(resp.error));
        }
        Ok(resp.id)
    }

    /// Revokes a lease: its keys are deleted at once.
    pub async fn lease_revoke(&self, id: i64) -> Result<(), EtcdError> {
        let mut lease = LeaseClient::new(self.channel.clone());
        self.timed(lease.lease_revoke(self.request(pb::LeaseRevokeRequest { id })))
            .await?;
        Ok(())
    }

    /// A keep-alive stream for lease `id`: send a request on the sender to renew it.
    pub async fn lease_keep_alive(
        &self,
        id: i64,
    ) -> Result<
        (
            mpsc::Sender<pb::LeaseKeepAliveRequest>,
            Streaming<pb::LeaseKeepAliveResponse>,
        ),
        EtcdError,
    > {
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(pb::LeaseKeepAliveRequest { id })
            .map_err(|e| EtcdError::Stream(e.to_string()))?;
        let mut lease = LeaseClient::new(self.channel.clone());
        let stream = self
            .timed(lease.lease_keep_alive(self.request(ReceiverStream::new(rx))))
            .await?
            .into_inner();
        Ok((tx, stream))
    }

    /// Watches every key under `prefix` from `start_revision` (inclusive). Keep the sender
    /// alive as long as the watch.
    pub async fn watch_prefix(
        &self,
        prefix: &[u8],
        start_revision: i64,
    ) -> Result<(mpsc::Sender<pb::WatchRequest>, Streaming<pb::WatchResponse>), EtcdError> {
        let (tx, rx) = mpsc::channel(4);
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: prefix.to_vec(),
                    range_end: prefix_end(prefix),
                    start_revision,
                    ..Default::default()
                },
            )),
        };
        tx.try_send(create)
            .map_err(|e| EtcdError::Stream(e.to_string()))?;
        let mut watch = WatchClient::new(self.channel.clone());
        let stream = self
            .timed(watch.watch(self.request(ReceiverStream::new(rx))))
            .await?
            .into_inner();
        Ok((tx, stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
