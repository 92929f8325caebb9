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
    if let Err(error) = axum::serve(listener, app(metrics)).await {
        tracing::error!(%error, "the metrics endpoint stopped");
    }
}
