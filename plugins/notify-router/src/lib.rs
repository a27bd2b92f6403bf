//! `notify-router`: checks notifications and hands each one to the gateway for its kind.
//!
//! It subscribes to `notifications:*`; the kind is the part of the channel after
//! `notifications:`. A valid notification is passed, byte for byte as published, to the output
//! named like its kind (`email`, `sms` or `push`). Each payload is a JSON object whose required
//! fields must be non-empty strings (any other field is passed along untouched):
//!
//! - `notifications:email`: `to`, `subject` (e.g. `{"to":"a@example.com","subject":"Hi","body":"…"}`);
//! - `notifications:sms`: `phone`, `message`;
//! - `notifications:push`: `device_id`.
//!
//! Anything else is published on `notifications:dead` as a dead letter,
//! `{"channel": "<original channel>", "reason": "<what is wrong>", "payload": "<original payload
//! as lossy UTF-8 text>"}`, and counts as handled: a malformed notification will never get
//! better by retrying. When the gateway call itself fails (an error, or an HTTP status outside
//! 2xx), the message is dead-lettered with the reason `output KIND failed: …` *and* the error is
//! returned, so the host counts the failure. Messages on `notifications:dead` itself (which the
//! subscription also matches) are ignored, so a dead letter is never routed again.
//!
//! Settings: none. Grants needed: publish `notifications:dead`; outputs `email`, `sms`, `push`.

use serde_json::Value;
use switchyard_plugin::{Error, Level, Message, Plugin, PluginInfo};

const PREFIX: &str = "notifications:";
const DEAD_LETTERS: &str = "notifications:dead";
const DEAD_KIND: &str = "dead";

/// The outputs this plugin may call; each is also a notification kind.
const KINDS: [&str; 3] = ["email", "sms", "push"];

/// What to do with one notification, decided from its kind and payload alone.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// Pass the payload to the output named like the kind.
    Deliver,
    /// One of our own dead letters, seen again through `notifications:*`.
    Ignore,
    /// Park the message on the dead-letter channel for this reason.
    Reject(String),
}

/// The fields that must be non-empty strings in a notification of `kind`, or `None` for a kind
/// this router does not know.
fn required_fields(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "email" => Some(&["to", "subject"]),
        "sms" => Some(&["phone", "message"]),
        "push" => Some(&["device_id"]),
        _ => None,
    }
}

fn route(kind: &str, payload: &[u8]) -> Route {
    if kind == DEAD_KIND {
        return Route::Ignore;
    }
    let Some(fields) = required_fields(kind) else {
        return Route::Reject(format!("unknown notification kind \"{kind}\""));
    };
    match check_payload(payload, fields) {
        Ok(()) => Route::Deliver,
        Err(reason) => Route::Reject(reason),
    }
}

/// Checks that `payload` is a JSON object whose `fields` are all non-empty strings; the error is
/// the dead letter's reason.
fn check_payload(payload: &[u8], fields: &[&str]) -> Result<(), String> {
    // UTF-8 first, so the reason says "not UTF-8" rather than serde's less direct wording.
    // Reasons carry no parser details: every language's build of this router gives the same
    // dead letters for the same input.
    let text = std::str::from_utf8(payload).map_err(|_| "payload is not valid UTF-8")?;
    let value: Value = serde_json::from_str(text).map_err(|_| "payload is not valid JSON")?;
    let Value::Object(object) = value else {
        return Err("payload must be a JSON object".to_owned());
    };
    for field in fields {
        match object.get(*field) {
            None => return Err(format!("missing field \"{field}\"")),
            Some(Value::String(text)) if !text.is_empty() => {}
            Some(_) => return Err(format!("field \"{field}\" must be a non-empty string")),
        }
    }
    Ok(())
}

fn dead_letter(channel: &str, reason: &str, payload: &[u8]) -> Vec<u8> {
    serde_json::json!({
        "channel": channel,
        "reason": reason,
        "payload": String::from_utf8_lossy(payload),
    })
    .to_string()
    .into_bytes()
}

/// The explanation an error carries, for a dead letter's reason.
fn error_text(error: &Error) -> &str {
    match error {
        Error::Denied(text)
        | Error::Invalid(text)
        | Error::Unavailable(text)
        | Error::Failed(text) => text,
    }
}

