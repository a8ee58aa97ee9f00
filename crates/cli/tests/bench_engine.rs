//! `openinfer bench-engine` runs end to end on a small model and writes its table, JSON and
//! SVG chart (without the HF baseline, which needs torch).

mod common;

#[test]
fn bench_engine_writes_json_and_chart() {
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama");
    let run = common::run(&[
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
        "--kv-cache-dtype",
        "f16",
        "--model",
        model.to_str().unwrap(),
    ]);
    assert!(run.stdout.contains("decode, batch"), "{}", run.stdout);
    let json = run.json("bench-engine.json");
    for phase in ["prefill_tok_s", "single_decode_tok_s", "batch_decode_tok_s"] {
        let v = json["openinfer"][phase].as_f64().unwrap();
        assert!(v > 0.0 && v.is_finite(), "{phase} = {v}");
        assert!(json["fraction_of_ceiling"][phase].as_f64().unwrap() > 0.0);
    }
    assert!(json["hf_transformers"].is_null());
    assert_eq!(json["kv_cache_dtype"], "f16", "the cache the run measured");
    assert!(run.stdout.contains("f16 KV cache"), "{}", run.stdout);
    let svg = run.text("bench-engine.svg");
    assert!(svg.starts_with("<svg") && svg.contains("decode, batch 3 tok/s"));
}
