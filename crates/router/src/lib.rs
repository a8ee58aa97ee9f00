//! The OpenInferencev2 router: the public `openinfer.v1.Inference` API in front of a set of
//! workers (ARCHITECTURE §2–§3).
//!
//! A request flows through one module per concern:
//! * [`validate`] checks it against the model's limits ([`models`]) and names a bad field;
//!   [`token_bound`] lets it refuse a prompt too long to fit before tokenizing it;
//! * [`scheduler`] admits it into a per-model queue (bounded, priority + aging), places it on
//!   the least-loaded worker with credits, preempts lower priorities when it must, and streams
//!   the worker's tokens into the request's [`request::Output`];
//! * [`worker_link`] keeps one `Execute` stream per worker and feeds the scheduler;
//! * [`tenants`] says who is asking (API keys), what they may ask for and how much (quotas);
//!   the scheduler shares each priority level among tenants by weight;
//! * [`service`] is the gRPC face: it streams the output and cancels on disconnect;
//! * [`openai`] is the OpenAI-compatible HTTP face over the same path, with
//!   [`chat_template`] rendering conversations into prompts;
//! * [`observe`] and [`metrics`] make each request one trace and count it for Prometheus.

pub mod chat_template;
pub mod config;
pub mod error;
pub mod metrics;
pub mod models;
pub mod observe;
pub mod openai;
pub mod request;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod tenants;
pub mod token_bound;
pub mod validate;
pub mod worker_link;

pub use config::RouterConfig;
pub use error::RouterError;
pub use server::{Router, ServeError, StartError, WorkerLink};
