//! The tokenizer stored in a GGUF file's `tokenizer.ggml.*` keys, rebuilt as the Hugging Face
//! fast tokenizer the model was converted from.
//!
//! * `gpt2` (byte-level BPE: GPT-2, Llama 3, Qwen, SmolLM): vocabulary and merges as stored;
//!   the pre-tokenizer is chosen by `tokenizer.ggml.pre`, the name llama.cpp's converter gives
//!   the HF pre-tokenizer it recognised.
//! * `llama` (SentencePiece BPE: Llama 2, Mistral, TinyLlama): merges are rebuilt from the
//!   pieces' scores as transformers' `SentencePieceExtractor` does, with byte fallback and
//!   the `▁` word boundary.
//!
//! Control tokens (type 3) and the unknown token (type 2, SentencePiece's `<unk>`) become
//! special added tokens and user-defined ones (type 4) plain added tokens, so all are matched
//! whole in text, as in the HF tokenizer and llama.cpp.

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use super::Meta;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::tokenizer::{ChatFacts, Tokenizer};

/// Llama 3's split pattern (digits in runs of up to three).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `tokenizer.ggml.pre` names of Llama 3's tokenizer: words found whole in the vocabulary
/// skip the merges, and text starts with bos unless the file says otherwise (as in llama.cpp).
const LLAMA3_PRE: [&str; 3] = ["llama-bpe", "llama3", "llama-v3"];

/// Qwen2's split pattern (single digits).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Texts of control tokens that end a turn, which llama.cpp treats as end-of-generation
/// whatever `eos_token_id` says (a GGUF file names one eos; HF's `generation_config.json`
/// often lists several, e.g. Llama 3's `<|eot_id|>` and Qwen's `<|im_end|>`).
const END_OF_TURN: [&str; 9] = [
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "<｜end▁of▁sentence｜>",
];

/// GGUF token types (llama.cpp's `llama_token_type`).
const TYPE_UNKNOWN: u32 = 2;
const TYPE_CONTROL: u32 = 3;
const TYPE_USER_DEFINED: u32 = 4;

fn wrap<'a, E: std::fmt::Display>(meta: &'a Meta, key: &str) -> impl Fn(E) -> EngineError + 'a {
    let key = key.to_string();
    move |e| meta.err(&key, e.to_string())
}

/// The tokenizer, special tokens and chat template of a GGUF file.
pub(crate) fn from_gguf(meta: &Meta, config: &ModelConfig) -> Result<Tokenizer> {
    let kind = meta.string("tokenizer.ggml.model")?;
    let tokens = meta
        .strings("tokenizer.ggml.tokens")?
        .ok_or_else(|| meta.err("tokenizer.ggml.tokens", "missing"))?;
    if tokens.len() > config.vocab_size {
        return Err(meta.err(
            "tokenizer.ggml.tokens",
            format!(
                "{} tokens for an embedding of {} rows",
                tokens.len(),
                config.vocab_size
            ),
        ));
    }
    let types: Vec<u32> = match meta.numbers("tokenizer.ggml.token_type")? {
        Some(t) if t.len() == tokens.len() => t.into_iter().map(|x| x as u32).collect(),
        Some(t) => {
            return Err(meta.err(
                "tokenizer.ggml.token_type",
                format!("{} types for {} tokens", t.len(), tokens.len()),
            ))
        }
        None => vec![1; tokens.len()],
    };
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    let token_id = |key: &str| -> Result<Option<u32>> {
        let id = meta.u64_opt(key)?;
        match id {
            Some(id) if id as usize >= tokens.len() => Err(meta.err(
                key,
                format!(
                    "token {id} is outside the vocabulary ({} tokens)",
                    tokens.len()
                ),
            )),
            id => Ok(id.map(|n| n as u32)),
        }
    };
    let unk = token_id("tokenizer.ggml.unknown_token_id")?;
    let bos = token_id("tokenizer.ggml.bos_token_id")?;
    for key in ["eos_token_id", "eot_token_id", "eom_token_id"] {
        token_id(&format!("tokenizer.ggml.{key}"))?;
    }
    let pre = meta.string_opt("tokenizer.ggml.pre")?.unwrap_or("default");
    let llama3 = kind == "gpt2" && LLAMA3_PRE.contains(&pre);
    let mut inner = match kind {
        "gpt2" => {
            let merges = parse_merges(
                meta,
                &meta
                    .strings("tokenizer.ggml.merges")?
                    .ok_or_else(|| meta.err("tokenizer.ggml.merges", "missing"))?,
            )?;
            // Llama 3 takes a word that is in the vocabulary whole, before any merge (its
            // tokenizer.json's `ignore_merges`, llama.cpp's rule for these pre-tokenizers).
            let bpe = BPE::builder()
                .vocab_and_merges(vocab, merges)
                .ignore_merges(llama3)
                .build()
                .map_err(wrap(meta, "tokenizer.ggml.merges"))?;
            let mut t = tokenizers::Tokenizer::new(bpe);
            let (normalizer, pre_tokenizer) = byte_level_pre(meta, pre)?;
            if let Some(n) = normalizer {
                t.with_normalizer(Some(n));
            }
            t.with_pre_tokenizer(Some(pre_tokenizer));
            t.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
            t
        }
        "llama" => {
            let scores = meta
                .numbers("tokenizer.ggml.scores")?
                .ok_or_else(|| meta.err("tokenizer.ggml.scores", "missing"))?;
            if scores.len() != tokens.len() {
                return Err(meta.err("tokenizer.ggml.scores",
                    format!("{} scores for {} tokens", scores.len(), tokens.len()),
                ));
            }
            let merges = sentencepiece_merges(&tokens, &scores, &vocab);
            let mut builder = BPE::builder()
                .vocab_and_merges(vocab, merges)
                .byte_fallback(true)
                .fuse_unk(true);
            if let Some(u) = unk {
                builder = builder.unk_token(tokens[u as usize].to_string());
            }
            let bpe = builder.build().map_err(wrap(meta, "tokenizer.ggml.tokens"))?;
            let mut t = tokenizers::Tokenizer::new(bpe);
            let add_space = meta
                .bool_opt("tokenizer.ggml.add_space_prefix")?
                .unwrap_or(true);
            let replace = Replace::new(" ", "▁").map_err(wrap(meta, "tokenizer.ggml.model"))?;
            let normalizer = if add_space {
                NormalizerSequence::new(vec![Prepend::new("▁".into()).into(), replace.into()])
            } else {
                NormalizerSequence::new(vec![replace.into()])
            };
            t.with_normalizer(Some(normalizer));
            let mut decoders: Vec<DecoderWrapper> = vec![
                DecoderWrapper::Replace(
                    Replace::new("▁", " ").map_err(wrap(meta, "tokenizer.ggml.model"))?,
                ),
                ByteFallback::new().into(),
                Fuse::new().into(),
            ];
            if add_space {
                decoders.push(Strip::new(' ', 1, 0).into());
            }
            t.with_decoder(Some(DecoderSequence::new(decoders)));
            t
        }
        other => {
            return Err(meta.err("tokenizer.ggml.model",
                format!("`{other}` is not supported; supported: gpt2 (byte-level BPE) and llama (SentencePiece)"),
            ))
        }
    };
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &ty)| matches!(ty, TYPE_UNKNOWN | TYPE_CONTROL | TYPE_USER_DEFINED))
        .map(|(t, &ty)| AddedToken::from(t.to_string(), ty != TYPE_USER_DEFINED).normalized(false))
        .collect();
    inner.add_special_tokens(&added);
    let add_bos_token = meta
        .bool_opt("tokenizer.ggml.add_bos_token")?
        .unwrap_or(kind == "llama" || llama3);
    if add_bos_token && bos.is_none() {
        return Err(meta.err(
            "tokenizer.ggml.bos_token_id",
            "missing, but add_bos_token is true",
        ));
    }
    let text = |id: Option<u32>| id.map(|i| tokens[i as usize].to_string());
    let eos = meta
        .u64_opt("tokenizer.ggml.eos_token_id")?
        .map(|n| n as u32)
        .or(config.eos_token_ids.first().copied());
    let mut end: Vec<u32> = config.eos_token_ids.clone();
    end.extend(
        tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (t, &ty))| ty == TYPE_CONTROL && END_OF_TURN.contains(t))
            .map(|(i, _)| i as u32),
    );
    end.sort_unstable();
    end.dedup();
    let mut tokenizer = Tokenizer::from_parts(inner, bos, end, add_bos_token);
    tokenizer.chat = ChatFacts {
        template: meta
            .string_opt("tokenizer.chat_template")?
            .map(str::to_owned),
        bos_token: text(bos),
        eos_token: text(eos),
    };
    Ok(tokenizer)
}

