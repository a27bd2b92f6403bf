//! Key subscriptions: reacting to changes of keys through Redis's keyspace notifications.
//!
//! A plugin whose manifest lists `[subscriptions] keys = ["user:*"]` hears of every change to a
//! matching key: the host subscribes `PSUBSCRIBE __keyspace@DB__:user:*`, and Redis publishes
//! there, for each write, the name of the event (`set`, `hset`, `del`, `expired`, ...) with
//! the key in the channel name. The plugin gets a message whose channel is the key (the
//! `__keyspace@DB__:` prefix removed) and whose payload is the event name; events it did not
//! list are dropped by the host, without calling it. In the Switchyard world the message's
//! `subscription` is `keys(...)` (WIT 0.6.0; a plugin built for an earlier version gets
//! `pattern("__keyspace@DB__:user:*")`, the pattern on the wire). A plugin of 0.6.0 may also
//! ask for keys in `describe`.
//!
//! Redis publishes these notifications only for the classes of events turned on in its
//! `notify-keyspace-events` setting, which is empty (everything off) by default. [`Flags`]
//! is that setting, and [`Events::flags`] says which flags a subscription needs: `K` (the
//! `__keyspace@` channels) and one class flag per kind of event.
//!
//! The ground floor: this module knows Redis's words and imports no stage.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

/// The start of every keyspace channel: `__keyspace@DB__:KEY`.
pub const CHANNEL_PREFIX: &str = "__keyspace@";

/// The Redis setting that turns keyspace notifications on.
pub const CONFIG_KEY: &str = "notify-keyspace-events";

/// A set of `notify-keyspace-events` flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flags(u16);

impl Flags {
    /// No flag: notifications off.
    pub const NONE: Flags = Flags(0);
    /// `K`: keyspace notifications, on `__keyspace@DB__:KEY` channels (the ones the host
    /// subscribes).
    pub const KEYSPACE: Flags = Flags(1);
    /// `E`: keyevent notifications, on `__keyevent@DB__:EVENT` channels (not used by the host).
    pub const KEYEVENT: Flags = Flags(1 << 1);
    /// `g`: generic commands (`del`, `expire`, `rename_from`, ...).
    pub const GENERIC: Flags = Flags(1 << 2);
    /// `$`: string commands (`set`, `incrby`, ...).
    pub const STRING: Flags = Flags(1 << 3);
    /// `l`: list commands.
    pub const LIST: Flags = Flags(1 << 4);
    /// `s`: set commands.
    pub const SET: Flags = Flags(1 << 5);
    /// `h`: hash commands.
    pub const HASH: Flags = Flags(1 << 6);
    /// `z`: sorted set commands.
    pub const ZSET: Flags = Flags(1 << 7);
    /// `x`: keys expiring.
    pub const EXPIRED: Flags = Flags(1 << 8);
    /// `e`: keys evicted for `maxmemory`.
    pub const EVICTED: Flags = Flags(1 << 9);
    /// `t`: stream commands.
    pub const STREAM: Flags = Flags(1 << 10);
    /// `m`: reads of keys that do not exist.
    pub const KEY_MISS: Flags = Flags(1 << 11);
    /// `n`: keys created.
    pub const NEW: Flags = Flags(1 << 12);
    /// `d`: events of modules.
    pub const MODULE: Flags = Flags(1 << 13);
    /// `A`: Redis's alias for `g$lshzxet`, every class but key misses, new keys and modules.
    pub const ALL: Flags = Flags(
        Self::GENERIC.0
            | Self::STRING.0
            | Self::LIST.0
            | Self::SET.0
            | Self::HASH.0
            | Self::ZSET.0
            | Self::EXPIRED.0
            | Self::EVICTED.0
            | Self::STREAM.0,
    );

    /// Each flag with its letter, in the order [`Flags`] displays them.
    const LETTERS: [(char, Flags); 14] = [
        ('K', Self::KEYSPACE),
        ('E', Self::KEYEVENT),
        ('g', Self::GENERIC),
        ('$', Self::STRING),
        ('l', Self::LIST),
        ('s', Self::SET),
        ('h', Self::HASH),
        ('z', Self::ZSET),
        ('x', Self::EXPIRED),
        ('e', Self::EVICTED),
        ('t', Self::STREAM),
        ('m', Self::KEY_MISS),
        ('n', Self::NEW),
        ('d', Self::MODULE),
    ];

