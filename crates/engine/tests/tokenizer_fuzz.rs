//! Property tests of the tokenizer and the incremental detokenizer on random input: random
//! text (any Unicode, and the replacement of random bytes) through encoding, random ids
//! (inside and outside the vocabulary) through incremental decoding and stop strings. No
//! input panics; deltas of ids that decode add up to the whole decoding.
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
            prop_assert_eq!(tok.decode(&ids).unwrap(), t);
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
