//! HTTP routes: the page, the REST API, the live event stream, health and metrics.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use fleet_protocol::command::MAX_COMMAND_PAYLOAD;
use fleet_protocol::trace::{TRACEPARENT, TRACESTATE};
use fleet_protocol::{
    COMMAND_ID_PROPERTY, Command, CommandEnvelope, CommandKind, RobotId, TraceParent,
};
use fleet_runtime::telemetry::{set_remote_parent, traceparent_of};
use futures_util::stream::{self, Stream, StreamExt};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde_json::{Value, json};
use tokio_stream::wrappers::BroadcastStream;
use tracing::Instrument;

use crate::AppState;
use crate::metrics;

const INDEX_HTML: &str = include_str!("ui/index.html");

/// The gateway's router. Built from state alone so tests can drive it with `oneshot`.
pub fn app(state: AppState) -> Router {
    let api = Router::new()
        .route("/", get(index))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/api/robots", get(list_robots))
        .route("/api/robots/{robot}", get(get_robot))
        .route("/api/robots/{robot}/commands/{command}", post(send_command))
        .route("/api/fleet/stop", post(fleet_stop))
        .route("/api/events", get(events))
        .fallback(not_found)
        .with_state(state.clone());
    api.layer(axum::middleware::from_fn_with_state(
        state.metrics.clone(),
        metrics::track,
    ))
    // Room for an oversized command to reach the parser and get a precise 400.
    .layer(DefaultBodyLimit::max(MAX_COMMAND_PAYLOAD * 4))
}

/// An error answer: `{"error": "...", "code": "..."}` with a 4xx/5xx status.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({ "error": self.message, "code": self.code }));
        (self.status, body).into_response()
    }
}

async fn index() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-cache")], Html(INDEX_HTML))
}

async fn health() -> Json<Value> {
    Json(json!({ "health": "ok" }))
}

async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn list_robots(State(state): State<AppState>) -> Json<Value> {
    Json(json!({ "robots": state.fleet.robots(), "broker_connected": state.fleet.is_connected() }))
}

fn unknown_robot(robot: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_robot",
        format!("no robot named {robot:?}"),
    )
}

async fn get_robot(
    State(state): State<AppState>,
    Path(robot): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let view = state
        .fleet
        .robot(&robot)
        .ok_or_else(|| unknown_robot(&robot))?;
    Ok(Json(json!(view)))
}

async fn send_command(
    State(state): State<AppState>,
    Path((robot, command)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Some(robot_id) = RobotId::new(&robot)
        .ok()
        .filter(|_| state.fleet.robot(&robot).is_some())
    else {
        return Err(unknown_robot(&robot));
    };
    let kind: CommandKind = command.parse().map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_command",
            format!("unknown command {command:?} (expected drive, speed, eyes, servo or stop)"),
        )
    })?;
    let body = body.map_err(|rejection| {
        ApiError::new(rejection.status(), "bad_body", rejection.body_text())
    })?;
    let envelope = CommandEnvelope::parse(kind, &body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.code(), e.to_string()))?;
    let topic = state.fleet.topics().command(&robot_id, kind);
    let template = format!("{}/+/cmd/{kind}", state.fleet.topics().prefix());
    let span = http_span(
        "POST /api/robots/{robot}/commands/{command}",
        &headers,
        &envelope,
    );
    publish(&state, topic, &template, envelope, &headers)
        .instrument(span)
        .await
}

async fn fleet_stop(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let topic = state.fleet.topics().fleet_command(CommandKind::Stop);
    let envelope = CommandEnvelope::new(Command::Stop);
    let span = http_span("POST /api/fleet/stop", &headers, &envelope);
    let template = topic.clone();
    publish(&state, topic, &template, envelope, &headers)
        .instrument(span)
        .await
}

