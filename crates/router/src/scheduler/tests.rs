//! The scheduler's policy, driven through [`State`] with no process, socket or sleep: the
//! inputs are calls, time is a value, and what must happen is read from the effects and from
//! the requests' outputs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use openinfer_core::FinishReason;
use openinfer_proto::worker::v1 as wpb;
use openinfer_proto::worker::v1::execute_request::Kind;
use openinfer_telemetry::TraceId;

use super::{Effect, NewWorker, State, WorkerId};
use crate::config::RouterConfig;
use crate::error::RouterError;
use crate::metrics::RouterMetrics;
use crate::models::{ModelSpec, ModelTable};
use crate::observe::RequestTrace;
use crate::request::{Output, Request};

/// A model spec with a one-word tokenizer (the scheduler never tokenizes).
pub(crate) fn spec(model: &str, block_size: u32) -> Arc<ModelSpec> {
    let info = wpb::InfoResponse {
        model: model.into(),
        vocab_size: 2,
        max_model_len: 4096,
        kv: Some(wpb::KvGeometry {
            block_size,
            ..Default::default()
        }),
        ..Default::default()
    };
    let tok = wpb::TokenizerResponse {
        tokenizer_json: r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,
            "decoder":null,"model":{"type":"WordLevel","vocab":{"<unk>":0,"a":1},
            "unk_token":"<unk>"}}"#
            .into(),
        ..Default::default()
    };
    Arc::new(ModelSpec::new(&info, &tok).unwrap())
}

/// A state, a clock, and requests' outputs by id.
pub(crate) struct Harness {
    pub state: State,
    pub t0: Instant,
    pub outputs: std::collections::HashMap<u64, Arc<Output>>,
    next_id: u64,
    /// The tenant and weight of the requests submitted next.
    pub tenant: Arc<str>,
    pub weight: f64,
    /// The prefix-cache keys of the requests submitted next.
    pub prefix_keys: Vec<openinfer_core::prefix::BlockKey>,
}

pub(crate) fn harness(cfg: RouterConfig) -> Harness {
    let metrics = Arc::new(RouterMetrics::new(&prometheus::Registry::new()).unwrap());
    Harness {
        state: State::new(Arc::new(cfg), ModelTable::default(), metrics),
        t0: Instant::now(),
        outputs: Default::default(),
        next_id: 1,
        tenant: crate::tenants::ANONYMOUS.into(),
        weight: 1.0,
        prefix_keys: Vec::new(),
    }
}

/// Every link has room.
pub(crate) fn open(_: WorkerId) -> bool {
    true
}

impl Harness {
    pub fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    /// Connects worker `id` of model `m` with `slots` sequence slots and `blocks` free KV
    /// blocks of 16 tokens.
    pub fn worker(&mut self, id: u64, m: &str, slots: u32, blocks: u32) {
        let capacity = wpb::CapacityReport {
            total_blocks: blocks,
            free_blocks: blocks,
            block_size: 16,
            max_running_sequences: slots,
            free_sequence_slots: slots,
            ..Default::default()
        };
        self.state.worker_up(
            self.t0,
            NewWorker {
                id: WorkerId(id),
                addr: format!("w{id}"),
                spec: spec(m, 16),
                capacity,
            },
        );
    }

    /// Submits a request of `prompt` tokens for model `m` at `ms`, with a queue deadline
    /// `deadline_ms` after it arrived.
    pub fn submit(
        &mut self,
        ms: u64,
        m: &str,
        priority: i32,
        prompt: usize,
        max_new: u32,
        deadline_ms: u64,
    ) -> Result<u64, RouterError> {
        self.submit_with_client_deadline(ms, m, priority, prompt, max_new, deadline_ms, None, false)
    }

    /// [`Harness::submit`] with a client deadline `client_ms` after it arrived, ignoring eos
    /// or not.
    #[allow(clippy::too_many_arguments)]
    pub fn submit_with_client_deadline(
        &mut self,
        ms: u64,
        m: &str,
        priority: i32,
        prompt: usize,
        max_new: u32,
        deadline_ms: u64,
        client_ms: Option<u64>,
        ignore_eos: bool,
    ) -> Result<u64, RouterError> {
        let id = self.next_id;
        self.next_id += 1;
        let now = self.at(ms);
        let req = Request {
            id,
            request_id: format!("r{id}"),
            model: m.into(),
            prompt_ids: vec![1; prompt],
            sampling: Default::default(),
            stopping: openinfer_core::StoppingParams {
                max_new_tokens: max_new,
                ignore_eos,
                ..Default::default()
            },
            logprobs: false,
            top_logprobs: 0,
            priority,
            arrived: now,
            deadline: now + Duration::from_millis(deadline_ms),
            client_deadline: client_ms.map(|c| now + Duration::from_millis(c)),
            trace: RequestTrace {
                span: tracing::Span::none(),
                trace_id: TraceId::random(),
            },
            tenant: self.tenant.clone(),
            weight: self.weight,
            prefix_keys: self.prefix_keys.clone(),
        };
        let output = Output::new(now, prometheus::IntGauge::new("unread", "unread").unwrap());
        self.outputs.insert(id, output.clone());
        self.state.submit(now, req, output).map(|()| id)
    }

    pub fn tick(&mut self, ms: u64) -> Vec<Effect> {
        self.state.tick(self.at(ms), &open)
    }

