//! Property tests of the tokenizer and the incremental detokenizer on random input: random
//! text (any Unicode, and the replacement of random bytes) through encoding, random ids
//! (inside and outside the vocabulary) through incremental decoding and stop strings. No
//! input panics; deltas of ids that decode add up to the whole decoding, with a byte-level
//! BPE vocabulary and with a SentencePiece one (byte fallback, the `llama2` fixture's).
//!
//! Short in CI (proptest's default of 256 cases); longer: `PROPTEST_CASES=100000 cargo test --release -p
//! openinfer-engine --test tokenizer_fuzz`.

use std::str::FromStr;

use openinfer_engine::detokenize::{Detokenizer, StopMatcher};
use openinfer_engine::tokenizer::Tokenizer;
use proptest::prelude::*;

const VOCAB: usize = 512;

fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
    TOKENIZER.get_or_init(make_tokenizer)
}

/// The `llama2` fixture's SentencePiece vocabulary (byte fallback, `▁` word boundaries).
fn sentencepiece() -> &'static Tokenizer {
    static TOKENIZER: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama2");
        openinfer_engine::ModelDir::open(dir).unwrap().tokenizer
    })
}

/// The text `ids` stream after `context`: the deltas and what a flush adds.
fn stream(tok: &Tokenizer, context: &[u32], ids: &[u32]) -> (Vec<String>, String) {
    let mut detok = Detokenizer::new(context);
    let deltas: Vec<String> = ids.iter().map(|&id| detok.push(tok, id).unwrap()).collect();
    (deltas, detok.flush(tok).unwrap())
}

fn make_tokenizer() -> Tokenizer {
    let json = openinfer_engine::make_model::byte_level_bpe(VOCAB).to_string();
    let inner = tokenizers::Tokenizer::from_str(&json).unwrap();
    Tokenizer::from_parts(inner, None, vec![], false)
}

proptest! {
    #[test]
    fn random_text_encodes_and_round_trips(
        text in prop_oneof!["\\PC{0,200}", ".{0,200}"],
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let tok = tokenizer();
        for t in [text, String::from_utf8_lossy(&bytes).into_owned()] {
            let ids = tok.encode_prompt(&t).unwrap();
            prop_assert!(ids.iter().all(|&id| (id as usize) < VOCAB));
            // Special tokens kept: a text may spell one (`<s>`), which encodes to it.
            prop_assert_eq!(tok.inner().decode(&ids, false).unwrap(), t);
        }
    }

    #[test]
    fn random_ids_decode_incrementally_without_panic(
        context in proptest::collection::vec(0u32..VOCAB as u32, 0..10),
        ids in proptest::collection::vec(prop_oneof![0u32..VOCAB as u32, any::<u32>()], 0..100),
        stops in proptest::collection::vec(".{1,6}", 0..4),
    ) {
        let tok = tokenizer();
        let mut detok = Detokenizer::new(&context);
        let mut stop = StopMatcher::new(stops, String::new());
        let mut text = String::new();
        let mut known = true;
        for &id in &ids {
            match detok.push(tok, id) {
                Ok(delta) => {
                    let outcome = stop.push(&delta);
                    let _ = outcome;
                    text.push_str(&delta);
                }
                Err(_) => known = false,
            }
        }
        if let Ok(rest) = detok.flush(tok) {
            text.push_str(&rest);
            let _ = stop.flush();
        }
        if known && ids.iter().all(|&id| (id as usize) < VOCAB) {
            prop_assert_eq!(text, tok.decode(&ids).unwrap());
        }
    }
}

proptest! {
    /// With a SentencePiece vocabulary, random ids (byte tokens among them, valid UTF-8 or
    /// not) stream into the text the tokenizer decodes them to as a whole.
    #[test]
    fn random_ids_stream_into_their_decoding_with_a_sentencepiece_vocabulary(
        ids in proptest::collection::vec(0u32..VOCAB as u32, 0..100),
    ) {
        let tok = sentencepiece();
        let (deltas, rest) = stream(tok, &[], &ids);
        prop_assert_eq!(deltas.concat() + &rest, tok.decode(&ids).unwrap());
    }
}

/// SentencePiece: a word after the prompt keeps its space; a byte token (Llama 2 writes a
/// newline as `<0x0A>`) waits for the end of its run; a run that turns out invalid UTF-8
/// streams as the tokenizer decodes it whole (every byte U+FFFD), not as a valid first byte
/// already sent and a U+FFFD after it.
#[test]
fn sentencepiece_spaces_and_byte_runs_stream_as_they_decode() {
    let tok = sentencepiece();
    let id = |piece: &str| tok.inner().token_to_id(piece).unwrap();
    let prompt = tok.encode_prompt("The sun rises in the").unwrap();
    let (word, newline, quote, lone) = (id("▁in"), id("<0x0A>"), id("<0x22>"), id("<0xD9>"));

    let (deltas, rest) = stream(tok, &prompt, &[word, newline, word]);
    assert_eq!(deltas, [" in", "", "\n in"]);
    assert_eq!(rest, "");

    let (deltas, rest) = stream(tok, &prompt, &[quote, lone, word]);
    assert_eq!(deltas, ["", "", "\u{FFFD}\u{FFFD} in"]);
    assert_eq!(rest, "");
    let (deltas, rest) = stream(tok, &prompt, &[word, quote, lone]);
    assert_eq!(deltas, [" in", "", ""]);
    assert_eq!(rest, "\u{FFFD}\u{FFFD}");
}

/// The case proptest found: a context that ends inside a character (a lone lead byte), then
/// a continuation byte. The deltas are the new token's own text, not a rewrite of the
/// context's.
#[test]
fn a_context_ending_inside_a_character_leaves_the_new_tokens_their_own_text() {
    let tok = tokenizer();
    let mut detok = Detokenizer::new(&[197]);
    let mut text = detok.push(tok, 131).unwrap();
    text.push_str(&detok.flush(tok).unwrap());
    assert_eq!(text, tok.decode(&[131]).unwrap());
}
