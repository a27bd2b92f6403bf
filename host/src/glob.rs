//! Redis's glob matcher, reproduced byte for byte.
//!
//! Redis decides which `PSUBSCRIBE` patterns a published message is delivered through, and
//! the router decides which of those deliveries belongs to which plugin. If the two ever
//! disagreed on whether a pattern matches a channel, messages would be dropped or handled
//! twice, so this module follows the observable behaviour of `stringmatchlen` in Redis's
//! `src/util.c` (Redis 7.0, case-sensitive mode) exactly, quirks included:
//!
//! - Patterns and subjects are arbitrary bytes; nothing is decoded or case-folded.
//! - `*` matches any run of bytes, `?` exactly one byte, `[...]` one byte from a set
//!   (`[^...]` negated), and `\x` the literal byte `x`, inside a class or out of it. A
//!   lone `\` at the very end of the pattern is a literal `\`.
//! - **The empty subject matches only the empty pattern, not even `*`**: Redis's loop never
//!   starts when the subject is empty. Trailing `*`s only match nothing once the subject has
//!   been used up by earlier pattern bytes (so `a*` matches `a`).
//! - Range bounds and the subject byte are compared as C `char`, which is signed on the
//!   platforms Redis runs on: a byte of 0x80 or more counts as negative. So `[a-\xff]` is
//!   the range `-1..='a'` and does not contain `b`, while `[\x80-\xff]` contains `\x90`.
//!   Reversed bounds (`[z-a]`) are swapped.
//! - A range is taken whenever the class has at least three bytes left and the second is
//!   `-`, even if the third is the closing `]`: `[a-]` is the range `]..='a'` and the class
//!   is then left open, so it does not contain `-`. (`[-a]` and `[a\-]` do.)
//! - A class still open when the pattern ends simply ends there. `]` right after `[` or
//!   `[^` closes an empty class: `[]` matches no byte and `[^]` matches any one byte.
//! - Redis gives up (no match) once more than 1000 `*`s are nested; this matcher counts the
//!   same way and gives the same answer.
//!
//! Redis matches recursively, one level per `*`, but stops retrying earlier `*`s as soon as
//! a later one has failed at every position (its `skipLongerMatches`). Under that rule only
//! the most recent `*` is ever worth retrying, which is what lets [`matches()`] run as a loop
//! with a single backtrack point in `O(pattern × subject)` time and no recursion.
//!
//! The unit tests below check that loop against plain full-backtracking recursion; the
//! integration test `glob_differential` checks [`Glob`] against a real Redis.

use std::fmt;
use std::sync::Arc;

/// Redis answers "no match" rather than go more than this many `*`s deep.
const MAX_STAR_NESTING: usize = 1000;

/// A compiled Redis glob pattern. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Glob {
    pattern: Arc<[u8]>,
    shape: Shape,
}

/// Pattern shapes common in subscriptions that have a shortcut giving the same answer as
/// the general matcher. Derived from the pattern alone, so it never affects equality.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Shape {
    /// No metacharacter at all.
    Literal,
    /// A literal prefix of this length, then only `*`s.
    Prefix(usize),
    /// Only `*`s up to this index, then a non-empty literal suffix.
    Suffix(usize),
    /// Anything else.
    General,
}

fn is_meta(byte: u8) -> bool {
    matches!(byte, b'*' | b'?' | b'[' | b'\\')
}

fn is_plain(bytes: &[u8]) -> bool {
    !bytes.iter().copied().any(is_meta)
}

impl Shape {
    fn of(pattern: &[u8]) -> Self {
        if is_plain(pattern) {
            return Self::Literal;
        }
        let body_len = pattern.len() - pattern.iter().rev().take_while(|&&b| b == b'*').count();
        if body_len < pattern.len() && is_plain(&pattern[..body_len]) {
            return Self::Prefix(body_len);
        }
        let stars = pattern.iter().take_while(|&&b| b == b'*').count();
        // An all-star pattern was taken as an empty prefix above, so the suffix is non-empty.
        if stars > 0 && is_plain(&pattern[stars..]) {
            return Self::Suffix(stars);
        }
        Self::General
    }
}

impl Glob {
    /// Compiles `pattern`. Every byte string is a valid pattern, as in Redis.
    pub fn new(pattern: impl Into<Vec<u8>>) -> Self {
        let pattern: Arc<[u8]> = pattern.into().into();
        let shape = Shape::of(&pattern);
        Self { pattern, shape }
    }

    /// The pattern as given.
    pub fn as_bytes(&self) -> &[u8] {
        &self.pattern
    }

