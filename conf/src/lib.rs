//! One way of turning a position in a TOML file into `line` and `field`.
//!
//! Both programs parse their TOML straight into typed structs (serde with
//! `deny_unknown_fields`), and both must report a bad value as
//! `<file>:<line>: <field>: <reason>` (DESIGN.md, invariant 10). The `toml`
//! crate gives a byte span and a message; this crate turns them into a
//! 1-based line and a dotted field path such as `session.window` or
//! `endpoint[1].upstream`:
//!
//! - [`locate`] (or [`locate_error`] for a `toml::de::Error`): where a
//!   deserialization error is, as line and field path;
//! - [`line_of_key`]: the line of the key at a field path, for checks that
//!   run after deserialization (a value that must exceed another) and so
//!   have no span of their own;
//! - [`line_of`]: the line of a byte offset (for a `toml::Spanned` value).
//!
//! The path format is the same everywhere: keys joined by `.`, an array
//! element as `[i]` after its key, and [`WHOLE_FILE`] (`-`) when the file as
//! a whole is at fault. Keys are written as they are, unquoted, so a key that
//! itself contains a `.` cannot be told from a nested one; neither program
//! has such keys.
//!
//! This crate does not read files, format the final message or decide what a
//! valid value is: each program keeps its own error type and its own checks.
//! It has no dependency but `toml` (the spanned tree, `toml::de::DeTable`).

#![forbid(unsafe_code)]

mod host_port;

pub use host_port::HostPort;

use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// The field named when the problem is not in one field (a syntax error
/// before any key, a missing top-level table; a file that cannot be read has
/// no line or field at all, and each program says so without this).
pub const WHOLE_FILE: &str = "-";

/// The 1-based line of byte offset `pos` in `text` (an offset past the end
/// counts as the end).
pub fn line_of(text: &str, pos: usize) -> usize {
    let pos = pos.min(text.len());
    text.as_bytes()[..pos]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Line and field path of a `toml` deserialization error: [`locate`] with
/// the error's span and message.
pub fn locate_error(text: &str, error: &toml::de::Error) -> (usize, String) {
    locate(text, error.span(), error.message())
}

/// Line and dotted field path of a deserialization error at `span` whose
/// message is `message`.
///
/// The document is parsed again into toml's spanned tree and walked down to
/// the innermost key whose key or scalar value contains the start of `span`.
/// serde reports a missing field at the header of its table (or at the start
/// of the document): for a message `missing field `x``, only table headers
/// are matched and `x` is appended to that table's path. Without a span the
/// line is 1 and the field is the one quoted in the message, if any.
/// A path that cannot be found is [`WHOLE_FILE`].
pub fn locate(text: &str, span: Option<Range<usize>>, message: &str) -> (usize, String) {
    let Some(span) = span else {
        let field = quoted_field(message).unwrap_or(WHOLE_FILE).to_owned();
        return (1, field);
    };
    let line = line_of(text, span.start);
    let mut path = String::new();
    let missing = message.starts_with("missing field");
    if let Ok(doc) = DeTable::parse(text) {
        walk_table(doc.get_ref(), span.start, missing, &mut path);
    }
    if missing {
        if let Some(f) = quoted_field(message) {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(f);
        }
    }
    if path.is_empty() {
        path.push_str(WHOLE_FILE);
    }
    (line, path)
}

/// The line of the key at `path` (in the format [`locate`] produces:
/// `reconnect.max_backoff_ms`, `endpoint[1].name`); for a path that ends in
/// an array element (`endpoint[1]`), the line where that element starts.
/// `None` when `text` does not parse or has no such key (a field left at its
/// default): the caller then names the field without a line of its own.
pub fn line_of_key(text: &str, path: &str) -> Option<usize> {
    let doc = DeTable::parse(text).ok()?;
    let mut table: &DeTable<'_> = doc.get_ref();
    let mut segments = path.split('.').peekable();
    while let Some(segment) = segments.next() {
        let (name, indices) = split_indices(segment)?;
        let (key, mut value) = table.iter().find(|(k, _)| k.get_ref().as_ref() == name)?;
        let mut pos = key.span().start;
        for i in indices {
            let DeValue::Array(a) = value.get_ref() else {
                return None;
            };
            value = a.get(i)?;
            pos = value.span().start;
        }
        if segments.peek().is_none() {
            return Some(line_of(text, pos));
        }
        let DeValue::Table(t) = value.get_ref() else {
            return None;
        };
        table = t;
    }
    None
}

/// `name[1][2]` into `name` and the indices; `None` when malformed.
fn split_indices(segment: &str) -> Option<(&str, Vec<usize>)> {
    let (name, mut rest) = match segment.find('[') {
        Some(i) => segment.split_at(i),
        None => (segment, ""),
    };
    let mut indices = Vec::new();
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let (n, after) = inner.split_once(']')?;
        indices.push(n.parse().ok()?);
        rest = after;
    }
    Some((name, indices))
}

/// The first `` `quoted` `` word of a serde message.
fn quoted_field(message: &str) -> Option<&str> {
    let (_, rest) = message.split_once('`')?;
    let (f, _) = rest.split_once('`')?;
    Some(f)
}

