//! `chat-moderator`: moderates chat messages and rebroadcasts them to their room.
//!
//! It subscribes to `chat:in:*`; the room is the part of the channel after `chat:in:` and must be
//! non-empty and free of `:` (so a message can never be republished into the input namespace).
//! Each payload is a JSON object `{"user_id": "<id>" or <integer>, "message": "<text>"}`; other
//! fields are ignored. A malformed room or payload fails the message with `error::invalid`.
//!
//! Messages from muted users, and messages longer than the limit, are dropped with an info log
//! line, and a notice saying so is published on `chat:notice:ROOM`:
//! `{"reason": "muted", "room": "<room>", "user_id": "<id>"}`, or
//! `{"length": <characters>, "limit": <max_length>, "reason": "too_long", "room": "<room>",
//! "user_id": "<id>"}`. A notice that cannot be published (say the operator granted no
//! `chat:notice:*`) is logged at warn level; the message still counts as handled.
//!
//! In every other message each banned word is masked: every occurrence, whatever its case, that
//! stands as a whole word (bounded by non-alphanumeric characters or the ends of the text)
//! becomes as many `*` as it has characters. The result is published on `chat:ROOM` as
//! `{"room": "<room>", "user_id": "<id>", "message": "<masked text>", "moderated": <true if
//! anything was masked>, "ts": <host receive time, milliseconds since the Unix epoch>}`; an
//! integer `user_id` is published as its decimal text.
//!
//! Settings (read on every message; all optional):
//! - `max_length`: the longest message let through, in characters (Unicode scalar values);
//!   default 500;
//! - `muted`: JSON array of user ids (strings, or integers meaning their decimal text); default
//!   none;
//! - `banned_words`: JSON array of words (or phrases) to mask; default none.
//!
//! A setting that cannot be read fails every message with `error::invalid` naming it, rather
//! than letting unmoderated text through.
//!
//! Grants needed: publish `chat:*` (which covers both `chat:ROOM` and `chat:notice:ROOM`).

use serde_json::Value;
use switchyard_plugin::{Error, Level, Message, Plugin, PluginInfo};

const PREFIX: &str = "chat:in:";
const NOTICE_PREFIX: &str = "chat:notice:";
const DEFAULT_MAX_LENGTH: usize = 500;

struct Settings {
    max_length: usize,
    muted: Vec<String>,
    banned_words: Vec<String>,
}

impl Settings {
    /// Reads the settings through `get` (the host's `config`, or a stand-in in tests).
    fn read(get: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let max_length = match get("max_length") {
            None => DEFAULT_MAX_LENGTH,
            Some(raw) => raw.trim().parse().map_err(|_| {
                format!("setting max_length must be a non-negative integer, got {raw:?}")
            })?,
        };
        Ok(Self {
            max_length,
            muted: text_list("muted", get("muted"))?,
            banned_words: text_list("banned_words", get("banned_words"))?,
        })
    }
}

/// Parses a setting holding a JSON array of strings; integers are taken as their decimal text,
/// because user ids are often numbers and a manifest may well spell them unquoted.
fn text_list(key: &str, raw: Option<String>) -> Result<Vec<String>, String> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    let bad = || format!("setting {key} must be a JSON array of strings, got {raw}");
    let Ok(Value::Array(items)) = serde_json::from_str::<Value>(&raw) else {
        return Err(bad());
    };
    items
        .into_iter()
        .map(|item| integer_or_string(item).ok_or_else(bad))
        .collect()
}

fn integer_or_string(value: Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text),
        Value::Number(number) if number.is_i64() || number.is_u64() => Some(number.to_string()),
        _ => None,
    }
}

/// The room a `chat:in:ROOM` channel names.
fn room(channel: &str) -> Result<&str, String> {
    let room = channel
        .strip_prefix(PREFIX)
        .ok_or_else(|| format!("channel {channel:?} is not a {PREFIX} channel"))?;
    if room.is_empty() {
        return Err(format!("channel {channel:?} names no room"));
    }
    if room.contains(':') {
        return Err(format!("room {room:?} must not contain ':'"));
    }
    Ok(room)
}

#[derive(Debug, PartialEq, Eq)]
struct Chat {
    user_id: String,
    message: String,
}

fn parse_chat(payload: &[u8]) -> Result<Chat, String> {
    let text =
        std::str::from_utf8(payload).map_err(|e| format!("payload is not valid UTF-8: {e}"))?;
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("payload is not valid JSON: {e}"))?;
    let Value::Object(mut object) = value else {
        return Err("payload must be a JSON object".to_owned());
    };
    let user_id = object
        .remove("user_id")
        .ok_or("missing field \"user_id\"")?;
    let user_id =
        integer_or_string(user_id).ok_or("field \"user_id\" must be a string or an integer")?;
    // An empty id could be neither muted nor told apart from anyone else's.
    if user_id.is_empty() {
        return Err("field \"user_id\" must not be empty".to_owned());
    }
    let message = match object.remove("message") {
        None => return Err("missing field \"message\"".to_owned()),
        Some(Value::String(message)) => message,
        Some(_) => return Err("field \"message\" must be a string".to_owned()),
    };
    Ok(Chat { user_id, message })
}

