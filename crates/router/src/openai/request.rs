//! An OpenAI request body read into the gRPC API's terms: one `GenerateRequest` per choice
//! (prompts × `n`), each handed to the one request path as a [`Call`].

use axum::http::HeaderMap;
use openinfer_proto::v1 as pb;
use openinfer_telemetry::TraceParent;
use serde_json::{json, Value};

use super::error::{Api, ApiError};
use super::fields::{self, Fields};
use crate::config::RouterConfig;
use crate::service::{Call, Conversation};

/// Longest `user` kept, in bytes.
const MAX_USER_BYTES: usize = 256;

/// `temperature` when a request sets none, as in OpenAI's API.
const DEFAULT_TEMPERATURE: f32 = 1.0;

/// Most messages in one conversation.
const MAX_MESSAGES: usize = 4096;

/// One prompt of a request.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Text, tokenized with the model's special tokens.
    Text(String),
    /// Token ids, as they are.
    Ids(Vec<u32>),
    /// Chat messages, rendered with the model's template.
    Chat(Value),
}

/// A request to `/v1/completions` or `/v1/chat/completions`, read and checked.
#[derive(Debug)]
pub struct Parsed {
    /// Its endpoint.
    pub api: Api,
    /// The prompts; each gets `n` choices.
    pub prompts: Vec<Prompt>,
    /// Choices per prompt.
    pub n: u32,
    /// Answer as server-sent events.
    pub stream: bool,
    /// Streamed: end with a chunk of usage.
    pub include_usage: bool,
    /// Completions: the prompt's text comes before the generated text.
    pub echo: bool,
    /// Log-probabilities wanted, with this many alternatives per token.
    pub logprobs: Option<u32>,
    /// Chat: end the rendered prompt with the assistant's header.
    pub add_generation_prompt: bool,
    /// The end user the client names.
    pub user: Option<String>,
    /// Everything but the prompt, in the gRPC API's terms.
    pub base: pb::GenerateRequest,
}

impl Parsed {
    /// Reads a `/v1/completions` body.
    pub fn completions(body: &[u8], cfg: &RouterConfig) -> Result<Self, ApiError> {
        let mut f = Fields::parse(body)?;
        let prompts = match f.take_raw("prompt") {
            None => return Err(ApiError::invalid("prompt", "prompt is required")),
            Some(v) => prompts(v)?,
        };
        let echo = f.take::<bool>("echo", "true or false")?.unwrap_or(false);
        let logprobs = f.take::<u32>("logprobs", "a number of alternatives (0 to 20)")?;
        let mut parsed = common(&mut f, Api::Completions, prompts, logprobs, cfg)?;
        parsed.echo = echo;
        if echo && parsed.logprobs.is_some() {
            return Err(ApiError::invalid(
                "echo",
                "echo with logprobs would need the prompt's log-probabilities, which this \
                 server does not compute; drop one of them",
            ));
        }
        f.finish("/v1/completions")?;
        Ok(parsed)
    }

