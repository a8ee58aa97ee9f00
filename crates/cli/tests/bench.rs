//! `openinfer bench --spawn` loads the embedded server end to end and writes its report, with
//! a per-priority breakdown and goodput; `--spawn-sim-workers` loads a router in front of sim
//! workers, past its capacity.

mod common;

#[test]
fn bench_loads_the_embedded_server_and_reports_per_priority() {
    let run = common::run(&[
        "bench",
        "--spawn",
        "--num-requests",
        "12",
        "--concurrency",
        "3",
        "--input-len",
        "8",
        "--output-len",
        "6",
        "--priority-mix",
        "0:50,5:50",
        "--slo",
        "ttft=60s",
    ]);
    assert!(run.stdout.contains("prio 5"), "{}", run.stdout);
    let json = run.json("bench.json");
    let all = &json["steps"][0]["overall"];
    assert_eq!(all["requests"], 12);
    assert_eq!(all["completed"], 12, "{all}");
    assert_eq!(all["slo_met"], 12);
    assert!(all["ttft_ms"]["p50"].as_f64().unwrap() > 0.0);
    assert!(all["output_tokens_per_s"].as_f64().unwrap() > 0.0);
    let by = json["steps"][0]["by_priority"].as_object().unwrap();
    assert_eq!(by.len(), 2);
    let n: u64 = by.values().map(|g| g["completed"].as_u64().unwrap()).sum();
    assert_eq!(n, 12);
}

#[test]
fn bench_reads_prompts_lengths_and_priorities_from_a_dataset() {
    let dataset = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/bench/sample.jsonl");
    let run = common::run(&[
        "bench",
        "--spawn",
        "--num-requests",
        "6",
        "--output-len",
        "32",
        "--dataset",
        dataset.to_str().unwrap(),
    ]);
    let json = run.json("bench.json");
    // The sample's priorities, and its output lengths capped at --output-len:
    // 24 + min(48, 32) + 16 + 20 + 32 + 32 (default) tokens.
    let step = &json["steps"][0];
    let by = step["by_priority"].as_object().unwrap();
    let keys: Vec<&str> = by.keys().map(String::as_str).collect();
    assert_eq!(keys, ["-1", "0", "5"]);
    assert_eq!(step["overall"]["completed"], 6);
    let tokens = step["overall"]["output_tokens_per_s"].as_f64().unwrap()
        * step["wall_seconds"].as_f64().unwrap();
    assert!((tokens - 156.0).abs() < 0.5, "{tokens} output tokens");
}

#[test]
fn bench_reads_a_sharegpt_file_cut_off_mid_record_and_reports_prompt_tokens() {
    let sample = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/bench/sample_sharegpt.json"),
    )
    .unwrap();
    // As ShareGPT V3's JSON is published: the last record is cut off.
    let cut = sample.rfind("\"conversations\"").unwrap() + 20;
    let dir = tempfile::tempdir().unwrap();
    let dataset = dir.path().join("cut.json");
    std::fs::write(&dataset, &sample[..cut]).unwrap();
    let run = common::run(&[
        "bench",
        "--spawn",
        "--num-requests",
        "4",
        "--output-len",
        "8",
        "--dataset",
        dataset.to_str().unwrap(),
    ]);
    let json = run.json("bench.json");
    let step = &json["steps"][0];
    let read = step["dataset"].as_str().unwrap();
    assert!(
        read.contains("1 cut off at the end of the file dropped"),
        "{read}"
    );
    let t = &step["prompt_tokens"];
    let (mean, p50, max) = (
        t["mean"].as_f64().unwrap(),
        t["p50"].as_f64().unwrap(),
        t["max"].as_f64().unwrap(),
    );
    assert!(mean > 1.0 && p50 > 1.0 && max >= p50, "{t}");
    assert!(run.stdout.contains("prompt tokens: mean"), "{}", run.stdout);
}

