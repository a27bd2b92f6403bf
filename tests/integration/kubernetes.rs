//! The Kubernetes examples must agree with the host: probes on the admin endpoints and port,
//! environment variables the host accepts, the plugins volume where the host looks, alert
//! rules on metrics the host serves; for the workers, a manifest and a configuration file the
//! host accepts, and stream settings under which live replicas do not claim each other's work.

use std::path::{Path, PathBuf};
use std::time::Duration;

use switchyard::admin::metrics::METRIC_NAMES;
use switchyard::config::{Config, DEFAULT_ADMIN_ADDR};
use switchyard::plugins::manifest::Manifest;
use yaml_rust2::{Yaml, YamlLoader};

/// `examples/kubernetes`, or a folder in it.
fn example_dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/kubernetes")
        .join(sub)
}

/// Every document of the `.yaml` files directly in `folder`, with its file name.
fn documents_in(folder: &Path) -> anyhow::Result<Vec<(String, Yaml)>> {
    let mut documents = Vec::new();
    for entry in std::fs::read_dir(folder)? {
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

fn admin_port() -> i64 {
    DEFAULT_ADMIN_ADDR
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<i64>().ok())
        .unwrap_or_default()
}

/// The container named `switchyard` of a pod spec.
fn switchyard_container(pod: &Yaml) -> anyhow::Result<&Yaml> {
    pod["containers"]
        .as_vec()
        .and_then(|containers| {
            containers
                .iter()
                .find(|c| c["name"].as_str() == Some("switchyard"))
        })
        .ok_or_else(|| anyhow::anyhow!("no switchyard container"))
}

/// The container's volume mount named `name`.
fn mount<'a>(container: &'a Yaml, name: &str) -> anyhow::Result<&'a Yaml> {
    container["volumeMounts"]
        .as_vec()
        .and_then(|mounts| mounts.iter().find(|m| m["name"].as_str() == Some(name)))
        .ok_or_else(|| anyhow::anyhow!("no {name} volume mount"))
}

/// The file a container's `--config` argument names.
fn config_arg(container: &Yaml) -> anyhow::Result<&Path> {
    let args: Vec<&str> = container["args"]
        .as_vec()
        .into_iter()
        .flatten()
        .filter_map(Yaml::as_str)
        .collect();
    args.iter()
        .position(|a| *a == "--config")
        .and_then(|i| args.get(i + 1))
        .map(|path| Path::new(*path))
        .ok_or_else(|| anyhow::anyhow!("no --config in the container's args"))
}

/// The pod's volume named `name`.
fn volume<'a>(pod: &'a Yaml, name: &str) -> anyhow::Result<&'a Yaml> {
    pod["volumes"]
        .as_vec()
        .and_then(|volumes| volumes.iter().find(|v| v["name"].as_str() == Some(name)))
        .ok_or_else(|| anyhow::anyhow!("no {name} volume"))
}

/// Checks a `switchyard` container against the host: the admin port and its probes, every
/// literal environment value (with `config_file`, as the container's `--config` names it),
/// the plugins volume, and a Redis URL. Returns the configuration the container would run
/// with.
fn check_switchyard_container(
    container: &Yaml,
    config_file: Option<&Path>,
) -> anyhow::Result<Config> {
    let admin_port = admin_port();
    let port = container["ports"]
        .as_vec()
        .and_then(|ports| ports.iter().find(|p| p["name"].as_str() == Some("admin")))
        .ok_or_else(|| anyhow::anyhow!("no port named admin"))?;
    assert_eq!(port["containerPort"].as_i64(), Some(admin_port));
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        let port = &get["port"];
        assert!(
            port.as_str() == Some("admin") || port.as_i64() == Some(admin_port),
            "{probe} port"
        );
    }

    // Every literal environment value must be accepted by the host's configuration.
    let env: Vec<(String, String)> = container["env"]
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
    let config = Config::load(config_file, &env).map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(config.admin.listen.port() as i64, admin_port);
    assert!(
        !config.admin.listen.ip().is_loopback(),
        "the kubelet probes from outside the container: listen on 0.0.0.0"
    );
    assert_eq!(
        mount(container, "plugins")?["mountPath"]
            .as_str()
            .map(Path::new),
        Some(config.plugins.dir.as_path()),
        "the plugins volume is where the host looks"
    );
    let needs_redis = container["env"].as_vec().into_iter().flatten().any(|var| {
        matches!(
            var["name"].as_str(),
            Some("REDIS_URL" | "SWITCHYARD_REDIS_URL")
        )
    });
    assert!(needs_redis, "the container is told where Redis is");
    Ok(config)
}

