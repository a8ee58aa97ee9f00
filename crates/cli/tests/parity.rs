//! `openinfer parity` checks the engine against the committed HF transformers references on
//! this machine's device: in f32 on CPU every token matches; a tolerance it cannot meet fails
//! the command.

mod common;

use std::path::Path;
use std::process::Command;

fn fixtures() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .display()
        .to_string()
}

#[test]
fn every_reference_matches_in_f32_on_cpu() {
    let run = common::run(&[
        "parity",
        "--fixtures",
        &fixtures(),
        "--kv-cache-memory",
        "16MiB",
    ]);
    let report = run.json("parity.json");
    assert_eq!(report["passed"], true, "{}", run.stdout);
    let cases = report["cases"].as_array().unwrap();
    assert!(cases.len() >= 24, "{} cases", cases.len());
    for c in cases {
        assert_eq!(c["matched"], c["tokens"], "{c}");
    }
}

#[test]
fn a_tolerance_that_is_not_met_fails_the_command() {
    let out = tempfile::tempdir().unwrap();
    let done = Command::new(env!("CARGO_BIN_EXE_openinfer"))
        .args([
            "parity",
            "--fixtures",
            &fixtures(),
            "--kv-cache-memory",
            "16MiB",
        ])
        .args([
            "--dtype",
            "bf16",
            "--logprob-tolerance",
            "0.000001",
            "--out",
        ])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(!done.status.success());
    assert!(String::from_utf8_lossy(&done.stdout).contains("FAILED"));
}