    /// The flags of a `notify-keyspace-events` value as Redis reports it (`CONFIG GET`), with
    /// `A` expanded. Letters this host does not know are ignored: they stand for classes no
    /// key subscription asks for.
    pub fn parse(setting: &str) -> Flags {
        setting.chars().fold(Flags::NONE, |flags, letter| {
            if letter == 'A' {
                return flags | Flags::ALL;
            }
            Self::LETTERS
                .iter()
                .find(|(l, _)| *l == letter)
                .map_or(flags, |&(_, flag)| flags | flag)
        })
    }

    /// Whether every flag of `other` is set here.
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// The flags of `self` that `have` lacks.
    pub fn missing_from(self, have: Flags) -> Flags {
        Flags(self.0 & !have.0)
    }

    /// Whether no flag is set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The letters, one by one (`["K", "$", "x"]`), for messages that list them.
    pub fn letters(self) -> Vec<String> {
        Self::LETTERS
            .iter()
            .filter(|(_, flag)| self.contains(*flag))
            .map(|(letter, _)| letter.to_string())
            .collect()
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;

    fn bitor(self, other: Flags) -> Flags {
        Flags(self.0 | other.0)
    }
}

impl std::ops::BitOrAssign for Flags {
    fn bitor_assign(&mut self, other: Flags) {
        self.0 |= other.0;
    }
}

impl fmt::Display for Flags {
    /// The letters as `notify-keyspace-events` takes them, `K` first (`Kg$hx`); every class
    /// is spelt out, never abbreviated to `A`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (letter, flag) in Self::LETTERS {
            if self.contains(flag) {
                write!(f, "{letter}")?;
            }
        }
        Ok(())
    }
}

/// The events Redis 7 and 8 publish, by the flag that turns each on. Modules' own events
/// (`d`) are not listed: their names are the modules' to choose.
const EVENTS: &[(Flags, &[&str])] = &[
    (
        Flags::GENERIC,
        &[
            "del",
            "expire",
            "persist",
            "rename_from",
            "rename_to",
            "move_from",
            "move_to",
            "copy_to",
            "restore",
        ],
    ),
    (
        Flags::STRING,
        &["set", "setrange", "incrby", "incrbyfloat", "append"],
    ),
    (
        Flags::LIST,
        &[
            "lpush",
            "rpush",
            "lpop",
            "rpop",
            "linsert",
            "lset",
            "lrem",
            "ltrim",
            "sortstore",
        ],
    ),
    (
        Flags::SET,
        &[
            "sadd",
            "srem",
            "spop",
            "sinterstore",
            "sunionstore",
            "sdiffstore",
        ],
    ),
    (
        Flags::HASH,
        &[
            "hset",
            "hdel",
            "hincrby",
            "hincrbyfloat",
            "hexpire",
            "hpersist",
            "hexpired",
        ],
    ),
    (
        Flags::ZSET,
        &[
            "zadd",
            "zincr",
            "zrem",
            "zremrangebyscore",
            "zremrangebyrank",
            "zremrangebylex",
            "zunionstore",
            "zinterstore",
            "zdiffstore",
            "zrangestore",
            "zpopmin",
            "zpopmax",
        ],
    ),
    (Flags::EXPIRED, &["expired"]),
    (Flags::EVICTED, &["evicted"]),
    (
        Flags::STREAM,
        &[
            "xadd",
            "xtrim",
            "xdel",
            "xsetid",
            "xgroup-create",
            "xgroup-createconsumer",
            "xgroup-delconsumer",
            "xgroup-destroy",
            "xgroup-setid",
        ],
    ),
    (Flags::KEY_MISS, &["keymiss"]),
    (Flags::NEW, &["new"]),
];

/// The flag that turns `event` on, if it is one Redis publishes.
pub fn class_of(event: &str) -> Option<Flags> {
    EVENTS
        .iter()
        .find(|(_, names)| names.contains(&event))
        .map(|&(flag, _)| flag)
}

/// Which events of a key subscription reach the plugin.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Events(Option<Arc<[Bytes]>>);

impl Events {
    /// Every event of the classes of `A` (and any other Redis publishes to the subscription's
    /// channels, such as `new` or `keymiss` when the server has them on).
    pub fn all() -> Self {
        Self(None)
    }

