//! Placement: each pass takes every model's queue in priority order (with aging) and places
//! each request on the least-loaded worker of its model whose credits cover it, preempting a
//! lower priority when none has room, and sends each worker its share as one `Dispatch`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use openinfer_proto::worker::v1 as wpb;
use openinfer_proto::worker::v1::execute_request::Kind;
use openinfer_telemetry::{trace, TRACEPARENT};

use super::credits::Running;
use super::pace::Outlook;
use super::state::{Effect, Place, State, WorkerId};
use crate::error::RouterError;
use crate::metrics::priority_label;
use crate::observe::child_span;

impl State {
    /// Places what waits; `room` says whether a worker's link can take a dispatch now.
    pub(super) fn schedule(&mut self, now: Instant, room: &dyn Fn(WorkerId) -> bool) {
        // What this pass places goes out at its end, after any preemption it sends: it must
        // not be a preemption's victim (the worker would hear of the preemption first).
        let placed_before = self.next_order;
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
                if let Some(left) = self.too_late_to_start(now, e.id) {
                    if let Some(t) = self.unqueue(e.id) {
                        t.output.fail(RouterError::TooLateToStart(left));
                    }
                    continue;
                }
                let target = match self.pick_worker(&model, e.tokens + 1, e.id, room) {
                    Some(wid) => Some(wid),
                    // A preemption makes room at once: the worker handles the preempt
                    // before the dispatch that follows it on the same stream.
                    None if self.cfg.preemption => {
                        self.preempt_for(&model, e.priority, e.tokens + 1, placed_before, room)
                    }
                    None => None,
                };
                let Some(wid) = target else { break };
                if let Some(q) = self.queues.get_mut(&model) {
                    q.remove(e.id, e.priority, &e.tenant);
                }
                if let Some(spec) = self.place(e.id, wid, now) {
                    batches.entry(wid).or_default().push(spec);
                }
            }
        }
        let mut batches: Vec<_> = batches.into_iter().collect();
        batches.sort_unstable_by_key(|(wid, _)| *wid);
        for (wid, sequences) in batches {
            // Work left queued for the worker's model: it waits for the next dispatch after
            // its next step frees slots.
            let backlog = self
                .workers
                .get(&wid)
                .is_some_and(|w| self.queues.get(&w.spec.id).is_some_and(|q| !q.is_empty()));
            self.effects.push(Effect::Send(
                wid,
                Kind::Dispatch(wpb::Dispatch { sequences, backlog }),
            ));
        }
    }

    /// The time left to a fresh request that could no longer finish before its client's
    /// deadline if it started now (`None`: it can, or nothing says otherwise).
    fn too_late_to_start(&self, now: Instant, id: u64) -> Option<Duration> {
        let t = self.requests.get(&id).filter(|t| !t.dispatched_once)?;
        match self.outlook(now, &t.req, t.generated.len(), false) {
            Outlook::Late { left, .. } => Some(left),
            _ => None,
        }
    }

    /// Whether worker `wid` takes new sequences now.
    pub(super) fn can_take(&self, wid: WorkerId, room: &dyn Fn(WorkerId) -> bool) -> bool {
        self.workers.get(&wid).is_some_and(|w| !w.leaving) && room(wid)
    }

    /// The worker of `model` with a free slot and room for `tokens` that request `id` goes to:
    /// the least loaded, or, with cache-aware placement, the one whose prefix cache holds the
    /// most of the request's leading blocks among those at most `--cache-balance-slack` more
    /// loaded than the least loaded (ties: the least loaded).
    fn pick_worker(
        &self,
        model: &str,
        tokens: usize,
        id: u64,
        room: &dyn Fn(WorkerId) -> bool,
    ) -> Option<WorkerId> {
        let fits: Vec<(WorkerId, &super::credits::Credits)> = self
            .workers
            .iter()
            .filter(|(&id, w)| w.spec.id == model && w.free_slots() > 0 && self.can_take(id, room))
            .filter(|(_, w)| w.free_blocks() >= w.blocks(tokens))
            .map(|(&id, w)| (id, w))
            .collect();
        let by_load = |(a_id, a): &(WorkerId, &super::credits::Credits),
                       (b_id, b): &(WorkerId, &super::credits::Credits)| {
            a.load()
                .total_cmp(&b.load())
                .then(b.free_blocks().cmp(&a.free_blocks()))
                .then(a_id.cmp(b_id))
        };
        let least = fits.iter().min_by(|a, b| by_load(a, b))?;
        let keys = self
            .requests
            .get(&id)
            .map_or(&[][..], |t| t.req.prefix_keys.as_slice());
        if !self.cfg.cache_aware || keys.is_empty() {
            return Some(least.0);
        }
        let ceiling = least.1.load() + self.cfg.cache_balance_slack;
        let (best, held) = fits
            .iter()
            .filter(|(_, w)| w.load() <= ceiling)
            .map(|c| (c, self.prefix.held(c.0, keys)))
            .max_by(|(a, ha), (b, hb)| ha.cmp(hb).then_with(|| by_load(b, a)))
            .unwrap_or((least, 0));
        self.metrics.prefix_blocks_matched.inc_by(held as u64);
        Some(best.0)
    }

    /// Marks `id` as running on `wid` and returns what to send.
    fn place(&mut self, id: u64, wid: WorkerId, now: Instant) -> Option<wpb::SequenceSpec> {
        let t = self.requests.get_mut(&id)?;
        let w = self.workers.get_mut(&wid)?;
        t.place = Place::Running(wid);
        if let Some(d) = t.resume_deadline.take() {
            self.deadlines.remove(&(d, id));
        }
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
            // The fair share's counter: the prompt is served once, at the first dispatch.
            let service = self.cfg.fair_input_weight * t.req.prompt_ids.len() as f64 / t.req.weight;
            if let Some(q) = self.queues.get_mut(&t.req.model) {
                q.charge(&t.req.tenant, service);
            }
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
        self.next_order += 1;
        let blocks = w.blocks(t.tokens() + 1) as usize;
        w.sent_one(
            id,
            blocks,
            Running {
                priority: t.req.priority,
                order: self.next_order,
                preempting: false,
            },
        );
        Some(wpb::SequenceSpec {
            sequence_id: id,
            prompt_ids: t.req.prompt_ids.clone(),
            sampling: Some(t.req.sampling.clone().into()),
            stopping: Some(t.req.stopping.clone().into()),
            logprobs: t.req.logprobs,
            top_logprobs: t.req.top_logprobs,
            priority: t.req.priority,
            generated_ids: t.generated.clone(),
            emitted_text_bytes: t.emitted_text_bytes,
            request_id: t.req.request_id.clone(),
            trace_context: HashMap::from([(TRACEPARENT.to_string(), traceparent.to_string())]),
            cache_salt: t.req.tenant.to_string(),
        })
    }
}
