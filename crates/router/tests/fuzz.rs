//! Property tests over what peers send the router: random bytes through the protobuf
//! decoders, random `GenerateRequest`s through validation, and random worker step messages
//! through the scheduler. No input may panic; every refusal is a proper status.
//!
//! Short in CI (proptest's default of 256 cases each); longer: `PROPTEST_CASES=100000 cargo test --release -p
//! openinfer-router --test fuzz` (docs/security.md).

use std::sync::Arc;
use std::time::{Duration, Instant};

use openinfer_proto::v1 as pb;
use openinfer_proto::worker::v1 as wpb;
use openinfer_router::models::{ModelSpec, ModelTable};
use openinfer_router::observe::RequestTrace;
use openinfer_router::scheduler::{NewWorker, State, WorkerId};
use openinfer_router::validate::{validate, Checks};
use openinfer_router::RouterConfig;
use openinfer_telemetry::TraceId;
use proptest::prelude::*;
use prost::Message;

/// A model like a real one: a byte-level BPE tokenizer of 512 tokens, 256 tokens of context
/// (made once: parsing the tokenizer is the slow part).
fn spec() -> Arc<ModelSpec> {
    static SPEC: std::sync::OnceLock<Arc<ModelSpec>> = std::sync::OnceLock::new();
    SPEC.get_or_init(make_spec).clone()
}

fn make_spec() -> Arc<ModelSpec> {
    let info = wpb::InfoResponse {
        model: "m".into(),
        vocab_size: 512,
        max_model_len: 256,
        kv: Some(wpb::KvGeometry {
            block_size: 16,
            ..Default::default()
        }),
        ..Default::default()
    };
    let tok = wpb::TokenizerResponse {
        tokenizer_json: openinfer_engine::make_model::byte_level_bpe(512).to_string(),
        ..Default::default()
    };
    Arc::new(ModelSpec::new(&info, &tok).unwrap())
}

fn models() -> ModelTable {
    let models = ModelTable::default();
    models.worker_up(spec());
    models
}

fn trace() -> RequestTrace {
    RequestTrace {
        span: tracing::Span::none(),
        trace_id: TraceId::random(),
    }
}

fn opt<T: std::fmt::Debug + Clone>(
    s: impl Strategy<Value = T>,
) -> impl Strategy<Value = Option<T>> {
    prop_oneof![Just(None), s.prop_map(Some)]
}

fn float() -> impl Strategy<Value = f32> {
    prop_oneof![
        any::<f32>(),
        -2.0f32..3.0,
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(0.0)
    ]
}

prop_compose! {
    fn request()(
        prompt in prop_oneof![".{0,64}", "\\PC{0,300}", Just(String::new())],
        prompt_ids in proptest::collection::vec(prop_oneof![0u32..600, any::<u32>()], 0..300),
        model in prop_oneof![Just(String::new()), Just("m".to_string()), ".{0,8}"],
        max_new_tokens in opt(prop_oneof![0u32..300, any::<u32>()]),
        (temperature, top_p, min_p) in (opt(float()), opt(float()), opt(float())),
        (repetition_penalty, frequency_penalty, presence_penalty) in (opt(float()), opt(float()), opt(float())),
        top_k in opt(any::<i32>()),
        seed in opt(any::<u64>()),
        stop in proptest::collection::vec(".{0,40}", 0..20),
        priority in any::<i32>(),
        (logprobs, top_logprobs, ignore_eos) in (any::<bool>(), prop_oneof![0u32..25, any::<u32>()], any::<bool>()),
        request_id in ".{0,80}",
    ) -> pb::GenerateRequest {
        pb::GenerateRequest {
            prompt, prompt_ids, model, max_new_tokens, temperature, top_p, min_p,
            repetition_penalty, frequency_penalty, presence_penalty, top_k, seed, stop,
            priority, logprobs, top_logprobs, ignore_eos, request_id,
        }
    }
}

