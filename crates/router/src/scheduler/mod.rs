//! The scheduler: one task owns every live request, the per-model priority queues and the
//! workers' credits. Clients submit and cancel through a [`SchedulerHandle`]; worker links
//! feed it the workers' step messages. After each batch of messages it places what fits, in
//! priority order, and sends each worker its share as one `Dispatch`.
//!
//! The policy is a plain struct, [`State`], whose methods take the current time and one
//! input and return the [`Effect`]s; it is tested by calling them (`tests.rs`), with no
//! process, socket or sleep. The task below only moves messages: it owns the channels to the
//! workers (with a bounded backlog each) and tells the state which links have room.
//!
//! | module | concept |
//! |---|---|
//! | [`state`] | the state, workers coming and going, cancels, drain, the periodic tick |
//! | [`admission`] | bounds, shedding of negative priorities, queue deadlines |
//! | [`queues`] | one model's queue: priority levels, FIFO, aging |
//! | [`placement`] | the scheduling pass: least-loaded worker with credits |
//! | [`credits`] | each worker's ledger, and the checks on what it reports |
//! | [`preemption`] | making room for higher priorities; resuming, at most `max_resumes` times |
//! | [`events`] | a worker's tokens, ends and capacity reports |

mod admission;
mod credits;
mod events;
mod pace;
mod placement;
mod preemption;
pub mod prefix_index;
pub mod queues;
mod state;
#[cfg(test)]
pub(crate) mod tests;

pub use state::{Effect, NewWorker, State, WorkerId};

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use openinfer_proto::worker::v1 as wpb;
use openinfer_proto::worker::v1::execute_request::Kind;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::RouterConfig;
use crate::error::RouterError;
use crate::metrics::RouterMetrics;
use crate::models::ModelTable;
use crate::request::{Output, Request};
use crate::worker_link::WorkerUp;

/// Messages to the scheduler task.
pub enum Msg {
    /// Admit a validated request; the reply says whether it was queued.
    Submit {
        /// The request (boxed: it is much larger than the other messages).
        req: Box<Request>,
        /// Where its output goes.
        output: Arc<Output>,
        /// Admission outcome.
        reply: oneshot::Sender<Result<(), RouterError>>,
    },
    /// A worker connected.
    WorkerUp(WorkerUp),
    /// A worker's step message.
    WorkerEvent(WorkerId, wpb::ExecuteResponse),
    /// A worker left the registry: nothing new goes there; what runs may finish.
    WorkerLeaving(WorkerId),
    /// A worker's stream ended.
    WorkerDown(WorkerId),
    /// Stop admitting; finish what is queued and running.
    Drain,
    /// End everything still live with `UNAVAILABLE`, with this reason.
    Abort(String),
}

/// What clients may know of the queues before any work is spent on a request (the counts
/// after the scheduler's latest pass).
#[derive(Debug, Default)]
pub struct QueueView {
    queued: AtomicUsize,
    sheddable: AtomicUsize,
}

/// Submits and cancels requests; cheap to clone.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<Msg>,
    view: Arc<QueueView>,
    cfg: Arc<RouterConfig>,
    live: watch::Receiver<usize>,
    // Unbounded, but each admitted request sends at most one cancel, so admission bounds it.
    cancels: mpsc::UnboundedSender<u64>,
}

impl SchedulerHandle {
    /// Asks for `req` to be queued.
    pub async fn submit(&self, req: Request, output: Arc<Output>) -> Result<(), RouterError> {
        let (reply, rx) = oneshot::channel();
        let stopped = || RouterError::Unavailable("the router is shutting down".into());
        self.tx
            .send(Msg::Submit {
                req: Box::new(req),
                output,
                reply,
            })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Admission's request bound, checked before a request is tokenized: `Some` when a
    /// request of `priority` would be refused for a full queue whatever its prompt (no
    /// sheddable work to make room). Admission itself checks again, exactly.
    pub fn surely_full(&self, priority: i32) -> Option<RouterError> {
        let queued = self.view.queued.load(Ordering::Relaxed);
        let sheddable = self.view.sheddable.load(Ordering::Relaxed);
        let max = admission::max_queued_requests(&self.cfg, priority);
        (queued >= max && sheddable == 0)
            .then(|| RouterError::QueueFull(admission::queue_full(queued), self.cfg.retry_pushback))
    }

    /// Cancels request `id` wherever it is (no-op when it already ended).
    pub fn cancel(&self, id: u64) {
        let _ = self.cancels.send(id);
    }

    /// Stops admitting new requests.
    pub async fn drain(&self) {
        let _ = self.tx.send(Msg::Drain).await;
    }

    /// Ends every request still queued or running with `UNAVAILABLE` (`reason`), cancelling
    /// its sequence on its worker.
    pub async fn abort(&self, reason: &str) {
        let _ = self.tx.send(Msg::Abort(reason.to_string())).await;
    }

    /// Waits until no request is queued or running.
    pub async fn idle(&self) {
        let _ = self.live.clone().wait_for(|n| *n == 0).await;
    }

    /// The channel worker links report to.
    pub fn sender(&self) -> mpsc::Sender<Msg> {
        self.tx.clone()
    }
}

/// Starts the scheduler task. `serving` is set while at least one model has a worker and the
/// router is not draining.
pub fn spawn(
    cfg: Arc<RouterConfig>,
    models: ModelTable,
    serving: watch::Sender<bool>,
    metrics: Arc<RouterMetrics>,
) -> SchedulerHandle {
    let (tx, rx) = mpsc::channel(cfg.scheduler_queue.max(1));
    let (cancel_tx, cancels) = mpsc::unbounded_channel();
    let (live_tx, live) = watch::channel(0);
    let view = Arc::new(QueueView::default());
    let task = Task {
        view: view.clone(),
        state: State::new(cfg.clone(), models, metrics),
        links: HashMap::new(),
        live: live_tx,
        serving,
        rx,
        cancels,
    };
    tokio::spawn(task.run());
    SchedulerHandle {
        tx,
        view,
        cfg,
        live,
        cancels: cancel_tx,
    }
}

/// The sending half of one worker's `Execute` stream.
struct Link {
    tx: mpsc::Sender<wpb::ExecuteRequest>,
    /// Messages that found the link's queue full, sent first when it has room. Dispatches
    /// stop while it is non-empty, so it holds at most control messages (each live request
    /// sends at most one cancel) and one dispatch.
    backlog: VecDeque<wpb::ExecuteRequest>,
    /// Closes the connection (a worker that broke the protocol).
    close: Option<oneshot::Sender<String>>,
}

impl Link {
    /// True when a dispatch may go out now: nothing backlogged, and room left in the link's
    /// queue beyond the share kept for cancels and preemptions.
    fn has_room(&self) -> bool {
        self.backlog.is_empty() && self.tx.capacity() > self.tx.max_capacity() / 4
    }

