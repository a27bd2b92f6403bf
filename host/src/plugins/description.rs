//! `describe`'s answer, checked and converted into a [`Description`]: the plugin's own
//! subscriptions (channels, patterns, sharded channels, streams, keys and tracked prefixes),
//! or those of its manifest, which replace them.

use bytes::Bytes;

use super::loader::LoadError;
use super::manifest::SubscriptionsOverride;
use crate::config::GrantsConfig;
use crate::message::{Subscription, is_reserved};
use crate::worker::bindings::switchyard::plugin::types;
use crate::worker::version::Description;

/// Checks and converts `describe`'s answer; the manifest's subscriptions, if any, replace
/// the plugin's own, key and tracking subscriptions included. Key subscriptions are in
/// `database` unless they name one.
pub(super) fn from_wit(
    info: types::PluginInfo,
    overridden: Option<&SubscriptionsOverride>,
    database: u32,
) -> Result<Description, LoadError> {
    let mut problems = Vec::new();
    // Checked with the rest of the manifest before compiling: an error here is unlikely.
    let mut keys = match overridden.map(|o| o.key_subscriptions(database)) {
        None => Vec::new(),
        Some(Ok(keys)) => keys,
        Some(Err(wrong)) => {
            problems.extend(wrong.into_iter().map(|(_, problem)| problem));
            Vec::new()
        }
    };
    let mut tracking: Vec<Bytes> = overridden
        .map(|o| o.tracking.iter().map(|p| Bytes::from(p.clone())).collect())
        .unwrap_or_default();
    if info.name.trim().is_empty() {
        problems.push("name is empty".to_owned());
    }
    let subscriptions: Vec<Subscription> = match overridden {
        Some(o) => {
            let names = |list: &[String], kind: fn(Bytes) -> Subscription| {
                list.iter()
                    .map(move |name| kind(Bytes::from(name.clone())))
                    .collect::<Vec<_>>()
            };
            [
                names(&o.channels, Subscription::Channel),
                names(&o.patterns, Subscription::Pattern),
                names(&o.sharded, Subscription::Sharded),
                names(&o.streams, Subscription::Stream),
            ]
            .concat()
        }
        None => info
            .subscriptions
            .into_iter()
            .filter_map(|s| match s {
                types::Subscription::Channel(c) => Some(Subscription::Channel(c.into())),
                types::Subscription::Pattern(p) => Some(Subscription::Pattern(p.into())),
                types::Subscription::Sharded(c) => Some(Subscription::Sharded(c.into())),
                types::Subscription::Stream(k) => Some(Subscription::Stream(k.into())),
                types::Subscription::Keys(wanted) => {
                    match described_keys(wanted, database) {
                        Ok(subscription) => keys.push(subscription),
                        Err(problem) => problems.push(problem),
                    }
                    None
                }
                types::Subscription::Tracking(prefix) => {
                    tracking.push(prefix.into());
                    None
                }
            })
            .collect(),
    };
    for subscription in &subscriptions {
        let name = subscription.name();
        if name.is_empty() {
            problems.push(format!("empty {} subscription", subscription.kind()));
        } else if is_reserved(name) {
            problems.push(format!(
                "{subscription} is in the host's reserved namespace"
            ));
        }
    }
    if problems.is_empty() {
        let capabilities = info.capabilities;
        Ok(Description {
            name: info.name,
            version: info.version,
            subscriptions,
            keys,
            tracking,
            requested: GrantsConfig {
                publish: capabilities.publish,
                invalidate: capabilities.invalidate,
                outputs: capabilities.outputs,
            },
        })
    } else {
        Err(LoadError::Invalid(problems.join("; ")))
    }
}

/// A key subscription `describe` listed, checked: a pattern, known events (none: every
/// event), in `database` unless it names one.
fn described_keys(
    wanted: types::KeySubscription,
    database: u32,
) -> Result<crate::keyspace::KeySubscription, String> {
    use crate::keyspace::{Events, KeySubscription};
    if wanted.keys.is_empty() {
        return Err("keys subscription: an empty pattern matches no key".to_owned());
    }
    let events = if wanted.events.is_empty() {
        Events::all()
    } else {
        Events::only(&wanted.events)
            .map_err(|problem| format!("keys subscription {:?}: events: {problem}", wanted.keys))?
    };
    Ok(KeySubscription {
        database: wanted.database.unwrap_or(database),
        keys: wanted.keys.into(),
        events,
    })
}
