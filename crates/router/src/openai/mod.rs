//! The OpenAI-compatible HTTP API (`--http-listen`): `/v1/completions`,
//! `/v1/chat/completions`, `/v1/models`, `/health`, `/tokenize` and `/detokenize`.
//!
//! It is a face, not a second path: a request is read into the gRPC API's terms
//! ([`request`]), each of its choices goes through [`InferenceService::start`] (tenants,
//! quotas, admission, validation, tracing, metrics), and the output is written back as
//! OpenAI's JSON or server-sent events ([`choices`]). Errors take OpenAI's shape ([`error`]).

mod choices;
pub mod error;
mod fields;
mod request;
mod serve;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::error::RouterError;
use crate::service::InferenceService;
use error::{Api, ApiError};
use fields::Fields;
use request::Parsed;

pub use serve::serve;

#[derive(Clone)]
struct Gateway {
    service: InferenceService,
    serving: watch::Receiver<bool>,
}

/// The API's routes over `service`; `serving` is whether the router takes requests now.
pub fn routes(service: InferenceService, serving: watch::Receiver<bool>) -> axum::Router {
    let limit = service.config().max_request_bytes;
    axum::Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .fallback(|uri: Uri| async move { ApiError::no_route(uri.path()).into_response() })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(Arc::new(Gateway { service, serving }))
}

impl Gateway {
    fn error(&self, e: RouterError, api: Api) -> ApiError {
        ApiError::from_router(e, api, self.service.config().retry_pushback)
    }

    /// The body, or the answer to one over `--max-request-bytes`.
    fn body(&self, body: Result<Bytes, BytesRejection>, api: Api) -> Result<Bytes, ApiError> {
        body.map_err(|_| self.error(crate::validate::over_limit(self.service.config()), api))
    }

