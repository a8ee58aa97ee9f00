//! The router and its workers as separate processes on loopback: streaming and unary
//! generation over two workers, the validation table, cancellation, priority order with and
//! without preemption, aging, admission refusal and queue deadlines.

mod common;

use std::time::{Duration, Instant};

use common::{capacity, router_client, start_router, start_worker, worker_client, Proc};
use futures::future::join_all;
use openinfer_proto::v1 as pb;
use openinfer_proto::v1::inference_client::InferenceClient;
use tonic::transport::Channel;
use tonic::Code;

/// A router in front of `n` tiny workers.
struct Cluster {
    _model: tempfile::TempDir,
    _procs: Vec<Proc>,
    workers: Vec<String>,
    addr: String,
}

impl Cluster {
    async fn start(n: usize, worker_flags: &[&str], router_flags: &[&str]) -> Cluster {
        let (dir, model) = common::tiny_model();
        let mut procs = Vec::new();
        let mut workers = Vec::new();
        for _ in 0..n {
            let (p, addr) = start_worker(&model, worker_flags);
            procs.push(p);
            workers.push(addr);
        }
        let list: Vec<&str> = workers.iter().map(String::as_str).collect();
        let (router, addr) = start_router(&list, router_flags);
        procs.push(router);
        let c = Cluster {
            _model: dir,
            _procs: procs,
            workers,
            addr,
        };
        common::wait_for_workers(&mut c.client().await, n as u32).await;
        c
    }

    async fn client(&self) -> InferenceClient<Channel> {
        router_client(&self.addr).await
    }
}

fn req(prompt: &str, max_new: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: prompt.into(),
        max_new_tokens: Some(max_new),
        ignore_eos: true,
        ..Default::default()
    }
}

fn with_priority(mut r: pb::GenerateRequest, priority: i32) -> pb::GenerateRequest {
    r.priority = priority;
    r
}

