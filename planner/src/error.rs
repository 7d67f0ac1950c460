//! Errors with fields that name the culprit: the key, the value, what is accepted.
//!
//! Every message is one line: values the user wrote are quoted through [`quote`], which
//! escapes control characters and keeps at most [`QUOTE_CHARS`] characters, so a value
//! with newlines or kilobytes of text never floods a terminal or a log.

use thiserror::Error;

/// The most characters of a user's value an error repeats.
pub const QUOTE_CHARS: usize = 80;
/// The longest error line the planner writes.
pub const LINE_CHARS: usize = 200;
/// The most characters of a parser's own message an error keeps (its lists of expected
/// keys can run long).
const MESSAGE_CHARS: usize = 150;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// A value outside the accepted set or range.
    #[error("{key} = {value}: {accepted}")]
    Invalid {
        key: String,
        value: String,
        accepted: String,
    },
    /// A required key is missing.
    #[error("{key} is missing: {accepted}")]
    Missing { key: String, accepted: String },
    /// The text could not be parsed at all (TOML or JSON syntax, unknown keys).
    #[error("{line}{message}")]
    Syntax { line: String, message: String },
    /// An unknown preset name.
    #[error("{key} = {value}: no such preset; known: {known}")]
    UnknownPreset {
        key: String,
        value: String,
        known: String,
    },
    /// A search found nothing that satisfies the constraints.
    #[error("{0}")]
    NoSolution(String),
}

/// `s` as a one-line quoted string: control characters escaped, cut after
/// [`QUOTE_CHARS`] characters with an ellipsis.
pub fn quote(s: &str) -> String {
    format!("\"{}\"", one_line(s, QUOTE_CHARS))
}

