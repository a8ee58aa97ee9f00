//! The public `openinfer.v1.Inference` gRPC service: validate, submit to the scheduler, stream
//! the output back. A client that goes away has its request cancelled.

use crate::error::RouterError;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use openinfer_proto::v1 as pb;
use openinfer_proto::v1::inference_server::Inference;
use openinfer_proto::worker::v1 as wpb;
use openinfer_telemetry::TraceParent;
use std::sync::Mutex;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

use crate::config::RouterConfig;
use crate::metrics::{Refusal, RouterMetrics};
use crate::models::ModelTable;
use crate::observe::{RequestRecord, CHAT, TEXT_COMPLETION};
use crate::request::{Delta, End, Next, Output, Summary};
use crate::scheduler::SchedulerHandle;
use crate::tenants::{Quotas, Reservation, Tenants};
use crate::validate::{
    before_tokenizing, client_request_id, default_request_id, resolve_model, validate, Checks,
};

/// Prompts up to this size are tokenized inline; longer ones on the blocking pool.
const INLINE_TOKENIZE_BYTES: usize = 8 << 10;

/// The `Inference` service.
#[derive(Clone)]
pub struct InferenceService {
    scheduler: SchedulerHandle,
    models: ModelTable,
    cfg: Arc<RouterConfig>,
    metrics: Arc<RouterMetrics>,
    next_id: Arc<AtomicU64>,
    /// Permits to tokenize a long prompt (`tokenizer_threads` of them).
    tokenizers: Arc<Semaphore>,
    tenants: Tenants,
    quotas: Arc<Mutex<Quotas>>,
}

impl InferenceService {
    /// A service submitting to `scheduler`.
    pub fn new(
        scheduler: SchedulerHandle,
        models: ModelTable,
        cfg: Arc<RouterConfig>,
        metrics: Arc<RouterMetrics>,
        tenants: Tenants,
        quotas: Arc<Mutex<Quotas>>,
    ) -> Self {
        InferenceService {
            scheduler,
            models,
            tenants,
            quotas,
            tokenizers: Arc::new(Semaphore::new(cfg.tokenizer_threads.max(1))),
            cfg,
            metrics,
            next_id: Arc::new(AtomicU64::new(1)),
        }
    }