    /// The sequence ids dispatched in `effects`, by worker, in order.
    pub fn dispatched(effects: &[Effect]) -> Vec<(u64, u64)> {
        effects
            .iter()
            .flat_map(|e| match e {
                Effect::Send(w, Kind::Dispatch(d)) => {
                    d.sequences.iter().map(|s| (w.0, s.sequence_id)).collect()
                }
                _ => Vec::new(),
            })
            .collect()
    }

    /// A step message from worker `w`: tokens per sequence, ends, and its capacity.
    pub fn step(
        &mut self,
        ms: u64,
        w: u64,
        tokens: &[(u64, u32)],
        finished: &[(u64, wpb::FinishReason)],
        capacity: Option<wpb::CapacityReport>,
    ) -> Vec<Effect> {
        let resp = wpb::ExecuteResponse {
            tokens: tokens
                .iter()
                .map(|&(id, n)| wpb::TokenEvent {
                    sequence_id: id,
                    token_ids: vec![1; n as usize],
                    ..Default::default()
                })
                .collect(),
            finished: finished
                .iter()
                .map(|&(id, r)| wpb::SequenceFinished {
                    sequence_id: id,
                    reason: r as i32,
                    ..Default::default()
                })
                .collect(),
            capacity,
            ..Default::default()
        };
        self.state.worker_event(self.at(ms), WorkerId(w), resp)
    }

    /// A capacity report of worker `w` with `slots` free slots, `blocks` free blocks, and
    /// `acked` sequences taken in on this connection.
    pub fn capacity(slots: u32, blocks: u32, acked: u64) -> wpb::CapacityReport {
        wpb::CapacityReport {
            total_blocks: 1000,
            free_blocks: blocks,
            block_size: 16,
            max_running_sequences: 8,
            free_sequence_slots: slots,
            dispatched: acked,
            ..Default::default()
        }
    }

    /// How request `id` ended: its finish reason or error.
    pub fn end(&self, id: u64) -> Option<Result<FinishReason, RouterError>> {
        self.outputs[&id].peek().0
    }

    pub fn tokens(&self, id: u64) -> Vec<u32> {
        self.outputs[&id].peek().2
    }
}

fn cfg() -> RouterConfig {
    RouterConfig {
        aging_step: None,
        ..RouterConfig::default()
    }
}

const LONG: u64 = 60_000;

#[test]
fn higher_priorities_go_first_and_a_level_is_first_in_first_out() {
    let mut h = harness(cfg());
    h.worker(1, "m", 1, 1000);
    let low = h.submit(0, "m", 0, 10, 8, LONG).unwrap();
    let high_a = h.submit(1, "m", 5, 10, 8, LONG).unwrap();
    let high_b = h.submit(2, "m", 5, 10, 8, LONG).unwrap();
    // One slot: the first high-priority request, then (after it ends) the second, then low.
    assert_eq!(Harness::dispatched(&h.tick(3)), vec![(1, high_a)]);
    h.step(
        4,
        1,
        &[(high_a, 8)],
        &[(high_a, wpb::FinishReason::Length)],
        Some(Harness::capacity(1, 1000, 1)),
    );
    assert!(matches!(h.end(high_a), Some(Ok(FinishReason::Length))));
    assert_eq!(Harness::dispatched(&h.tick(5)), vec![(1, high_b)]);
    h.step(
        6,
        1,
        &[],
        &[(high_b, wpb::FinishReason::Eos)],
        Some(Harness::capacity(1, 1000, 2)),
    );
    assert_eq!(Harness::dispatched(&h.tick(7)), vec![(1, low)]);
}

#[test]
fn aging_lets_a_long_wait_overtake_newer_higher_priorities() {
    let mut h = harness(RouterConfig {
        aging_step: Some(Duration::from_secs(1)),
        preemption: false,
        ..RouterConfig::default()
    });
    h.worker(1, "m", 1, 1000);
    let old = h.submit(0, "m", 0, 10, 8, LONG).unwrap();
    let newer = h.submit(3_000, "m", 2, 10, 8, LONG).unwrap();
    // At 3.5 s the old request has aged by 3 levels (0 + 3 > 2 + 0): it goes first.
    assert_eq!(Harness::dispatched(&h.tick(3_500)), vec![(1, old)]);
    h.step(
        3_600,
        1,
        &[],
        &[(old, wpb::FinishReason::Eos)],
        Some(Harness::capacity(1, 1000, 1)),
    );
    assert_eq!(Harness::dispatched(&h.tick(3_700)), vec![(1, newer)]);
}

#[test]
fn sheddable_work_gets_a_share_of_the_queue_and_is_shed_first() {
    let mut h = harness(RouterConfig {
        max_queued_requests: 4,
        sheddable_share: 0.5,
        ..cfg()
    });
    h.worker(1, "m", 1, 1000);
    let shed_a = h.submit(0, "m", -1, 10, 8, LONG).unwrap();
    let shed_b = h.submit(1, "m", -1, 10, 8, LONG).unwrap();
    // Negative priorities have half the queue: the third is refused at once.
    let refused = h.submit(2, "m", -1, 10, 8, LONG).unwrap_err();
    assert!(matches!(refused, RouterError::QueueFull(..)), "{refused}");
    h.submit(3, "m", 0, 10, 8, LONG).unwrap();
    h.submit(4, "m", 0, 10, 8, LONG).unwrap();
    // The queue is full: a normal request sheds the newest sheddable one.
    h.submit(5, "m", 0, 10, 8, LONG).unwrap();
    assert!(matches!(
        h.end(shed_b),
        Some(Err(RouterError::QueueFull(..)))
    ));
    assert!(h.end(shed_a).is_none());
    // With nothing left to shed, a full queue refuses.
    h.submit(6, "m", 0, 10, 8, LONG).unwrap();
    assert!(matches!(
        h.end(shed_a),
        Some(Err(RouterError::QueueFull(..)))
    ));
    assert!(h.submit(7, "m", 0, 10, 8, LONG).is_err());
    assert_eq!(h.state.live(), 4);
}

