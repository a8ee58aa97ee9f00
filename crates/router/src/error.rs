//! Why a request failed, and the gRPC status each failure becomes (ARCHITECTURE §3).

use std::time::Duration;

use openinfer_core::{Code, ErrorCode, InvalidField};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::Status;

/// A request the router refused or could not complete.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RouterError {
    /// A field breaks its rule; the message names it.
    #[error("invalid argument: {0}")]
    Invalid(#[from] InvalidField),
    /// No model of that name is known to this router.
    #[error("model `{model}` is not served here; served models: {served}")]
    UnknownModel {
        /// The name asked for, as [`openinfer_core::echo`] quotes it.
        model: String,
        /// What is served, comma-separated.
        served: String,
    },
    /// Admission refused: a queue or token budget is full.
    #[error("{0}; retry after the pushback delay or lower the load")]
    QueueFull(String, Duration),
    /// The queue deadline passed before a worker could take the request.
    #[error(
        "waited {0:.3?} in the queue without reaching a worker; raise the deadline or retry later"
    )]
    QueueTimeout(Duration),
    /// The request could no longer finish before its client's deadline at the workers' pace,
    /// with this much time left; it never reached a worker.
    #[error("it can no longer finish before its deadline ({0:.1?} left is less than the generation it needs at the workers' current pace), so it never reached a worker; raise the deadline, lower max_new_tokens or retry later")]
    TooLateToStart(Duration),
    /// The client's deadline ran out while its tokens were being generated, after this many.
    #[error("the deadline ran out after {0} generated tokens; raise the deadline or lower max_new_tokens")]
    DeadlineDuringGeneration(usize),
    /// No worker serves the model now, or the router is draining.
    #[error("{0}")]
    Unavailable(String),
    /// The worker failed the sequence.
    #[error("the worker failed this request: {0}")]
    Worker(String),
    /// No API key, or one no tenant holds.
    #[error("{0}")]
    Unauthenticated(String),
    /// The tenant may not ask for this (a priority above its cap).
    #[error("{0}")]
    PermissionDenied(String),
    /// The router itself failed (a bug or an exhausted resource).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ErrorCode for RouterError {
    fn code(&self) -> Code {
        match self {
            RouterError::Invalid(_) => Code::InvalidArgument,
            RouterError::UnknownModel { .. } => Code::NotFound,
            RouterError::QueueFull(..) => Code::ResourceExhausted,
            RouterError::QueueTimeout(_)
            | RouterError::TooLateToStart(_)
            | RouterError::DeadlineDuringGeneration(_) => Code::DeadlineExceeded,
            RouterError::Unavailable(_) => Code::Unavailable,
            RouterError::Worker(_) | RouterError::Internal(_) => Code::Internal,
            RouterError::Unauthenticated(_) => Code::Unauthenticated,
            RouterError::PermissionDenied(_) => Code::PermissionDenied,
        }
    }
}

impl From<crate::tenants::AuthError> for RouterError {
    fn from(e: crate::tenants::AuthError) -> Self {
        match e.code() {
            Code::PermissionDenied => RouterError::PermissionDenied(e.to_string()),
            _ => RouterError::Unauthenticated(e.to_string()),
        }
    }
}

impl RouterError {
    /// A tenant's quota refusal: `RESOURCE_EXHAUSTED` with the pushback of when its window
    /// has room (`fallback` when that is not knowable), or, for a request larger than the
    /// whole quota, `INVALID_ARGUMENT` on `max_new_tokens`.
    pub fn quota(e: crate::tenants::quota::QuotaError, fallback: Duration) -> Self {
        match e.code() {
            Code::InvalidArgument => RouterError::invalid("max_new_tokens", e.to_string()),
            _ => RouterError::QueueFull(e.to_string(), e.retry_after().unwrap_or(fallback)),
        }
    }

    /// A broken rule on `field`.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        RouterError::Invalid(InvalidField::new(field, message))
    }
}

/// The gRPC code of an error class.
pub fn grpc_code(code: Code) -> tonic::Code {
    match code {
        Code::InvalidArgument => tonic::Code::InvalidArgument,
        Code::ResourceExhausted => tonic::Code::ResourceExhausted,
        Code::DeadlineExceeded => tonic::Code::DeadlineExceeded,
        Code::Unavailable => tonic::Code::Unavailable,
        Code::NotFound => tonic::Code::NotFound,
        Code::Internal => tonic::Code::Internal,
        Code::Cancelled => tonic::Code::Cancelled,
        Code::FailedPrecondition => tonic::Code::FailedPrecondition,
        Code::Unauthenticated => tonic::Code::Unauthenticated,
        Code::PermissionDenied => tonic::Code::PermissionDenied,
    }
}

impl From<RouterError> for Status {
    fn from(e: RouterError) -> Status {
        let code = grpc_code(e.code());
        let message = openinfer_core::bounded(match &e {
            RouterError::Invalid(f) => f.to_string(),
            other => other.to_string(),
        });
        match e {
            RouterError::QueueFull(_, pushback) => {
                let mut md = MetadataMap::new();
                md.insert(
                    "grpc-retry-pushback-ms",
                    MetadataValue::from(pushback.as_millis() as u64),
                );
                Status::with_metadata(code, message, md)
            }
            _ => Status::new(code, message),
        }
    }
}