fn parse_merges(meta: &Meta, merges: &[&str]) -> Result<Merges> {
    merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    meta.err(
                        "tokenizer.ggml.merges",
                        format!("`{m}` is not two tokens separated by a space"),
                    )
                })
        })
        .collect()
}

/// The normalizer and pre-tokenizer of the HF tokenizer that llama.cpp names `pre`.
fn byte_level_pre(
    meta: &Meta,
    pre: &str,
) -> Result<(Option<tokenizers::NormalizerWrapper>, PreTokenizerWrapper)> {
    let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
        let regex = SplitPattern::Regex(pattern.to_string());
        let split = Split::new(regex, SplitDelimiterBehavior::Isolated, false)
            .map_err(wrap(meta, "tokenizer.ggml.pre"))?;
        Ok(PreSequence::new(vec![
            split.into(),
            ByteLevel::new(false, false, false).into(),
        ])
        .into())
    };
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => (None, ByteLevel::new(false, true, true).into()),
        "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" => (None, split(LLAMA3_SPLIT)?),
        "qwen2" | "deepseek-r1-qwen" => (Some(NFC.into()), split(QWEN2_SPLIT)?),
        "smollm" => (
            None,
            PreSequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
        ),
        other => {
            return Err(meta.err("tokenizer.ggml.pre",
                format!("pre-tokenizer `{other}` is not supported; supported: default (GPT-2), llama-bpe (Llama 3), qwen2, smollm"),
            ))
        }
    })
}

/// Merges of a SentencePiece BPE vocabulary, as transformers' `SentencePieceExtractor`
/// builds them: every split of a piece into two pieces of the vocabulary is a merge, ranked by
/// the whole piece's score (highest first); equal scores keep the pieces' order, then the
/// halves' ids. A file whose scores are all equal (llama.cpp's converter writes -1000 for a
/// vocabulary read from `tokenizer.json`) so merges in the pieces' order, the order
/// SentencePiece learnt them in.
fn sentencepiece_merges(tokens: &[&str], scores: &[f64], vocab: &Vocab) -> Merges {
    let mut merges: Vec<(f64, u32, u32, String, String)> = Vec::new();
    for (piece, &score) in tokens.iter().zip(scores) {
        let mut local = Vec::new();
        for (i, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(i);
            if let (Some(&a), Some(&b)) = (vocab.get(l), vocab.get(r)) {
                local.push((score, a, b, l.to_string(), r.to_string()));
            }
        }
        local.sort_by_key(|m| (m.1, m.2));
        merges.extend(local);
    }
    // A stable sort keeps the id order of equal scores, as Python's `sorted` does.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    merges.into_iter().map(|m| (m.3, m.4)).collect()
}
