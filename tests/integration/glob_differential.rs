//! The router's glob matcher against Redis's own: a few hundred generated patterns are
//! PSUBSCRIBEd on a real server, generated channels are published, and for every
//! (pattern, channel) pair the matcher must agree with what Redis delivered.

use std::collections::BTreeSet;

use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use switchyard::glob::Glob;
use switchyard_tests::{PATIENCE, RedisServer};

/// Pattern bytes: literals, every metacharacter, and bytes that are not UTF-8 (including
/// ones above 0x7f, which Redis compares as signed chars inside ranges).
const PATTERN_ALPHABET: &[u8] = b"ab-z*?[]^\\\x80\xc3\xa9\xff";
const CHANNEL_ALPHABET: &[u8] = b"abz-^]\\*?[\x80\xc3\xa9\xff";

/// Hand-picked patterns for the corners, beside the generated ones.
const CORNERS: &[&[u8]] = &[
    b"*",
    b"?",
    b"a*",
    b"*a",
    b"a?b",
    b"[ab]",
    b"[^ab]",
    b"[a-b]",
    b"[b-a]",
    b"[a-]",
    b"[]",
    b"[^]",
    b"[",
    b"[a",
    b"a[",
    b"\\",
    b"a\\",
    b"\\*",
    b"\\?",
    b"[\\]]",
    b"[\\-]",
    b"[]a]",
    b"**",
    b"a**b",
    b"[a-\xff]",
    b"[\x80-\xff]",
    b"[\xff-a]",
    b"\xc3\xa9*",
    b"*\xff",
    b"[^\x80]",
    b"[z-a]*",
    b"*[*]*",
    b"?*?",
    b"[[]",
    b"[^-]",
];

fn generate(rng: &mut StdRng, alphabet: &[u8], max_len: usize) -> Vec<u8> {
    let len = rng.random_range(0..=max_len);
    (0..len)
        .map(|_| alphabet[rng.random_range(0..alphabet.len())])
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glob_matcher_agrees_with_redis_psubscribe() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut rng = StdRng::seed_from_u64(0x5eed_2026);

    let mut patterns: BTreeSet<Vec<u8>> = CORNERS.iter().map(|p| p.to_vec()).collect();
    while patterns.len() < 400 {
        let pattern = generate(&mut rng, PATTERN_ALPHABET, 6);
        if !pattern.is_empty() {
            patterns.insert(pattern);
        }
    }
    let mut channels: BTreeSet<Vec<u8>> = BTreeSet::new();
    while channels.len() < 400 {
        let channel = generate(&mut rng, CHANNEL_ALPHABET, 5);
        if !channel.is_empty() {
            channels.insert(channel);
        }
    }
    // Channels spelled like the patterns themselves exercise the escapes and literals.
    channels.extend(patterns.iter().take(100).cloned());

    let mut pubsub = redis.client().get_async_pubsub().await?;
    let pattern_list: Vec<&[u8]> = patterns.iter().map(Vec::as_slice).collect();
    pubsub.psubscribe(&pattern_list).await?;
    let mut stream = pubsub.into_on_message();

    let mut connection = redis.connection().await?;
    let mut expected_deliveries = 0i64;
    for channel in &channels {
        let receivers: i64 = redis::cmd("PUBLISH")
            .arg(channel.as_slice())
            .arg(b"m".as_slice())
            .query_async(&mut connection)
            .await?;
        expected_deliveries += receivers;
    }

    let mut by_redis: BTreeSet<(Vec<u8>, Vec<u8>)> = BTreeSet::new();
    for _ in 0..expected_deliveries {
        let msg = tokio::time::timeout(PATIENCE, stream.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("subscriber stream ended"))?;
        let pattern: Option<Vec<u8>> = msg.get_pattern()?;
        let channel: Vec<u8> = msg.get_channel()?;
        by_redis.insert((pattern.unwrap_or_default(), channel));
    }
    assert_eq!(
        by_redis.len() as i64,
        expected_deliveries,
        "Redis delivered a pair twice"
    );

    let mut disagreements = Vec::new();
    let mut matched = 0;
    for pattern in &patterns {
        let glob = Glob::new(pattern.clone());
        for channel in &channels {
            let ours = glob.matches(channel);
            let theirs = by_redis.contains(&(pattern.clone(), channel.clone()));
            matched += usize::from(theirs);
            if ours != theirs {
                disagreements.push(format!(
                    "pattern {:?} channel {:?}: redis {theirs}, ours {ours}",
                    String::from_utf8_lossy(pattern),
                    String::from_utf8_lossy(channel)
                ));
            }
        }
    }
    assert!(
        disagreements.is_empty(),
        "{} of {} pairs disagree:\n{}",
        disagreements.len(),
        patterns.len() * channels.len(),
        disagreements.join("\n")
    );
    // Guard against a vacuous pass: plenty of pairs must match.
    assert!(matched > 1000, "only {matched} pairs matched");
    Ok(())
}
