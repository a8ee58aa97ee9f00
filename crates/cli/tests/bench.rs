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
