//! The scheduler task: one task owns the priority queues, the workers' credits and every live
//! request. Clients submit and cancel through a [`SchedulerHandle`]; worker links feed it the
//! workers' step messages. After each batch of messages it places what fits, in priority
//! order, and sends each worker its share as one `Dispatch`.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use openinfer_core::FinishReason;
use openinfer_proto::worker::v1 as wpb;
use openinfer_proto::worker::v1::execute_request::Kind;
use openinfer_telemetry::{trace, TRACEPARENT};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Span;

use crate::config::RouterConfig;
use crate::error::RouterError;
use crate::metrics::{priority_label, Refusal, RouterMetrics};
use crate::models::{ModelSpec, ModelTable};
use crate::observe::child_span;
use crate::queue::{Entry, PriorityQueue};
use crate::request::{Output, Request};
use crate::worker_link::WorkerUp;

/// Identifies one connection to a worker (a reconnect is a new worker to the scheduler).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub u64);

/// Messages to the scheduler task.
pub enum Msg {
    /// Admit a validated request; the reply says whether it was queued.
    Submit {
        /// The request.
        req: Request,
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
}

/// Submits and cancels requests; cheap to clone.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<Msg>,
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
            .send(Msg::Submit { req, output, reply })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Cancels request `id` wherever it is (no-op when it already ended).
    pub fn cancel(&self, id: u64) {
        let _ = self.cancels.send(id);
    }

    /// Stops admitting new requests.
    pub async fn drain(&self) {
        let _ = self.tx.send(Msg::Drain).await;
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
    let s = Scheduler {
        live: live_tx,
        cfg,
        models,
        serving,
        rx,
        cancels,
        queues: HashMap::new(),
        workers: HashMap::new(),
        requests: HashMap::new(),
        deadlines: BTreeSet::new(),
        next_order: 0,
        draining: false,
        metrics,
        gauges: HashMap::new(),
    };
    tokio::spawn(s.run());
    SchedulerHandle {
        tx,
        live,
        cancels: cancel_tx,
    }
}

/// Where a live request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Queued,
    Running(WorkerId),
}

struct Tracked {
    req: Request,
    output: Arc<Output>,
    generated: Vec<u32>,
    emitted_text_bytes: u64,
    place: Place,
    /// First queued (kept across preemptions).
    enqueued: Instant,
    /// Times a worker refused it.
    rejections: u32,
    dispatched_once: bool,
    /// The worker it last ran on (a resume elsewhere is a migration).
    last_worker: Option<String>,
    /// When its latest token arrived (for the inter-token latency).
    last_token: Option<Instant>,
    /// Its current wait in the queue, as a child span of the request.
    queue_span: Option<Span>,
    /// Its current run on a worker, as a child span of the request.
    dispatch_span: Option<Span>,
    /// Dispatches so far.
    dispatches: u32,
}

impl Tracked {
    fn tokens(&self) -> usize {
        self.req.prompt_ids.len() + self.generated.len()
    }

    fn entry(&self) -> Entry {
        Entry {
            id: self.req.id,
            priority: self.req.priority,
            enqueued: self.enqueued,
            tokens: self.tokens(),
        }
    }
}

/// A sequence running on a worker.
#[derive(Debug, Clone, Copy)]
struct Running {
    priority: i32,
    /// Dispatch order, to preempt the newest first.
    order: u64,
    preempting: bool,
}

struct Worker {
    addr: String,
    spec: Arc<ModelSpec>,
    tx: mpsc::Sender<wpb::ExecuteRequest>,
    /// Messages that found the link's queue full, sent first when it has room. Dispatches
    /// stop while it is non-empty, so it holds at most control messages (each live request
    /// sends at most one cancel) and one dispatch.
    backlog: VecDeque<wpb::ExecuteRequest>,
    capacity: wpb::CapacityReport,
    /// Sequences sent on this connection.
    sent: u64,
    /// Blocks asked for by the sequences the worker has not acknowledged yet, in send order.
    in_flight: VecDeque<usize>,
    running: HashMap<u64, Running>,
    /// Sequences preempted to make room, with the KV blocks they hold, until the worker
    /// reports them gone: their slots and blocks count as free already.
    releasing: Vec<(u64, i64)>,
    /// Left the registry: gets no new sequences.
    leaving: bool,
}

