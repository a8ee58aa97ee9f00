//! Engine errors. Each names what to fix: the file and field for a bad model directory, the
//! parameter for a bad request.

use std::path::PathBuf;

use openinfer_core::{Code, ErrorCode};

/// Everything that can go wrong while loading a model or running a step.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file the model directory needs is missing or unreadable.
    #[error("{path}: {message}")]
    ModelFile {
        /// The file (or directory) concerned.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
    /// A field of a configuration file is missing, malformed or unsupported.
    #[error("{path}: field `{field}`: {message}")]
    ConfigField {
        /// The JSON file.
        path: PathBuf,
        /// The offending field.
        field: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// A weight tensor is missing or has the wrong shape.
    #[error("{path}: tensor `{tensor}`: {message}")]
    Weight {
        /// The safetensors file (or index) that should hold it.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// What is wrong.
        message: String,
    },
    /// A request the engine cannot run as given.
    #[error("invalid request: {field}: {message}")]
    InvalidRequest {
        /// The offending parameter.
        field: &'static str,
        /// What is wrong and what to do.
        message: String,
    },
    /// No room: the waiting queue or the KV cache is full. Retry later.
    #[error("engine at capacity: {0}")]
    Capacity(String),
    /// A sequence id that is already in use on this engine.
    #[error("sequence {0} already exists on this worker")]
    DuplicateSequence(u64),
    /// A bad engine configuration (budgets, block size, device).
    #[error("engine configuration: {0}")]
    Config(String),
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A collective operation of a tensor-parallel group failed (a rank is gone).
    #[error("tensor parallelism: {0}")]
    Collective(String),
    /// A tensor operation failed (a bug or a device failure).
    #[error("tensor operation failed: {}", first_line(.0))]
    Candle(#[from] candle_core::Error),
    /// File-system failure.
    #[error("{path}: {source}")]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// The message of an error without the backtrace candle appends when `RUST_BACKTRACE` is set.
fn first_line(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

impl EngineError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io {
            path: path.into(),
            source,
        }
    }
}

impl ErrorCode for EngineError {
    fn code(&self) -> Code {
        match self {
            EngineError::InvalidRequest { .. } => Code::InvalidArgument,
            EngineError::Capacity(_) => Code::ResourceExhausted,
            EngineError::DuplicateSequence(_) => Code::FailedPrecondition,
            EngineError::ModelFile { .. }
            | EngineError::ConfigField { .. }
            | EngineError::Weight { .. }
            | EngineError::Config(_) => Code::FailedPrecondition,
            EngineError::Collective(_) => Code::Unavailable,
            EngineError::Tokenizer(_) | EngineError::Candle(_) | EngineError::Io { .. } => {
                Code::Internal
            }
        }
    }
}

/// Engine result type.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