    /// Only the events named; an error names each that Redis does not publish.
    pub fn only<S: AsRef<str>>(names: &[S]) -> Result<Self, String> {
        let unknown: Vec<&str> = names
            .iter()
            .map(AsRef::as_ref)
            .filter(|name| class_of(name).is_none())
            .collect();
        if !unknown.is_empty() {
            return Err(format!(
                "{} {} not {} Redis publishes (the names are lower case: set, hset, del, \
                 expire, expired, evicted, lpush, sadd, zadd, xadd, ...)",
                unknown
                    .iter()
                    .map(|name| format!("{name:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                if unknown.len() == 1 { "is" } else { "are" },
                if unknown.len() == 1 {
                    "an event"
                } else {
                    "events"
                },
            ));
        }
        if names.is_empty() {
            return Err("an empty list delivers nothing (leave it out for every event)".into());
        }
        let mut names: Vec<Bytes> = names
            .iter()
            .map(|name| Bytes::copy_from_slice(name.as_ref().as_bytes()))
            .collect();
        names.sort();
        names.dedup();
        Ok(Self(Some(names.into())))
    }

    /// Whether `event` (a keyspace notification's payload) is one of these.
    pub fn admits(&self, event: &[u8]) -> bool {
        match &self.0 {
            None => true,
            Some(names) => names.iter().any(|name| name.as_ref() == event),
        }
    }

    /// The `notify-keyspace-events` flags Redis needs to publish these events on keyspace
    /// channels: `K`, and the class of each event (`A`'s classes for every event).
    pub fn flags(&self) -> Flags {
        match &self.0 {
            None => Flags::KEYSPACE | Flags::ALL,
            Some(names) => names
                .iter()
                .filter_map(|name| class_of(std::str::from_utf8(name).ok()?))
                .fold(Flags::KEYSPACE, |flags, class| flags | class),
        }
    }

    /// The events listed, or `None` for every event.
    pub fn names(&self) -> Option<Vec<String>> {
        self.0.as_ref().map(|names| {
            names
                .iter()
                .map(|name| String::from_utf8_lossy(name).into_owned())
                .collect()
        })
    }
}

/// One key subscription: the keys of one database matching a Redis glob pattern, and the
/// events of theirs a plugin wants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySubscription {
    /// The database number (`SELECT`), part of the channel name.
    pub database: u32,
    /// A Redis glob pattern of key names.
    pub keys: Bytes,
    /// Which events reach the plugin.
    pub events: Events,
}

impl KeySubscription {
    /// The channel prefix of the database's notifications: `__keyspace@DB__:`.
    pub fn prefix(database: u32) -> String {
        format!("{CHANNEL_PREFIX}{database}__:")
    }

    /// The pattern the host subscribes: `__keyspace@DB__:KEYS`. A glob that matches exactly
    /// the channels of the keys `keys` matches, since the prefix has no special characters.
    pub fn pattern(&self) -> Bytes {
        let mut pattern = Self::prefix(self.database).into_bytes();
        pattern.extend_from_slice(&self.keys);
        pattern.into()
    }

    /// The length of [`KeySubscription::prefix`]: what to cut from a channel to get the key.
    pub fn prefix_len(&self) -> usize {
        Self::prefix(self.database).len()
    }
}

impl fmt::Display for KeySubscription {
    /// `keys user:* in database 0 (set, del)`, or `(every event)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "keys {} in database {} ({})",
            String::from_utf8_lossy(&self.keys),
            self.database,
            self.events
                .names()
                .map_or_else(|| "every event".to_owned(), |names| names.join(", "))
        )
    }
}

/// What `notify-keyspace-events` lacks for the host's key subscriptions, found when the host
/// read it: readiness is false while this stands.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MissingFlags {
    /// The value Redis reported.
    pub configured: String,
    /// The flags the key subscriptions need.
    pub needed: String,
    /// The flags among those that are not set, one letter each.
    pub missing: Vec<String>,
    /// The whole story, for operators: what is missing and how to fix it.
    pub reason: String,
}

impl MissingFlags {
    /// What `needed` lacks in `configured`, or `None` when nothing is missing.
    pub fn check(configured: &str, needed: Flags) -> Option<Self> {
        let missing = needed.missing_from(Flags::parse(configured));
        if missing.is_empty() {
            return None;
        }
        let letters = missing.letters();
        Some(Self {
            configured: configured.to_owned(),
            needed: needed.to_string(),
            reason: format!(
                "key subscriptions need Redis's {CONFIG_KEY} to include {needed}, but it is \
                 {configured:?}: flag{} {} missing; add {} with `CONFIG SET {CONFIG_KEY} {}` \
                 (and in redis.conf), or set redis.set_keyspace_events = true to let the host \
                 add them",
                if letters.len() == 1 { "" } else { "s" },
                letters.join(", "),
                if letters.len() == 1 { "it" } else { "them" },
                with_flags(configured, missing),
            ),
            missing: letters,
        })
    }
}