    /// True when the pattern has no glob metacharacters (`*`, `?`, `[`, `\`), so it matches
    /// only the identical subject.
    pub fn is_literal(&self) -> bool {
        self.shape == Shape::Literal
    }

    /// Whether Redis would deliver a message published on `subject` through this pattern.
    pub fn matches(&self, subject: &[u8]) -> bool {
        match self.shape {
            // Without metacharacters every pattern byte must equal the next subject byte,
            // and both must run out together.
            Shape::Literal => *self.pattern == *subject,
            // The prefix must match byte for byte; the first `*` reached with subject left is
            // the last one and takes the rest, and a subject ending with the prefix lets the
            // stars match nothing. Only the empty subject is special: it never matches.
            Shape::Prefix(len) => !subject.is_empty() && subject.starts_with(&self.pattern[..len]),
            // The single (collapsed) `*` tries the literal at every non-empty suffix, and a
            // literal matches a suffix only if equal to it. A non-empty suffix can only be
            // found in a non-empty subject, so the empty-subject rule holds by itself.
            Shape::Suffix(start) => subject.ends_with(&self.pattern[start..]),
            Shape::General => matches(&self.pattern, subject),
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

/// Whether `subject` matches the Redis glob `pattern`, exactly as Redis decides it.
pub fn matches(pattern: &[u8], subject: &[u8]) -> bool {
    let (mut p, mut s) = (0, 0);
    // The most recent `*`: where the pattern resumes after it, and the subject position the
    // rest of the pattern is currently being tried at. Earlier `*`s are never revisited: if
    // the rest fails at every position after this one, giving an earlier `*` more bytes
    // could only start the rest later still (Redis stops there too).
    let mut backtrack: Option<(usize, usize)> = None;
    let mut stars = 0;
    loop {
        if let (Some(&token), Some(&byte)) = (pattern.get(p), subject.get(s)) {
            if token == b'*' {
                while pattern.get(p + 1) == Some(&b'*') {
                    p += 1;
                }
                if p + 1 == pattern.len() {
                    // With subject left, a final `*` takes all of it.
                    return true;
                }
                stars += 1;
                if stars > MAX_STAR_NESTING {
                    return false;
                }
                p += 1;
                backtrack = Some((p, s));
                continue;
            }
            if let Some(next) = match_one(pattern, p, byte) {
                p = next;
                s += 1;
                if s < subject.len() {
                    continue;
                }
                // Only now, with the subject used up by a real match, may `*`s match nothing.
                while pattern.get(p) == Some(&b'*') {
                    p += 1;
                }
            }
        }
        // A byte mismatched, or the pattern or the subject ran out.
        if p == pattern.len() && s == subject.len() {
            return true;
        }
        match backtrack {
            // Redis only retries the rest against non-empty suffixes of the subject.
            Some((resume, tried)) if tried + 1 < subject.len() => {
                backtrack = Some((resume, tried + 1));
                p = resume;
                s = tried + 1;
            }
            _ => return false,
        }
    }
}

/// Matches the single-byte token at `pattern[p]` (anything but `*`) against `byte`; on a
/// match, returns where the next token starts.
fn match_one(pattern: &[u8], p: usize, byte: u8) -> Option<usize> {
    match pattern[p] {
        b'?' => Some(p + 1),
        b'[' => match_class(pattern, p + 1, byte),
        b'\\' if p + 1 < pattern.len() => (pattern[p + 1] == byte).then_some(p + 2),
        // Includes a `\` that ends the pattern: there is nothing for it to escape.
        literal => (literal == byte).then_some(p + 1),
    }
}

/// Matches the class whose body starts at `pattern[i]` (just after `[`) against `byte`; on
/// a match, returns where the next token starts: after the closing `]`, or at the end of the
/// pattern for a class left open.
fn match_class(pattern: &[u8], mut i: usize, byte: u8) -> Option<usize> {
    let negated = pattern.get(i) == Some(&b'^');
    if negated {
        i += 1;
    }
    let mut found = false;
    // The arm order is the precedence Redis gives these forms: an escape beats `]`, and `]`
    // beats a range, so `[\]]` holds `]`, `[]-a]` is an empty class, yet `[a-]` is a range.
    loop {
        match &pattern[i..] {
            [b'\\', escaped, ..] => {
                found |= *escaped == byte;
                i += 2;
            }
            [b']', ..] => {
                i += 1;
                break;
            }
            [] => break,
            [low, b'-', high, ..] => {
                found |= in_char_range(*low, *high, byte);
                i += 3;
            }
            [member, ..] => {
                found |= *member == byte;
                i += 1;
            }
        }
    }
    (found != negated).then_some(i)
}

/// Range membership with bytes read as C's signed `char`, as Redis compares them.
fn in_char_range(a: u8, b: u8, byte: u8) -> bool {
    let (a, b, c) = (a.cast_signed(), b.cast_signed(), byte.cast_signed());
    let (low, high) = if a <= b { (a, b) } else { (b, a) };
    (low..=high).contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Matches through both entry points and insists they agree, so that every case also
    /// checks the fast paths against the general matcher.
    fn m(pattern: &[u8], subject: &[u8]) -> bool {
        let general = matches(pattern, subject);
        assert_eq!(
            Glob::new(pattern).matches(subject),
            general,
            "Glob and matches() disagree on pattern {:?}, subject {:?}",
            String::from_utf8_lossy(pattern),
            String::from_utf8_lossy(subject),
        );
        general
    }

    #[test]
    fn literals_match_only_the_identical_subject() {
        assert!(m(b"news", b"news"));
        assert!(!m(b"news", b"new"));
        assert!(!m(b"news", b"newsy"));
        assert!(!m(b"news", b"NEWS"), "matching is case-sensitive");
        assert!(
            m(b"a.b:c-d]^", b"a.b:c-d]^"),
            "`]`, `^`, `-` are plain outside a class"
        );
    }

    #[test]
    fn is_literal_means_no_metacharacters() {
        assert!(Glob::new("a:b]^-").is_literal());
        assert!(Glob::new("").is_literal());
        for pattern in ["a*", "a?", "a[b]", "a\\b"] {
            assert!(!Glob::new(pattern).is_literal(), "{pattern}");
        }
    }

    #[test]
    fn empty_pattern_and_empty_subject() {
        assert!(m(b"", b""));
        assert!(!m(b"", b"a"));
        assert!(!m(b"a", b""));
        assert!(!m(b"?", b""));
        assert!(!m(b"[^]", b""));
    }

    #[test]
    fn star_never_matches_the_empty_subject() {
        // Redis's matching loop does not start on an empty subject.
        assert!(!m(b"*", b""));
        assert!(!m(b"**", b""));
        assert!(!m(b"*a", b""));
    }

    #[test]
    fn trailing_star_matches_the_rest_including_nothing() {
        assert!(m(b"news.*", b"news.sport"));
        assert!(m(b"news.*", b"news."));
        assert!(!m(b"news.*", b"news"));
        assert!(m(b"a**", b"a"));
        assert!(m(b"*", b"\x00\xff"));
    }

    #[test]
    fn leading_star_matches_any_prefix() {
        assert!(m(b"*.sport", b"news.sport"));
        assert!(m(b"*.sport", b".sport"));
        assert!(!m(b"*.sport", b"news.sports"));
        assert!(m(b"**a", b"a"));
    }

    #[test]
    fn middle_and_multiple_stars() {
        assert!(m(b"a*c", b"ac"));
        assert!(m(b"a*c", b"abbbc"));
        assert!(!m(b"a*c", b"abbbd"));
        assert!(m(b"a*b*c", b"axxbyyc"));
        assert!(!m(b"a*b*c", b"axxcyyb"));
        assert!(m(b"*b*", b"abc"));
        assert!(!m(b"*b*", b"acd"));
        assert!(
            m(b"a*b", b"abab"),
            "the star must be retried past the first `b`"
        );
        assert!(!m(b"a*b", b"a"));
    }

    #[test]
    fn consecutive_stars_collapse() {
        assert!(m(b"a***c", b"abc"));
        assert!(m(b"a***c", b"ac"));
        assert!(m(b"***", b"abc"));
        assert!(m(b"*?*", b"x"));
    }

    #[test]
    fn question_mark_matches_exactly_one_byte() {
        assert!(m(b"a?c", b"abc"));
        assert!(!m(b"a?c", b"ac"));
        assert!(!m(b"a?c", b"abbc"));
        assert!(m(b"??", b"\xc3\xa9"), "one byte, not one character");
        assert!(!m(b"?", b"\xc3\xa9"));
    }

    #[test]
    fn classes_and_negation() {
        assert!(m(b"[abc]", b"b"));
        assert!(!m(b"[abc]", b"d"));
        assert!(!m(b"[abc]", b"ab"), "a class matches one byte");
        assert!(m(b"[^abc]", b"d"));
        assert!(!m(b"[^abc]", b"a"));
        assert!(
            m(b"x[*?]y", b"x*y"),
            "metacharacters are members inside a class"
        );
        assert!(m(b"[[]", b"["));
        assert!(m(b"[a^]", b"^"), "`^` only negates right after `[`");
        assert!(m(b"[^^]", b"a"));
        assert!(!m(b"[^^]", b"^"));
    }

    #[test]
    fn ranges_are_inclusive_and_reversed_bounds_swap() {
        assert!(m(b"[a-c]", b"a"));
        assert!(m(b"[a-c]", b"c"));
        assert!(!m(b"[a-c]", b"d"));
        assert!(m(b"[z-a]", b"m"));
        assert!(m(b"[z-a]", b"z"));
        assert!(!m(b"[z-a]", b"-"));
        assert!(m(b"[0-9a-f]", b"e"));
        assert!(m(b"[^0-9]", b"x"));
        assert!(!m(b"[^0-9]", b"5"));
        assert!(m(b"[-a]", b"-"), "a leading `-` is a member");
    }

    #[test]
    fn a_range_can_swallow_the_closing_bracket() {
        // `[a-]` is the range `]`..=`a` (0x5d..=0x61), and the class is then open.
        assert!(m(b"[a-]", b"a"));
        assert!(m(b"[a-]", b"]"));
        assert!(m(b"[a-]", b"_"));
        assert!(!m(b"[a-]", b"-"));
        assert!(!m(b"[a-]", b"b"));
        // The open class runs to the end of the pattern, so nothing can follow it.
        assert!(m(b"[a-]x]", b"x"));
        assert!(!m(b"[a-]x]", b"ax]"));
        assert!(m(b"[a\\-]", b"-"), "an escaped `-` is a member");
    }

    #[test]
    fn ranges_compare_as_signed_chars() {
        // 0xff is -1 as a signed char, so this is the range -1..='a'.
        assert!(!m(b"[a-\xff]", b"b"));
        assert!(m(b"[a-\xff]", b"a"));
        assert!(m(b"[a-\xff]", b"\xff"));
        assert!(m(b"[a-\xff]", b"\x00"));
        assert!(!m(b"[a-\xff]", b"\x80"));
        // 0x80..=0xff is -128..=-1: all the high bytes and nothing else.
        assert!(m(b"[\x80-\xff]", b"\x90"));
        assert!(!m(b"[\x80-\xff]", b"a"));
        // Crossing zero: -1..=1.
        assert!(m(b"[\xff-\x01]", b"\x00"));
        assert!(!m(b"[\xff-\x01]", b"\x7f"));
    }

    #[test]
    fn empty_classes() {
        assert!(!m(b"[]", b"a"));
        assert!(!m(b"[]", b"]"));
        assert!(m(b"[^]", b"a"));
        assert!(m(b"[^]", b"]"));
        assert!(!m(b"[^]", b"ab"));
        // `]` first closes the class, so the next `]` is a plain literal.
        assert!(!m(b"[]a]", b"a"));
        assert!(!m(b"[]a]", b"]"));
        assert!(m(b"x[^]y", b"x\x00y"));
    }

    #[test]
    fn unterminated_class_ends_with_the_pattern() {
        assert!(m(b"[ab", b"a"));
        assert!(m(b"[ab", b"b"));
        assert!(!m(b"[ab", b"c"));
        assert!(!m(b"[ab", b"ab"));
        assert!(m(b"[^ab", b"c"));
        assert!(m(b"[a-c", b"b"));
        assert!(
            m(b"x[^", b"xy"),
            "an open, empty, negated class matches any byte"
        );
        assert!(!m(b"[", b"["), "an open, empty class matches nothing");
        assert!(!m(b"a[", b"a"), "a class needs a subject byte");
        assert!(!m(b"a[", b"ab"));
        assert!(m(b"*[ab", b"xxb"));
    }

    #[test]
    fn escapes_outside_classes() {
        assert!(m(b"a\\*", b"a*"));
        assert!(!m(b"a\\*", b"ab"));
        assert!(m(b"\\?", b"?"));
        assert!(!m(b"\\?", b"x"));
        assert!(m(b"\\[a]", b"[a]"));
        assert!(m(b"\\\\", b"\\"));
        assert!(m(b"\\a", b"a"), "escaping a plain byte is harmless");
        assert!(!Glob::new("\\a").is_literal());
    }

    #[test]
    fn trailing_backslash_is_literal() {
        assert!(m(b"a\\", b"a\\"));
        assert!(!m(b"a\\", b"a"));
        assert!(m(b"\\", b"\\"));
        assert!(m(b"*\\", b"ab\\"));
    }

    #[test]
    fn escapes_inside_classes() {
        assert!(m(b"[\\]]", b"]"));
        assert!(m(b"[\\^a]", b"^"));
        assert!(m(b"[\\\\]", b"\\"));
        assert!(
            m(b"[a\\", b"\\"),
            "a backslash ending the pattern is a member"
        );
        assert!(
            m(b"[\\]", b"]"),
            "the escaped `]` is a member, and the class is left open"
        );
        assert!(!m(b"[\\]", b"\\"));
        assert!(m(b"[^\\]]", b"a"));
        assert!(!m(b"[^\\]]", b"]"));
    }

    #[test]
    fn non_utf8_bytes_are_plain_bytes() {
        assert!(m(b"\xc3*", b"\xc3\xa9t\xc3\xa9"));
        assert!(m(b"?\xa9", b"\xc3\xa9"));
        assert!(m(b"\xff\x00*", b"\xff\x00\xfe"));
        assert!(m(b"[\xfe\xff]", b"\xfe"));
        assert!(!m(b"[^\xfe\xff]", b"\xff"));
        assert!(m(b"*\x00", b"a\x00"), "NUL is an ordinary byte");
    }

    #[test]
    fn pathological_patterns_finish() {
        let subject = vec![b'a'; 10_000];
        assert!(!m(b"a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b", &subject));
        assert!(m(b"a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a", &subject));
        assert!(!m(b"*?*?*?*?*?*?*?*?*[b]*?*?*?*?*", &subject));
        let star_run = b"*".repeat(100_000);
        assert!(m(&star_run, b"abc"));
    }

    #[test]
    fn more_than_a_thousand_nested_stars_do_not_match() {
        let within = b"*a".repeat(MAX_STAR_NESTING);
        let beyond = b"*a".repeat(MAX_STAR_NESTING + 1);
        let subject = vec![b'a'; 2 * MAX_STAR_NESTING];
        assert!(m(&within, &subject));
        assert!(!m(&beyond, &subject));
        // A run of stars counts once, and a final `*` is never nested into.
        assert!(m(&b"**a".repeat(MAX_STAR_NESTING), &subject));
        let mut final_star = within.clone();
        final_star.push(b'*');
        assert!(m(&final_star, &subject));
    }

    #[test]
    fn glob_keeps_and_shows_its_pattern() {
        let glob = Glob::new(b"news.\xff*".to_vec());
        assert_eq!(glob.as_bytes(), b"news.\xff*");
        assert_eq!(glob.to_string(), "news.\u{fffd}*");
        assert_eq!(format!("{glob:?}"), "Glob(\"news.\u{fffd}*\")");
        assert_eq!(glob.clone(), glob);
        assert_ne!(Glob::new("a*"), Glob::new("a?"));
    }

    /// Redis's semantics transcribed as plain recursion that retries every `*` at every
    /// position: too slow for real use, but obviously faithful.
    fn reference(pattern: &[u8], subject: &[u8]) -> bool {
        fn go(p: &[u8], s: &[u8], depth: usize) -> bool {
            let (Some(&token), Some(&byte)) = (p.first(), s.first()) else {
                return p.is_empty() && s.is_empty();
            };
            if token == b'*' {
                let rest = &p[p.iter().take_while(|&&b| b == b'*').count()..];
                return rest.is_empty()
                    || (depth < MAX_STAR_NESTING
                        && (0..s.len()).any(|i| go(rest, &s[i..], depth + 1)));
            }
            let Some(next) = match_one(p, 0, byte) else {
                return false;
            };
            let (mut p, s) = (&p[next..], &s[1..]);
            if s.is_empty() {
                while p.first() == Some(&b'*') {
                    p = &p[1..];
                }
                return p.is_empty();
            }
            go(p, s, depth)
        }
        go(pattern, subject, 0)
    }

    /// Every string over `alphabet` up to `max_len` bytes long.
    fn all_strings(alphabet: &[u8], max_len: usize) -> Vec<Vec<u8>> {
        let mut all = vec![Vec::new()];
        let mut last = vec![Vec::new()];
        for _ in 0..max_len {
            last = last
                .iter()
                .flat_map(|s: &Vec<u8>| {
                    alphabet.iter().map(move |&b| {
                        let mut t = s.clone();
                        t.push(b);
                        t
                    })
                })
                .collect();
            all.extend(last.iter().cloned());
        }
        all
    }

    #[test]
    fn single_backtrack_point_agrees_with_full_backtracking() {
        let patterns = all_strings(b"a*?[]^-\\\xff", 5);
        let subjects = all_strings(b"a-]\xff", 3);
        for pattern in &patterns {
            let glob = Glob::new(pattern.clone());
            for subject in &subjects {
                assert_eq!(
                    glob.matches(subject),
                    reference(pattern, subject),
                    "pattern {pattern:?}, subject {subject:?}"
                );
            }
        }
    }
}
