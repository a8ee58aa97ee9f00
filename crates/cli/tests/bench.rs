//! `openinfer bench --spawn` loads the embedded server end to end and writes its report, with
//! a per-priority breakdown and goodput.

use std::process::Command;

#[test]
fn bench_loads_the_embedded_server_and_reports_per_priority() {
    let out = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_openinfer"))
        .env("XDG_CACHE_HOME", cache.path())
        .args([
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
            "--out",
        ])
        .arg(out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("prio 5"), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("bench.json")).unwrap()).unwrap();
    let all = &json["overall"];
    assert_eq!(all["requests"], 12);
    assert_eq!(all["completed"], 12, "{all}");
    assert_eq!(all["slo_met"], 12);
    assert!(all["ttft_ms"]["p50"].as_f64().unwrap() > 0.0);
    assert!(all["output_tokens_per_s"].as_f64().unwrap() > 0.0);
    let by = json["by_priority"].as_object().unwrap();
    assert_eq!(by.len(), 2);
    let n: u64 = by.values().map(|g| g["completed"].as_u64().unwrap()).sum();
    assert_eq!(n, 12);
}

#[test]
fn bench_reads_prompts_lengths_and_priorities_from_a_dataset() {
    let out = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let dataset = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/bench/sample.jsonl");
    let run = Command::new(env!("CARGO_BIN_EXE_openinfer"))
        .env("XDG_CACHE_HOME", cache.path())
        .args([
            "bench",
            "--spawn",
            "--num-requests",
            "6",
            "--output-len",
            "32",
            "--dataset",
        ])
        .arg(&dataset)
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("bench.json")).unwrap()).unwrap();
    // The sample's priorities, and its output lengths capped at --output-len:
    // 24 + min(48, 32) + 16 + 20 + 32 + 32 (default) tokens.
    let by = json["by_priority"].as_object().unwrap();
    let keys: Vec<&str> = by.keys().map(String::as_str).collect();
    assert_eq!(keys, ["-1", "0", "5"]);
    assert_eq!(json["overall"]["completed"], 6);
    let tokens = json["overall"]["output_tokens_per_s"].as_f64().unwrap()
        * json["wall_seconds"].as_f64().unwrap();
    assert!((tokens - 156.0).abs() < 0.5, "{tokens} output tokens");
}