/// `configured` with `missing` added: what to set `notify-keyspace-events` to. The
/// configured letters are kept as Redis gave them, so that none it knows and this host does
/// not is lost.
pub fn with_flags(configured: &str, missing: Flags) -> String {
    format!("{configured}{missing}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_is_every_class_but_misses_new_keys_and_modules() {
        assert_eq!(Flags::parse("A").to_string(), "g$lshzxet");
        assert_eq!(Flags::parse("AKE").to_string(), "KEg$lshzxet");
        assert!(!Flags::parse("A").contains(Flags::KEY_MISS));
        assert!(!Flags::parse("A").contains(Flags::NEW));
        assert_eq!(Flags::parse(""), Flags::NONE);
        // Letters this host does not know are no error.
        assert_eq!(Flags::parse("K?x"), Flags::KEYSPACE | Flags::EXPIRED);
    }

    #[test]
    fn each_event_needs_its_class_and_k() {
        let needs = |events: &[&str]| Events::only(events).unwrap().flags().to_string();
        assert_eq!(needs(&["set"]), "K$");
        assert_eq!(needs(&["hset", "hdel"]), "Kh");
        assert_eq!(needs(&["del", "expire", "rename_from"]), "Kg");
        assert_eq!(needs(&["expired"]), "Kx");
        assert_eq!(needs(&["evicted"]), "Ke");
        assert_eq!(needs(&["lpush"]), "Kl");
        assert_eq!(needs(&["sadd"]), "Ks");
        assert_eq!(needs(&["zadd"]), "Kz");
        assert_eq!(needs(&["xadd"]), "Kt");
        assert_eq!(needs(&["keymiss"]), "Km");
        assert_eq!(needs(&["new"]), "Kn");
        assert_eq!(needs(&["set", "hset", "del", "expired"]), "Kg$hx");
        assert_eq!(Events::all().flags().to_string(), "Kg$lshzxet");
    }

    #[test]
    fn missing_flags_are_what_the_setting_lacks() {
        let needed = Events::only(&["set", "del", "expired"]).unwrap().flags();
        assert_eq!(MissingFlags::check("KEA", needed), None);
        assert_eq!(MissingFlags::check("AK", needed), None);
        assert_eq!(MissingFlags::check("Kg$x", needed), None);

        let off = MissingFlags::check("", needed).unwrap();
        assert_eq!(off.missing, ["K", "g", "$", "x"]);
        assert_eq!(off.needed, "Kg$x");
        assert!(
            off.reason.contains("notify-keyspace-events"),
            "{}",
            off.reason
        );
        assert!(
            off.reason.contains("flags K, g, $, x missing"),
            "{}",
            off.reason
        );
        assert!(
            off.reason.contains("redis.set_keyspace_events"),
            "{}",
            off.reason
        );

        // Keyevent notifications alone do not publish on keyspace channels.
        let keyevent = MissingFlags::check("AE", needed).unwrap();
        assert_eq!(keyevent.missing, ["K"]);
        assert!(
            keyevent.reason.contains("flag K missing"),
            "{}",
            keyevent.reason
        );
        assert!(
            keyevent
                .reason
                .contains("CONFIG SET notify-keyspace-events AEK")
        );
    }

    #[test]
    fn setting_adds_the_missing_flags_and_keeps_the_rest() {
        let needed = Events::only(&["hset"]).unwrap().flags();
        let missing = needed.missing_from(Flags::parse("Ex"));
        assert_eq!(with_flags("Ex", missing), "ExKh");
        assert!(Flags::parse(&with_flags("Ex", missing)).contains(needed));
    }

    #[test]
    fn unknown_and_empty_event_lists_are_refused() {
        let err = Events::only(&["set", "sett", "Del"]).unwrap_err();
        assert!(err.contains("\"sett\", \"Del\" are not events"), "{err}");
        assert!(Events::only::<&str>(&[]).is_err());
    }

    #[test]
    fn events_admit_only_what_was_listed() {
        let only = Events::only(&["del", "expired", "del"]).unwrap();
        assert!(only.admits(b"del") && only.admits(b"expired"));
        assert!(!only.admits(b"set") && !only.admits(b"de"));
        assert_eq!(only.names().unwrap(), ["del", "expired"]);
        assert!(Events::all().admits(b"anything"));
    }

    #[test]
    fn a_key_subscription_is_a_pattern_on_its_database_channels() {
        let keys = KeySubscription {
            database: 3,
            keys: Bytes::from_static(b"user:*"),
            events: Events::all(),
        };
        assert_eq!(keys.pattern(), Bytes::from_static(b"__keyspace@3__:user:*"));
        assert_eq!(keys.prefix_len(), "__keyspace@3__:".len());
        assert_eq!(keys.to_string(), "keys user:* in database 3 (every event)");
    }
}
