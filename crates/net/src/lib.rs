//! Connections of OpenInferencev2's services.
//!
//! | module | concept |
//! |---|---|
//! | [`watch`] | files followed for changes (certificates, the tenants file), and `SIGHUP` |
//! | [`tls`] | TLS and mutual TLS from PEM files, reloaded when they change |
//! | [`listen`] | the accept loop: TLS handshakes off the loop, a bound on connections |

pub mod listen;
pub mod tls;
pub mod watch;

pub use listen::{incoming, Accept, Conn, DEFAULT_HANDSHAKE_TIMEOUT};
pub use tls::{ClientPems, ClientTls, Reloading, ServerTls, TlsError, ALPN_H2, ALPN_HTTP1};
