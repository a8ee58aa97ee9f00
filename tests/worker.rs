//! `openinfer make-model` and `openinfer worker` as real separate processes, driven over
//! loopback gRPC: Info, Health, streaming tokens with a capacity report on every message,
//! cancellation freeing KV within a step, and rejected dispatches.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{bin, capacity, make_tiny, Proc};
use openinfer_proto::worker::v1::{self as pb, worker_client::WorkerClient};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// A worker on a fresh tiny model (kept alive by the returned guard and directory).
fn tiny_worker(extra: &[&str]) -> (tempfile::TempDir, Proc, String) {
    let (tmp, model) = common::tiny_model();
    let (worker, addr) = common::start_worker(&model, extra);
    (tmp, worker, format!("http://{addr}"))
}

/// An `Execute` message that dispatches `sequences`.
fn dispatch(sequences: Vec<pb::SequenceSpec>) -> pb::ExecuteRequest {
    pb::ExecuteRequest {
        kind: Some(pb::execute_request::Kind::Dispatch(pb::Dispatch {
            backlog: false,
            sequences,
        })),
    }
}

fn spec(id: u64, prompt: Vec<u32>, max_new: u32) -> pb::SequenceSpec {
    pb::SequenceSpec {
        sequence_id: id,
        prompt_ids: prompt,
        stopping: Some(pb::StoppingParams {
            max_new_tokens: max_new,
            stop: vec![],
            ignore_eos: true,
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_streams_tokens_reports_capacity_and_cancels_within_a_step() {
    let (_dir, _worker, url) = tiny_worker(&["--kv-cache-memory", "8MiB"]);
    let mut client = WorkerClient::connect(url).await.unwrap();

    let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.model, "tiny");
    assert_eq!(info.architecture, "LlamaForCausalLM");
    let kv = info.kv.unwrap();
    assert!(kv.total_blocks > 0 && kv.block_size == 16);
    let health = client
        .health(pb::HealthRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(health.serving);
    assert_eq!(health.capacity.unwrap().free_blocks, kv.total_blocks);

    let (tx, rx) = mpsc::channel(16);
    let mut stream = client
        .execute(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(
        first.capacity.unwrap().free_blocks,
        kv.total_blocks,
        "capacity on connect"
    );

    let send = |k: pb::execute_request::Kind| {
        let tx = tx.clone();
        async move { tx.send(pb::ExecuteRequest { kind: Some(k) }).await.unwrap() }
    };
    send(pb::execute_request::Kind::Dispatch(pb::Dispatch {
        backlog: false,
        sequences: vec![
            spec(10, vec![1, 50, 60, 70], 5),
            spec(11, vec![1, 80, 90], 7),
            spec(12, (1..100).collect(), 1000),
            spec(13, vec![], 5),
            spec(14, vec![1, 5_000_000], 5),
        ],
    }))
    .await;

    let mut tokens: std::collections::HashMap<u64, Vec<u32>> = Default::default();
    let mut finished: std::collections::HashMap<u64, pb::SequenceFinished> = Default::default();
    // The cancel is followed on the same stream by a one-token sequence: the worker takes a
    // connection's messages in order, so a cancel applied before the next step that the
    // stream's later messages reach ends sequence 12 no later than sequence 15's first token
    // (a worker that looked at cancels less often, or only when a sequence ends, would not).
    let mut cancel_sent = false;
    let mut cancelled_at = None;
    let mut first_token_of_15_at = None;
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(60), stream.message())
        .await
        .unwrap()
        .unwrap()
    {
        let cap = msg
            .capacity
            .expect("every message carries a capacity report");
        for t in msg.tokens {
            if t.sequence_id == 15 && first_token_of_15_at.is_none() {
                first_token_of_15_at = Some(cap.step);
            }
            tokens.entry(t.sequence_id).or_default().extend(t.token_ids);
        }
        for f in msg.finished {
            finished.insert(f.sequence_id, f);
        }
        if finished.contains_key(&10) && finished.contains_key(&11) && !cancel_sent {
            assert!(tokens[&12].len() > 2, "long sequence is decoding");
            assert!(cap.free_blocks < kv.total_blocks);
            send(pb::execute_request::Kind::Cancel(pb::Cancel {
                sequence_ids: vec![12],
            }))
            .await;
            send(pb::execute_request::Kind::Dispatch(pb::Dispatch {
                backlog: false,
                sequences: vec![spec(15, vec![1, 2, 3], 1)],
            }))
            .await;
            cancel_sent = true;
        }
        if let Some(f) = finished.get(&12) {
            assert_eq!(f.reason, pb::FinishReason::Cancelled as i32);
            assert!(cancel_sent, "sequence 12 ended before it was cancelled");
            let ended_at = *cancelled_at.get_or_insert(cap.step);
            assert!(
                first_token_of_15_at.is_none_or(|at| ended_at <= at),
                "the cancel took effect at step {ended_at}, after the step that served the \
                 message sent behind it ({first_token_of_15_at:?})"
            );
            assert!(
                tokens[&12].len() < 1000,
                "sequence 12 ran to its end instead of being cancelled"
            );
            if finished.contains_key(&15) {
                assert_eq!(
                    cap.free_blocks, kv.total_blocks,
                    "cancelled and finished KV is free in the same report"
                );
                break;
            }
        }
    }
    // Nothing more arrives for sequence 12.
    let next = tokio::time::timeout(Duration::from_millis(300), stream.message()).await;
    if let Ok(Ok(Some(m))) = next {
        assert!(m.tokens.iter().all(|t| t.sequence_id != 12));
    }
    assert_eq!(tokens[&10].len(), 5);
    assert_eq!(tokens[&11].len(), 7);
    assert_eq!(finished[&10].reason, pb::FinishReason::Length as i32);
    assert_eq!(finished[&10].completion_tokens, 5);
    for bad in [13, 14] {
        assert_eq!(finished[&bad].reason, pb::FinishReason::Rejected as i32);
        assert!(
            finished[&bad].message.contains("prompt_ids"),
            "{}",
            finished[&bad].message
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_router_stream_frees_its_sequences() {
    let (_dir, _worker, url) = tiny_worker(&[]);
    let mut client = WorkerClient::connect(url.clone()).await.unwrap();
    let total = capacity(&mut client).await.total_blocks;
    {
        let (tx, rx) = mpsc::channel(4);
        let mut stream = client
            .execute(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        tx.send(dispatch(vec![spec(1, (1..200).collect(), 1500)]))
            .await
            .unwrap();
        // Wait until it runs, then vanish without cancelling.
        loop {
            let m = stream.message().await.unwrap().unwrap();
            if !m.tokens.is_empty() {
                break;
            }
        }
    }
    let mut client = WorkerClient::connect(url).await.unwrap();
    for _ in 0..100 {
        let cap = capacity(&mut client).await;
        if cap.free_blocks == total && cap.running_sequences == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the abandoned sequence kept its KV blocks");
}

#[test]
fn bad_model_directory_fails_at_start_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    make_tiny(&model);
    std::fs::remove_file(model.join("config.json")).unwrap();
    let out = Command::new(bin())
        .args(["worker", "--listen", "127.0.0.1:0", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("config.json"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_that_stops_reading_is_disconnected_and_others_keep_going() {
    // A buffer of a few dozen messages: A's stream fills it within a few dozen steps, while B,
    // which reads, stays inside it even when this test's process is starved of CPU for a while
    // (with 4, a loaded 2-core machine let B fall behind too).
    let (_dir, _worker, url) = tiny_worker(&["--connection-buffer", "32"]);
    let mut health = WorkerClient::connect(url.clone()).await.unwrap();
    let total = capacity(&mut health).await.total_blocks;

    // Router A dispatches long sequences and never reads its stream (but keeps it open). A
    // small HTTP/2 window makes the backpressure reach the worker after a few messages.
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .initial_stream_window_size(Some(1024))
        .initial_connection_window_size(Some(1024))
        .connect()
        .await
        .unwrap();
    let mut a = WorkerClient::new(channel);
    let (tx_a, rx_a) = mpsc::channel(4);
    let mut stalled = a
        .execute(ReceiverStream::new(rx_a))
        .await
        .unwrap()
        .into_inner();
    let long: Vec<_> = (0..8)
        .map(|i| spec(100 + i, (1..40).collect(), 1900))
        .collect();
    tx_a.send(dispatch(long)).await.unwrap();

    // Router B is served meanwhile and afterwards.
    let mut b = WorkerClient::connect(url).await.unwrap();
    let (tx_b, rx_b) = mpsc::channel(4);
    let mut stream_b = b
        .execute(ReceiverStream::new(rx_b))
        .await
        .unwrap()
        .into_inner();
    tx_b.send(dispatch(vec![spec(1, vec![1, 2, 3], 2000)]))
        .await
        .unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut b_tokens = 0;
    let mut saw_a_running = false;
    let mut seen = Vec::new();
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled router was never disconnected; running counts seen: {seen:?}"
        );
        let m = tokio::time::timeout_at(deadline, stream_b.message())
            .await
            .unwrap_or_else(|_| panic!("router B is starved; running counts seen: {seen:?}"))
            .unwrap()
            .expect("router B's stream stays open");
        b_tokens += m.tokens.iter().filter(|t| t.sequence_id == 1).count();
        let cap = m.capacity.unwrap();
        saw_a_running |= cap.running_sequences == 9;
        if seen.last() != Some(&cap.running_sequences) {
            seen.push(cap.running_sequences);
        }
        // A's 8 sequences are gone; only B's one runs, and A's blocks are back.
        if saw_a_running && cap.running_sequences == 1 {
            assert!(b_tokens < 2000, "B still running");
            let used = total - cap.free_blocks;
            assert!(
                used <= 2 + (b_tokens as u32 + 3).div_ceil(16),
                "A's KV was freed: {used} blocks in use"
            );
            break;
        }
    }
    // When A reads again it gets what was buffered, then a status saying why the stream ends.
    let status = loop {
        let next = tokio::time::timeout(Duration::from_secs(30), stalled.message()).await;
        match next.expect("A's stream ends") {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("A's stream ended without saying why"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("fell"), "{}", status.message());
    drop(tx_a);
}
