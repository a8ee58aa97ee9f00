//! The real chat templates of Llama 3.1, Mistral, Qwen2.5, SmolLM2 and Gemma render every
//! conversation of `tests/fixtures/chat_templates/conversations.json` exactly as transformers'
//! `apply_chat_template` does (its renderings committed beside them by
//! `scripts/chat-templates.py`), refusals included.

use std::path::PathBuf;

use openinfer_router::chat_template::{ChatTemplate, TemplateError};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat_templates")
}

fn read(path: PathBuf) -> Value {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn renderings_match_transformers() {
    let conversations = read(fixtures().join("conversations.json"));
    let conversations = conversations.as_array().unwrap();
    let mut checked = 0;
    let mut mismatches = Vec::new();
    for name in ["llama-3.1", "mistral", "qwen2.5", "smollm2", "gemma"] {
        let t = read(fixtures().join(format!("templates/{name}.json")));
        let expected = read(fixtures().join(format!("expected/{name}.json")));
        let token = |k: &str| t[k].as_str().map(str::to_owned);
        let template = ChatTemplate::new(
            t["chat_template"].as_str().unwrap(),
            token("bos_token"),
            token("eos_token"),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        for c in conversations {
            let conv = c["name"].as_str().unwrap();
            let want = &expected["renderings"][conv];
            assert!(!want.is_null(), "{name}/{conv}: no expected rendering");
            let got = template.render(
                &c["messages"],
                c["add_generation_prompt"].as_bool().unwrap(),
            );
            let ok = match (&got, want.get("text"), want.get("error")) {
                (Ok(text), Some(w), _) => Some(text.as_str()) == w.as_str(),
                (Err(TemplateError::Raised(m)), _, Some(w)) => Some(m.as_str()) == w.as_str(),
                _ => false,
            };
            if !ok {
                mismatches.push(format!("{name}/{conv}:\n  want {want}\n  got  {got:?}"));
            }
            checked += 1;
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    assert_eq!(checked, 5 * conversations.len());
}
