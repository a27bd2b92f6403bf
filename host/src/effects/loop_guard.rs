//! The loop guard: a plugin that publishes into one of its own subscriptions would feed
//! itself forever. Such publishes are allowed at a bounded rate (a token bucket per plugin
//! version) and refused beyond it, with the refusal counted and logged.

use super::rate::TokenBucket;
use crate::router::glob::Glob;
use crate::source::Subscription;

/// Self-feeding publishes allowed per second, sustained.
pub const LOOP_RATE_PER_SEC: f64 = 100.0;
/// Self-feeding publishes allowed in a burst.
pub const LOOP_BURST: f64 = 200.0;

/// Detects and limits publishes into a plugin's own subscriptions.
#[derive(Debug)]
pub struct LoopGuard {
    channels: Vec<Vec<u8>>,
    patterns: Vec<Glob>,
    bucket: TokenBucket,
}

impl LoopGuard {
    /// A guard for a plugin with `subscriptions`.
    pub fn new(subscriptions: &[Subscription]) -> Self {
        let mut channels = Vec::new();
        let mut patterns = Vec::new();
        for subscription in subscriptions {
            match subscription {
                Subscription::Channel(name) | Subscription::Sharded(name) => {
                    channels.push(name.to_vec());
                }
                Subscription::Pattern(name) => patterns.push(Glob::new(name.to_vec())),
                // Publishing never feeds a stream.
                Subscription::Stream(_) => {}
            }
        }
        Self {
            channels,
            patterns,
            bucket: TokenBucket::new(LOOP_RATE_PER_SEC, LOOP_BURST),
        }
    }

    /// Whether publishing on `channel` would deliver back to the plugin itself.
    pub fn feeds_itself(&self, channel: &[u8]) -> bool {
        self.channels.iter().any(|c| c == channel)
            || self.patterns.iter().any(|g| g.matches(channel))
    }

    /// Takes one token; false when the plugin is over its rate.
    pub fn admit(&self) -> bool {
        self.bucket.admit()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    #[test]
    fn only_own_subscriptions_count_and_bursts_are_bounded() {
        let guard = LoopGuard::new(&[
            Subscription::Pattern(Bytes::from_static(b"loop:*")),
            Subscription::Channel(Bytes::from_static(b"echo")),
        ]);
        assert!(guard.feeds_itself(b"loop:x"));
        assert!(guard.feeds_itself(b"echo"));
        assert!(!guard.feeds_itself(b"other"));
        let admitted = (0..1000).filter(|_| guard.admit()).count();
        assert!((200..=210).contains(&admitted), "{admitted}");
    }
}
