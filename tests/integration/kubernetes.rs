//! The Kubernetes example must agree with the host: probes on the admin endpoints and port,
//! environment variables the host accepts, the plugins volume where the host looks, alert
//! rules on metrics the host serves.

use std::path::Path;

use switchyard::admin::metrics::METRIC_NAMES;
use switchyard::config::{Config, DEFAULT_ADMIN_ADDR};
use yaml_rust2::{Yaml, YamlLoader};

fn documents() -> anyhow::Result<Vec<(String, Yaml)>> {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kubernetes");
    let mut documents = Vec::new();
    for entry in std::fs::read_dir(&folder)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let name = path.display().to_string();
        let parsed = YamlLoader::load_from_str(&text)
            .map_err(|e| anyhow::anyhow!("{name} is not valid YAML: {e}"))?;
        documents.extend(parsed.into_iter().map(|doc| (name.clone(), doc)));
    }
    Ok(documents)
}

fn of_kind<'a>(documents: &'a [(String, Yaml)], kind: &str) -> Vec<&'a Yaml> {
    documents
        .iter()
        .filter(|(_, doc)| doc["kind"].as_str() == Some(kind))
        .map(|(_, doc)| doc)
        .collect()
}

#[test]
fn kubernetes_manifests_match_the_hosts_defaults() -> anyhow::Result<()> {
    let documents = documents()?;
    let admin_port = DEFAULT_ADMIN_ADDR
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<i64>().ok())
        .unwrap_or_default();

    let deployments = of_kind(&documents, "Deployment");
    assert_eq!(deployments.len(), 1, "one example Deployment");
    let pod = &deployments[0]["spec"]["template"]["spec"];
    let containers = pod["containers"].as_vec().cloned().unwrap_or_default();
    assert!(
        containers.len() >= 2,
        "an application container beside the sidecar"
    );
    let sidecar = containers
        .iter()
        .find(|c| c["name"].as_str() == Some("switchyard"))
        .ok_or_else(|| anyhow::anyhow!("no switchyard container"))?;

    let port = sidecar["ports"]
        .as_vec()
        .and_then(|ports| ports.iter().find(|p| p["name"].as_str() == Some("admin")))
        .ok_or_else(|| anyhow::anyhow!("no port named admin"))?;
    assert_eq!(port["containerPort"].as_i64(), Some(admin_port));
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &sidecar[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        let port = &get["port"];
        assert!(
            port.as_str() == Some("admin") || port.as_i64() == Some(admin_port),
            "{probe} port"
        );
    }

    // Every literal environment value must be accepted by the host's configuration.
    let env: Vec<(String, String)> = sidecar["env"]
        .as_vec()
        .into_iter()
        .flatten()
        .filter_map(|var| {
            Some((
                var["name"].as_str()?.to_owned(),
                var["value"].as_str()?.to_owned(),
            ))
        })
        .collect();
    let config = Config::load(None, &env).map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(config.admin.listen.port() as i64, admin_port);
    assert!(
        !config.admin.listen.ip().is_loopback(),
        "the kubelet probes from outside the container: listen on 0.0.0.0"
    );
    let mount = sidecar["volumeMounts"]
        .as_vec()
        .and_then(|mounts| {
            mounts
                .iter()
                .find(|m| m["name"].as_str() == Some("plugins"))
        })
        .ok_or_else(|| anyhow::anyhow!("no plugins volume mount"))?;
    assert_eq!(
        mount["mountPath"].as_str().map(Path::new),
        Some(config.plugins.dir.as_path()),
        "the plugins volume is where the host looks"
    );
    let needs_redis = sidecar["env"].as_vec().into_iter().flatten().any(|var| {
        matches!(
            var["name"].as_str(),
            Some("REDIS_URL" | "SWITCHYARD_REDIS_URL")
        )
    });
    assert!(needs_redis, "the sidecar is told where Redis is");

    let monitors = of_kind(&documents, "ServiceMonitor");
    assert_eq!(monitors.len(), 1);
    let endpoint = &monitors[0]["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"].as_str(), Some("admin"));
    assert_eq!(endpoint["path"].as_str(), Some("/metrics"));

    // Alert rules only use metrics the host serves.
    let rules = of_kind(&documents, "PrometheusRule");
    assert_eq!(rules.len(), 1);
    let mut alerts = 0;
    for group in rules[0]["spec"]["groups"].as_vec().into_iter().flatten() {
        for rule in group["rules"].as_vec().into_iter().flatten() {
            alerts += 1;
            let expr = rule["expr"].as_str().unwrap_or_default();
            for name in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|token| token.starts_with("switchyard_"))
            {
                let family = ["_total", "_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .unwrap_or(name);
                assert!(
                    METRIC_NAMES.contains(&family),
                    "alert uses unknown metric {name}"
                );
            }
        }
    }
    assert!(alerts >= 4, "only {alerts} alerts");
    Ok(())
}