proptest! {
    #[test]
    fn random_bytes_through_every_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = pb::GenerateRequest::decode(bytes.as_slice());
        let _ = wpb::ExecuteResponse::decode(bytes.as_slice());
        let _ = wpb::ExecuteRequest::decode(bytes.as_slice());
        let _ = wpb::InfoResponse::decode(bytes.as_slice());
    }

    /// Whatever a client sends, validation accepts it within the model's limits or refuses
    /// it with INVALID_ARGUMENT or NOT_FOUND and a bounded message naming what is wrong.
    #[test]
    fn random_requests_are_valid_or_refused_with_a_proper_status(req in request()) {
        let cfg = RouterConfig::default();
        let models = models();
        let checks = Checks { id: 1, queue_timeout: Some(Duration::from_secs(5)), special_tokens: true };
        match validate(req, &models, &cfg, checks, trace()) {
            Ok(r) => {
                prop_assert!(r.prompt_ids.len() + r.stopping.max_new_tokens as usize <= 256);
                prop_assert!(r.prompt_ids.iter().all(|&id| id < 512));
                prop_assert!(r.stopping.max_new_tokens >= 1);
            }
            Err(e) => {
                let status = tonic::Status::from(e);
                prop_assert!(
                    matches!(status.code(), tonic::Code::InvalidArgument | tonic::Code::NotFound),
                    "{status:?}"
                );
                prop_assert!(!status.message().is_empty() && status.message().len() <= 8 << 10);
            }
        }
    }

    /// Random (and contradictory) step messages from a worker: the scheduler never panics,
    /// and a worker that breaks the protocol is disconnected.
    #[test]
    fn random_worker_messages_never_panic_the_scheduler(
        steps in proptest::collection::vec(
            (proptest::collection::vec((0u64..8, proptest::collection::vec(0u32..600, 0..4)), 0..4),
             opt((any::<u32>(), any::<u32>(), any::<u32>(), any::<u64>())),
             proptest::collection::vec((0u64..8, 0i32..12), 0..3)),
            1..20,
        )
    ) {
        let table = models();
        let metrics = Arc::new(openinfer_router::metrics::RouterMetrics::new(&prometheus::Registry::new()).unwrap());
        let mut state = State::new(Arc::new(RouterConfig::default()), table.clone(), metrics);
        let t0 = Instant::now();
        let capacity = wpb::CapacityReport {
            total_blocks: 64,
            free_blocks: 64,
            block_size: 16,
            max_running_sequences: 4,
            free_sequence_slots: 4,
            ..Default::default()
        };
        state.worker_up(t0, NewWorker { id: WorkerId(1), addr: "w".into(), spec: spec(), capacity });
        for id in 1..=4u64 {
            let req = validate(
                pb::GenerateRequest { prompt: "hello".into(), max_new_tokens: Some(8), ..Default::default() },
                &table, &RouterConfig::default(), Checks { id, queue_timeout: None, special_tokens: true }, trace(),
            ).unwrap();
            let out = openinfer_router::request::Output::new(t0, prometheus::IntGauge::new("u", "u").unwrap());
            let _ = state.submit(t0, req, out);
        }
        let _ = state.tick(t0, &|_| true);
        for (i, (tokens, cap, finished)) in steps.into_iter().enumerate() {
            let now = t0 + Duration::from_millis(i as u64 * 10);
            let resp = wpb::ExecuteResponse {
                tokens: tokens.into_iter().map(|(id, ids)| wpb::TokenEvent { sequence_id: id, token_ids: ids, ..Default::default() }).collect(),
                capacity: cap.map(|(free, slots, total, dispatched)| wpb::CapacityReport {
                    free_blocks: free, free_sequence_slots: slots, total_blocks: total, dispatched,
                    block_size: 16, max_running_sequences: 4, ..Default::default()
                }),
                finished: finished.into_iter().map(|(id, reason)| wpb::SequenceFinished { sequence_id: id, reason, ..Default::default() }).collect(),
                ..Default::default()
            };
            let _ = state.worker_event(now, WorkerId(1), resp);
            let _ = state.tick(now, &|_| true);
        }
    }
}