#[test]
fn one_tenant_filling_the_queue_cannot_lock_another_out() {
    let mut h = harness(RouterConfig {
        max_queue_per_priority: 4,
        ..cfg()
    });
    h.worker(1, "m", 1, 1000);
    h.tenant = "heavy".into();
    let running = h.submit(0, "m", 0, 10, 8, LONG).unwrap();
    h.tick(1);
    let heavy: Vec<u64> = (0..4)
        .map(|i| h.submit(2 + i, "m", 0, 10, 8, LONG).unwrap())
        .collect();
    assert!(
        h.submit(10, "m", 0, 10, 8, LONG).is_err(),
        "heavy's own level is full"
    );
    // A light tenant's request takes the place of heavy's newest, and runs next.
    h.tenant = "light".into();
    let light = h.submit(11, "m", 0, 10, 8, LONG).unwrap();
    let Some(Err(RouterError::QueueFull(why, _))) = h.end(heavy[3]) else {
        panic!("heavy's newest was not shed")
    };
    assert!(why.contains("tenant"), "{why}");
    h.step(
        15,
        1,
        &[(running, 8)],
        &[(running, wpb::FinishReason::Length)],
        Some(Harness::capacity(1, 1000, 1)),
    );
    assert_eq!(Harness::dispatched(&h.tick(20)), vec![(1, light)]);
    // Without fair shares the level is first come, first served: the light one is refused.
    let mut h = harness(RouterConfig {
        max_queue_per_priority: 2,
        fair_share: false,
        ..cfg()
    });
    h.worker(1, "m", 1, 1000);
    h.tenant = "heavy".into();
    for i in 0..3 {
        h.submit(i, "m", 0, 10, 8, LONG).unwrap();
        h.tick(i);
    }
    h.tenant = "light".into();
    assert!(h.submit(10, "m", 0, 10, 8, LONG).is_err());
}

#[test]
fn a_request_that_reaches_no_worker_by_its_deadline_leaves_the_queue() {
    let mut h = harness(cfg());
    h.worker(1, "m", 1, 1000);
    let running = h.submit(0, "m", 0, 10, 8, LONG).unwrap();
    let waiting = h.submit(0, "m", 0, 10, 8, 100).unwrap();
    assert_eq!(Harness::dispatched(&h.tick(1)), vec![(1, running)]);
    assert_eq!(h.state.next_deadline(), Some(h.at(100)));
    assert!(h.tick(99).is_empty() && h.end(waiting).is_none());
    h.tick(100);
    assert!(matches!(
        h.end(waiting),
        Some(Err(RouterError::QueueTimeout(_)))
    ));
    // A request already on a worker is not bound by its queue deadline.
    h.tick(LONG + 1);
    assert!(h.end(running).is_none());
}

#[test]
fn requests_that_cannot_finish_before_their_client_deadline_never_take_a_slot() {
    let mut h = harness(cfg());
    h.worker(1, "m", 1, 1000);
    let running = h.submit(0, "m", 0, 10, 8, LONG).unwrap();
    assert_eq!(Harness::dispatched(&h.tick(1)), vec![(1, running)]);
    // Until a step was timed nothing is refused; two busy 20 ms steps teach the pace.
    for (ms, acked) in [(20, 1), (40, 1)] {
        let one_slot = wpb::CapacityReport {
            max_running_sequences: 1,
            ..Harness::capacity(0, 900, acked)
        };
        h.step(ms, 1, &[(running, 1)], &[], Some(one_slot));
    }
    // These ignore eos: they will generate all 8 tokens.
    let deadline = |h: &mut Harness, client_ms| {
        h.submit_with_client_deadline(40, "m", 0, 10, 8, LONG, Some(client_ms), true)
    };
    // 8 tokens take 9 steps, 180 ms: 100 ms cannot do.
    assert!(matches!(
        deadline(&mut h, 100),
        Err(RouterError::QueueFull(..))
    ));
    // 400 ms can, after the running one's 7 steps; it may wait until 40 + 400 - 180 ms.
    let fits = deadline(&mut h, 400).unwrap();
    assert_eq!(h.state.next_deadline(), Some(h.at(260)));
    // A third would start only after that one's 9 steps: refused.
    assert!(matches!(
        deadline(&mut h, 400),
        Err(RouterError::QueueFull(..))
    ));
    // The worker stalls: the queued one leaves with DEADLINE_EXCEEDED when it no longer can
    // finish, not at its client's deadline, and never reaches the worker.
    assert!(h.end(fits).is_none());
    assert!(Harness::dispatched(&h.tick(260)).is_empty());
    match h.end(fits) {
        Some(Err(e @ RouterError::TooLateToStart(left))) => {
            assert_eq!(left, Duration::from_millis(180));
            assert_eq!(
                openinfer_core::ErrorCode::code(&e),
                openinfer_core::Code::DeadlineExceeded
            );
        }
        other => panic!("{other:?}"),
    }
    // Work the worker did for a request that then did not complete counts as wasted.
    let wasted = h.state.metrics.wasted_tokens.with_label_values(&["m"]);
    assert_eq!(wasted.get(), 0);
    h.state.cancel(h.at(300), running);
    assert_eq!(wasted.get(), 2);
}

