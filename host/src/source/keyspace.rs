//! Whether Redis publishes what key subscriptions need.
//!
//! Keyspace notifications are off unless `notify-keyspace-events` turns them on, and a
//! subscription to them then simply receives nothing. So that this never goes unexplained,
//! the Redis source reads the setting whenever the host has key subscriptions: on every
//! (re)connection (a restarted server may have lost a setting made with `CONFIG SET`) and on
//! every change of subscriptions; and while flags are missing, every
//! [`KEYSPACE_RECHECK`](super::redis::KEYSPACE_RECHECK), so that an operator's fix is seen.
//! Flags that are missing are logged one by one and make the host not ready
//! ([`crate::source::SourceStatus::keyspace_events`]), unless `redis.set_keyspace_events` lets
//! the host add them itself.
//!
//! A server that refuses `CONFIG` (managed services often rename or forbid it) cannot be
//! checked: the host says so in its log and stays ready, since it cannot know.

use std::collections::HashMap;

use redis::aio::MultiplexedConnection;

use crate::keyspace::{CONFIG_KEY, Flags, MissingFlags, with_flags};

/// Reads `notify-keyspace-events` on `connection` and compares it with `needed`; adds the
/// missing flags when `set` allows it. Returns what is still missing, if anything, for the
/// caller to report (and log when it changes).
pub(super) async fn check(
    connection: &mut MultiplexedConnection,
    needed: Flags,
    set: bool,
) -> Option<MissingFlags> {
    if needed.is_empty() {
        return None;
    }
    let configured: redis::RedisResult<HashMap<String, String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg(CONFIG_KEY)
        .query_async(connection)
        .await;
    let configured = match configured {
        Ok(mut reply) => reply.remove(CONFIG_KEY).unwrap_or_default(),
        Err(error) => {
            tracing::warn!(
                needed = %needed,
                "cannot read {CONFIG_KEY} ({error}): key subscriptions receive nothing unless \
                 it includes {needed}"
            );
            return None;
        }
    };
    let missing = MissingFlags::check(&configured, needed)?;
    if !set {
        return Some(missing);
    }
    let value = with_flags(&configured, needed.missing_from(Flags::parse(&configured)));
    let result: redis::RedisResult<()> = redis::cmd("CONFIG")
        .arg("SET")
        .arg(CONFIG_KEY)
        .arg(&value)
        .query_async(connection)
        .await;
    match result {
        Ok(()) => {
            tracing::info!(
                was = %configured,
                now = %value,
                added = %missing.missing.concat(),
                "turned on the keyspace notifications key subscriptions need: \
                 CONFIG SET {CONFIG_KEY} {value} (redis.set_keyspace_events = true)"
            );
            None
        }
        Err(error) => {
            let reason = format!(
                "redis.set_keyspace_events is on, but CONFIG SET {CONFIG_KEY} {value} failed: \
                 {error}; {}",
                missing.reason
            );
            Some(MissingFlags { reason, ..missing })
        }
    }
}
