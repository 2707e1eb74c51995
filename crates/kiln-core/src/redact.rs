//! Redaction of secret values from a sandbox's output: every occurrence of
//! a value becomes `[redacted:<name>]` before the output is stored
//! anywhere (results, live logs, events, execution history).
//!
//! All values are searched at once (Aho-Corasick, leftmost-longest). Output
//! arrives in chunks, and a value may be cut between two of them, so a
//! [`RedactStream`] holds back the tail of what it has seen that could
//! still be the start of a value: at most the longest value's length less
//! one byte, and only from the first byte that some value starts with. A
//! match whose longer alternatives cannot all be seen yet is held back
//! too, so a short value that is a prefix of a longer one never lets the
//! longer one's remainder through. Memory per stream is therefore bounded
//! by the longest value.
//!
//! Every value is redacted, however short: a one-byte secret shreds the
//! output it appears in, and that is the price of never showing it.

use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};

/// The values of one job's secrets, ready to search for.
#[derive(Debug)]
pub struct Redactor {
    search: AhoCorasick,
    /// The replacement for each pattern, by pattern index.
    marks: Vec<Vec<u8>>,
    longest: usize,
    /// Bytes some value starts with: a held-back tail starts at one.
    starts: [bool; 256],
}

impl Redactor {
    /// A redactor for `(name, value)` pairs; `None` when there is nothing
    /// to search for (no values, or only empty ones).
    pub fn new(secrets: &[(String, Vec<u8>)]) -> Result<Option<Arc<Redactor>>, String> {
        let secrets: Vec<&(String, Vec<u8>)> =
            secrets.iter().filter(|(_, v)| !v.is_empty()).collect();
        if secrets.is_empty() {
            return Ok(None);
        }
        let search = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(secrets.iter().map(|(_, v)| v))
            .map_err(|e| format!("secret values cannot be searched for: {e}"))?;
        let mut starts = [false; 256];
        for (_, value) in &secrets {
            starts[value[0] as usize] = true;
        }
        Ok(Some(Arc::new(Redactor {
            search,
            marks: secrets
                .iter()
                .map(|(name, _)| format!("[redacted:{name}]").into_bytes())
                .collect(),
            longest: secrets.iter().map(|(_, v)| v.len()).max().unwrap_or(1),
            starts,
        })))
    }

    /// The longest value's length: a stream holds back less than this.
    pub fn longest(&self) -> usize {
        self.longest
    }

    /// Redacts a whole text at once.
    pub fn redact(&self, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(bytes.len());
        let mut at = 0;
        for m in self.search.find_iter(bytes) {
            out.extend_from_slice(&bytes[at..m.start()]);
            out.extend_from_slice(&self.marks[m.pattern().as_usize()]);
            at = m.end();
        }
        out.extend_from_slice(&bytes[at..]);
        out
    }

    /// As [`Redactor::redact`], for text.
    pub fn redact_text(&self, text: &str) -> String {
        String::from_utf8_lossy(&self.redact(text.as_bytes())).into_owned()
    }

    /// A stream of output (one per stdout or stderr).
    pub fn stream(self: &Arc<Self>) -> RedactStream {
        RedactStream {
            redactor: self.clone(),
            held: Vec::new(),
        }
    }
}

/// One stream's redaction across chunk boundaries.
#[derive(Debug)]
pub struct RedactStream {
    redactor: Arc<Redactor>,
    /// Seen but not yet let through: it may be the start of a value.
    held: Vec<u8>,
}

