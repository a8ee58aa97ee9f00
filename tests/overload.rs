//! Clients that push the router past what it can serve, as separate processes on loopback:
//! huge prompts, output nobody reads, oversized messages and deadlines under overload. Each
//! one must meet a clear refusal and leave the router's memory bounded.

mod common;

use std::time::{Duration, Instant};

use common::{memory, router_client, start_router, start_worker, Proc, MB};
use futures::future::join_all;
use openinfer_proto::v1 as pb;
use openinfer_proto::v1::inference_client::InferenceClient;
use tonic::transport::Channel;
use tonic::Code;

/// Waits until `proc`'s resident memory is at most `bound`, or panics with what it was.
async fn until_rss_at_most(proc: &Proc, bound: u64, within: Duration, what: &str) {
    let end = Instant::now() + within;
    loop {
        let (rss, _) = memory(proc);
        if rss <= bound {
            return;
        }
        assert!(
            Instant::now() < end,
            "{what}: resident memory stayed at {} MB, above {} MB",
            rss / MB,
            bound / MB
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Text like a real document, `bytes` long.
fn document(bytes: usize) -> String {
    let words = "the router tokenizes what clients send before it checks the context, \
                 and one large prompt can cost many times its size in memory; ";
    words.repeat(bytes / words.len() + 1)[..bytes].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_four_megabyte_prompts_are_refused_without_the_router_s_memory_blowing_up() {
    let (_dir, model) = common::tiny_model();
    let (_worker, waddr) = start_worker(&model, &[]);
    let (router, addr) = start_router(&[&waddr], &[]);
    let mut client = router_client(&addr).await;
    common::wait_for_workers(&mut client, 1).await;
    // A served request first, so the baseline includes what serving costs.
    serve_document(&mut client, 2000).await;
    let (baseline, _) = memory(&router);

    let prompt = document(4_000_000);
    let started = Instant::now();
    let answers = join_all((0..8).map(|_| {
        let mut client = client.clone();
        let prompt = prompt.clone();
        async move {
            client
                .generate(pb::GenerateRequest {
                    prompt,
                    max_new_tokens: Some(4),
                    ..Default::default()
                })
                .await
        }
    }))
    .await;
    let took = started.elapsed();
    for a in answers {
        let e = a.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().starts_with("prompt:"), "{}", e.message());
    }
    let (_, peak) = memory(&router);
    eprintln!(
        "router resident memory: baseline {} MB, peak {} MB",
        baseline / MB,
        peak / MB
    );
    assert!(
        peak < 300 * MB,
        "eight 4 MB prompts took the router to {} MB (baseline {} MB)",
        peak / MB,
        baseline / MB
    );
    assert!(took < Duration::from_secs(10), "refusing took {took:?}");
    until_rss_at_most(
        &router,
        baseline + 50 * MB,
        Duration::from_secs(10),
        "after the refusals",
    )
    .await;

    // A prompt that may fit is still tokenized and served.
    serve_document(&mut client, 3000).await;
}

/// Sends a `bytes`-long document for 2 tokens; it must be served.
async fn serve_document(client: &mut InferenceClient<Channel>, bytes: usize) {
    let ok = client
        .generate(pb::GenerateRequest {
            prompt: document(bytes),
            max_new_tokens: Some(2),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.token_ids.len(), 2);
}

fn long_request(max_new: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: "never read".into(),
        max_new_tokens: Some(max_new),
        ignore_eos: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_nobody_reads_is_bounded_and_freed_when_its_connection_closes() {
    let (_worker, waddr) = common::sim_worker(
        "1ms",
        &[
            "--max-running",
            "1024",
            "--max-batch-tokens",
            "100000",
            "--max-waiting",
            "4096",
            "--sim-kv-blocks",
            "300000",
        ],
    );
    let service = common::service(
        "router",
        &[
            "router",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            &waddr,
            "--max-unread-output",
            "4MiB",
            "--max-queue-per-priority",
            "4096",
        ],
    );
    let (router, addr) = (&service.proc, service.addr.clone());
    let unread = || {
        let samples = common::prom::parse(&common::prom::get(&service.metrics));
        common::prom::value(&samples, "openinfer_router_unread_output_bytes", &[])
    };
    let mut probe = router_client(&addr).await;
    common::wait_for_workers(&mut probe, 1).await;
    probe.generate(long_request(4)).await.unwrap();
    let (baseline, _) = memory(router);

    // Two connections open 1,000 streams of 2,000 tokens each and never read them. Their
    // HTTP/2 stream windows (1 KiB each) take little, so the rest waits in the router. (The
    // large connection window keeps the client's own guard against many small unread DATA
    // frames, half that window, from closing the connection first.)
    let mut held = Vec::new();
    for _ in 0..2 {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .initial_connection_window_size(64 << 20)
            .initial_stream_window_size(1 << 10)
            .connect()
            .await
            .unwrap();
        let mut client = pb::inference_client::InferenceClient::new(channel);
        let opened = join_all((0..1000).map(|_| {
            let mut client = client.clone();
            async move { client.generate_stream(long_request(2000)).await }
        }))
        .await;
        let streams: Vec<_> = opened.into_iter().map(|r| r.unwrap()).collect();
        client.list_models(pb::ListModelsRequest {}).await.unwrap();
        held.push((client, streams));
    }

    // Once the unread output passes the bound, new requests are refused before any work.
    let end = Instant::now() + Duration::from_secs(90);
    let refusal = loop {
        match probe.generate(long_request(1)).await {
            Err(e) if e.code() == Code::ResourceExhausted => break e,
            Ok(_) => {}
            Err(e) => panic!("unexpected {e:?}"),
        }
        assert!(
            Instant::now() < end,
            "unread output was never refused ({} bytes held)",
            unread()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        refusal.message().contains("--max-unread-output"),
        "{}",
        refusal.message()
    );
    assert!(refusal.metadata().get("grpc-retry-pushback-ms").is_some());
    let (rss, _) = memory(router);
    eprintln!(
        "router resident memory: baseline {} MB, {} MB with the unread streams",
        baseline / MB,
        rss / MB
    );

    // Closing the connections frees their output at once: the next request is served.
    drop(held);
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        match probe.generate(long_request(1)).await {
            Ok(_) => break,
            Err(e) if e.code() == Code::ResourceExhausted => {
                assert!(
                    Instant::now() < end,
                    "output stayed held after its connections closed"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    // Every buffer goes with its connection, moments after it closes.
    let end = Instant::now() + Duration::from_secs(5);
    while unread() != 0.0 {
        assert!(
            Instant::now() < end,
            "{} bytes stayed held after the connections closed",
            unread()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    until_rss_at_most(
        router,
        baseline + 50 * MB,
        Duration::from_secs(10),
        "after the connections closed",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_is_invalid_argument_naming_the_limit() {
    let (_worker, waddr) = common::sim_worker("5ms", &[]);
    let (_router, addr) = start_router(&[&waddr], &["--max-request-bytes", "1MiB"]);
    let mut client = router_client(&addr).await;
    common::wait_for_workers(&mut client, 1).await;
    // Over --max-request-bytes, and over the hard ceiling on any message (64 MiB).
    for bytes in [(1 << 20) + 1, 65 << 20] {
        let oversized = pb::GenerateRequest {
            prompt: "x".repeat(bytes),
            max_new_tokens: Some(1),
            ..Default::default()
        };
        let unary = client.generate(oversized.clone()).await.map(|_| ());
        let stream = match client.generate_stream(oversized).await {
            Ok(mut s) => s.get_mut().message().await.map(|_| ()),
            Err(e) => Err(e),
        };
        for answer in [unary, stream] {
            let e = answer.unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{bytes} bytes: {e:?}");
            assert!(
                e.message().contains("--max-request-bytes") && e.message().contains("1048576"),
                "{bytes} bytes: {}",
                e.message()
            );
            // The decoder's own limit refused it: it was never decoded.
            assert!(
                e.message().starts_with("prompt: the request is over"),
                "{bytes} bytes: {}",
                e.message()
            );
        }
    }
    // The router serves on.
    let ok = client.generate(long_request(2)).await.unwrap().into_inner();
    assert_eq!(ok.token_ids.len(), 2);
}

/// Connections beyond --max-connections are closed at once and counted; headers beyond
/// --max-header-bytes are refused; the router serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_and_headers_are_bounded() {
    let (_worker, waddr) = common::sim_worker("5ms", &[]);
    let router = common::service(
        "router",
        &[
            "router",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            &waddr,
            "--max-connections",
            "2",
            "--max-header-bytes",
            "8KiB",
        ],
    );
    let connect = || async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", router.addr))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await?;
        Ok::<_, tonic::transport::Error>(InferenceClient::new(channel))
    };
    let mut first = connect().await.unwrap();
    common::wait_for_workers(&mut first, 1).await;
    let mut second = connect().await.unwrap();
    second.generate(long_request(1)).await.unwrap();

    // A third connection is closed as soon as it is accepted: its call fails as a lost
    // connection (how depends on the client: UNAVAILABLE in grpcio; tonic says UNAVAILABLE,
    // CANCELLED or UNKNOWN by when it notices).
    let third = match connect().await {
        Ok(mut c) => c.generate(long_request(1)).await.map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    assert!(third.is_err(), "a third connection was served");
    let refused = common::prom::value(
        &common::prom::parse(&common::prom::get(&router.metrics)),
        "openinfer_router_connections_refused_total",
        &[],
    );
    assert!(refused >= 1.0, "{refused}");

    // Metadata over the bound: the request is refused, the connection's others go on.
    let mut big = tonic::Request::new(long_request(1));
    big.metadata_mut()
        .insert("x-padding", "p".repeat(16 << 10).parse().unwrap());
    assert!(
        first.generate(big).await.is_err(),
        "16 KiB of metadata was accepted"
    );
    let mut small = tonic::Request::new(long_request(1));
    small
        .metadata_mut()
        .insert("x-padding", "p".repeat(1 << 10).parse().unwrap());
    second.generate(small).await.unwrap();

    // Once a connection closes, a new one is let in.
    drop(first);
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut c) = connect().await {
            if c.generate(long_request(1)).await.is_ok() {
                break;
            }
        }
        assert!(
            Instant::now() < end,
            "no connection was let in after one closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A connection older than --max-connection-age is asked to go: a stream in flight then runs
/// to its end, an idle one closes, and clients reconnect. One that never says anything is
/// closed after --handshake-timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_connections_are_asked_to_go_without_cutting_a_stream() {
    use tokio::io::AsyncReadExt;
    let (_worker, waddr) = common::sim_worker("20ms", &[]);
    let router = common::service(
        "router",
        &[
            "router",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            &waddr,
            "--max-connection-age",
            "1s",
            "--handshake-timeout",
            "1s",
        ],
    );
    let addr = router.addr.clone();
    let open = || {
        let samples = common::prom::parse(&common::prom::get(&router.metrics));
        common::prom::value(&samples, "openinfer_router_connections_open", &[])
    };
    let mut client = router_client(&addr).await;
    common::wait_for_workers(&mut client, 1).await;

    // A stream of 100 tokens (2 s) on a connection that turns 1 s old meanwhile.
    let mut s = client
        .generate_stream(long_request(100))
        .await
        .unwrap()
        .into_inner();
    let mut tokens = 0;
    while let Some(m) = s.message().await.unwrap() {
        tokens += m.token_ids.len();
    }
    assert_eq!(tokens, 100);

    // The client's connection, idle now, is asked to go once it is 1 s old, and closes.
    let end = Instant::now() + Duration::from_secs(10);
    while open() != 0.0 {
        assert!(Instant::now() < end, "{} connections stayed open", open());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A connection that never sends a byte is closed after --handshake-timeout.
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let start = Instant::now();
    let mut buf = vec![0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // the server's HTTP/2 settings, then its GOAWAY
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a silent connection stayed open for 10 s");
    let after = start.elapsed();
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}"
    );

    // Calls keep working across the client's reconnections.
    for _ in 0..5 {
        client.generate(long_request(2)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_ten_times_overload_with_deadlines_the_router_serves_at_capacity_in_time() {
    // 8 slots of 20 ms steps, 40 tokens a request (41 steps): 9.8 requests/s at best.
    let (_worker, waddr) =
        common::sim_worker("20ms", &["--max-running", "8", "--max-waiting", "8"]);
    let router = common::service(
        "router",
        &["router", "--listen", "127.0.0.1:0", "--workers", &waddr],
    );
    let client = router_client(&router.addr).await;
    common::wait_for_workers(&mut client.clone(), 1).await;
    let capacity = 8.0 / (41.0 * 0.020);
    let (arrivals, every) = (500u32, Duration::from_millis(10)); // 100/s for 5 s: ten times
    let deadline = Duration::from_secs(2);

    let start = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..arrivals {
        tokio::time::sleep_until((start + every * i).into()).await;
        let mut client = client.clone();
        calls.spawn(async move {
            let mut r = tonic::Request::new(long_request(40));
            r.set_timeout(deadline);
            let sent = Instant::now();
            let answer = client.generate(r).await;
            (answer.map(|r| r.into_inner()), sent.elapsed())
        });
    }
    let (mut done, mut refused, mut late) = (0, 0, 0);
    let mut slowest_refusal = Duration::ZERO;
    while let Some(call) = calls.join_next().await {
        let (answer, took) = call.unwrap();
        match answer {
            Ok(r) => {
                assert_eq!(r.token_ids.len(), 40);
                assert!(took <= deadline, "answered after its deadline: {took:?}");
                done += 1;
            }
            Err(e) if e.code() == Code::ResourceExhausted => {
                slowest_refusal = slowest_refusal.max(took);
                refused += 1;
            }
            Err(e) if e.code() == Code::DeadlineExceeded => late += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    let samples = common::prom::parse(&common::prom::get(&router.metrics));
    let counter = |name| common::prom::value(&samples, name, &[("model", "sim")]);
    let generated = counter("openinfer_router_generation_tokens_total");
    let wasted = counter("openinfer_router_wasted_tokens_total");
    eprintln!(
        "{done} served in time, {refused} refused, {late} late; {wasted} of {generated} tokens wasted; slowest refusal {slowest_refusal:?}"
    );
    // Served in time: at least 90 % of what the worker can do over the 5 s of arrivals.
    let floor = (0.9 * capacity * 5.0) as usize;
    assert!(
        done >= floor,
        "{done} served in time; capacity allows {floor}+"
    );
    assert!(
        wasted <= 0.1 * generated,
        "{wasted} of {generated} tokens went to requests that then missed their deadline"
    );
    assert!(
        slowest_refusal < Duration::from_millis(500),
        "refusals should be fast: {slowest_refusal:?}"
    );
}