#[test]
fn kubernetes_manifests_match_the_hosts_defaults() -> anyhow::Result<()> {
    let documents = documents_in(&example_dir(""))?;

    let deployments = of_kind(&documents, "Deployment");
    assert_eq!(deployments.len(), 1, "one example Deployment");
    let pod = &deployments[0]["spec"]["template"]["spec"];
    let containers = pod["containers"].as_vec().cloned().unwrap_or_default();
    assert!(
        containers.len() >= 2,
        "an application container beside the sidecar"
    );
    let container = switchyard_container(pod)?;
    let config = check_switchyard_container(container, None)?;
    for resource in ["cpu", "memory"] {
        assert!(
            !container["resources"]["requests"][resource].is_badvalue(),
            "the sidecar requests {resource}"
        );
    }
    assert!(
        !container["resources"]["limits"]["memory"].is_badvalue(),
        "the sidecar has a memory limit"
    );
    let grace = Duration::from_secs(
        pod["terminationGracePeriodSeconds"]
            .as_i64()
            .unwrap_or(30)
            .try_into()?,
    );
    let drain = Duration::from_millis(config.plugins.drain_ms);
    assert!(
        grace > drain,
        "grace period {grace:?} must exceed the drain {drain:?}"
    );

    // Prometheus finds the sidecars: the ServiceMonitor selects the Service, whose port
    // reaches the container's admin port, and scrapes /metrics there.
    let services = of_kind(&documents, "Service");
    assert_eq!(services.len(), 1);
    let service = services[0];
    let pod_labels = &deployments[0]["spec"]["template"]["metadata"]["labels"];
    for (key, value) in service["spec"]["selector"].as_hash().into_iter().flatten() {
        assert_eq!(
            &pod_labels[key.as_str().unwrap_or_default()],
            value,
            "the Service selects the pods"
        );
    }
    let service_port = service["spec"]["ports"]
        .as_vec()
        .and_then(|ports| ports.iter().find(|p| p["name"].as_str() == Some("admin")))
        .ok_or_else(|| anyhow::anyhow!("the Service has no port named admin"))?;
    assert!(
        service_port["targetPort"].as_str() == Some("admin")
            || service_port["targetPort"].as_i64() == Some(admin_port()),
        "the Service's admin port targets the container's"
    );
    let monitors = of_kind(&documents, "ServiceMonitor");
    assert_eq!(monitors.len(), 1);
    let service_labels = &service["metadata"]["labels"];
    for (key, value) in monitors[0]["spec"]["selector"]["matchLabels"]
        .as_hash()
        .into_iter()
        .flatten()
    {
        assert_eq!(
            &service_labels[key.as_str().unwrap_or_default()],
            value,
            "the ServiceMonitor selects the Service"
        );
    }
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
    for (alert, metric) in [
        ("SwitchyardRedisDisconnected", "switchyard_redis_connected"),
        ("SwitchyardNoSubscriptions", "switchyard_subscriptions"),
        ("SwitchyardPluginParked", "switchyard_plugin_parked"),
        (
            "SwitchyardSustainedShedding",
            "switchyard_plugin_messages_total",
        ),
    ] {
        let expr = alert_rules(&documents)
            .into_iter()
            .find_map(|(name, expr)| (name == alert).then_some(expr))
            .ok_or_else(|| anyhow::anyhow!("no {alert} alert"))?;
        assert!(expr.contains(metric), "{alert} watches {metric}: {expr}");
    }
    Ok(())
}

