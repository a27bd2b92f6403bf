//! The admin HTTP endpoint (loopback by default): `/healthz`, `/readyz`, `/plugins` and
//! `/metrics` (Prometheus, see [`metrics`]).
//!
//! It only reads shared state; nothing here can slow the message path.

pub mod metrics;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::effects::outputs::Outputs;
use crate::plugins::Registry;
use crate::router::Router;
use crate::source::{Source, SourceStatus};

/// Whether the host is ready to route, and why not.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Readiness {
    /// Subscribed, every plugin in the folder loaded or rejected, every registry source
    /// installed, and Redis publishing the keyspace notifications key subscriptions need
    /// (`source.keyspace_events` says what it lacks).
    pub ready: bool,
    /// The subscriber connection's state.
    pub source: SourceStatus,
    /// Whether every plugin file in the folder has been loaded or rejected.
    pub plugins_scanned: bool,
    /// Plugin files readiness waits for: new, still being written, or being loaded; and
    /// registry sources that have not installed a version yet (`NAME (registry source)`).
    pub plugins_pending: Vec<String>,
}

/// Readiness from its parts.
pub(crate) fn readiness(source: &Source, registry: &Registry) -> Readiness {
    let source = source.status();
    let plugins_scanned = registry.scanned();
    let mut plugins_pending: Vec<String> = registry
        .pending()
        .map(|names| names.iter().map(ToString::to_string).collect())
        .unwrap_or_default();
    // A plugin whose registry source has installed nothing yet has no file to wait for.
    let sources_pending = registry.sources().map(|s| s.pending()).unwrap_or_default();
    let sources_ready = sources_pending.is_empty();
    plugins_pending.extend(
        sources_pending
            .into_iter()
            .map(|name| format!("{name} (registry source)")),
    );
    Readiness {
        ready: source.connected
            && source.keyspace_events.is_none()
            && plugins_scanned
            && sources_ready,
        source,
        plugins_scanned,
        plugins_pending,
    }
}

/// What the endpoints read.
pub struct AdminState {
    /// The Prometheus registry behind `/metrics`.
    pub metrics: prometheus_client::registry::Registry,
    /// The plugins.
    pub registry: Arc<Registry>,
    /// The subscriber connection.
    pub source: Source,
    /// The router's counters.
    pub router: Arc<Router>,
    /// The outputs' counters.
    pub outputs: Arc<Outputs>,
    /// The name of the host's subscriber connection (CLIENT SETNAME), if it names one, so that
    /// `switchyard status` finds this host's own entry in `CLIENT LIST`.
    pub client_name: Option<String>,
}

/// Serves the admin endpoints on `listener` until `stop`.
pub fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AdminState>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let app = axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/plugins", get(plugins))
        .route("/metrics", get(metrics_text))
        .with_state(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        {
            tracing::error!("admin endpoint failed: {e}");
        }
    })
}

/// Alive: the process answers.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready: subscribed, and every plugin in the folder loaded or rejected. The body says why
/// not.
async fn readyz(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    let readiness = readiness(&state.source, &state.registry);
    let code = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(readiness))
}

/// Prometheus text of every counter: OpenMetrics, with exemplars, when the scraper's `Accept`
/// asks for it; the Prometheus text format otherwise (see [`metrics::Format`]).
async fn metrics_text(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
) -> impl IntoResponse {
    let format = metrics::Format::negotiate(
        headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|value| value.to_str().ok()),
    );
    // The answer depends on `Accept`: a cache in between must keep the two apart.
    match format.encode(&state.metrics) {
        Ok(body) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, format.content_type()),
                (header::VARY, "Accept"),
            ],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [
                (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                (header::VARY, "Accept"),
            ],
            format!("cannot encode metrics: {e}"),
        ),
    }
}

/// Every plugin with its version, subscriptions, grants and counters, every output's
/// counters, and the subscriber connection's state and name in Redis.
async fn plugins(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    let (queued, budget) = state.registry.queue_budget();
    Json(serde_json::json!({
        "queue_bytes": queued,
        "queue_bytes_total": budget,
        "received": state.router.received(),
        "unrouted": state.router.unrouted(),
        "oversize": state.router.oversize(),
        "source": state.source.status(),
        "redis_client_name": state.client_name,
        "plugins": state.registry.report(),
        "outputs": state.outputs.report(),
    }))
}
