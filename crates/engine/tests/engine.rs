//! Engine behaviour on a random-weight model made by `make_model`: cancellation frees KV at
//! once, running out of blocks preempts instead of crashing, seeded sampling is independent of
//! batch mates, stop strings, streaming text, request validation and model-directory errors.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use openinfer_core::{FinishReason, SamplingParams, SequenceId};
use openinfer_engine::make_model::{make_model, ModelSpec};
use openinfer_engine::{Engine, EngineConfig, EngineError, ModelDir};

fn tiny(dir: &Path) {
    let spec = ModelSpec {
        vocab_size: 600,
        ..ModelSpec::preset("tiny").unwrap()
    };
    make_model(&spec, dir, &|_, _| {}).unwrap();
}

fn engine(cfg: EngineConfig) -> (tempfile::TempDir, Engine) {
    let tmp = tempfile::tempdir().unwrap();
    tiny(tmp.path());
    let e = load(tmp.path(), cfg);
    (tmp, e)
}

fn prompt(e: &Engine, text: &str) -> Vec<u32> {
    e.tokenizer().encode_prompt(text).unwrap()
}

#[test]
fn cancel_frees_blocks_at_once_and_unknown_ids_are_ignored() {
    let (_d, mut e) = engine(EngineConfig::default());
    let total = e.capacity().total_blocks;
    let p = prompt(
        &e,
        "a fairly long prompt that takes a few blocks of the cache to hold",
    );
    e.add(greedy(1, &p, 200)).unwrap();
    e.add(greedy(2, &p, 200)).unwrap();
    for _ in 0..3 {
        e.step().unwrap();
    }
    let used = total - e.capacity().free_blocks;
    assert!(used >= 2 * p.len().div_ceil(16));
    let f = e.cancel(SequenceId(1)).expect("running");
    assert_eq!(f.reason, FinishReason::Cancelled);
    assert!(
        e.capacity().free_blocks > total - used,
        "blocks return without another step"
    );
    assert!(e.cancel(SequenceId(1)).is_none());
    assert!(e.cancel(SequenceId(99)).is_none());
    e.cancel(SequenceId(2)).unwrap();
    assert_eq!(e.capacity().free_blocks, total);
    assert!(!e.has_work());
}

#[test]
fn out_of_blocks_preempts_and_everything_still_finishes() {
    // 8 blocks of 16 slots: far less than 6 sequences of 60 tokens need.
    let per_block = 2 * 2 * 16 * 2 * 32 * 4;
    let (_d, mut e) = engine(EngineConfig {
        kv_cache_bytes: per_block * 8,
        max_model_len: Some(128),
        ..Default::default()
    });
    assert_eq!(e.capacity().total_blocks, 8);
    let p = prompt(&e, "The router decides which request runs next");
    let reqs: Vec<_> = (0..6).map(|i| greedy(i, &p, 60 - p.len() as u32)).collect();
    let alone = {
        let (_d2, mut solo) = engine(EngineConfig::default());
        run_all(&mut solo, vec![reqs[0].clone()])[&0].tokens.clone()
    };
    let got = run_all(&mut e, reqs);
    assert!(
        got.values().map(|o| o.preemptions).sum::<usize>() > 0,
        "expected preemptions"
    );
    for o in got.values() {
        assert_eq!(o.finished.as_ref().unwrap().reason, FinishReason::Length);
        assert_eq!(
            o.tokens, alone,
            "resumed greedy sequences produce what they produce alone"
        );
    }
    assert_eq!(e.capacity().free_blocks, 8);
}

#[test]
fn seeded_sampling_ignores_batch_mates() {
    let (_d, mut e) = engine(EngineConfig::default());
    let p = prompt(&e, "Once upon a time");
    let sampled = |id: u64, seed: u64| {
        let mut r = greedy(id, &p, 20);
        r.sampling = SamplingParams {
            temperature: Some(1.0),
            top_p: Some(0.95),
            top_k: Some(50),
            seed: Some(seed),
            ..Default::default()
        };
        r
    };
    let alone = run_all(&mut e, vec![sampled(1, 7)])[&1].tokens.clone();
    let other = prompt(&e, "Completely different words here, and more of them");
    let mut mates = vec![sampled(2, 7), greedy(3, &other, 30), sampled(4, 8)];
    mates[1].sampling.temperature = Some(0.7);
    let got = run_all(&mut e, mates);
    assert_eq!(
        got[&2].tokens, alone,
        "same seed, same output regardless of batch mates"
    );
    assert_ne!(got[&4].tokens, alone, "another seed gives another output");
}