    /// Validates and admits a call from either API; the guard cancels it when dropped before
    /// its end. Every check that costs no work on the prompt comes first, so a request refused
    /// by them is never rendered or tokenized.
    pub(crate) async fn start(&self, call: Call) -> Result<(Started, CancelGuard), RouterError> {
        let Call {
            req,
            authorization,
            parent,
            timeout,
            system,
            rpc,
            conversation,
            user,
        } = call;
        let answer_by =
            timeout.map(|t| tokio::time::Instant::now() + crate::validate::generate_within(t));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let operation = if conversation.is_some() {
            CHAT
        } else {
            TEXT_COMPLETION
        };
        let mut record = RequestRecord::start(
            operation,
            system,
            rpc,
            req.priority,
            parent,
            self.metrics.clone(),
        );
        record.request_id(client_request_id(&req).unwrap_or(&default_request_id(id)));
        if let Some(u) = &user {
            record.user(u);
        }
        // The model it will be served by (the default one when it names none), for the
        // labels of refusals that come before validation.
        let served_model = resolve_model(&req.model, &self.models, &self.cfg).ok();
        if let Some(m) = &served_model {
            record.model_known(&m.spec.id);
        }
        let tenant = match self.authenticate(authorization.as_deref(), req.priority) {
            Ok(t) => t,
            Err(e) => return Err(record.failed_with(e)),
        };
        record.tenant(&tenant.name);
        let refuse = |reason| {
            if let Some(m) = &served_model {
                self.metrics.refused(&m.spec.id, reason);
            }
        };
        if let Some(e) = self.unread_refusal() {
            refuse(Refusal::UnreadOutput);
            return Err(record.failed_with(e));
        }
        if let Some(e) = self.scheduler.surely_full(req.priority) {
            refuse(Refusal::QueueFull);
            return Err(record.failed_with(e));
        }
        let wants = u64::from(req.max_new_tokens.unwrap_or(0).max(1)) + 1;
        let mut reservation = match Reservation::admit(&self.quotas, tenant.clone(), wants) {
            Ok(r) => r,
            Err(e) => {
                refuse(e.refusal());
                return Err(record.failed_with(RouterError::quota(e, self.cfg.retry_pushback)));
            }
        };
        // A conversation becomes its prompt: the model's template writes its special tokens,
        // so the tokenizer adds none.
        let mut req = req;
        let special_tokens = match (&conversation, &served_model) {
            (None, _) => true,
            (Some(c), Some(m)) => {
                match m.spec.render_chat(&c.messages, c.add_generation_prompt) {
                    Ok(prompt) => req.prompt = prompt,
                    Err(e) => return Err(record.failed_with(e)),
                }
                false
            }
            // Validation names why the model is unknown or unavailable.
            (Some(_), None) => true,
        };
        self.metrics.prompts_tokenized.inc();
        let validated = {
            let span = record.child(|p| tracing::info_span!(parent: p, "validate"));
            let trace = record.trace();
            let checks = Checks {
                id,
                queue_timeout: timeout,
                special_tokens,
            };
            if req.prompt.len() <= INLINE_TOKENIZE_BYTES {
                span.in_scope(|| validate(req, &self.models, &self.cfg, checks, trace))
            } else if let Err(e) =
                span.in_scope(|| before_tokenizing(&req, &self.models, &self.cfg))
            {
                Err(e)
            } else {
                // Long prompts are tokenized off the async threads, a bounded number at once:
                // tokenizing costs many times a prompt's size in memory.
                let (models, cfg) = (self.models.clone(), self.cfg.clone());
                self.off_thread(move || {
                    span.in_scope(|| validate(req, &models, &cfg, checks, trace))
                })
                .await
                .and_then(|v| v)
            }
        };
        let mut req = match validated {
            Ok(req) => req,
            Err(e) => return Err(record.failed_with(e)),
        };
        record.validated(&req, operation);
        let reserved = reservation.reserve(
            req.prompt_ids.len() as u64,
            req.stopping.max_new_tokens.into(),
        );
        if let Err(e) = reserved {
            self.metrics.refused(&req.model, e.refusal());
            return Err(record.failed_with(RouterError::quota(e, self.cfg.retry_pushback)));
        }
        req.tenant = tenant.name.clone();
        req.weight = tenant.weight;
        if self.cfg.cache_aware {
            if let Some(m) = self.models.get(&req.model) {
                req.prefix_keys = openinfer_core::prefix::prompt_keys(
                    tenant.name.as_bytes(),
                    &req.prompt_ids,
                    m.spec.block_size,
                );
            }
        }
        let mut started = Started {
            request_id: req.request_id.clone(),
            model: req.model.clone(),
            prompt_tokens: req.prompt_ids.len(),
            output: Output::new(req.arrived, self.metrics.unread_output.clone()),
            record,
            answer_by,
            generated: 0,
            reservation: None,
        };
        if let Err(e) = self.scheduler.submit(req, started.output.clone()).await {
            let mut record = started.record;
            return Err(record.failed_with(e));
        }
        reservation.track(started.output.clone());
        started.reservation = Some(reservation);
        let guard = CancelGuard {
            id,
            scheduler: Some(self.scheduler.clone()),
        };
        Ok((started, guard))
    }