    /// Reads a `/v1/chat/completions` body.
    pub fn chat(body: &[u8], cfg: &RouterConfig) -> Result<Self, ApiError> {
        let mut f = Fields::parse(body)?;
        let messages = match f.take_raw("messages") {
            None => return Err(ApiError::invalid("messages", "messages is required")),
            Some(v) => messages(v)?,
        };
        let wants = f
            .take::<bool>("logprobs", "true or false")?
            .unwrap_or(false);
        let top = f.take::<u32>("top_logprobs", "a number of alternatives (0 to 20)")?;
        if top.is_some() && !wants {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs needs logprobs set to true",
            ));
        }
        let logprobs = wants.then(|| top.unwrap_or(0));
        let add_generation_prompt = f
            .take::<bool>("add_generation_prompt", "true or false")?
            .unwrap_or(true);
        let mut parsed = common(
            &mut f,
            Api::Chat,
            vec![Prompt::Chat(messages)],
            logprobs,
            cfg,
        )?;
        parsed.add_generation_prompt = add_generation_prompt;
        f.finish("/v1/chat/completions")?;
        Ok(parsed)
    }

    /// The calls of every choice: prompt by prompt, `n` each (choice `i` of a prompt samples
    /// with `seed + i`, so choices differ and a seed repeats them all).
    pub(crate) fn calls(&self, headers: &HeaderMap, rpc: &'static str) -> Vec<Call> {
        let authorization = headers
            .get(axum::http::header::AUTHORIZATION)
            .map(|v| v.as_bytes().to_vec());
        let request_id = headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let mut calls = Vec::new();
        for prompt in &self.prompts {
            for i in 0..self.n {
                let mut req = self.base.clone();
                req.seed = req.seed.map(|s| s.wrapping_add(u64::from(i)));
                if !request_id.is_empty() {
                    req.request_id = if self.prompts.len() * self.n as usize == 1 {
                        request_id.to_owned()
                    } else {
                        format!("{request_id}-{}", calls.len())
                    };
                }
                let conversation = match prompt {
                    Prompt::Text(t) => {
                        req.prompt = t.clone();
                        None
                    }
                    Prompt::Ids(ids) => {
                        req.prompt_ids = ids.clone();
                        None
                    }
                    Prompt::Chat(messages) => Some(Conversation {
                        messages: messages.clone(),
                        add_generation_prompt: self.add_generation_prompt,
                    }),
                };
                calls.push(Call {
                    req,
                    authorization: authorization.clone(),
                    parent: TraceParent::from_headers(headers),
                    timeout: None,
                    system: "http",
                    rpc,
                    conversation,
                    user: self.user.clone(),
                });
            }
        }
        calls
    }
}

/// The fields both endpoints share.
fn common(
    f: &mut Fields,
    api: Api,
    prompts: Vec<Prompt>,
    logprobs: Option<u32>,
    cfg: &RouterConfig,
) -> Result<Parsed, ApiError> {
    let model = f.take::<String>("model", "a model id")?.unwrap_or_default();
    let max_tokens = f.take::<u32>("max_tokens", "a number of tokens")?;
    let max_completion_tokens = f.take::<u32>("max_completion_tokens", "a number of tokens")?;
    let max_new_tokens = match (max_tokens, max_completion_tokens) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::invalid(
                "max_completion_tokens",
                "max_tokens and max_completion_tokens differ; send one",
            ))
        }
        (a, b) => a.or(b),
    };
    if max_new_tokens == Some(0) {
        return Err(ApiError::invalid(
            "max_tokens",
            "max_tokens must be at least 1",
        ));
    }
    let number = "a number";
    let top_k = match f.take::<i64>("top_k", "an integer (0 or -1: no limit)")? {
        None | Some(-1) | Some(0) => None,
        Some(k) if k < 0 || k > i64::from(i32::MAX) => {
            return Err(ApiError::invalid(
                "top_k",
                "top_k must be -1 or 0 (no limit) or a positive count",
            ))
        }
        Some(k) => Some(k as i32),
    };
    let n = f.take::<u32>("n", "a number of choices")?.unwrap_or(1);
    let choices = prompts.len().saturating_mul(n as usize);
    if n == 0 || choices > cfg.max_choices {
        return Err(ApiError::invalid(
            if n == 0 || prompts.len() == 1 {
                "n"
            } else {
                "prompt"
            },
            format!(
                "{} prompt(s) × n = {n} asks for {choices} choices; between 1 and {} are \
                 allowed (the router's --max-choices)",
                prompts.len(),
                cfg.max_choices
            ),
        ));
    }
    let stream = f.take::<bool>("stream", "true or false")?.unwrap_or(false);
    let include_usage = match f.take_raw("stream_options") {
        None => false,
        Some(_) if !stream => {
            return Err(ApiError::invalid(
                "stream_options",
                "stream_options is only allowed with stream: true",
            ))
        }
        Some(Value::Object(mut o)) => {
            let usage = match o.remove("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => b,
                Some(_) => {
                    return Err(ApiError::invalid(
                        "stream_options",
                        "stream_options.include_usage must be true or false",
                    ))
                }
            };
            if let Some(k) = o.keys().next() {
                return Err(ApiError::invalid(
                    "stream_options",
                    format!(
                        "stream_options.{} is not supported; only include_usage is",
                        openinfer_core::echo(k)
                    ),
                ));
            }
            usage
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "stream_options",
                "stream_options must be an object such as {\"include_usage\": true}",
            ))
        }
    };
    let user = f.take::<String>("user", "a string")?;
    if user.as_ref().is_some_and(|u| u.len() > MAX_USER_BYTES) {
        return Err(ApiError::invalid(
            "user",
            format!("user must be at most {MAX_USER_BYTES} bytes"),
        ));
    }
    // OpenAI's seed is a signed 64-bit integer; its bits are the seed.
    let seed = f.take::<i64>("seed", "an integer")?.map(|s| s as u64);
    let base = pb::GenerateRequest {
        model,
        max_new_tokens,
        // OpenAI's default: sampling at temperature 1 (the gRPC API's default is greedy).
        temperature: Some(
            f.take("temperature", number)?
                .unwrap_or(DEFAULT_TEMPERATURE),
        ),
        top_p: f.take("top_p", number)?,
        top_k,
        min_p: f.take("min_p", number)?,
        repetition_penalty: f.take("repetition_penalty", number)?,
        frequency_penalty: f.take("frequency_penalty", number)?,
        presence_penalty: f.take("presence_penalty", number)?,
        seed,
        stop: fields::stop(f)?,
        ignore_eos: f.take("ignore_eos", "true or false")?.unwrap_or(false),
        priority: f.take("priority", "an integer")?.unwrap_or(0),
        logprobs: logprobs.is_some(),
        top_logprobs: logprobs.unwrap_or(0),
        ..Default::default()
    };
    Ok(Parsed {
        api,
        prompts,
        n,
        stream,
        include_usage,
        echo: false,
        logprobs,
        add_generation_prompt: true,
        user,
        base,
    })
}

