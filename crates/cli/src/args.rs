//! Command-line flags. Every flag has an `OPENINFER_*` environment fallback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
pub use openinfer_core::units::{parse_bytes, parse_duration, Dur, Size};

/// OpenInferencev2: an LLM-serving cluster (router, workers, tooling).
#[derive(Debug, Parser)]
#[command(name = "openinfer", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run router and worker in one process: the one-command server (creates the `tiny` demo
    /// model when no --model is given).
    Serve(ServeArgs),
    /// Run a router: the public `openinfer.v1.Inference` API in front of workers.
    Router(RouterCmdArgs),
    /// Run a worker: load a model and serve `openinfer.worker.v1` over gRPC.
    Worker(WorkerArgs),
    /// Send one prompt to a router and stream the answer to the terminal.
    Generate(GenerateArgs),
    /// Write a random-weight Hugging Face model directory (for demos, tests, benchmarks).
    MakeModel(MakeModelArgs),
    /// Measure engine speed (prefill, single and batched decode) beside HF transformers.
    BenchEngine(openinfer_bench::BenchEngineArgs),
    /// Load a router and report latency percentiles, throughput and goodput, overall and per
    /// priority (synthetic prompts; fixed concurrency or Poisson/gamma arrivals).
    Bench(openinfer_bench::BenchArgs),
    /// Check greedy outputs against committed HF transformers references on this machine's
    /// device and dtype (tests/fixtures/expected).
    Parity(ParityArgs),
    /// Measure what the router adds: time to first token versus direct-to-worker, and many
    /// concurrent streams with the router's memory (uses `--engine sim` workers).
    BenchRouter(openinfer_bench::BenchRouterArgs),
    /// Perplexity of a model over a text file, as llama.cpp's `llama-perplexity` computes it
    /// (windows of --context tokens, each scored on its second half).
    Perplexity(PerplexityArgs),
}