/// Why a message is dropped instead of rebroadcast.
#[derive(Debug, PartialEq, Eq)]
enum Dropped {
    /// The sender is listed in `muted`.
    Muted,
    /// The message has `length` characters, over the `limit` (`max_length`).
    TooLong { length: usize, limit: usize },
}

impl Dropped {
    /// Whether `chat` is dropped under `settings`, and why. Muting is checked first.
    fn check(chat: &Chat, settings: &Settings) -> Option<Self> {
        if settings.muted.contains(&chat.user_id) {
            return Some(Self::Muted);
        }
        // Characters (Unicode scalar values), not bytes.
        let length = chat.message.chars().count();
        (length > settings.max_length).then_some(Self::TooLong {
            length,
            limit: settings.max_length,
        })
    }

    /// The info log line for a dropped message.
    fn log_line(&self, room: &str, user: &str) -> String {
        match self {
            Self::Muted => format!("dropped message from muted user {user} in {room}"),
            Self::TooLong { length, limit } => format!(
                "dropped message of {length} characters from {user} in {room} (limit {limit})"
            ),
        }
    }

    /// The notice published on `chat:notice:ROOM`. Keys are written in alphabetical order,
    /// which is also the order `serde_json` writes them in, as in the rebroadcast messages.
    fn notice(&self, room: &str, user: &str) -> String {
        match self {
            Self::Muted => serde_json::json!({
                "reason": "muted",
                "room": room,
                "user_id": user,
            }),
            Self::TooLong { length, limit } => serde_json::json!({
                "length": length,
                "limit": limit,
                "reason": "too_long",
                "room": room,
                "user_id": user,
            }),
        }
        .to_string()
    }
}

/// The channel a room's notices are published on.
fn notice_channel(room: &str) -> String {
    format!("{NOTICE_PREFIX}{room}")
}

/// An error as `kind: explanation`, for a log line.
fn error_text(error: &Error) -> String {
    let (kind, text) = match error {
        Error::Denied(text) => ("denied", text),
        Error::Invalid(text) => ("invalid", text),
        Error::Unavailable(text) => ("unavailable", text),
        Error::Failed(text) => ("failed", text),
    };
    format!("{kind}: {text}")
}

/// Whether two characters are the same letter but for case.
///
/// Folding one character at a time keeps a match exactly as long as the banned word, so the mask
/// has the word's length; the price is that multi-character foldings (`ß` against `SS`) do not
/// match. Both directions are compared because neither alone is enough: `ς` and `σ` only meet
/// in upper case.
fn same_letter(a: char, b: char) -> bool {
    a == b || a.to_lowercase().eq(b.to_lowercase()) || a.to_uppercase().eq(b.to_uppercase())
}

/// Whether `word` occurs as a whole word at `start` in `text`; the caller has checked the
/// character before `start`.
fn whole_word_at(text: &[char], start: usize, word: &[char]) -> bool {
    let end = start + word.len();
    let Some(candidate) = text.get(start..end) else {
        return false;
    };
    candidate.iter().zip(word).all(|(&a, &b)| same_letter(a, b))
        && text.get(end).is_none_or(|next| !next.is_alphanumeric())
}

/// Masks every whole-word, case-insensitive occurrence of a `banned` word in `text` with as many
/// `*` as it has characters, and says whether anything was masked.
///
/// Banned words are trimmed and empty ones ignored. Where several banned words match at the same
/// place, the longest wins; matches do not overlap.
fn mask(text: &str, banned: &[String]) -> (String, bool) {
    let mut words: Vec<Vec<char>> = banned
        .iter()
        .map(|word| word.trim())
        .filter(|word| !word.is_empty())
        .map(|word| word.chars().collect())
        .collect();
    words.sort_by_key(|word| std::cmp::Reverse(word.len()));

    let chars: Vec<char> = text.chars().collect();
    let mut masked = String::with_capacity(text.len());
    let mut changed = false;
    let mut at = 0;
    while let Some(&c) = chars.get(at) {
        let starts_word = at == 0
            || chars
                .get(at - 1)
                .is_some_and(|prev| !prev.is_alphanumeric());
        let hit = if starts_word {
            words
                .iter()
                .find(|word| whole_word_at(&chars, at, word))
                .map(Vec::len)
        } else {
            None
        };
        match hit {
            Some(len) => {
                masked.extend(std::iter::repeat_n('*', len));
                changed = true;
                at += len;
            }
            None => {
                masked.push(c);
                at += 1;
            }
        }
    }
    (masked, changed)
}

