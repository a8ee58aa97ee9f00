//! Cluster membership (ARCHITECTURE §3, etcd layout).
//!
//! * [`record`]: the worker group record and its key, `/openinfer/v1/workers/{model}/{group_id}`.
//! * [`etcd`]: a worker's registration under a lease kept alive at TTL/3, re-made whenever
//!   etcd comes back; and the router's discovery (get + watch, resynchronised after every
//!   reconnect), which keeps the last-known set while etcd is away.
//! * [`group`]: how the ranks of a tensor-parallel group find each other,
//!   `/openinfer/v1/groups/{group_id}/ranks/{rank}`.

pub mod client;
pub mod etcd;
pub mod group;
pub mod record;

pub use etcd::{EtcdConfig, Registration, Tls};
pub use record::{WorkerRecord, WORKERS_PREFIX};

/// A change in the set of registered workers, by key.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A worker registered, or its record changed.
    Up {
        /// Its etcd key.
        key: String,
        /// Its record.
        record: Box<WorkerRecord>,
    },
    /// A worker's record is gone (deregistered, or its lease expired).
    Down {
        /// Its etcd key.
        key: String,
    },
    /// The watch is synchronised with etcd (`true`), or etcd cannot be reached and the last
    /// known workers are kept (`false`).
    Reachable(bool),
}