    /// Sends `kind` to the worker, after anything backlogged. A closed link is left to the
    /// link task, which reports the worker down.
    fn send(&mut self, kind: Kind) {
        self.backlog
            .push_back(wpb::ExecuteRequest { kind: Some(kind) });
        self.flush();
    }

    fn flush(&mut self) {
        while let Some(m) = self.backlog.pop_front() {
            match self.tx.try_send(m) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(m)) => {
                    self.backlog.push_front(m);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.backlog.clear();
                    return;
                }
            }
        }
    }
}

/// The task around the [`State`]: it turns messages into inputs and effects into sends.
struct Task {
    state: State,
    view: Arc<QueueView>,
    links: HashMap<WorkerId, Link>,
    /// Requests queued or running, for drain.
    live: watch::Sender<usize>,
    serving: watch::Sender<bool>,
    rx: mpsc::Receiver<Msg>,
    cancels: mpsc::UnboundedReceiver<u64>,
}

/// Messages handled between two scheduling passes at most.
const MAX_BATCH: usize = 512;

/// How often waiting work is retried when no event arrives.
const RETRY_TICK: std::time::Duration = std::time::Duration::from_millis(5);

impl Task {
    async fn run(mut self) {
        loop {
            let next_deadline = self.state.next_deadline();
            // Waiting work is retried on a short tick as well as on every worker event, so a
            // link whose queue was full is served as soon as it drains.
            let waiting =
                self.links.values().any(|l| !l.backlog.is_empty()) || self.state.waiting();
            tokio::select! {
                biased;
                Some(id) = self.cancels.recv() => self.cancel(id),
                msg = self.rx.recv() => match msg {
                    Some(m) => self.handle(m),
                    None => break,
                },
                _ = sleep_until(next_deadline), if next_deadline.is_some() => {}
                _ = tokio::time::sleep(RETRY_TICK), if waiting => {}
            }
            for _ in 0..MAX_BATCH {
                if let Ok(id) = self.cancels.try_recv() {
                    self.cancel(id);
                } else if let Ok(m) = self.rx.try_recv() {
                    self.handle(m);
                } else {
                    break;
                }
            }
            for link in self.links.values_mut() {
                link.flush();
            }
            let links = &self.links;
            let room = |wid: WorkerId| links.get(&wid).is_some_and(Link::has_room);
            let effects = self.state.tick(Instant::now(), &room);
            self.apply(effects);
            let (queued, sheddable) = self.state.queue_counts();
            self.view.queued.store(queued, Ordering::Relaxed);
            self.view.sheddable.store(sheddable, Ordering::Relaxed);
            let live = self.state.live();
            self.live
                .send_if_modified(|n| std::mem::replace(n, live) != live);
            let serving = self.state.serving();
            self.serving
                .send_if_modified(|s| std::mem::replace(s, serving) != serving);
        }
        tracing::debug!("scheduler stopped");
    }

    fn cancel(&mut self, id: u64) {
        let effects = self.state.cancel(Instant::now(), id);
        self.apply(effects);
    }

    fn handle(&mut self, msg: Msg) {
        let now = Instant::now();
        match msg {
            Msg::Submit { req, output, reply } => {
                let _ = reply.send(self.state.submit(now, *req, output));
            }
            Msg::WorkerUp(up) => {
                self.links.insert(
                    up.id,
                    Link {
                        tx: up.tx,
                        backlog: VecDeque::new(),
                        close: Some(up.close),
                    },
                );
                self.state.worker_up(
                    now,
                    NewWorker {
                        id: up.id,
                        addr: up.addr,
                        spec: up.spec,
                        capacity: up.capacity,
                    },
                );
            }
            Msg::WorkerEvent(id, resp) => {
                let effects = self.state.worker_event(now, id, resp);
                self.apply(effects);
            }
            Msg::WorkerDown(id) => {
                self.links.remove(&id);
                self.state.worker_down(now, id);
            }
            Msg::WorkerLeaving(id) => self.state.worker_leaving(id),
            Msg::Drain => self.state.drain(),
            Msg::Abort(reason) => {
                let effects = self.state.abort_all(now, &reason);
                self.apply(effects);
            }
        }
    }

    fn apply(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Send(wid, kind) => {
                    if let Some(link) = self.links.get_mut(&wid) {
                        link.send(kind);
                    }
                }
                Effect::Disconnect(wid, why) => {
                    if let Some(close) = self.links.remove(&wid).and_then(|mut l| l.close.take()) {
                        let _ = close.send(why);
                    }
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
