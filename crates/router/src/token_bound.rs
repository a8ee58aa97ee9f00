//! The most prompt bytes one token can stand for, read from a tokenizer's JSON. A prompt longer
//! than the context times that bound cannot fit, so the router refuses it before tokenizing:
//! tokenizing costs many times the prompt's size in memory.
//!
//! The bound holds when every token covers at most its own text, after a normalizer that can
//! shrink text by a known factor at most. Tokenizers that can fold an unbounded run of input
//! into one token (WordPiece's unknown words, fused unknowns without byte fallback) or drop
//! input (whitespace splitting, stripping, control-character removal) have no bound; their
//! prompts are always tokenized (on the bounded tokenizer pool).

use serde_json::Value;

/// UTF-8's longest character: an unknown character, or a normalizer folding one character
/// into a one-byte one, covers at most this many bytes.
const MAX_CHAR_BYTES: usize = 4;

/// The most bytes of prompt text one token of the tokenizer `json` can cover, or `None` when
/// the tokenizer gives no such bound (see the module docs).
pub fn max_bytes_per_token(json: &str) -> Option<usize> {
    let t: Value = serde_json::from_str(json).ok()?;
    let token = longest_token(&t["model"])?.max(longest_added(&t["added_tokens"]));
    let shrink = shrink_factor(&t["normalizer"])?;
    keeps_input(&t["pre_tokenizer"]).then_some(token.max(MAX_CHAR_BYTES) * shrink)
}

/// The byte length of the model's longest vocabulary entry, when each token covers at most
/// its own text.
fn longest_token(model: &Value) -> Option<usize> {
    let flag = |name: &str| model[name].as_bool().unwrap_or(false);
    match model["type"].as_str()? {
        "BPE" => {
            // Fused unknowns make one token of any run of unknown characters.
            if flag("fuse_unk") && !flag("byte_fallback") && !model["unk_token"].is_null() {
                return None;
            }
            model["vocab"].as_object()?.keys().map(String::len).max()
        }
        // Unigram fuses unknown characters unless they fall back to bytes.
        "Unigram" if flag("byte_fallback") => model["vocab"]
            .as_array()?
            .iter()
            .filter_map(|piece| piece[0].as_str().map(str::len))
            .max(),
        // WordPiece and WordLevel make one unknown token of a word of any length.
        _ => None,
    }
}

fn longest_added(added: &Value) -> usize {
    added.as_array().map_or(0, |tokens| {
        tokens
            .iter()
            .filter_map(|t| t["content"].as_str().map(str::len))
            .max()
            .unwrap_or(0)
    })
}

/// How many times shorter the normalizer can make a text, or `None` if it can remove text.
fn shrink_factor(normalizer: &Value) -> Option<usize> {
    if normalizer.is_null() {
        return Some(1);
    }
    match normalizer["type"].as_str()? {
        "Sequence" => normalizer["normalizers"]
            .as_array()?
            .iter()
            .try_fold(1usize, |f, n| Some(f.saturating_mul(shrink_factor(n)?))),
        "Prepend" | "ByteLevel" => Some(1),
        // Unicode forms and case folding map a character to at least one byte.
        "NFC" | "NFD" | "NFKC" | "NFKD" | "Lowercase" => Some(MAX_CHAR_BYTES),
        "Replace" => {
            let pattern = normalizer["pattern"]["String"].as_str()?.len();
            let content = normalizer["content"].as_str()?.len();
            (content > 0).then(|| pattern.div_ceil(content).max(1))
        }
        // Strip, StripAccents, BertNormalizer, Precompiled, Nmt, regex replaces: may remove.
        _ => None,
    }
}

