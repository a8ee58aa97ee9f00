//! Preemption and resumption: a request that fits nowhere takes the slot and KV blocks of the
//! lowest-priority (newest first) running sequence below it; a sequence that comes back from
//! its worker unfinished (preempted, or its worker lost) goes back to the queue with what it
//! generated, until it has come back `max_resumes` times: then it fails with the reason
//! instead of cycling.

use std::time::Instant;

use openinfer_proto::worker::v1 as wpb;
use openinfer_proto::worker::v1::execute_request::Kind;

use super::admission::queue_span;
use super::state::{Effect, Place, State, WorkerId};
use crate::error::RouterError;

impl State {
    /// Preempts the lowest-priority (newest first) running sequence of `model` below
    /// `priority` whose slot and KV blocks make room for a request of `tokens`, and returns
    /// its worker. The caller dispatches the request there right away: the worker frees the
    /// victim before it admits what follows on the same stream, so the request starts in the
    /// worker's next step rather than one report later. Sequences placed after dispatch
    /// order `placed_before` (in the pass still being built) are not candidates.
    pub(super) fn preempt_for(
        &mut self,
        model: &str,
        priority: i32,
        tokens: usize,
        placed_before: u64,
        room: &dyn Fn(WorkerId) -> bool,
    ) -> Option<WorkerId> {
        let requests = &self.requests;
        let (wid, id, held) = self
            .workers
            .iter()
            .filter(|(&wid, w)| w.spec.id == model && self.can_take(wid, room))
            .flat_map(|(&wid, w)| {
                let need = w.blocks(tokens);
                w.running
                    .iter()
                    .filter(move |(_, r)| {
                        r.priority < priority && !r.preempting && r.order <= placed_before
                    })
                    .map(move |(&id, r)| {
                        let held = requests.get(&id).map_or(0, |t| w.blocks(t.tokens() + 1));
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
        self.effects.push(Effect::Send(
            wid,
            Kind::Preempt(wpb::Preempt {
                sequence_ids: vec![id],
            }),
        ));
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

    /// Puts a request that left its worker unfinished back in the queue, resume state kept;
    /// one that has come back too often fails instead.
    pub(super) fn requeue(&mut self, now: Instant, id: u64) {
        let Some(t) = self.requests.get_mut(&id) else {
            return;
        };
        // Still open only when the worker went away without a word about it.
        if let Some(span) = t.dispatch_span.take() {
            span.record("openinfer.finish", "worker_lost");
        }
        t.resumes += 1;
        if t.resumes > self.cfg.max_resumes {
            if let Some(t) = self.unqueue(id) {
                tracing::warn!(parent: &t.req.trace.span, resumes = t.resumes, "a request came back unfinished too often; failing it");
                t.output.fail(RouterError::Unavailable(format!(
                    "the request came back unfinished from its workers {} times (preempted, or its worker lost; the router's --max-resumes is {}): the cluster is overloaded or its workers keep failing; retry later",
                    t.resumes, self.cfg.max_resumes
                )));
            }
            return;
        }
        t.place = Place::Queued;
        let deadline = now + self.cfg.default_queue_timeout;
        if let Some(old) = t.resume_deadline.replace(deadline) {
            self.deadlines.remove(&(old, id));
        }
        self.deadlines.insert((deadline, id));
        let entry = t.entry();
        let queue = self.queues.entry(t.req.model.clone()).or_default();
        t.queue_span = Some(queue_span(
            &t.req,
            queue.ahead_of(t.req.priority, &t.req.tenant),
            true,
        ));
        queue.push_resumed(entry);
    }
}