/// `prompt`: a string, a list of strings, a list of token ids or a list of such lists.
fn prompts(v: Value) -> Result<Vec<Prompt>, ApiError> {
    let bad = || {
        ApiError::invalid(
            "prompt",
            "prompt must be a string, a list of strings, a list of token ids or a list of \
             lists of token ids",
        )
    };
    let ids = |v: &Value| -> Option<Vec<u32>> {
        v.as_array()?
            .iter()
            .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
            .collect()
    };
    let prompts = match &v {
        Value::String(s) => vec![Prompt::Text(s.clone())],
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::invalid("prompt", "prompt is an empty list"))
        }
        Value::Array(items) if items.iter().all(Value::is_string) => items
            .iter()
            .map(|s| Prompt::Text(s.as_str().unwrap_or_default().to_owned()))
            .collect(),
        Value::Array(items) if items.iter().all(Value::is_number) => {
            vec![Prompt::Ids(ids(&v).ok_or_else(bad)?)]
        }
        Value::Array(items) => items
            .iter()
            .map(|p| ids(p).map(Prompt::Ids).ok_or_else(bad))
            .collect::<Result<_, _>>()?,
        _ => return Err(bad()),
    };
    Ok(prompts)
}

/// `messages`, checked and put the way templates expect them: `{role, content}` with the
/// content as text (text parts joined by newlines), `name` kept.
pub(crate) fn messages(v: Value) -> Result<Value, ApiError> {
    let Value::Array(list) = v else {
        return Err(ApiError::invalid(
            "messages",
            "messages must be a list of {\"role\", \"content\"} objects",
        ));
    };
    if list.is_empty() || list.len() > MAX_MESSAGES {
        return Err(ApiError::invalid(
            "messages",
            format!("messages must hold between 1 and {MAX_MESSAGES} messages"),
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.into_iter().enumerate() {
        let at = |field: &str| format!("messages[{i}].{field}");
        let Value::Object(mut m) = m else {
            return Err(ApiError::invalid(
                format!("messages[{i}]"),
                format!("messages[{i}] must be an object with role and content"),
            ));
        };
        let role = match m.remove("role") {
            Some(Value::String(r)) if !r.is_empty() => r,
            _ => {
                return Err(ApiError::invalid(
                    at("role"),
                    format!("{} must be a role such as \"user\"", at("role")),
                ))
            }
        };
        let content = match m.remove("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s,
            Some(Value::Array(parts)) => {
                let mut texts = Vec::with_capacity(parts.len());
                for (j, part) in parts.iter().enumerate() {
                    match (
                        part.get("type").and_then(Value::as_str),
                        part.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => texts.push(t),
                        (kind, _) => {
                            return Err(ApiError::invalid(
                                format!("messages[{i}].content[{j}]"),
                                format!(
                                    "messages[{i}].content[{j}]: only text parts \
                                     ({{\"type\": \"text\", \"text\": ...}}) are supported, \
                                     not {}",
                                    kind.map_or("this".into(), openinfer_core::echo)
                                ),
                            ))
                        }
                    }
                }
                texts.join("\n")
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    at("content"),
                    format!("{} must be a string or a list of text parts", at("content")),
                ))
            }
        };
        let mut message = json!({"role": role, "content": content});
        match m.remove("name") {
            None | Some(Value::Null) => {}
            Some(Value::String(n)) => message["name"] = Value::String(n),
            Some(_) => {
                return Err(ApiError::invalid(
                    at("name"),
                    format!("{} must be a string", at("name")),
                ))
            }
        }
        if let Some((k, _)) = m.iter().find(|(_, v)| !v.is_null()) {
            let why = if matches!(k.as_str(), "tool_calls" | "tool_call_id" | "function_call") {
                "function calling is not supported by this server"
            } else {
                "not a field of a message here"
            };
            return Err(ApiError::invalid(
                at(k),
                format!("{}: {why}; remove it", at(&openinfer_core::echo(k))),
            ));
        }
        out.push(message);
    }
    Ok(Value::Array(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RouterConfig {
        RouterConfig::default()
    }

    #[test]
    fn every_prompt_form_is_read() {
        let p =
            Parsed::completions(br#"{"prompt": ["a", "b"], "n": 2, "seed": 7}"#, &cfg()).unwrap();
        assert_eq!(p.prompts.len(), 2);
        let calls = p.calls(&HeaderMap::new(), "POST /v1/completions");
        assert_eq!(calls.len(), 4);
        let seeds: Vec<_> = calls.iter().map(|c| c.req.seed.unwrap()).collect();
        assert_eq!(seeds, [7, 8, 7, 8]);
        assert_eq!(calls[2].req.prompt, "b");
        let p = Parsed::completions(br#"{"prompt": [1, 2, 3]}"#, &cfg()).unwrap();
        assert!(matches!(&p.prompts[..], [Prompt::Ids(ids)] if ids == &[1, 2, 3]));
        assert_eq!(
            p.base.temperature,
            Some(1.0),
            "OpenAI's default temperature"
        );
        let greedy = Parsed::completions(br#"{"prompt": "a", "temperature": 0}"#, &cfg());
        assert_eq!(greedy.unwrap().base.temperature, Some(0.0));
        let p = Parsed::completions(br#"{"prompt": [[1], [2, 3]]}"#, &cfg()).unwrap();
        assert_eq!(p.prompts.len(), 2);
        for bad in [
            r#"{"prompt": []}"#,
            r#"{"prompt": [1, "a"]}"#,
            r#"{"prompt": [-1]}"#,
            r#"{"prompt": {"a": 1}}"#,
            r#"{}"#,
        ] {
            let e = Parsed::completions(bad.as_bytes(), &cfg()).unwrap_err();
            assert_eq!(e.body()["error"]["param"], "prompt", "{bad}");
        }
    }

    #[test]
    fn unsupported_and_unknown_fields_are_refused_by_name() {
        for (body, param) in [
            (r#"{"prompt": "a", "best_of": 3}"#, "best_of"),
            (r#"{"prompt": "a", "logit_bias": {"1": 2}}"#, "logit_bias"),
            (r#"{"prompt": "a", "nonsense": 1}"#, "nonsense"),
            (r#"{"prompt": "a", "n": 0}"#, "n"),
            (r#"{"prompt": "a", "n": 1000}"#, "n"),
            (
                r#"{"prompt": "a", "stream_options": {"include_usage": true}}"#,
                "stream_options",
            ),
            (r#"{"prompt": "a", "echo": true, "logprobs": 1}"#, "echo"),
            (r#"{"prompt": "a", "max_tokens": 0}"#, "max_tokens"),
        ] {
            let e = Parsed::completions(body.as_bytes(), &cfg()).unwrap_err();
            assert_eq!(e.body()["error"]["param"], param, "{body}");
            assert_eq!(e.status(), 400);
        }
        let ok = r#"{"prompt": "a", "best_of": 1, "logit_bias": {}, "suffix": null}"#;
        assert!(Parsed::completions(ok.as_bytes(), &cfg()).is_ok());
        for (body, param) in [
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}"#,
                "tools",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}"#,
                "response_format",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}"#,
                "top_logprobs",
            ),
            (
                r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
                "messages[0].content[0]",
            ),
            (
                r#"{"messages": [{"role": "assistant", "tool_calls": [{}]}]}"#,
                "messages[0].tool_calls",
            ),
            (r#"{"messages": []}"#, "messages"),
            (r#"{"messages": [{"content": "x"}]}"#, "messages[0].role"),
        ] {
            let e = Parsed::chat(body.as_bytes(), &cfg()).unwrap_err();
            assert_eq!(e.body()["error"]["param"], param, "{body}");
        }
    }

    #[test]
    fn messages_are_normalised_for_templates() {
        let p = Parsed::chat(
            br#"{"messages": [{"role": "system", "content": null}, {"role": "user", "name": "ann", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "logprobs": true, "top_logprobs": 3, "stream": true, "stream_options": {"include_usage": true}}"#,
            &cfg(),
        )
        .unwrap();
        let Prompt::Chat(m) = &p.prompts[0] else {
            panic!()
        };
        assert_eq!(
            m,
            &json!([{"role": "system", "content": ""}, {"role": "user", "content": "a\nb", "name": "ann"}])
        );
        assert_eq!(p.logprobs, Some(3));
        assert!(p.include_usage && p.stream);
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    /// JSON values a client might send, nested a little.
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            (-1e6f64..1e6).prop_map(|f| json!(f)),
            "[a-z {}%\u{e9}]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("role".to_owned()),
                        Just("content".to_owned()),
                        Just("type".to_owned()),
                        Just("text".to_owned()),
                        "[a-z_]{1,8}"
                    ],
                    inner,
                    0..5
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    const FIELDS: &[&str] = &[
        "model",
        "prompt",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logprobs",
        "top_logprobs",
        "echo",
        "stream",
        "stream_options",
        "user",
        "top_k",
        "min_p",
        "repetition_penalty",
        "ignore_eos",
        "priority",
        "tools",
        "best_of",
        "logit_bias",
    ];

    proptest! {
        /// Whatever body arrives, reading it never panics: it is accepted within the bounds or
        /// refused with a 400 that names a parameter.
        #[test]
        fn random_bodies_are_read_or_refused_by_name(
            fields in proptest::collection::btree_map(
                proptest::sample::select(FIELDS).prop_map(str::to_owned),
                json_value(),
                0..8,
            ),
            chat in any::<bool>(),
        ) {
            let body = serde_json::to_vec(&Value::Object(fields.into_iter().collect())).unwrap();
            let cfg = RouterConfig::default();
            let read = if chat { Parsed::chat(&body, &cfg) } else { Parsed::completions(&body, &cfg) };
            match read {
                Ok(p) => {
                    prop_assert!(p.n >= 1);
                    prop_assert!(p.prompts.len() * p.n as usize <= cfg.max_choices);
                    prop_assert!(!p.calls(&HeaderMap::new(), "test").is_empty());
                }
                Err(e) => {
                    prop_assert_eq!(e.status(), 400);
                    let body = e.body();
                    prop_assert!(body["error"]["param"].is_string(), "{}", body);
                    prop_assert!(!body["error"]["message"].as_str().unwrap_or_default().is_empty());
                }
            }
        }
    }
}