/// Calls the gateway for `kind`. A webhook that answers with a non-2xx status did not take the
/// notification, so that counts as a failure too; status 0 means the output has no status.
fn deliver(kind: &str, payload: &[u8]) -> Result<(), Error> {
    let reply = switchyard_plugin::call_output(kind, payload)?;
    match reply.status {
        0 | 200..=299 => Ok(()),
        // These may well succeed later: let the host treat them as transient.
        status @ (408 | 429 | 500..=599) => Err(Error::Unavailable(format!(
            "gateway answered HTTP status {status}"
        ))),
        status => Err(Error::Failed(format!(
            "gateway answered HTTP status {status}"
        ))),
    }
}

fn reject(message: &Message, reason: &str) -> Result<(), Error> {
    switchyard_plugin::log(
        Level::Info,
        &format!("dead-lettering message on {}: {reason}", message.channel),
    );
    switchyard_plugin::publish(
        DEAD_LETTERS,
        &dead_letter(&message.channel, reason, &message.payload),
    )?;
    Ok(())
}

#[derive(Default)]
struct NotifyRouter;

impl Plugin for NotifyRouter {
    fn describe(&self) -> PluginInfo {
        let mut info = PluginInfo::new("notify-router", env!("CARGO_PKG_VERSION"))
            .pattern(format!("{PREFIX}*"))
            .publishes(DEAD_LETTERS);
        for kind in KINDS {
            info = info.calls(kind);
        }
        info
    }

    fn handle(&mut self, message: Message) -> Result<(), Error> {
        let kind = message.channel_suffix(PREFIX).ok_or_else(|| {
            Error::Invalid(format!("{} is not a {PREFIX} channel", message.channel))
        })?;
        match route(kind, &message.payload) {
            Route::Ignore => Ok(()),
            Route::Reject(reason) => reject(&message, &reason),
            Route::Deliver => deliver(kind, &message.payload).or_else(|error| {
                reject(
                    &message,
                    &format!("output {kind} failed: {}", error_text(&error)),
                )?;
                Err(error)
            }),
        }
    }
}

switchyard_plugin::export!(NotifyRouter);

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(kind: &str, payload: &str) -> String {
        match route(kind, payload.as_bytes()) {
            Route::Reject(reason) => reason,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn valid_notifications_are_delivered() {
        let cases = [
            (
                "email",
                r#"{"to":"a@example.com","subject":"Hi","body":"hello"}"#,
            ),
            ("sms", r#"{"phone":"+15550100","message":"hi"}"#),
            ("push", r#"{"device_id":"d1","extra":[1,2]}"#),
        ];
        for (kind, payload) in cases {
            assert_eq!(route(kind, payload.as_bytes()), Route::Deliver, "{kind}");
        }
    }

    #[test]
    fn dead_letters_are_ignored_whatever_they_hold() {
        assert_eq!(route("dead", b"\xff not json"), Route::Ignore);
    }

    #[test]
    fn unknown_kinds_are_named() {
        assert_eq!(reason("fax", "{}"), r#"unknown notification kind "fax""#);
        assert_eq!(reason("", "{}"), r#"unknown notification kind """#);
        assert_eq!(
            reason("email:x", "{}"),
            r#"unknown notification kind "email:x""#
        );
    }

    #[test]
    fn reasons_name_the_problem() {
        assert_eq!(reason("email", "{"), "payload is not valid JSON");
        assert_eq!(reason("email", "[1]"), "payload must be a JSON object");
        assert_eq!(reason("email", "\"x\""), "payload must be a JSON object");
        assert_eq!(
            reason("email", r#"{"to":"a"}"#),
            r#"missing field "subject""#
        );
        assert_eq!(
            reason("email", r#"{"to":"","subject":"s"}"#),
            r#"field "to" must be a non-empty string"#
        );
        assert_eq!(
            reason("sms", r#"{"phone":5550100,"message":"m"}"#),
            r#"field "phone" must be a non-empty string"#
        );
        assert_eq!(
            reason("push", r#"{"device_id":null}"#),
            r#"field "device_id" must be a non-empty string"#
        );
        match route("push", b"{\"device_id\":\"\xff\"}") {
            Route::Reject(reason) => assert_eq!(reason, "payload is not valid UTF-8"),
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn dead_letter_keeps_the_original_as_text() {
        let letter: Value =
            serde_json::from_slice(&dead_letter("notifications:fax", "why", b"a\xffb"))
                .unwrap_or_default();
        assert_eq!(
            letter,
            serde_json::json!({
                "channel": "notifications:fax",
                "reason": "why",
                "payload": "a\u{FFFD}b",
            })
        );
    }
}
