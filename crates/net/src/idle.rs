//! Idle connections: a connection with no request in flight for `--idle-timeout` is closed
//! (gRPC's `MAX_CONNECTION_IDLE`). Requests are counted by a tower layer ([`CountStreams`])
//! from the moment they arrive until their response body ends; the connection's reader
//! ([`Conn`](crate::Conn)) ends it once the count has stayed at zero long enough. Keepalive
//! PINGs do not count: an open connection that asks for nothing still goes.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};
use tonic::transport::server::TcpConnectInfo;

/// What one connection is doing, shared by its reader and its requests.
#[derive(Debug)]
pub struct Activity {
    streams: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            streams: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
        })
    }

    /// A request began; it counts until the guard is dropped.
    pub fn stream(self: &Arc<Self>) -> StreamGuard {
        self.streams.fetch_add(1, Ordering::AcqRel);
        StreamGuard(self.clone())
    }

    /// When the connection has been idle long enough to close (`None`: a request is in
    /// flight).
    fn idle_until(&self, timeout: Duration) -> Option<Instant> {
        if self.streams.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(*self.idle_since.lock().unwrap_or_else(|p| p.into_inner()) + timeout)
    }
}

/// Counts one request of a connection while it lives.
#[derive(Debug)]
pub struct StreamGuard(Arc<Activity>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
    }
}

/// A connection as its requests see it (in their extensions): its addresses and activity.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Local and remote addresses.
    pub tcp: TcpConnectInfo,
    /// What the connection is doing.
    pub activity: Arc<Activity>,
}

/// The reader's side: fires once the connection has been idle for `timeout`.
pub(crate) struct IdleTimer {
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
    activity: Arc<Activity>,
}

impl IdleTimer {
    pub(crate) fn new(timeout: Duration, activity: Arc<Activity>) -> IdleTimer {
        IdleTimer {
            sleep: Box::pin(tokio::time::sleep(timeout)),
            timeout,
            activity,
        }
    }

    /// True once the connection has been idle for the timeout; otherwise registers to be
    /// woken when it may have been.
    pub(crate) fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            let now = Instant::now();
            match self.activity.idle_until(self.timeout) {
                Some(due) if due <= now => return true,
                Some(due) => self.sleep.as_mut().reset(due),
                // Busy: look again a timeout from now (the last request may end meanwhile).
                None => self.sleep.as_mut().reset(now + self.timeout),
            }
        }
    }
}

/// A tower layer counting each request of a connection (see [`Activity`]) until its response
/// body ends.
#[derive(Debug, Clone, Copy, Default)]
pub struct CountStreams;

impl<S> tower::Layer<S> for CountStreams {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted(inner)
    }
}

/// The service [`CountStreams`] makes.
#[derive(Debug, Clone)]
pub struct Counted<S>(S);

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Counted<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let guard = req
            .extensions()
            .get::<ConnInfo>()
            .map(|c| c.activity.stream());
        let response = self.0.call(req);
        Box::pin(async move {
            let response = response.await?;
            Ok(match guard {
                None => response,
                Some(guard) => response.map(|body| {
                    tonic::body::Body::new(Guarded {
                        inner: body,
                        _guard: guard,
                    })
                }),
            })
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds its request's count until it ends.
    struct Guarded {
        #[pin]
        inner: tonic::body::Body,
        _guard: StreamGuard,
    }
}

impl http_body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