    /// The caller's tenant must exist (any priority): for the endpoints that generate
    /// nothing.
    fn authenticate(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let key = headers
            .get(axum::http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        self.service
            .authenticate(key, 0)
            .map(drop)
            .map_err(|e| self.error(e, Api::Completions))
    }

    /// The body of a `/tokenize` or `/detokenize` call from a known tenant, and its model.
    fn tool_request(
        &self,
        body: Result<Bytes, BytesRejection>,
        headers: &HeaderMap,
    ) -> Result<(Fields, String), ApiError> {
        let body = self.body(body, Api::Completions)?;
        self.authenticate(headers)?;
        let mut f = Fields::parse(&body)?;
        let model = f.take::<String>("model", "a model id")?.unwrap_or_default();
        Ok((f, model))
    }

    async fn generate(
        &self,
        headers: HeaderMap,
        parsed: Result<Parsed, ApiError>,
        rpc: &'static str,
    ) -> Response {
        let parsed = match parsed {
            Ok(p) => p,
            Err(e) => return e.into_response(),
        };
        let pushback = self.service.config().retry_pushback;
        match choices::start(&self.service, &parsed, &headers, rpc).await {
            Err(e) => e.into_response(),
            Ok((shape, started)) if parsed.stream => choices::stream(shape, started, pushback),
            Ok((shape, started)) => choices::collect(shape, started, pushback).await,
        }
    }
}

async fn completions(
    State(g): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let parsed = g
        .body(body, Api::Completions)
        .and_then(|b| Parsed::completions(&b, g.service.config()));
    g.generate(headers, parsed, "POST /v1/completions").await
}

async fn chat(
    State(g): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let parsed = g
        .body(body, Api::Chat)
        .and_then(|b| Parsed::chat(&b, g.service.config()));
    g.generate(headers, parsed, "POST /v1/chat/completions")
        .await
}

async fn models(State(g): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    if let Err(e) = g.authenticate(&headers) {
        return e.into_response();
    }
    let data: Vec<Value> = g
        .service
        .models()
        .list()
        .into_iter()
        .map(|e| {
            json!({
                "id": e.spec.id,
                "object": "model",
                "created": 0,
                "owned_by": "openinfer",
                "max_model_len": e.spec.max_model_len,
                "workers": e.workers,
            })
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// 200 while the router takes requests (a worker is linked, no drain), 503 otherwise.
async fn health(State(g): State<Arc<Gateway>>) -> Response {
    if *g.serving.borrow() {
        StatusCode::OK.into_response()
    } else {
        g.error(
            RouterError::Unavailable(
                "no worker is linked, or the router is draining; retry shortly".into(),
            ),
            Api::Completions,
        )
        .into_response()
    }
}

/// A JSON answer, or the error in OpenAI's shape.
fn reply(answer: Result<Value, ApiError>) -> Response {
    match answer {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `{model?, prompt, add_special_tokens?}` or `{model?, messages, add_generation_prompt?}` →
/// `{count, max_model_len, tokens}`: the ids a completion or chat request would send.
async fn tokenize(
    State(g): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let answer = async {
        let (mut f, model) = g.tool_request(body, &headers)?;
        let prompt = f.take::<String>("prompt", "a string")?;
        let messages = f.take_raw("messages");
        let add_special = f.take::<bool>("add_special_tokens", "true or false")?;
        let add_generation_prompt = f
            .take::<bool>("add_generation_prompt", "true or false")?
            .unwrap_or(true);
        f.finish("/tokenize")?;
        let cfg = g.service.config();
        let entry = crate::validate::resolve_model(&model, g.service.models(), cfg)
            .map_err(|e| g.error(e, Api::Completions))?;
        let spec = entry.spec.clone();
        let tokens = match (prompt, messages) {
            (Some(p), None) => {
                let encoded = if add_special.unwrap_or(true) {
                    g.service.off_thread(move || spec.encode(&p)).await
                } else {
                    g.service.off_thread(move || spec.encode_rendered(&p)).await
                };
                encoded
                    .map_err(|e| g.error(e, Api::Completions))?
                    .map_err(|e| ApiError::invalid("prompt", format!("cannot be tokenized: {e}")))?
            }
            (None, Some(m)) => {
                let messages = request::messages(m)?;
                let text = spec
                    .render_chat(&messages, add_generation_prompt)
                    .map_err(|e| g.error(e, Api::Chat))?;
                g.service
                    .off_thread(move || spec.encode_rendered(&text))
                    .await
                    .map_err(|e| g.error(e, Api::Chat))?
                    .map_err(|e| {
                        ApiError::invalid("messages", format!("cannot be tokenized: {e}"))
                    })?
            }
            _ => {
                return Err(ApiError::invalid(
                    "prompt",
                    "send either prompt (text) or messages (a conversation)",
                ))
            }
        };
        Ok::<_, ApiError>(json!({
            "count": tokens.len(),
            "max_model_len": entry.spec.max_model_len,
            "tokens": tokens,
        }))
    };
    reply(answer.await)
}

/// `{model?, tokens}` → `{prompt}`: the text of token ids, special tokens kept.
async fn detokenize(
    State(g): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let answer = async {
        let (mut f, model) = g.tool_request(body, &headers)?;
        let tokens = f
            .take::<Vec<u32>>("tokens", "a list of token ids")?
            .ok_or_else(|| ApiError::invalid("tokens", "tokens is required"))?;
        f.finish("/detokenize")?;
        let entry = crate::validate::resolve_model(&model, g.service.models(), g.service.config())
            .map_err(|e| g.error(e, Api::Completions))?;
        let spec = entry.spec;
        spec.check_ids(&tokens, "tokens")
            .map_err(|e| g.error(e, Api::Completions))?;
        let text = g
            .service
            .off_thread(move || spec.decode(&tokens, true))
            .await
            .map_err(|e| g.error(e, Api::Completions))?
            .map_err(|e| ApiError::invalid("tokens", format!("cannot be decoded: {e}")))?;
        Ok::<_, ApiError>(json!({ "prompt": text }))
    };
    reply(answer.await)
}
