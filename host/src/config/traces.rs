//! `[tracing]`: OpenTelemetry trace export, off unless an OTLP endpoint is set here or in the
//! standard `OTEL_*` variables.

use std::collections::BTreeMap;

use serde::Deserialize;

/// How spans reach the collector.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum OtlpProtocol {
    /// OTLP over HTTP with protobuf bodies, `POST ENDPOINT/v1/traces` (port 4318 by custom).
    #[default]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// OTLP over gRPC, `TraceService/Export` at ENDPOINT, the collector's address without a
    /// path (port 4317 by custom).
    #[serde(rename = "grpc")]
    Grpc,
}

/// `[tracing]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// Where the collector listens: `http://collector:4318` for `http/protobuf` (the host
    /// posts to `/v1/traces` under it), `http://collector:4317` for `grpc` (no path). Tracing
    /// is off when unset and neither `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` nor
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` is.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// `http/protobuf` (default) or `grpc`; else `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` or
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`.
    #[serde(default)]
    pub protocol: Option<OtlpProtocol>,
    /// The share of new traces recorded, 0 to 1 (default 1; else `OTEL_TRACES_SAMPLER_ARG`).
    /// A message whose publisher's trace was sampled is recorded whatever the ratio.
    #[serde(default)]
    pub sample_ratio: Option<f64>,
    /// `service.name` of the spans (default `switchyard`; else `OTEL_SERVICE_NAME`).
    #[serde(default)]
    pub service_name: Option<String>,
    /// More resource attributes (`deployment.environment = "prod"`), added to those of
    /// `OTEL_RESOURCE_ATTRIBUTES`.
    #[serde(default)]
    pub resource: BTreeMap<String, String>,
    /// The top-level field of a JSON payload that carries a W3C `traceparent` for pub/sub
    /// messages, which have no headers (`"traceparent"`); off by default. A field named
    /// `tracestate` beside it is read too.
    #[serde(default)]
    pub payload_field: Option<String>,
    /// Also write that field (and `tracestate`) into the JSON object payloads plugins
    /// `publish` and `send`, set to the context of the publish span, so that the next
    /// subscriber joins the trace. Off by default: payloads go out exactly as the plugin
    /// made them.
    #[serde(default)]
    pub write_payload_field: bool,
    /// How often finished spans are sent to the collector, in milliseconds.
    #[serde(default = "default_export_interval_ms")]
    pub export_interval_ms: u64,
}

/// A trace shows up within about a second of its message, in batches of what a second holds.
fn default_export_interval_ms() -> u64 {
    1000
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            protocol: None,
            sample_ratio: None,
            service_name: None,
            resource: BTreeMap::new(),
            payload_field: None,
            write_payload_field: false,
            export_interval_ms: default_export_interval_ms(),
        }
    }
}

/// The tracing settings in force.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingSettings {
    /// The collector's endpoint; `None`: tracing is off.
    pub endpoint: Option<String>,
    /// How spans reach it.
    pub protocol: OtlpProtocol,
    /// The share of new traces recorded.
    pub sample_ratio: f64,
    /// `service.name`.
    pub service_name: String,
    /// Further resource attributes.
    pub resource: BTreeMap<String, String>,
    /// The JSON payload field carrying a `traceparent`, if read.
    pub payload_field: Option<String>,
    /// Whether that field is written into JSON payloads plugins publish.
    pub write_payload_field: bool,
    /// How often finished spans are sent.
    pub export_interval: std::time::Duration,
}

