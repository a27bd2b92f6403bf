//! `rediss://` URLs: the host talks TLS to Redis, with a private CA and a client certificate.

use std::time::Duration;

use switchyard_tests::tls::TlsFiles;
use switchyard_tests::{RedisServer, TestHost, assert_forwards};

/// Configuration for the TLS port of a server started with `files`' certificates.
fn tls_config(url: &str, files: &TlsFiles, client_certificate: bool) -> String {
    let mut config = format!(
        "[redis]\nurl = \"{url}\"\nca_file = \"{}\"\n",
        files.path("ca.pem").display()
    );
    if client_certificate {
        config.push_str(&format!(
            "cert_file = \"{}\"\nkey_file = \"{}\"\n",
            files.path("client.pem").display(),
            files.path("client.key").display()
        ));
    }
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_urls_connect_over_tls_with_a_private_ca_and_a_client_certificate()
-> anyhow::Result<()> {
    let files = TlsFiles::generate()?;
    let (redis, tls_port) = RedisServer::start_tls(
        &files.path("server.pem"),
        &files.path("server.key"),
        &files.path("ca.pem"),
    )
    .await?;
    let url = format!("rediss://127.0.0.1:{tls_port}");

    let host = TestHost::launch_forward_configured(&url, &tls_config(&url, &files, true)).await?;
    host.wait_ready().await?;
    // Published on the plain port, received by the host over TLS, republished over TLS.
    assert_forwards(&redis, "over tls").await?;
    host.stop().await?;

    // Without a client certificate the server hangs up: the host stays unready, and says why.
    let host = TestHost::launch_forward_configured(&url, &tls_config(&url, &files, false)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, ready) = host.get("/readyz").await?;
    assert_eq!(status, 503, "{ready}");
    host.stop().await
}
