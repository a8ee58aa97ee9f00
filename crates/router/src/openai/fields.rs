//! A request body read field by field: each field is taken by name with its type checked (a
//! wrong type names the field), and whatever is left at the end is refused by name, so no
//! field is ever silently ignored.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::error::ApiError;

/// Fields of OpenAI's API this server does not implement, with the value that asks for
/// nothing (sent by some clients by default), and why.
const NOT_IMPLEMENTED: &[(&str, &str)] = &[
    ("tools", "function calling is not supported"),
    ("tool_choice", "function calling is not supported"),
    ("parallel_tool_calls", "function calling is not supported"),
    ("functions", "function calling is not supported"),
    ("function_call", "function calling is not supported"),
    ("response_format", "structured output is not supported"),
    ("logit_bias", "logit bias is not supported"),
    ("best_of", "best_of is not supported; use n"),
    ("suffix", "suffix (fill-in-the-middle) is not supported"),
    ("audio", "audio output is not supported"),
    ("modalities", "only text output is supported"),
    ("prediction", "predicted outputs are not supported"),
    ("reasoning_effort", "reasoning settings are not supported"),
    (
        "service_tier",
        "service tiers are not supported; use priority",
    ),
    ("store", "stored completions are not supported"),
    ("metadata", "stored completions are not supported"),
    ("web_search_options", "web search is not supported"),
];

/// Values of unimplemented fields that ask for nothing, so are accepted.
fn asks_nothing(name: &str, v: &Value) -> bool {
    match name {
        "tools" | "functions" => v.as_array().is_some_and(Vec::is_empty),
        "tool_choice" | "function_call" => v.as_str() == Some("none"),
        "logit_bias" | "metadata" => v.as_object().is_some_and(Map::is_empty),
        "response_format" => v.get("type").and_then(Value::as_str) == Some("text"),
        "best_of" => v.as_u64() == Some(1),
        "suffix" => v.as_str() == Some(""),
        "store" => v.as_bool() == Some(false),
        "service_tier" => matches!(v.as_str(), Some("auto" | "default")),
        _ => false,
    }
}

/// A JSON object body.
pub struct Fields {
    map: Map<String, Value>,
}

impl Fields {
    /// Parses `body`, which must be a JSON object.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(map)) => Ok(Fields { map }),
            Ok(_) => Err(ApiError::invalid(
                "body",
                "the body must be a JSON object of the request's fields",
            )),
            Err(e) => Err(ApiError::invalid(
                "body",
                format!("the body is not valid JSON: {e}"),
            )),
        }
    }

    /// Field `name`, absent or `null` as `None`; `expected` says what it must be.
    pub fn take<T: DeserializeOwned>(
        &mut self,
        name: &'static str,
        expected: &str,
    ) -> Result<Option<T>, ApiError> {
        match self.map.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v)
                .map(Some)
                .map_err(|e| ApiError::invalid(name, format!("{name} must be {expected} ({e})"))),
        }
    }

    /// Field `name` as it was sent (absent or `null` as `None`).
    pub fn take_raw(&mut self, name: &'static str) -> Option<Value> {
        self.map.remove(name).filter(|v| !v.is_null())
    }

    /// Refuses whatever field is left: unimplemented ones with why, unknown ones as such.
    pub fn finish(self, endpoint: &str) -> Result<(), ApiError> {
        for (name, value) in &self.map {
            if value.is_null() {
                continue;
            }
            if let Some((_, why)) = NOT_IMPLEMENTED.iter().find(|(n, _)| n == name) {
                if asks_nothing(name, value) {
                    continue;
                }
                return Err(ApiError::invalid(
                    name.as_str(),
                    format!("`{name}`: {why} by this server; remove it"),
                ));
            }
            return Err(ApiError::invalid(
                name.as_str(),
                format!(
                    "`{}` is not a field of {endpoint} here; remove it (docs/openai.md lists \
                     every field)",
                    openinfer_core::echo(name)
                ),
            ));
        }
        Ok(())
    }
}

/// `stop`: a string or a list of strings.
pub fn stop(fields: &mut Fields) -> Result<Vec<String>, ApiError> {
    match fields.take_raw("stop") {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s]),
        Some(v) => serde_json::from_value(v)
            .map_err(|_| ApiError::invalid("stop", "stop must be a string or a list of strings")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_taken_by_name_and_the_rest_is_refused_by_name() {
        let mut f =
            Fields::parse(br#"{"temperature": 0.5, "n": null, "tools": [], "x": 1}"#).unwrap();
        assert_eq!(f.take::<f32>("temperature", "a number").unwrap(), Some(0.5));
        assert_eq!(f.take::<u32>("n", "a count").unwrap(), None);
        let e = f.finish("/v1/completions").unwrap_err();
        assert_eq!(e.body()["error"]["param"], "x");

        let mut f = Fields::parse(br#"{"temperature": "hot"}"#).unwrap();
        let e = f.take::<f32>("temperature", "a number").unwrap_err();
        assert_eq!(e.body()["error"]["param"], "temperature");
        assert_eq!(e.status(), 400);

        let f = Fields::parse(br#"{"tools": [{"type": "function"}]}"#).unwrap();
        let e = f.finish("/v1/chat/completions").unwrap_err();
        assert_eq!(e.body()["error"]["param"], "tools");
        assert!(e.body()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not supported"));
        assert!(Fields::parse(b"[1]").is_err());
        assert!(Fields::parse(b"{").is_err());
    }
}
