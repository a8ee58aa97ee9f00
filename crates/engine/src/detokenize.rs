//! Incremental detokenization and stop-string matching.
//!
//! [`Detokenizer`] turns one token at a time into text deltas that never split a UTF-8
//! character and concatenate to the decoded output. [`StopMatcher`] holds back text that could
//! still become a stop string and cuts the output where one matches.

use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// Tokens of context kept before the first generated token (for tokenizers whose decoding of
/// a token depends on its neighbours, such as SentencePiece's leading spaces).
const CONTEXT: usize = 6;

/// Decodes generated tokens into text deltas.
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl Detokenizer {
    /// Starts after `context` (the tail of the tokens already decoded or in the prompt).
    pub fn new(context: &[u32]) -> Self {
        let ctx = &context[context.len().saturating_sub(CONTEXT)..];
        Detokenizer {
            ids: ctx.to_vec(),
            prefix_offset: 0,
            read_offset: ctx.len(),
        }
    }

    /// Adds `id`; returns the text it completes (possibly empty while a character is split).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        self.take(tok, false)
    }

    /// Text of tokens not yet returned (an incomplete character at the very end decodes to
    /// U+FFFD), so that the deltas of a finished sequence add up to its decoded text.
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String> {
        self.take(tok, true)
    }

    /// The text of the tokens after `read_offset`. Unless `finish`, nothing is returned while
    /// that text ends in an incomplete character or a run of byte tokens.
    fn take(&mut self, tok: &Tokenizer, finish: bool) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let mut prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let mut full = tok.decode(&self.ids[self.prefix_offset..])?;
        if prefix.ends_with('\u{FFFD}') || !full.starts_with(&prefix) {
            // The context ends inside a character (only text already sent or shown ends so),
            // or the new tokens change how it decodes (SentencePiece's byte fallback turns a
            // whole run of byte tokens into U+FFFD once one of them is invalid): text already
            // sent cannot be rewritten, so the new tokens are decoded on their own.
            self.prefix_offset = self.read_offset;
            prefix.clear();
            full = tok.decode(&self.ids[self.prefix_offset..])?;
        }
        // A run of byte-fallback tokens is held until it ends: a later byte of the run could
        // make it invalid, and then the tokenizer decodes every byte of it as U+FFFD.
        let open_run = tok.ends_in_byte_run(&self.ids);
        let complete = full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && !open_run;
        if !complete && !finish {
            return Ok(String::new());
        }
        let delta = full.get(prefix.len()..).unwrap_or_default().to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        // Keep the buffer bounded: everything before prefix_offset is decoded for good.
        if self.prefix_offset > 64 {
            self.ids.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
        Ok(delta)
    }
}

/// What [`StopMatcher::push`] decided.
#[derive(Debug, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text safe to send now.
    pub emit: String,
    /// A stop string matched; `emit` ends right before it.
    pub stopped: bool,
}

/// Finds stop strings across token boundaries.
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    /// Matches `stops`; `pending` is text produced but not yet sent (after a resume).
    pub fn new(stops: Vec<String>, pending: String) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending,
        }
    }

    /// Adds `delta` and returns what can be sent.
    pub fn push(&mut self, delta: &str) -> StopOutcome {
        self.pending.push_str(delta);
        if self.stops.is_empty() {
            return StopOutcome {
                emit: std::mem::take(&mut self.pending),
                stopped: false,
            };
        }
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            self.pending.truncate(at);
            return StopOutcome {
                emit: std::mem::take(&mut self.pending),
                stopped: true,
            };
        }
        let hold = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len())
                    .rev()
                    .find(|&k| s.is_char_boundary(k) && self.pending.ends_with(&s[..k]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let keep = self.pending.split_off(self.pending.len() - hold);
        StopOutcome {
            emit: std::mem::replace(&mut self.pending, keep),
            stopped: false,
        }
    }

    /// Text still held back, released when the sequence ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect(), String::new());
        let mut out = String::new();
        for d in deltas {
            let o = m.push(d);
            out.push_str(&o.emit);
            if o.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_strings_match_across_deltas_and_are_not_emitted() {
        assert_eq!(
            run(&["END"], &["ab", "cE", "N", "Dxyz"]),
            ("abc".into(), true)
        );
        assert_eq!(run(&["END"], &["abEN", "x"]), ("abENx".into(), false));
        assert_eq!(
            run(&["\n\n", "##"], &["a\n", "#", "\n"]),
            ("a\n#\n".into(), false)
        );
        assert_eq!(run(&["\n\n", "##"], &["a\n", "\nb"]), ("a".into(), true));
        assert_eq!(run(&["日本"], &["x日", "本"]), ("x".into(), true));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn held_text_is_not_sent_early() {
        let mut m = StopMatcher::new(vec!["STOP".into()], String::new());
        assert_eq!(m.push("hello ST").emit, "hello ");
        assert_eq!(m.push("O").emit, "");
        assert_eq!(m.push("x").emit, "STOx");
    }
}
