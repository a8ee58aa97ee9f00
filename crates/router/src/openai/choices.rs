//! The choices of one OpenAI request: started together through the one request path, then
//! either collected into one answer or streamed as they come, each chunk shaped by
//! [`Shape`].

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use openinfer_core::FinishReason;
use openinfer_proto::worker::v1 as wpb;
use serde_json::{json, Value};

use super::error::{Api, ApiError};
use super::request::{Parsed, Prompt};
use crate::error::RouterError;
use crate::models::ModelSpec;
use crate::request::{Delta, Next, Summary};
use crate::service::{CancelGuard, InferenceService, Started};

/// How the answers of one request are written.
pub struct Shape {
    api: Api,
    id: String,
    created: u64,
    model: String,
    /// Completions with `echo`: each prompt's text, written before its choices' output.
    echo: Vec<String>,
    logprobs: bool,
    include_usage: bool,
    /// Tokens of each prompt (usage counts a prompt once, however many choices it has).
    prompt_tokens: Vec<usize>,
    n: usize,
    spec: Option<Arc<ModelSpec>>,
}

/// The output of one choice, as far as it has come.
#[derive(Default)]
struct Collected {
    text: String,
    logprobs: Vec<wpb::TokenLogprob>,
    reason: Option<FinishReason>,
    completion_tokens: u32,
    cached_prompt_tokens: u32,
}

/// Starts every choice of `parsed`; a refusal of any one ends the others.
pub(crate) async fn start(
    service: &InferenceService,
    parsed: &Parsed,
    headers: &axum::http::HeaderMap,
    rpc: &'static str,
) -> Result<(Shape, Vec<(Started, CancelGuard)>), ApiError> {
    let pushback = service.config().retry_pushback;
    let api = parsed.api;
    let started = futures::future::try_join_all(
        parsed
            .calls(headers, rpc)
            .into_iter()
            .map(|call| service.start(call)),
    )
    .await
    .map_err(|e| ApiError::from_router(e, api, pushback))?;
    let first = &started[0].0;
    let spec = service.models().get(&first.model).map(|e| e.spec);
    let echo = if parsed.echo {
        parsed
            .prompts
            .iter()
            .map(|p| match p {
                Prompt::Text(t) => t.clone(),
                Prompt::Ids(ids) => spec
                    .as_ref()
                    .and_then(|s| s.decode(ids, true).ok())
                    .unwrap_or_default(),
                Prompt::Chat(_) => String::new(),
            })
            .collect()
    } else {
        Vec::new()
    };
    let n = parsed.n as usize;
    let shape = Shape {
        api,
        id: format!(
            "{}-{}",
            match api {
                Api::Completions => "cmpl",
                Api::Chat => "chatcmpl",
            },
            first.request_id
        ),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: first.model.clone(),
        echo,
        logprobs: parsed.logprobs.is_some(),
        include_usage: parsed.include_usage,
        prompt_tokens: started
            .iter()
            .step_by(n.max(1))
            .map(|(s, _)| s.prompt_tokens)
            .collect(),
        n,
        spec,
    };
    Ok((shape, started))
}

/// Waits for every choice and answers with one JSON body.
pub(crate) async fn collect(
    shape: Shape,
    started: Vec<(Started, CancelGuard)>,
    pushback: std::time::Duration,
) -> Response {
    let collected =
        futures::future::try_join_all(started.into_iter().map(|(s, g)| run(s, g))).await;
    match collected {
        Ok(choices) => axum::Json(shape.answer(&choices)).into_response(),
        Err(e) => ApiError::from_router(e, shape.api, pushback).into_response(),
    }
}

async fn run(mut s: Started, mut guard: CancelGuard) -> Result<Collected, RouterError> {
    let mut c = Collected::default();
    loop {
        match s.next().await? {
            Next::Delta(d) => c.add(d),
            Next::End(d, end) => {
                guard.disarm();
                c.add(d);
                let summary = s.end(end)?;
                c.end(&summary);
                return Ok(c);
            }
        }
    }
}

impl Collected {
    fn add(&mut self, d: Delta) {
        self.text.push_str(&d.text);
        self.logprobs.extend(d.logprobs);
    }

    fn end(&mut self, s: &Summary) {
        self.reason = Some(s.reason);
        self.completion_tokens = s.completion_tokens;
        self.cached_prompt_tokens = s.cached_prompt_tokens;
    }
}

