//! Text from outside (a worker's output and notifications, a configuration's keys and paths, a
//! control client's words) made safe to show a person: what a terminal would act on instead of
//! print, or would show in another order than it is (bidirectional overrides), or would not
//! show at all (zero-width characters), is written as an escape (`\u{202e}`). Machine output
//! (JSON) keeps the exact text; this is for human output only.

use std::borrow::Cow;

/// Whether `c` must not reach a terminal as it is: a control character (C0, DEL, C1: escape
/// sequences, carriage returns, line feeds), or a format character that reorders or hides text
/// (bidirectional embeddings, overrides and isolates, zero-width spaces and joiners, the byte
/// order mark, line and paragraph separators, tag characters, soft hyphen).
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{00ad}'
            | '\u{061c}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}'
            | '\u{e0000}'..='\u{e007f}')
}

/// `text` with every [`is_unsafe`] character escaped (`\n`, `\u{1b}`, `\u{202e}`); borrowed
/// when there is none.
pub fn printable(text: &str) -> Cow<'_, str> {
    printable_but(text, |_| false)
}

/// Like [`printable`], leaving the characters `keep` accepts (a tab, say) as they are.
pub fn printable_but(text: &str, keep: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !text.chars().any(|c| is_unsafe(c) && !keep(c)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_unsafe(c) && !keep(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_deceptive_format_characters_are_escaped_and_the_rest_kept() {
        assert!(matches!(printable("plain ünïcode 世界"), Cow::Borrowed(_)));
        assert_eq!(printable("a\u{1b}[31mred\r\n"), "a\\u{1b}[31mred\\r\\n");
        // "evil.yaml" shown as "lmay.live" by an override; a zero-width space inside a name.
        assert_eq!(printable("\u{202e}lmay.live"), "\\u{202e}lmay.live");
        assert_eq!(printable("we\u{200b}b"), "we\\u{200b}b");
        assert_eq!(printable("\u{2066}x\u{2069}"), "\\u{2066}x\\u{2069}");
        assert_eq!(printable("\u{feff}bom"), "\\u{feff}bom");
        assert_eq!(printable("\u{9b}31m"), "\\u{9b}31m", "a C1 CSI");
        assert_eq!(printable_but("a\tb\n", |c| c == '\t'), "a\tb\\n");
    }
}
