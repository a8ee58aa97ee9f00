//! `openinfer bench-engine`: prefill, single-sequence decode and batched decode speed of the
//! engine, beside HF transformers (same weights, same threads, measured in the same run) and
//! beside the machine's ceilings (memory bandwidth for decode, matmul rate for prefill).

use std::path::Path;

use anyhow::{bail, Context};
use openinfer_engine::bench::{self, Ceilings, PhaseRates};
use openinfer_engine::{parse_device, parse_dtype, DType, Engine, EngineConfig};
use serde::Serialize;

use crate::args::BenchEngineArgs;
use crate::chart::{grouped_bars, Group};

#[derive(Serialize)]
struct Report {
    model: String,
    parameters: usize,
    /// Bytes of weights read per decode step (layers + lm_head).
    step_weight_bytes: u64,
    threads: usize,
    prompt_len: usize,
    decode_steps: usize,
    batch: usize,
    repeats: usize,
    openinfer: PhaseRates,
    hf_transformers: Option<serde_json::Value>,
    ceilings: Ceilings,
    /// Per phase: openinfer ÷ HF transformers.
    ratio_vs_hf: Option<PhaseRates>,
    /// Per phase: openinfer ÷ the machine's ceiling.
    fraction_of_ceiling: PhaseRates,
}

pub fn run(a: BenchEngineArgs) -> anyhow::Result<()> {
    let threads = crate::python::threads(a.threads);
    // candle's CPU kernels read this on first use.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let model = match &a.model {
        Some(m) => {
            openinfer_engine::hub::resolve(m, &openinfer_engine::hub::HubConfig::from_env())?
        }
        None => crate::progress::preset_model(&a.cache_dir, &a.preset)?,
    };
    if a.repeats == 0 || a.batch == 0 || a.decode_steps == 0 || a.prompt_len == 0 {
        bail!("--repeats, --batch, --decode-steps and --prompt-len must be positive");
    }
    let device = parse_device(&a.device)?;
    let dtype = match &a.dtype {
        None => None,
        Some(s) => {
            Some(parse_dtype(s).with_context(|| format!("--dtype {s}: use f32, bf16 or f16"))?)
        }
    };
    let cfg = EngineConfig {
        device: device.clone(),
        dtype,
        max_batch_tokens: a.prompt_len.max(a.batch),
        max_running: a.batch.max(1),
        kv_cache_bytes: if device.is_cpu() { 1 << 30 } else { 4 << 30 },
        ..Default::default()
    };
    let pb = crate::progress::bar(0, "loading");
    let mut engine = Engine::load(&model, cfg, &|d, t| {
        pb.set_length(t as u64);
        pb.set_position(d as u64);
    })
    .with_context(|| format!("cannot load {}", model.display()))?;
    pb.finish_and_clear();
    let info = engine.info().clone();
    let mc = engine.model_config().clone();

    let pb = crate::progress::bar((3 * a.repeats + 3) as u64, "measuring");
    let mut prefill = Vec::new();
    let mut single = Vec::new();
    let mut batched = Vec::new();
    // Warm-up (untimed).
    bench::prefill_seconds(&mut engine, a.prompt_len, 0)?;
    bench::decode_tokens_and_seconds(&mut engine, 1, a.prompt_len, 2, 0)?;
    for r in 1..=a.repeats as u64 {
        prefill.push(a.prompt_len as f64 / bench::prefill_seconds(&mut engine, a.prompt_len, r)?);
        pb.inc(1);
        let (n, secs) =
            bench::decode_tokens_and_seconds(&mut engine, 1, a.prompt_len, a.decode_steps, r)?;
        single.push(n as f64 / secs);
        pb.inc(1);
        let (n, secs) = bench::decode_tokens_and_seconds(
            &mut engine,
            a.batch,
            a.prompt_len,
            a.decode_steps,
            r,
        )?;
        batched.push(n as f64 / secs);
        pb.inc(1);
    }
    let ours = PhaseRates {
        prefill_tok_s: median(prefill),
        single_decode_tok_s: median(single),
        batch_decode_tok_s: median(batched),
    };
    drop(engine);
    let ceilings = Ceilings {
        memory_bandwidth: if device.is_cpu() {
            bench::memory_bandwidth(threads)
        } else {
            bench::device_copy_bandwidth(&device)?
        },
        matmul_flops: bench::matmul_flops(&device, info.dtype)?,
    };
    pb.inc(1);
    let hf = if a.no_hf {
        None
    } else {
        run_hf(&a, &model, threads, info.dtype)?
    };
    pb.inc(2);
    pb.finish_and_clear();

    // Cost model: each decode step reads the layer weights and lm_head once and does 2 FLOPs
    // per weight per token; prefill does the layers for every token and lm_head once.
    let elem = info.dtype.size_in_bytes() as f64;
    let (layer_w, head_w) = (mc.layer_parameters() as f64, mc.lm_head_parameters() as f64);
    let step_bytes = (layer_w + head_w) * elem;
    let decode_floor = |batch: f64| {
        (step_bytes / ceilings.memory_bandwidth)
            .max(batch * 2.0 * (layer_w + head_w) / ceilings.matmul_flops)
    };
    let p = a.prompt_len as f64;
    let prefill_floor = (p * 2.0 * layer_w + 2.0 * head_w) / ceilings.matmul_flops;
    let fraction = PhaseRates {
        prefill_tok_s: ours.prefill_tok_s / (p / prefill_floor),
        single_decode_tok_s: ours.single_decode_tok_s / (1.0 / decode_floor(1.0)),
        batch_decode_tok_s: ours.batch_decode_tok_s
            / (a.batch as f64 / decode_floor(a.batch as f64)),
    };
    let ratio = hf.as_ref().map(|h| {
        let get = |k: &str| h.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
        PhaseRates {
            prefill_tok_s: ours.prefill_tok_s / get("prefill_tok_s"),
            single_decode_tok_s: ours.single_decode_tok_s / get("single_decode_tok_s"),
            batch_decode_tok_s: ours.batch_decode_tok_s / get("batch_decode_tok_s"),
        }
    });
    let report = Report {
        model: model.display().to_string(),
        parameters: info.num_parameters,
        step_weight_bytes: step_bytes as u64,
        threads,
        prompt_len: a.prompt_len,
        decode_steps: a.decode_steps,
        batch: a.batch,
        repeats: a.repeats,
        openinfer: ours,
        hf_transformers: hf,
        ceilings,
        ratio_vs_hf: ratio,
        fraction_of_ceiling: fraction,
    };
    print_table(&report);
    write_outputs(&report, &a.out)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The name `scripts/bench_hf.py` takes for `dtype`.
