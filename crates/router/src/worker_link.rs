//! One task per worker address: it connects, reads the worker's `Info` and `Tokenizer`, opens
//! the `Execute` stream, and hands everything the worker says to the scheduler. When the stream
//! breaks it tells the scheduler (which resumes the worker's sequences elsewhere) and dials
//! again with backoff.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openinfer_proto::worker::v1 as wpb;
use openinfer_proto::worker::v1::worker_client::WorkerClient;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::models::ModelSpec;
use crate::scheduler::{Msg, WorkerId};
use openinfer_net::{ClientPems, Reloading};

/// Largest message exchanged with a worker (the tokenizer of a big vocabulary is several MB).
const MAX_WORKER_MESSAGE: usize = 64 << 20;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

static NEXT_WORKER: AtomicU64 = AtomicU64::new(1);

/// What the scheduler learns when a worker connects.
pub struct WorkerUp {
    /// This connection's id (a reconnect gets a new one).
    pub id: WorkerId,
    /// The worker's address.
    pub addr: String,
    /// Its model.
    pub spec: Arc<ModelSpec>,
    /// Its first capacity report.
    pub capacity: wpb::CapacityReport,
    /// Messages to its `Execute` stream.
    pub tx: mpsc::Sender<wpb::ExecuteRequest>,
    /// Closes the connection, with the reason (a worker that broke the protocol).
    pub close: oneshot::Sender<String>,
}

/// Keeps a link to the worker at `addr` until `stop` fires (or its sender is dropped) or the
/// scheduler goes away.
pub async fn run(
    addr: String,
    tls: Option<Reloading<ClientPems>>,
    sched: mpsc::Sender<Msg>,
    worker_queue: usize,
    mut stop: oneshot::Receiver<()>,
) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let id = WorkerId(NEXT_WORKER.fetch_add(1, Ordering::Relaxed));
        let connected = tokio::select! {
            _ = &mut stop => return,
            c = connect(&addr, tls.as_ref().map(|t| t.get()), id, worker_queue) => c,
        };
        match connected {
            Ok((up, mut inbound, mut close)) => {
                // Announced only once fully connected, outside the cancellable part: every
                // WorkerUp the scheduler sees is followed by a WorkerDown.
                if sched.send(Msg::WorkerUp(up)).await.is_err() {
                    return;
                }
                backoff = FIRST_BACKOFF;
                let mut leaving = false;
                let reason = loop {
                    let msg = tokio::select! {
                        _ = &mut stop, if !leaving => {
                            // Left the registry (drain or lease expiry): no new work, but what
                            // runs there may finish until the worker closes the stream.
                            tracing::info!(worker = %addr, "worker left the registry; no new work goes there");
                            leaving = true;
                            if sched.send(Msg::WorkerLeaving(id)).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        why = &mut close => break match why {
                            Ok(why) => format!("the router closed it: {why}"),
                            Err(_) => "the scheduler stopped".to_string(),
                        },
                        m = inbound.message() => m,
                    };
                    match msg {
                        Ok(Some(resp)) => {
                            if sched.send(Msg::WorkerEvent(id, resp)).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => break "the worker closed its stream".to_string(),
                        Err(status) => break format!("stream broke: {status}"),
                    };
                };
                if leaving {
                    tracing::info!(worker = %addr, %reason, "worker gone after leaving the registry");
                    let _ = sched.send(Msg::WorkerDown(id)).await;
                    return;
                }
                tracing::warn!(worker = %addr, %reason, "lost worker; its sequences resume elsewhere");
                if sched.send(Msg::WorkerDown(id)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::debug!(worker = %addr, error = %e, "cannot reach worker; retrying");
            }
        }
        if sched.is_closed() {
            return;
        }
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Connects, learns the model and opens the `Execute` stream.
async fn connect(
    addr: &str,
    tls: Option<Arc<ClientPems>>,
    id: WorkerId,
    worker_queue: usize,
) -> Result<
    (
        WorkerUp,
        tonic::Streaming<wpb::ExecuteResponse>,
        oneshot::Receiver<String>,
    ),
    Box<dyn std::error::Error + Send + Sync>,
> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let scheme = if tls.is_some() { "https" } else { "http" };
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("{scheme}://{addr}")
    };
    let mut endpoint = Endpoint::from_shared(uri)?;
    if let Some(tls) = &tls {
        // The files as they are now: a rotation applies from the next connection on.
        endpoint = endpoint.tls_config(tls.config(host))?;
    }
    let channel = endpoint
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect()
        .await?;
    let mut client = WorkerClient::new(channel)
        .max_decoding_message_size(MAX_WORKER_MESSAGE)
        .max_encoding_message_size(MAX_WORKER_MESSAGE);
    let info = client.info(wpb::InfoRequest {}).await?.into_inner();
    let tok = client
        .tokenizer(wpb::TokenizerRequest {})
        .await?
        .into_inner();
    let spec = Arc::new(ModelSpec::new(&info, &tok)?);
    let (tx, rx) = mpsc::channel(worker_queue.max(1));
    let mut inbound = client.execute(ReceiverStream::new(rx)).await?.into_inner();
    // The worker's first message is its capacity.
    let capacity = inbound
        .message()
        .await?
        .and_then(|m| m.capacity)
        .ok_or("the worker closed its stream before reporting capacity")?;
    tracing::info!(worker = %addr, model = %spec.id, free_blocks = capacity.free_blocks, "worker connected");
    let (close, closed) = oneshot::channel();
    let up = WorkerUp {
        id,
        addr: addr.to_string(),
        spec,
        capacity,
        tx,
        close,
    };
    Ok((up, inbound, closed))
}
