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
    /// No credentials, or credentials that name nobody.
    Unauthenticated,
    /// The caller is known but may not do this (a priority above its tenant's cap).
    PermissionDenied,
}

/// Implemented by every typed error so that services can turn it into a status code.
pub trait ErrorCode {
    /// The class this error belongs to.
    fn code(&self) -> Code;
}

/// Most bytes of a client's own input that an error message repeats back ([`echo`]).
pub const ECHO_LIMIT: usize = 64;

/// Most bytes of any error message a service sends: gRPC carries the message in a header, and
/// clients refuse headers past their metadata limit (8 KiB by default in grpcio and
/// grpc-go), which would turn a clear error into a transport failure.
pub const MESSAGE_LIMIT: usize = 1024;

/// `input` as an error message may quote it: whole when short, else its first
/// [`ECHO_LIMIT`] bytes (at a character boundary) and its length.
pub fn echo(input: &str) -> String {
    if input.len() <= ECHO_LIMIT {
        return input.to_string();
    }
    format!("{}… ({} bytes)", head(input, ECHO_LIMIT), input.len())
}

/// `message` cut to [`MESSAGE_LIMIT`] bytes at a character boundary, marked when cut.
pub fn bounded(message: String) -> String {
    if message.len() <= MESSAGE_LIMIT {
        return message;
    }
    format!("{}… (message cut)", head(&message, MESSAGE_LIMIT - 20))
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn head(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoes_and_messages_are_bounded_at_character_boundaries() {
        assert_eq!(echo("llama"), "llama");
        let long = "é".repeat(1 << 19); // 1 MiB of two-byte characters
        let e = echo(&long);
        assert!(e.len() < ECHO_LIMIT + 32, "{}", e.len());
        assert!(e.ends_with("(1048576 bytes)"), "{e}");
        let m = bounded(format!("model `{long}` is not served here"));
        assert!(m.len() <= MESSAGE_LIMIT, "{}", m.len());
        assert!(m.ends_with("(message cut)"));
        assert_eq!(bounded("short".into()), "short");
    }
}
