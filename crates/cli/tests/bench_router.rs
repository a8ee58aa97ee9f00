//! `openinfer bench-router` runs end to end (sim workers, a router, many streams) and writes its
//! JSON and SVG chart.

use std::process::Command;

#[test]
fn bench_router_measures_ttft_and_holds_every_stream() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_openinfer"))
        .args([
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
    assert!(stdout.contains("router adds"), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("bench-router.json")).unwrap())
            .unwrap();
    assert_eq!(json["ttft"]["router"]["n"], 10);
    let rounds = json["streams"]["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    for r in rounds {
        assert_eq!(r["completed"], 300, "{r}");
        assert_eq!(r["failed"], 0);
        assert!(r["router_rss_peak_bytes"].as_u64().unwrap() > 0);
    }
    let svg = std::fs::read_to_string(out.path().join("bench-router.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("through the router"));
}