fn dtype_name(dtype: DType) -> String {
    match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
    .into()
}

/// Runs `scripts/bench_hf.py` with the same settings; `None` when no such Python exists.
fn run_hf(
    a: &BenchEngineArgs,
    model: &Path,
    threads: usize,
    dtype: DType,
) -> anyhow::Result<Option<serde_json::Value>> {
    crate::python::run_script(
        &a.python,
        "bench_hf.py",
        model,
        threads,
        &[
            ("--prompt-len", a.prompt_len.to_string()),
            ("--decode-steps", a.decode_steps.to_string()),
            ("--batch", a.batch.to_string()),
            ("--repeats", a.repeats.to_string()),
            ("--device", a.device.clone()),
            ("--dtype", dtype_name(dtype)),
        ],
    )
}

fn print_table(r: &Report) {
    let hf = |k: &str| {
        r.hf_transformers
            .as_ref()
            .and_then(|h| h.get(k))
            .and_then(|v| v.as_f64())
    };
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let ratio = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}x"));
    println!(
        "model {} ({:.1}M parameters, {:.0} MB read per decode step), {} threads, prompt {} tokens, {} decode steps, batch {}",
        r.model,
        r.parameters as f64 / 1e6,
        r.step_weight_bytes as f64 / 1e6,
        r.threads,
        r.prompt_len,
        r.decode_steps,
        r.batch
    );
    println!(
        "ceilings: memory bandwidth {:.1} GB/s, f32 matmul {:.1} GFLOP/s",
        r.ceilings.memory_bandwidth / 1e9,
        r.ceilings.matmul_flops / 1e9
    );
    println!(
        "{:<22} {:>14} {:>16} {:>10} {:>12}",
        "phase", "openinfer tok/s", "transformers tok/s", "ratio", "of ceiling"
    );
    let rows = [
        (
            "prefill",
            r.openinfer.prefill_tok_s,
            "prefill_tok_s",
            r.ratio_vs_hf.map(|x| x.prefill_tok_s),
            r.fraction_of_ceiling.prefill_tok_s,
        ),
        (
            "decode, 1 sequence",
            r.openinfer.single_decode_tok_s,
            "single_decode_tok_s",
            r.ratio_vs_hf.map(|x| x.single_decode_tok_s),
            r.fraction_of_ceiling.single_decode_tok_s,
        ),
        (
            "decode, batch",
            r.openinfer.batch_decode_tok_s,
            "batch_decode_tok_s",
            r.ratio_vs_hf.map(|x| x.batch_decode_tok_s),
            r.fraction_of_ceiling.batch_decode_tok_s,
        ),
    ];
    for (name, ours, key, ratio_v, frac) in rows {
        println!(
            "{name:<22} {ours:>14.1} {:>16} {:>10} {:>11.0}%",
            fmt(hf(key)),
            ratio(ratio_v),
            frac * 100.0
        );
    }
}

fn write_outputs(r: &Report, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let json = out.join("bench-engine.json");
    std::fs::write(&json, serde_json::to_string_pretty(r)?)?;
    let hf = |k: &str| {
        r.hf_transformers
            .as_ref()
            .and_then(|h| h.get(k))
            .and_then(|v| v.as_f64())
    };
    let groups = vec![
        Group {
            label: "prefill tok/s".into(),
            values: vec![Some(r.openinfer.prefill_tok_s), hf("prefill_tok_s")],
        },
        Group {
            label: "decode tok/s (1 seq)".into(),
            values: vec![
                Some(r.openinfer.single_decode_tok_s),
                hf("single_decode_tok_s"),
            ],
        },
        Group {
            label: format!("decode tok/s (batch {})", r.batch),
            values: vec![
                Some(r.openinfer.batch_decode_tok_s),
                hf("batch_decode_tok_s"),
            ],
        },
    ];
    let svg = out.join("bench-engine.svg");
    std::fs::write(
        &svg,
        grouped_bars(
            &format!("Engine speed, {} threads (higher is better)", r.threads),
            &["openinfer", "HF transformers"],
            &groups,
        ),
    )?;
    println!("wrote {} and {}", json.display(), svg.display());
    Ok(())
}