impl Worker {
    fn unacked(&self) -> i64 {
        self.sent as i64 - self.capacity.dispatched as i64
    }

    fn free_slots(&self) -> i64 {
        self.capacity.free_sequence_slots as i64 + self.releasing.len() as i64 - self.unacked()
    }

    fn free_blocks(&self) -> i64 {
        let releasing: i64 = self.releasing.iter().map(|&(_, b)| b).sum();
        self.capacity.free_blocks as i64 + releasing - self.in_flight.iter().sum::<usize>() as i64
    }

    fn load(&self) -> f64 {
        self.running.len() as f64 / self.capacity.max_running_sequences.max(1) as f64
    }

    fn report(&mut self, cap: wpb::CapacityReport) {
        let acked = cap.dispatched.saturating_sub(self.capacity.dispatched);
        for _ in 0..acked {
            self.in_flight.pop_front();
        }
        self.capacity = cap;
    }

    /// True when a dispatch may go out now: nothing backlogged, and room left in the link's
    /// queue beyond the share kept for cancels and preemptions.
    fn can_take(&self) -> bool {
        !self.leaving && self.backlog.is_empty() && self.tx.capacity() > self.tx.max_capacity() / 4
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

struct Scheduler {
    /// Requests queued or running, for drain.
    live: watch::Sender<usize>,
    cfg: Arc<RouterConfig>,
    models: ModelTable,
    serving: watch::Sender<bool>,
    rx: mpsc::Receiver<Msg>,
    cancels: mpsc::UnboundedReceiver<u64>,
    queues: HashMap<String, PriorityQueue>,
    workers: HashMap<WorkerId, Worker>,
    requests: HashMap<u64, Tracked>,
    /// Queue deadlines of requests that have not reached a worker yet.
    deadlines: BTreeSet<(Instant, u64)>,
    next_order: u64,
    draining: bool,
    metrics: Arc<RouterMetrics>,
    /// Queue-depth and running gauges last set, so that levels that emptied are set to 0.
    gauges: HashMap<(String, String), i64>,
}

/// Messages handled between two scheduling passes at most.
const MAX_BATCH: usize = 512;

/// How often waiting work is retried when no event arrives.
const RETRY_TICK: std::time::Duration = std::time::Duration::from_millis(5);

impl Scheduler {
    async fn run(mut self) {
        loop {
            let next_deadline = self.deadlines.first().map(|&(d, _)| d);
            // Waiting work is retried on a short tick as well as on every worker event, so a
            // link whose queue was full is served as soon as it drains.
            let waiting = self.workers.values().any(|w| !w.backlog.is_empty())
                || self.queues.values().any(|q| !q.is_empty());
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
            self.expire(Instant::now());
            self.schedule();
            self.publish_gauges();
            let live = self.requests.len();
            self.live
                .send_if_modified(|n| std::mem::replace(n, live) != live);
        }
        tracing::debug!("scheduler stopped");
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Submit { req, output, reply } => {
                let outcome = self.admit(req, output);
                let _ = reply.send(outcome);
            }
            Msg::WorkerUp(up) => self.worker_up(up),
            Msg::WorkerEvent(id, resp) => self.worker_event(id, resp),
            Msg::WorkerDown(id) => self.worker_down(id),
            Msg::WorkerLeaving(id) => {
                if let Some(w) = self.workers.get_mut(&id) {
                    w.leaving = true;
                }
            }
            Msg::Drain => {
                self.draining = true;
                self.update_serving();
            }
        }
    }

    // ---- admission ------------------------------------------------------------------------

    fn queued(&self) -> (usize, usize) {
        self.queues
            .values()
            .fold((0, 0), |(n, t), q| (n + q.len(), t + q.tokens()))
    }

    fn admit(&mut self, req: Request, output: Arc<Output>) -> Result<(), RouterError> {
        if self.draining {
            self.metrics.refused(&req.model, Refusal::Draining);
            return Err(RouterError::Unavailable(
                "this router is draining; send the request to another replica".into(),
            ));
        }
        let workers = self.models.get(&req.model).map_or(0, |e| e.workers);
        if workers == 0 {
            self.metrics.refused(&req.model, Refusal::NoWorker);
            return Err(RouterError::Unavailable(format!(
                "no worker serves `{}` right now; retry shortly",
                req.model
            )));
        }
        let cfg = self.cfg.clone();
        let tokens = req.prompt_ids.len();
        let share = if req.priority < 0 {
            cfg.sheddable_share.clamp(0.0, 1.0)
        } else {
            1.0
        };
        let max_requests = (cfg.max_queued_requests as f64 * share) as usize;
        let max_tokens = (cfg.max_queued_tokens as f64 * share) as usize;
        loop {
            let (n, t) = self.queued();
            let level = self
                .queues
                .get(&req.model)
                .map_or(0, |q| q.level_len(req.priority));
            let (reason, full) = if n >= max_requests {
                (
                    Refusal::QueueFull,
                    format!("the router's queue is full ({n} requests waiting)"),
                )
            } else if t + tokens > max_tokens {
                (Refusal::TokenBudget, format!("the router's token budget is full ({t} prompt tokens waiting, this request brings {tokens})"))
            } else if level >= cfg.max_queue_per_priority {
                (
                    Refusal::PriorityQueueFull,
                    format!(
                        "the queue of priority {} for `{}` is full ({level} requests)",
                        req.priority, req.model
                    ),
                )
            } else {
                break;
            };
            // Room is made by shedding sheddable work of lower priority, newest first; a full
            // level of the request's own priority cannot be helped that way.
            let victim = (level < cfg.max_queue_per_priority)
                .then(|| self.shed_candidate(req.priority))
                .flatten();
            match victim {
                Some(id) => self.shed(id),
                None => {
                    self.metrics.refused(&req.model, reason);
                    return Err(RouterError::QueueFull(full, cfg.retry_pushback));
                }
            }
        }
        let now = Instant::now();
        self.deadlines.insert((req.deadline, req.id));
        let queue = self.queues.entry(req.model.clone()).or_default();
        let queue_span = queue_span(&req, queue.ahead_of(req.priority), false);
        let t = Tracked {
            req,
            output,
            generated: Vec::new(),
            emitted_text_bytes: 0,
            place: Place::Queued,
            enqueued: now,
            rejections: 0,
            dispatched_once: false,
            last_worker: None,
            last_token: None,
            queue_span: Some(queue_span),
            dispatch_span: None,
            dispatches: 0,
        };
        queue.push_back(t.entry());
        self.requests.insert(t.req.id, t);
        Ok(())
    }

    /// The sheddable request to drop for one of priority `priority`.
    fn shed_candidate(&self, priority: i32) -> Option<u64> {
        self.queues
            .values()
            .filter_map(|q| q.shed_candidate(priority.min(0)))
            .min_by(|a, b| {
                a.priority
                    .cmp(&b.priority)
                    .then(b.enqueued.cmp(&a.enqueued))
            })
            .map(|e| e.id)
    }

    fn shed(&mut self, id: u64) {
        if let Some(t) = self.unqueue(id) {
            self.metrics.refused(&t.req.model, Refusal::Shed);
            t.output.fail(RouterError::QueueFull(
                "shed from the queue to make room for higher-priority work".into(),
                self.cfg.retry_pushback,
            ));
        }
    }

    /// Takes a queued request out of the router entirely.
    fn unqueue(&mut self, id: u64) -> Option<Tracked> {
        let t = self.requests.remove(&id)?;
        if let Some(q) = self.queues.get_mut(&t.req.model) {
            q.remove(id, t.req.priority);
        }
        self.deadlines.remove(&(t.req.deadline, id));
        Some(t)
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            let queued = self
                .requests
                .get(&id)
                .is_some_and(|t| t.place == Place::Queued && !t.dispatched_once);
            if queued {
                if let Some(t) = self.unqueue(id) {
                    t.output
                        .fail(RouterError::QueueTimeout(now - t.req.arrived));
                }
            }
        }
    }

