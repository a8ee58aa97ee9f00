//! Request validation: every rule is checked before anything is queued, and a broken rule
//! names its field (ARCHITECTURE §3).

use std::time::{Duration, Instant};

use openinfer_core::{check_length, check_top_logprobs, SamplingParams, StoppingParams};
use openinfer_proto::v1 as pb;
use prost::Message;

use crate::config::RouterConfig;
use crate::error::RouterError;
use crate::models::{ModelEntry, ModelTable};
use crate::observe::RequestTrace;
use crate::request::Request;

/// Longest client request id kept.
const MAX_REQUEST_ID_BYTES: usize = 256;

/// The request id the router gives a request whose client sent none.
pub fn default_request_id(id: u64) -> String {
    format!("req-{id:x}")
}

/// The client's request id, when it is one the router keeps.
pub fn client_request_id(req: &pb::GenerateRequest) -> Option<&str> {
    (!req.request_id.is_empty() && req.request_id.len() <= MAX_REQUEST_ID_BYTES)
        .then_some(req.request_id.as_str())
}

/// How a request is validated, besides its own fields.
#[derive(Debug, Clone, Copy)]
pub struct Checks {
    /// The router's id for it.
    pub id: u64,
    /// The client's deadline (`grpc-timeout`), if any.
    pub queue_timeout: Option<Duration>,
    /// Tokenize a text prompt with the tokenizer's special tokens (and bos when the model wants
    /// one); `false` for a prompt a chat template rendered, which holds them already.
    pub special_tokens: bool,
}

/// Checks `req` and turns it into a [`Request`] for its model; `trace` is its span and trace
/// id, which the request carries on.
pub fn validate(
    req: pb::GenerateRequest,
    models: &ModelTable,
    cfg: &RouterConfig,
    checks: Checks,
    trace: RequestTrace,
) -> Result<Request, RouterError> {
    let Checks {
        id,
        queue_timeout,
        special_tokens,
    } = checks;
    let arrived = Instant::now();
    let entry = before_tokenizing(&req, models, cfg)?;
    let spec = &entry.spec;

    if req.request_id.len() > MAX_REQUEST_ID_BYTES {
        return Err(RouterError::invalid(
            "request_id",
            format!("at most {MAX_REQUEST_ID_BYTES} bytes"),
        ));
    }
    let prompt_ids = match (req.prompt.is_empty(), req.prompt_ids.is_empty()) {
        (true, true) => {
            return Err(RouterError::invalid(
                "prompt",
                "the input is empty; send `prompt` text or `prompt_ids`",
            ))
        }
        (false, false) => {
            return Err(RouterError::invalid(
                "prompt_ids",
                "send either `prompt` or `prompt_ids`, not both",
            ))
        }
        (false, true) => if special_tokens {
            spec.encode(&req.prompt)
        } else {
            spec.encode_rendered(&req.prompt)
        }
        .map_err(|e| RouterError::invalid("prompt", format!("cannot be tokenized: {e}")))?,
        (true, false) => {
            spec.check_ids(&req.prompt_ids, "prompt_ids")?;
            req.prompt_ids
        }
    };
    if prompt_ids.is_empty() {
        return Err(RouterError::invalid("prompt", "tokenizes to no tokens"));
    }
    let context = spec.max_model_len;
    let room = context.saturating_sub(prompt_ids.len()) as u32;
    let max_new_tokens = req
        .max_new_tokens
        .unwrap_or(cfg.default_max_new_tokens.min(room).max(1));
    check_length(prompt_ids.len(), 0, max_new_tokens, context, &spec.id)?;

    let top_k = match req.top_k {
        Some(k) if k < 0 => {
            return Err(RouterError::invalid(
                "top_k",
                "must be ≥ 0 (0 or absent = no limit)",
            ))
        }
        k => k.map(|k| k as u32),
    };
    let sampling = SamplingParams {
        temperature: req.temperature,
        top_p: req.top_p,
        top_k,
        min_p: req.min_p,
        repetition_penalty: req.repetition_penalty,
        frequency_penalty: req.frequency_penalty,
        presence_penalty: req.presence_penalty,
        seed: req.seed,
    };
    sampling.check()?;
    check_top_logprobs(req.top_logprobs)?;
    check_stop(&req.stop, cfg)?;

    // The queue gives up a little before the client's deadline: tonic ends a unary call at
    // the deadline itself with CANCELLED, and the client should hear DEADLINE_EXCEEDED.
    let timeout = queue_timeout.map_or(cfg.default_queue_timeout, |t| {
        answer_within(t).min(cfg.default_queue_timeout)
    });
    Ok(Request {
        id,
        request_id: if req.request_id.is_empty() {
            default_request_id(id)
        } else {
            req.request_id
        },
        model: spec.id.clone(),
        prompt_ids,
        sampling,
        stopping: StoppingParams {
            max_new_tokens,
            stop: req.stop,
            ignore_eos: req.ignore_eos,
        },
        logprobs: req.logprobs || req.top_logprobs > 0,
        top_logprobs: req.top_logprobs,
        priority: req.priority,
        arrived,
        deadline: arrived + timeout,
        client_deadline: queue_timeout.map(|t| arrived + answer_within(t)),
        trace,
        tenant: crate::tenants::ANONYMOUS.into(),
        weight: 1.0,
        prefix_keys: Vec::new(),
    })
}

