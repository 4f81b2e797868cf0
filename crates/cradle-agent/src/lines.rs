//! A script's output as lines for the host: split, cut, batched and
//! remembered.
//!
//! - [`Splitter`] turns a byte stream into lines of at most [`MAX_LINE`]
//!   bytes (the rest of a longer line is dropped, never buffered), read as
//!   UTF-8 with invalid bytes replaced, without the `\n` or a `\r` before it.
//! - [`Batcher`] gathers lines into one `log` message until its body would
//!   pass [`MAX_BODY`] or the oldest line in it has waited [`FLUSH_AFTER`].
//! - [`Tail`] keeps the last [`TAIL_LINES`] lines for the final status.
//!
//! Sizes are counted as the JSON body will have them: [`escaped_len`]
//! is what serde_json makes of a string, so a body never passes the limit
//! however many quotes or control characters a line holds.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The longest line sent, in bytes.
pub const MAX_LINE: usize = 1000;
/// The largest message body sent to the write channel.
pub const MAX_BODY: usize = 8000;
/// How long a line may wait in a batch while output flows.
pub const FLUSH_AFTER: Duration = Duration::from_millis(200);
/// How many lines the final status carries.
pub const TAIL_LINES: usize = 40;
/// The most bytes of them it carries.
pub const TAIL_BYTES: usize = 4096;

/// `s` cut to at most `max` bytes, at a character boundary.
pub fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The end of `s`, at most `max` bytes, at a character boundary.
pub fn cut_front(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// The length of `s` as a JSON string, without its quotes.
pub fn escaped_len(s: &str) -> usize {
    s.chars()
        .map(|c| match c {
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            c if (c as u32) < 0x20 => 6,
            c => c.len_utf8(),
        })
        .sum()
}

/// Splits a byte stream into lines.
#[derive(Default)]
pub struct Splitter {
    partial: Vec<u8>,
}

impl Splitter {
    /// Feed `bytes`; return the lines they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            self.keep(&rest[..nl]);
            out.push(self.take());
            rest = &rest[nl + 1..];
        }
        self.keep(rest);
        out
    }

    /// The last line, when the stream did not end with a newline.
    pub fn finish(mut self) -> Option<String> {
        (!self.partial.is_empty()).then(|| self.take())
    }

    /// Keep what can still be sent: a few bytes past [`MAX_LINE`], so that
    /// a character cut there is not mistaken for an invalid one.
    fn keep(&mut self, bytes: &[u8]) {
        let room = (MAX_LINE + 4).saturating_sub(self.partial.len());
        self.partial
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn take(&mut self) -> String {
        let bytes = std::mem::take(&mut self.partial);
        let text = String::from_utf8_lossy(&bytes);
        let text = text.strip_suffix('\r').unwrap_or(&text);
        cut(text, MAX_LINE).to_string()
    }
}

/// The body of a `log` message.
pub fn log_body(lines: &[String]) -> String {
    serde_json::json!({"agent": "log", "lines": lines}).to_string()
}

/// `{"agent":"log","lines":[]}`: what a body holds besides its lines.
const LOG_OVERHEAD: usize = 26;

/// Gathers lines into `log` messages.
#[derive(Default)]
pub struct Batcher {
    lines: Vec<String>,
    /// The body's length with the lines so far.
    body: usize,
    since: Option<Instant>,
}

impl Batcher {
    /// Add a line (cut to [`MAX_LINE`]); if it does not fit in the batch,
    /// the batch is returned to be sent first and the line starts the next.
    pub fn push(&mut self, line: &str, now: Instant) -> Option<Vec<String>> {
        let line = cut(line, MAX_LINE).to_string();
        // The string with its quotes; a comma before it unless it is first.
        let quoted = escaped_len(&line) + 2;
        let full = if !self.lines.is_empty() && LOG_OVERHEAD + self.body + 1 + quoted > MAX_BODY {
            self.take()
        } else {
            None
        };
        self.body += quoted + usize::from(!self.lines.is_empty());
        self.lines.push(line);
        self.since.get_or_insert(now);
        full
    }

    /// Whether the oldest line has waited long enough.
    pub fn due(&self, now: Instant) -> bool {
        self.since
            .is_some_and(|s| now.saturating_duration_since(s) >= FLUSH_AFTER)
    }

    /// The lines gathered, if any, leaving the batch empty.
    pub fn take(&mut self) -> Option<Vec<String>> {
        self.body = 0;
        self.since = None;
        (!self.lines.is_empty()).then(|| std::mem::take(&mut self.lines))
    }
}

/// The last [`TAIL_LINES`] lines.
#[derive(Default)]
pub struct Tail {
    lines: VecDeque<String>,
}

impl Tail {
    pub fn push(&mut self, line: &str) {
        if self.lines.len() == TAIL_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(cut(line, MAX_LINE).to_string());
    }

