//! Plugins in any language: notify-router in Rust, Python, JavaScript and C gives the same
//! effects for the same inputs, and `switchyard new` projects build and pass their own tests.

use std::path::{Path, PathBuf};

use serde_json::json;
use switchyard::config::Config;
use switchyard::offline::{self, Target};
use switchyard::scaffold::{self, Lang};
use switchyard_tests::polyglot::{
    NOTIFY_ROUTER_BUILDS, build_plugin, exclusive_build, run_build, target_dir, workspace_root,
};
use switchyard_tests::webhook::Webhook;
use switchyard_tests::{
    NOTIFY_MANIFEST, PATIENCE, RedisServer, Subscriber, TestHost, compile_cache_dir, plugins,
};

/// Every build of notify-router, as (language, component).
fn notify_router_builds() -> anyhow::Result<Vec<(&'static str, PathBuf)>> {
    NOTIFY_ROUTER_BUILDS
        .iter()
        .map(|(lang, folder)| {
            let wasm = match folder {
                None => PathBuf::from(plugins::NOTIFY_ROUTER),
                Some(folder) => build_plugin(folder)?,
            };
            Ok((*lang, wasm))
        })
        .collect()
}

fn fixture(name: &str) -> PathBuf {
    workspace_root()
        .join("tests/fixtures/notify-router")
        .join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_language_gives_the_shared_fixture_s_effects() -> anyhow::Result<()> {
    let inputs = offline::parse_inputs(
        &std::fs::read_to_string(fixture("messages.jsonl"))?,
        "messages.jsonl",
    )?;
    let expected = offline::parse_effects(
        &std::fs::read_to_string(fixture("effects.jsonl"))?,
        "effects.jsonl",
    )?;
    let mut failures = Vec::new();
    for (lang, wasm) in tokio::task::spawn_blocking(notify_router_builds).await?? {
        let target = Target {
            wasm,
            name: Some("notify-router".to_owned()),
            manifest: Some(workspace_root().join("plugins/notify-router/notify-router.toml")),
            config: cached_config(),
        };
        let effects = offline::test(&target, &inputs).await?;
        if let Err(difference) = offline::compare(&effects, &expected) {
            failures.push(format!("{lang}: {difference}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_language_routes_notifications_through_a_real_redis() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let gateway = Webhook::start().await?;
    let config = |lang: &str| {
        let mut config = String::new();
        for kind in ["email", "sms", "push"] {
            config.push_str(&format!(
                "[outputs.{kind}]\nkind = \"http\"\nurl = \"{}\"\n",
                gateway.url(&format!("/{lang}/{kind}"))
            ));
        }
        config
    };
    let builds = tokio::task::spawn_blocking(notify_router_builds).await??;
    let mut received = 0;
    for (lang, wasm) in &builds {
        let wasm = wasm.to_string_lossy();
        let host = TestHost::start_configured(
            &redis,
            &config(lang),
            &[("notify-router", wasm.as_ref(), Some(NOTIFY_MANIFEST))],
        )
        .await?;
        let mut dead = Subscriber::new(&redis, &["notifications:dead"], &[]).await?;
        let sms = json!({"phone": "+15550100", "message": lang});
        redis.publish("notifications:sms", sms.to_string()).await?;
        redis
            .publish("notifications:push", r#"{"device_id":7}"#)
            .await?;

        received += 1;
        let requests = gateway.wait_for(received, PATIENCE).await?;
        let request = &requests[received - 1];
        assert_eq!(request.path, format!("/{lang}/sms"));
        assert_eq!(request.json(), sms, "{lang}");
        let letters = dead.take(1, PATIENCE).await?;
        let letter: serde_json::Value = serde_json::from_slice(&letters[0].payload)?;
        assert_eq!(
            letter["reason"], r#"field "device_id" must be a non-empty string"#,
            "{lang}"
        );
        host.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_projects_build_and_pass_their_own_tests() -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("switchyard-new-")
        .tempdir()?;
    let mut failures = Vec::new();
    for lang in Lang::ALL {
        let name = format!("starter-{}", format!("{lang:?}").to_lowercase());
        let root = scaffold::create(&name, lang, dir.path())?;
        let built = {
            let root = root.clone();
            tokio::task::spawn_blocking(move || build_project(&root)).await?
        };
        if let Err(error) = built {
            failures.push(format!("{lang:?}: {error:#}"));
            continue;
        }
        let target = Target {
            wasm: root.join(format!("{name}.wasm")),
            name: None,
            manifest: None,
            config: cached_config(),
        };
        let inputs = offline::parse_inputs(
            &std::fs::read_to_string(root.join("tests/messages.jsonl"))?,
            "messages.jsonl",
        )?;
        let expected = offline::parse_effects(
            &std::fs::read_to_string(root.join("tests/expected.jsonl"))?,
            "expected.jsonl",
        )?;
        match offline::test(&target, &inputs).await {
            Ok(effects) => {
                if let Err(difference) = offline::compare(&effects, &expected) {
                    failures.push(format!("{lang:?}: {difference}"));
                }
            }
            Err(error) => failures.push(format!("{lang:?}: {error:#}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// Runs a new project's `build.sh`; Rust projects share the plugins' target folder, so the
/// SDK's dependencies are compiled once.
fn build_project(root: &Path) -> anyhow::Result<()> {
    let _one_at_a_time = exclusive_build();
    let cargo_target = target_dir().join("plugins");
    run_build(
        &root.join("build.sh"),
        &[],
        &[("CARGO_TARGET_DIR", cargo_target.as_os_str())],
    )
}

/// The host's defaults, with the compile cache the test hosts share.
fn cached_config() -> Config {
    let mut config = Config::default();
    config.plugins.compile_cache = Some(compile_cache_dir());
    config
}
