//! The TLS library's process-wide primitives, installed once for the clients that need them
//! (registries, the trace exporter): the `ring` ones the host's other connections use.

use std::sync::Once;

/// Installs rustls's process-wide crypto provider, once; a provider already installed stays.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