#[test]
fn a_request_that_may_stop_early_is_judged_by_the_typical_output_not_its_max_new_tokens() {
    let mut h = harness(cfg());
    h.worker(1, "m", 4, 1000);
    let may_stop = |h: &mut Harness, ms| {
        h.submit_with_client_deadline(ms, "m", 0, 10, 1000, LONG, Some(100), false)
    };
    // Until an output length was seen, nothing says it cannot make it.
    let first = may_stop(&mut h, 0).unwrap();
    assert_eq!(Harness::dispatched(&h.tick(1)), vec![(1, first)]);
    let four = wpb::CapacityReport {
        max_running_sequences: 4,
        ..Harness::capacity(3, 900, 1)
    };
    h.step(20, 1, &[(first, 1)], &[], Some(four));
    h.step(
        40,
        1,
        &[(first, 1)],
        &[(first, wpb::FinishReason::Eos)],
        Some(four),
    );
    // Its outputs end after 2 tokens (3 steps, 60 ms at 20 ms a step): 100 ms will do,
    // although 1,000 tokens would take 20 s...
    assert!(may_stop(&mut h, 50).is_ok());
    // ...while one that ignores eos is held to all of them.
    assert!(matches!(
        h.submit_with_client_deadline(50, "m", 0, 10, 1000, LONG, Some(100), true),
        Err(RouterError::QueueFull(..))
    ));
}

#[test]
fn dispatches_stay_within_credits_until_the_worker_acknowledges_them() {
    let mut h = harness(cfg());
    // 2 slots, 10 blocks of 16 tokens: a 40-token prompt needs 3 blocks.
    h.worker(1, "m", 2, 10);
    let ids: Vec<u64> = (0..4)
        .map(|i| h.submit(i, "m", 0, 40, 8, LONG).unwrap())
        .collect();
    assert_eq!(
        Harness::dispatched(&h.tick(5)),
        vec![(1, ids[0]), (1, ids[1])]
    );
    // Nothing more until the worker reports: its credits are spent.
    assert!(Harness::dispatched(&h.tick(6)).is_empty());
    // It took both (acked 2) and finished one: one slot and 7 blocks free.
    h.step(
        7,
        1,
        &[],
        &[(ids[0], wpb::FinishReason::Eos)],
        Some(Harness::capacity(1, 7, 2)),
    );
    assert_eq!(Harness::dispatched(&h.tick(8)), vec![(1, ids[2])]);
    assert!(Harness::dispatched(&h.tick(9)).is_empty());
}

#[test]
fn preemption_takes_the_lowest_priority_newest_sequence_and_dispatches_right_behind_it() {
    let mut h = harness(cfg());
    h.worker(1, "m", 3, 1000);
    let a = h.submit(0, "m", 1, 10, 8, LONG).unwrap();
    let b = h.submit(1, "m", 0, 10, 8, LONG).unwrap();
    let c = h.submit(2, "m", 0, 10, 8, LONG).unwrap();
    assert_eq!(Harness::dispatched(&h.tick(3)).len(), 3);
    h.step(
        4,
        1,
        &[(a, 1), (b, 1), (c, 1)],
        &[],
        Some(Harness::capacity(0, 997, 3)),
    );
    let urgent = h.submit(5, "m", 9, 10, 8, LONG).unwrap();
    let effects = h.tick(6);
    // The victim is c: lowest priority (0), newest of those; the preempt goes first.
    assert_eq!(
        effects,
        vec![
            Effect::Send(
                WorkerId(1),
                Kind::Preempt(wpb::Preempt {
                    sequence_ids: vec![c]
                })
            ),
            effects[1].clone(),
        ]
    );
    assert_eq!(Harness::dispatched(&effects), vec![(1, urgent)]);
    // The worker reports c preempted: it goes back to the queue with its token, and is
    // dispatched again (with it) once there is room.
    h.step(
        7,
        1,
        &[],
        &[(c, wpb::FinishReason::Preempted)],
        Some(Harness::capacity(0, 997, 4)),
    );
    assert!(h.end(c).is_none());
    h.step(
        8,
        1,
        &[],
        &[(a, wpb::FinishReason::Eos)],
        Some(Harness::capacity(1, 998, 4)),
    );
    let again = h.tick(9);
    let spec = again
        .iter()
        .find_map(|e| match e {
            Effect::Send(_, Kind::Dispatch(d)) => {
                d.sequences.iter().find(|s| s.sequence_id == c).cloned()
            }
            _ => None,
        })
        .expect("the preempted sequence is dispatched again");
    assert_eq!(spec.generated_ids, vec![1]);
}

#[test]
fn a_worker_lost_mid_stream_hands_its_sequences_to_another_with_their_tokens() {
    let mut h = harness(cfg());
    h.worker(1, "m", 4, 1000);
    let id = h.submit(0, "m", 0, 10, 8, LONG).unwrap();
    assert_eq!(Harness::dispatched(&h.tick(1)), vec![(1, id)]);
    h.step(2, 1, &[(id, 3)], &[], Some(Harness::capacity(3, 999, 1)));
    h.state.worker_down(h.at(3), WorkerId(1));
    // No worker: it waits (the client sees nothing of this).
    assert!(Harness::dispatched(&h.tick(4)).is_empty());
    h.worker(2, "m", 4, 1000);
    let effects = h.tick(5);
    let Some(Effect::Send(WorkerId(2), Kind::Dispatch(d))) = effects.first() else {
        panic!("{effects:?}")
    };
    assert_eq!(d.sequences[0].generated_ids, vec![1, 1, 1]);
    h.step(
        6,
        2,
        &[(id, 5)],
        &[(id, wpb::FinishReason::Length)],
        Some(Harness::capacity(4, 1000, 1)),
    );
    assert!(matches!(h.end(id), Some(Ok(FinishReason::Length))));
    assert_eq!(h.tokens(id).len(), 8, "no gap and no repeat");
}

