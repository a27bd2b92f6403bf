//! `cache-invalidator`: turns domain events, or writes to keys, into cache invalidations.
//!
//! Two modes, told apart by the message's subscription:
//!
//! - **Events** (`events:*`): every event names the entity that changed; the plugin derives
//!   its cache key and asks the host to invalidate it (plus any extra keys the event lists) in
//!   one `invalidate` call.
//! - **Keyspace** (a manifest's `[subscriptions] keys`, such as `db:user:*`): Redis itself
//!   says a key changed (`hset`, `set`, `del`, `expired`, ...); the message's channel is the
//!   key, and the setting `key_map` maps it to the cache key to invalidate (`db:user:42` to
//!   `cache:user:42`). No application publishes anything.
//!
//! Either way the host deletes the keys and, when it has an invalidation broadcast channel,
//! tells every application instance to drop its local copy.
//!
//! Settings:
//! - `prefix` (default `cache`; an empty value means the default): the first segment of every
//!   key derived from an event. `describe` asks for the grant `<prefix>:*`.
//! - `key_map` (keyspace mode only), a table from source key prefixes to cache key prefixes:
//!   `{ "db:" = "cache:" }`. `describe` also asks for `<cache prefix>*` for each.
//!
//! Event payload, a JSON object (other fields are ignored):
//!
//! ```json
//! {"entity": "user", "id": 42, "keys": ["cache:users:list"]}
//! ```
//!
//! - `entity`: a non-empty string;
//! - `id`: a non-empty string or an integer (written in decimal);
//! - `keys` (optional, `null` counts as absent): an array of non-empty strings, used verbatim.
//!
//! Keys invalidated: `<prefix>:<entity>:<id>` first, then `keys` in order, duplicates dropped.
//! A malformed event fails with `invalid` naming the field; nothing is invalidated then. A key
//! event for a key no `key_map` prefix starts fails with `invalid` naming the setting.

use std::collections::HashSet;

use serde_json::Value;
use switchyard_plugin::{Error, Level, Message, Plugin, PluginInfo, Subscription};

mod key_map;

use key_map::KeyMap;

const DEFAULT_PREFIX: &str = "cache";

#[derive(Default)]
struct CacheInvalidator;

fn prefix() -> String {
    switchyard_plugin::config("prefix")
        .filter(|prefix| !prefix.is_empty())
        .unwrap_or_else(|| DEFAULT_PREFIX.to_owned())
}

/// The setting `key_map`, read and checked.
fn key_map() -> Result<KeyMap, String> {
    match switchyard_plugin::config(key_map::SETTING) {
        Some(setting) => KeyMap::parse(&setting),
        None => Err(format!(
            "key events need the setting `{}` (such as {{ \"db:\" = \"cache:\" }} under \
             [config] in the manifest)",
            key_map::SETTING
        )),
    }
}

/// Whether a message is a key event: delivered through a key subscription, rather than
/// published by an application.
fn is_key_event(message: &Message) -> bool {
    matches!(&message.subscription, Subscription::Keys(_))
}

/// The cache key a key event invalidates: `key` mapped by `map`; the error names the setting.
fn key_event_target(map: &KeyMap, key: &str) -> Result<String, String> {
    map.map(key).ok_or_else(|| {
        format!(
            "key {key:?} starts with no source prefix of setting `{}` ({})",
            key_map::SETTING,
            map.sources()
        )
    })
}

/// What one event asks to invalidate.
#[derive(Debug, PartialEq)]
struct Invalidation {
    entity: String,
    id: String,
    /// The derived key first, then the event's extra keys; no duplicates.
    keys: Vec<String>,
}