/// Publishes a command (QoS 1, not retained) in its canonical JSON form, with the
/// command id, trace context, response topic and correlation data as MQTT 5 properties.
async fn publish(
    state: &AppState,
    topic: String,
    template: &str,
    mut envelope: CommandEnvelope,
    headers: &HeaderMap,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if !state.fleet.is_connected() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker_unavailable",
            "the gateway is not connected to the MQTT broker",
        ));
    }
    let id = envelope
        .id
        .get_or_insert_with(|| format!("{:016x}", rand::random::<u64>()))
        .clone();
    // The producer span (OpenTelemetry messaging conventions) names the hop the robot
    // continues; without span export the gateway makes up the ids itself.
    let producer = tracing::info_span!(
        "publish",
        otel.name = %format!("send {template}"),
        otel.kind = "producer",
        messaging.system = "mqtt",
        messaging.operation.type = "send",
        messaging.destination.name = %topic,
        messaging.message.id = %id,
    );
    let traceparent =
        traceparent_of(&producer).or_else(|| outgoing_traceparent(headers, envelope.traceparent));
    let tracestate = headers
        .get(TRACESTATE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(envelope.tracestate.clone());
    // Trace context travels as user properties; keep the payload free of it.
    envelope.traceparent = None;
    envelope.tracestate = None;

    let mut user_properties = vec![(COMMAND_ID_PROPERTY.to_owned(), id.clone())];
    if let Some(tp) = traceparent {
        user_properties.push((TRACEPARENT.to_owned(), tp.to_string()));
    }
    if let Some(ts) = tracestate.filter(|t| !t.is_empty()) {
        user_properties.push((TRACESTATE.to_owned(), ts));
    }
    let properties = PublishProperties {
        message_expiry_interval: expiry_seconds(&envelope.command),
        payload_format_indicator: Some(1),
        content_type: Some("application/json".to_owned()),
        response_topic: Some(state.reply_topic.clone()),
        correlation_data: Some(Bytes::from(id.clone())),
        user_properties,
        ..PublishProperties::default()
    };
    let command = envelope.command.kind();
    let payload = envelope.to_json().to_string();
    state
        .mqtt
        .publish_with_properties(topic.clone(), QoS::AtLeastOnce, false, payload, properties)
        .instrument(producer)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "broker_unavailable",
                format!("cannot queue the command: {e}"),
            )
        })?;
    state.metrics.record_command(command.as_str());
    tracing::info!(%topic, %id, trace_id = %traceparent.map(|t| t.trace_id_hex()).unwrap_or_default(), "command published");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "id": id,
            "command": command.as_str(),
            "topic": topic,
            "traceparent": traceparent.map(|t| t.to_string()),
        })),
    ))
}

/// How long a command may wait in a robot's queue (while it is briefly offline) before
/// the broker drops it. A drive that arrives seconds late would move the robot when
/// nobody is holding the button any more; a stop is never stale.
fn expiry_seconds(command: &Command) -> Option<u32> {
    match command {
        Command::Stop => None,
        Command::Drive { hold_ms, .. } => {
            let hold_s = hold_ms.unwrap_or(1000).div_ceil(1000);
            Some(hold_s + 1)
        }
        _ => Some(30),
    }
}

/// The server span of a command request, continuing the caller's trace (the
/// `traceparent` header, or the JSON body's for clients that cannot set headers).
fn http_span(
    route: &'static str,
    headers: &HeaderMap,
    envelope: &CommandEnvelope,
) -> tracing::Span {
    let span = tracing::info_span!(
        "http",
        otel.name = route,
        otel.kind = "server",
        http.request.method = "POST",
        http.route = route,
    );
    let incoming = headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<TraceParent>().ok())
        .or(envelope.traceparent);
    if let Some(parent) = incoming {
        let tracestate = headers.get(TRACESTATE).and_then(|v| v.to_str().ok());
        set_remote_parent(&span, &parent, tracestate);
    }
    span
}

/// Continues the caller's trace (from the `traceparent` header or the JSON body) or
/// starts a new one, with a fresh span id for this hop.
fn outgoing_traceparent(
    headers: &HeaderMap,
    from_body: Option<TraceParent>,
) -> Option<TraceParent> {
    let incoming = headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<TraceParent>().ok())
        .or(from_body);
    let span_id = loop {
        let candidate: [u8; 8] = rand::random();
        if candidate != [0; 8] {
            break candidate;
        }
    };
    match incoming {
        Some(parent) => parent.child(span_id),
        None => TraceParent::new_root(rand::random(), span_id),
    }
}

/// Server-sent events: a `snapshot` of every robot first, then each change as it happens.
async fn events(
    State(state): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let fleet = state.fleet.clone();
    let live = BroadcastStream::new(fleet.subscribe());
    let snapshot = stream::once(snapshot_event(fleet.clone()));
    let updates = live.then(move |item| {
        let fleet = fleet.clone();
        async move {
            match item {
                Ok(event) => Event::default()
                    .event("update")
                    .json_data(&event)
                    .unwrap_or_else(|_| Event::default().comment("unencodable event")),
                // This browser fell behind: send everything again rather than a gap.
                Err(_lagged) => snapshot_event(fleet).await,
            }
        }
    });
    Sse::new(snapshot.chain(updates).map(Ok)).keep_alive(KeepAlive::default())
}

async fn snapshot_event(fleet: Arc<crate::Fleet>) -> Event {
    let body = json!({ "robots": fleet.robots(), "broker_connected": fleet.is_connected() });
    Event::default().event("snapshot").data(body.to_string())
}