/// The checks that need no tokenizing, cheap enough to run before a prompt waits for the
/// tokenizer pool: the request's size, its model, and whether the prompt's byte length alone
/// proves it too long for the model's context. Returns the model's entry.
pub fn before_tokenizing(
    req: &pb::GenerateRequest,
    models: &ModelTable,
    cfg: &RouterConfig,
) -> Result<ModelEntry, RouterError> {
    check_size(req, cfg)?;
    let entry = resolve_model(&req.model, models, cfg)?;
    let spec = &entry.spec;
    if let Some(limit) = spec.max_prompt_bytes {
        if req.prompt.len() > limit {
            return Err(RouterError::invalid(
                "prompt",
                format!(
                    "{} bytes cannot fit the context of `{}` ({} tokens): its tokenizer makes \
                     at most {} bytes into one token, so at most {limit} bytes can fit; shorten it",
                    req.prompt.len(),
                    spec.id,
                    spec.max_model_len,
                    limit / spec.max_model_len.max(1),
                ),
            ));
        }
    }
    Ok(entry)
}

/// How long the router may take to answer a client whose deadline is `t` away: a little less
/// (5 %, at most 50 ms), because tonic ends a call at the deadline itself with `CANCELLED`
/// and the client should hear `DEADLINE_EXCEEDED` from the router.
pub fn answer_within(t: Duration) -> Duration {
    t.saturating_sub(margin(t))
}

/// How long a unary call may generate before it answers `DEADLINE_EXCEEDED` itself: after
/// the queue gives up ([`answer_within`]), before tonic does.
pub fn generate_within(t: Duration) -> Duration {
    t.saturating_sub(margin(t) / 2)
}

fn margin(t: Duration) -> Duration {
    (t / 20).min(Duration::from_millis(50))
}

/// The entry for `name`; empty selects the default model.
pub fn resolve_model(
    name: &str,
    models: &ModelTable,
    cfg: &RouterConfig,
) -> Result<ModelEntry, RouterError> {
    let unknown = |model: &str| RouterError::UnknownModel {
        model: openinfer_core::echo(model),
        served: models.names(),
    };
    if !name.is_empty() {
        return models.get(name).ok_or_else(|| unknown(name));
    }
    if let Some(default) = &cfg.default_model {
        return models.get(default).ok_or_else(|| unknown(default));
    }
    let all = models.list();
    match all.as_slice() {
        [only] => Ok(only.clone()),
        [] => Err(RouterError::Unavailable(
            "no worker has connected yet; retry shortly".into(),
        )),
        _ => Err(RouterError::invalid(
            "model",
            format!(
                "this router serves several models ({}); name one",
                models.names()
            ),
        )),
    }
}

fn check_size(req: &pb::GenerateRequest, cfg: &RouterConfig) -> Result<(), RouterError> {
    let size = req.encoded_len();
    if size <= cfg.max_request_bytes {
        return Ok(());
    }
    let stop: usize = req.stop.iter().map(String::len).sum();
    let fields = [
        ("prompt", req.prompt.len()),
        ("prompt_ids", req.prompt_ids.len() * 4),
        ("stop", stop),
        ("request_id", req.request_id.len()),
    ];
    let field = fields
        .iter()
        .max_by_key(|(_, n)| *n)
        .map_or("prompt", |(f, _)| f);
    Err(RouterError::invalid(
        field,
        format!(
            "the request is {size} bytes, over the router's limit of {} bytes (--max-request-bytes); shorten `{field}`",
            cfg.max_request_bytes
        ),
    ))
}

/// The answer to a message over the transport's hard `ceiling`, which is refused before it is
/// decoded (so its fields are unknown): the same code and limit as [`check_size`]'s.
pub fn over_limit(cfg: &RouterConfig) -> RouterError {
    RouterError::invalid(
        "prompt",
        format!(
            "the request is over the router's limit of {} bytes (--max-request-bytes); \
             shorten `prompt` or `prompt_ids`",
            cfg.max_request_bytes
        ),
    )
}

fn check_stop(stop: &[String], cfg: &RouterConfig) -> Result<(), RouterError> {
    if stop.len() > cfg.max_stop_strings {
        return Err(RouterError::invalid(
            "stop",
            format!(
                "{} stop strings; at most {} are allowed",
                stop.len(),
                cfg.max_stop_strings
            ),
        ));
    }
    for (i, s) in stop.iter().enumerate() {
        if s.is_empty() {
            return Err(RouterError::invalid("stop", format!("stop[{i}] is empty")));
        }
        if s.len() > cfg.max_stop_bytes {
            return Err(RouterError::invalid(
                "stop",
                format!(
                    "stop[{i}] is {} bytes; at most {} are allowed",
                    s.len(),
                    cfg.max_stop_bytes
                ),
            ));
        }
    }
    Ok(())
}
