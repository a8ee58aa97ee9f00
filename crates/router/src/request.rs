//! A request after validation, and the buffer its output flows through from the scheduler to
//! the client's stream.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use openinfer_core::{FinishReason, SamplingParams, StoppingParams};
use openinfer_proto::worker::v1 as wpb;
use prometheus::IntGauge;
use tokio::sync::Notify;

use crate::error::RouterError;
use crate::observe::RequestTrace;

/// A validated request, ready for admission.
#[derive(Debug, Clone)]
pub struct Request {
    /// Router-wide id; also the sequence id on the worker.
    pub id: u64,
    /// The client's request id (or one the router made).
    pub request_id: String,
    /// The model id.
    pub model: String,
    /// Prompt token ids.
    pub prompt_ids: Vec<u32>,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Stopping parameters.
    pub stopping: StoppingParams,
    /// Return log-probabilities.
    pub logprobs: bool,
    /// Alternatives per position.
    pub top_logprobs: u32,
    /// Higher first; negative is sheddable.
    pub priority: i32,
    /// When the router received it.
    pub arrived: Instant,
    /// When it must have reached a worker.
    pub deadline: Instant,
    /// When its client must have the answer (from `grpc-timeout`, less a margin), if the
    /// client set a deadline.
    pub client_deadline: Option<Instant>,
    /// Its span and trace id.
    pub trace: RequestTrace,
    /// Its tenant's name.
    pub tenant: Arc<str>,
    /// Its tenant's weight in the fair share of its priority level.
    pub weight: f64,
    /// The prefix-cache keys of its prompt's full blocks (salted with its tenant): placement
    /// prefers a worker that holds them.
    pub prefix_keys: Vec<openinfer_core::prefix::BlockKey>,
}

/// New output since the client last looked.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Delta {
    /// New token ids.
    pub token_ids: Vec<u32>,
    /// New text.
    pub text: String,
    /// Log-probabilities of the new tokens (when asked for).
    pub logprobs: Vec<wpb::TokenLogprob>,
}

impl Delta {
    fn is_empty(&self) -> bool {
        self.token_ids.is_empty() && self.text.is_empty()
    }
}

/// How a request ended.
#[derive(Debug, Clone)]
pub enum End {
    /// It finished normally.
    Finished(Summary),
    /// It failed.
    Failed(RouterError),
}

/// The last facts of a finished request.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Why it stopped.
    pub reason: FinishReason,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Prompt tokens whose KV came from the worker's prefix cache.
    pub cached_prompt_tokens: u32,
    /// Seconds from arrival to the first dispatch.
    pub queue_time: f64,
    /// Seconds from arrival to the first token.
    pub time_to_first_token: f64,
    /// Seconds from arrival to the end.
    pub total_time: f64,
}

/// A request's token counts at its end.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tokens {
    /// Prompt tokens.
    pub prompt: u32,
    /// Generated tokens.
    pub completion: u32,
    /// Prompt tokens the prefix cache held.
    pub cached_prompt: u32,
}

/// What the client's stream gets next.
#[derive(Debug)]
pub enum Next {
    /// More output.
    Delta(Delta),
    /// The end, with whatever output came just before it.
    End(Delta, End),
}

#[derive(Default)]
struct State {
    delta: Delta,
    end: Option<End>,
    /// Times an end was given (the first one counts).
    ends: u32,
    dispatched: Option<Instant>,
    first_token: Option<Instant>,
    /// Bytes of `delta`, as counted in the router-wide unread gauge.
    held: i64,
    /// Tokens generated so far (read or not).
    generated: u64,
}

/// The output buffer of one request: the scheduler writes, the client's stream reads. A slow
/// client gets coalesced deltas; the buffer never holds more than the request's own output,
/// which `max_new_tokens` bounds. What it holds counts in a router-wide gauge of unread output
/// (which admission bounds) until the client reads it or the buffer is dropped.
pub struct Output {
    arrived: Instant,
    state: Mutex<State>,
    notify: Notify,
    unread: IntGauge,
}

/// The bytes a token event adds to a buffer: ids, text and log-probabilities.
fn event_bytes(ev: &wpb::TokenEvent) -> i64 {
    let logprobs: usize = ev.logprobs.iter().map(|l| 8 + 8 * l.top.len()).sum();
    (4 * ev.token_ids.len() + ev.text.len() + logprobs) as i64
}

