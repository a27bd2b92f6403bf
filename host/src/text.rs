//! Text a plugin controls, on its way into the host's logs, `/plugins` and dead letters: its
//! `log` lines, its error texts, the channel, key and output names it asks for, its file
//! name and the version it describes.
//!
//! Such text is bounded (a plugin can return an error of many megabytes, or publish on a
//! channel name of as many), and control characters are shown as escapes rather than
//! written out: a newline would forge a line of the human-format log, and terminal escape
//! sequences would be interpreted by whoever reads it in a terminal. A backslash is kept as
//! it is, so an escape and the same characters typed by the plugin look alike: neither is
//! interpreted.

use std::borrow::Cow;
use std::fmt::Write as _;

/// The longest error text kept from a plugin: the failure's reason in `/plugins`
/// (`last_error`), in the log and in a dead letter's `dead.error`. Longer ones are cut.
pub const MAX_ERROR_TEXT: usize = 4096;
/// The longest channel, key or output name quoted in full in a refusal: enough to recognise
/// any real name.
pub const MAX_QUOTED_NAME: usize = 256;

/// `text` if it is at most `max` bytes long; otherwise its beginning and how long it was,
/// `max` bytes in all (on a character boundary). Bounding twice changes nothing.
pub fn bounded(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let note = format!("... ({} bytes in all, cut)", text.len());
    let kept = truncate(text, max.saturating_sub(note.len()));
    Cow::Owned(format!("{kept}{note}"))
}

/// `text` with every control character (C0, DEL, C1), every invisible format character that
/// reorders or hides text (bidirectional overrides and isolates, zero-width characters) and
/// the Unicode line and paragraph separators written as an escape: `\n`, `\r`, `\t`, or
/// `\u{..}`.
pub fn escaped(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// `text` bounded to `max` bytes, then escaped: what a log line or a report may show.
pub fn loggable(text: &str, max: usize) -> String {
    escaped(&bounded(text, max)).into_owned()
}

/// `name` in double quotes with escapes (as Rust's `{:?}` writes it), cut to
/// [`MAX_QUOTED_NAME`] bytes with its full length when longer: for names a plugin asked for
/// in refusals and logs.
pub fn quoted(name: &str) -> String {
    let shown = format!("{:?}", truncate(name, MAX_QUOTED_NAME));
    // `{:?}` leaves format characters such as bidirectional overrides as they are.
    let shown = escaped(&shown).into_owned();
    if name.len() > MAX_QUOTED_NAME {
        format!("{shown}... ({} bytes in all, cut)", name.len())
    } else {
        shown
    }
}

/// How the human-format log writes an event's fields: as tracing's default does (the
/// message alone, then `name=value`), with every value [`escaped`]. Sites that log plugin
/// text bound it themselves; this makes sure that nothing, a plugin's file name included,
/// writes a control character into the log.
pub fn escaping_fields() -> impl for<'writer> tracing_subscriber::fmt::FormatFields<'writer> {
    use tracing_subscriber::field::MakeExt as _;
    tracing_subscriber::fmt::format::debug_fn(
        |writer: &mut tracing_subscriber::fmt::format::Writer<'_>,
         field: &tracing::field::Field,
         value: &dyn std::fmt::Debug| {
            let text = format!("{value:?}");
            let text = escaped(&text);
            match field.name() {
                "message" => write!(writer, "{text}"),
                name => write!(writer, "{}={text}", name.strip_prefix("r#").unwrap_or(name)),
            }
        },
    )
    .delimited(" ")
}

/// Cuts `text` to at most `max` bytes on a character boundary.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{2069}'
                | '\u{feff}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }

    #[test]
    fn long_text_is_cut_and_says_so() {
        assert_eq!(bounded("short", 10), "short");
        let long = "e".repeat(20_000_000);
        let cut = bounded(&long, MAX_ERROR_TEXT);
        assert_eq!(cut.len(), MAX_ERROR_TEXT);
        assert!(cut.ends_with("e... (20000000 bytes in all, cut)"), "{cut}");
        assert_eq!(
            bounded(&cut, MAX_ERROR_TEXT),
            cut,
            "bounding twice changes nothing"
        );
    }

    #[test]
    fn control_characters_become_visible_escapes() {
        let forged = "first\nERROR forged line\r\x1b[31mred\x1b[0m\x07\u{9b}2J \u{202e}end\ttab";
        let shown = escaped(forged);
        assert_eq!(
            shown,
            "first\\nERROR forged line\\r\\u{1b}[31mred\\u{1b}[0m\\u{7}\\u{9b}2J \\u{202e}end\\ttab"
        );
        assert!(!shown.chars().any(needs_escape));
        assert!(matches!(escaped("plain text é"), Cow::Borrowed(_)));
    }

    #[test]
    fn quoted_names_are_bounded_and_escaped() {
        assert_eq!(quoted("orders"), "\"orders\"");
        assert_eq!(quoted("a\nb\u{202e}"), "\"a\\nb\\u{202e}\"");
        let long = "d".repeat(8 << 20);
        let shown = quoted(&long);
        assert!(shown.len() < MAX_QUOTED_NAME + 64, "{}", shown.len());
        assert!(shown.ends_with("(8388608 bytes in all, cut)"), "{shown}");
    }
}
