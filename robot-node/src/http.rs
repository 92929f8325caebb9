//! The node's small HTTP port: `/metrics` for Prometheus and `/health`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::NodeMetrics;

pub fn app(metrics: Arc<NodeMetrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/health", get(health))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                axum::Json(serde_json::json!({"error": "no such route", "code": "not_found"})),
            )
        })
        .with_state(metrics)
}

async fn metrics_text(
    axum::extract::State(metrics): axum::extract::State<Arc<NodeMetrics>>,
) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            fleet_runtime::exposition::CONTENT_TYPE,
        )],
        metrics.encode(),
    )
}

async fn health(
    axum::extract::State(metrics): axum::extract::State<Arc<NodeMetrics>>,
) -> impl IntoResponse {
    axum::Json(
        serde_json::json!({"health": "ok", "robots_connected": metrics.robots_connected.get()}),
    )
}

/// Serves `/metrics` and `/health` on `addr` until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<NodeMetrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "metrics and health on /metrics, /health");
    // With the header timeout and connection cap every fleet HTTP port has, so that idle
    // or slow clients cannot pile up sockets here either.
    fleet_runtime::http::serve(
        listener,
        app(metrics),
        fleet_runtime::http::HttpLimits::default(),
        fleet_runtime::http::HttpMetrics::default(),
        shutdown,
    )
    .await
}