impl Output {
    /// An empty buffer for a request that arrived at `arrived`, counting what it holds in
    /// `unread`.
    pub fn new(arrived: Instant, unread: IntGauge) -> Arc<Self> {
        Arc::new(Output {
            arrived,
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            unread,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The request went to a worker (the first time counts for `queue_time`).
    pub fn dispatched(&self, now: Instant) {
        self.lock().dispatched.get_or_insert(now);
    }

    /// Appends a worker's token event.
    pub fn push(&self, ev: wpb::TokenEvent, now: Instant) {
        let bytes = event_bytes(&ev);
        let mut s = self.lock();
        if !ev.token_ids.is_empty() {
            s.first_token.get_or_insert(now);
        }
        s.held += bytes;
        s.generated += ev.token_ids.len() as u64;
        self.unread.add(bytes);
        s.delta.token_ids.extend(ev.token_ids);
        s.delta.text.push_str(&ev.text);
        s.delta.logprobs.extend(ev.logprobs);
        drop(s);
        self.notify.notify_one();
    }

    /// Tokens generated for the request so far.
    pub fn generated(&self) -> u64 {
        self.lock().generated
    }

    /// Ends the request. Later calls change nothing.
    pub fn finish(&self, reason: FinishReason, tokens: Tokens) {
        let now = Instant::now();
        let mut s = self.lock();
        let secs = |t: Option<Instant>| t.map_or(0.0, |t| (t - self.arrived).as_secs_f64());
        let summary = Summary {
            reason,
            prompt_tokens: tokens.prompt,
            completion_tokens: tokens.completion,
            cached_prompt_tokens: tokens.cached_prompt,
            queue_time: secs(s.dispatched),
            time_to_first_token: secs(s.first_token),
            total_time: (now - self.arrived).as_secs_f64(),
        };
        s.end.get_or_insert(End::Finished(summary));
        s.ends += 1;
        drop(s);
        self.notify.notify_one();
    }

    /// Fails the request. Later calls change nothing.
    pub fn fail(&self, e: RouterError) {
        let mut s = self.lock();
        s.end.get_or_insert(End::Failed(e));
        s.ends += 1;
        drop(s);
        self.notify.notify_one();
    }

    /// For tests: how it ended (without taking it), how many times an end was given, and
    /// the token ids not yet read.
    #[cfg(test)]
    pub(crate) fn peek(&self) -> (Option<Result<FinishReason, RouterError>>, u32, Vec<u32>) {
        let s = self.lock();
        let end = s.end.as_ref().map(|e| match e {
            End::Finished(summary) => Ok(summary.reason),
            End::Failed(e) => Err(e.clone()),
        });
        (end, s.ends, s.delta.token_ids.clone())
    }

    /// Waits for new output or the end.
    pub async fn next(&self) -> Next {
        loop {
            {
                let mut s = self.lock();
                if let Some(end) = s.end.take() {
                    self.unread.sub(std::mem::take(&mut s.held));
                    return Next::End(std::mem::take(&mut s.delta), end);
                }
                if !s.delta.is_empty() {
                    self.unread.sub(std::mem::take(&mut s.held));
                    return Next::Delta(std::mem::take(&mut s.delta));
                }
            }
            // One reader: a notification sent since the check above is kept as a permit.
            self.notify.notified().await;
        }
    }
}

impl Drop for Output {
    /// A buffer nobody will read (its client went away) stops counting at once.
    fn drop(&mut self) {
        let held = self.lock().held;
        self.unread.sub(held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(ids: &[u32], text: &str) -> wpb::TokenEvent {
        wpb::TokenEvent {
            token_ids: ids.to_vec(),
            text: text.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn unread_output_counts_until_read_or_dropped() {
        let unread = IntGauge::new("unread", "unread").unwrap();
        let a = Output::new(Instant::now(), unread.clone());
        let b = Output::new(Instant::now(), unread.clone());
        a.push(event(&[1, 2], "ab"), Instant::now());
        b.push(event(&[3], "xyz"), Instant::now());
        assert_eq!(unread.get(), 10 + 7);
        let Next::Delta(d) = a.next().await else {
            panic!("a delta")
        };
        assert_eq!(d.token_ids, [1, 2]);
        assert_eq!(unread.get(), 7, "what a client read no longer counts");
        a.push(event(&[4], ""), Instant::now());
        a.finish(
            FinishReason::Length,
            Tokens {
                prompt: 1,
                completion: 3,
                cached_prompt: 0,
            },
        );
        assert!(matches!(a.next().await, Next::End(..)));
        assert_eq!(unread.get(), 7);
        drop(b);
        assert_eq!(unread.get(), 0, "a buffer nobody will read stops counting");
    }
}
