//! Where in the file a problem is: the file:line:column prefix of a [`super::ConfigError`], the
//! line a value's validation error belongs to, and the first line holding a key.

use std::path::Path;

pub(super) fn location_prefix(path: &Path, line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!("{}:{l}:{c}: ", path.display()),
        (Some(l), None) => format!("{}:{l}: ", path.display()),
        _ => format!("{}: ", path.display()),
    }
}

/// The parser places a value's validation error at the mapping that holds it. Our messages quote
/// the offending value, so look for the first `key: value` line at or below that place whose value
/// is the quoted one, and return its line, column and key. A message that names a key instead
/// (`` `nodelay` applies to TCP listeners only ``) is placed at the first line below with that
/// key.
pub(super) fn locate_value(
    text: &str,
    from: usize,
    message: &str,
) -> Option<(usize, usize, String)> {
    locate_quoted_value(text, from, message).or_else(|| {
        // Only for the listeners' options: serde's own messages come with their place.
        message
            .contains("listener `")
            .then(|| locate_named_key(text, from, message))?
    })
}

fn locate_named_key(text: &str, from: usize, message: &str) -> Option<(usize, usize, String)> {
    let names = message.split('`').skip(1).step_by(2);
    for name in names {
        for (i, line) in text.lines().enumerate().skip(from.saturating_sub(1)) {
            let Some(colon) = line.find(':') else {
                continue;
            };
            let key = line[..colon].trim().trim_start_matches("- ");
            if key == name {
                let column = line.len() - line.trim_start().len() + 1;
                return Some((i + 1, column, key.to_string()));
            }
        }
    }
    None
}

fn locate_quoted_value(text: &str, from: usize, message: &str) -> Option<(usize, usize, String)> {
    let start = message.find('"')? + 1;
    let len = message[start..].find('"')?;
    let raw = &message[start..start + len];
    for (i, line) in text.lines().enumerate().skip(from.saturating_sub(1)) {
        let Some(colon) = line.find(": ") else {
            continue;
        };
        let value = line[colon + 1..].trim();
        let unquoted = value.trim_matches(|c| c == '"' || c == '\'');
        if unquoted == raw {
            let key = line[..colon].trim().trim_start_matches("- ").to_string();
            let column = line.len() - line[colon + 1..].trim_start().len() + 1;
            return Some((i + 1, column, key));
        }
    }
    None
}

/// `worker: invalid duration ...` becomes `worker.ready_timeout: invalid duration ...`.
pub(super) fn qualify(message: &str, key: &str) -> String {
    match message.split_once(": ") {
        // The parser's path may end with the key already (`worker.processes`).
        Some((path, _)) if path == key || path.ends_with(&format!(".{key}")) => message.into(),
        Some((path, rest)) if !path.contains(' ') => format!("{path}.{key}: {rest}"),
        _ => format!("{key}: {message}"),
    }
}

/// serde's words for a value of the wrong type or range, in the configuration's: `invalid
/// type: string "two", expected u64` is `expected a whole number, not the text "two"`. Other
/// messages are returned as they are.
pub(super) fn plain(message: &str) -> String {
    let (head, rest) = match message.rsplit_once(": invalid ") {
        Some((path, rest)) => (format!("{path}: "), rest),
        None => match message.strip_prefix("invalid ") {
            Some(rest) => (String::new(), rest),
            None => return message.to_string(),
        },
    };
    let Some(rest) = rest
        .strip_prefix("type: ")
        .or_else(|| rest.strip_prefix("value: "))
    else {
        return message.to_string();
    };
    let Some((found, expected)) = rest.rsplit_once(", expected ") else {
        return message.to_string();
    };
    let expected = match expected {
        "u8" | "u16" | "u32" | "u64" | "usize" => "a whole number (0 or more)".to_string(),
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number".to_string(),
        "f32" | "f64" => "a number".to_string(),
        "a boolean" | "bool" => "true or false".to_string(),
        "a sequence" => "a list".to_string(),
        "a map" => "a mapping (key: value)".to_string(),
        other if other.starts_with("struct ") => "a mapping (key: value)".to_string(),
        other => other.to_string(),
    };
    let found = if let Some(text) = found.strip_prefix("string ") {
        format!("the text {text}")
    } else if let Some(n) = found.strip_prefix("integer ") {
        format!("the number {}", n.trim_matches('`'))
    } else if let Some(n) = found.strip_prefix("floating point ") {
        format!("the number {}", n.trim_matches('`'))
    } else if let Some(b) = found.strip_prefix("boolean ") {
        b.trim_matches('`').to_string()
    } else {
        match found {
            "sequence" => "a list".to_string(),
            "map" => "a mapping".to_string(),
            "unit value" => "nothing".to_string(),
            other => other.to_string(),
        }
    };
    format!("{head}expected {expected}, not {found}")
}

/// The first line that holds `needle` outside a comment.
pub(super) fn find_line(text: &str, needle: &str) -> Option<usize> {
    find_nth_line(text, needle, 0)
}

/// The line of the `n`th (0-based) occurrence of `needle` outside a comment.
pub(super) fn find_nth_line(text: &str, needle: &str, n: usize) -> Option<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| {
            l.split(" #")
                .next()
                .is_some_and(|code| code.contains(needle))
                && !l.trim_start().starts_with('#')
        })
        .nth(n)
        .map(|(i, _)| i + 1)
}