/// JSON type names for error messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads an event and derives the keys it invalidates; the error says which field is wrong.
fn parse_event(payload: &[u8], prefix: &str) -> Result<Invalidation, String> {
    let event: Value =
        serde_json::from_slice(payload).map_err(|e| format!("payload is not JSON: {e}"))?;
    let Value::Object(event) = event else {
        return Err(format!(
            "payload must be a JSON object, got {}",
            kind(&event)
        ));
    };

    let entity = match event.get("entity") {
        None => return Err("field `entity` is missing".to_owned()),
        Some(Value::String(entity)) if entity.is_empty() => {
            return Err("field `entity` must not be empty".to_owned());
        }
        Some(Value::String(entity)) => entity.clone(),
        Some(other) => {
            return Err(format!(
                "field `entity` must be a string, got {}",
                kind(other)
            ));
        }
    };

    let id = match event.get("id") {
        None => return Err("field `id` is missing".to_owned()),
        Some(Value::String(id)) if id.is_empty() => {
            return Err("field `id` must not be empty".to_owned());
        }
        Some(Value::String(id)) => id.clone(),
        // Only exact integers: `42.0` or `4.2` would give keys no application writes.
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
        Some(other) => {
            return Err(format!(
                "field `id` must be a string or an integer, got {other}"
            ));
        }
    };

    let extra: &[Value] = match event.get("keys") {
        None | Some(Value::Null) => &[],
        Some(Value::Array(keys)) => keys,
        Some(other) => {
            return Err(format!(
                "field `keys` must be an array of strings, got {}",
                kind(other)
            ));
        }
    };

    let mut keys = Vec::with_capacity(1 + extra.len());
    keys.push(format!("{prefix}:{entity}:{id}"));
    let mut seen: HashSet<&str> = HashSet::with_capacity(extra.len());
    for (index, key) in extra.iter().enumerate() {
        match key {
            // An empty key is never a cache entry; it is a bug in the producer.
            Value::String(key) if key.is_empty() => {
                return Err(format!("field `keys`: element {index} is an empty string"));
            }
            Value::String(key) => {
                if key != &keys[0] && seen.insert(key) {
                    keys.push(key.clone());
                }
            }
            other => {
                return Err(format!(
                    "field `keys`: element {index} must be a string, got {}",
                    kind(other)
                ));
            }
        }
    }

    Ok(Invalidation { entity, id, keys })
}

/// Escapes Redis glob metacharacters, so a prefix such as `c*` asks for no more than itself.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

impl CacheInvalidator {
    /// Events mode: a domain event names what changed.
    fn handle_event(&mut self, message: &Message) -> Result<(), Error> {
        let invalidation = parse_event(&message.payload, &prefix()).map_err(Error::Invalid)?;
        let existed = switchyard_plugin::invalidate(&invalidation.keys)?;
        switchyard_plugin::log(
            Level::Debug,
            &format!(
                "invalidated {existed} of {} keys for {} {}",
                invalidation.keys.len(),
                invalidation.entity,
                invalidation.id
            ),
        );
        Ok(())
    }

    /// Keyspace mode: the channel is the key that changed, the payload the event.
    fn handle_key_event(&mut self, message: &Message) -> Result<(), Error> {
        let map = key_map().map_err(Error::Invalid)?;
        let key = key_event_target(&map, &message.channel).map_err(Error::Invalid)?;
        let existed = switchyard_plugin::invalidate(std::slice::from_ref(&key))?;
        switchyard_plugin::log(
            Level::Debug,
            &format!(
                "invalidated {existed} of 1 keys for {} of {}",
                String::from_utf8_lossy(&message.payload),
                message.channel
            ),
        );
        Ok(())
    }
}

impl Plugin for CacheInvalidator {
    fn describe(&self) -> PluginInfo {
        let mut info = PluginInfo::new("cache-invalidator", env!("CARGO_PKG_VERSION"))
            .pattern("events:*")
            .invalidates(format!("{}:*", glob_escape(&prefix())));
        // Key subscriptions come from the manifest alone; what they invalidate is asked for
        // here, so that a host trusting `describe` grants it. A malformed `key_map` asks for
        // nothing: the first key event says what is wrong with it.
        if let Ok(map) = key_map() {
            for cache in map.cache_prefixes() {
                let grant = format!("{}*", glob_escape(cache));
                if !info.capabilities.invalidate.contains(&grant) {
                    info = info.invalidates(grant);
                }
            }
        }
        info
    }

    fn handle(&mut self, message: Message) -> Result<(), Error> {
        if is_key_event(&message) {
            self.handle_key_event(&message)
        } else {
            self.handle_event(&message)
        }
    }
}