/// Appends to `path` the key path whose key or scalar value contains `pos`
/// (only table headers when `headers`). Table spans cover only their header,
/// so every table is searched.
fn walk_table(t: &DeTable<'_>, pos: usize, headers: bool, path: &mut String) -> bool {
    for (k, v) in t.iter() {
        let len = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(k.get_ref());
        if (!headers && k.span().contains(&pos)) || walk_value(v, pos, headers, path) {
            return true;
        }
        path.truncate(len);
    }
    false
}

fn walk_value(v: &Spanned<DeValue<'_>>, pos: usize, headers: bool, path: &mut String) -> bool {
    match v.get_ref() {
        DeValue::Table(t) => walk_table(t, pos, headers, path) || v.span().contains(&pos),
        DeValue::Array(a) => {
            for (i, item) in a.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                if walk_value(item, pos, headers, path) {
                    return true;
                }
                path.truncate(len);
            }
            v.span().contains(&pos)
        }
        _ if headers => false,
        _ => v.span().contains(&pos) || (v.span().is_empty() && v.span().start == pos),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "edge = \"e:1\"\n\
                       [session]\n\
                       window = 100\n\
                       \n\
                       [[endpoint]]\n\
                       name = \"web\"\n\
                       [[endpoint]]\n\
                       name = \"ssh\"\n\
                       upstream = \"x\"\n\
                       tags = [1, \"two\"]\n";

    fn span_of(needle: &str) -> Option<Range<usize>> {
        let start = DOC.find(needle).expect("needle in DOC");
        Some(start..start + needle.len())
    }

    #[test]
    fn line_of_counts_newlines_before_the_offset() {
        assert_eq!(line_of("", 0), 1);
        assert_eq!(line_of("a\nb\nc", 0), 1);
        assert_eq!(line_of("a\nb\nc", 2), 2);
        assert_eq!(line_of("a\nb\nc", 4), 3);
        assert_eq!(line_of("a\nb\n", 99), 3, "past the end is the end");
    }

    #[test]
    fn a_bad_value_is_located_at_its_key() {
        assert_eq!(
            locate(DOC, span_of("100"), "invalid value"),
            (3, "session.window".into())
        );
        assert_eq!(
            locate(DOC, span_of("\"x\""), "invalid value"),
            (9, "endpoint[1].upstream".into())
        );
        assert_eq!(
            locate(DOC, span_of("\"two\""), "invalid type"),
            (10, "endpoint[1].tags[1]".into())
        );
    }

    #[test]
    fn an_unknown_key_is_located_at_the_key_itself() {
        // serde's span for an unknown field is the key.
        assert_eq!(
            locate(DOC, span_of("upstream"), "unknown field `upstream`"),
            (9, "endpoint[1].upstream".into())
        );
    }

    #[test]
    fn a_missing_field_is_appended_to_its_tables_path() {
        // serde reports it at the header of the table that lacks it.
        let header = DOC.match_indices("[[endpoint]]").nth(1).expect("second").0;
        assert_eq!(
            locate(DOC, Some(header..header + 12), "missing field `kind`"),
            (7, "endpoint[1].kind".into())
        );
        assert_eq!(
            locate(DOC, Some(0..0), "missing field `credential`"),
            (1, "credential".into())
        );
    }

    #[test]
    fn without_a_span_the_message_names_the_field_or_the_whole_file() {
        assert_eq!(
            locate(DOC, None, "missing field `edge`"),
            (1, "edge".into())
        );
        assert_eq!(locate(DOC, None, "bad"), (1, WHOLE_FILE.into()));
    }

    #[test]
    fn a_syntax_error_names_its_line_and_the_whole_file() {
        let text = "a = 1\n[[endpoint]\n";
        let e = toml::from_str::<toml::Table>(text).expect_err("syntax error");
        let (line, field) = locate_error(text, &e);
        assert_eq!((line, field.as_str()), (2, WHOLE_FILE));
    }

    #[test]
    fn line_of_key_finds_keys_tables_and_array_elements() {
        assert_eq!(line_of_key(DOC, "edge"), Some(1));
        assert_eq!(line_of_key(DOC, "session"), Some(2));
        assert_eq!(line_of_key(DOC, "session.window"), Some(3));
        assert_eq!(line_of_key(DOC, "endpoint[0]"), Some(5));
        assert_eq!(line_of_key(DOC, "endpoint[1]"), Some(7));
        assert_eq!(line_of_key(DOC, "endpoint[1].name"), Some(8));
        assert_eq!(line_of_key(DOC, "endpoint[1].tags[1]"), Some(10));
    }

    #[test]
    fn line_of_key_is_none_for_what_is_not_in_the_file() {
        assert_eq!(line_of_key(DOC, "session.max_streams"), None);
        assert_eq!(line_of_key(DOC, "endpoint[2].name"), None);
        assert_eq!(line_of_key(DOC, "edge.host"), None, "edge is no table");
        assert_eq!(line_of_key(DOC, "endpoint[x]"), None, "malformed index");
        assert_eq!(line_of_key("a = [", "a"), None, "does not parse");
    }

    #[test]
    fn line_of_key_agrees_with_locate() {
        for needle in ["100", "\"ssh\"", "\"x\""] {
            let (line, field) = locate(DOC, span_of(needle), "invalid value");
            assert_eq!(line_of_key(DOC, &field), Some(line), "{field}");
        }
    }
}
