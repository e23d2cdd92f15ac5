//! Cutting a worker's byte stream into lines that are safe to show: whole (a line written in
//! pieces is held until its newline), bounded ([`MAX_LINE`] bytes, then a marker), and escaped
//! (no control character and no invalid UTF-8 reaches a terminal or a log).

use std::fmt::Write;

/// The longest line kept, in bytes of the worker's output; the rest of a longer line is counted
/// and dropped, and the kept part ends with `[N bytes cut]`. journald's default `LineMax=` is
/// 48 KiB; a line this long in a log is almost always a dump nobody reads whole.
pub const MAX_LINE: usize = 16 * 1024;

/// A partial line's buffer above this capacity is given back once the line is emitted, so a
/// worker that once wrote a long line does not keep its buffer for ever.
const KEEP_CAPACITY: usize = 1024;

/// The line being assembled from a stream.
#[derive(Debug, Default)]
pub(crate) struct Cutter {
    partial: Vec<u8>,
    /// Bytes of the current line dropped beyond [`MAX_LINE`].
    cut: u64,
}

/// A line ready to emit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cut {
    pub(crate) text: String,
    /// Bytes of the worker's output this line stands for (newline included).
    pub(crate) bytes: u64,
    /// The line was longer than [`MAX_LINE`].
    pub(crate) was_cut: bool,
}

impl Cutter {
    /// Adds bytes read from the stream; `emit` gets each line they complete.
    pub(crate) fn feed(&mut self, mut bytes: &[u8], mut emit: impl FnMut(Cut)) {
        while let Some(at) = bytes.iter().position(|&b| b == b'\n') {
            self.push(&bytes[..at]);
            emit(self.take(1));
            bytes = &bytes[at + 1..];
        }
        self.push(bytes);
    }

    /// The stream ended: the unfinished line, if any.
    pub(crate) fn finish(&mut self) -> Option<Cut> {
        (!self.partial.is_empty() || self.cut > 0).then(|| self.take(0))
    }

    /// The line begun so far (up to [`MAX_LINE`] bytes).
    pub(crate) fn partial(&self) -> &[u8] {
        &self.partial
    }

    fn push(&mut self, bytes: &[u8]) {
        let room = MAX_LINE - self.partial.len();
        let kept = bytes.len().min(room);
        self.partial.extend_from_slice(&bytes[..kept]);
        self.cut += (bytes.len() - kept) as u64;
    }

    fn take(&mut self, newline: u64) -> Cut {
        let mut line = &self.partial[..];
        if let [rest @ .., b'\r'] = line {
            line = rest;
        }
        let mut text = escape(line);
        let was_cut = self.cut > 0;
        if was_cut {
            let _ = write!(text, " [{} bytes cut]", self.cut);
        }
        let bytes = self.partial.len() as u64 + self.cut + newline;
        self.partial.clear();
        if self.partial.capacity() > KEEP_CAPACITY {
            self.partial = Vec::new();
        }
        self.cut = 0;
        Cut {
            text,
            bytes,
            was_cut,
        }
    }
}

/// A worker's bytes as text that is safe to print: valid UTF-8 stays as it is but for control
/// characters (`\u{1b}`, `\r`, ...; a tab stays) and characters that reorder or hide text
/// (`\u{202e}`, `\u{200b}`: [`baton_proto::text::is_unsafe`]); each byte of invalid UTF-8 is
/// `\xNN`.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.push_str(&baton_proto::text::printable_but(chunk.valid(), |c| {
            c == '\t'
        }));
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(cutter: &mut Cutter, bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        cutter.feed(bytes, |cut| out.push(cut.text));
        out
    }

    #[test]
    fn a_line_written_in_pieces_comes_out_whole() {
        let mut c = Cutter::default();
        assert!(lines(&mut c, b"hel").is_empty());
        assert_eq!(c.partial, b"hel");
        assert!(lines(&mut c, b"lo wo").is_empty());
        assert_eq!(lines(&mut c, b"rld\nnext\nla"), ["hello world", "next"]);
        assert_eq!(c.finish().map(|cut| cut.text).as_deref(), Some("la"));
        assert_eq!(c.finish(), None);
    }

    #[test]
    fn crlf_empty_lines_and_byte_counts() {
        let mut c = Cutter::default();
        let mut cuts = Vec::new();
        c.feed(b"dos\r\n\n", |cut| cuts.push(cut));
        assert_eq!(cuts[0].text, "dos");
        assert_eq!(cuts[0].bytes, 5);
        assert_eq!(cuts[1].text, "");
        assert_eq!(cuts[1].bytes, 1);
    }

    #[test]
    fn long_lines_are_cut_with_a_marker_and_the_next_line_is_whole() {
        let mut c = Cutter::default();
        let long = vec![b'a'; MAX_LINE + 100];
        assert!(lines(&mut c, &long).is_empty());
        let mut cuts = Vec::new();
        c.feed(b"bbb\nshort\n", |cut| cuts.push(cut));
        assert_eq!(cuts.len(), 2);
        assert!(cuts[0].was_cut);
        assert!(cuts[0].text.starts_with("aaaa"));
        assert!(
            cuts[0].text.ends_with(" [103 bytes cut]"),
            "{}",
            &cuts[0].text[MAX_LINE - 5..]
        );
        assert_eq!(cuts[0].text.len(), MAX_LINE + " [103 bytes cut]".len());
        assert_eq!(cuts[0].bytes, MAX_LINE as u64 + 104);
        assert_eq!(cuts[1].text, "short");
        assert!(!cuts[1].was_cut);
        assert!(
            c.partial.capacity() <= KEEP_CAPACITY,
            "the long line's buffer is given back"
        );
    }

    #[test]
    fn control_characters_and_invalid_utf8_are_escaped() {
        assert_eq!(escape(b"red \x1b[31m\ttab"), "red \\u{1b}[31m\ttab");
        assert_eq!(escape(b"bad \xff\xfe end"), "bad \\xff\\xfe end");
        assert_eq!(escape("caf\u{e9} \u{9b}".as_bytes()), "caf\u{e9} \\u{9b}");
        assert_eq!(escape(b"cr\rbell\x07"), "cr\\rbell\\u{7}");
    }
}
