//! The `openinfer.worker.v1.Worker` gRPC service.

use openinfer_proto::worker::v1 as pb;
use openinfer_proto::worker::v1::execute_request::Kind;
use openinfer_proto::worker::v1::worker_server::Worker;
use openinfer_telemetry::TraceParent;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::engine_loop::{Command, EngineHandle};

/// The worker service, a thin shell over an [`EngineHandle`].
#[derive(Clone)]
pub struct WorkerService {
    engine: EngineHandle,
}

impl WorkerService {
    /// Serves `engine`.
    pub fn new(engine: EngineHandle) -> Self {
        WorkerService { engine }
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        Ok(Response::new(self.engine.info().clone()))
    }

    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        Ok(Response::new(pb::HealthResponse {
            serving: true,
            capacity: Some(self.engine.capacity()),
        }))
    }

    async fn tokenizer(
        &self,
        _: Request<pb::TokenizerRequest>,
    ) -> Result<Response<pb::TokenizerResponse>, Status> {
        Ok(Response::new(self.engine.tokenizer().clone()))
    }

    type ExecuteStream = ReceiverStream<Result<pb::ExecuteResponse, Status>>;

    async fn execute(
        &self,
        request: Request<Streaming<pb::ExecuteRequest>>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        let conn = self.engine.new_connection();
        // A client's trace context on the stream parents the sequences that bring none.
        let trace = TraceParent::from_headers(request.metadata().as_ref());
        // One slot beyond the buffer is reserved for the final status of a lagging router.
        let (tx, rx) = mpsc::channel(self.engine.config().connection_buffer.max(1) + 1);
        self.engine
            .send(Command::Connect { conn, tx, trace })
            .await?;
        let engine = self.engine.clone();
        let mut inbound = request.into_inner();
        tokio::spawn(async move {
            loop {
                let cmd = match inbound.message().await {
                    Ok(Some(msg)) => match msg.kind {
                        Some(Kind::Dispatch(d)) => Command::Dispatch {
                            conn,
                            sequences: d.sequences,
                            backlog: d.backlog,
                        },
                        Some(Kind::Cancel(c)) => Command::Cancel {
                            conn,
                            ids: c.sequence_ids,
                        },
                        Some(Kind::Preempt(p)) => Command::Preempt {
                            conn,
                            ids: p.sequence_ids,
                        },
                        None => continue,
                    },
                    // The router half-closed: its sequences keep running; the engine notices
                    // when the router stops reading (its next send fails) and cleans up then.
                    Ok(None) => return,
                    Err(status) => {
                        tracing::debug!(conn, %status, "router stream broke");
                        break;
                    }
                };
                if engine.send(cmd).await.is_err() {
                    return;
                }
            }
            let _ = engine.send(Command::Disconnect { conn }).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