/// `s` with control characters escaped and at most `max` characters kept.
fn one_line(s: &str, max: usize) -> String {
    let mut out = String::new();
    for (n, c) in s.chars().enumerate() {
        if n == max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

impl PlanError {
    /// `value` is shown as given (callers quote strings with [`quote`]); it is cut to one
    /// short line all the same, since numbers and values come from user input too.
    pub fn invalid(key: &str, value: impl ToString, accepted: impl Into<String>) -> Self {
        let key = one_line(key, QUOTE_CHARS);
        let accepted = accepted.into();
        // Room for a value already quoted (two quotes and an ellipsis), and no more than
        // the line leaves beside the key, " = ", ": ", the ellipsis and a long list of what
        // is accepted.
        let left = LINE_CHARS.saturating_sub(6 + key.chars().count() + accepted.chars().count());
        PlanError::Invalid {
            key,
            value: one_line(&value.to_string(), left.clamp(16, QUOTE_CHARS + 3)),
            accepted,
        }
    }

    /// `known` is listed as far as the line has room (at most [`LINE_CHARS`] in all),
    /// then `more` says where the rest are.
    pub fn unknown_preset(key: &str, value: &str, known: &[&str], more: &str) -> Self {
        let value = quote(value);
        // The message's fixed words (" = ", ": no such preset; known: ") take the rest.
        let room = LINE_CHARS.saturating_sub(28 + key.chars().count() + value.chars().count());
        PlanError::UnknownPreset {
            key: key.to_string(),
            known: known_list(known, room, more),
            value,
        }
    }

    /// Turns a `toml` error into one line with its line number (the snippet toml prints is dropped).
    pub fn from_toml(src: &str, err: &toml::de::Error) -> Self {
        let message = err.message().trim();
        // An unknown-field message names the key itself; others name only a type.
        let names_key = message.starts_with("unknown field");
        let line = err
            .span()
            .map(|s| match key_at(src, s.start).filter(|_| !names_key) {
                Some(key) => format!("line {}: {}: ", line_of(src, s.start), quote_key(&key)),
                None => format!("line {}: ", line_of(src, s.start)),
            })
            .unwrap_or_default();
        PlanError::Syntax {
            line,
            message: one_line(message, MESSAGE_CHARS),
        }
    }
}

/// The 1-based line holding byte `offset` of `src`: newlines before it, plus one.
/// (Counting `lines()` of the text before it is one short when it starts a line.)
pub(crate) fn line_of(src: &str, offset: usize) -> usize {
    let end = offset.min(src.len());
    src.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// The dotted key written on the line holding `offset` (`train.seq_len`), or the table a
/// header there opens; toml's own messages name the type it expected but not the key.
fn key_at(src: &str, offset: usize) -> Option<String> {
    let end = offset.min(src.len());
    let start = src[..end].rfind('\n').map_or(0, |i| i + 1);
    let line = src[start..].lines().next().unwrap_or("").trim();
    let header = |l: &str| {
        let l = l.trim();
        l.strip_prefix('[')
            .and_then(|h| h.split(']').next())
            .map(|h| h.trim_matches(['[', ' ']).to_string())
    };
    if let Some(h) = header(line) {
        return Some(h);
    }
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    let table = src[..start].lines().rev().find_map(header);
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key.to_string(),
    })
}

/// A key from the user's text: kept short, and quoted only when it holds odd characters.
fn quote_key(key: &str) -> String {
    let plain = key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if plain && key.len() <= QUOTE_CHARS {
        key.to_string()
    } else {
        quote(key)
    }
}

/// Names in a list of at most `room` characters; past that, how many more and where to
/// look (the tail counted in the room).
fn known_list(names: &[&str], room: usize, more: &str) -> String {
    let tail = |left: usize| format!("… {left} more ({more})");
    let mut out = String::new();
    for (i, n) in names.iter().enumerate() {
        let sep = if out.is_empty() { "" } else { ", " };
        let left = names.len() - i - 1;
        let after = if left > 0 {
            2 + tail(left).chars().count()
        } else {
            0
        };
        if out.chars().count() + sep.len() + n.chars().count() + after > room {
            return format!("{out}{sep}{}", tail(names.len() - i));
        }
        out.push_str(sep);
        out.push_str(n);
    }
    out
}

pub type Result<T> = std::result::Result<T, PlanError>;

#[cfg(test)]
mod tests {
    use super::*;

    /// A long value beside a long list of accepted names still makes a line of at most
    /// LINE_CHARS (the fuzz test's 234-character optimizer line).
    #[test]
    fn a_long_value_shares_the_line_with_a_long_list() {
        let accepted = format!("expected one of {}", ["adamw-foreach"; 9].join(" | "));
        for value in ["x".repeat(5000), "adamw".into()] {
            let e = PlanError::invalid("train.optimizer", quote(&value), accepted.as_str());
            let line = e.to_string();
            assert!(line.chars().count() <= LINE_CHARS, "{}: {line}", line.len());
            assert!(line.ends_with(&accepted), "{line}");
        }
    }

    #[test]
    fn quotes_are_one_short_line() {
        assert_eq!(quote("bf8"), "\"bf8\"");
        assert_eq!(quote("a\nb"), "\"a\\nb\"");
        let long = quote(&"x".repeat(10_000));
        assert_eq!(long.chars().count(), QUOTE_CHARS + 3);
        assert!(long.ends_with("…\""));
    }

    #[test]
    fn line_numbers_count_the_line_the_offset_is_on() {
        let src = "a\nb\nc";
        assert_eq!(line_of(src, 0), 1);
        assert_eq!(line_of(src, 2), 2);
        assert_eq!(line_of(src, 4), 3);
    }

    #[test]
    fn toml_errors_name_the_key_of_their_line() {
        let src = "[model]\npreset = \"gpt2\"\n[train]\nsteps = \"many\"\n";
        assert_eq!(
            key_at(src, src.find("\"many").unwrap()).as_deref(),
            Some("train.steps")
        );
        assert_eq!(key_at(src, 2).as_deref(), Some("model"));
        assert_eq!(key_at("x = 1", 4).as_deref(), Some("x"));
        assert_eq!(key_at("oops", 1), None);
    }
}
