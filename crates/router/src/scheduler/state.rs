//! The scheduler's state: every live request, the per-model queues and each worker's credit
//! ledger. Its methods take the current time and one input and return the effects, the
//! messages to send to workers; the [task](super) only moves messages. Clients hear about
//! their requests through each request's [`Output`] (a bounded in-memory buffer).
//!
//! The inputs, one concept per module:
//! * [`admission`](super::admission): `submit`, shedding, queue deadlines;
//! * [`placement`](super::placement): `tick`'s scheduling pass;
//! * [`preemption`](super::preemption): making room for higher priorities, and resuming;
//! * [`events`](super::events): a worker's step messages (tokens, ends, capacity);
//! * workers coming and going, cancels and drain: here.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use openinfer_proto::worker::v1 as wpb;
use openinfer_proto::worker::v1::execute_request::Kind;
use tracing::Span;

use super::credits::Credits;
use super::pace::TypicalLength;
use super::queues::{Entry, PriorityQueue};
use crate::config::RouterConfig;
use crate::error::RouterError;
use crate::metrics::{priority_label, RouterMetrics};
use crate::models::{ModelSpec, ModelTable};
use crate::request::{Output, Request};

/// Identifies one connection to a worker (a reconnect is a new worker to the scheduler).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub u64);

/// What the state asks the task to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Send a message on the worker's `Execute` stream (in order).
    Send(WorkerId, Kind),
    /// Close the connection to a worker that broke the protocol; its sequences were already
    /// put back in the queue.
    Disconnect(WorkerId, String),
}

/// A worker that connected, as the state needs it.
pub struct NewWorker {
    /// Its connection.
    pub id: WorkerId,
    /// Its address (logs and metrics).
    pub addr: String,
    /// Its model.
    pub spec: Arc<ModelSpec>,
    /// Its first capacity report.
    pub capacity: wpb::CapacityReport,
}

/// Where a live request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Place {
    Queued,
    Running(WorkerId),
}

/// A live request.
pub(super) struct Tracked {
    pub req: Request,
    pub output: Arc<Output>,
    pub generated: Vec<u32>,
    pub emitted_text_bytes: u64,
    pub place: Place,
    /// First queued (kept across preemptions).
    pub enqueued: Instant,
    /// Times a worker refused it.
    pub rejections: u32,
    pub dispatched_once: bool,
    /// Times it went back to the queue unfinished (preempted, or its worker lost).
    pub resumes: u32,
    /// While it waits to resume: when it stops waiting and fails (one queue timeout after it
    /// came back), so that losing every worker never leaves a stream hanging.
    pub resume_deadline: Option<Instant>,
    /// The worker it last ran on (a resume elsewhere is a migration).
    pub last_worker: Option<String>,
    /// When its latest token arrived (for the inter-token latency).
    pub last_token: Option<Instant>,
    /// Its current wait in the queue, as a child span of the request.
    pub queue_span: Option<Span>,
    /// Its current run on a worker, as a child span of the request.
    pub dispatch_span: Option<Span>,
    /// Dispatches so far.
    pub dispatches: u32,
    /// Prompt tokens the worker of its first run found in its prefix cache.
    pub cached_prompt_tokens: Option<u32>,
}

impl Tracked {
    /// Tokens it holds now: prompt and what was generated so far.
    pub fn tokens(&self) -> usize {
        self.req.prompt_ids.len() + self.generated.len()
    }

    /// Its queue entry.
    pub fn entry(&self) -> Entry {
        Entry {
            id: self.req.id,
            priority: self.req.priority,
            enqueued: self.enqueued,
            tokens: self.tokens(),
            tenant: self.req.tenant.clone(),
        }
    }
}

