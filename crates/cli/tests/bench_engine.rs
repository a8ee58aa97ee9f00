//! `openinfer bench-engine` runs end to end on a small model and writes its table, JSON and
//! SVG chart (without the HF baseline, which needs torch).

use std::process::Command;

#[test]
fn bench_engine_writes_json_and_chart() {
    let out = tempfile::tempdir().unwrap();
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama");
    let run = Command::new(env!("CARGO_BIN_EXE_openinfer"))
        .args([
            "bench-engine",
            "--no-hf",
            "--repeats",
            "1",
            "--prompt-len",
            "16",
            "--decode-steps",
            "4",
            "--batch",
            "3",
        ])
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{}\n{}",
        stdout,
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("decode, batch"), "{stdout}");
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("bench-engine.json")).unwrap(),
    )
    .unwrap();
    for phase in ["prefill_tok_s", "single_decode_tok_s", "batch_decode_tok_s"] {
        let v = json["openinfer"][phase].as_f64().unwrap();
        assert!(v > 0.0 && v.is_finite(), "{phase} = {v}");
        assert!(json["fraction_of_ceiling"][phase].as_f64().unwrap() > 0.0);
    }
    assert!(json["hf_transformers"].is_null());
    let svg = std::fs::read_to_string(out.path().join("bench-engine.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("decode tok/s (batch 3)"));
}
