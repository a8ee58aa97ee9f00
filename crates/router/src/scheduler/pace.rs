//! How fast each worker steps, and what that says about deadlines: a request whose client
//! deadline cannot be met is refused at once (`RESOURCE_EXHAUSTED`) or leaves the queue
//! (`DEADLINE_EXCEEDED`) before it reaches a worker, instead of taking a slot only to be
//! cancelled at its deadline. Under overload that is the difference between serving at
//! capacity and serving nobody in time.
//!
//! The step time is a moving average of the intervals between a busy worker's step messages
//! (one per engine step). A request needs about one step for its prompt and one per output
//! token: `max_new_tokens` of them when it ignores eos, else no more than the model's typical
//! output length (a moving average of completed requests' lengths). When it could start is
//! estimated by handing the model's slots, as its running sequences free them, to the queued
//! requests ahead of it in order.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use super::state::State;
use crate::request::Request;

/// Weight of the newest completion in a model's typical output length.
const LENGTH_SMOOTHING: f64 = 0.1;

/// How long a model's outputs are when they may stop early (eos or a stop string): a moving
/// average of the lengths of completed requests that did not ignore eos.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct TypicalLength(Option<f64>);

impl TypicalLength {
    /// A request that could have stopped early ended after `tokens` tokens.
    pub fn observe(&mut self, tokens: usize) {
        let n = tokens as f64;
        self.0 = Some(self.0.map_or(n, |avg| avg + LENGTH_SMOOTHING * (n - avg)));
    }
}

/// Weight of the newest interval in the moving average.
const SMOOTHING: f64 = 0.2;

/// A worker's step time, learnt from the intervals between its step messages.
#[derive(Debug, Default, Clone)]
pub(super) struct StepClock {
    last: Option<Instant>,
    average: Option<f64>,
}

impl StepClock {
    /// A step message arrived at `now`; `busy`: sequences ran there since the last one (an
    /// interval that began idle measures the idle time, not a step).
    pub fn observe(&mut self, now: Instant, busy: bool) {
        if let (true, Some(last)) = (busy, self.last) {
            let dt = (now - last).as_secs_f64();
            self.average = Some(match self.average {
                None => dt,
                Some(avg) => avg + SMOOTHING * (dt - avg),
            });
        }
        self.last = Some(now);
    }

    /// The average step time, once one was seen.
    pub fn step(&self) -> Option<Duration> {
        self.average.map(Duration::from_secs_f64)
    }
}

/// Whether a request can be served before its client's deadline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Outlook {
    /// Nothing to go by yet (no step measured, or no deadline).
    Unknown,
    /// It can, if it starts by this moment.
    StartBy(Instant),
    /// It cannot: it needs `needs` and has `left` (less than `needs`, or not enough to also
    /// wait for the work ahead of it).
    Late { left: Duration, needs: Duration },
}

impl State {
    /// The model's step time: the mean over its workers that have measured one.
    pub(super) fn step_time(&self, model: &str) -> Option<Duration> {
        let steps: Vec<Duration> = self
            .workers
            .values()
            .filter(|w| w.spec.id == model && !w.leaving)
            .filter_map(|w| w.clock.step())
            .collect();
        (!steps.is_empty()).then(|| steps.iter().sum::<Duration>() / steps.len() as u32)
    }

    /// Steps `req` may still need with `generated` tokens so far: one for its prompt, one
    /// per token it is expected to generate: all of `max_new_tokens` when it ignores eos,
    /// else no more than its model's typical length (`None` until one was seen: a request
    /// that may stop early is not judged by a `max_new_tokens` it may never reach).
    fn steps_expected(&self, req: &Request, generated: usize) -> Option<u64> {
        let max_new = f64::from(req.stopping.max_new_tokens);
        let expected = if req.stopping.ignore_eos {
            max_new
        } else {
            let typical = self.typical_length.get(&req.model)?.0?;
            typical.min(max_new)
        };
        Some((expected - generated as f64).max(0.0).ceil() as u64 + 1)
    }

    /// Steps a live request may still need; when nothing says how long its output will be,
    /// all of its `max_new_tokens`.
    fn steps_needed(&self, id: u64) -> u64 {
        self.requests.get(&id).map_or(1, |t| {
            let generated = t.generated.len();
            self.steps_expected(&t.req, generated).unwrap_or_else(|| {
                u64::from(t.req.stopping.max_new_tokens).saturating_sub(generated as u64) + 1
            })
        })
    }

    /// Whether `req`, with `generated` tokens so far, can be served in time if it starts now
    /// (`wait_for_queue` false: it is being placed), or after the work ahead of it (true: it
    /// is being admitted).
    pub(super) fn outlook(
        &self,
        now: Instant,
        req: &Request,
        generated: usize,
        wait_for_queue: bool,
    ) -> Outlook {
        if !self.cfg.deadline_admission {
            return Outlook::Unknown;
        }
        let (Some(deadline), Some(step)) = (req.client_deadline, self.step_time(&req.model)) else {
            return Outlook::Unknown;
        };
        let Some(steps) = self.steps_expected(req, generated) else {
            return Outlook::Unknown;
        };
        let steps = steps.min(u64::from(u32::MAX)) as u32;
        let needs = step.saturating_mul(steps);
        let left = deadline.saturating_duration_since(now);
        let late = Outlook::Late { left, needs };
        let Some(spare) = left.checked_sub(needs) else {
            return late;
        };
        if wait_for_queue {
            let spare_steps = (spare.as_secs_f64() / step.as_secs_f64()) as u64;
            if !self.starts_within(&req.model, req.priority, &req.tenant, spare_steps) {
                return late;
            }
        }
        Outlook::StartBy(now + spare)
    }

    /// Whether a new request of `priority` for `model` would find a free slot within `steps`:
    /// slots go to the running sequences until they end, then to the queued requests ahead
    /// of it in turn.
    fn starts_within(&self, model: &str, priority: i32, tenant: &str, steps: u64) -> bool {
        // When each slot of the model frees, in steps from now.
        let mut slots: BinaryHeap<Reverse<u64>> = BinaryHeap::new();
        for w in self.workers.values() {
            if w.spec.id != model || w.leaving {
                continue;
            }
            for &running in w.running.keys() {
                slots.push(Reverse(self.steps_needed(running)));
            }
            let max = w.capacity.max_running_sequences as usize;
            for _ in w.running.len()..max {
                slots.push(Reverse(0));
            }
        }
        let Some(queue) = self.queues.get(model) else {
            return false;
        };
        for ahead in queue.ahead(priority, tenant) {
            match slots.pop() {
                Some(Reverse(free)) if free <= steps => {
                    slots.push(Reverse(free + self.steps_needed(ahead)))
                }
                _ => return false,
            }
        }
        slots.peek().is_some_and(|&Reverse(free)| free <= steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_step_time_is_a_moving_average_of_busy_intervals() {
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        let mut c = StepClock::default();
        assert_eq!(c.step(), None);
        c.observe(t, false);
        c.observe(ms(20), true);
        assert_eq!(c.step(), Some(Duration::from_millis(20)));
        // An interval that began idle says nothing about steps.
        c.observe(ms(5_000), false);
        assert_eq!(c.step(), Some(Duration::from_millis(20)));
        c.observe(ms(5_030), true);
        let step = c.step().unwrap().as_secs_f64();
        assert!((step - 0.022).abs() < 1e-9, "{step}");
    }
}