/// Whether the pre-tokenizer keeps every byte of its input in some piece.
fn keeps_input(pre: &Value) -> bool {
    if pre.is_null() {
        return true;
    }
    match pre["type"].as_str() {
        Some("Sequence") => pre["pretokenizers"]
            .as_array()
            .is_some_and(|all| all.iter().all(keeps_input)),
        Some("ByteLevel" | "Metaspace" | "Digits" | "Punctuation" | "UnicodeScripts") => true,
        Some("Split") => pre["behavior"].as_str() != Some("Removed"),
        // Whitespace, WhitespaceSplit, BertPreTokenizer, CharDelimiterSplit drop separators.
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bound(t: Value) -> Option<usize> {
        max_bytes_per_token(&t.to_string())
    }

    fn bpe(extra: Value) -> Value {
        let mut model =
            json!({"type": "BPE", "vocab": {"a": 0, "hello": 1, "ĠĠĠĠ": 2}, "merges": []});
        for (k, v) in extra.as_object().unwrap() {
            model[k] = v.clone();
        }
        json!({"model": model, "normalizer": null, "pre_tokenizer": {"type": "ByteLevel"}, "added_tokens": []})
    }

    #[test]
    fn byte_level_bpe_is_bounded_by_its_longest_token() {
        // "ĠĠĠĠ" is 8 bytes of JSON text for 4 bytes of input: an over-estimate, never under.
        assert_eq!(bound(bpe(json!({}))), Some(8));
        let mut t = bpe(json!({}));
        t["added_tokens"] = json!([{"content": "<|begin_of_text|>"}]);
        assert_eq!(bound(t), Some(17));
    }

    #[test]
    fn short_vocabularies_still_allow_a_whole_character_per_token() {
        let t = json!({"model": {"type": "BPE", "vocab": {"a": 0}}, "normalizer": null,
            "pre_tokenizer": null});
        assert_eq!(bound(t), Some(MAX_CHAR_BYTES));
    }

    #[test]
    fn sentencepiece_style_normalizers_only_expand() {
        let mut t = bpe(json!({"byte_fallback": true, "fuse_unk": true, "unk_token": "<unk>"}));
        t["normalizer"] = json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]});
        t["pre_tokenizer"] = Value::Null;
        assert_eq!(bound(t), Some(8));
    }

    #[test]
    fn shrinking_normalizers_multiply_the_bound() {
        let mut t = bpe(json!({}));
        t["normalizer"] = json!({"type": "NFC"});
        assert_eq!(bound(t.clone()), Some(32));
        t["normalizer"] =
            json!({"type": "Replace", "pattern": {"String": "    "}, "content": "\t"});
        assert_eq!(bound(t), Some(32));
    }

    #[test]
    fn tokenizers_that_fold_or_drop_input_have_no_bound() {
        assert_eq!(
            bound(bpe(json!({"fuse_unk": true, "unk_token": "<unk>"}))),
            None
        );
        let wordpiece = json!({"model": {"type": "WordPiece", "vocab": {"a": 0}}});
        assert_eq!(bound(wordpiece), None);
        let unigram = json!({"model": {"type": "Unigram", "vocab": [["a", 0.0]]}});
        assert_eq!(bound(unigram), None);
        for normalizer in [
            json!({"type": "Strip", "strip_left": true, "strip_right": true}),
            json!({"type": "Replace", "pattern": {"String": " "}, "content": ""}),
            json!({"type": "BertNormalizer"}),
        ] {
            let mut t = bpe(json!({}));
            t["normalizer"] = normalizer;
            assert_eq!(bound(t), None);
        }
        for pre in [
            json!({"type": "Whitespace"}),
            json!({"type": "Split", "pattern": {"String": " "}, "behavior": "Removed"}),
            json!({"type": "Sequence", "pretokenizers": [{"type": "ByteLevel"}, {"type": "WhitespaceSplit"}]}),
        ] {
            let mut t = bpe(json!({}));
            t["pre_tokenizer"] = pre;
            assert_eq!(bound(t), None);
        }
        assert_eq!(max_bytes_per_token("not json"), None);
    }

    #[test]
    fn unigram_with_byte_fallback_is_bounded() {
        let t = json!({"model": {"type": "Unigram", "byte_fallback": true,
            "vocab": [["<unk>", 0.0], ["▁hello", -1.0]]}, "pre_tokenizer": {"type": "Metaspace"}});
        assert_eq!(bound(t), Some(8));
    }
}