/// The sequences of `w` and the Disconnect effect among `effects`.
fn disconnected(effects: &[Effect], w: u64) -> Option<String> {
    effects.iter().find_map(|e| match e {
        Effect::Disconnect(WorkerId(x), why) if *x == w => Some(why.clone()),
        _ => None,
    })
}

#[test]
fn a_worker_that_breaks_the_protocol_is_disconnected_and_its_work_resumes_elsewhere() {
    /// A message from worker 1, given the id of the sequence it runs.
    type Breach = fn(&mut Harness, u64) -> Vec<Effect>;
    let cases: [(&str, Breach); 4] = [
        ("more acknowledgements than sequences sent", |h, _| {
            h.step(2, 1, &[], &[], Some(Harness::capacity(4, 1000, u64::MAX)))
        }),
        ("tokens beyond max_new_tokens", |h, id| {
            h.step(2, 1, &[(id, 9)], &[], None)
        }),
        ("tokens for a sequence it was never given", |h, _| {
            h.step(2, 1, &[(999, 1)], &[], None)
        }),
        ("the end of a sequence it was never given", |h, _| {
            h.step(2, 1, &[], &[(999, wpb::FinishReason::Eos)], None)
        }),
    ];
    for (what, bad) in cases {
        let mut h = harness(cfg());
        h.worker(1, "m", 4, 1000);
        h.worker(2, "m", 4, 1000);
        let id = h.submit(0, "m", 0, 10, 8, LONG).unwrap();
        let to = Harness::dispatched(&h.tick(1))[0].0;
        if to == 2 {
            // Keep the request on worker 1 for the case: move it there.
            h.state.worker_down(h.at(1), WorkerId(2));
            h.state.worker_down(h.at(1), WorkerId(1));
            h.worker(1, "m", 4, 1000);
            assert_eq!(Harness::dispatched(&h.tick(1)), vec![(1, id)]);
            h.worker(2, "m", 4, 1000);
        }
        let effects = bad(&mut h, id);
        let why = disconnected(&effects, 1).unwrap_or_else(|| panic!("{what}: not disconnected"));
        assert!(!why.is_empty(), "{what}");
        assert!(h.end(id).is_none(), "{what}: the client sees nothing");
        assert_eq!(Harness::dispatched(&h.tick(3)), vec![(2, id)], "{what}");
        // Whatever the gone worker says later is ignored.
        assert!(h.step(4, 1, &[(id, 1)], &[], None).is_empty(), "{what}");
    }
}

#[test]
fn a_sequence_that_keeps_coming_back_fails_with_the_reason_instead_of_cycling() {
    let mut h = harness(RouterConfig {
        max_resumes: 2,
        ..cfg()
    });
    h.worker(1, "m", 4, 1000);
    let id = h.submit(0, "m", 0, 10, 8, LONG).unwrap();
    let mut acked = 0;
    for round in 0..3u64 {
        assert_eq!(
            Harness::dispatched(&h.tick(round * 10)),
            vec![(1, id)],
            "round {round}"
        );
        acked += 1;
        h.step(
            round * 10 + 1,
            1,
            &[],
            &[(id, wpb::FinishReason::Preempted)],
            Some(Harness::capacity(4, 1000, acked)),
        );
        if round < 2 {
            assert!(h.end(id).is_none(), "round {round}");
        }
    }
    let Some(Err(RouterError::Unavailable(why))) = h.end(id) else {
        panic!("{:?}", h.end(id))
    };
    assert!(
        why.contains("3 times") && why.contains("--max-resumes is 2"),
        "{why}"
    );
    assert_eq!(h.state.live(), 0);
    assert!(Harness::dispatched(&h.tick(100)).is_empty());
}

#[test]
fn a_cancel_reaches_the_worker_and_its_late_tokens_are_dropped() {
    let mut h = harness(cfg());
    h.worker(1, "m", 4, 1000);
    let id = h.submit(0, "m", 0, 10, 8, LONG).unwrap();
    h.tick(1);
    let effects = h.state.cancel(h.at(2), id);
    assert_eq!(
        effects,
        vec![Effect::Send(
            WorkerId(1),
            Kind::Cancel(wpb::Cancel {
                sequence_ids: vec![id]
            })
        )]
    );
    // Tokens and the end the worker sent before it heard are not a protocol breach.
    assert!(h
        .step(
            3,
            1,
            &[(id, 2)],
            &[(id, wpb::FinishReason::Cancelled)],
            None
        )
        .is_empty());
    assert!(h.tokens(id).is_empty());
    // After its end the worker may not speak of it again.
    assert!(disconnected(&h.step(4, 1, &[(id, 1)], &[], None), 1).is_some());
}

