//! The fleet's latched e-stop through the gateway (`<prefix>/estop`, retained; see
//! docs/protocol.md, *The latched e-stop*). Engaging it is an e-stop: never refused, no
//! token, no origin check, no rate limit, and a stop to every robot goes out with it.
//! Releasing it lets the fleet move again, so it is a control request, and with
//! operators an admin's.

use axum::Extension;
use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use fleet_protocol::{Command, CommandEnvelope, CommandKind, EstopLatch};
use serde_json::json;
use std::net::SocketAddr;

use crate::AppState;
use crate::api::ApiError;
use crate::commands::{self, Target};
use crate::fleet::now_ms;

/// Longest `reason` kept from a request body.
const MAX_REASON: usize = fleet_protocol::state::MAX_LATCH_TEXT;

/// `GET /api/fleet/estop`: the latch as the gateway last read it.
pub async fn get(State(state): State<AppState>) -> Response {
    Json(view(state.fleet.latch())).into_response()
}

/// `POST /api/fleet/estop`: latch it. An optional JSON body `{"reason": "…"}`; a body
/// that does not parse is ignored, never a reason to refuse.
pub async fn engage(
    State(state): State<AppState>,
    client: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let reason = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|b| {
            b["reason"]
                .as_str()
                .map(|r| r.chars().take(MAX_REASON).collect())
        });
    let latch = EstopLatch::engaged(Some(who(&client)), reason, now_ms());
    // The stop first: it reaches robots that predate the latch too.
    let topic = state.fleet.topics().fleet_command(CommandKind::Stop);
    let target = Target {
        template: topic.clone(),
        topic,
        robot: None,
    };
    let stopped = commands::send(
        &state,
        target,
        CommandEnvelope::new(Command::Stop),
        &headers,
        None,
    )
    .await;
    if let Err(error) = &stopped {
        tracing::warn!(error = %error.message(), "the stop that goes with the latch was not sent");
    }
    commands::queue_latch(&state, &latch).await?;
    state.metrics.record_latch_change(true);
    tracing::warn!(by = ?latch.by, reason = ?latch.reason, "fleet e-stop latched");
    Ok((StatusCode::ACCEPTED, Json(view(Some(latch)))).into_response())
}

/// `DELETE /api/fleet/estop`: release it.
pub async fn release(
    State(state): State<AppState>,
    client: Option<Extension<ConnectInfo<SocketAddr>>>,
) -> Result<Response, ApiError> {
    crate::guard::require_admin(
        crate::guard::current_operator().as_ref(),
        "releasing the latched e-stop",
    )?;
    let latch = EstopLatch {
        at_ms: Some(now_ms()),
        ..EstopLatch::cleared(Some(who(&client)))
    };
    commands::queue_latch(&state, &latch).await?;
    state.metrics.record_latch_change(false);
    tracing::warn!(by = ?latch.by, "fleet e-stop released");
    Ok((StatusCode::ACCEPTED, Json(view(Some(latch)))).into_response())
}

/// Who asked: the operator when the guard identified one, else the client's address.
fn who(client: &Option<Extension<ConnectInfo<SocketAddr>>>) -> String {
    if let Some(operator) = crate::guard::current_operator() {
        return operator.name;
    }
    match client {
        Some(Extension(ConnectInfo(address))) => format!("gateway ({})", address.ip()),
        None => "gateway".to_owned(),
    }
}

fn view(latch: Option<EstopLatch>) -> serde_json::Value {
    match latch {
        Some(latch) => json!({
            "engaged": latch.engaged,
            "by": latch.by,
            "reason": latch.reason,
            "at_ms": latch.at_ms,
            "known": true,
        }),
        // Nothing on the topic: never latched (or deleted), as the robots read it.
        None => json!({ "engaged": false, "known": false }),
    }
}