/// The scheduler's state (see the module documentation).
pub struct State {
    pub(super) cfg: Arc<RouterConfig>,
    pub(super) models: ModelTable,
    pub(super) metrics: Arc<RouterMetrics>,
    pub(super) queues: HashMap<String, PriorityQueue>,
    pub(super) workers: HashMap<WorkerId, Credits>,
    pub(super) requests: HashMap<u64, Tracked>,
    /// Queue deadlines of requests that have not reached a worker yet.
    pub(super) deadlines: BTreeSet<(Instant, u64)>,
    /// Dispatch order, to preempt the newest first.
    pub(super) next_order: u64,
    /// Per model: how long outputs that may stop early turn out to be.
    pub(super) typical_length: HashMap<String, TypicalLength>,
    pub(super) draining: bool,
    /// Queue-depth and running gauges last set, so that levels that emptied are set to 0.
    gauges: HashMap<(String, String), i64>,
    /// Effects of the input being handled.
    pub(super) effects: Vec<Effect>,
    /// What each worker's prefix cache holds, as reported.
    pub(super) prefix: super::prefix_index::PrefixIndex,
}

impl State {
    /// An empty state.
    pub fn new(cfg: Arc<RouterConfig>, models: ModelTable, metrics: Arc<RouterMetrics>) -> State {
        State {
            models,
            metrics,
            queues: HashMap::new(),
            workers: HashMap::new(),
            requests: HashMap::new(),
            deadlines: BTreeSet::new(),
            next_order: 0,
            typical_length: HashMap::new(),
            draining: false,
            gauges: HashMap::new(),
            effects: Vec::new(),
            prefix: super::prefix_index::PrefixIndex::new(cfg.prefix_index_entries),
            cfg,
        }
    }

    pub(super) fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// Requests queued or running.
    pub fn live(&self) -> usize {
        self.requests.len()
    }

    /// True while some model has a worker and the router is not draining.
    pub fn serving(&self) -> bool {
        !self.draining && self.models.serving() > 0
    }

    /// True when requests wait in a queue.
    pub fn waiting(&self) -> bool {
        self.queues.values().any(|q| !q.is_empty())
    }

