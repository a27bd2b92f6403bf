//! The baseline: a bare relay written the plain way with the same `redis` crate (1.8, tokio),
//! run as its own process (`pipeline --relay URL`) so that it pays for the same process
//! boundary and sockets as Switchyard.
//!
//! One connection PSUBSCRIBEs `fwd:*`; each message is republished on `fwded:REST` through a
//! multiplexed connection. The relay does not wait for each PUBLISH reply before reading the
//! next message: up to [`IN_FLIGHT`] publishes are outstanding (`StreamExt::buffered`), which
//! keeps replies, and therefore publishes, in arrival order. This is the one non-naive choice;
//! a relay awaiting each reply would be bound by the round trip, as Switchyard's worker is.

use std::io::Write as _;

use futures::StreamExt as _;

/// PUBLISH commands the relay keeps outstanding on its publishing connection.
pub const IN_FLIGHT: usize = 256;

/// Runs the relay until the bench closes our standard input.
pub fn main(url: &str) -> anyhow::Result<()> {
    // The bench holds our stdin: when it goes away (even killed), so do we.
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let client = redis::Client::open(url)?;
        let publisher = client.get_multiplexed_async_connection().await?;
        let mut subscriber = client.get_async_pubsub().await?;
        subscriber.psubscribe("fwd:*").await?;
        println!("ready");
        std::io::stdout().flush()?;
        subscriber
            .into_on_message()
            .map(|message| {
                let channel = message.get_channel_name();
                let rest = channel.strip_prefix("fwd:").unwrap_or(channel);
                let mut command = redis::cmd("PUBLISH");
                command
                    .arg(format!("fwded:{rest}"))
                    .arg(message.get_payload_bytes());
                let mut connection = publisher.clone();
                async move { command.query_async::<i64>(&mut connection).await }
            })
            .buffered(IN_FLIGHT)
            .for_each(|published| async move {
                if let Err(e) = published {
                    eprintln!("relay: PUBLISH failed: {e}");
                }
            })
            .await;
        anyhow::Ok(())
    })
}
