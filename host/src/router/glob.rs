//! Redis's glob matcher, byte for byte.
//!
//! The router must agree with Redis on which patterns match a channel: Redis decides which
//! `pmessage`s it sends, and the router decides which of them is a plugin's copy ("once per
//! plugin"). Any disagreement would lose or double messages, so this follows the semantics
//! of `stringmatchlen` in Redis's `util.c` exactly, quirks included:
//!
//! - everything is bytes, case-sensitive;
//! - inside `[...]`, range bounds and the subject byte compare as C `char`, which is signed on
//!   the platforms Redis runs on: a byte of 0x80 or more is a negative number there, so
//!   `[a-\xff]` is the range from -1 to `a` and does not contain `b`;
//! - a class left open at the end of the pattern ends there; `[]` matches nothing and `[^]`
//!   any one byte; a range may take the class's closing `]` as its upper bound (`[a-]` is the
//!   range `]`..=`a`, and the class is then open);
//! - nothing matches the empty subject except the empty pattern (not even `*`);
//! - `\x` is the literal `x`, inside or outside a class; a trailing `\` is a literal `\`.
//!
//! The integration test `glob_differential` checks this module against a real Redis on
//! hundreds of generated patterns.

use std::fmt;

/// A compiled Redis glob pattern.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Glob {
    pattern: Vec<u8>,
    kind: Kind,
}

/// Shapes that can be matched without the general algorithm, with identical results.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    /// No metacharacter: equal bytes.
    Literal,
    /// A literal prefix followed by a single trailing `*`.
    Prefix,
    /// Anything else.
    General,
}

fn is_meta(byte: u8) -> bool {
    matches!(byte, b'*' | b'?' | b'[' | b'\\')
}

impl Glob {
    /// Compiles `pattern`. Every byte string is a valid pattern.
    pub fn new(pattern: impl Into<Vec<u8>>) -> Self {
        let pattern = pattern.into();
        let kind = if !pattern.iter().copied().any(is_meta) {
            Kind::Literal
        } else if let Some((b'*', prefix)) = pattern.split_last()
            && !prefix.iter().copied().any(is_meta)
        {
            Kind::Prefix
        } else {
            Kind::General
        };
        Self { pattern, kind }
    }

    /// The pattern as written.
    pub fn as_bytes(&self) -> &[u8] {
        &self.pattern
    }

    /// True when the pattern has no metacharacters, so it matches only itself.
    pub fn is_literal(&self) -> bool {
        self.kind == Kind::Literal
    }

    /// Whether `subject` matches, exactly as Redis's `PSUBSCRIBE` would decide.
    pub fn matches(&self, subject: &[u8]) -> bool {
        match self.kind {
            Kind::Literal => self.pattern == subject,
            // Redis's loop never starts on an empty subject, so even `*` does not match it.
            Kind::Prefix => {
                !subject.is_empty() && subject.starts_with(&self.pattern[..self.pattern.len() - 1])
            }
            Kind::General => matches(&self.pattern, subject),
        }
    }
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Glob({:?})", String::from_utf8_lossy(&self.pattern))
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.pattern))
    }
}

/// Whether `subject` matches the Redis glob `pattern`.
pub fn matches(pattern: &[u8], subject: &[u8]) -> bool {
    let mut give_up = false;
    match_from(pattern, subject, &mut give_up, 0)
}

/// Redis refuses to recurse deeper than this many `*`s and reports no match.
const MAX_NESTING: usize = 1000;

/// `give_up` is Redis's "skip longer matches": once the rest of the pattern after some `*`
/// matched no suffix of the subject, no earlier `*` can help by consuming more, because that
/// only leaves shorter suffixes for the same rest. It keeps the worst case polynomial.
fn match_from(mut p: &[u8], mut s: &[u8], give_up: &mut bool, nesting: usize) -> bool {
    if nesting > MAX_NESTING {
        return false;
    }
    while let (Some(&pc), Some(&sc)) = (p.first(), s.first()) {
        match pc {
            b'*' => {
                while p.len() > 1 && p[1] == b'*' {
                    p = &p[1..];
                }
                if p.len() == 1 {
                    return true;
                }
                while !s.is_empty() {
                    if match_from(&p[1..], s, give_up, nesting + 1) {
                        return true;
                    }
                    if *give_up {
                        return false;
                    }
                    s = &s[1..];
                }
                *give_up = true;
                return false;
            }
            b'?' => s = &s[1..],
            b'[' => {
                let (matched, consumed) = match_class(&p[1..], sc);
                if !matched {
                    return false;
                }
                // `consumed` stops on the closing `]` (or at the end of an open class);
                // the `]` itself is skipped below like any other pattern byte.
                p = &p[consumed..];
                s = &s[1..];
            }
            b'\\' if p.len() >= 2 => {
                if p[1] != sc {
                    return false;
                }
                p = &p[1..];
                s = &s[1..];
            }
            _ => {
                if pc != sc {
                    return false;
                }
                s = &s[1..];
            }
        }
        p = p.get(1..).unwrap_or_default();
        if s.is_empty() {
            while p.first() == Some(&b'*') {
                p = &p[1..];
            }
            break;
        }
    }
    p.is_empty() && s.is_empty()
}