#[test]
fn stop_strings_cut_the_text_and_deltas_concatenate() {
    let (_d, mut e) = engine(EngineConfig::default());
    let p = prompt(&e, "Numbers like 1, 2, 3");
    let full = run_all(&mut e, vec![greedy(1, &p, 40)]).remove(&1).unwrap();
    assert_eq!(
        full.text,
        e.tokenizer().decode(&full.tokens).unwrap(),
        "deltas concatenate to the decoded text"
    );
    // Pick a stop string from the middle of the output (on char boundaries).
    let chars: Vec<(usize, char)> = full.text.char_indices().collect();
    assert!(chars.len() > 10, "output text too short: {:?}", full.text);
    let (a, b) = (chars[chars.len() / 2].0, chars[chars.len() / 2 + 3].0);
    let stop = full.text[a..b].to_string();
    let first = full.text.find(&stop).unwrap();
    let mut req = greedy(2, &p, 40);
    req.stopping.stop = vec![stop.clone()];
    let got = run_all(&mut e, vec![req]).remove(&2).unwrap();
    assert_eq!(got.finished.unwrap().reason, FinishReason::Stop);
    assert_eq!(
        got.text,
        full.text[..first],
        "text ends right before the stop string {stop:?}"
    );
    assert!(got.tokens.len() <= full.tokens.len());
}

#[test]
fn eos_ends_the_sequence_unless_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    tiny(tmp.path());
    let mut e = load(tmp.path(), EngineConfig::default());
    let p = prompt(&e, "The weather was cold");
    let full = run_all(&mut e, vec![greedy(1, &p, 12)])
        .remove(&1)
        .unwrap()
        .tokens;
    // Declare a token the model produces as eos (the first one not seen before it).
    let at = (2..full.len())
        .find(|&i| !full[..i].contains(&full[i]))
        .expect("a fresh token");
    std::fs::write(
        tmp.path().join("generation_config.json"),
        format!(
            "{{\"bos_token_id\": 1, \"eos_token_id\": [2, {}]}}",
            full[at]
        ),
    )
    .unwrap();
    let mut e = load(tmp.path(), EngineConfig::default());
    assert!(e.info().eos_token_ids.contains(&full[at]));
    let mut stop_at_eos = greedy(2, &p, 12);
    stop_at_eos.stopping.ignore_eos = false;
    let got = run_all(&mut e, vec![stop_at_eos, greedy(3, &p, 12)]);
    assert_eq!(got[&2].finished.as_ref().unwrap().reason, FinishReason::Eos);
    assert_eq!(
        got[&2].tokens,
        full[..=at],
        "stops at eos, eos token included, nothing after"
    );
    assert_eq!(got[&3].tokens, full, "ignore_eos runs to max_new_tokens");
    assert_eq!(
        got[&3].finished.as_ref().unwrap().reason,
        FinishReason::Length
    );
}

#[test]
fn bad_requests_are_refused_and_change_nothing() {
    let (_d, mut e) = engine(EngineConfig {
        max_model_len: Some(64),
        max_waiting: 2,
        ..Default::default()
    });
    let before = e.capacity();
    let p = prompt(&e, "hello");
    type Edit = Box<dyn Fn(&mut openinfer_engine::SequenceRequest)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("prompt_ids", Box::new(|r| r.prompt.clear())),
        ("prompt_ids", Box::new(|r| r.prompt.push(100_000))),
        (
            "max_new_tokens",
            Box::new(|r| r.stopping.max_new_tokens = 0),
        ),
        (
            "max_new_tokens",
            Box::new(|r| r.stopping.max_new_tokens = 64),
        ),
        (
            "temperature",
            Box::new(|r| r.sampling.temperature = Some(-1.0)),
        ),
        ("top_p", Box::new(|r| r.sampling.top_p = Some(0.0))),
        ("top_p", Box::new(|r| r.sampling.top_p = Some(1.5))),
        (
            "repetition_penalty",
            Box::new(|r| r.sampling.repetition_penalty = Some(0.0)),
        ),
        ("top_logprobs", Box::new(|r| r.top_logprobs = 1000)),
    ];
    for (field, edit) in cases {
        let mut r = greedy(1, &p, 8);
        edit(&mut r);
        match e.add(r) {
            Err(EngineError::InvalidRequest { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: expected InvalidRequest, got {other:?}"),
        }
        assert_eq!(e.capacity(), before);
    }
    e.add(greedy(1, &p, 8)).unwrap();
    assert!(matches!(
        e.add(greedy(1, &p, 8)),
        Err(EngineError::DuplicateSequence(1))
    ));
    e.add(greedy(2, &p, 8)).unwrap();
    assert!(
        matches!(e.add(greedy(3, &p, 8)), Err(EngineError::Capacity(_))),
        "waiting queue bounded"
    );
}

#[test]
fn model_directory_errors_name_the_file_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    tiny(&dir);
    let err = |d: &Path| ModelDir::open(d).err().expect("should fail").to_string();

    std::fs::rename(dir.join("tokenizer.json"), tmp.path().join("tok")).unwrap();
    assert!(err(&dir).contains("tokenizer.json"), "{}", err(&dir));
    std::fs::rename(tmp.path().join("tok"), dir.join("tokenizer.json")).unwrap();

    let cfg_path = dir.join("config.json");
    let original = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        original
            .replace("LlamaForCausalLM", "FalconForCausalLM")
            .replace("\"llama\"", "\"falcon\""),
    )
    .unwrap();
    let e = err(&dir);
    assert!(
        e.contains("config.json") && e.contains("architectures") && e.contains("FalconForCausalLM"),
        "{e}"
    );

    // A wrong shape: claim a bigger hidden size than the weights have.
    std::fs::write(
        &cfg_path,
        original.replace("\"intermediate_size\": 384", "\"intermediate_size\": 512"),
    )
    .unwrap();
    let e = Engine::load(&dir, EngineConfig::default(), &|_, _| {})
        .err()
        .expect("shape mismatch")
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("mlp.gate_proj.weight") && e.contains("384"),
        "{e}"
    );
    std::fs::write(&cfg_path, &original).unwrap();

    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert!(err(&dir).contains("model.safetensors"));
    assert!(err(&tmp.path().join("nope")).contains("not a directory"));
}