#[test]
fn bench_sweep_runs_the_standard_concurrencies_and_charts_latency_against_load() {
    let run = common::run(&[
        "bench",
        "--spawn",
        "--sweep",
        "--num-requests",
        "8",
        "--input-len",
        "4",
        "--output-len",
        "4",
    ]);
    let json = run.json("bench.json");
    let steps = json["steps"].as_array().unwrap();
    let loads: Vec<u64> = steps
        .iter()
        .map(|s| s["load"]["concurrency"].as_u64().unwrap())
        .collect();
    assert_eq!(loads, [1, 2, 4, 8, 16, 32]);
    assert!(steps.iter().all(|s| s["overall"]["completed"] == 8));
    assert_eq!(
        run.stdout.matches("concurrency 32").count(),
        1,
        "{}",
        run.stdout
    );
    assert_eq!(run.text("bench.svg").matches("<polyline").count(), 4);
}

#[test]
fn bench_overloads_a_sim_cluster_and_the_router_refuses_low_priority_only() {
    // Two sim workers of 4 slots, 8 tokens of 10 ms each: 100 requests/s. Offered 400/s, a
    // tenth of it priority 5; the router's queue holds 4 requests per priority level.
    let run = common::run_with_env(
        &[("OPENINFER_MAX_QUEUE_PER_PRIORITY", "4")],
        &[
            "bench",
            "--spawn-sim-workers",
            "2",
            "--sim-step-time",
            "10ms",
            "--sim-max-running",
            "4",
            "--rate",
            "400",
            "--num-requests",
            "120",
            "--input-len",
            "4",
            "--output-len",
            "8",
            "--priority-mix",
            "0:90,5:10",
        ],
    );
    let json = run.json("bench.json");
    assert_eq!(json["sim"]["workers"], 2);
    assert!((json["sim"]["capacity_rps"].as_f64().unwrap() - 100.0).abs() < 1e-9);
    let step = &json["steps"][0];
    let memory = &step["server_memory"];
    assert_eq!(memory["process"], "router");
    assert!(memory["peak_rss_mib"].as_f64().unwrap() > 1.0, "{memory}");
    let (low, high) = (&step["by_priority"]["0"], &step["by_priority"]["5"]);
    assert!(low["refused"].as_u64().unwrap() > 0, "{low}");
    assert_eq!(low["errors"], 0, "{low}");
    assert_eq!(high["requests"], 12);
    assert_eq!(
        high["completed"], 12,
        "priority 5 must never be refused: {high}"
    );
    assert!(
        run.stdout.contains("router process memory"),
        "{}",
        run.stdout
    );
}

#[test]
fn bench_compares_prefix_caching_off_on_and_cache_aware() {
    let models = tempfile::tempdir().unwrap();
    let run = common::run_with_env(
        &[("OPENINFER_CACHE_DIR", models.path().to_str().unwrap())],
        &[
            "bench",
            "--prefix-cache-compare",
            "--prefix-preset",
            "tiny",
            "--prefix-groups",
            "2",
            "--prefix-questions",
            "4",
            "--prefix-words",
            "100",
            "--question-words",
            "20",
            "--output-len",
            "4",
            "--concurrency",
            "2",
        ],
    );
    assert!(run.stdout.contains("cache-aware"), "{}", run.stdout);
    let json = run.json("bench-prefix.json");
    let configs = json["configs"].as_array().unwrap();
    assert_eq!(configs.len(), 3);
    for c in configs {
        assert_eq!(c["requests"], 8, "{c}");
        assert_eq!(c["failed"], 0, "{c}");
    }
    let prefill = |i: usize| configs[i]["prefill_computed"].as_f64().unwrap();
    assert_eq!(configs[0]["hit_rate"], 0.0, "caching off reuses nothing");
    assert!(
        prefill(1) < prefill(0) && prefill(2) < prefill(0),
        "{configs:?}"
    );
    assert!(run.text("bench-prefix.svg").starts_with("<svg"));
}