    /// The earliest queue deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|&(d, _)| d)
    }

    /// Stops admitting; what is queued and running goes on.
    pub fn drain(&mut self) {
        self.draining = true;
    }

    /// Ends every live request with `UNAVAILABLE` (`reason`) and cancels its sequence on its
    /// worker: what a drain that ran out of time leaves behind. Admission stays closed.
    pub fn abort_all(&mut self, _now: Instant, reason: &str) -> Vec<Effect> {
        self.draining = true;
        let ids: Vec<u64> = self.requests.keys().copied().collect();
        let mut cancels: std::collections::BTreeMap<WorkerId, Vec<u64>> = Default::default();
        for id in ids {
            let Some(place) = self.requests.get(&id).map(|t| t.place) else {
                continue;
            };
            let tracked = match place {
                Place::Queued => self.unqueue(id),
                Place::Running(wid) => {
                    let (t, on_worker) = self.take_running(id, wid);
                    if on_worker {
                        cancels.entry(wid).or_default().push(id);
                    }
                    t
                }
            };
            if let Some(t) = tracked {
                t.output.fail(RouterError::Unavailable(reason.to_string()));
            }
        }
        for (wid, sequence_ids) in cancels {
            self.effects.push(Effect::Send(
                wid,
                Kind::Cancel(wpb::Cancel { sequence_ids }),
            ));
        }
        self.take_effects()
    }

    /// Cancels request `id` wherever it is (nothing when it already ended).
    pub fn cancel(&mut self, _now: Instant, id: u64) -> Vec<Effect> {
        let Some(place) = self.requests.get(&id).map(|t| t.place) else {
            return Vec::new();
        };
        match place {
            Place::Queued => {
                self.unqueue(id);
            }
            Place::Running(wid) => {
                if let (_, true) = self.take_running(id, wid) {
                    self.effects.push(Effect::Send(
                        wid,
                        Kind::Cancel(wpb::Cancel {
                            sequence_ids: vec![id],
                        }),
                    ));
                }
            }
        }
        self.take_effects()
    }

    /// Takes running request `id` out of the router (its tokens so far count as wasted) and
    /// off worker `wid`'s ledger; says whether the worker still has it (then it must hear a
    /// cancel).
    fn take_running(&mut self, id: u64, wid: WorkerId) -> (Option<Tracked>, bool) {
        let t = self.requests.remove(&id);
        if let Some(t) = &t {
            self.wasted(t);
        }
        let on_worker = match self.workers.get_mut(&wid) {
            Some(w) => {
                w.running.remove(&id);
                true
            }
            None => false,
        };
        (t, on_worker)
    }

    /// Counts the tokens generated for a request that will not complete.
    pub(super) fn wasted(&self, t: &Tracked) {
        if !t.generated.is_empty() {
            self.metrics
                .wasted_tokens
                .with_label_values(&[t.req.model.as_str()])
                .inc_by(t.generated.len() as u64);
        }
    }

    /// A worker connected.
    pub fn worker_up(&mut self, _now: Instant, up: NewWorker) {
        self.models.worker_up(up.spec.clone());
        self.metrics.model_known(&up.spec.id);
        self.count_workers(&up.spec.id);
        self.queues.entry(up.spec.id.clone()).or_default();
        self.workers
            .insert(up.id, Credits::new(up.addr, up.spec, up.capacity));
    }

    /// A worker left the registry: nothing new goes there and it no longer counts as serving
    /// its model (with no other worker, new requests get `UNAVAILABLE` at once); what runs
    /// there may finish, then the connection is closed (see [`close_idle_leavers`]), so a
    /// worker that registers again gets one link, not one more.
    ///
    /// [`close_idle_leavers`]: State::close_idle_leavers
    pub fn worker_leaving(&mut self, wid: WorkerId) {
        let Some(w) = self.workers.get_mut(&wid) else {
            return;
        };
        if std::mem::replace(&mut w.leaving, true) {
            return;
        }
        let model = w.spec.id.clone();
        self.models.worker_down(&model);
        self.count_workers(&model);
    }

    /// Closes the connections of leaving workers with nothing left running there.
    fn close_idle_leavers(&mut self) {
        for (&wid, w) in &mut self.workers {
            if w.leaving && !w.closing && w.running.is_empty() {
                w.closing = true;
                self.effects.push(Effect::Disconnect(
                    wid,
                    "it left the registry and nothing runs there".into(),
                ));
            }
        }
    }

    /// A worker's stream ended: its sequences go back to the queue (oldest dispatch first).
    pub fn worker_down(&mut self, now: Instant, wid: WorkerId) {
        let Some(w) = self.workers.remove(&wid) else {
            return;
        };
        self.prefix.forget(wid);
        self.metrics
            .prefix_index_entries
            .set(self.prefix.len() as i64);
        if !w.leaving {
            self.models.worker_down(&w.spec.id);
            self.count_workers(&w.spec.id);
        }
        self.metrics.worker_gone(&w.spec.id, &w.addr);
        let mut ids: Vec<(u64, u64)> = w.running.iter().map(|(&id, r)| (r.order, id)).collect();
        ids.sort_unstable();
        for (_, id) in ids {
            self.requeue(now, id);
        }
    }

    /// Drops a worker that broke the protocol: its sequences resume elsewhere and the task
    /// closes its connection.
    pub(super) fn disconnect(&mut self, now: Instant, wid: WorkerId, why: String) {
        if let Some(w) = self.workers.get(&wid) {
            tracing::warn!(worker = %w.addr, reason = %why, "disconnecting a worker that broke the protocol; its sequences resume elsewhere");
        }
        self.worker_down(now, wid);
        self.effects.push(Effect::Disconnect(wid, why));
    }

    /// Periodic work: queue deadlines, then a scheduling pass over what waits, then the
    /// gauges. `room` says whether a worker's link can take a dispatch now.
    pub fn tick(&mut self, now: Instant, room: &dyn Fn(WorkerId) -> bool) -> Vec<Effect> {
        self.expire(now);
        self.close_idle_leavers();
        self.schedule(now, room);
        self.publish_gauges();
        self.take_effects()
    }

    /// Sets the workers gauge of `model`.
    pub(super) fn count_workers(&self, model: &str) {
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
}