/// What one choice's stream says next.
enum Event {
    Delta(usize, Delta),
    End(usize, Delta, Summary),
    Failed(RouterError),
}

/// Streams every choice as server-sent events: OpenAI's chunks, then a usage chunk when
/// asked, then `data: [DONE]`. An error after the first byte is an event of its own. When the
/// client goes, the body is dropped and with it every choice's request (cancelled).
pub(crate) fn stream(
    shape: Shape,
    started: Vec<(Started, CancelGuard)>,
    pushback: std::time::Duration,
) -> Response {
    let events = futures::stream::select_all(
        started
            .into_iter()
            .enumerate()
            .map(|(i, (s, g))| Box::pin(events(i, s, g))),
    );
    let body = async_stream::stream! {
        let choices = shape.n * shape.prompt_tokens.len();
        for i in 0..choices {
            if let Some(first) = shape.opening(i) {
                yield sse(&first);
            }
        }
        let mut completion_tokens = 0u32;
        let mut cached_tokens = 0u32;
        let mut offsets = vec![0usize; choices];
        let mut events = events;
        while let Some(event) = events.next().await {
            match event {
                Event::Delta(i, d) => {
                    if !d.text.is_empty() || !d.logprobs.is_empty() {
                        yield sse(&shape.chunk(i, &d, None, &mut offsets[i]));
                    }
                }
                Event::End(i, d, summary) => {
                    completion_tokens += summary.completion_tokens;
                    if shape.first_of_its_prompt(i) {
                        cached_tokens += summary.cached_prompt_tokens;
                    }
                    yield sse(&shape.chunk(i, &d, Some(summary.reason), &mut offsets[i]));
                }
                Event::Failed(e) => {
                    yield sse(&ApiError::from_router(e, shape.api, pushback).body());
                    yield done();
                    return;
                }
            }
        }
        if shape.include_usage {
            yield sse(&shape.usage_chunk(completion_tokens, cached_tokens));
        }
        yield done();
    };
    let mut response = Body::from_stream(body.map(Ok::<_, Infallible>)).into_response();
    *response.status_mut() = StatusCode::OK;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn events(index: usize, mut s: Started, mut guard: CancelGuard) -> impl Stream<Item = Event> {
    async_stream::stream! {
        loop {
            match s.next().await {
                Ok(Next::Delta(d)) => yield Event::Delta(index, d),
                Ok(Next::End(d, end)) => {
                    guard.disarm();
                    match s.end(end) {
                        Ok(summary) => yield Event::End(index, d, summary),
                        Err(e) => {
                            yield Event::Delta(index, d);
                            yield Event::Failed(e);
                        }
                    }
                    return;
                }
                Err(e) => {
                    yield Event::Failed(e);
                    return;
                }
            }
        }
    }
}

fn sse(v: &Value) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"data: ");
    // A Value always serializes.
    let _ = serde_json::to_writer(&mut out, v);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

fn done() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

/// OpenAI's name of a finish reason: the end-of-sequence token is a `stop`.
fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Eos | FinishReason::Stop => "stop",
        other => other.as_str(),
    }
}