#[test]
fn an_abort_ends_queued_and_running_requests_and_cancels_their_sequences() {
    let mut h = harness(cfg());
    h.worker(1, "m", 1, 1000);
    let running = h.submit(0, "m", 0, 10, 8, LONG).unwrap();
    let queued = h.submit(0, "m", 0, 10, 8, LONG).unwrap();
    assert_eq!(Harness::dispatched(&h.tick(1)), [(1, running)]);
    h.state.drain();
    let effects = h.state.abort_all(h.at(2), "router shutting down; retry");
    assert_eq!(
        effects,
        vec![Effect::Send(
            WorkerId(1),
            Kind::Cancel(wpb::Cancel {
                sequence_ids: vec![running]
            })
        )]
    );
    for id in [running, queued] {
        match h.end(id) {
            Some(Err(RouterError::Unavailable(m))) => assert!(m.contains("retry"), "{m}"),
            other => panic!("request {id} ended {other:?}"),
        }
    }
    assert_eq!(h.state.live(), 0);
    assert!(
        h.submit(3, "m", 0, 10, 8, LONG).is_err(),
        "admission stays closed"
    );
}

#[test]
fn a_worker_that_left_the_registry_stops_serving_at_once_and_is_closed_when_idle() {
    let mut h = harness(cfg());
    h.worker(1, "m", 4, 1000);
    let running = h.submit(0, "m", 0, 10, 8, LONG).unwrap();
    assert_eq!(Harness::dispatched(&h.tick(1)), [(1, running)]);
    h.state.worker_leaving(WorkerId(1));
    assert!(!h.state.serving(), "its model has no other worker");
    assert!(matches!(
        h.submit(2, "m", 0, 10, 8, LONG),
        Err(RouterError::Unavailable(_))
    ));
    // What runs there finishes; only then is the connection closed.
    assert!(disconnected(&h.tick(3), 1).is_none());
    h.step(
        4,
        1,
        &[(running, 8)],
        &[(running, wpb::FinishReason::Length)],
        None,
    );
    assert!(matches!(h.end(running), Some(Ok(FinishReason::Length))));
    let why = disconnected(&h.tick(5), 1).expect("the idle leaver is closed");
    assert!(why.contains("left the registry"), "{why}");
    assert!(disconnected(&h.tick(6), 1).is_none(), "closed once");
    // A worker that registers again is one worker again.
    h.state.worker_down(h.at(7), WorkerId(1));
    h.worker(2, "m", 4, 1000);
    assert!(h.state.serving());
    assert_eq!(h.state.models.get("m").map(|e| e.workers), Some(1));
}

#[test]
fn a_stream_whose_every_worker_is_lost_waits_one_queue_timeout_then_fails() {
    let mut h = harness(cfg());
    let timeout = h.state.cfg.default_queue_timeout.as_millis() as u64;
    h.worker(1, "m", 4, 1000);
    let id = h.submit(0, "m", 0, 10, 100, LONG).unwrap();
    h.tick(1);
    h.step(2, 1, &[(id, 3)], &[], None);
    h.state.worker_down(h.at(10), WorkerId(1));
    h.tick(10 + timeout - 1);
    assert!(
        h.end(id).is_none(),
        "it waits for a replacement for the queue timeout"
    );
    h.tick(10 + timeout);
    match h.end(id) {
        Some(Err(RouterError::Unavailable(m))) => {
            assert!(m.contains("took the request back"), "{m}")
        }
        other => panic!("ended {other:?}"),
    }
    assert_eq!(h.tokens(id).len(), 3, "what it had streamed stays streamed");
    assert_eq!(h.state.live(), 0);
}

#[test]
fn a_resumed_request_that_finds_a_worker_in_time_does_not_fail_later() {
    let mut h = harness(cfg());
    let timeout = h.state.cfg.default_queue_timeout.as_millis() as u64;
    h.worker(1, "m", 4, 1000);
    let id = h.submit(0, "m", 0, 10, 100, LONG).unwrap();
    h.tick(1);
    h.state.worker_down(h.at(2), WorkerId(1));
    h.worker(2, "m", 4, 1000);
    assert_eq!(Harness::dispatched(&h.tick(3)), [(2, id)]);
    h.tick(3 + 2 * timeout);
    assert!(h.end(id).is_none(), "it runs on worker 2");
}

/// The property test: random inputs against honest simulated workers.
mod properties {
    use std::collections::{BTreeMap, HashMap};

    use proptest::prelude::*;

    use super::*;

    /// One input.
    #[derive(Debug, Clone)]
    enum Op {
        Submit {
            priority: i32,
            prompt: usize,
            max_new: u32,
            deadline_ms: u64,
        },
        Cancel(usize),
        Step(usize),
        Lose(usize),
        Connect(usize),
        Tick(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (-2i32..4, 1usize..64, 1u32..12, 1u64..400).prop_map(|(priority, prompt, max_new, deadline_ms)| Op::Submit { priority, prompt, max_new, deadline_ms }),
            1 => (0usize..64).prop_map(Op::Cancel),
            5 => (0usize..3).prop_map(Op::Step),
            1 => (0usize..3).prop_map(Op::Lose),
            1 => (0usize..3).prop_map(Op::Connect),
            2 => (1u64..50).prop_map(Op::Tick),
        ]
    }

    /// A worker that does exactly what it is told, one token per sequence per step, and
    /// reports truthfully. It checks the router never sends more than it has room for.
    struct SimWorker {
        id: WorkerId,
        slots: u32,
        acked: u64,
        /// Sequence -> (tokens left to make).
        running: BTreeMap<u64, u32>,
        /// Ends to report with the next step.
        ended: Vec<(u64, wpb::FinishReason)>,
    }