/// Logging flags. Traces go out over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is set
/// (with `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`).
#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log format (JSON lines carry `trace_id` and `request_id` inside a request). Traces are
    /// exported over OTLP/gRPC when OTEL_EXPORTER_OTLP_ENDPOINT is set (OTEL_SERVICE_NAME,
    /// OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG are honoured).
    #[arg(long, global = true, env = "OPENINFER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (tracing `EnvFilter` syntax, e.g. `info,openinfer_engine=debug`).
    #[arg(long, global = true, env = "OPENINFER_LOG", default_value = "info")]
    pub log: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineKind {
    /// The model in --model.
    Model,
    /// No model: tokens at a fixed rate, with real KV-block accounting.
    Sim,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where and how the engine runs.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// What produces tokens: the model, or `sim`, which makes one token per sequence every
    /// --sim-step-time without a model (router benchmarks, load tests).
    #[arg(long, env = "OPENINFER_ENGINE", value_enum, default_value_t = EngineKind::Model)]
    pub engine: EngineKind,
    /// Step time of the sim engine.
    #[arg(long, env = "OPENINFER_SIM_STEP_TIME", default_value = "10ms", value_parser = parse_duration)]
    pub sim_step_time: Duration,
    /// KV blocks of the sim engine.
    #[arg(long, env = "OPENINFER_SIM_KV_BLOCKS", default_value_t = 65_536)]
    pub sim_kv_blocks: usize,
    /// Model id announced to routers and clients (default: the model directory's name).
    #[arg(long, env = "OPENINFER_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Chat template (a Jinja file, as transformers renders it) that replaces the model's own
    /// (`chat_template.jinja` or `chat_template` in tokenizer_config.json) for
    /// /v1/chat/completions.
    #[arg(long, env = "OPENINFER_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,
    /// Compute device: cpu, cuda or cuda:N.
    #[arg(long, env = "OPENINFER_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Compute dtype: f32, bf16 or f16 (default: f32 on CPU, bf16 on CUDA). A GGUF file keeps
    /// its quantized tensors and computes in f32 unless a dtype is given, which dequantizes
    /// them into it at load.
    #[arg(long, env = "OPENINFER_DTYPE")]
    pub dtype: Option<String>,
    /// KV cache size (K and V, all layers), e.g. 512MiB or 8GiB.
    #[arg(long, env = "OPENINFER_KV_CACHE_MEMORY", default_value_t = Size(engine_defaults().kv_cache_bytes as u64))]
    pub kv_cache_memory: Size,
    /// What the KV cache holds: auto (the compute dtype), f32, f16 or bf16. A half type holds
    /// twice the tokens in --kv-cache-memory and halves what attention reads, at
    /// half-precision rounding of keys and values (llama.cpp's default is f16).
    #[arg(long, env = "OPENINFER_KV_CACHE_DTYPE", default_value = "auto")]
    pub kv_cache_dtype: String,
    /// Token slots per KV block.
    #[arg(long, env = "OPENINFER_BLOCK_SIZE", default_value_t = engine_defaults().block_size)]
    pub block_size: usize,
    /// Most sequences in the running batch.
    #[arg(long, env = "OPENINFER_MAX_RUNNING", default_value_t = engine_defaults().max_running)]
    pub max_running: usize,
    /// Token budget of one engine step (decode tokens + prefill chunk); longer prompts are
    /// prefilled in chunks.
    #[arg(long, env = "OPENINFER_MAX_BATCH_TOKENS", default_value_t = engine_defaults().max_batch_tokens)]
    pub max_batch_tokens: usize,
    /// The most an engine step that carries running decodes may take: prefill chunks beside
    /// them are sized to fit, from measured step times, so that long prompts do not stall
    /// every running sequence. `2x` (a multiple above 1 of the decode-only step a typical
    /// token waits for), a duration such as `80ms`, or `off` (chunks fill --max-batch-tokens).
    #[arg(long, env = "OPENINFER_STEP_TIME_BUDGET", default_value_t = engine_defaults().step_time_budget)]
    pub step_time_budget: openinfer_engine::StepTimeBudget,
    /// Most sequences waiting for KV blocks inside the worker.
    #[arg(long, env = "OPENINFER_MAX_WAITING", default_value_t = engine_defaults().max_waiting)]
    pub max_waiting: usize,
    /// Longest sequence (prompt + output) accepted; default: the model's context.
    #[arg(long, env = "OPENINFER_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// Keep the KV of full prompt blocks after their sequence ends and reuse it for later
    /// sequences of the same tenant that start with the same tokens (their prefill is
    /// skipped); cached blocks are evicted, least recently used, only when blocks are needed.
    #[arg(long, env = "OPENINFER_PREFIX_CACHE", default_value_t = engine_defaults().prefix_cache, action = clap::ArgAction::Set)]
    pub prefix_cache: bool,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json) or a GGUF file
    /// (llama, qwen2, qwen3; F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and K-quant tensors);
    /// not used with --engine sim.
    #[arg(long, env = "OPENINFER_MODEL")]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub worker: WorkerLoopArgs,
    /// Address to serve gRPC on.
    #[arg(long, env = "OPENINFER_LISTEN", default_value = "127.0.0.1:50061")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Address routers dial: HOST:PORT, or HOST alone for the --listen port (e.g. the pod's
    /// IP, `$(POD_IP)`). Default: the listen address, or HOSTNAME:PORT when listening on
    /// 0.0.0.0.
    #[arg(long, env = "OPENINFER_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// This worker group's id in the registry (default: HOSTNAME-PORT).
    #[arg(long, env = "OPENINFER_GROUP_ID")]
    pub group_id: Option<String>,
    /// On SIGTERM, how long running sequences may take to finish before they are handed back
    /// to their routers (which resume them on other workers).
    #[arg(long, env = "OPENINFER_DRAIN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub drain_grace: Duration,
    /// Lifetime of the registry lease; it is kept alive every third of it.
    #[arg(long, env = "OPENINFER_LEASE_TTL", default_value = "10s", value_parser = parse_duration)]
    pub lease_ttl: Duration,
    #[command(flatten)]
    pub tp: TpArgs,
    #[command(flatten)]
    pub worker_tls: WorkerTlsArgs,
    /// Most router connections open at once; one more is closed at once.
    #[arg(long, env = "OPENINFER_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    #[command(flatten)]
    pub metrics: MetricsArgs,
}

/// Mutual TLS on router ↔ worker streams: routers and workers each take all three flags
/// (their own certificate and key, and the CA that signed the other side's). Files are
/// reloaded when they change; open streams keep going.
#[derive(Debug, Clone, Args)]
pub struct WorkerTlsArgs {
    /// This side's certificate chain (PEM) on router ↔ worker streams.
    #[arg(long, env = "OPENINFER_WORKER_TLS_CERT", value_name = "FILE")]
    pub worker_tls_cert: Option<PathBuf>,
    /// This side's private key (PEM) on router ↔ worker streams.
    #[arg(long, env = "OPENINFER_WORKER_TLS_KEY", value_name = "FILE")]
    pub worker_tls_key: Option<PathBuf>,
    /// The CA (PEM) that signed the other side's certificates; nothing else is trusted.
    #[arg(long, env = "OPENINFER_WORKER_TLS_CA", value_name = "FILE")]
    pub worker_tls_ca: Option<PathBuf>,
}