impl Shape {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.api, chunk) {
            (Api::Completions, _) => "text_completion",
            (Api::Chat, false) => "chat.completion",
            (Api::Chat, true) => "chat.completion.chunk",
        }
    }

    /// Whether choice `i` is the first of its prompt's (whose prompt usage counts).
    fn first_of_its_prompt(&self, i: usize) -> bool {
        i.is_multiple_of(self.n.max(1))
    }

    fn usage(&self, completion_tokens: u32, cached_tokens: u32) -> Value {
        let prompt: usize = self.prompt_tokens.iter().sum();
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens as usize,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
        })
    }

    /// The one answer of a request that did not stream.
    fn answer(&self, choices: &[Collected]) -> Value {
        let mut completion_tokens = 0;
        let mut cached_tokens = 0;
        let choices: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                completion_tokens += c.completion_tokens;
                if self.first_of_its_prompt(i) {
                    cached_tokens += c.cached_prompt_tokens;
                }
                let reason = c.reason.map(finish_reason);
                match self.api {
                    Api::Completions => {
                        let echo = self.echo.get(i / self.n.max(1)).map_or("", String::as_str);
                        let mut offset = 0;
                        json!({
                            "index": i,
                            "text": format!("{echo}{}", c.text),
                            "logprobs": self.completion_logprobs(&c.logprobs, &mut offset),
                            "finish_reason": reason,
                        })
                    }
                    Api::Chat => json!({
                        "index": i,
                        "message": {"role": "assistant", "content": c.text},
                        "logprobs": self.chat_logprobs(&c.logprobs),
                        "finish_reason": reason,
                    }),
                }
            })
            .collect();
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(completion_tokens, cached_tokens),
        })
    }

    fn envelope(&self, choices: Vec<Value>) -> Value {
        let mut chunk = json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    /// The first chunk of choice `i`, before its output: the role (chat), or the echoed prompt.
    fn opening(&self, i: usize) -> Option<Value> {
        let choice = match self.api {
            Api::Chat => json!({
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": null,
                "finish_reason": null,
            }),
            Api::Completions => {
                let echo = self.echo.get(i / self.n.max(1))?;
                json!({"index": i, "text": echo, "logprobs": null, "finish_reason": null})
            }
        };
        Some(self.envelope(vec![choice]))
    }

    /// A chunk of choice `i`'s output; `offset` is where its text starts in the choice's
    /// whole text (completions' `text_offset`; `echo`, which would shift it, comes without
    /// `logprobs`).
    fn chunk(
        &self,
        i: usize,
        d: &Delta,
        reason: Option<FinishReason>,
        offset: &mut usize,
    ) -> Value {
        let reason = reason.map(finish_reason);
        let choice = match self.api {
            Api::Completions => {
                json!({
                    "index": i,
                    "text": d.text,
                    "logprobs": self.completion_logprobs(&d.logprobs, offset),
                    "finish_reason": reason,
                })
            }
            Api::Chat => {
                let delta = if d.text.is_empty() && reason.is_some() {
                    json!({})
                } else {
                    json!({"content": d.text})
                };
                json!({
                    "index": i,
                    "delta": delta,
                    "logprobs": self.chat_logprobs(&d.logprobs),
                    "finish_reason": reason,
                })
            }
        };
        self.envelope(vec![choice])
    }

    fn usage_chunk(&self, completion_tokens: u32, cached_tokens: u32) -> Value {
        let mut chunk = self.envelope(Vec::new());
        chunk["usage"] = self.usage(completion_tokens, cached_tokens);
        chunk
    }

    /// A token's text, as it stands alone.
    fn token(&self, id: u32) -> String {
        self.spec
            .as_ref()
            .and_then(|s| s.decode(&[id], true).ok())
            .unwrap_or_default()
    }

    /// Completions' `logprobs`: tokens, their log-probabilities, the alternatives of each,
    /// and where each token's text starts.
    fn completion_logprobs(&self, lps: &[wpb::TokenLogprob], offset: &mut usize) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        let mut tokens = Vec::with_capacity(lps.len());
        let mut values = Vec::with_capacity(lps.len());
        let mut tops = Vec::with_capacity(lps.len());
        let mut offsets = Vec::with_capacity(lps.len());
        for lp in lps {
            let text = self.token(lp.token_id);
            offsets.push(*offset);
            *offset += text.len();
            tokens.push(text);
            values.push(lp.logprob);
            let top: serde_json::Map<String, Value> = lp
                .top
                .iter()
                .map(|t| (self.token(t.token_id), json!(t.logprob)))
                .collect();
            tops.push(top);
        }
        json!({
            "tokens": tokens,
            "token_logprobs": values,
            "top_logprobs": tops,
            "text_offset": offsets,
        })
    }

    /// Chat's `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
    fn chat_logprobs(&self, lps: &[wpb::TokenLogprob]) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        let entry = |id: u32, logprob: f32| {
            let text = self.token(id);
            json!({"token": text, "logprob": logprob, "bytes": text.as_bytes()})
        };
        let content: Vec<Value> = lps
            .iter()
            .map(|lp| {
                let mut e = entry(lp.token_id, lp.logprob);
                e["top_logprobs"] = Value::Array(
                    lp.top
                        .iter()
                        .map(|t| entry(t.token_id, t.logprob))
                        .collect(),
                );
                e
            })
            .collect();
        json!({ "content": content })
    }
}