    /// The tenant whose key `authorization` holds, allowed `priority`; failures are counted.
    pub(crate) fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        priority: i32,
    ) -> Result<Arc<crate::tenants::Tenant>, RouterError> {
        self.tenants
            .authenticate(authorization, priority)
            .map_err(|e| {
                self.metrics
                    .auth_failures
                    .with_label_values(&[e.reason()])
                    .inc();
                e.into()
            })
    }

    /// Runs tokenizer work `f` on the blocking pool, holding one of `tokenizer_threads`
    /// permits (tokenizing costs many times the text's size in memory).
    pub(crate) async fn off_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, RouterError> {
        let permit = self
            .tokenizers
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| RouterError::Internal(format!("tokenizer pool closed: {e}")))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f()
        })
        .await
        .map_err(|e| RouterError::Internal(format!("tokenizer task failed: {e}")))
    }

    /// The models known now.
    pub(crate) fn models(&self) -> &ModelTable {
        &self.models
    }

    /// The router's configuration.
    pub(crate) fn config(&self) -> &RouterConfig {
        &self.cfg
    }

    /// A gRPC call as a [`Call`].
    fn grpc_call(request: Request<pb::GenerateRequest>, rpc: &'static str) -> Call {
        Call {
            timeout: grpc_timeout(request.metadata()),
            authorization: request
                .metadata()
                .get("authorization")
                .map(|v| v.as_bytes().to_vec()),
            parent: TraceParent::from_headers(request.metadata().as_ref()),
            req: request.into_inner(),
            system: "grpc",
            rpc,
            conversation: None,
            user: None,
        }
    }

    /// An admission check before any work: output nobody reads is bounded.
    fn unread_refusal(&self) -> Option<RouterError> {
        let unread = self.metrics.unread_output.get();
        if unread <= self.cfg.max_unread_output as i64 {
            return None;
        }
        Some(RouterError::QueueFull(
            format!(
                "{unread} bytes of generated output wait for their clients to read them, over \
                 the router's --max-unread-output of {} bytes",
                self.cfg.max_unread_output
            ),
            self.cfg.retry_pushback,
        ))
    }
}

/// One call to generate, as either API hands it to [`InferenceService::start`].
pub(crate) struct Call {
    /// The request in the gRPC API's terms.
    pub req: pb::GenerateRequest,
    /// The `authorization` header, as sent.
    pub authorization: Option<Vec<u8>>,
    /// The client's trace context.
    pub parent: Option<TraceParent>,
    /// The client's deadline, when it sent one.
    pub timeout: Option<Duration>,
    /// `grpc` or `http`, for the span.
    pub system: &'static str,
    /// The method called, for the span.
    pub rpc: &'static str,
    /// A conversation that becomes `req.prompt` through the model's chat template.
    pub conversation: Option<Conversation>,
    /// The end user the client names, for the span.
    pub user: Option<String>,
}

/// Chat messages to render into the prompt.
pub(crate) struct Conversation {
    /// A list of `{role, content}` maps.
    pub messages: serde_json::Value,
    /// End with the assistant's header.
    pub add_generation_prompt: bool,
}

/// An admitted request, read by its call.
pub(crate) struct Started {
    pub(crate) request_id: String,
    pub(crate) model: String,
    /// Tokens of its prompt, as the model sees them.
    pub(crate) prompt_tokens: usize,
    output: Arc<Output>,
    record: RequestRecord,
    /// When the call must have answered: a little before the client's deadline.
    answer_by: Option<tokio::time::Instant>,
    /// Tokens handed to the client so far.
    generated: usize,
    /// Its hold on its tenant's quotas, given back when the call ends.
    reservation: Option<Reservation>,
}

impl Started {
    /// The next output; once the client's deadline has (nearly) run out, the error that ends
    /// the call with `DEADLINE_EXCEEDED` (dropping the guard then cancels the sequence).
    pub(crate) async fn next(&mut self) -> Result<Next, RouterError> {
        let next = match self.answer_by {
            None => self.output.next().await,
            Some(at) => match tokio::time::timeout_at(at, self.output.next()).await {
                Ok(next) => next,
                Err(_) => {
                    let e = RouterError::DeadlineDuringGeneration(self.generated);
                    return Err(self.record.failed_with(e));
                }
            },
        };
        let (Next::Delta(d) | Next::End(d, _)) = &next;
        self.generated += d.token_ids.len();
        Ok(next)
    }

    /// The request's end as its client sees it, recorded in its span and the metrics.
    pub(crate) fn end(&mut self, end: End) -> Result<Summary, RouterError> {
        match end {
            End::Finished(s) => {
                self.record.finished(&s);
                Ok(s)
            }
            End::Failed(e) => Err(self.record.failed_with(e)),
        }
    }
}

/// Cancels the request when the client's call is dropped before the request ended.
pub(crate) struct CancelGuard {
    id: u64,
    scheduler: Option<SchedulerHandle>,
}

impl CancelGuard {
    /// The request ended: nothing to cancel.
    pub(crate) fn disarm(&mut self) {
        self.scheduler = None;
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if let Some(s) = &self.scheduler {
            s.cancel(self.id);
        }
    }
}

