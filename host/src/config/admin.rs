//! `[admin]`: the admin HTTP listener.

use std::net::SocketAddr;

use serde::Deserialize;

/// The admin HTTP listener: loopback only unless the operator opens it.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:9090";

/// `[admin]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin HTTP listener (`/healthz`, `/readyz`, `/plugins`).
    #[serde(default = "default_admin_addr")]
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_addr(),
        }
    }
}

fn default_admin_addr() -> SocketAddr {
    DEFAULT_ADMIN_ADDR
        .parse()
        .expect("the default admin address is valid")
}