impl WorkerTlsArgs {
    /// The three files, when mutual TLS is on; an error when only some are given.
    pub fn files(&self) -> anyhow::Result<Option<(PathBuf, PathBuf, PathBuf)>> {
        match (&self.worker_tls_cert, &self.worker_tls_key, &self.worker_tls_ca) {
            (None, None, None) => Ok(None),
            (Some(c), Some(k), Some(ca)) => Ok(Some((c.clone(), k.clone(), ca.clone()))),
            _ => anyhow::bail!(
                "router ↔ worker TLS is mutual: give all of --worker-tls-cert, --worker-tls-key and --worker-tls-ca, or none"
            ),
        }
    }
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Args)]
pub struct MetricsArgs {
    /// Address of the Prometheus `/metrics` endpoint, a port of its own (default
    /// 0.0.0.0:9464 for `router` and `serve`, 0.0.0.0:9465 for `worker`; when the default port
    /// is taken another free one is used, with a warning).
    #[arg(long, env = "OPENINFER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

/// Tensor parallelism: one model replica split across several ranks (docs/tensor-parallel.md).
#[derive(Debug, Clone, Args)]
pub struct TpArgs {
    /// Ranks the model is split across. Without --rank this process starts the ranks itself
    /// (one per device) and supervises them.
    #[arg(long, env = "OPENINFER_TP", default_value_t = 1)]
    pub tp: usize,
    /// This process's rank in its group (0 serves gRPC and registers the group); the ranks
    /// find each other through --registry under --group-id, or through --tp-peers.
    #[arg(long, env = "OPENINFER_RANK")]
    pub rank: Option<usize>,
    /// Collective backend: cpu (TCP ring between the rank processes) or nccl (CUDA builds);
    /// default: nccl on CUDA devices, cpu otherwise.
    #[arg(long, env = "OPENINFER_TP_BACKEND", value_enum)]
    pub tp_backend: Option<TpBackend>,
    /// Where this rank's collective listens and what it advertises to the other ranks:
    /// IP or IP:PORT (port 0 or none: any free port). On a group across hosts, the host's
    /// (pod's) own address, e.g. `$(POD_IP)`.
    #[arg(long, env = "OPENINFER_TP_LISTEN", default_value = "127.0.0.1:0", value_parser = parse_listen_ip)]
    pub tp_listen: SocketAddr,
    /// Hosts (pods) the group spans; each starts --tp / --tp-nodes of its ranks (one per
    /// device) and the ranks meet through --registry.
    #[arg(long, env = "OPENINFER_TP_NODES", default_value_t = 1)]
    pub tp_nodes: usize,
    /// This host's index among --tp-nodes (0 holds rank 0, which serves gRPC); host i runs
    /// ranks i·L .. (i+1)·L - 1, L = --tp / --tp-nodes. Under a LeaderWorkerSet:
    /// `$(LWS_WORKER_INDEX)`.
    #[arg(long, env = "OPENINFER_TP_NODE_RANK", default_value_t = 0)]
    pub tp_node_rank: usize,
    /// Every rank's collective address, by rank, instead of a rendezvous through etcd.
    #[arg(long, env = "OPENINFER_TP_PEERS", value_delimiter = ',')]
    pub tp_peers: Vec<SocketAddr>,
    /// How long a rank waits for the others to show up.
    #[arg(long, env = "OPENINFER_TP_TIMEOUT", default_value = "2m", value_parser = parse_duration)]
    pub tp_timeout: Duration,
    /// With --tp-backend nccl: how long one all-reduce may take on the GPUs before the group's
    /// NCCL communicator is aborted (a dead or stuck rank would leave the others waiting for
    /// ever); the group then stops, as it does when a CPU-ring peer's connection closes.
    #[arg(long, env = "OPENINFER_TP_COLLECTIVE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub tp_collective_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TpBackend {
    /// Ranks in separate processes exchange tensors over TCP (a ring all-reduce).
    Cpu,
    /// NCCL between GPUs (needs a `--features cuda` build).
    Nccl,
}

/// Where cluster membership lives.
#[derive(Debug, Clone, Args)]
pub struct RegistryArgs {
    /// etcd endpoints, etcd://HOST:PORT[,HOST:PORT]; without it membership is static.
    #[arg(long, env = "OPENINFER_REGISTRY")]
    pub registry: Option<String>,
    /// etcd user; its password comes from --etcd-password-file or the OPENINFER_ETCD_PASSWORD
    /// environment variable, never from the command line (where `ps` shows it).
    #[arg(long, env = "OPENINFER_ETCD_USER")]
    pub etcd_user: Option<String>,
    /// File holding the etcd password of --etcd-user (a mounted Secret, say; one trailing
    /// newline is ignored).
    #[arg(long, env = "OPENINFER_ETCD_PASSWORD_FILE", value_name = "FILE")]
    pub etcd_password_file: Option<PathBuf>,
    /// Refused with a pointer to --etcd-password-file: a password in the arguments is
    /// visible to every user of the host, and would be copied into each --tp rank's.
    #[arg(long, hide = true)]
    pub etcd_password: Option<String>,
    /// CA certificate (PEM) of etcd's server certificate; turns on TLS.
    #[arg(long, env = "OPENINFER_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM), when etcd requires one (with --etcd-key).
    #[arg(long, env = "OPENINFER_ETCD_CERT", requires_all = ["etcd_key", "etcd_ca"])]
    pub etcd_cert: Option<PathBuf>,
    /// Client key (PEM) of --etcd-cert.
    #[arg(long, env = "OPENINFER_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// How often an HTTP/2 ping checks the etcd connection while a watch or lease is open. etcd
    /// closes connections that ping more often than its --grpc-keepalive-min-time (5s unless
    /// set there), so go lower only if etcd's is lower.
    #[arg(long, env = "OPENINFER_ETCD_KEEPALIVE", default_value_t = Dur(openinfer_registry::etcd::DEFAULT_KEEPALIVE))]
    pub etcd_keepalive: Dur,
}

/// Buffers of the worker's engine loop.
#[derive(Debug, Clone, Args)]
pub struct WorkerLoopArgs {
    /// Step messages buffered per router connection; a router that falls this far behind is
    /// disconnected (its sequences cancelled) so that it cannot stall the engine.
    #[arg(long, env = "OPENINFER_CONNECTION_BUFFER", default_value_t = loop_defaults().connection_buffer)]
    pub connection_buffer: usize,
    /// After a step that freed sequence slots, while a router says it holds more work for
    /// this worker, how long the engine waits for it before planning the next step (0: never).
    #[arg(long, env = "OPENINFER_REFILL_WAIT", default_value_t = Dur(loop_defaults().refill_wait))]
    pub refill_wait: Dur,
    /// Commands buffered for the engine thread.
    #[arg(long, env = "OPENINFER_COMMAND_QUEUE", default_value_t = loop_defaults().command_queue)]
    pub command_queue: usize,
}

/// Admission, scheduling and limits of the router.
#[derive(Debug, Clone, Args)]
pub struct RouterArgs {
    /// Address to serve the OpenAI-compatible HTTP API on (/v1/completions,
    /// /v1/chat/completions, /v1/models, /health, /tokenize, /detokenize); off when unset.
    /// Takes the same TLS, tenants and limits as the gRPC API.
    #[arg(long, env = "OPENINFER_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Most choices one HTTP request may ask for (prompts × n).
    #[arg(long, env = "OPENINFER_MAX_CHOICES", default_value_t = router_defaults().max_choices)]
    pub max_choices: usize,
    /// Model used when a request names none (default: the only model served).
    #[arg(long, env = "OPENINFER_DEFAULT_MODEL")]
    pub default_model: Option<String>,
    /// Most requests waiting in the router (all models and priorities).
    #[arg(long, env = "OPENINFER_MAX_QUEUED_REQUESTS", default_value_t = router_defaults().max_queued_requests)]
    pub max_queued_requests: usize,
    /// Most requests waiting at one priority level of one model.
    #[arg(long, env = "OPENINFER_MAX_QUEUE_PER_PRIORITY", default_value_t = router_defaults().max_queue_per_priority)]
    pub max_queue_per_priority: usize,
    /// Most prompt tokens waiting in the router.
    #[arg(long, env = "OPENINFER_MAX_QUEUED_TOKENS", default_value_t = router_defaults().max_queued_tokens)]
    pub max_queued_tokens: usize,
    /// Share of the queue bounds open to sheddable (negative priority) requests.
    #[arg(long, env = "OPENINFER_SHEDDABLE_SHARE", default_value_t = router_defaults().sheddable_share)]
    pub sheddable_share: f64,
    /// Longest queue wait when the client sets no grpc-timeout (e.g. 60s, 500ms); also the
    /// longest a preempted or orphaned request waits to resume before it fails with UNAVAILABLE.
    #[arg(long, env = "OPENINFER_QUEUE_TIMEOUT", default_value_t = Dur(router_defaults().default_queue_timeout))]
    pub queue_timeout: Dur,
    /// Waiting this long raises a queued request's priority by one level; 0 turns aging off.
    #[arg(long, env = "OPENINFER_AGING_STEP", default_value_t = Dur(router_defaults().aging_step.unwrap_or_default()))]
    pub aging_step: Dur,
    /// Refuse (RESOURCE_EXHAUSTED) or drop from the queue (DEADLINE_EXCEEDED) requests that
    /// cannot finish before their grpc-timeout at the workers' measured step time, instead of
    /// starting them only to cancel them at their deadline.
    #[arg(long, env = "OPENINFER_DEADLINE_ADMISSION", default_value_t = router_defaults().deadline_admission, action = clap::ArgAction::Set)]
    pub deadline_admission: bool,
    /// Preempt lower-priority running sequences when a higher-priority request cannot be
    /// placed (they resume later, invisibly to their clients).
    #[arg(long, env = "OPENINFER_PREEMPTION", default_value_t = router_defaults().preemption, action = clap::ArgAction::Set)]
    pub preemption: bool,
    /// Place a request on the worker whose prefix cache holds the most of its prompt's leading
    /// blocks (among those at most --cache-balance-slack busier than the least busy); false:
    /// the least busy worker.
    #[arg(long, env = "OPENINFER_CACHE_AWARE", default_value_t = router_defaults().cache_aware, action = clap::ArgAction::Set)]
    pub cache_aware: bool,
    /// How much busier (running sequences over the worker's limit, 0 to 1) than the least busy
    /// worker a worker holding a request's prefix may be and still get it.
    #[arg(long, env = "OPENINFER_CACHE_BALANCE_SLACK", default_value_t = router_defaults().cache_balance_slack)]
    pub cache_balance_slack: f64,
    /// Most prefix-cache keys the router remembers across its workers (about 190 bytes each);
    /// the keys reported longest ago are forgotten first.
    #[arg(long, env = "OPENINFER_PREFIX_INDEX_ENTRIES", default_value_t = router_defaults().prefix_index_entries)]
    pub prefix_index_entries: usize,
    /// Times a request may come back unfinished from its workers (preempted, or its worker
    /// lost) and resume elsewhere; one more and it fails with UNAVAILABLE instead of cycling.
    #[arg(long, env = "OPENINFER_MAX_RESUMES", default_value_t = router_defaults().max_resumes)]
    pub max_resumes: u32,
    /// Delay suggested to refused clients (grpc-retry-pushback-ms).
    #[arg(long, env = "OPENINFER_RETRY_PUSHBACK", default_value_t = Dur(router_defaults().retry_pushback))]
    pub retry_pushback: Dur,
    /// max_new_tokens of requests that set none (capped by the context).
    #[arg(long, env = "OPENINFER_DEFAULT_MAX_NEW_TOKENS", default_value_t = router_defaults().default_max_new_tokens)]
    pub default_max_new_tokens: u32,
    /// Most stop strings per request.
    #[arg(long, env = "OPENINFER_MAX_STOP_STRINGS", default_value_t = router_defaults().max_stop_strings)]
    pub max_stop_strings: usize,
    /// Longest stop string in bytes.
    #[arg(long, env = "OPENINFER_MAX_STOP_BYTES", default_value_t = router_defaults().max_stop_bytes)]
    pub max_stop_bytes: usize,
    /// Long prompts (over 8 KiB) tokenized at once; more wait their turn. Tokenizing costs
    /// many times a prompt's size in memory, so this bounds a flood of long prompts.
    #[arg(long, env = "OPENINFER_TOKENIZER_THREADS", default_value_t = router_defaults().tokenizer_threads as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub tokenizer_threads: u64,
    /// Largest request accepted, e.g. 4MiB.
    #[arg(long, env = "OPENINFER_MAX_REQUEST_BYTES", default_value_t = Size(router_defaults().max_request_bytes as u64))]
    pub max_request_bytes: Size,
    /// Generated output the router may hold for clients that have not read it, e.g. 64MiB;
    /// while more is held, new requests are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "OPENINFER_MAX_UNREAD_OUTPUT", default_value_t = Size(router_defaults().max_unread_output as u64))]
    pub max_unread_output: Size,
    /// Messages buffered towards each worker.
    #[arg(long, env = "OPENINFER_WORKER_QUEUE", default_value_t = router_defaults().worker_queue)]
    pub worker_queue: usize,
    /// Messages buffered for the scheduler task.
    #[arg(long, env = "OPENINFER_SCHEDULER_QUEUE", default_value_t = router_defaults().scheduler_queue)]
    pub scheduler_queue: usize,
    /// Most concurrent streams per client connection.
    #[arg(
        long,
        env = "OPENINFER_MAX_CONCURRENT_STREAMS",
        default_value_t = router_defaults().max_concurrent_streams
    )]
    pub max_concurrent_streams: u32,
    /// On SIGTERM, how long in-flight requests may take to finish; what is left then ends with
    /// UNAVAILABLE and the router exits (after at most 2s more for connections to close).
    #[arg(long, env = "OPENINFER_DRAIN_TIMEOUT", default_value_t = Dur(router_defaults().drain_timeout))]
    pub drain_timeout: Dur,
    /// Serve the public API over TLS with this certificate chain (PEM, leaf first; reloaded
    /// when it changes, open streams keep going). Plaintext clients are then refused.
    #[arg(
        long,
        env = "OPENINFER_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(
        long,
        env = "OPENINFER_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS on the public API.
    #[arg(
        long,
        env = "OPENINFER_TLS_CLIENT_CA",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_client_ca: Option<PathBuf>,
    /// Most client connections open at once; one more is closed at once.
    #[arg(long, env = "OPENINFER_MAX_CONNECTIONS", default_value_t = router_defaults().max_connections)]
    pub max_connections: usize,
    /// Largest header block (gRPC metadata) a client may send, e.g. 16KiB.
    #[arg(long, env = "OPENINFER_MAX_HEADER_BYTES", default_value_t = Size(router_defaults().max_header_bytes.into()))]
    pub max_header_bytes: Size,
    /// Longest a client's TLS handshake may take; a new connection that sends nothing this
    /// long is closed.
    #[arg(long, env = "OPENINFER_HANDSHAKE_TIMEOUT", default_value_t = Dur(router_defaults().handshake_timeout))]
    pub handshake_timeout: Dur,
    /// HTTP/2 PING to each client connection this often; one that does not answer within
    /// --keepalive-timeout is closed and its requests cancelled.
    #[arg(long, env = "OPENINFER_KEEPALIVE_INTERVAL", default_value_t = Dur(router_defaults().keepalive_interval))]
    pub keepalive_interval: Dur,
    /// See --keepalive-interval.
    #[arg(long, env = "OPENINFER_KEEPALIVE_TIMEOUT", default_value_t = Dur(router_defaults().keepalive_timeout))]
    pub keepalive_timeout: Dur,
    /// A client connection this old is asked to go (HTTP/2 GOAWAY): its requests in flight
    /// finish, new ones go to a new connection; an idle connection holds a slot no longer.
    /// 0: never.
    #[arg(long, env = "OPENINFER_MAX_CONNECTION_AGE", default_value_t = Dur(router_defaults().max_connection_age.unwrap_or_default()))]
    pub max_connection_age: Dur,
    /// Tenants file (YAML: name, api_keys_sha256, max_priority, weight, requests_per_minute,
    /// tokens_per_minute, max_concurrent), reloaded when it changes or on SIGHUP. With it,
    /// clients must send `authorization: Bearer <key>`; without it every request is one
    /// anonymous tenant's (for trusted networks only). See docs/security.md.
    #[arg(long, env = "OPENINFER_TENANTS", value_name = "FILE")]
    pub tenants: Option<std::path::PathBuf>,
    /// Share each priority level among tenants by weight (virtual token counters); false:
    /// first come, first served across tenants.
    #[arg(long, env = "OPENINFER_FAIR_SHARE", default_value_t = router_defaults().fair_share, action = clap::ArgAction::Set)]
    pub fair_share: bool,
    /// Weight of a prompt token in a tenant's virtual token counter (the fair share of
    /// capacity among tenants of one priority level).
    #[arg(long, env = "OPENINFER_FAIR_INPUT_WEIGHT", default_value_t = router_defaults().fair_input_weight)]
    pub fair_input_weight: f64,
    /// Weight of a generated token in a tenant's virtual token counter.
    #[arg(long, env = "OPENINFER_FAIR_OUTPUT_WEIGHT", default_value_t = router_defaults().fair_output_weight)]
    pub fair_output_weight: f64,
}

