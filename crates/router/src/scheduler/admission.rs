//! Admission: a request is queued only within the router's bounds (requests, prompt tokens,
//! one priority level) and when it can be served before its client's deadline
//! ([`pace`](super::pace)); sheddable (negative priority) work gets a share of the bounds and
//! is dropped first to make room; and a request that reaches no worker before its deadline
//! (or before it could still finish) leaves the queue with `DEADLINE_EXCEEDED`.

use std::sync::Arc;
use std::time::Instant;

use tracing::Span;

use super::pace::Outlook;
use super::state::{Place, State, Tracked};
use crate::config::RouterConfig;
use crate::error::RouterError;
use crate::metrics::Refusal;
use crate::observe::child_span;
use crate::request::{Output, Request};

/// The share of the queue bounds open to a request of `priority`.
fn share(cfg: &RouterConfig, priority: i32) -> f64 {
    if priority < 0 {
        cfg.sheddable_share.clamp(0.0, 1.0)
    } else {
        1.0
    }
}

/// Most requests queued that still admit one of `priority`.
pub(super) fn max_queued_requests(cfg: &RouterConfig, priority: i32) -> usize {
    (cfg.max_queued_requests as f64 * share(cfg, priority)) as usize
}

const SHED_FOR_PRIORITY: &str = "shed from the queue to make room for higher-priority work";
const SHED_FOR_SHARE: &str =
    "shed from the full queue: your tenant held more of it than the tenant of a newer request";

/// The refusal of a full queue holding `n` requests.
pub(super) fn queue_full(n: usize) -> String {
    format!("the router's queue is full ({n} requests waiting)")
}