/// Matches `c` against the class whose body starts at `body` (just after `[`). Returns
/// whether it matched and how many bytes of `[`+body come before the closing `]`, so that
/// the caller's final step past one byte lands after the class.
fn match_class(body: &[u8], c: u8) -> (bool, usize) {
    let mut i = 0;
    let negate = body.first() == Some(&b'^');
    if negate {
        i += 1;
    }
    let mut matched = false;
    loop {
        let rest = &body[i.min(body.len())..];
        match rest {
            [b'\\', escaped, ..] => {
                matched |= *escaped == c;
                i += 2;
            }
            [b']', ..] => break,
            [] => {
                // An open class ends with the pattern; step back so the caller's final step
                // lands exactly on the end.
                i = body.len().saturating_sub(1);
                if body.is_empty() {
                    // `[` was the pattern's last byte: the caller steps past it.
                    return (if negate { !matched } else { matched }, 0);
                }
                return (if negate { !matched } else { matched }, 1 + i);
            }
            [start, b'-', end, ..] => {
                // Redis compares these as (signed) `char`.
                let (mut lo, mut hi) = (*start as i8, *end as i8);
                if lo > hi {
                    std::mem::swap(&mut lo, &mut hi);
                }
                matched |= (lo..=hi).contains(&(c as i8));
                i += 3;
            }
            [byte, ..] => {
                matched |= *byte == c;
                i += 1;
            }
        }
    }
    (if negate { !matched } else { matched }, 1 + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &[u8], subject: &[u8]) -> bool {
        let general = matches(pattern, subject);
        assert_eq!(
            Glob::new(pattern).matches(subject),
            general,
            "fast path disagrees"
        );
        general
    }

    #[test]
    fn literals_match_only_themselves() {
        assert!(m(b"abc", b"abc"));
        assert!(!m(b"abc", b"abcd"));
        assert!(!m(b"abc", b"ab"));
        assert!(m(b"", b""));
        assert!(!m(b"", b"a"));
        assert!(Glob::new("a:b").is_literal());
        assert!(!Glob::new("a*").is_literal());
    }

    #[test]
    fn star_matches_any_run_including_empty() {
        assert!(
            !m(b"*", b""),
            "Redis never matches an empty subject against `*`"
        );
        assert!(m(b"*", b"anything"));
        assert!(m(b"a*", b"a"));
        assert!(m(b"a*", b"abc"));
        assert!(m(b"*c", b"abc"));
        assert!(!m(b"*c", b"abd"));
        assert!(m(b"a*c", b"ac"));
        assert!(m(b"a*b*c", b"axxbyyc"));
        assert!(!m(b"a*b*c", b"axxcyyb"));
        assert!(m(b"a**c", b"abc"));
        assert!(m(b"a*", b"a"));
        assert!(!m(b"a*b", b"a"));
    }

    #[test]
    fn question_mark_matches_exactly_one_byte() {
        assert!(m(b"a?c", b"abc"));
        assert!(!m(b"a?c", b"ac"));
        assert!(!m(b"?", b""));
        assert!(m(b"?", b"\xff"));
    }

    #[test]
    fn classes_sets_negation_and_ranges() {
        assert!(m(b"[abc]", b"b"));
        assert!(!m(b"[abc]", b"d"));
        assert!(m(b"[^abc]", b"d"));
        assert!(!m(b"[^abc]", b"a"));
        assert!(m(b"[a-c]", b"b"));
        assert!(m(b"[c-a]", b"b"), "reversed bounds are swapped");
        assert!(!m(b"[a-c]", b"d"));
        // The range takes the `]` as its bound: `]`..=`a`, and the class stays open.
        assert!(m(b"[a-]", b"a"));
        assert!(m(b"[a-]", b"_"));
        assert!(!m(b"[a-]", b"-"));
        assert!(!m(b"[a-]", b"b"));
        assert!(m(b"x[0-9]y", b"x5y"));
    }

    #[test]
    fn empty_and_open_classes() {
        assert!(!m(b"[]", b"a"));
        assert!(!m(b"[]", b""));
        assert!(m(b"[^]", b"a"));
        // `]` right after `[` closes an empty class, which no byte matches.
        assert!(!m(b"[]a]", b"a"));
        assert!(!m(b"[]a]", b"]a]"));
        assert!(m(b"[ab", b"a"), "an open class ends with the pattern");
        assert!(!m(b"[ab", b"c"));
        assert!(!m(b"[ab", b"ab"));
        assert!(!m(b"a[", b"a"));
        assert!(!m(b"a[", b"ab"));
        assert!(!m(b"[", b"["));
    }

    #[test]
    fn escapes_inside_and_outside_classes() {
        assert!(m(b"a\\*", b"a*"));
        assert!(!m(b"a\\*", b"ab"));
        assert!(m(b"\\?", b"?"));
        assert!(m(b"[\\]]", b"]"));
        assert!(m(b"[\\-]", b"-"));
        assert!(m(b"a\\", b"a\\"), "a trailing backslash is literal");
        assert!(!m(b"a\\", b"a"));
    }

    #[test]
    fn ranges_compare_bytes_as_signed_chars() {
        // 0xff is -1 as a signed char: [a-\xff] is the range -1..='a'.
        assert!(!m(b"[a-\xff]", b"b"));
        assert!(m(b"[a-\xff]", b"a"));
        assert!(m(b"[a-\xff]", b"\xff"));
        assert!(!m(b"[a-\xff]", b"\x80"));
        assert!(m(b"[\x80-\xff]", b"\x90"));
        assert!(!m(b"[\x80-\xff]", b"a"));
    }

    #[test]
    fn non_utf8_bytes_are_plain_bytes() {
        assert!(m(b"\xc3*", b"\xc3\xa9t\xc3\xa9"));
        assert!(m(b"?\xa9", b"\xc3\xa9"));
        assert!(!m(b"?", b"\xc3\xa9"), "one byte, not one character");
    }

    #[test]
    fn pathological_patterns_finish() {
        let pattern = b"a*a*a*a*a*a*a*a*a*a*a*a*b";
        let subject = vec![b'a'; 5000];
        assert!(!m(pattern, &subject));
        let many_stars = b"*".repeat(5000);
        assert!(m(&many_stars, b"abc"));
    }
}