#[derive(Debug, Args)]
pub struct RouterCmdArgs {
    /// Address to serve the public API on.
    #[arg(long, env = "OPENINFER_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Worker addresses (host:port), comma-separated (static membership).
    #[arg(
        long,
        env = "OPENINFER_WORKERS",
        value_delimiter = ',',
        required_unless_present = "registry"
    )]
    pub workers: Vec<String>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(flatten)]
    pub router: RouterArgs,
    #[command(flatten)]
    pub worker_tls: WorkerTlsArgs,
    /// The name workers' certificates must hold (default: the host of each worker's
    /// address). Workers register pod IPs; certificates name a DNS name, such as
    /// `openinfer-worker`.
    #[arg(long, env = "OPENINFER_WORKER_TLS_SERVER_NAME", value_name = "NAME")]
    pub worker_tls_server_name: Option<String>,
    #[command(flatten)]
    pub metrics: MetricsArgs,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Hugging Face model directory or GGUF file; default: the `tiny` demo model, made under
    /// --cache-dir.
    #[arg(long, env = "OPENINFER_MODEL")]
    pub model: Option<PathBuf>,
    /// Where demo models are made (default: $XDG_CACHE_HOME/openinfer or ~/.cache/openinfer).
    #[arg(long, env = "OPENINFER_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Address to serve the public API on.
    #[arg(long, env = "OPENINFER_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub worker: WorkerLoopArgs,
    #[command(flatten)]
    pub router: RouterArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The prompt.
    pub prompt: String,
    /// Router address.
    #[arg(long, env = "OPENINFER_ADDR", default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// Model id (default: the router's default model).
    #[arg(long, env = "OPENINFER_GENERATE_MODEL", default_value = "")]
    pub model: String,
    /// Tokens to generate at most (default: the router's).
    #[arg(long, env = "OPENINFER_MAX_NEW_TOKENS")]
    pub max_new_tokens: Option<u32>,
    /// Sampling temperature (0 = greedy).
    #[arg(long, env = "OPENINFER_TEMPERATURE")]
    pub temperature: Option<f32>,
    /// Nucleus sampling threshold.
    #[arg(long, env = "OPENINFER_TOP_P")]
    pub top_p: Option<f32>,
    /// Keep the k most likely tokens.
    #[arg(long, env = "OPENINFER_TOP_K")]
    pub top_k: Option<i32>,
    /// Random seed.
    #[arg(long, env = "OPENINFER_SEED")]
    pub seed: Option<u64>,
    /// Stop string (repeatable).
    #[arg(long, env = "OPENINFER_STOP")]
    pub stop: Vec<String>,
    /// Priority (higher first; negative is sheddable).
    #[arg(
        long,
        env = "OPENINFER_PRIORITY",
        default_value_t = 0,
        allow_hyphen_values = true
    )]
    pub priority: i32,
    /// Keep going after end-of-sequence.
    #[arg(long, env = "OPENINFER_IGNORE_EOS")]
    pub ignore_eos: bool,
    /// Deadline of the call (sent as grpc-timeout), e.g. 30s.
    #[arg(long, env = "OPENINFER_TIMEOUT", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct MakeModelArgs {
    /// Shape preset: tiny (~1M parameters), small (~125M), llama3-8b (bf16, 16 GB).
    #[arg(long, env = "OPENINFER_PRESET", default_value = "tiny")]
    pub preset: String,
    /// Output directory.
    #[arg(long, env = "OPENINFER_OUT")]
    pub out: PathBuf,
    /// Architecture: llama, mistral, qwen2 or qwen3.
    #[arg(long, env = "OPENINFER_ARCHITECTURE")]
    pub architecture: Option<String>,
    /// Residual width.
    #[arg(long, env = "OPENINFER_HIDDEN_SIZE")]
    pub hidden_size: Option<usize>,
    /// MLP width.
    #[arg(long, env = "OPENINFER_INTERMEDIATE_SIZE")]
    pub intermediate_size: Option<usize>,
    /// Decoder layers.
    #[arg(long, env = "OPENINFER_LAYERS")]
    pub layers: Option<usize>,
    /// Attention heads.
    #[arg(long, env = "OPENINFER_HEADS")]
    pub heads: Option<usize>,
    /// Key/value heads.
    #[arg(long, env = "OPENINFER_KV_HEADS")]
    pub kv_heads: Option<usize>,
    /// Vocabulary size.
    #[arg(long, env = "OPENINFER_VOCAB_SIZE")]
    pub vocab_size: Option<usize>,
    /// Longest position.
    #[arg(long, env = "OPENINFER_MAX_POSITION_EMBEDDINGS")]
    pub max_position_embeddings: Option<usize>,
    /// Weight dtype: float32, bfloat16 or float16.
    #[arg(long, env = "OPENINFER_WEIGHT_DTYPE")]
    pub dtype: Option<String>,
    /// Tie embeddings and lm_head.
    #[arg(long, env = "OPENINFER_TIE_EMBEDDINGS")]
    pub tie_embeddings: Option<bool>,
    /// Random seed of the weights.
    #[arg(long, env = "OPENINFER_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Largest safetensors shard, e.g. 4GiB.
    #[arg(long, env = "OPENINFER_MAX_SHARD_SIZE", value_parser = parse_bytes)]
    pub max_shard_size: Option<u64>,
}

