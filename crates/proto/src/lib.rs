//! Generated tonic/prost code for `proto/`.
//!
//! * [`v1`]: the public `openinfer.v1.Inference` API.
//! * [`worker::v1`]: the internal router ↔ worker protocol.
//! * [`etcd`]: etcd's v3 API, client side (from `proto/third_party`).
//! * [`convert`]: the one conversion between each worker-API type and its `core` twin.

#![allow(clippy::large_enum_variant, clippy::doc_overindented_list_items)]

pub mod convert;

/// Public inference API (`openinfer.v1`).
pub mod v1 {
    tonic::include_proto!("openinfer.v1");
}

/// Internal worker API.
pub mod worker {
    /// `openinfer.worker.v1`.
    pub mod v1 {
        tonic::include_proto!("openinfer.worker.v1");
    }
}

/// etcd's v3 API (client side), for cluster membership.
pub mod etcd {
    #![allow(missing_docs, clippy::all)]
    /// Keys and values.
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    /// Users and roles.
    pub mod authpb {
        tonic::include_proto!("authpb");
    }
    /// The KV, Watch, Lease and Auth services.
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}

/// Encoded `FileDescriptorSet` of every proto file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/openinfer_descriptor.bin"));
