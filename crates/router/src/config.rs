//! Router limits and policies. Every bound on a queue or buffer lives here, with its default.

use std::time::Duration;

/// How the router admits, orders and places requests.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Model used when a request leaves `model` empty; `None`: the only model served.
    pub default_model: Option<String>,
    /// Most requests waiting in the router, all models and priorities together.
    pub max_queued_requests: usize,
    /// Most requests waiting at one priority level of one model.
    pub max_queue_per_priority: usize,
    /// Most prompt tokens waiting in the router, all models together.
    pub max_queued_tokens: usize,
    /// Share of the queue bounds (requests and tokens) open to sheddable (negative priority)
    /// requests; beyond it they are refused first.
    pub sheddable_share: f64,
    /// How long a request may wait for a worker when the client sets no `grpc-timeout`.
    pub default_queue_timeout: Duration,
    /// Waiting this long raises a queued request's priority by one level (`None`: no aging).
    pub aging_step: Option<Duration>,
    /// Refuse (`RESOURCE_EXHAUSTED`) or drop from the queue (`DEADLINE_EXCEEDED`) requests
    /// that cannot finish before their client's deadline at the workers' measured pace,
    /// instead of starting them only to cancel them at the deadline.
    pub deadline_admission: bool,
    /// Share each priority level among tenants by weight (virtual token counters); `false`:
    /// first come, first served across tenants (the benchmark's peer).
    pub fair_share: bool,
    /// Weight of a prompt token in a tenant's virtual token counter (its fair share inside a
    /// priority level).
    pub fair_input_weight: f64,
    /// Weight of a generated token in a tenant's virtual token counter. Output tokens cost
    /// a step each, prompt tokens a share of one: the paper's defaults are 1 and 2.
    pub fair_output_weight: f64,
    /// Preempt lower-priority running sequences when a higher-priority request cannot be placed.
    pub preemption: bool,
    /// Place a request on a worker whose prefix cache holds the most of its prompt's leading
    /// blocks, among the workers no busier than the least busy by `cache_balance_slack`;
    /// `false`: the least busy worker.
    pub cache_aware: bool,
    /// How much busier (running sequences over the worker's limit) than the least busy worker
    /// a worker holding a request's prefix may be and still get it: bounds the imbalance one
    /// hot prefix can cause.
    pub cache_balance_slack: f64,
    /// Most prefix-cache keys the router remembers across all workers (about 190 bytes each);
    /// the least recently reported go first.
    pub prefix_index_entries: usize,
    /// The `grpc-retry-pushback-ms` sent with `RESOURCE_EXHAUSTED`.
    pub retry_pushback: Duration,
    /// `max_new_tokens` of a request that sets none (capped by the room left in the context).
    pub default_max_new_tokens: u32,
    /// Most choices one HTTP request may ask for (prompts × `n`).
    pub max_choices: usize,
    /// Most stop strings per request.
    pub max_stop_strings: usize,
    /// Longest stop string, in bytes.
    pub max_stop_bytes: usize,
    /// Long prompts (over 8 KiB) tokenized at once, each on its own blocking thread; more
    /// wait. Tokenizing costs many times a prompt's size in memory, so this bounds the memory
    /// of a flood of long prompts.
    pub tokenizer_threads: usize,
    /// Largest encoded request accepted; larger ones are refused with the biggest field named.
    pub max_request_bytes: usize,
    /// Bytes of generated output the router may hold for clients that have not read it; while
    /// more is held, new requests are refused with `RESOURCE_EXHAUSTED`.
    pub max_unread_output: usize,
    /// Messages buffered towards one worker's `Execute` stream.
    pub worker_queue: usize,
    /// Worker events and client submissions buffered for the scheduler task.
    pub scheduler_queue: usize,
    /// Most concurrent HTTP/2 streams per client connection.
    pub max_concurrent_streams: u32,
    /// Most client connections open at once; one more is closed at once.
    pub max_connections: usize,
    /// Largest header block (gRPC metadata) a client may send, in bytes.
    pub max_header_bytes: u32,
    /// Longest a client's TLS handshake may take, and how long a new connection may stay
    /// silent before it is closed.
    pub handshake_timeout: Duration,
    /// HTTP/2 PING to each client connection this often; a client that does not answer
    /// within `keepalive_timeout` is disconnected (its requests cancelled).
    pub keepalive_interval: Duration,
    /// See `keepalive_interval`.
    pub keepalive_timeout: Duration,
    /// A client connection this old is asked to go (HTTP/2 GOAWAY): it takes no new request,
    /// its requests in flight finish, then it closes; clients reconnect for their next call.
    /// Bounds how long an idle connection can hold one of `max_connections` (`None`: never).
    pub max_connection_age: Option<Duration>,
    /// TLS on the public endpoint (and mutual TLS with a client CA); `None`: plaintext.
    pub tls: Option<openinfer_net::ServerTls>,
    /// Mutual TLS towards workers; `None`: plaintext.
    pub worker_tls: Option<openinfer_net::ClientTls>,
    /// Times a sequence the workers refuse is retried before the client gets `UNAVAILABLE`.
    pub max_dispatch_attempts: u32,
    /// Times a request may come back unfinished from its workers (preempted, or its worker
    /// lost) and resume; one more and it fails with `UNAVAILABLE` instead of cycling.
    pub max_resumes: u32,
    /// On shutdown, how long in-flight requests may take to finish.
    pub drain_timeout: Duration,
    /// The tenants file (API keys, caps, weights, quotas), followed for changes; `None`:
    /// one anonymous tenant, no authentication.
    pub tenants_file: Option<std::path::PathBuf>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            default_model: None,
            max_queued_requests: 4096,
            max_queue_per_priority: 1024,
            max_queued_tokens: 1 << 20,
            sheddable_share: 0.5,
            default_queue_timeout: Duration::from_secs(60),
            aging_step: Some(Duration::from_secs(5)),
            deadline_admission: true,
            fair_share: true,
            fair_input_weight: 1.0,
            fair_output_weight: 2.0,
            preemption: true,
            cache_aware: true,
            cache_balance_slack: 0.25,
            prefix_index_entries: 1 << 17,
            retry_pushback: Duration::from_millis(500),
            default_max_new_tokens: 256,
            max_choices: 16,
            max_stop_strings: 16,
            max_stop_bytes: 256,
            tokenizer_threads: 2,
            max_request_bytes: 4 << 20,
            max_unread_output: 64 << 20,
            worker_queue: 1024,
            scheduler_queue: 8192,
            max_concurrent_streams: 16_384,
            max_connections: 10_000,
            max_header_bytes: 16 << 10,
            handshake_timeout: openinfer_net::DEFAULT_HANDSHAKE_TIMEOUT,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
            max_connection_age: Some(Duration::from_secs(1800)),
            tls: None,
            worker_tls: None,
            max_dispatch_attempts: 3,
            max_resumes: 16,
            drain_timeout: Duration::from_secs(30),
            tenants_file: None,
        }
    }
}