    fn cancel(&mut self, id: u64) {
        let Some(place) = self.requests.get(&id).map(|t| t.place) else {
            return;
        };
        match place {
            Place::Queued => {
                self.unqueue(id);
            }
            Place::Running(wid) => {
                self.requests.remove(&id);
                if let Some(w) = self.workers.get_mut(&wid) {
                    w.running.remove(&id);
                    w.send(Kind::Cancel(wpb::Cancel {
                        sequence_ids: vec![id],
                    }));
                }
            }
        }
    }

    // ---- placement ------------------------------------------------------------------------

    fn schedule(&mut self) {
        for w in self.workers.values_mut() {
            w.flush();
        }
        let now = Instant::now();
        let mut batches: HashMap<WorkerId, Vec<wpb::SequenceSpec>> = HashMap::new();
        let models: Vec<String> = self
            .queues
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(m, _)| m.clone())
            .collect();
        for model in models {
            while let Some(e) = self
                .queues
                .get(&model)
                .and_then(|q| q.peek(now, self.cfg.aging_step))
            {
                match self.pick_worker(&model, e.tokens + 1) {
                    Some(wid) => {
                        if let Some(q) = self.queues.get_mut(&model) {
                            q.remove(e.id, e.priority);
                        }
                        if let Some(spec) = self.place(e.id, wid, now) {
                            batches.entry(wid).or_default().push(spec);
                        }
                    }
                    None => {
                        // A preemption makes room at once: the worker handles the preempt
                        // before the dispatch that follows it on the same stream.
                        let room = if self.cfg.preemption {
                            self.preempt_for(&model, e.priority, e.tokens + 1)
                        } else {
                            None
                        };
                        let Some(wid) = room else { break };
                        if let Some(q) = self.queues.get_mut(&model) {
                            q.remove(e.id, e.priority);
                        }
                        if let Some(spec) = self.place(e.id, wid, now) {
                            batches.entry(wid).or_default().push(spec);
                        }
                    }
                }
            }
        }
        for (wid, sequences) in batches {
            if let Some(w) = self.workers.get_mut(&wid) {
                w.send(Kind::Dispatch(wpb::Dispatch { sequences }));
            }
        }
    }

    /// The least-loaded worker of `model` with a free slot and room for `tokens`.
    fn pick_worker(&self, model: &str, tokens: usize) -> Option<WorkerId> {
        self.workers
            .iter()
            .filter(|(_, w)| w.spec.id == model && w.free_slots() > 0 && w.can_take())
            .filter(|(_, w)| w.free_blocks() >= tokens.div_ceil(w.spec.block_size) as i64)
            .min_by(|(a_id, a), (b_id, b)| {
                a.load()
                    .total_cmp(&b.load())
                    .then(b.free_blocks().cmp(&a.free_blocks()))
                    .then(a_id.cmp(b_id))
            })
            .map(|(&id, _)| id)
    }

    /// Marks `id` as running on `wid` and returns what to send.
    fn place(&mut self, id: u64, wid: WorkerId, now: Instant) -> Option<wpb::SequenceSpec> {
        let t = self.requests.get_mut(&id)?;
        let w = self.workers.get_mut(&wid)?;
        t.place = Place::Running(wid);
        let model = [t.req.model.as_str()];
        if !t.dispatched_once {
            t.dispatched_once = true;
            self.deadlines.remove(&(t.req.deadline, id));
            let priority = priority_label(t.req.priority);
            self.metrics
                .queue_time
                .with_label_values(&[t.req.model.as_str(), priority.as_str()])
                .observe((now - t.req.arrived).as_secs_f64());
            self.metrics
                .prompt_tokens
                .with_label_values(&model)
                .inc_by(t.req.prompt_ids.len() as u64);
        }
        if t.last_worker.as_ref().is_some_and(|a| *a != w.addr) {
            self.metrics.migrations.with_label_values(&model).inc();
        }
        t.last_worker = Some(w.addr.clone());
        t.queue_span = None;
        t.dispatches += 1;
        let (attempt, resumed) = (t.dispatches, t.generated.len());
        let span = child_span(&t.req.trace.span, |parent| {
            tracing::info_span!(
                parent: parent,
                "dispatch",
                openinfer.worker = %w.addr,
                openinfer.attempt = attempt,
                openinfer.resumed_tokens = resumed,
                openinfer.finish = tracing::field::Empty,
            )
        });
        let traceparent = trace::traceparent(&span, t.req.trace.trace_id);
        t.dispatch_span = Some(span);
        t.output.dispatched(now);
        w.sent += 1;
        w.in_flight
            .push_back((t.tokens() + 1).div_ceil(w.spec.block_size));
        self.next_order += 1;
        w.running.insert(
            id,
            Running {
                priority: t.req.priority,
                order: self.next_order,
                preempting: false,
            },
        );
        Some(wpb::SequenceSpec {
            sequence_id: id,
            prompt_ids: t.req.prompt_ids.clone(),
            sampling: Some(t.req.sampling),
            stopping: Some(t.req.stopping.clone()),
            logprobs: t.req.logprobs,
            top_logprobs: t.req.top_logprobs,
            priority: t.req.priority,
            generated_ids: t.generated.clone(),
            emitted_text_bytes: t.emitted_text_bytes,
            request_id: t.req.request_id.clone(),
            trace_context: HashMap::from([(TRACEPARENT.to_string(), traceparent.to_string())]),
        })
    }

    /// Preempts the lowest-priority (newest first) running sequence of `model` below
    /// `priority` whose slot and KV blocks make room for a request of `tokens`, and returns
    /// its worker. The caller dispatches the request there right away: the worker frees the
    /// victim before it admits what follows on the same stream, so the request starts in the
    /// worker's next step rather than one report later.
    fn preempt_for(&mut self, model: &str, priority: i32, tokens: usize) -> Option<WorkerId> {
        let requests = &self.requests;
        let (wid, id, held) = self
            .workers
            .iter()
            .filter(|(_, w)| w.spec.id == model && w.can_take())
            .flat_map(|(&wid, w)| {
                let blocks = |n: usize| n.div_ceil(w.spec.block_size) as i64;
                let need = blocks(tokens);
                w.running
                    .iter()
                    .filter(|(_, r)| r.priority < priority && !r.preempting)
                    .map(move |(&id, r)| {
                        let held = requests.get(&id).map_or(0, |t| blocks(t.tokens() + 1));
                        (wid, id, *r, held)
                    })
                    .filter(move |&(.., held)| w.free_blocks() + held >= need)
            })
            .min_by(|a, b| {
                a.2.priority
                    .cmp(&b.2.priority)
                    .then(b.2.order.cmp(&a.2.order))
            })
            .map(|(wid, id, _, held)| (wid, id, held))?;
        let w = self.workers.get_mut(&wid)?;
        w.send(Kind::Preempt(wpb::Preempt {
            sequence_ids: vec![id],
        }));
        self.metrics
            .preemptions
            .with_label_values(&[w.spec.id.as_str()])
            .inc();
        if let Some(r) = w.running.get_mut(&id) {
            r.preempting = true;
        }
        // Its slot and blocks count as free until the worker reports them freed.
        w.releasing.push((id, held));
        if let Some(t) = self.requests.get(&id) {
            tracing::debug!(parent: &t.req.trace.span, worker = %w.addr, "preempted for a request of priority {priority}");
        }
        Some(wid)
    }

    /// Puts a request that left its worker unfinished back in the queue, resume state kept.
    fn requeue(&mut self, id: u64) {
        let Some(t) = self.requests.get_mut(&id) else {
            return;
        };
        t.place = Place::Queued;
        // Still open only when the worker went away without a word about it.
        if let Some(span) = t.dispatch_span.take() {
            span.record("openinfer.finish", "worker_lost");
        }
        let entry = t.entry();
        let queue = self.queues.entry(t.req.model.clone()).or_default();
        t.queue_span = Some(queue_span(&t.req, queue.ahead_of(t.req.priority), true));
        queue.push_resumed(entry);
    }

    // ---- workers --------------------------------------------------------------------------

    fn worker_up(&mut self, up: WorkerUp) {
        self.models.worker_up(up.spec.clone());
        self.metrics.model_known(&up.spec.id);
        self.count_workers(&up.spec.id);
        self.queues.entry(up.spec.id.clone()).or_default();
        self.workers.insert(
            up.id,
            Worker {
                addr: up.addr,
                spec: up.spec,
                tx: up.tx,
                backlog: VecDeque::new(),
                capacity: up.capacity,
                sent: 0,
                in_flight: VecDeque::new(),
                running: HashMap::new(),
                releasing: Vec::new(),
                leaving: false,
            },
        );
        self.update_serving();
    }

    fn worker_down(&mut self, wid: WorkerId) {
        let Some(w) = self.workers.remove(&wid) else {
            return;
        };
        self.models.worker_down(&w.spec.id);
        self.count_workers(&w.spec.id);
        self.metrics.worker_gone(&w.spec.id, &w.addr);
        let mut ids: Vec<(u64, u64)> = w.running.iter().map(|(&id, r)| (r.order, id)).collect();
        ids.sort_unstable();
        for (_, id) in ids {
            self.requeue(id);
        }
        self.update_serving();
    }

    fn worker_event(&mut self, wid: WorkerId, resp: wpb::ExecuteResponse) {
        let now = Instant::now();
        let Some(w) = self.workers.get_mut(&wid) else {
            return;
        };
        let model = [w.spec.id.as_str()];
        let (itl, generated) = (
            self.metrics.itl.with_label_values(&model),
            self.metrics.generation_tokens.with_label_values(&model),
        );
        for ev in resp.tokens {
            if !w.running.contains_key(&ev.sequence_id) {
                continue;
            }
            if let Some(t) = self.requests.get_mut(&ev.sequence_id) {
                let n = ev.token_ids.len();
                if n > 0 {
                    if let Some(last) = t.last_token {
                        let gap = (now - last).as_secs_f64() / n as f64;
                        (0..n).for_each(|_| itl.observe(gap));
                    }
                    t.last_token = Some(now);
                    generated.inc_by(n as u64);
                }
                t.generated.extend(&ev.token_ids);
                t.emitted_text_bytes += ev.text.len() as u64;
                t.output.push(ev, now);
            }
        }
        if let Some(cap) = resp.capacity {
            w.report(cap);
            let labels = [w.spec.id.as_str(), w.addr.as_str()];
            let m = &self.metrics;
            m.worker_running
                .with_label_values(&labels)
                .set(cap.running_sequences.into());
            m.worker_kv_used
                .with_label_values(&labels)
                .set(i64::from(cap.total_blocks) - i64::from(cap.free_blocks));
            m.worker_kv_total
                .with_label_values(&labels)
                .set(cap.total_blocks.into());
        }
        for f in resp.finished {
            self.finished(wid, f);
        }
    }

    fn finished(&mut self, wid: WorkerId, f: wpb::SequenceFinished) {
        let id = f.sequence_id;
        let Some(w) = self.workers.get_mut(&wid) else {
            return;
        };
        w.releasing.retain(|&(r, _)| r != id);
        if w.running.remove(&id).is_none() {
            return;
        }
        let reason = wpb::FinishReason::try_from(f.reason).unwrap_or(wpb::FinishReason::Error);
        if let Some(span) = self
            .requests
            .get_mut(&id)
            .and_then(|t| t.dispatch_span.take())
        {
            let name = reason.as_str_name().trim_start_matches("FINISH_REASON_");
            span.record("openinfer.finish", name.to_ascii_lowercase());
        }
        let done = |reason| Some(Ok(reason));
        let outcome = match reason {
            wpb::FinishReason::Preempted => None,
            wpb::FinishReason::Rejected => {
                let Some(t) = self.requests.get_mut(&id) else {
                    return;
                };
                t.rejections += 1;
                (t.rejections >= self.cfg.max_dispatch_attempts).then(|| {
                    Err(RouterError::Unavailable(format!(
                        "workers refused this request {} times; last reason: {}",
                        t.rejections, f.message
                    )))
                })
            }
            wpb::FinishReason::Length => done(FinishReason::Length),
            wpb::FinishReason::Stop => done(FinishReason::Stop),
            wpb::FinishReason::Eos => done(FinishReason::Eos),
            wpb::FinishReason::Cancelled => Some(Err(RouterError::Worker(
                "the worker cancelled the sequence".into(),
            ))),
            wpb::FinishReason::Error | wpb::FinishReason::Unspecified => {
                Some(Err(RouterError::Worker(f.message)))
            }
        };
        match outcome {
            None => self.requeue(id),
            Some(result) => {
                let Some(t) = self.requests.remove(&id) else {
                    return;
                };
                match result {
                    Ok(reason) => t.output.finish(
                        reason,
                        t.req.prompt_ids.len() as u32,
                        t.generated.len() as u32,
                    ),
                    Err(e) => t.output.fail(e),
                }
            }
        }
    }

    /// Sets the workers gauge of `model`.
    fn count_workers(&self, model: &str) {
        let n = self.models.get(model).map_or(0, |e| e.workers);
        self.metrics
            .workers
            .with_label_values(&[model])
            .set(n as i64);
    }

    /// Sets the queue-depth and running gauges (levels that emptied go to 0).
    fn publish_gauges(&mut self) {
        let mut now: HashMap<(String, String), i64> = HashMap::new();
        for (model, q) in &self.queues {
            for (p, n) in q.levels() {
                *now.entry((model.clone(), priority_label(p))).or_default() += n as i64;
            }
        }
        for (key, _) in self.gauges.iter() {
            now.entry(key.clone()).or_default();
        }
        for ((model, priority), n) in &now {
            if self.gauges.get(&(model.clone(), priority.clone())) != Some(n) {
                self.metrics
                    .queue_depth
                    .with_label_values(&[model.as_str(), priority.as_str()])
                    .set(*n);
            }
        }
        self.gauges = now;
        let mut running: HashMap<&str, i64> = HashMap::new();
        for w in self.workers.values() {
            *running.entry(w.spec.id.as_str()).or_default() += w.running.len() as i64;
        }
        for model in self.queues.keys() {
            let n = running.get(model.as_str()).copied().unwrap_or(0);
            self.metrics
                .running
                .with_label_values(&[model.as_str()])
                .set(n);
        }
    }

    fn update_serving(&self) {
        let serving = !self.draining && self.models.serving() > 0;
        self.serving
            .send_if_modified(|s| std::mem::replace(s, serving) != serving);
    }
}

/// The span of a request's wait in the queue.
fn queue_span(req: &Request, position: usize, resumed: bool) -> Span {
    child_span(&req.trace.span, |parent| {
        tracing::info_span!(
            parent: parent,
            "queue",
            openinfer.priority = req.priority,
            openinfer.queue_position = position,
            openinfer.resumed = resumed,
        )
    })
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