impl RedactStream {
    /// Takes the next chunk; returns what can be let through now.
    pub fn feed(&mut self, data: &[u8]) -> Vec<u8> {
        let r = &*self.redactor;
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(data);
        let len = buf.len();
        let mut out = Vec::with_capacity(len);
        let mut at = 0;
        let mut hold_from = len;
        for m in r.search.find_iter(&buf) {
            // A longer value starting here may still be arriving.
            if m.start() + r.longest > len {
                hold_from = m.start();
                break;
            }
            out.extend_from_slice(&buf[at..m.start()]);
            out.extend_from_slice(&r.marks[m.pattern().as_usize()]);
            at = m.end();
        }
        // A value may start in the last `longest - 1` bytes and end in the
        // next chunk: hold from the first byte that could start one.
        let window = at.max(len.saturating_sub(r.longest - 1));
        if let Some(p) = (window..hold_from).find(|&p| r.starts[buf[p] as usize]) {
            hold_from = p;
        }
        out.extend_from_slice(&buf[at..hold_from]);
        self.held = buf.split_off(hold_from);
        out
    }

    /// The end of the stream: whatever was held, redacted.
    pub fn finish(&mut self) -> Vec<u8> {
        let held = std::mem::take(&mut self.held);
        self.redactor.redact(&held)
    }

    /// Bytes held back now.
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redactor(pairs: &[(&str, &str)]) -> Arc<Redactor> {
        let pairs: Vec<(String, Vec<u8>)> = pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect();
        Redactor::new(&pairs).unwrap().unwrap()
    }

    /// The stream's output for `text` cut into chunks at every `step`.
    fn streamed(r: &Arc<Redactor>, text: &str, step: usize) -> String {
        let mut stream = r.stream();
        let mut out = Vec::new();
        for chunk in text.as_bytes().chunks(step) {
            out.extend(stream.feed(chunk));
            assert!(stream.held() < r.longest(), "held {}", stream.held());
        }
        out.extend(stream.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn values_are_redacted_by_name_whatever_their_length() {
        let r = redactor(&[("token", "tok-123456"), ("pin", "42")]);
        assert_eq!(
            r.redact_text("got tok-123456 and 42, tok-123456"),
            "got [redacted:token] and [redacted:pin], [redacted:token]"
        );
        assert!(Redactor::new(&[("e".into(), vec![])]).unwrap().is_none());
    }

    #[test]
    fn a_value_cut_between_chunks_is_still_redacted() {
        let r = redactor(&[("a", "hunter2hunter2"), ("b", "xyz"), ("c", "hun")]);
        let text = "start hunter2hunter2 mid hunxyz hunter2hunter hunter2hunter2";
        let whole = r.redact_text(text);
        assert_eq!(
            whole,
            "start [redacted:a] mid [redacted:c][redacted:b] [redacted:c]ter2[redacted:c]ter [redacted:a]"
        );
        for step in 1..=text.len() {
            assert_eq!(streamed(&r, text, step), whole, "chunks of {step}");
        }
    }

    #[test]
    fn a_short_value_that_starts_a_longer_one_never_lets_the_longer_through() {
        let r = redactor(&[("long", "abcdefgh"), ("short", "abc")]);
        for step in 1..=12 {
            assert_eq!(
                streamed(&r, "..abcdefgh..abc.", step),
                "..[redacted:long]..[redacted:short].",
                "chunks of {step}"
            );
        }
    }

    #[test]
    fn nothing_is_held_without_a_possible_start() {
        let r = redactor(&[("k", "secret-value")]);
        let mut stream = r.stream();
        assert_eq!(stream.feed(b"plain text\n"), b"plain text\n");
        assert_eq!(stream.held(), 0);
        assert_eq!(stream.feed(b"tail sec"), b"tail ");
        assert_eq!(stream.held(), 3);
        assert_eq!(stream.feed(b"ret-value!"), b"[redacted:k]!");
        assert_eq!(stream.feed(b"se"), b"");
        assert_eq!(stream.finish(), b"se");
    }

    #[test]
    fn memory_stays_bounded_on_a_flood_of_near_matches() {
        let value = format!("{}b", "a".repeat(1000));
        let r = redactor(&[("v", &value)]);
        let mut stream = r.stream();
        let mut out = 0;
        for _ in 0..1000 {
            out += stream.feed(&[b'a'; 997]).len();
            assert!(stream.held() < 1001);
        }
        out += stream.finish().len();
        assert_eq!(out, 997 * 1000);
    }
}