impl TracingConfig {
    /// Adds to `problems` what is wrong with `[tracing]`.
    pub(super) fn check(&self, origin: &str, problems: &mut Vec<String>) {
        if let Some(ratio) = self.sample_ratio
            && !(0.0..=1.0).contains(&ratio)
        {
            problems.push(format!(
                "{origin}: tracing.sample_ratio must be between 0 and 1, got {ratio}"
            ));
        }
        if let Some(endpoint) = &self.otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            problems.push(format!(
                "{origin}: tracing.otlp_endpoint must be an http:// or https:// URL, got {endpoint:?}"
            ));
        }
        if self.export_interval_ms == 0 {
            problems.push(format!(
                "{origin}: tracing.export_interval_ms must be at least 1"
            ));
        }
        if self.protocol == Some(OtlpProtocol::Grpc)
            && let Some(endpoint) = &self.otlp_endpoint
            && has_path(endpoint)
        {
            // gRPC calls go to the service's own path: one given here would be ignored.
            problems.push(format!(
                "{origin}: tracing.otlp_endpoint for tracing.protocol = \"grpc\" is the \
                 collector's address without a path (http://collector:4317), got {endpoint:?}"
            ));
        }
        if self.payload_field.as_deref() == Some("") {
            problems.push(format!(
                "{origin}: tracing.payload_field must name a field, or be left out"
            ));
        }
        if self.write_payload_field && self.payload_field.is_none() {
            problems.push(format!(
                "{origin}: tracing.write_payload_field needs tracing.payload_field, the name \
                 of the field to write (\"traceparent\")"
            ));
        }
    }

    /// Fills the keys left unset from the standard OpenTelemetry variables in `env`
    /// (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_ENDPOINT`,
    /// `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, `OTEL_EXPORTER_OTLP_PROTOCOL`,
    /// `OTEL_TRACES_SAMPLER_ARG`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`): the file's
    /// keys win.
    pub(super) fn resolve(&mut self, env: &[(String, String)]) {
        let var = |name: &str| {
            env.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        if self.otlp_endpoint.is_none() {
            self.otlp_endpoint = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .map(|full| {
                    // The traces endpoint is the whole URL; the exporter wants the base.
                    full.strip_suffix("/v1/traces")
                        .map_or(full.clone(), str::to_owned)
                })
                .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"));
        }
        if self.protocol.is_none() {
            self.protocol = match var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
                .as_deref()
            {
                Some("grpc") => Some(OtlpProtocol::Grpc),
                Some("http/protobuf") => Some(OtlpProtocol::HttpProtobuf),
                _ => None,
            };
        }
        if self.sample_ratio.is_none() {
            self.sample_ratio = var("OTEL_TRACES_SAMPLER_ARG")
                .and_then(|v| v.parse().ok())
                .filter(|r: &f64| (0.0..=1.0).contains(r));
        }
        if self.service_name.is_none() {
            self.service_name = var("OTEL_SERVICE_NAME");
        }
        if let Some(list) = var("OTEL_RESOURCE_ATTRIBUTES") {
            for pair in list.split(',') {
                if let Some((key, value)) = pair.split_once('=') {
                    self.resource
                        .entry(key.trim().to_owned())
                        .or_insert_with(|| value.trim().to_owned());
                }
            }
        }
    }

    /// The settings in force, with the defaults for what is unset.
    pub fn settings(&self) -> TracingSettings {
        TracingSettings {
            endpoint: self.otlp_endpoint.clone(),
            protocol: self.protocol.unwrap_or_default(),
            sample_ratio: self.sample_ratio.unwrap_or(1.0),
            service_name: self
                .service_name
                .clone()
                .unwrap_or_else(|| "switchyard".to_owned()),
            resource: self.resource.clone(),
            payload_field: self.payload_field.clone(),
            write_payload_field: self.write_payload_field,
            export_interval: std::time::Duration::from_millis(self.export_interval_ms),
        }
    }
}