switchyard_plugin::export!(CacheInvalidator);

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(payload: &str) -> Vec<String> {
        parse_event(payload.as_bytes(), "cache").unwrap().keys
    }

    fn error(payload: &str) -> String {
        parse_event(payload.as_bytes(), "cache").unwrap_err()
    }

    #[test]
    fn derives_the_key_from_entity_and_id() {
        assert_eq!(keys(r#"{"entity":"user","id":42}"#), ["cache:user:42"]);
        assert_eq!(keys(r#"{"entity":"user","id":"ana"}"#), ["cache:user:ana"]);
        assert_eq!(keys(r#"{"entity":"user","id":-7}"#), ["cache:user:-7"]);
        assert_eq!(
            keys(r#"{"entity":"user","id":18446744073709551615}"#),
            ["cache:user:18446744073709551615"]
        );
        let custom = parse_event(br#"{"entity":"user","id":1}"#, "app").unwrap();
        assert_eq!(custom.keys, ["app:user:1"]);
        assert_eq!((custom.entity.as_str(), custom.id.as_str()), ("user", "1"));
    }

    #[test]
    fn appends_extra_keys_in_order_without_duplicates() {
        assert_eq!(
            keys(r#"{"entity":"user","id":42,"keys":["b","a","b","cache:user:42","a","c"]}"#),
            ["cache:user:42", "b", "a", "c"]
        );
        assert_eq!(
            keys(r#"{"entity":"user","id":42,"keys":null}"#),
            ["cache:user:42"]
        );
        assert_eq!(
            keys(r#"{"entity":"user","id":42,"keys":[]}"#),
            ["cache:user:42"]
        );
    }

    #[test]
    fn rejects_malformed_events_naming_the_field() {
        assert!(error("not json").starts_with("payload is not JSON"));
        let not_utf8 = parse_event(b"\xff", "cache").unwrap_err();
        assert!(not_utf8.starts_with("payload is not JSON"));
        assert_eq!(error("[1]"), "payload must be a JSON object, got an array");
        assert_eq!(error(r#"{"id":1}"#), "field `entity` is missing");
        assert_eq!(
            error(r#"{"entity":"","id":1}"#),
            "field `entity` must not be empty"
        );
        assert_eq!(
            error(r#"{"entity":3,"id":1}"#),
            "field `entity` must be a string, got a number"
        );
        assert_eq!(error(r#"{"entity":"user"}"#), "field `id` is missing");
        assert_eq!(
            error(r#"{"entity":"user","id":""}"#),
            "field `id` must not be empty"
        );
        assert_eq!(
            error(r#"{"entity":"user","id":4.5}"#),
            "field `id` must be a string or an integer, got 4.5"
        );
        assert_eq!(
            error(r#"{"entity":"user","id":null}"#),
            "field `id` must be a string or an integer, got null"
        );
        assert_eq!(
            error(r#"{"entity":"user","id":1,"keys":"k"}"#),
            "field `keys` must be an array of strings, got a string"
        );
        assert_eq!(
            error(r#"{"entity":"user","id":1,"keys":["k",2]}"#),
            "field `keys`: element 1 must be a string, got a number"
        );
        assert_eq!(
            error(r#"{"entity":"user","id":1,"keys":[""]}"#),
            "field `keys`: element 0 is an empty string"
        );
    }

    fn message(channel: &str, subscription: Subscription, payload: &str) -> Message {
        Message {
            channel: channel.to_owned(),
            subscription,
            payload: payload.as_bytes().to_vec(),
            received_at: 0,
            entry_id: None,
            fields: Vec::new(),
            trace: None,
        }
    }

    #[test]
    fn key_events_are_told_apart_by_their_subscription() {
        let keys = Subscription::Keys(switchyard_plugin::KeySubscription {
            keys: "db:user:*".to_owned(),
            events: Vec::new(),
            database: Some(0),
        });
        assert!(is_key_event(&message("db:user:42", keys, "hset")));
        // A pattern on the keyspace channels is an ordinary subscription.
        let raw = Subscription::Pattern("__keyspace@0__:db:user:*".to_owned());
        assert!(!is_key_event(&message(
            "__keyspace@0__:db:user:42",
            raw,
            "hset"
        )));
        let events = Subscription::Pattern("events:*".to_owned());
        assert!(!is_key_event(&message("events:user.updated", events, "{}")));
        // A channel that looks like a key is not enough: only the subscription counts.
        let channel = Subscription::Channel("__keyspace@0__:db:user:42".to_owned());
        assert!(!is_key_event(&message(
            "__keyspace@0__:db:user:42",
            channel,
            "set"
        )));
    }

    #[test]
    fn a_key_event_invalidates_the_mapped_key_or_names_the_setting() {
        let map = KeyMap::parse(r#"{"db:":"cache:"}"#).unwrap();
        assert_eq!(
            key_event_target(&map, "db:user:42").as_deref(),
            Ok("cache:user:42")
        );
        assert_eq!(
            key_event_target(&map, "session:9"),
            Err(
                r#"key "session:9" starts with no source prefix of setting `key_map` ("db:")"#
                    .to_owned()
            )
        );
    }

    #[test]
    fn escapes_glob_characters_in_the_prefix() {
        assert_eq!(glob_escape("cache"), "cache");
        assert_eq!(glob_escape(r"c*[x]?\"), r"c\*\[x\]\?\\");
    }
}
