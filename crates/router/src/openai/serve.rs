//! The HTTP/1.1 server of the API, on the same accept loop as the gRPC one
//! ([`openinfer_net::incoming`]: TLS, `--max-connections`, silent connections closed).

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// Serves `app` on `listener` until `shutdown` resolves; then lets the connections finish
/// what they are sending (at most `grace`) and returns. `max_header_bytes` bounds a
/// request's head; a head not sent within the handshake timeout closes the connection.
pub async fn serve(
    listener: TcpListener,
    accept: openinfer_net::Accept,
    refused: impl Fn() + Send + 'static,
    app: axum::Router,
    max_header_bytes: usize,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let header_timeout = accept.handshake_timeout;
    let mut incoming = openinfer_net::incoming(listener, accept, refused);
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        // hyper's smallest read buffer is 8 KiB; a head that does not fit is refused (431).
        .max_buf_size(max_header_bytes.max(8192));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            conn = incoming.next() => match conn {
                Some(Ok(conn)) => {
                    let service = TowerToHyperService::new(app.clone());
                    let conn = graceful.watch(http.serve_connection(TokioIo::new(conn), service));
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "HTTP connection ended with an error");
                        }
                    });
                }
                Some(Err(e)) => tracing::debug!(error = %e, "HTTP accept failed"),
                None => break,
            },
            () = &mut shutdown => break,
        }
    }
    drop(incoming);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "HTTP connections still open after the drain; closing them"
        );
    }
}
