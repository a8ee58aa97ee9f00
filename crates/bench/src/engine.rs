//! `openinfer bench-engine`: prefill, single-sequence decode and batched decode speed of the
//! engine, beside its peers on the same weights with the same threads, measured in the same run
//! (HF transformers on a model directory; llama.cpp on a GGUF file), and beside the machine's
//! ceilings (memory bandwidth for decode, matmul rate for prefill).

use std::path::Path;

use anyhow::{bail, Context};
use openinfer_engine::bench::{self, Ceilings, PhaseRates};
use openinfer_engine::{
    parse_device, parse_dtype, parse_kv_cache_dtype, DType, Engine, EngineConfig, StepTimeBudget,
};
use serde::Serialize;

use crate::args::BenchEngineArgs;
use crate::chart::{grouped_bars, Group};
use crate::llama_cpp;
use crate::stats::median;

#[derive(Serialize)]
struct Report {
    model: String,
    parameters: usize,
    /// Bytes of weights read per decode step (layers + lm_head).
    step_weight_bytes: u64,
    threads: usize,
    /// What the KV cache holds, in both engines.
    kv_cache_dtype: String,
    prompt_len: usize,
    decode_steps: usize,
    batch: usize,
    repeats: usize,
    openinfer: PhaseRates,
    hf_transformers: Option<serde_json::Value>,
    llama_cpp: Option<PhaseRates>,
    ceilings: Ceilings,
    /// Per phase: openinfer ÷ HF transformers.
    ratio_vs_hf: Option<PhaseRates>,
    /// Per phase: openinfer ÷ llama.cpp.
    ratio_vs_llama_cpp: Option<PhaseRates>,
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
    let kv_cache_dtype = parse_kv_cache_dtype(&a.kv_cache_dtype)?;
    let cfg = EngineConfig {
        device: device.clone(),
        dtype,
        kv_cache_dtype,
        max_batch_tokens: a.prompt_len.max(a.batch),
        max_running: a.batch.max(1),
        // The phases time the engine's kernels: a batch's prompts prefill whole before its
        // timed decode steps (as llama.cpp's benchmarks do), not in chunks sized beside the
        // decodes of the sequences that started first.
        step_time_budget: StepTimeBudget::Off,
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
    let is_gguf = model.is_file();
    let hf = if a.no_hf {
        None
    } else if is_gguf {
        tracing::warn!(
            "--model is a GGUF file: no HF transformers baseline (it takes a model directory)"
        );
        None
    } else {
        run_hf(&a, &model, threads, info.dtype)?
    };
    pb.inc(1);
    let llama_cpp = run_llama_cpp(&a, &model, is_gguf, threads, info.kv_cache_dtype)?;
    pb.inc(1);
    pb.finish_and_clear();

    // Cost model: each decode step reads the layer weights and lm_head once, as held in memory,
    // and does 2 FLOPs per weight per token; prefill does the layers for every token and
    // lm_head once.
    let (layer_w, head_w) = (mc.layer_parameters() as f64, mc.lm_head_parameters() as f64);
    let step_bytes = info.step_weight_bytes as f64;
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
    let hf_rates = hf.as_ref().map(|h| {
        let get = |k: &str| h.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
        PhaseRates {
            prefill_tok_s: get("prefill_tok_s"),
            single_decode_tok_s: get("single_decode_tok_s"),
            batch_decode_tok_s: get("batch_decode_tok_s"),
        }
    });
    let ratio_to = |peer: &PhaseRates| PhaseRates {
        prefill_tok_s: ours.prefill_tok_s / peer.prefill_tok_s,
        single_decode_tok_s: ours.single_decode_tok_s / peer.single_decode_tok_s,
        batch_decode_tok_s: ours.batch_decode_tok_s / peer.batch_decode_tok_s,
    };
    let report = Report {
        model: model.display().to_string(),
        parameters: info.num_parameters,
        step_weight_bytes: step_bytes as u64,
        threads,
        kv_cache_dtype: info.kv_cache_dtype.as_str().into(),
        prompt_len: a.prompt_len,
        decode_steps: a.decode_steps,
        batch: a.batch,
        repeats: a.repeats,
        openinfer: ours,
        hf_transformers: hf,
        llama_cpp,
        ceilings,
        ratio_vs_hf: hf_rates.as_ref().map(ratio_to),
        ratio_vs_llama_cpp: llama_cpp.as_ref().map(ratio_to),
        fraction_of_ceiling: fraction,
    };
    let peers: Vec<(&str, PhaseRates)> = [("transformers", hf_rates), ("llama.cpp", llama_cpp)]
        .into_iter()
        .filter_map(|(name, r)| r.map(|r| (name, r)))
        .collect();
    print_table(&report, &peers);
    write_outputs(&report, &peers, &a.out)
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

/// Runs llama.cpp on `model` when it is a GGUF file and the binaries are built.
fn run_llama_cpp(
    a: &BenchEngineArgs,
    model: &Path,
    is_gguf: bool,
    threads: usize,
    kv_cache_dtype: DType,
) -> anyhow::Result<Option<PhaseRates>> {
    if a.no_llama_cpp {
        return Ok(None);
    }
    if !is_gguf {
        tracing::info!("--model is not a GGUF file: no llama.cpp peer");
        return Ok(None);
    }
    let Some((bench, batched)) = llama_cpp::find(&a.llama_cpp) else {
        tracing::warn!(
            dir = %a.llama_cpp.display(),
            "no llama-bench / llama-batched-bench here: skipping llama.cpp (run scripts/build-llama-cpp.sh)"
        );
        return Ok(None);
    };
    let settings = llama_cpp::Settings {
        threads,
        prompt_len: a.prompt_len,
        decode_steps: a.decode_steps,
        batch: a.batch,
        repeats: a.repeats,
        // llama.cpp names these types as candle does.
        kv_cache_type: kv_cache_dtype.as_str(),
    };
    llama_cpp::measure(&bench, &batched, model, &settings).map(Some)
}

/// A phase's rate out of a [`PhaseRates`].
type Rate = fn(&PhaseRates) -> f64;

/// The three phases: label, and each one's rate.
fn phases(batch: usize) -> [(String, Rate); 3] {
    [
        ("prefill".into(), |r| r.prefill_tok_s),
        ("decode, 1 sequence".into(), |r| r.single_decode_tok_s),
        (format!("decode, batch {batch}"), |r| r.batch_decode_tok_s),
    ]
}

fn print_table(r: &Report, peers: &[(&str, PhaseRates)]) {
    println!(
        "model {} ({:.1}M parameters, {:.0} MB read per decode step), {} threads, {} KV cache, prompt {} tokens, {} decode steps, batch {}",
        r.model,
        r.parameters as f64 / 1e6,
        r.step_weight_bytes as f64 / 1e6,
        r.threads,
        r.kv_cache_dtype,
        r.prompt_len,
        r.decode_steps,
        r.batch
    );
    println!(
        "ceilings: memory bandwidth {:.1} GB/s, f32 matmul {:.1} GFLOP/s",
        r.ceilings.memory_bandwidth / 1e9,
        r.ceilings.matmul_flops / 1e9
    );
    let mut head = format!("{:<20} {:>15}", "phase", "openinfer tok/s");
    for (name, _) in peers {
        head += &format!(" {:>18} {:>8}", format!("{name} tok/s"), "ratio");
    }
    println!("{head} {:>11}", "of ceiling");
    for (label, rate) in phases(r.batch) {
        let ours = rate(&r.openinfer);
        let mut line = format!("{label:<20} {ours:>15.1}");
        for (_, p) in peers {
            line += &format!(" {:>18.1} {:>7.2}x", rate(p), ours / rate(p));
        }
        println!("{line} {:>10.0}%", rate(&r.fraction_of_ceiling) * 100.0);
    }
}

fn write_outputs(r: &Report, peers: &[(&str, PhaseRates)], out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let json = out.join("bench-engine.json");
    std::fs::write(&json, serde_json::to_string_pretty(r)?)?;
    let groups = phases(r.batch)
        .into_iter()
        .map(|(label, rate)| Group {
            label: format!("{label} tok/s"),
            values: std::iter::once(Some(rate(&r.openinfer)))
                .chain(peers.iter().map(|(_, p)| Some(rate(p))))
                .collect(),
        })
        .collect::<Vec<_>>();
    let names: Vec<&str> = std::iter::once("openinfer")
        .chain(peers.iter().map(|(n, _)| *n))
        .collect();
    let svg = out.join("bench-engine.svg");
    std::fs::write(
        &svg,
        grouped_bars(
            &format!("Engine speed, {} threads (higher is better)", r.threads),
            &names,
            &groups,
        ),
    )?;
    println!("wrote {} and {}", json.display(), svg.display());
    Ok(())
}
