//! `openinfer bench-router` runs end to end (sim workers, a router, many streams) and writes its
//! JSON and SVG chart.

mod common;

#[test]
fn bench_router_measures_ttft_and_holds_every_stream() {
    let run = common::run(&[
        "bench-router",
        "--samples",
        "10",
        "--streams",
        "300",
        "--stream-tokens",
        "5",
        "--stream-step-time",
        "10ms",
        "--rounds",
        "2",
    ]);
    assert!(run.stdout.contains("router adds"), "{}", run.stdout);
    assert!(run.stdout.contains("HTTP adds"), "{}", run.stdout);
    let json = run.json("bench-router.json");
    assert_eq!(json["ttft"]["router"]["n"], 10);
    assert_eq!(json["ttft"]["http"]["n"], 10);
    let streams = json["streams"].as_array().unwrap();
    let apis: Vec<&str> = streams.iter().map(|s| s["api"].as_str().unwrap()).collect();
    assert_eq!(apis, ["grpc", "http"]);
    for s in streams {
        let rounds = s["rounds"].as_array().unwrap();
        assert_eq!(rounds.len(), 2);
        for r in rounds {
            assert_eq!(r["completed"], 300, "{} {r}", s["api"]);
            assert_eq!(r["failed"], 0);
            assert!(r["router_rss_peak_bytes"].as_u64().unwrap() > 0);
        }
    }
    let svg = run.text("bench-router.svg");
    assert!(svg.starts_with("<svg") && svg.contains("router, HTTP (SSE)"));
}
