//! The error vocabulary shared by every crate: each typed error says which [`Code`] it is, and
//! the services map that code onto a gRPC status (ARCHITECTURE §3).

/// The outcome class of an error, one-to-one with the gRPC status codes the API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// Bad input; the message names the offending field.
    InvalidArgument,
    /// Admission refused: queue, token or memory budget full. Retry later.
    ResourceExhausted,
    /// A queue deadline passed before the work could start.
    DeadlineExceeded,
    /// No worker serves the model, or the service is draining.
    Unavailable,
    /// Unknown model or sequence.
    NotFound,
    /// A bug or an unexpected failure inside the service.
    Internal,
    /// The operation was cancelled by its caller.
    Cancelled,
    /// A precondition of the operation does not hold (for example a duplicate id).
    FailedPrecondition,
}

/// Implemented by every typed error so that services can turn it into a status code.
pub trait ErrorCode {
    /// The class this error belongs to.
    fn code(&self) -> Code;
}