type GenerateStream =
    Pin<Box<dyn Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for InferenceService {
    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let (mut s, mut guard) = self.start(Self::grpc_call(request, "Generate")).await?;
        let mut resp = pb::GenerateResponse {
            request_id: s.request_id.clone(),
            model: s.model.clone(),
            ..Default::default()
        };
        loop {
            match s.next().await? {
                Next::Delta(d) => append(&mut resp, d),
                Next::End(d, end) => {
                    guard.disarm();
                    append(&mut resp, d);
                    let summary = s.end(end)?;
                    resp.finish_reason = summary.reason.as_str().into();
                    resp.usage = Some(usage(&summary));
                    resp.timings = Some(timings(&summary));
                    return Ok(Response::new(resp));
                }
            }
        }
    }

    type GenerateStreamStream = GenerateStream;

    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let (mut s, mut guard) = self
            .start(Self::grpc_call(request, "GenerateStream"))
            .await?;
        let stream = async_stream::stream! {
            loop {
                let next = match s.next().await {
                    Ok(next) => next,
                    Err(e) => {
                        yield Err(e.into());
                        break;
                    }
                };
                match next {
                    Next::Delta(d) => yield Ok(message(&s, d)),
                    Next::End(d, end) => {
                        guard.disarm();
                        match s.end(end) {
                            Ok(summary) => {
                                let mut last = message(&s, d);
                                last.finish_reason = summary.reason.as_str().into();
                                last.usage = Some(usage(&summary));
                                last.timings = Some(timings(&summary));
                                yield Ok(last);
                            }
                            Err(e) => {
                                if !d.token_ids.is_empty() {
                                    yield Ok(message(&s, d));
                                }
                                yield Err(e.into());
                            }
                        }
                        break;
                    }
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_models(
        &self,
        _: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let models = self
            .models
            .list()
            .into_iter()
            .map(|e| pb::ModelInfo {
                id: e.spec.id.clone(),
                max_model_len: e.spec.max_model_len as u32,
                workers: e.workers as u32,
            })
            .collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }
}

fn message(s: &Started, d: Delta) -> pb::GenerateStreamResponse {
    pb::GenerateStreamResponse {
        token_ids: d.token_ids,
        text: d.text,
        logprobs: d.logprobs.into_iter().map(logprob).collect(),
        request_id: s.request_id.clone(),
        model: s.model.clone(),
        ..Default::default()
    }
}

fn append(resp: &mut pb::GenerateResponse, d: Delta) {
    resp.token_ids.extend(d.token_ids);
    resp.text.push_str(&d.text);
    resp.logprobs.extend(d.logprobs.into_iter().map(logprob));
}

fn usage(s: &Summary) -> pb::Usage {
    pb::Usage {
        prompt_tokens: s.prompt_tokens,
        completion_tokens: s.completion_tokens,
        cached_prompt_tokens: s.cached_prompt_tokens,
    }
}

fn timings(s: &Summary) -> pb::Timings {
    pb::Timings {
        queue_time: s.queue_time,
        time_to_first_token: s.time_to_first_token,
        total_time: s.total_time,
    }
}

fn logprob(l: wpb::TokenLogprob) -> pb::TokenLogprob {
    pb::TokenLogprob {
        token_id: l.token_id,
        logprob: l.logprob,
        top: l
            .top
            .into_iter()
            .map(|t| pb::TopLogprob {
                token_id: t.token_id,
                logprob: t.logprob,
            })
            .collect(),
    }
}

/// The client's deadline from the `grpc-timeout` header (`<digits><H|M|S|m|u|n>`).
pub fn grpc_timeout(md: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = md.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert_eq!(grpc_timeout(&md), None);
        for (v, d) in [
            ("250m", Duration::from_millis(250)),
            ("3S", Duration::from_secs(3)),
            ("2M", Duration::from_secs(120)),
            ("1H", Duration::from_secs(3600)),
            ("7u", Duration::from_micros(7)),
            ("9n", Duration::from_nanos(9)),
        ] {
            md.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(grpc_timeout(&md), Some(d), "{v}");
        }
        md.insert("grpc-timeout", "12x".parse().unwrap());
        assert_eq!(grpc_timeout(&md), None);
    }
}