    impl SimWorker {
        fn take(&mut self, kind: &Kind) {
            match kind {
                Kind::Dispatch(d) => {
                    for s in &d.sequences {
                        self.acked += 1;
                        let max_new = s.stopping.as_ref().unwrap().max_new_tokens;
                        let left = max_new - s.generated_ids.len() as u32;
                        assert!(
                            (self.running.len() as u32) < self.slots,
                            "the router sent a sequence to a worker with no free slot"
                        );
                        self.running.insert(s.sequence_id, left);
                    }
                }
                Kind::Cancel(c) => {
                    for id in &c.sequence_ids {
                        if self.running.remove(id).is_some() {
                            self.ended.push((*id, wpb::FinishReason::Cancelled));
                        }
                    }
                }
                Kind::Preempt(p) => {
                    for id in &p.sequence_ids {
                        if self.running.remove(id).is_some() {
                            self.ended.push((*id, wpb::FinishReason::Preempted));
                        }
                    }
                }
            }
        }

        fn step(&mut self) -> wpb::ExecuteResponse {
            let mut tokens = Vec::new();
            for (&id, left) in self.running.iter_mut() {
                tokens.push(wpb::TokenEvent {
                    sequence_id: id,
                    token_ids: vec![1],
                    ..Default::default()
                });
                *left -= 1;
            }
            let done: Vec<u64> = self
                .running
                .iter()
                .filter(|(_, l)| **l == 0)
                .map(|(&id, _)| id)
                .collect();
            for id in done {
                self.running.remove(&id);
                self.ended.push((id, wpb::FinishReason::Length));
            }
            wpb::ExecuteResponse {
                tokens,
                finished: self
                    .ended
                    .drain(..)
                    .map(|(id, r)| wpb::SequenceFinished {
                        sequence_id: id,
                        reason: r as i32,
                        ..Default::default()
                    })
                    .collect(),
                capacity: Some(wpb::CapacityReport {
                    total_blocks: 100_000,
                    free_blocks: 100_000,
                    block_size: 16,
                    max_running_sequences: self.slots,
                    running_sequences: self.running.len() as u32,
                    free_sequence_slots: self.slots - self.running.len() as u32,
                    dispatched: self.acked,
                    ..Default::default()
                }),
                ..Default::default()
            }
        }
    }

    struct World {
        h: Harness,
        now: u64,
        workers: Vec<Option<SimWorker>>,
        next_wid: u64,
        submitted: Vec<u64>,
        cancelled: Vec<u64>,
    }

    impl World {
        fn deliver(&mut self, effects: Vec<Effect>) {
            for e in effects {
                match e {
                    Effect::Send(wid, kind) => {
                        if let Some(w) = self.workers.iter_mut().flatten().find(|w| w.id == wid) {
                            w.take(&kind);
                        }
                    }
                    Effect::Disconnect(wid, why) => {
                        panic!("an honest worker was disconnected: {wid:?}: {why}")
                    }
                }
            }
        }

        fn connect(&mut self, i: usize) {
            if self.workers[i].is_some() {
                return;
            }
            self.next_wid += 1;
            let slots = 2 + i as u32;
            self.h.worker(self.next_wid, "m", slots, 100_000);
            self.workers[i] = Some(SimWorker {
                id: WorkerId(self.next_wid),
                slots,
                acked: 0,
                running: BTreeMap::new(),
                ended: Vec::new(),
            });
        }

        fn apply(&mut self, op: &Op) {
            match *op {
                Op::Submit {
                    priority,
                    prompt,
                    max_new,
                    deadline_ms,
                } => {
                    if let Ok(id) =
                        self.h
                            .submit(self.now, "m", priority, prompt, max_new, deadline_ms)
                    {
                        self.submitted.push(id);
                    }
                }
                Op::Cancel(i) => {
                    if let Some(&id) = self.submitted.get(i) {
                        let effects = self.h.state.cancel(self.h.at(self.now), id);
                        self.cancelled.push(id);
                        self.deliver(effects);
                    }
                }
                Op::Step(i) => {
                    if let Some(w) = self.workers[i].as_mut() {
                        let (wid, resp) = (w.id, w.step());
                        let effects = self.h.state.worker_event(self.h.at(self.now), wid, resp);
                        self.deliver(effects);
                    }
                }
                Op::Lose(i) => {
                    if let Some(w) = self.workers[i].take() {
                        self.h.state.worker_down(self.h.at(self.now), w.id);
                    }
                }
                Op::Connect(i) => self.connect(i),
                Op::Tick(ms) => self.now += ms,
            }
            let effects = self.h.state.tick(self.h.at(self.now), &open);
            self.deliver(effects);
            self.check_bounds();
        }

