//! The benchmarks' flags (each with an `OPENINFER_*` variable).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use openinfer_core::units::parse_duration;

#[derive(Debug, Args)]
pub struct BenchEngineArgs {
    /// Model: a directory, a GGUF file or a Hub id; default: the --preset model, made on first
    /// use under --cache-dir.
    #[arg(long, env = "OPENINFER_MODEL")]
    pub model: Option<PathBuf>,
    /// Preset made and measured when no --model is given (`small` for CPU, `llama3-8b` for
    /// a GPU).
    #[arg(long, env = "OPENINFER_BENCH_PRESET", default_value = "small")]
    pub preset: String,
    /// Compute device for both engines: cpu, cuda or cuda:N.
    #[arg(long, env = "OPENINFER_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Compute dtype for both engines (default: f32 on CPU, bf16 on CUDA).
    #[arg(long, env = "OPENINFER_DTYPE")]
    pub dtype: Option<String>,
    /// What the KV cache holds, in openinfer and in llama.cpp alike (`-ctk`/`-ctv`): auto (the
    /// compute dtype), f32, f16 or bf16. llama.cpp's own default is f16.
    #[arg(long, env = "OPENINFER_KV_CACHE_DTYPE", default_value = "auto")]
    pub kv_cache_dtype: String,
    /// Where generated models are kept.
    #[arg(
        long,
        env = "OPENINFER_CACHE_DIR",
        default_value = "target/openinfer-models"
    )]
    pub cache_dir: PathBuf,
    /// Prompt tokens for prefill and before decoding.
    #[arg(long, env = "OPENINFER_BENCH_PROMPT_LEN", default_value_t = 128)]
    pub prompt_len: usize,
    /// Decode steps measured.
    #[arg(long, env = "OPENINFER_BENCH_DECODE_STEPS", default_value_t = 32)]
    pub decode_steps: usize,
    /// Sequences in the batched decode measurement.
    #[arg(long, env = "OPENINFER_BENCH_BATCH", default_value_t = 16)]
    pub batch: usize,
    /// Repetitions; the median is reported.
    #[arg(long, env = "OPENINFER_BENCH_REPEATS", default_value_t = 3)]
    pub repeats: usize,
    /// Python with torch + transformers for the HF baseline (skipped when absent).
    #[arg(
        long,
        env = "OPENINFER_BENCH_PYTHON",
        default_value = ".venv/bin/python"
    )]
    pub python: PathBuf,
    /// Skip the HF transformers baseline.
    #[arg(long, env = "OPENINFER_BENCH_NO_HF")]
    pub no_hf: bool,
    /// llama.cpp's bin directory (llama-bench, llama-batched-bench), run beside the engine on
    /// the same file when --model is a GGUF file; scripts/build-llama-cpp.sh builds it here.
    #[arg(
        long,
        env = "OPENINFER_BENCH_LLAMA_CPP",
        default_value = "target/llama.cpp/build/bin"
    )]
    pub llama_cpp: PathBuf,
    /// Skip the llama.cpp peer.
    #[arg(long, env = "OPENINFER_BENCH_NO_LLAMA_CPP")]
    pub no_llama_cpp: bool,
    /// Threads for every engine (candle/rayon, torch, llama.cpp).
    #[arg(long, env = "OPENINFER_BENCH_THREADS")]
    pub threads: Option<usize>,
    /// Directory for the JSON results and the SVG chart.
    #[arg(
        long,
        env = "OPENINFER_BENCH_OUT",
        default_value = "target/bench-engine"
    )]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Router to load.
    #[arg(long, env = "OPENINFER_BENCH_ADDR", default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// Start `openinfer serve` (the tiny demo model, or --model) and load that instead.
    #[arg(long, env = "OPENINFER_BENCH_SPAWN")]
    pub spawn: bool,
    /// Model directory for --spawn.
    #[arg(long, env = "OPENINFER_BENCH_MODEL", requires = "spawn")]
    pub model: Option<PathBuf>,
    /// Start this many `--engine sim` workers and a router in front of them (separate
    /// processes) and load that: the router's own behaviour and cost, with no model.
    #[arg(
        long,
        env = "OPENINFER_BENCH_SPAWN_SIM_WORKERS",
        conflicts_with = "spawn"
    )]
    pub spawn_sim_workers: Option<usize>,
    /// Step time of the spawned sim workers.
    #[arg(long, env = "OPENINFER_BENCH_SIM_STEP_TIME", default_value = "20ms", value_parser = parse_duration)]
    pub sim_step_time: Duration,
    /// Running sequences per spawned sim worker.
    #[arg(long, env = "OPENINFER_BENCH_SIM_MAX_RUNNING", default_value_t = 32)]
    pub sim_max_running: usize,
    /// Also run HF transformers `generate` on --model at batch sizes equal to the
    /// --concurrency steps, in the same run (scripts/bench_hf_generate.py).
    #[arg(long, env = "OPENINFER_BENCH_HF_BASELINE", requires = "model")]
    pub hf_baseline: bool,
    /// Python with torch + transformers for --hf-baseline.
    #[arg(
        long,
        env = "OPENINFER_BENCH_PYTHON",
        default_value = ".venv/bin/python"
    )]
    pub python: PathBuf,
    /// Threads for the HF baseline (default: every core, as the spawned server uses).
    #[arg(long, env = "OPENINFER_BENCH_THREADS")]
    pub threads: Option<usize>,
    /// The `model` field of every request (empty: the router's default).
    #[arg(long, env = "OPENINFER_BENCH_MODEL_NAME", default_value = "")]
    pub model_name: String,
    /// Requests to send.
    #[arg(long, env = "OPENINFER_BENCH_NUM_REQUESTS", default_value_t = 200)]
    pub num_requests: usize,
    /// Requests in flight at once (without --rate); a list (1,4,16) runs one step each.
    #[arg(
        long,
        env = "OPENINFER_BENCH_CONCURRENCY",
        value_delimiter = ',',
        default_value = "8"
    )]
    pub concurrency: Vec<usize>,
    /// Requests per second, arriving as a gamma process (instead of a fixed concurrency); a
    /// list runs one step each.
    #[arg(long, env = "OPENINFER_BENCH_RATE", value_delimiter = ',')]
    pub rate: Vec<f64>,
    /// Run the standard scenario: concurrency 1, 2, 4, 8, 16 and 32, one step each.
    #[arg(long, env = "OPENINFER_BENCH_SWEEP")]
    pub sweep: bool,
    /// Shape of the arrival process: 1 = Poisson, below 1 burstier, above 1 smoother.
    #[arg(long, env = "OPENINFER_BENCH_BURSTINESS", default_value_t = 1.0)]
    pub burstiness: f64,
    /// Prompts from a file instead of synthetic ones: JSON Lines (`.jsonl`) of
    /// {"prompt", "output_len"?, "priority"?}, or a ShareGPT JSON array (docs/bench.md).
    #[arg(long, env = "OPENINFER_BENCH_DATASET")]
    pub dataset: Option<PathBuf>,
    /// Words per synthetic prompt.
    #[arg(long, env = "OPENINFER_BENCH_INPUT_LEN", default_value_t = 128)]
    pub input_len: usize,
    /// Tokens generated per request (eos ignored); with --dataset, the cap.
    #[arg(long, env = "OPENINFER_BENCH_OUTPUT_LEN", default_value_t = 64)]
    pub output_len: u32,
    /// Priorities by weight, e.g. 0:80,5:20.
    #[arg(long, env = "OPENINFER_BENCH_PRIORITY_MIX", default_value = "0:100")]
    pub priority_mix: String,
    /// Client deadline on every request (its gRPC grpc-timeout), e.g. 5s. A request that
    /// misses it counts as late; goodput then counts only requests done within it (and the
    /// --slo objectives).
    #[arg(long, env = "OPENINFER_BENCH_DEADLINE", value_parser = parse_duration)]
    pub deadline: Option<Duration>,
    /// Tenants at one priority sharing the spawned sim cluster, each at a multiple of its
    /// capacity, e.g. heavy:10,light:0.2: the lightest one's time to first token alone,
    /// beside the others with fair shares, and first come, first served (needs
    /// --spawn-sim-workers; the lightest sends --num-requests).
    #[arg(long, env = "OPENINFER_BENCH_TENANT_MIX")]
    pub tenant_mix: Option<String>,
    /// Compare prefix caching off, on with least-busy placement, and on with cache-aware
    /// placement: the same workload (--prefix-workload) three times on fresh workers with the
    /// real engine (--prefix-model, else the --prefix-preset model) behind a fresh router.
    #[arg(long, env = "OPENINFER_BENCH_PREFIX_CACHE_COMPARE")]
    pub prefix_cache_compare: bool,
    /// shared: --prefix-groups system prompts, each followed by --prefix-questions questions;
    /// multi-turn: conversations of --turns turns, each repeating the history before it.
    #[arg(
        long,
        env = "OPENINFER_BENCH_PREFIX_WORKLOAD",
        value_enum,
        default_value = "shared"
    )]
    pub prefix_workload: crate::prefix::PrefixWorkload,
    /// Workers for --prefix-cache-compare.
    #[arg(long, env = "OPENINFER_BENCH_PREFIX_WORKERS", default_value_t = 2)]
    pub prefix_workers: usize,
    /// Model directory for --prefix-cache-compare (default: the --prefix-preset model).
    #[arg(long, env = "OPENINFER_BENCH_PREFIX_MODEL")]
    pub prefix_model: Option<PathBuf>,
    /// Preset made (under --cache-dir) and measured when no --prefix-model is given.
    #[arg(long, env = "OPENINFER_BENCH_PREFIX_PRESET", default_value = "small")]
    pub prefix_preset: String,
    /// Where generated models are kept.
    #[arg(
        long,
        env = "OPENINFER_CACHE_DIR",
        default_value = "target/openinfer-models"
    )]
    pub cache_dir: PathBuf,
    /// System prompts (shared) or conversations per client (multi-turn).
    #[arg(long, env = "OPENINFER_BENCH_PREFIX_GROUPS", default_value_t = 4)]
    pub prefix_groups: usize,
    /// Questions per system prompt.
    #[arg(long, env = "OPENINFER_BENCH_PREFIX_QUESTIONS", default_value_t = 16)]
    pub prefix_questions: usize,
    /// Words of each system prompt.
    #[arg(long, env = "OPENINFER_BENCH_PREFIX_WORDS", default_value_t = 300)]
    pub prefix_words: usize,
    /// Words of each question.
    #[arg(long, env = "OPENINFER_BENCH_QUESTION_WORDS", default_value_t = 75)]
    pub question_words: usize,
    /// Turns per conversation (multi-turn).
    #[arg(long, env = "OPENINFER_BENCH_TURNS", default_value_t = 4)]
    pub turns: usize,
    /// Objectives for goodput, e.g. ttft=200ms,tpot=50ms,e2e=10s.
    #[arg(long, env = "OPENINFER_BENCH_SLO", default_value = "")]
    pub slo: String,
    /// Directory for bench.json (and bench.svg when several steps ran).
    #[arg(long, env = "OPENINFER_BENCH_OUT", default_value = "target/bench")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct BenchRouterArgs {
    /// Time-to-first-token samples per path (direct and through the router).
    #[arg(long, env = "OPENINFER_BENCH_SAMPLES", default_value_t = 300)]
    pub samples: usize,
    /// Sim step time while sampling time to first token.
    #[arg(long, env = "OPENINFER_BENCH_TTFT_STEP_TIME", default_value = "2ms", value_parser = parse_duration)]
    pub ttft_step_time: Duration,
    /// Concurrent streams held through one router.
    #[arg(long, env = "OPENINFER_BENCH_STREAMS", default_value_t = 5000)]
    pub streams: usize,
    /// Tokens per concurrent stream.
    #[arg(long, env = "OPENINFER_BENCH_STREAM_TOKENS", default_value_t = 40)]
    pub stream_tokens: u32,
    /// Sim step time while holding the concurrent streams.
    #[arg(long, env = "OPENINFER_BENCH_STREAM_STEP_TIME", default_value = "50ms", value_parser = parse_duration)]
    pub stream_step_time: Duration,
    /// Client HTTP/2 connections the gRPC streams share (HTTP streams take one each).
    #[arg(long, env = "OPENINFER_BENCH_CONNECTIONS", default_value_t = 16)]
    pub connections: usize,
    /// The APIs whose concurrent streams are held, one after the other: grpc, http.
    #[arg(
        long,
        env = "OPENINFER_BENCH_STREAM_APIS",
        value_delimiter = ',',
        default_value = "grpc,http"
    )]
    pub stream_apis: Vec<crate::router::Api>,
    /// Times the concurrent load is repeated on the same router (memory must stay flat).
    #[arg(long, env = "OPENINFER_BENCH_ROUNDS", default_value_t = 3)]
    pub rounds: usize,
    /// Directory for the JSON results and the SVG chart.
    #[arg(
        long,
        env = "OPENINFER_BENCH_OUT",
        default_value = "target/bench-router"
    )]
    pub out: PathBuf,
}