impl State {
    /// Admits `req` into its model's queue, or says why not (the reply to the client).
    pub fn submit(
        &mut self,
        now: Instant,
        req: Request,
        output: Arc<Output>,
    ) -> Result<(), RouterError> {
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
        let mut req = req;
        if !cfg.fair_share {
            // One queue per level for every tenant: first come, first served.
            req.tenant = "".into();
        }
        // A request that cannot be served before its deadline is refused now, not when its
        // slot is wasted; one that can may wait only as long as it can still finish.
        match self.outlook(now, &req, 0, true) {
            Outlook::Late { left, needs } => {
                self.metrics.refused(&req.model, Refusal::Deadline);
                return Err(RouterError::QueueFull(
                    format!(
                        "it cannot be served before its deadline: it needs about {needs:.1?} of \
                         generation at the workers' current pace and has {left:.1?}, less once \
                         the work queued ahead of it is done"
                    ),
                    cfg.retry_pushback,
                ));
            }
            Outlook::StartBy(at) => req.deadline = req.deadline.min(at),
            Outlook::Unknown => {}
        }
        let tokens = req.prompt_ids.len();
        let share = share(&cfg, req.priority);
        let max_requests = max_queued_requests(&cfg, req.priority);
        let max_tokens = (cfg.max_queued_tokens as f64 * share) as usize;
        loop {
            let (n, t) = self.queued();
            let level = self
                .queues
                .get(&req.model)
                .map_or(0, |q| q.level_len(req.priority));
            let (reason, full) = if n >= max_requests {
                (Refusal::QueueFull, queue_full(n))
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
            // Room is made by shedding sheddable work of lower priority, newest first (a full
            // level of the request's own priority cannot be helped that way); else, with fair
            // shares, by shedding the newest request of the tenant that holds the most of
            // the request's level, when that is more than the request's tenant holds: one
            // tenant cannot lock the others out by filling the queue.
            let sheddable = (level < cfg.max_queue_per_priority)
                .then(|| self.shed_candidate(req.priority))
                .flatten();
            match sheddable {
                Some(id) => self.shed(id, SHED_FOR_PRIORITY),
                None => match self.over_share(&req) {
                    Some(id) => self.shed(id, SHED_FOR_SHARE),
                    None => {
                        self.metrics.refused(&req.model, reason);
                        return Err(RouterError::QueueFull(full, cfg.retry_pushback));
                    }
                },
            }
        }
        self.deadlines.insert((req.deadline, req.id));
        let queue = self.queues.entry(req.model.clone()).or_default();
        let queue_span = queue_span(&req, queue.ahead_of(req.priority, &req.tenant), false);
        let t = Tracked {
            req,
            output,
            generated: Vec::new(),
            emitted_text_bytes: 0,
            place: Place::Queued,
            enqueued: now,
            rejections: 0,
            dispatched_once: false,
            resumes: 0,
            resume_deadline: None,
            last_worker: None,
            last_token: None,
            queue_span: Some(queue_span),
            dispatch_span: None,
            dispatches: 0,
            cached_prompt_tokens: None,
        };
        queue.push_back(t.entry());
        self.requests.insert(t.req.id, t);
        Ok(())
    }

    /// Requests queued, and of them the sheddable (negative priority) ones, over every model.
    pub fn queue_counts(&self) -> (usize, usize) {
        self.queues.values().fold((0, 0), |(n, s), q| {
            let sheddable: usize = q.levels().filter(|&(p, _)| p < 0).map(|(_, n)| n).sum();
            (n + q.len(), s + sheddable)
        })
    }

    /// Requests and prompt tokens queued, over every model.
    fn queued(&self) -> (usize, usize) {
        self.queues
            .values()
            .fold((0, 0), |(n, t), q| (n + q.len(), t + q.tokens()))
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

    /// With fair shares, the newest request of the tenant holding the most of `req`'s
    /// level of its model, if that tenant holds more than `req`'s tenant would with `req`.
    fn over_share(&self, req: &Request) -> Option<u64> {
        if !self.cfg.fair_share {
            return None;
        }
        let queue = self.queues.get(&req.model)?;
        queue.over_share(req.priority, &req.tenant).map(|e| e.id)
    }

    fn shed(&mut self, id: u64, why: &str) {
        if let Some(t) = self.unqueue(id) {
            self.metrics.refused(&t.req.model, Refusal::Shed);
            t.output
                .fail(RouterError::QueueFull(why.into(), self.cfg.retry_pushback));
        }
    }

    /// Takes a queued request out of the router entirely: it will not complete (what it
    /// generated before it came back to the queue counts as wasted).
    pub(super) fn unqueue(&mut self, id: u64) -> Option<Tracked> {
        let t = self.requests.remove(&id)?;
        self.wasted(&t);
        if let Some(q) = self.queues.get_mut(&t.req.model) {
            q.remove(id, t.req.priority, &t.req.tenant);
        }
        self.deadlines.remove(&(t.req.deadline, id));
        if let Some(d) = t.resume_deadline {
            self.deadlines.remove(&(d, id));
        }
        Some(t)
    }

    /// Fails the requests whose deadline passed before they reached a worker, and those that
    /// waited a whole queue timeout to resume (every worker of their model lost, say).
    pub(super) fn expire(&mut self, now: Instant) {
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
                    // Before the client's own deadline: it could no longer finish in time.
                    let e = match t.req.client_deadline {
                        Some(d) if d > now => RouterError::TooLateToStart(d - now),
                        _ => RouterError::QueueTimeout(now - t.req.arrived),
                    };
                    t.output.fail(e);
                }
                continue;
            }
            let stranded = self
                .requests
                .get(&id)
                .is_some_and(|t| t.place == Place::Queued && t.resume_deadline == Some(deadline));
            if stranded {
                if let Some(t) = self.unqueue(id) {
                    t.output.fail(RouterError::Unavailable(format!(
                        "no worker of `{}` took the request back within {:?} after it stopped (its worker lost or preempted); retry",
                        t.req.model, self.cfg.default_queue_timeout
                    )));
                }
            }
        }
    }
}

/// The span of a request's wait in the queue.
pub(super) fn queue_span(req: &Request, position: usize, resumed: bool) -> Span {
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