    /// The lines joined with `\n`, their end kept within [`TAIL_BYTES`]
    /// bytes and `escaped` bytes once escaped for JSON.
    pub fn text(&self, escaped: usize) -> String {
        let joined = self
            .lines
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n");
        let mut tail = cut_front(&joined, TAIL_BYTES);
        let mut len = escaped_len(tail);
        let mut chars = tail.char_indices();
        while len > escaped {
            let Some((_, c)) = chars.next() else { break };
            len -= escaped_len(c.encode_utf8(&mut [0; 4]));
            tail = chars.as_str();
        }
        tail.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_and_cut() {
        let mut s = Splitter::default();
        assert_eq!(s.push(b"one\ntw"), ["one"]);
        assert_eq!(s.push(b"o\r\n\nthr"), ["two", ""]);
        let long = vec![b'x'; 5000];
        assert_eq!(s.push(&long), Vec::<String>::new());
        let got = s.push(b"\nlast");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].len(), MAX_LINE);
        assert!(got[0].starts_with("thrxx"));
        assert_eq!(s.finish().as_deref(), Some("last"));
        assert_eq!(Splitter::default().finish(), None);
    }

    #[test]
    fn cuts_fall_on_character_boundaries() {
        // 'é' is two bytes: a cut inside it backs off.
        let s = format!("{}é", "a".repeat(MAX_LINE - 1));
        assert_eq!(cut(&s, MAX_LINE).len(), MAX_LINE - 1);
        let mut sp = Splitter::default();
        let got = sp.push(format!("{s}\n").as_bytes());
        assert_eq!(got[0], "a".repeat(MAX_LINE - 1));
        // Invalid UTF-8 is replaced, not refused.
        assert_eq!(sp.push(b"a\xffb\n"), ["a\u{fffd}b"]);
        assert_eq!(cut_front("éa", 2), "a");
        assert_eq!(cut_front("abc", 5), "abc");
    }

    #[test]
    fn escaped_len_is_what_serde_json_makes() {
        for s in [
            "plain",
            "q\"uote\\",
            "tab\tnl\n",
            "\u{1}\u{1f}\u{7f}",
            "é€😀",
            "",
        ] {
            assert_eq!(
                escaped_len(s) + 2,
                serde_json::to_string(s).unwrap().len(),
                "{s:?}"
            );
        }
        assert_eq!(log_body(&[]).len(), LOG_OVERHEAD);
    }

    #[test]
    fn batches_stay_under_the_body_limit() {
        let now = Instant::now();
        let mut b = Batcher::default();
        let mut sent = Vec::new();
        let lines: Vec<String> = (0..300)
            .map(|i| match i % 3 {
                0 => "x".repeat(MAX_LINE),
                1 => "\u{1}".repeat(MAX_LINE), // 6 bytes each once escaped
                _ => format!("line {i}"),
            })
            .collect();
        for l in &lines {
            if let Some(batch) = b.push(l, now) {
                sent.push(batch);
            }
        }
        sent.extend(b.take());
        assert!(b.take().is_none());
        assert!(sent.len() > 10);
        for batch in &sent {
            let body = log_body(batch);
            assert!(body.len() <= MAX_BODY, "{}", body.len());
        }
        let all: Vec<String> = sent.into_iter().flatten().collect();
        assert_eq!(all, lines);
    }

    #[test]
    fn a_batch_is_due_after_its_first_line_waited() {
        let t0 = Instant::now();
        let mut b = Batcher::default();
        assert!(!b.due(t0 + Duration::from_secs(5)));
        assert!(b.push("a", t0).is_none());
        assert!(b.push("b", t0 + Duration::from_millis(150)).is_none());
        assert!(!b.due(t0 + Duration::from_millis(199)));
        assert!(b.due(t0 + FLUSH_AFTER));
        assert_eq!(b.take().unwrap(), ["a", "b"]);
        assert!(!b.due(t0 + Duration::from_secs(5)));
        let long = "y".repeat(5000);
        b.push(&long, t0);
        assert_eq!(b.take().unwrap()[0].len(), MAX_LINE);
    }

    #[test]
    fn the_tail_keeps_the_last_lines_within_its_budgets() {
        let mut t = Tail::default();
        for i in 0..100 {
            t.push(&format!("line {i}"));
        }
        let text = t.text(usize::MAX);
        assert!(text.starts_with("line 60\n"), "{text}");
        assert!(text.ends_with("\nline 99"), "{text}");
        assert_eq!(text.lines().count(), TAIL_LINES);

        let mut t = Tail::default();
        for _ in 0..10 {
            t.push(&"z".repeat(2000));
        }
        let text = t.text(usize::MAX);
        assert_eq!(text.len(), TAIL_BYTES);
        assert!(text.ends_with('z'));

        let mut t = Tail::default();
        t.push(&"\u{1}".repeat(900));
        t.push("end");
        let text = t.text(1000);
        assert!(escaped_len(&text) <= 1000);
        assert!(text.ends_with("\nend"));
        assert_eq!(Tail::default().text(100), "");
    }
}