#[derive(Debug, Args)]
pub struct ParityArgs {
    /// Directory with `expected/*.json` references and one model directory per reference.
    #[arg(
        long,
        env = "OPENINFER_PARITY_FIXTURES",
        default_value = "tests/fixtures"
    )]
    pub fixtures: PathBuf,
    /// Largest |logprob - reference| allowed at any step (default: 1e-3 in f32, over the
    /// generated tokens; 0.75 in bf16 and 0.25 in f16, over every teacher-forced step).
    #[arg(long, env = "OPENINFER_PARITY_LOGPROB_TOLERANCE")]
    pub logprob_tolerance: Option<f32>,
    /// In bf16/f16: least share of teacher-forced steps whose top token must be the
    /// reference's (default 0.8 in bf16, 0.9 in f16; f32 must generate every token as the
    /// reference).
    #[arg(long, env = "OPENINFER_PARITY_MIN_AGREEMENT")]
    pub min_agreement: Option<f32>,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Directory for parity.json.
    #[arg(long, env = "OPENINFER_PARITY_OUT", default_value = "target/parity")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct PerplexityArgs {
    /// Hugging Face model directory or GGUF file.
    #[arg(long, env = "OPENINFER_MODEL")]
    pub model: PathBuf,
    /// Text file to score (UTF-8).
    #[arg(long, env = "OPENINFER_PERPLEXITY_TEXT")]
    pub text: PathBuf,
    /// Tokens per window (llama.cpp's `-c`); the second half of each window is scored.
    #[arg(long, env = "OPENINFER_PERPLEXITY_CONTEXT", default_value_t = 512)]
    pub context: usize,
    /// Score at most this many windows (default: every whole window of the text).
    #[arg(long, env = "OPENINFER_PERPLEXITY_MAX_WINDOWS")]
    pub max_windows: Option<usize>,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Also write the result as JSON to this file.
    #[arg(long, env = "OPENINFER_PERPLEXITY_JSON")]
    pub json: Option<PathBuf>,
}