        /// Admission keeps the queue within its bounds; what comes back from a worker
        /// (preempted, or its worker lost) was admitted before and may exceed them, by no
        /// more than the workers hold.
        fn check_bounds(&self) {
            let state = &self.h.state;
            let cfg = &state.cfg;
            let fresh: Vec<_> = state
                .requests
                .values()
                .filter(|t| !t.dispatched_once)
                .collect();
            assert!(
                fresh.len() <= cfg.max_queued_requests,
                "{} waiting",
                fresh.len()
            );
            let fresh_tokens: usize = fresh.iter().map(|t| t.req.prompt_ids.len()).sum();
            assert!(
                fresh_tokens <= cfg.max_queued_tokens,
                "{fresh_tokens} prompt tokens waiting"
            );
            // Running: at most the slots, plus the victims of preemptions not yet confirmed.
            let slots: usize = (0..3).map(|i| 2 + i).sum();
            assert!(
                state.live() <= cfg.max_queued_requests + 2 * slots,
                "{} live",
                state.live()
            );
            for q in state.queues.values() {
                for (priority, level) in q.levels() {
                    let fresh_here = fresh.iter().filter(|t| t.req.priority == priority).count();
                    assert!(
                        fresh_here <= cfg.max_queue_per_priority,
                        "priority {priority}: {level} queued, {fresh_here} never dispatched"
                    );
                }
            }
            for w in state.workers.values() {
                assert!(
                    w.in_flight.len() as u64 <= w.sent,
                    "more in flight than sent"
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Whatever happens, every request is answered exactly once (cancelled ones at most
        /// once), no worker is sent more than it has room for, the queues keep their bounds,
        /// and every preempted or orphaned sequence is resumed or fails with a reason.
        #[test]
        fn every_request_is_answered_once_and_the_bounds_hold(ops in proptest::collection::vec(op(), 1..120)) {
            let mut world = World {
                h: harness(RouterConfig {
                    max_queued_requests: 12,
                    max_queue_per_priority: 6,
                    max_queued_tokens: 400,
                    aging_step: Some(Duration::from_millis(100)),
                    max_resumes: 3,
                    ..RouterConfig::default()
                }),
                now: 0,
                workers: (0..3).map(|_| None).collect(),
                next_wid: 0,
                submitted: Vec::new(),
                cancelled: Vec::new(),
            };
            world.connect(0);
            for op in &ops {
                world.apply(op);
            }
            // Then let the cluster finish: every worker up, steps until nothing is live.
            for i in 0..3 {
                world.connect(i);
            }
            for _ in 0..2_000 {
                if world.h.state.live() == 0 {
                    break;
                }
                for i in 0..3 {
                    world.apply(&Op::Step(i));
                }
                world.apply(&Op::Tick(10));
            }
            prop_assert_eq!(world.h.state.live(), 0, "requests never ended");
            let mut by_id: HashMap<u64, u32> = HashMap::new();
            for &id in &world.submitted {
                by_id.insert(id, world.h.outputs[&id].peek().1);
            }
            for (id, ends) in by_id {
                if world.cancelled.contains(&id) {
                    prop_assert!(ends <= 1, "cancelled request {} answered {} times", id, ends);
                } else {
                    prop_assert_eq!(ends, 1, "request {} answered {} times", id, ends);
                }
            }
        }
    }
}

#[test]
fn placement_follows_the_prefix_cache_within_the_balance_slack() {
    use openinfer_core::prefix::prompt_keys;
    let mut h = harness(RouterConfig {
        cache_balance_slack: 0.25,
        ..cfg()
    });
    h.worker(1, "m", 4, 1000);
    h.worker(2, "m", 4, 1000);
    let keys = prompt_keys(b"anonymous", &[7; 65], 16);
    assert_eq!(keys.len(), 4);
    // Worker 2 reports that its cache holds the first three blocks (and a key of a wrong
    // length, which is ignored).
    let mut added: Vec<Vec<u8>> = keys[..3].iter().map(|k| k.to_vec()).collect();
    added.push(vec![1, 2, 3]);
    h.state.worker_event(
        h.at(0),
        WorkerId(2),
        wpb::ExecuteResponse {
            prefix_added: added,
            ..Default::default()
        },
    );
    h.prefix_keys = keys.clone();
    let a = h.submit(1, "m", 0, 65, 8, LONG).unwrap();
    assert_eq!(
        Harness::dispatched(&h.tick(2)),
        vec![(2, a)],
        "to the worker holding its prefix, though the other is as idle"
    );
    // Worker 2 is a quarter busier than worker 1: within the slack, it still gets the next.
    let b = h.submit(3, "m", 0, 65, 8, LONG).unwrap();
    assert_eq!(Harness::dispatched(&h.tick(4)), vec![(2, b)]);
    // Half busier: over the slack, so one hot prefix does not pile everything on one worker.
    let c = h.submit(5, "m", 0, 65, 8, LONG).unwrap();
    assert_eq!(Harness::dispatched(&h.tick(6)), vec![(1, c)]);
    // The worker evicts the blocks: its hold is gone, and the least busy worker is chosen.
    h.state.worker_event(
        h.at(7),
        WorkerId(2),
        wpb::ExecuteResponse {
            prefix_removed: keys[..1].iter().map(|k| k.to_vec()).collect(),
            ..Default::default()
        },
    );
    h.step(8, 1, &[], &[(c, wpb::FinishReason::Eos)], None);
    let d = h.submit(9, "m", 0, 65, 8, LONG).unwrap();
    assert_eq!(Harness::dispatched(&h.tick(10)), vec![(1, d)]);
}

#[test]
fn without_cache_awareness_the_least_busy_worker_is_chosen() {
    use openinfer_core::prefix::prompt_keys;
    let mut h = harness(RouterConfig {
        cache_aware: false,
        ..cfg()
    });
    h.worker(1, "m", 4, 1000);
    h.worker(2, "m", 4, 1000);
    let keys = prompt_keys(b"anonymous", &[7; 65], 16);
    h.state.worker_event(
        h.at(0),
        WorkerId(2),
        wpb::ExecuteResponse {
            prefix_added: keys.iter().map(|k| k.to_vec()).collect(),
            ..Default::default()
        },
    );
    h.prefix_keys = keys;
    let a = h.submit(1, "m", 0, 65, 8, LONG).unwrap();
    assert_eq!(Harness::dispatched(&h.tick(2)), vec![(1, a)]);
}