/// Whether the `http://` or `https://` URL `endpoint` goes on past its host and port (a
/// trailing `/` aside).
fn has_path(endpoint: &str) -> bool {
    let rest = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    rest.find(['/', '?', '#'])
        .is_some_and(|start| !matches!(&rest[start..], "/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn tracing_is_off_unless_an_endpoint_is_set_and_the_keys_win_over_the_variables() {
        let off = TracingConfig::default().settings();
        assert_eq!(off.endpoint, None);
        assert_eq!(off.service_name, "switchyard");
        assert_eq!(off.sample_ratio, 1.0);

        let variables = env(&[
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://c:4318/v1/traces",
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_SERVICE_NAME", "edge"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            ("OTEL_RESOURCE_ATTRIBUTES", "team=chat, region=eu"),
        ]);
        let mut from_env = TracingConfig::default();
        from_env.resolve(&variables);
        let from_env = from_env.settings();
        assert_eq!(from_env.endpoint.as_deref(), Some("http://c:4318"));
        assert_eq!(from_env.protocol, OtlpProtocol::Grpc);
        assert_eq!(from_env.service_name, "edge");
        assert_eq!(from_env.sample_ratio, 0.25);
        assert_eq!(
            from_env.resource.get("region").map(String::as_str),
            Some("eu")
        );

        let mut keys = TracingConfig {
            otlp_endpoint: Some("http://mine:4318".to_owned()),
            protocol: Some(OtlpProtocol::HttpProtobuf),
            sample_ratio: Some(0.5),
            service_name: Some("router".to_owned()),
            resource: BTreeMap::from([("region".to_owned(), "us".to_owned())]),
            ..TracingConfig::default()
        };
        keys.resolve(&variables);
        let keys = keys.settings();
        assert_eq!(keys.endpoint.as_deref(), Some("http://mine:4318"));
        assert_eq!(keys.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(
            (keys.sample_ratio, keys.service_name.as_str()),
            (0.5, "router")
        );
        assert_eq!(keys.resource.get("region").map(String::as_str), Some("us"));
        assert_eq!(keys.resource.get("team").map(String::as_str), Some("chat"));
    }

    #[test]
    fn a_bad_ratio_or_endpoint_names_the_key() {
        let mut problems = Vec::new();
        TracingConfig {
            sample_ratio: Some(2.0),
            otlp_endpoint: Some("collector:4318".to_owned()),
            ..TracingConfig::default()
        }
        .check("f.toml", &mut problems);
        assert!(problems[0].contains("tracing.sample_ratio"), "{problems:?}");
        assert!(
            problems[1].contains("tracing.otlp_endpoint"),
            "{problems:?}"
        );
    }

    #[test]
    fn grpc_takes_the_collector_s_address_and_refuses_one_with_a_path() {
        let grpc = |endpoint: &str| {
            let mut config = TracingConfig {
                protocol: Some(OtlpProtocol::Grpc),
                otlp_endpoint: Some(endpoint.to_owned()),
                ..TracingConfig::default()
            };
            config.resolve(&[]);
            let mut problems = Vec::new();
            config.check("f.toml", &mut problems);
            (config.settings(), problems)
        };
        for endpoint in [
            "http://c:4317",
            "http://c:4317/",
            "https://collector.example",
        ] {
            let (settings, problems) = grpc(endpoint);
            assert_eq!(problems, Vec::<String>::new(), "{endpoint}");
            assert_eq!(settings.protocol, OtlpProtocol::Grpc);
            assert_eq!(settings.endpoint.as_deref(), Some(endpoint));
        }
        for endpoint in [
            "http://c:4318/v1/traces",
            "http://c:4317/otlp",
            "http://c:4317?x=1",
        ] {
            let (_, problems) = grpc(endpoint);
            assert_eq!(problems.len(), 1, "{endpoint}: {problems:?}");
            assert!(
                problems[0].contains("tracing.otlp_endpoint")
                    && problems[0].contains("without a path"),
                "{problems:?}"
            );
        }

        // From the variables: the traces endpoint loses an HTTP path, and is then the address.
        let mut from_env = TracingConfig::default();
        from_env.resolve(&env(&[
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4317"),
        ]));
        let mut problems = Vec::new();
        from_env.check("env", &mut problems);
        assert_eq!(problems, Vec::<String>::new());
        let settings = from_env.settings();
        assert_eq!(
            (settings.protocol, settings.endpoint.as_deref()),
            (OtlpProtocol::Grpc, Some("http://c:4317"))
        );

        // A path is the HTTP exporter's business, as before.
        let mut problems = Vec::new();
        TracingConfig {
            otlp_endpoint: Some("http://c:4318/base".to_owned()),
            ..TracingConfig::default()
        }
        .check("f.toml", &mut problems);
        assert_eq!(problems, Vec::<String>::new());
    }
}
