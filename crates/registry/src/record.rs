//! The record a worker group publishes, and its key.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Prefix of every worker record.
pub const WORKERS_PREFIX: &str = "/openinfer/v1/workers/";

/// What a worker group tells routers about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// The group's id, unique in the cluster (the last key segment).
    pub group_id: String,
    /// Where routers dial its `openinfer.worker.v1` service (`host:port`).
    pub address: String,
    /// The model id it serves (the key segment before the group id).
    pub model: String,
    /// Revision of the weights (a digest of the model directory's files).
    pub revision: String,
    /// Compute dtype.
    pub dtype: String,
    /// Tensor-parallel ranks in the group.
    pub tp_size: u32,
    /// Devices of the group.
    pub devices: Vec<String>,
    /// KV blocks of the group.
    pub kv_blocks: u32,
    /// Token slots per block.
    pub block_size: u32,
    /// Most running sequences.
    pub max_running: u32,
    /// Longest sequence.
    pub max_model_len: u32,
    /// `openinfer` version of the worker.
    pub version: String,
    /// Free-form labels (zone, GPU type, ...).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Why a record was ignored.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RecordError {
    /// The key is not `/openinfer/v1/workers/{model}/{group_id}`.
    #[error("key `{0}` is not {WORKERS_PREFIX}{{model}}/{{group_id}}")]
    Key(String),
    /// The value is not a worker record.
    #[error("key `{key}`: not a worker record: {message}")]
    Value {
        /// The key.
        key: String,
        /// The parse error.
        message: String,
    },
    /// The record disagrees with its key (a worker registered under another model's prefix).
    #[error("key `{key}`: the record says model `{model}` / group `{group}`, the key does not")]
    Mismatch {
        /// The key.
        key: String,
        /// The record's model.
        model: String,
        /// The record's group id.
        group: String,
    },
}

impl WorkerRecord {
    /// The record's key.
    pub fn key(&self) -> String {
        format!("{WORKERS_PREFIX}{}/{}", self.model, self.group_id)
    }

    /// Parses and checks the record at `key`: JSON, a non-empty address, and the model and
    /// group id the key names (model ids may contain `/`; the group id is the last segment).
    pub fn parse(key: &str, value: &[u8]) -> Result<WorkerRecord, RecordError> {
        let rest = key
            .strip_prefix(WORKERS_PREFIX)
            .ok_or_else(|| RecordError::Key(key.into()))?;
        let (model, group) = rest
            .rsplit_once('/')
            .filter(|(m, g)| !m.is_empty() && !g.is_empty())
            .ok_or_else(|| RecordError::Key(key.into()))?;
        let record: WorkerRecord =
            serde_json::from_slice(value).map_err(|e| RecordError::Value {
                key: key.into(),
                message: e.to_string(),
            })?;
        if record.address.is_empty() {
            return Err(RecordError::Value {
                key: key.into(),
                message: "empty address".into(),
            });
        }
        if record.model != model || record.group_id != group {
            return Err(RecordError::Mismatch {
                key: key.into(),
                model: record.model,
                group: record.group_id,
            });
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(model: &str) -> WorkerRecord {
        WorkerRecord {
            group_id: "g1".into(),
            address: "10.0.0.1:50061".into(),
            model: model.into(),
            revision: "abc".into(),
            dtype: "bf16".into(),
            tp_size: 1,
            devices: vec!["cuda:0".into()],
            kv_blocks: 100,
            block_size: 16,
            max_running: 64,
            max_model_len: 4096,
            version: "0.1.0".into(),
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn records_round_trip_and_are_checked_against_their_key() {
        let r = record("meta-llama/Llama-3.1-8B");
        let key = r.key();
        assert_eq!(key, "/openinfer/v1/workers/meta-llama/Llama-3.1-8B/g1");
        let json = serde_json::to_vec(&r).unwrap();
        assert_eq!(WorkerRecord::parse(&key, &json).unwrap(), r);

        let other = "/openinfer/v1/workers/other-model/g1";
        assert!(matches!(
            WorkerRecord::parse(other, &json),
            Err(RecordError::Mismatch { .. })
        ));
        assert!(matches!(
            WorkerRecord::parse(&key, b"{not json"),
            Err(RecordError::Value { .. })
        ));
        assert!(matches!(
            WorkerRecord::parse("/openinfer/v1/workers/x", &json),
            Err(RecordError::Key(_))
        ));
    }
}