/// Streams `r` to the end: (token ids, text, final message).
async fn stream_all(
    client: &mut InferenceClient<Channel>,
    r: pb::GenerateRequest,
) -> Result<(Vec<u32>, String, pb::GenerateStreamResponse, usize), tonic::Status> {
    let mut stream = client.generate_stream(r).await?.into_inner();
    let (mut ids, mut text, mut messages) = (Vec::new(), String::new(), 0);
    while let Some(m) = stream.message().await? {
        messages += 1;
        ids.extend(&m.token_ids);
        text.push_str(&m.text);
        if !m.finish_reason.is_empty() {
            return Ok((ids, text, m, messages));
        }
    }
    panic!("stream ended without a final message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_and_unary_calls_are_served_by_two_workers() {
    let c = Cluster::start(2, &[], &[]).await;
    let mut client = c.client().await;

    let models = client
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(models.len(), 1);
    assert_eq!((models[0].id.as_str(), models[0].workers), ("tiny", 2));
    assert_eq!(models[0].max_model_len, 2048);

    for service in ["", "openinfer.v1.Inference"] {
        assert_eq!(
            common::health(&c.addr, service).await,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }

    let unary = client
        .generate(req("The quick brown fox", 24))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unary.token_ids.len(), 24);
    assert_eq!(unary.finish_reason, "length");
    assert_eq!(unary.model, "tiny");
    assert!(unary.request_id.starts_with("req-"), "{}", unary.request_id);
    let usage = unary.usage.unwrap();
    assert_eq!(usage.completion_tokens, 24);
    assert!(usage.prompt_tokens > 1);
    let t = unary.timings.unwrap();
    assert!(t.queue_time >= 0.0 && t.time_to_first_token >= t.queue_time);
    assert!(t.total_time >= t.time_to_first_token && t.total_time > 0.0);

    // The same greedy request streamed: the same tokens and text, delivered step by step.
    let mut r = req("The quick brown fox", 24);
    r.request_id = "mine-1".into();
    let (ids, text, last, messages) = stream_all(&mut client, r).await.unwrap();
    assert_eq!(ids, unary.token_ids);
    assert_eq!(text, unary.text);
    assert_eq!(last.finish_reason, "length");
    assert_eq!(last.request_id, "mine-1");
    assert_eq!(last.usage.unwrap().completion_tokens, 24);
    assert!(
        messages > 4,
        "tokens arrive as they are made ({messages} messages)"
    );

    // Token input is used as given.
    let ids_in = pb::GenerateRequest {
        prompt_ids: vec![1, 50, 60, 70],
        max_new_tokens: Some(5),
        ignore_eos: true,
        ..Default::default()
    };
    let r = client.generate(ids_in).await.unwrap().into_inner();
    assert_eq!(r.usage.unwrap().prompt_tokens, 4);
    assert_eq!(r.token_ids.len(), 5);

    // Concurrent requests spread over both workers.
    let calls = (0..12).map(|i| {
        let mut client = client.clone();
        async move {
            client
                .generate(req(&format!("request number {i}"), 40))
                .await
                .unwrap()
                .into_inner()
        }
    });
    for r in join_all(calls).await {
        assert_eq!(
            (r.token_ids.len(), r.finish_reason.as_str()),
            (40, "length")
        );
    }
    for w in &c.workers {
        let cap = capacity(&mut worker_client(w).await).await;
        assert!(
            cap.dispatched >= 2,
            "worker {w} took {} sequences",
            cap.dispatched
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_validation_rule_names_its_field_and_nothing_reaches_a_worker() {
    let c = Cluster::start(
        1,
        &[],
        &[
            "--max-stop-strings",
            "4",
            "--max-stop-bytes",
            "16",
            "--max-request-bytes",
            "64KiB",
        ],
    )
    .await;
    let mut client = c.client().await;
    let base = || req("hello", 8);
    type Edit = fn(&mut pb::GenerateRequest);
    let table: Vec<(&str, Edit, Code, &str)> = vec![
        (
            "unknown model",
            |r| r.model = "nope".into(),
            Code::NotFound,
            "nope",
        ),
        (
            // Quoted whole, this name would not fit in the client's metadata limit.
            "a 32 KB unknown model name",
            |r| r.model = "m".repeat(32_000),
            Code::NotFound,
            "(32000 bytes)` is not served here",
        ),
        (
            "empty input",
            |r| r.prompt.clear(),
            Code::InvalidArgument,
            "prompt:",
        ),
        (
            "both inputs",
            |r| r.prompt_ids = vec![1, 2],
            Code::InvalidArgument,
            "prompt_ids:",
        ),
        (
            "prompt longer than the context",
            |r| {
                r.prompt.clear();
                r.prompt_ids = vec![5; 2048];
            },
            Code::InvalidArgument,
            "prompt:",
        ),
        (
            "text prompt longer than the context",
            |r| r.prompt = "hello ".repeat(3000),
            Code::InvalidArgument,
            "prompt:",
        ),
        (
            "max_new_tokens 0",
            |r| r.max_new_tokens = Some(0),
            Code::InvalidArgument,
            "max_new_tokens:",
        ),
        (
            "max_new_tokens beyond the context",
            |r| r.max_new_tokens = Some(5000),
            Code::InvalidArgument,
            "max_new_tokens:",
        ),
        (
            "negative temperature",
            |r| r.temperature = Some(-0.5),
            Code::InvalidArgument,
            "temperature:",
        ),
        (
            "top_p 0",
            |r| r.top_p = Some(0.0),
            Code::InvalidArgument,
            "top_p:",
        ),
        (
            "top_p above 1",
            |r| r.top_p = Some(1.5),
            Code::InvalidArgument,
            "top_p:",
        ),
        (
            "negative top_k",
            |r| r.top_k = Some(-1),
            Code::InvalidArgument,
            "top_k:",
        ),
        (
            "min_p above 1",
            |r| r.min_p = Some(2.0),
            Code::InvalidArgument,
            "min_p:",
        ),
        (
            "repetition_penalty 0",
            |r| r.repetition_penalty = Some(0.0),
            Code::InvalidArgument,
            "repetition_penalty:",
        ),
        (
            "frequency_penalty out of range",
            |r| r.frequency_penalty = Some(3.0),
            Code::InvalidArgument,
            "frequency_penalty:",
        ),
        (
            "presence_penalty out of range",
            |r| r.presence_penalty = Some(-3.0),
            Code::InvalidArgument,
            "presence_penalty:",
        ),
        (
            "too many top_logprobs",
            |r| r.top_logprobs = 50,
            Code::InvalidArgument,
            "top_logprobs:",
        ),
        (
            "too many stop strings",
            |r| r.stop = vec!["a".into(); 5],
            Code::InvalidArgument,
            "stop:",
        ),
        (
            "too long a stop string",
            |r| r.stop = vec!["x".repeat(17)],
            Code::InvalidArgument,
            "stop:",
        ),
        (
            "empty stop string",
            |r| r.stop = vec![String::new()],
            Code::InvalidArgument,
            "stop:",
        ),
        (
            "token id outside the vocabulary",
            |r| {
                r.prompt.clear();
                r.prompt_ids = vec![1, 999_999];
            },
            Code::InvalidArgument,
            "prompt_ids:",
        ),
        (
            "oversized message",
            |r| r.prompt = "word ".repeat(20_000),
            Code::InvalidArgument,
            "prompt:",
        ),
        (
            "long request_id",
            |r| r.request_id = "r".repeat(300),
            Code::InvalidArgument,
            "request_id:",
        ),
    ];
    for (name, edit, code, needle) in table {
        let mut r = base();
        edit(&mut r);
        let unary = client.generate(r.clone()).await.unwrap_err();
        assert_eq!(unary.code(), code, "{name}: {unary:?}");
        assert!(
            unary.message().contains(needle),
            "{name}: {}",
            unary.message()
        );
        let streamed = client.generate_stream(r).await.unwrap_err();
        assert_eq!(streamed.code(), code, "{name} (stream): {streamed:?}");
    }
    let cap = capacity(&mut worker_client(&c.workers[0]).await).await;
    assert_eq!(cap.dispatched, 0, "a refused request reached the worker");

    // The same base request is fine.
    let ok = client.generate(base()).await.unwrap().into_inner();
    assert_eq!(ok.token_ids.len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_has_its_sequence_cancelled_on_the_worker() {
    // Deadline admission would refuse the unary call below up front (it cannot finish in
    // time); this test is about what happens to one that is abandoned at its deadline.
    let c = Cluster::start(1, &[], &["--deadline-admission", "false"]).await;
    let mut client = c.client().await;
    let mut worker = worker_client(&c.workers[0]).await;
    let total = capacity(&mut worker).await.total_blocks;

    let mut stream = client
        .generate_stream(req("a long story", 1500))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        stream.message().await.unwrap().unwrap();
    }
    let before = capacity(&mut worker).await;
    assert_eq!(before.running_sequences, 1);
    assert!(before.free_blocks < total);
    drop(stream);

    let start = Instant::now();
    loop {
        let cap = capacity(&mut worker).await;
        if cap.running_sequences == 0 && cap.free_blocks == total {
            // Steps run while the disconnect crosses two hops (on a loaded machine, with
            // tiny steps, dozens of them); the request had almost 1,500 to go.
            assert!(
                cap.step - before.step < 700,
                "cancelled after {} steps",
                cap.step - before.step
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "KV never freed: {cap:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // A unary call abandoned at its deadline is cancelled too.
    let mut r = tonic::Request::new(req("another long story", 1500));
    r.set_timeout(Duration::from_millis(300));
    let err = client.generate(r).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{err:?}"
    );
    let start = Instant::now();
    loop {
        let cap = capacity(&mut worker).await;
        if cap.running_sequences == 0 && cap.free_blocks == total {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "KV never freed: {cap:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Tokens each priority-0 request of [`priority_race`] generates: 256 took about 0.1 s in a
/// loaded CI run, near the urgent request's arrival (about 50 ms in), which then lost the race.
const RACE_TOKENS: u32 = 1024;

/// Ten priority-0 streams, then one priority-5 stream, on a worker with room for one sequence.
/// Returns how many priority-0 requests finished before the priority-5 one, and checks that
/// every priority-0 stream (preempted or not) produced the same tokens as a solo run.
async fn priority_race(preemption: bool) -> usize {
    let c = Cluster::start(
        1,
        &["--max-running", "1"],
        &["--preemption", &preemption.to_string(), "--aging-step", "0"],
    )
    .await;
    let client = c.client().await;
    // Long enough that the first request is still running when the urgent one arrives (about
    // 50 ms after it) on any machine (see RACE_TOKENS).
    let solo = stream_all(&mut client.clone(), req("same prompt", RACE_TOKENS))
        .await
        .unwrap()
        .0;

    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for i in 0..10 {
        let mut client = client.clone();
        let done = done_tx.clone();
        tasks.push(tokio::spawn(async move {
            let (ids, _, _, _) = stream_all(&mut client, req("same prompt", RACE_TOKENS))
                .await
                .unwrap();
            done.send((0, i)).unwrap();
            ids
        }));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    let mut high = client.clone();
    let done = done_tx.clone();
    tasks.push(tokio::spawn(async move {
        let r = with_priority(req("urgent", 16), 5);
        let (ids, _, _, _) = stream_all(&mut high, r).await.unwrap();
        done.send((5, 0)).unwrap();
        ids
    }));
    drop(done_tx);
    let mut before = 0;
    while let Some((priority, _)) = done_rx.recv().await {
        if priority == 5 {
            break;
        }
        before += 1;
    }
    let outputs: Vec<Vec<u32>> = join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    for (i, ids) in outputs[..10].iter().enumerate() {
        assert_eq!(
            ids, &solo,
            "priority-0 request {i} differs from its solo run"
        );
    }
    before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_goes_first_and_preemption_lets_it_overtake_the_running_one() {
    let without = priority_race(false).await;
    assert_eq!(
        without, 1,
        "without preemption only the running request finishes first"
    );
    let with = priority_race(true).await;
    assert_eq!(with, 0, "with preemption the urgent request finishes first");
}

/// A preempting request is dispatched in the same pass as the preemption, so it starts in the
/// worker's next step: its first token comes within two steps of its arrival (arrival mid-step,
/// then one step), not after the extra step a report round trip would cost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preempting_request_starts_in_the_worker_s_next_step() {
    let step = Duration::from_millis(200);
    let (_sim, sim) = common::sim_worker("200ms", &["--max-running", "2"]);
    let (_router, addr) = start_router(&[&sim], &["--aging-step", "0"]);
    let client = router_client(&addr).await;
    common::wait_for_workers(&mut client.clone(), 1).await;
    // Two long priority-0 streams fill both slots and keep them full (a preempted one resumes
    // in the slot the urgent request leaves).
    let low: Vec<_> = (0..2)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { stream_all(&mut client, req("background", 60)).await })
        })
        .collect();
    tokio::time::sleep(step * 3).await;
    let mut ttfts = Vec::new();
    for _ in 0..3 {
        let mut high = client.clone();
        let start = Instant::now();
        let mut stream = high
            .generate_stream(with_priority(req("urgent", 2), 5))
            .await
            .unwrap()
            .into_inner();
        while let Some(m) = stream.message().await.unwrap() {
            if !m.token_ids.is_empty() && ttfts.len() < 3 && m.finish_reason.is_empty() {
                ttfts.push(start.elapsed());
            }
        }
        // Let the preempted request resume before the next urgent one arrives.
        tokio::time::sleep(step * 2).await;
    }
    assert_eq!(ttfts.len(), 3);
    for t in &ttfts {
        assert!(
            *t < step * 9 / 4,
            "time to first token {t:?} with a {step:?} step: the urgent request waited for a report round trip ({ttfts:?})"
        );
    }
    for l in low {
        let (ids, ..) = l.await.unwrap().unwrap();
        assert_eq!(ids.len(), 60, "a preempted stream lost or repeated tokens");
    }
}

/// Keeps `depth` priority-5 requests in flight until `stop`; returns how many finished.
async fn high_priority_load(
    client: InferenceClient<Channel>,
    depth: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) -> usize {
    let mut set = tokio::task::JoinSet::new();
    let mut finished = 0;
    loop {
        while set.len() < depth {
            let mut client = client.clone();
            set.spawn(async move {
                client
                    .generate(with_priority(req("load", 12), 5))
                    .await
                    .is_ok()
            });
        }
        if *stop.borrow() {
            break;
        }
        if let Some(Ok(true)) = set.join_next().await {
            finished += 1;
        }
    }
    set.abort_all();
    finished
}

/// Under constant priority-5 load on one slot, how long a priority-0 request waits (None: it
/// was still waiting after `patience`).
async fn low_priority_wait(aging: &str, patience: Duration) -> Option<Duration> {
    let c = Cluster::start(
        1,
        &["--max-running", "1"],
        &["--aging-step", aging, "--preemption", "false"],
    )
    .await;
    let client = c.client().await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(high_priority_load(client.clone(), 4, stop_rx));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    let mut low = client.clone();
    let waited = tokio::time::timeout(patience, async move {
        low.generate(req("patient", 4)).await.unwrap();
        start.elapsed()
    })
    .await
    .ok();
    stop_tx.send(true).unwrap();
    let served = load.await.unwrap();
    assert!(
        served > 10,
        "the priority-5 load kept going ({served} served)"
    );
    waited
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aging_serves_a_long_waiting_low_priority_request_under_high_priority_load() {
    assert_eq!(
        low_priority_wait("0", Duration::from_secs(2)).await,
        None,
        "without aging the low-priority request starves while the load lasts"
    );
    let waited = low_priority_wait("100ms", Duration::from_secs(10))
        .await
        .expect("with aging the low-priority request is served");
    assert!(waited < Duration::from_secs(5), "served after {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_quickly_with_pushback_and_sheds_sheddable_work_first() {
    let c = Cluster::start(
        1,
        &["--max-running", "1"],
        &[
            "--max-queued-requests",
            "4",
            "--sheddable-share",
            "0.5",
            "--retry-pushback",
            "250ms",
            "--preemption",
            "false",
        ],
    )
    .await;
    let client = c.client().await;
    let open = |priority: i32| {
        let mut client = client.clone();
        async move {
            client
                .generate_stream(with_priority(req("occupy", 1900), priority))
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let pushback = |s: &tonic::Status| {
        s.metadata()
            .get("grpc-retry-pushback-ms")
            .map(|v| v.to_str().unwrap().to_string())
    };
    // One runs; the queue then holds up to 4, of which sheddable requests get 2.
    let mut running = open(0).await.unwrap();
    running.message().await.unwrap().unwrap();
    let mut sheddable = vec![open(-1).await.unwrap(), open(-1).await.unwrap()];
    let start = Instant::now();
    let refused = open(-1).await.unwrap_err();
    assert!(
        start.elapsed() < Duration::from_millis(200),
        "refusal took {:?}",
        start.elapsed()
    );
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(pushback(&refused).as_deref(), Some("250"));

    // Normal-priority requests fill the rest, then push the sheddable ones out, newest first.
    let mut normal = vec![open(0).await.unwrap(), open(0).await.unwrap()];
    normal.push(open(0).await.unwrap());
    let shed = sheddable.pop().unwrap().message().await.unwrap_err();
    assert_eq!(shed.code(), Code::ResourceExhausted, "{shed:?}");
    normal.push(open(0).await.unwrap());
    let shed = sheddable.pop().unwrap().message().await.unwrap_err();
    assert_eq!(shed.code(), Code::ResourceExhausted, "{shed:?}");

    // Now the queue is all normal work: the next request is refused at once.
    let start = Instant::now();
    let refused = open(0).await.unwrap_err();
    assert!(
        start.elapsed() < Duration::from_millis(200),
        "refusal took {:?}",
        start.elapsed()
    );
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("queue is full"),
        "{}",
        refused.message()
    );
    assert_eq!(pushback(&refused).as_deref(), Some("250"));
    drop(normal);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_their_queue_deadline_never_reach_a_worker() {
    // The queue deadline alone: deadline admission would refuse the hurried request up
    // front, once it has timed the worker's steps (overload.rs tests that).
    let c = Cluster::start(
        1,
        &["--max-running", "1"],
        &["--queue-timeout", "400ms", "--deadline-admission", "false"],
    )
    .await;
    let mut client = c.client().await;
    let mut worker = worker_client(&c.workers[0]).await;
    let mut busy = client
        .generate_stream(req("occupy", 1900))
        .await
        .unwrap()
        .into_inner();
    busy.message().await.unwrap().unwrap();

    // The client's grpc-timeout bounds the wait...
    let mut r = tonic::Request::new(req("in a hurry", 8));
    r.set_timeout(Duration::from_millis(300));
    let start = Instant::now();
    let err = client
        .generate_stream(r)
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap_err();
    let waited = start.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(2),
        "{waited:?}"
    );

    // ...and without one the router's --queue-timeout does.
    let start = Instant::now();
    let err = client.generate(req("patient", 8)).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        start.elapsed() >= Duration::from_millis(350),
        "{:?}",
        start.elapsed()
    );

    let cap = capacity(&mut worker).await;
    assert_eq!(
        cap.dispatched, 1,
        "only the busy request reached the worker"
    );
    drop(busy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_models_are_served_at_once_and_an_empty_model_needs_a_default() {
    let (_dir, model) = common::tiny_model();
    let (_tiny, tiny) = start_worker(&model, &[]);
    let (_sim, sim) = common::sim_worker("1ms", &[]);
    let (_router, addr) = start_router(&[&tiny, &sim], &[]);
    let mut client = router_client(&addr).await;
    common::wait_for_workers(&mut client, 2).await;

    let mut names: Vec<String> = client
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models
        .into_iter()
        .map(|m| m.id)
        .collect();
    names.sort();
    assert_eq!(names, ["sim", "tiny"]);
    for name in ["tiny", "sim"] {
        let mut r = req("hello", 6);
        r.model = name.into();
        let resp = client.generate(r).await.unwrap().into_inner();
        assert_eq!((resp.model.as_str(), resp.token_ids.len()), (name, 6));
    }
    let sim_text = {
        let mut r = req("hello", 9);
        r.model = "sim".into();
        client.generate(r).await.unwrap().into_inner().text
    };
    // The sim engine's tokens spell out a fixed text.
    assert!(
        sim_text.starts_with("The quick")
            && "The quick brown fox jumps over the lazy dog".starts_with(&sim_text),
        "{sim_text}"
    );

    let err = client.generate(req("hello", 6)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("model:"), "{}", err.message());

    // A router with a default model serves requests that name none.
    let (_r2, addr2) = start_router(&[&tiny, &sim], &["--default-model", "sim"]);
    let mut client2 = router_client(&addr2).await;
    common::wait_for_workers(&mut client2, 2).await;
    let resp = client2
        .generate(req("hello", 3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.model, "sim");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_worker_s_stream_resumes_on_the_other_without_a_gap_or_a_repeat() {
    // Long enough that the stream is still running when its worker is killed
    // (300 tokens took 0.18 s on the tiny model, close to the kill itself).
    const LONG: u32 = 1500;
    let (_dir, model) = common::tiny_model();
    let (w1, a1) = start_worker(&model, &[]);
    let (w2, a2) = start_worker(&model, &[]);
    let mut workers = [Some(w1), Some(w2)];
    let (_router, addr) = start_router(&[&a1, &a2], &[]);
    let mut client = router_client(&addr).await;
    common::wait_for_workers(&mut client, 2).await;
    let solo = client
        .generate(req("keep going", LONG))
        .await
        .unwrap()
        .into_inner();

    let mut stream = client
        .generate_stream(req("keep going", LONG))
        .await
        .unwrap()
        .into_inner();
    let mut ids = Vec::new();
    let mut text = String::new();
    while ids.len() < 20 {
        let m = stream.message().await.unwrap().unwrap();
        ids.extend(m.token_ids);
        text.push_str(&m.text);
    }
    // Kill whichever worker runs it, and only that one: once it is gone the
    // router resumes the sequence on the other, which then runs it too.
    for (i, a) in [&a1, &a2].into_iter().enumerate() {
        if capacity(&mut worker_client(a).await)
            .await
            .running_sequences
            == 1
        {
            workers[i] = None;
            break;
        }
    }
    assert_eq!(workers.iter().filter(|w| w.is_none()).count(), 1);
    while let Some(m) = stream.message().await.unwrap() {
        ids.extend(&m.token_ids);
        text.push_str(&m.text);
        if !m.finish_reason.is_empty() {
            assert_eq!(m.finish_reason, "length");
            assert_eq!(m.usage.unwrap().completion_tokens, LONG);
            break;
        }
    }
    assert_eq!(
        ids, solo.token_ids,
        "the stream continued exactly where it stopped"
    );
    assert_eq!(text, solo.text);
}