#[test]
fn step_budget_bounds_prefill_and_decode_is_one_batch() {
    let (_d, mut e) = engine(EngineConfig {
        max_batch_tokens: 32,
        ..Default::default()
    });
    let long: Vec<u32> = (0..100).map(|i| 10 + (i % 500) as u32).collect();
    let short = prompt(&e, "hi");
    for i in 0..4 {
        e.add(greedy(i, &short, 20)).unwrap();
    }
    e.add(greedy(9, &long, 4)).unwrap();
    let mut outs = HashMap::new();
    let mut max_tokens = 0;
    for _ in 0..10 {
        let out = e.step().unwrap();
        max_tokens = max_tokens.max(out.batch_tokens);
        if out.batch_sequences == 5 {
            assert!(out.batch_tokens <= 32);
        }
        for t in out.tokens {
            *outs.entry(t.id.0).or_insert(0) += 1;
        }
    }
    assert!(max_tokens <= 32, "step budget respected: {max_tokens}");
    assert!(
        outs.get(&0).copied().unwrap_or(0) >= 8,
        "short sequences decode while the long prompt prefills in chunks"
    );
}

#[test]
fn half_precision_dtypes_load_and_track_f32() {
    use candle_core::DType;
    let dir = fixtures().join("llama");
    let run = |dir: &std::path::Path, dtype: DType| {
        let mut e = load(
            dir,
            EngineConfig {
                dtype: Some(dtype),
                ..Default::default()
            },
        );
        assert_eq!(e.info().dtype, dtype);
        let p = e
            .tokenizer()
            .encode_prompt("The sun rises in the east.")
            .unwrap();
        let mut r = greedy(1, &p, 8);
        r.logprobs = true;
        run_all(&mut e, vec![r]).remove(&1).unwrap()
    };
    let reference = run(&dir, DType::F32);
    for dtype in [DType::BF16, DType::F16] {
        let got = run(&dir, dtype);
        assert_eq!(got.tokens.len(), 8);
        // Half precision tracks f32 on the prompt's logits. (Later tokens of this random
        // model sit within a few hundredths of a nat of each other, where rounding the
        // weights may pick either.)
        assert_eq!(got.tokens[0], reference.tokens[0], "{dtype:?}");
        let drift = (got.logprobs[0].logprob - reference.logprobs[0].logprob).abs();
        assert!(drift < 0.05, "{dtype:?}: first logprob moved {drift}");
        // On CPU the weight matrices stay half precision and everything else is f32: exactly
        // an f32 run of the same weights rounded to the half type (norms kept f32).
        let rounded = tempfile::tempdir().unwrap();
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, rounded.path().join(f.file_name().unwrap())).unwrap();
        }
        let weights = dir.join("model.safetensors");
        let tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
        let tensors: std::collections::HashMap<String, candle_core::Tensor> = tensors
            .into_iter()
            .map(|(name, t)| {
                let t = if name.contains("norm") {
                    t
                } else {
                    t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap()
                };
                (name, t)
            })
            .collect();
        candle_core::safetensors::save(&tensors, rounded.path().join("model.safetensors")).unwrap();
        let want = run(rounded.path(), DType::F32);
        assert_eq!(got.tokens, want.tokens, "{dtype:?}");
        for (a, b) in got.logprobs.iter().zip(&want.logprobs) {
            assert!(
                (a.logprob - b.logprob).abs() < 1e-4,
                "{dtype:?}: {} vs {} for the rounded weights in f32",
                a.logprob,
                b.logprob
            );
        }
    }
}

#[test]
fn a_missing_shard_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("llama3");
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    assert!(ModelDir::open(tmp.path()).is_ok(), "the sharded copy loads");
    std::fs::remove_file(tmp.path().join("model-00003-of-00005.safetensors")).unwrap();
    let e = ModelDir::open(tmp.path())
        .err()
        .expect("missing shard")
        .to_string();
    assert!(
        e.contains("model-00003-of-00005.safetensors")
            && e.contains("model.safetensors.index.json"),
        "{e}"
    );
}