/// The router's defaults: one place, `RouterConfig::default()`; the flags show them.
fn router_defaults() -> openinfer_router::RouterConfig {
    openinfer_router::RouterConfig::default()
}

/// The engine's defaults: `EngineConfig::default()`.
fn engine_defaults() -> openinfer_engine::EngineConfig {
    openinfer_engine::EngineConfig::default()
}

/// The worker loop's defaults: `LoopConfig::default()`.
fn loop_defaults() -> openinfer_worker::LoopConfig {
    openinfer_worker::LoopConfig::default()
}

/// Parses a listen address given as `IP:PORT` or a bare `IP` (any free port).
pub fn parse_listen_ip(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    s.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .map(|ip| SocketAddr::new(ip, 0))
        .map_err(|_| format!("`{s}` is not an IP address or IP:PORT"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The knob tables of docs/router.md and docs/engine.md show the defaults the binary has.
    #[test]
    fn documented_defaults_are_the_binary_s() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut checked = 0;
        for (doc, sub) in [("docs/router.md", "router"), ("docs/engine.md", "worker")] {
            let text = std::fs::read_to_string(root.join(doc)).unwrap();
            let sub = cmd.find_subcommand(sub).unwrap();
            for arg in sub.get_arguments() {
                let Some(long) = arg.get_long() else { continue };
                let defaults: Vec<String> = arg
                    .get_default_values()
                    .iter()
                    .map(|v| v.to_string_lossy().into_owned())
                    .collect();
                let Some(default) = defaults.first() else {
                    continue;
                };
                let row = format!("| `--{long}` |");
                if let Some(line) = text.lines().find(|l| l.starts_with(&row)) {
                    let shown = line.split('|').nth(2).unwrap_or_default().trim();
                    let shown = shown.trim_matches('`');
                    assert_eq!(shown, default, "{doc}: --{long}");
                    checked += 1;
                }
            }
        }
        assert!(checked >= 15, "only {checked} documented defaults found");
    }

    #[test]
    fn listen_ips_parse_with_or_without_a_port() {
        let p = |s| parse_listen_ip(s).unwrap().to_string();
        assert_eq!(p("10.1.2.3"), "10.1.2.3:0");
        assert_eq!(p("10.1.2.3:7000"), "10.1.2.3:7000");
        assert_eq!(p("fd00::7"), "[fd00::7]:0");
        assert_eq!(p("[fd00::7]"), "[fd00::7]:0");
        assert_eq!(p("[fd00::7]:7000"), "[fd00::7]:7000");
        assert!(parse_listen_ip("pod-a").is_err());
        assert!(parse_listen_ip("10.1.2.3:http").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn every_flag_has_an_openinfer_env_fallback() {
        use clap::CommandFactory;
        fn walk(cmd: &clap::Command, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                // Hidden flags exist only to be refused with a pointer (--etcd-password).
                if arg.is_positional() || arg.is_hide_set() || id == "help" || id == "version" {
                    continue;
                }
                match arg.get_env().and_then(|e| e.to_str()) {
                    Some(env) if env.starts_with("OPENINFER_") => {}
                    _ => missing.push(format!("{} --{id}", cmd.get_name())),
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), &mut missing);
        assert!(
            missing.is_empty(),
            "flags without OPENINFER_* env: {missing:?}"
        );
    }
}
