//! Group formation: the ranks of one tensor-parallel worker group find each other under
//! `/openinfer/v1/groups/{group_id}/ranks/{rank}` (ARCHITECTURE §3). Each rank writes where
//! its collective listens, under a short lease kept alive while the group forms, and waits
//! until every rank of the group has. The keys only live while the group forms (released
//! once every rank has connected), and a crashed rank's address expires within seconds.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use openinfer_proto::etcd::etcdserverpb::LeaseKeepAliveRequest;

use crate::client::{Etcd, EtcdError};
use crate::etcd::EtcdConfig;

/// Root of the group keys.
pub const GROUPS_PREFIX: &str = "/openinfer/v1/groups/";

/// What one rank publishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankRecord {
    /// Its rank.
    pub rank: usize,
    /// The group size it was started with.
    pub size: usize,
    /// Where its collective backend listens (`host:port`).
    pub addr: String,
}

/// Why a group could not form.
#[derive(Debug, thiserror::Error)]
pub enum RendezvousError {
    /// etcd failed.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// Not every rank showed up in time.
    #[error("group `{group}`: only ranks {seen:?} of {size} published their address within {waited:?}; start the missing ranks (or check that they use the same --group and --tp)")]
    Timeout {
        /// The group.
        group: String,
        /// Ranks seen.
        seen: Vec<usize>,
        /// Ranks expected.
        size: usize,
        /// How long it waited.
        waited: Duration,
    },
    /// Ranks disagree about the group.
    #[error("group `{group}`: rank {rank} was started with --tp {theirs}, this rank with --tp {ours}; every rank of a group needs the same --tp")]
    SizeMismatch {
        /// The group.
        group: String,
        /// The disagreeing rank.
        rank: usize,
        /// Its size.
        theirs: usize,
        /// This rank's size.
        ours: usize,
    },
}

/// The key of `rank` in `group`.
pub fn rank_key(group: &str, rank: usize) -> String {
    format!("{GROUPS_PREFIX}{group}/ranks/{rank}")
}

/// A rank's published address, kept alive (a short lease renewed every second) until
/// [`RankKey::release`], so that a crashed rank's address disappears within seconds. Release
/// it only once the group is connected and every rank has passed a barrier: until then a
/// slower rank may still be reading it.
pub struct RankKey {
    client: Etcd,
    lease: i64,
    keep_alive: tokio::task::JoinHandle<()>,
}

/// TTL of the rank keys' lease.
const RANK_TTL_SECS: i64 = 5;

impl RankKey {
    /// Publishes `me` in `group`.
    pub async fn publish(
        cfg: &EtcdConfig,
        group: &str,
        me: &RankRecord,
    ) -> Result<RankKey, EtcdError> {
        let client = Etcd::connect(cfg).await?;
        let lease = client.lease_grant(RANK_TTL_SECS).await?;
        let value = serde_json::to_string(me).map_err(|e| EtcdError::Stream(e.to_string()))?;
        client.put(&rank_key(group, me.rank), &value, lease).await?;
        let (keeper, mut responses) = client.lease_keep_alive(lease).await?;
        let keep_alive = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if keeper.send(LeaseKeepAliveRequest { id: lease }).await.is_err() {
                            return;
                        }
                    }
                    msg = responses.message() => if !matches!(msg, Ok(Some(_))) {
                        return;
                    },
                }
            }
        });
        Ok(RankKey {
            client,
            lease,
            keep_alive,
        })
    }

    /// Every rank's address, by rank, once all `size` ranks of `group` have published theirs
    /// (within `timeout`).
    pub async fn wait_for_ranks(
        &self,
        group: &str,
        size: usize,
        timeout: Duration,
    ) -> Result<Vec<String>, RendezvousError> {
        let prefix = format!("{GROUPS_PREFIX}{group}/ranks/");
        let start = Instant::now();
        loop {
            let (kvs, _) = self.client.get_prefix(prefix.as_bytes()).await?;
            let mut addrs: Vec<Option<String>> = vec![None; size];
            for kv in kvs {
                let Ok(r) = serde_json::from_slice::<RankRecord>(&kv.value) else {
                    tracing::warn!(key = %String::from_utf8_lossy(&kv.key), "ignoring a malformed rank record");
                    continue;
                };
                if r.size != size {
                    return Err(RendezvousError::SizeMismatch {
                        group: group.into(),
                        rank: r.rank,
                        theirs: r.size,
                        ours: size,
                    });
                }
                if let Some(slot) = addrs.get_mut(r.rank) {
                    *slot = Some(r.addr);
                }
            }
            if addrs.iter().all(Option::is_some) {
                return Ok(addrs.into_iter().flatten().collect());
            }
            if start.elapsed() >= timeout {
                return Err(RendezvousError::Timeout {
                    group: group.into(),
                    seen: (0..size).filter(|&r| addrs[r].is_some()).collect(),
                    size,
                    waited: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Removes the key.
    pub async fn release(self) {
        self.keep_alive.abort();
        let _ = self.client.lease_revoke(self.lease).await;
    }
}