#[derive(Default)]
struct ChatModerator;

impl Plugin for ChatModerator {
    fn describe(&self) -> PluginInfo {
        PluginInfo::new("chat-moderator", env!("CARGO_PKG_VERSION"))
            .pattern(format!("{PREFIX}*"))
            .publishes("chat:*")
    }

    fn handle(&mut self, message: Message) -> Result<(), Error> {
        let room = room(&message.channel).map_err(Error::Invalid)?;
        let chat = parse_chat(&message.payload).map_err(Error::Invalid)?;
        let settings = Settings::read(switchyard_plugin::config).map_err(Error::Invalid)?;
        let user = &chat.user_id;

        if let Some(dropped) = Dropped::check(&chat, &settings) {
            switchyard_plugin::log(Level::Info, &dropped.log_line(room, user));
            // The notice is feedback for the room, not the point of the message: the drop
            // stands, and counts as handled, even if the notice cannot be published.
            let channel = notice_channel(room);
            if let Err(error) =
                switchyard_plugin::publish(&channel, dropped.notice(room, user).as_bytes())
            {
                switchyard_plugin::log(
                    Level::Warn,
                    &format!("cannot publish notice on {channel}: {}", error_text(&error)),
                );
            }
            return Ok(());
        }

        let (masked, moderated) = mask(&chat.message, &settings.banned_words);
        let out = serde_json::json!({
            "room": room,
            "user_id": user,
            "message": masked,
            "moderated": moderated,
            "ts": message.received_at / 1_000_000,
        });
        switchyard_plugin::publish(&format!("chat:{room}"), out.to_string().as_bytes())?;
        Ok(())
    }
}

switchyard_plugin::export!(ChatModerator);

#[cfg(test)]
mod tests {
    use super::*;

    fn words(list: &[&str]) -> Vec<String> {
        list.iter().map(|w| (*w).to_owned()).collect()
    }

    fn masked(text: &str, banned: &[&str]) -> (String, bool) {
        mask(text, &words(banned))
    }

    #[test]
    fn masks_whole_words_in_any_case() {
        assert_eq!(
            masked("Spam, spam and SPAM!", &["spam"]),
            ("****, **** and ****!".to_owned(), true)
        );
        assert_eq!(
            masked("no-spam_here", &["spam"]),
            ("no-****_here".to_owned(), true)
        );
        assert_eq!(masked("spam", &["spam"]), ("****".to_owned(), true));
    }

    #[test]
    fn leaves_parts_of_words_alone() {
        for text in ["spammer", "antispam", "spam1", "spamé", "日本spam"] {
            assert_eq!(masked(text, &["spam"]), (text.to_owned(), false), "{text}");
        }
    }

    #[test]
    fn handles_non_ascii_text_and_words() {
        assert_eq!(
            masked("ÄRGER über Ärger", &["ärger"]),
            ("***** über *****".to_owned(), true)
        );
        assert_eq!(
            masked("café CAFÉ", &["café"]),
            ("**** ****".to_owned(), true)
        );
        assert_eq!(masked("ΣΑΣ σας", &["σας"]), ("*** ***".to_owned(), true));
        assert_eq!(
            masked("💩 spam 💩", &["spam"]),
            ("💩 **** 💩".to_owned(), true)
        );
    }

    #[test]
    fn longest_match_wins_and_empty_words_are_ignored() {
        assert_eq!(
            masked("a scam artist, a scam", &["scam", "scam artist", "", "  "]),
            ("a ***********, a ****".to_owned(), true)
        );
        assert_eq!(masked("hello", &[]), ("hello".to_owned(), false));
        assert_eq!(masked("", &["spam"]), (String::new(), false));
    }

    #[test]
    fn rooms_cannot_reach_back_into_the_input_namespace() {
        assert_eq!(room("chat:in:lobby"), Ok("lobby"));
        assert!(room("chat:in:").is_err());
        assert!(room("chat:in:in:x").is_err());
        assert!(room("chat:lobby").is_err());
    }

