//! A model's chat template, rendered with minijinja the way transformers' `apply_chat_template`
//! renders it: `trim_blocks` and `lstrip_blocks`, loop controls, Python's string and dict
//! methods, `tojson` as `json.dumps` writes it, `raise_exception`, `strftime_now`, and the
//! `{% generation %}` block tag (its body is rendered as is).

use std::fmt::Write as _;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};

/// Template instructions one rendering may run: far above any real template on a request the
/// router accepts, low enough that a hostile template cannot hold a thread for long.
const FUEL: u64 = 50_000_000;

/// Why a template could not be compiled, or refused or failed to render a conversation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TemplateError {
    /// The template's source does not compile.
    #[error("the chat template does not compile: {0}")]
    Compile(String),
    /// The template called `raise_exception` (it refuses the conversation); its message.
    #[error("{0}")]
    Raised(String),
    /// Rendering failed for another reason.
    #[error("the chat template failed on this conversation: {0}")]
    Render(String),
}

/// A compiled chat template with the special-token texts it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`.
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, generation_as_if(source))
            .map_err(|e| TemplateError::Compile(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Renders `messages` (a list of `{role, content, ...}` maps), ending with the assistant's
    /// header when `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| TemplateError::Render(describe(&e)))?;
        // As transformers passes them: tools and documents as none, a special token only
        // when the model names it (a template may test `bos_token is defined`).
        let mut ctx: std::collections::BTreeMap<&str, Value> = [
            ("messages", Value::from_serialize(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
        ]
        .into_iter()
        .collect();
        for (name, token) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
        ] {
            if let Some(t) = token {
                ctx.insert(name, Value::from(t.as_str()));
            }
        }
        template.render(ctx).map_err(|e| {
            if e.kind() == ErrorKind::InvalidOperation {
                if let Some(message) = e.detail().and_then(|d| d.strip_prefix(RAISED)) {
                    return TemplateError::Raised(message.to_owned());
                }
            }
            TemplateError::Render(describe(&e))
        })
    }
}

/// Marks the detail of an error a template raised itself.
const RAISED: &str = "raised: ";

/// An error and the chain of its causes, on one line.
fn describe(e: &Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let _ = write!(text, ": {s}");
        source = s.source();
    }
    text
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED}{message}"),
    ))
}

/// Python's `datetime.now().strftime(format)`, in the router's local time.
fn strftime_now(format: String) -> Result<Value, Error> {
    let mut text = String::new();
    write!(text, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: `{format}` is not a valid date format"),
        )
    })?;
    Ok(Value::from(text))
}

/// transformers' `{% generation %}…{% endgeneration %}` marks the assistant's tokens; its body
/// renders as is. minijinja has no such tag, so it becomes `{% if true %}…{% endif %}`, which
/// keeps the tag's whitespace control (`-`, `+`) as written.
fn generation_as_if(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let body = inner
            .trim_start_matches(['-', '+'])
            .trim_end_matches(['-', '+']);
        let head = &inner[..inner.len() - inner.trim_start_matches(['-', '+']).len()];
        let tail = &inner[inner.trim_end_matches(['-', '+']).len()..];
        let replaced = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replaced {
            Some(r) => {
                let _ = write!(out, "{{%{head} {r} {tail}%}}");
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// transformers' `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, so `", "` and `": "` between items, floats as Python
/// writes them, non-ASCII kept.
fn tojson(value: Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")?.or(indent) {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(n.clamp(0, 64) as usize)),
            (_, Some(s)) => Some(s.to_owned()),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be a number or a string",
                ))
            }
        },
    };
    let mut style = Json {
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        item: if indent.is_some() { "," } else { ", " }.to_owned(),
        key: ": ".to_owned(),
        indent,
    };
    if let Some(seps) = kwargs.get::<Option<Value>>("separators")? {
        let item = seps.get_item_by_index(0)?;
        let key = seps.get_item_by_index(1)?;
        if let (Some(item), Some(key)) = (item.as_str(), key.as_str()) {
            style.item = item.to_owned();
            style.key = key.to_owned();
        }
    }
    kwargs.assert_all_used()?;
    let mut out = String::new();
    style.write(&mut out, &value, 0)?;
    Ok(Value::from_safe_string(out))
}

/// How [`tojson`] writes.
struct Json {
    ensure_ascii: bool,
    sort_keys: bool,
    indent: Option<String>,
    item: String,
    key: String,
}

