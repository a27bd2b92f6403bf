//! Who may connect, and to what: tokens, their grants, and the Origin allow-list.
//!
//! A token is either one of the configuration's static tokens (compared by hash, so the
//! comparison takes the same time whatever it shares with a valid one) or a signed token:
//! `base64url(claims JSON) "." base64url(HMAC-SHA256(secret, first part))`, whose claims name
//! the holder, the expiry and the channels it may read and write. Grants are Redis glob
//! patterns, as for plugins.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::config::{GatewayConfig, expand_env};
use crate::glob::Glob;
use crate::message::Subscription;

/// The claims of a signed token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Who holds it (shown in logs).
    pub sub: String,
    /// When it expires, in seconds since the Unix epoch.
    pub exp: u64,
    /// Channels (glob patterns) it may receive.
    #[serde(default)]
    pub read: Vec<String>,
    /// Channels (glob patterns) it may publish to.
    #[serde(default)]
    pub write: Vec<String>,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// No token at all.
    #[error("a token is required (token=... or Authorization: Bearer ...)")]
    Missing,
    /// Not a token this gateway knows or signed.
    #[error("unknown or invalid token")]
    Invalid,
    /// A signed token past its expiry.
    #[error("the token expired")]
    Expired,
}

/// What one connection's token allows.
#[derive(Debug, Clone)]
pub struct Access {
    /// The holder: the static token's name or the signed token's `sub`.
    pub subject: String,
    read: Vec<(String, Glob)>,
    write: Vec<Glob>,
    /// Seconds since the Unix epoch after which the token is refused; none for static tokens.
    pub expires: Option<u64>,
}

impl Access {
    fn new(subject: String, read: &[String], write: &[String], expires: Option<u64>) -> Self {
        Self {
            subject,
            read: read
                .iter()
                .map(|p| (p.clone(), Glob::new(p.as_bytes())))
                .collect(),
            write: write.iter().map(|p| Glob::new(p.as_bytes())).collect(),
            expires,
        }
    }

    /// Whether the holder may receive `subscription`: an exact channel that a read grant
    /// matches, or a pattern that is itself one of the read grants.
    pub fn may_read(&self, subscription: &Subscription) -> bool {
        match subscription {
            Subscription::Pattern(pattern) => self
                .read
                .iter()
                .any(|(granted, _)| granted.as_bytes() == pattern.as_ref()),
            other => self.read.iter().any(|(_, glob)| glob.matches(other.name())),
        }
    }

    /// Whether the holder may publish on `channel`.
    pub fn may_write(&self, channel: &str) -> bool {
        self.write
            .iter()
            .any(|glob| glob.matches(channel.as_bytes()))
    }

    /// Whether the token has expired.
    pub fn expired(&self) -> bool {
        self.expires.is_some_and(|exp| exp <= now_secs())
    }
}

/// Checks tokens against the configuration.
pub struct Authority {
    statics: Vec<(blake3::Hash, Access)>,
    secret: Option<Vec<u8>>,
}

impl Authority {
    /// The static tokens and signing secret of `config`, with `${VAR}`s expanded.
    pub fn from_config(config: &GatewayConfig) -> anyhow::Result<Self> {
        let statics = config
            .tokens
            .iter()
            .map(|(name, token)| {
                let value = expand_env(&token.token)
                    .map_err(|e| anyhow::anyhow!("gateway.tokens.{name}.token: {e}"))?;
                Ok((
                    blake3::hash(value.as_bytes()),
                    Access::new(name.clone(), &token.read, &token.write, None),
                ))
            })
            .collect::<anyhow::Result<_>>()?;
        let secret = config
            .hmac_secret
            .as_deref()
            .map(|s| expand_env(s).map_err(|e| anyhow::anyhow!("gateway.hmac_secret: {e}")))
            .transpose()?
            .map(String::into_bytes);
        Ok(Self { statics, secret })
    }

    /// What `token` allows, if anything.
    pub fn check(&self, token: Option<&str>) -> Result<Access, Refused> {
        let token = token.filter(|t| !t.is_empty()).ok_or(Refused::Missing)?;
        let hash = blake3::hash(token.as_bytes());
        if let Some((_, access)) = self.statics.iter().find(|(h, _)| *h == hash) {
            return Ok(access.clone());
        }
        let secret = self.secret.as_deref().ok_or(Refused::Invalid)?;
        let claims = verify(secret, token).ok_or(Refused::Invalid)?;
        let access = Access::new(claims.sub, &claims.read, &claims.write, Some(claims.exp));
        if access.expired() {
            return Err(Refused::Expired);
        }
        Ok(access)
    }
}

/// A signed token for `claims`.
pub fn sign(secret: &[u8], claims: &Claims) -> String {
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{body}.{signature}")
}

/// The claims of `token` if `secret` signed it (expiry not checked).
fn verify(secret: &[u8], token: &str) -> Option<Claims> {
    let (body, signature) = token.split_once('.')?;
    let signature = URL_SAFE_NO_PAD.decode(signature).ok()?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).ok()?;
    mac.update(body.as_bytes());
    // Constant-time comparison.
    mac.verify_slice(&signature).ok()?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).ok()?).ok()
}