    #[test]
    fn payloads_are_checked() {
        let chat = |user_id: &str, message: &str| Chat {
            user_id: user_id.to_owned(),
            message: message.to_owned(),
        };
        assert_eq!(
            parse_chat(br#"{"user_id":"ana","message":"hi"}"#),
            Ok(chat("ana", "hi"))
        );
        assert_eq!(
            parse_chat(br#"{"user_id":42,"message":""}"#),
            Ok(chat("42", ""))
        );
        assert_eq!(
            parse_chat(br#"{"user_id":1.5,"message":"m"}"#),
            Err(r#"field "user_id" must be a string or an integer"#.to_owned())
        );
        assert_eq!(
            parse_chat(br#"{"user_id":"","message":"m"}"#),
            Err(r#"field "user_id" must not be empty"#.to_owned())
        );
        assert_eq!(
            parse_chat(br#"{"message":"m"}"#),
            Err(r#"missing field "user_id""#.to_owned())
        );
        assert_eq!(
            parse_chat(br#"{"user_id":"a"}"#),
            Err(r#"missing field "message""#.to_owned())
        );
        assert_eq!(
            parse_chat(br#"{"user_id":"a","message":7}"#),
            Err(r#"field "message" must be a string"#.to_owned())
        );
        assert_eq!(
            parse_chat(b"[]"),
            Err("payload must be a JSON object".to_owned())
        );
        assert!(parse_chat(b"{").is_err_and(|e| e.starts_with("payload is not valid JSON: ")));
        assert!(parse_chat(b"\xff").is_err_and(|e| e.starts_with("payload is not valid UTF-8: ")));
    }

    fn settings(max_length: usize, muted: &[&str]) -> Settings {
        Settings {
            max_length,
            muted: words(muted),
            banned_words: Vec::new(),
        }
    }

    fn chat(user_id: &str, message: &str) -> Chat {
        Chat {
            user_id: user_id.to_owned(),
            message: message.to_owned(),
        }
    }

    #[test]
    fn muted_users_and_long_messages_are_dropped() {
        let limit_5 = settings(5, &["troll42", "7"]);
        assert_eq!(
            Dropped::check(&chat("troll42", "hi"), &limit_5),
            Some(Dropped::Muted)
        );
        assert_eq!(
            Dropped::check(&chat("7", "hi"), &limit_5),
            Some(Dropped::Muted)
        );
        // Muting is checked first, so a muted user's long message is reported as muted.
        assert_eq!(
            Dropped::check(&chat("troll42", "far too long"), &limit_5),
            Some(Dropped::Muted)
        );
        assert_eq!(
            Dropped::check(&chat("ana", "123456"), &limit_5),
            Some(Dropped::TooLong {
                length: 6,
                limit: 5
            })
        );
        // Characters are counted, not bytes: five two-byte letters fit in a limit of 5.
        assert_eq!(Dropped::check(&chat("ana", "ééééé"), &limit_5), None);
        assert_eq!(Dropped::check(&chat("ana", "12345"), &limit_5), None);
        assert_eq!(Dropped::check(&chat("troll4", "hi"), &limit_5), None);
        assert_eq!(
            Dropped::check(&chat("ana", "x"), &settings(0, &[])),
            Some(Dropped::TooLong {
                length: 1,
                limit: 0
            })
        );
    }

    #[test]
    fn drops_are_logged_and_noticed() {
        let too_long = Dropped::TooLong {
            length: 312,
            limit: 280,
        };
        assert_eq!(notice_channel("lobby"), "chat:notice:lobby");
        assert_eq!(
            Dropped::Muted.notice("lobby", "troll42"),
            r#"{"reason":"muted","room":"lobby","user_id":"troll42"}"#
        );
        assert_eq!(
            too_long.notice("lobby", "ana"),
            r#"{"length":312,"limit":280,"reason":"too_long","room":"lobby","user_id":"ana"}"#
        );
        assert_eq!(
            Dropped::Muted.notice("caf\u{e9}", "say \"hi\""),
            r#"{"reason":"muted","room":"café","user_id":"say \"hi\""}"#
        );
        assert_eq!(
            Dropped::Muted.log_line("lobby", "troll42"),
            "dropped message from muted user troll42 in lobby"
        );
        assert_eq!(
            too_long.log_line("lobby", "ana"),
            "dropped message of 312 characters from ana in lobby (limit 280)"
        );
        assert_eq!(
            error_text(&Error::Denied("no grant".to_owned())),
            "denied: no grant"
        );
    }

    #[test]
    fn settings_have_defaults_and_reject_garbage() {
        let none = Settings::read(|_| None);
        assert!(none.is_ok_and(|s| s.max_length == 500 && s.muted.is_empty()));

        let set = Settings::read(|key| match key {
            "max_length" => Some("280".to_owned()),
            "muted" => Some(r#"["troll42", 7]"#.to_owned()),
            "banned_words" => Some(r#"["spam","scam"]"#.to_owned()),
            _ => None,
        });
        assert!(set.is_ok_and(|s| s.max_length == 280
            && s.muted == words(&["troll42", "7"])
            && s.banned_words == words(&["spam", "scam"])));

        assert!(Settings::read(|key| (key == "max_length").then(|| "-1".to_owned())).is_err());
        assert!(Settings::read(|key| (key == "muted").then(|| "troll42".to_owned())).is_err());
        assert!(
            Settings::read(|key| (key == "banned_words").then(|| "[null]".to_owned())).is_err()
        );
    }
}