/// Every alert of the PrometheusRule documents: its name and expression.
fn alert_rules(documents: &[(String, Yaml)]) -> Vec<(String, String)> {
    of_kind(documents, "PrometheusRule")
        .into_iter()
        .flat_map(|rule| rule["spec"]["groups"].as_vec().into_iter().flatten())
        .flat_map(|group| group["rules"].as_vec().into_iter().flatten())
        .map(|rule| {
            (
                rule["alert"].as_str().unwrap_or_default().to_owned(),
                rule["expr"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// The metric selectors of a PromQL expression: each `switchyard_*` name with the
/// `label="value"` equality matchers in the braces after it.
fn selectors(expr: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut found = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("switchyard_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = tail[..end].to_owned();
        let mut matchers = Vec::new();
        let mut after = &tail[end..];
        if let Some(braces) = after.strip_prefix('{') {
            let close = braces.find('}').unwrap_or(braces.len());
            for matcher in braces[..close].split(',') {
                if let Some((label, value)) = matcher.split_once('=')
                    && !label.ends_with(['!', '='])
                    && !value.starts_with('~')
                {
                    matchers.push((
                        label.trim().to_owned(),
                        value.trim().trim_matches('"').to_owned(),
                    ));
                }
            }
            after = &braces[close..];
        }
        found.push((name, matchers));
        rest = after;
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_select_series_a_running_host_serves() -> anyhow::Result<()> {
    // Every selector in the alert rules names a series a real host exposes, with label values
    // it really uses: a typo (or a counter's name on a gauge) would make an alert that can
    // never fire.
    use switchyard_tests::{PATIENCE, RedisServer, Subscriber, TestHost};
    let redis = RedisServer::start().await?;
    let host = TestHost::with_forward(&redis).await?;
    let mut out = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
    redis.publish("fwd:x", "x").await?;
    out.take(1, PATIENCE).await?;
    let text = reqwest::get(format!("http://{}/metrics", host.admin()))
        .await?
        .error_for_status()?
        .text()
        .await?;
    host.stop().await?;

    // The label values each family can take are those of its series, and those its HELP
    // text lists for outcomes no message has had yet (shed, failed).
    let exposed: Vec<(String, String)> = text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, _) = line.rsplit_once(' ')?;
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            Some((name.to_owned(), labels.trim_end_matches('}').to_owned()))
        })
        .collect();
    let documents = documents_in(&example_dir(""))?;
    for (alert, expr) in alert_rules(&documents) {
        for (name, matchers) in selectors(&expr) {
            let series: Vec<&String> = exposed
                .iter()
                .filter(|(exposed_name, _)| *exposed_name == name)
                .map(|(_, labels)| labels)
                .collect();
            assert!(
                !series.is_empty(),
                "{alert}: the host serves no series named {name}"
            );
            for (label, value) in matchers {
                let pair = format!("{label}=\"{value}\"");
                assert!(
                    series
                        .iter()
                        .any(|labels| labels.split(',').any(|l| l == pair)),
                    "{alert}: no {name} series has {pair}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn kubernetes_workers_share_one_consumer_group() -> anyhow::Result<()> {
    let folder = example_dir("workers");
    let documents = documents_in(&folder)?;

    let deployments = of_kind(&documents, "Deployment");
    assert_eq!(deployments.len(), 1, "one workers Deployment");
    let deployment = deployments[0];
    assert!(
        deployment["spec"]["replicas"].as_i64().unwrap_or(1) >= 2,
        "several replicas share the group"
    );
    let pod = &deployment["spec"]["template"]["spec"];
    assert!(
        pod["hostname"].is_badvalue(),
        "a fixed hostname would give every replica the same consumer name"
    );
    let container = switchyard_container(pod)?;

    // The configuration file the container names is switchyard.toml, from the ConfigMap the
    // kustomization generates, mounted where --config looks.
    let config_path = config_arg(container)?;
    assert_eq!(
        config_path.file_name().and_then(|n| n.to_str()),
        Some("switchyard.toml")
    );
    let config_mount = container["volumeMounts"]
        .as_vec()
        .and_then(|mounts| {
            mounts
                .iter()
                .find(|m| m["mountPath"].as_str().map(Path::new) == config_path.parent())
        })
        .ok_or_else(|| anyhow::anyhow!("nothing mounted where --config looks"))?;
    let config_map =
        volume(pod, config_mount["name"].as_str().unwrap_or_default())?["configMap"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
    let kustomization = of_kind(&documents, "Kustomization");
    assert_eq!(kustomization.len(), 1);
    let kustomization = kustomization[0];
    let generated = kustomization["configMapGenerator"]
        .as_vec()
        .and_then(|generators| {
            generators
                .iter()
                .find(|g| g["name"].as_str() == Some(config_map.as_str()))
        })
        .ok_or_else(|| anyhow::anyhow!("the kustomization does not generate {config_map}"))?;
    let files: Vec<&str> = generated["files"]
        .as_vec()
        .into_iter()
        .flatten()
        .filter_map(Yaml::as_str)
        .collect();
    assert_eq!(files, ["switchyard.toml"]);
    for resource in kustomization["resources"].as_vec().into_iter().flatten() {
        let resource = resource.as_str().unwrap_or_default();
        assert!(folder.join(resource).is_file(), "{resource} is missing");
    }

    let config = check_switchyard_container(container, Some(&folder.join("switchyard.toml")))?;
    let consumer_set_literally = container["env"].as_vec().into_iter().flatten().any(|var| {
        var["name"].as_str() == Some("SWITCHYARD_STREAMS_CONSUMER")
            && var["value"].as_str().is_some()
    });
    assert!(
        !consumer_set_literally,
        "one literal consumer name would be shared by every replica"
    );

    // The plugins ConfigMap's manifest is orders.toml, which the host accepts: a stream read
    // through a named group, and only outputs the configuration defines.
    let manifest_text = std::fs::read_to_string(folder.join("orders.toml"))?;
    let plugins_map = volume(pod, "plugins")?["configMap"]["name"]
        .as_str()
        .unwrap_or_default();
    let skeleton = of_kind(&documents, "ConfigMap");
    let skeleton = skeleton
        .iter()
        .find(|m| m["metadata"]["name"].as_str() == Some(plugins_map))
        .ok_or_else(|| anyhow::anyhow!("configmap.yaml does not show {plugins_map}"))?;
    assert_eq!(
        skeleton["data"]["orders.toml"].as_str(),
        Some(manifest_text.as_str()),
        "configmap.yaml shows orders.toml as it is"
    );
    let manifest = Manifest::parse(&manifest_text, Path::new("orders.toml"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let subscriptions = manifest
        .subscriptions
        .clone()
        .ok_or_else(|| anyhow::anyhow!("orders.toml subscribes nothing"))?;
    assert!(
        !subscriptions.streams.is_empty(),
        "orders.toml reads a stream"
    );
    assert!(
        manifest.stream.group.is_some(),
        "orders.toml names its group"
    );
    for output in &manifest.grants.outputs {
        assert!(
            config.outputs.contains_key(output),
            "output {output} is granted but not defined in switchyard.toml"
        );
    }

    // A batch is acknowledged when all of it is done, and a reader queues the next batch
    // behind it meanwhile: an entry can wait two batches at the deadline in a live replica,
    // which must stay below claim_idle (or another replica takes it) and within the drain,
    // which must stay below the grace period.
    let settings = config.streams.settings_for("orders", &manifest.stream);
    let deadline = Duration::from_millis(
        manifest
            .limits
            .deadline_ms
            .unwrap_or(config.plugins.deadline_ms),
    );
    let batch_time = deadline * (2 * settings.batch) as u32;
    assert!(
        settings.claim_idle > batch_time,
        "claim_idle {:?} must exceed two batches at the deadline, {batch_time:?}",
        settings.claim_idle
    );
    let drain = Duration::from_millis(config.plugins.drain_ms);
    assert!(
        drain >= batch_time,
        "drain {drain:?} leaves no time for two batches"
    );
    let grace = Duration::from_secs(
        pod["terminationGracePeriodSeconds"]
            .as_i64()
            .unwrap_or(30)
            .try_into()?,
    );
    assert!(
        grace > drain,
        "grace period {grace:?} must exceed the drain {drain:?}"
    );
    Ok(())
}

#[test]
fn kubernetes_registry_sidecar_pulls_signed_plugins_into_a_writable_folder() -> anyhow::Result<()> {
    let folder = example_dir("registry");
    let documents = documents_in(&folder)?;
    let deployments = of_kind(&documents, "Deployment");
    assert_eq!(deployments.len(), 1, "one Deployment");
    let pod = &deployments[0]["spec"]["template"]["spec"];
    let container = switchyard_container(pod)?;
    let config = check_switchyard_container(container, Some(&folder.join("switchyard.toml")))?;

    // The sources are references the host accepts, and the folder they land in is the
    // pod's own, writable.
    assert!(
        !config.plugins.sources.is_empty(),
        "the sidecar pulls its plugins"
    );
    assert!(
        !volume(pod, "plugins")?["emptyDir"].is_badvalue(),
        "the plugins folder is an emptyDir the host fills"
    );
    assert_ne!(
        mount(container, "plugins")?["readOnly"].as_bool(),
        Some(true),
        "the host writes pulled plugins into the folder"
    );

    // The configuration file, the signing key and the registry credentials are mounted
    // where the configuration and the environment say.
    let mounted_from = |path: &Path| -> anyhow::Result<&Yaml> {
        let mounts = container["volumeMounts"]
            .as_vec()
            .cloned()
            .unwrap_or_default();
        let found = mounts
            .iter()
            .find(|m| m["mountPath"].as_str().map(Path::new) == path.parent())
            .ok_or_else(|| anyhow::anyhow!("nothing mounted at {}", path.display()))?;
        volume(pod, found["name"].as_str().unwrap_or_default())
    };
    let config_path = config_arg(container)?;
    let config_map = mounted_from(config_path)?["configMap"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let kustomization = of_kind(&documents, "Kustomization");
    let generates = kustomization[0]["configMapGenerator"]
        .as_vec()
        .into_iter()
        .flatten()
        .any(|g| {
            g["name"].as_str() == Some(config_map.as_str())
                && g["files"].as_vec().is_some_and(|files| {
                    files.iter().any(|f| f.as_str() == Some("switchyard.toml"))
                })
        });
    assert!(
        generates,
        "the kustomization generates {config_map} from switchyard.toml"
    );
    assert!(
        !config.plugins.verify.keys.is_empty(),
        "signatures are checked"
    );
    for key in &config.plugins.verify.keys {
        let key = Path::new(key);
        let secret = &mounted_from(key)?["secret"];
        assert!(
            !secret.is_badvalue(),
            "{} comes from a Secret",
            key.display()
        );
    }
    let docker_config = container["env"]
        .as_vec()
        .into_iter()
        .flatten()
        .find(|var| var["name"].as_str() == Some("DOCKER_CONFIG"))
        .and_then(|var| var["value"].as_str())
        .ok_or_else(|| anyhow::anyhow!("no DOCKER_CONFIG: where are the registry credentials?"))?;
    let credentials = &mounted_from(&Path::new(docker_config).join("config.json"))?["secret"];
    let items = credentials["items"].as_vec().cloned().unwrap_or_default();
    assert!(
        items
            .iter()
            .any(|item| item["key"].as_str() == Some(".dockerconfigjson")
                && item["path"].as_str() == Some("config.json")),
        "the docker-registry Secret's .dockerconfigjson is mounted as config.json"
    );
    Ok(())
}