impl Json {
    fn write(&self, out: &mut String, v: &Value, depth: usize) -> Result<(), Error> {
        if depth > 128 {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: nested too deeply",
            ));
        }
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if v.is_integer() {
                    out.push_str(&v.to_string());
                } else {
                    let f = f64::try_from(v.clone())?;
                    out.push_str(&py_float(f));
                }
            }
            ValueKind::String => self.string(out, v.as_str().unwrap_or_default()),
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    self.separate(out, i, depth + 1);
                    let key = match k.as_str() {
                        Some(s) => s.to_owned(),
                        None if k.is_none() => "null".into(),
                        None if k.kind() == ValueKind::Bool => {
                            if k.is_true() { "true" } else { "false" }.into()
                        }
                        None => k.to_string(),
                    };
                    self.string(out, &key);
                    out.push_str(&self.key);
                    self.write(out, &v.get_item(k)?, depth + 1)?;
                }
                self.close(out, depth, '}');
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    self.separate(out, i, depth + 1);
                    self.write(out, item, depth + 1)?;
                }
                self.close(out, depth, ']');
            }
            _ => self.string(out, &v.to_string()),
        }
        Ok(())
    }

    fn separate(&self, out: &mut String, i: usize, depth: usize) {
        if i > 0 {
            out.push_str(&self.item);
        }
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    }

    fn close(&self, out: &mut String, depth: usize, bracket: char) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
        out.push(bracket);
    }

    fn string(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !c.is_ascii()) => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{u:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A float as Python's `repr` (and so `json.dumps`) writes it: the shortest digits that read
/// back the same, `1.0` not `1`, exponent form below 1e-4 and from 1e16 (`1e-05`, `1e+16`).
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if f == 0.0 || (-4..16).contains(&exp) {
        let plain = format!("{f}");
        if plain.contains('.') {
            plain
        } else {
            plain + ".0"
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(source: &str, messages: serde_json::Value) -> Result<String, TemplateError> {
        ChatTemplate::new(source, Some("<s>".into()), Some("</s>".into()))?.render(&messages, true)
    }

    #[test]
    fn floats_read_as_python_writes_them() {
        for (f, py) in [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (-2.25, "-2.25"),
            (1e16, "1e+16"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (123456789.0, "123456789.0"),
            (0.1 + 0.2, "0.30000000000000004"),
            (f64::NAN, "NaN"),
        ] {
            assert_eq!(py_float(f), py, "{f}");
        }
    }

    #[test]
    fn tojson_writes_as_json_dumps() {
        let t = "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2) }}|{{ 'é\"\\n' | tojson }}|{{ [] | tojson }}|{{ 'é' | tojson(ensure_ascii=true) }}";
        let out = render(t, json!([{"a": [1, 2.5, true, null], "b": "x"}])).unwrap();
        assert_eq!(
            out,
            "{\"a\": [1, 2.5, true, null], \"b\": \"x\"}|{\n  \"a\": [\n    1,\n    2.5,\n    true,\n    null\n  ],\n  \"b\": \"x\"\n}|\"é\\\"\\n\"|[]|\"\\u00e9\""
        );
    }

    #[test]
    fn generation_tag_renders_its_body_with_its_whitespace_control() {
        let t = "{% for m in messages %}[{%- generation -%}  {{ m.content }}  {%- endgeneration -%}]{% endfor %}";
        assert_eq!(render(t, json!([{"content": "hi"}])).unwrap(), "[hi]");
        assert_eq!(
            generation_as_if("a{% generation %}b{%+ endgeneration %}c{% if x %}{% endif %}"),
            "a{% if true %}b{%+ endif %}c{% if x %}{% endif %}"
        );
    }

    #[test]
    fn raise_exception_is_the_template_s_own_refusal() {
        let t = "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}ok";
        match render(t, json!([{"role": "system", "content": "x"}])) {
            Err(TemplateError::Raised(m)) => assert_eq!(m, "System role not supported"),
            other => panic!("{other:?}"),
        }
        assert_eq!(render(t, json!([{"role": "user"}])).unwrap(), "ok");
    }

    #[test]
    fn python_methods_loop_controls_and_blocks_trimming() {
        let t = "{% for m in messages %}\n  {% if loop.index0 == 2 %}{% break %}{% endif %}\n  {{ m.content.strip().upper() }}{% if m.content.startswith(' a') %}!{% endif %}\n{% endfor %}";
        let out = render(
            t,
            json!([{"content": " a "}, {"content": "b"}, {"content": "c"}]),
        )
        .unwrap();
        // lstrip_blocks strips before block tags only; trim_blocks eats the newline after them.
        assert_eq!(out, "  A!  B");
        let date = render("{{ strftime_now('%Y') }}", json!([])).unwrap();
        assert_eq!(date.len(), 4, "{date}");
        assert!(matches!(
            render("{{ strftime_now('%Q%') }}", json!([])),
            Err(TemplateError::Render(_))
        ));
    }

    #[test]
    fn a_broken_template_is_refused_at_compile_and_a_runaway_one_runs_out_of_fuel() {
        assert!(matches!(
            ChatTemplate::new("{% for %}", None, None),
            Err(TemplateError::Compile(_))
        ));
        let runaway =
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}";
        assert!(matches!(
            render(runaway, json!([])),
            Err(TemplateError::Render(_))
        ));
    }
}