/// The credentials of an `Authorization: Bearer ...` header, the scheme matched without
/// regard to case, as RFC 7235 has it (`bearer`, `BEARER` too).
pub fn bearer(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

/// Whether a request with `origin` (its `Origin` header) to `host` (its `Host` header) may
/// connect: no `Origin` (not a browser), one of `allowed`, or the gateway's own.
///
/// The gateway's own origins are `public` when set. When not, the `Host` stands in for them,
/// but only when it names the gateway by IP address or as `localhost`: a page served from a
/// DNS name the attacker controls, pointed at the gateway's address (DNS rebinding), would
/// otherwise send a matching `Host` and `Origin` of its own and pass as the gateway's.
pub fn origin_allowed(
    origin: Option<&str>,
    host: Option<&str>,
    allowed: &[String],
    public: &[String],
) -> bool {
    let Some(origin) = origin else {
        return true;
    };
    let origin = origin.trim_end_matches('/');
    let listed = |origins: &[String]| {
        origins
            .iter()
            .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin))
    };
    if listed(allowed) || listed(public) {
        return true;
    }
    if !public.is_empty() {
        return false;
    }
    let Some(authority) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return false;
    };
    host.is_some_and(|host| host.eq_ignore_ascii_case(authority) && beyond_dns(host))
}

/// Whether `authority` (`host[:port]`) names its host as an IP address or `localhost`, which
/// no DNS answer chooses.
fn beyond_dns(authority: &str) -> bool {
    let name = match authority.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => authority
            .rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(authority, |(name, _)| name),
    };
    name.parse::<std::net::IpAddr>().is_ok() || name.eq_ignore_ascii_case("localhost")
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bytes::Bytes;

    use super::*;
    use crate::config::GatewayToken;

    fn authority() -> Authority {
        let mut tokens = BTreeMap::new();
        tokens.insert(
            "dashboard".to_owned(),
            GatewayToken {
                token: "static-token-0123456789".to_owned(),
                read: vec!["dashboard:*".to_owned()],
                write: vec![],
            },
        );
        Authority::from_config(&GatewayConfig {
            tokens,
            hmac_secret: Some("a-secret-of-sixteen-bytes".to_owned()),
            ..GatewayConfig::default()
        })
        .unwrap()
    }

    fn claims(exp: u64) -> Claims {
        Claims {
            sub: "alice".into(),
            exp,
            read: vec!["chat:*".into()],
            write: vec!["chat:in:*".into()],
        }
    }

    #[test]
    fn static_tokens_grant_what_the_configuration_says() {
        let access = authority().check(Some("static-token-0123456789")).unwrap();
        assert_eq!(access.subject, "dashboard");
        let summary = Subscription::Channel(Bytes::from_static(b"dashboard:summary"));
        assert!(access.may_read(&summary));
        assert!(!access.may_read(&Subscription::Channel(Bytes::from_static(b"chat:x"))));
        assert!(!access.may_write("dashboard:summary"));
        assert_eq!(authority().check(None).unwrap_err(), Refused::Missing);
        assert_eq!(
            authority()
                .check(Some("static-token-012345678"))
                .unwrap_err(),
            Refused::Invalid
        );
    }

    #[test]
    fn signed_tokens_carry_their_grants_and_expire() {
        let secret = b"a-secret-of-sixteen-bytes";
        let token = sign(secret, &claims(now_secs() + 60));
        let access = authority().check(Some(&token)).unwrap();
        assert_eq!(access.subject, "alice");
        assert!(access.may_write("chat:in:lobby"));
        assert!(!access.may_write("chat:lobby"));
        assert!(access.may_read(&Subscription::Pattern(Bytes::from_static(b"chat:*"))));
        assert!(!access.may_read(&Subscription::Pattern(Bytes::from_static(b"*"))));

        let expired = sign(secret, &claims(now_secs() - 1));
        assert_eq!(
            authority().check(Some(&expired)).unwrap_err(),
            Refused::Expired
        );
        let forged = sign(b"another-secret-entirely", &claims(now_secs() + 60));
        assert_eq!(
            authority().check(Some(&forged)).unwrap_err(),
            Refused::Invalid
        );
        let (body, _) = token.split_once('.').unwrap();
        let tampered = format!("{body}.AAAA");
        assert_eq!(
            authority().check(Some(&tampered)).unwrap_err(),
            Refused::Invalid
        );
    }

    #[test]
    fn origins_are_the_gateways_own_or_listed() {
        let allowed = vec!["https://app.example.com".to_owned()];
        let allowed_origin = |origin, host| origin_allowed(origin, host, &allowed, &[]);
        assert!(allowed_origin(None, Some("gw:8080")));
        assert!(allowed_origin(
            Some("https://app.example.com"),
            Some("gw:8080")
        ));
        assert!(allowed_origin(
            Some("http://127.0.0.1:8080"),
            Some("127.0.0.1:8080")
        ));
        assert!(allowed_origin(
            Some("http://[::1]:8080"),
            Some("[::1]:8080")
        ));
        assert!(allowed_origin(
            Some("http://localhost:8080"),
            Some("localhost:8080")
        ));
        assert!(!allowed_origin(
            Some("https://evil.example"),
            Some("gw:8080")
        ));
        assert!(!allowed_origin(Some("null"), Some("gw:8080")));
    }

    #[test]
    fn a_dns_name_in_host_is_not_taken_for_the_gateways_own_origin() {
        // DNS rebinding: evil.example resolves to the gateway; the browser sends both.
        assert!(!origin_allowed(
            Some("http://evil.example:8080"),
            Some("evil.example:8080"),
            &[],
            &[]
        ));
        // Listed as the gateway's public origin, the name is fine; the Host no longer counts.
        let public = vec!["https://gw.example.com".to_owned()];
        assert!(origin_allowed(
            Some("https://gw.example.com"),
            Some("gw.example.com"),
            &[],
            &public
        ));
        assert!(!origin_allowed(
            Some("http://127.0.0.1:8080"),
            Some("127.0.0.1:8080"),
            &[],
            &public
        ));
    }

    #[test]
    fn the_bearer_scheme_is_matched_without_regard_to_case() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("BEARER  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearerabc"), None);
    }
}
