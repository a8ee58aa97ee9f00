//! Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the HTTP
//! status of each failure (ARCHITECTURE, HTTP API).

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::RouterError;

/// Which endpoint a request came through, for the names of its fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `/v1/completions`, `/tokenize`, `/detokenize`.
    Completions,
    /// `/v1/chat/completions`.
    Chat,
}

/// A refused or failed HTTP request.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
    retry_after: Option<Duration>,
}

impl ApiError {
    /// A 400 on `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
            retry_after: None,
        }
    }

    /// A 404 for a path the API does not have.
    pub fn no_route(path: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "no endpoint {path}; this server has POST /v1/completions, POST \
                 /v1/chat/completions, GET /v1/models, GET /health, POST /tokenize, POST /detokenize"
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("unknown_url"),
            retry_after: None,
        }
    }

    /// The router's error `e` for a request through `api`; `pushback` is what a 503 asks
    /// clients to wait.
    pub fn from_router(e: RouterError, api: Api, pushback: Duration) -> Self {
        let message = openinfer_core::bounded(match &e {
            RouterError::Invalid(f) => format!("{}: {}", http_field(f.field, api), f.message),
            other => other.to_string(),
        });
        let (status, kind, code, retry_after) = match &e {
            RouterError::Invalid(_) => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", None, None)
            }
            RouterError::UnknownModel { .. } => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
                None,
            ),
            RouterError::QueueFull(_, after) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
                Some(*after),
            ),
            RouterError::QueueTimeout(_)
            | RouterError::TooLateToStart(_)
            | RouterError::DeadlineDuringGeneration(_)
            | RouterError::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                None,
                Some(pushback),
            ),
            RouterError::Worker(_) | RouterError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                None,
                None,
            ),
            RouterError::Unauthenticated(_) => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                Some("invalid_api_key"),
                None,
            ),
            RouterError::PermissionDenied(_) => {
                (StatusCode::FORBIDDEN, "permission_error", None, None)
            }
        };
        let param = match &e {
            RouterError::Invalid(f) => Some(http_field(f.field, api).to_owned()),
            RouterError::UnknownModel { .. } => Some("model".into()),
            RouterError::PermissionDenied(_) => Some("priority".into()),
            _ => None,
        };
        ApiError {
            status,
            message,
            kind,
            param,
            code,
            retry_after,
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The body: `{"error": {...}}`.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// The HTTP API's name of a field the request path names in its own terms.
fn http_field(field: &'static str, api: Api) -> &'static str {
    match (field, api) {
        ("max_new_tokens", _) => "max_tokens",
        ("prompt_ids", Api::Completions) => "prompt",
        ("prompt" | "prompt_ids", Api::Chat) => "messages",
        (f, _) => f,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(after) = self.retry_after {
            let headers = response.headers_mut();
            // Retry-After is whole seconds (rounded up); retry-after-ms is what OpenAI's
            // clients read first.
            let secs = after.as_millis().div_ceil(1000).max(1);
            headers.insert("retry-after", HeaderValue::from(secs as u64));
            headers.insert(
                "retry-after-ms",
                HeaderValue::from(after.as_millis() as u64),
            );
        }
        response
    }
}
