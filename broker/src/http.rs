//! The broker's small HTTP port: `/metrics` for Prometheus and `/health`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::BrokerMetrics;

pub fn app(metrics: Arc<BrokerMetrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route(
            "/health",
            get(|| async { axum::Json(serde_json::json!({"health": "ok"})) }),
        )
        .with_state(metrics)
}

async fn metrics_text(State(metrics): State<Arc<BrokerMetrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            fleet_runtime::exposition::CONTENT_TYPE,
        )],
        metrics.encode(),
    )
}

pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<BrokerMetrics>) {
    // With the header timeout and connection cap every fleet HTTP port has, so that idle
    // or slow clients cannot pile up sockets here either.
    let limits = fleet_runtime::http::HttpLimits::default();
    let served = fleet_runtime::http::serve(
        listener,
        app(metrics),
        limits,
        fleet_runtime::http::HttpMetrics::default(),
        std::future::pending(),
    );
    if let Err(error) = served.await {
        tracing::error!(%error, "the metrics endpoint stopped");
    }
}
