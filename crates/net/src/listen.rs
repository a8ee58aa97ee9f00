//! The accept loop of a public endpoint: at most `max_connections` open at once (one more is
//! closed at once and counted), TLS handshakes on their own tasks with a deadline (a client
//! that stalls mid-handshake holds nothing but its own task), a connection that sends nothing
//! within that deadline closed, and no Nagle delay (token deltas are small writes).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::tls::Reloading;

/// Longest a TLS handshake may take, unless configured otherwise.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How an endpoint accepts connections.
#[derive(Clone)]
pub struct Accept {
    /// TLS, when on (plaintext clients then fail their handshake).
    pub tls: Option<Reloading<ServerConfig>>,
    /// Most connections open at once.
    pub max_connections: usize,
    /// Longest a TLS handshake may take, and (after it, or in plaintext) how long a new
    /// connection may stay silent before it is closed.
    pub handshake_timeout: Duration,
    /// Counts the connections open, when given.
    pub open: Option<prometheus::IntGauge>,
}

/// One accepted connection; its slot in `max_connections` is held until it is dropped.
pub struct Conn {
    io: Io,
    info: TcpConnectInfo,
    /// Until its first byte arrives: when a silent connection is closed.
    silent_until: Option<Pin<Box<tokio::time::Sleep>>>,
    _slot: Slot,
}

/// A connection's place among `max_connections`, and in the open gauge.
struct Slot {
    _permit: OwnedSemaphorePermit,
    open: Option<prometheus::IntGauge>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(g) = &self.open {
            g.dec();
        }
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if let Some(silent) = &mut this.silent_until {
            if buf.filled().len() > before {
                this.silent_until = None;
            } else if read.is_pending() && silent.as_mut().poll(cx).is_ready() {
                // It said nothing in time: the end of input closes it (nothing is in flight).
                tracing::debug!(peer = ?this.info.remote_addr, "closing a connection that sent nothing");
                return Poll::Ready(Ok(()));
            }
        }
        read
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Connections accepted on `listener`, ready for tonic's `serve_with_incoming`. `refused` is
/// called for each connection closed at once because `max_connections` are open.
pub fn incoming(
    listener: TcpListener,
    accept: Accept,
    refused: impl Fn() + Send + 'static,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(accept.max_connections.max(1)));
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, say: wait a moment rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%peer, max = accept.max_connections, "connection refused: --max-connections open");
                refused();
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let info = tcp.connect_info();
            if let Some(g) = &accept.open {
                g.inc();
            }
            let slot = Slot {
                _permit: slot,
                open: accept.open.clone(),
            };
            let (conns, accept) = (tx.clone(), accept.clone());
            tokio::spawn(async move {
                let io = match &accept.tls {
                    None => Io::Plain(tcp),
                    Some(tls) => {
                        let acceptor = tokio_rustls::TlsAcceptor::from(tls.get());
                        match tokio::time::timeout(accept.handshake_timeout, acceptor.accept(tcp))
                            .await
                        {
                            Ok(Ok(s)) => Io::Tls(Box::new(s)),
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake timed out");
                                return;
                            }
                        }
                    }
                };
                let silent_until = Some(Box::pin(tokio::time::sleep(accept.handshake_timeout)));
                let _ = conns
                    .send(Ok(Conn {
                        io,
                        info,
                        silent_until,
                        _slot: slot,
                    }))
                    .await;
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}
