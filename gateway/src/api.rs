//! HTTP routes: the page, the REST API, the live event stream, health and metrics.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::from_fn_with_state;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use fleet_protocol::command::MAX_COMMAND_PAYLOAD;
use fleet_protocol::{Command, CommandEnvelope, CommandKind, CommandWarning, RobotId};
use fleet_runtime::log_limit::Admission;
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{Value, json};
use tokio_stream::wrappers::BroadcastStream;
use tracing::Instrument;

use crate::AppState;
use crate::commands::{self, Sent, Target};
use crate::{aliases, guard, metrics, probe};

const INDEX_HTML: &str = include_str!("ui/index.html");
const OPENAPI_JSON: &str = include_str!("openapi.json");

/// The gateway's router. Built from state alone so tests can drive it with `oneshot`.
pub fn app(state: AppState) -> Router {
    // Anything that moves a robot: not from another web site, bearer token (when
    // configured) and rate limit.
    let control = Router::new()
        .route("/api/robots/{robot}/commands/{command}", post(send_command))
        .route("/api/probe", get(probe).post(probe))
        // Releasing the latch lets the fleet move again: a control request.
        .route("/api/fleet/estop", delete(crate::latch::release))
        .merge(aliases::router())
        .route_layer(from_fn_with_state(state.clone(), guard::control));
    let open = Router::new()
        .route("/", get(index))
        .route("/api/openapi.json", get(openapi))
        .route("/api/robots", get(list_robots))
        .route("/api/robots/{robot}", get(get_robot))
        .route("/api/fleet/estop", get(crate::latch::get))
        .route("/api/events", get(events));
    // Both answer only to this gateway's Host names (DNS rebinding).
    let named = open
        .merge(control)
        .route_layer(from_fn_with_state(state.clone(), guard::host));
    // Stops are never refused: no Host, origin, token or rate-limit check; counted.
    let stops = Router::new()
        .route("/api/fleet/stop", post(fleet_stop))
        // Latching is an e-stop: never refused.
        .route("/api/fleet/estop", post(crate::latch::engage))
        .route("/api/robots/{robot}/commands/stop", post(robot_stop))
        .merge(aliases::stop_router())
        .route_layer(from_fn_with_state(state.clone(), guard::stop));
    // Probes and scrapers reach these by address; they carry no control and no state.
    let health = Router::new()
        .route("/health", get(health))
        .route("/status", get(status))
        .route("/healthcheck", get(healthcheck))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text));
    health
        .merge(named)
        .merge(stops)
        .fallback(not_found)
        .with_state(state.clone())
        .layer(from_fn_with_state(state.metrics.clone(), metrics::track))
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
    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
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

/// As the original Flask app answered.
async fn status() -> Json<Value> {
    Json(json!({ "result": "OK - healthy" }))
}

/// As the original FastAPI app answered.
async fn healthcheck() -> Json<Value> {
    Json(json!({ "app_name": "fleet-gateway", "app_status": "ok" }))
}

/// Ready only while the broker link is up: commands would fail otherwise.
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    if state.fleet.is_connected() {
        (StatusCode::OK, Json(json!({ "ready": true })))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "reason": "not connected to the MQTT broker" })),
        )
    }
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON)
}

/// Pings every known robot now and answers with each one's result.
async fn probe(State(state): State<AppState>) -> Json<Value> {
    let results = probe::probe_all(&state).await;
    Json(json!({ "robots": results }))
}

async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            fleet_runtime::exposition::CONTENT_TYPE,
        )],
        fleet_runtime::exposition::merge(
            std::iter::once(state.metrics.encode())
                .chain(state.extra_metrics.iter().map(|source| source())),
        ),
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

/// `?wait=true`: answer with the robot's result instead of 202.
#[derive(Debug, Default, serde::Deserialize)]
pub struct WaitQuery {
    #[serde(default)]
    pub wait: bool,
}

/// 202 with the command id, or 200 with the robot's result.
pub type CommandResponse = (StatusCode, Json<Value>);

async fn send_command(
    State(state): State<AppState>,
    Path((robot, command)): Path<(String, String)>,
    Query(query): Query<WaitQuery>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<CommandResponse, ApiError> {
    let kind: CommandKind = command.parse().map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_command",
            format!(
                "unknown command {command:?} (expected drive, speed, eyes, servo, stop or ping)"
            ),
        )
    })?;
    let body = body.map_err(|rejection| {
        ApiError::new(rejection.status(), "bad_body", rejection.body_text())
    })?;
    command_for(
        &state,
        &robot,
        kind,
        &body,
        &headers,
        query.wait,
        "POST /api/robots/{robot}/commands/{command}",
    )
    .await
}

/// Validates and sends one command to one robot; shared by the API and the aliases.
pub async fn command_for(
    state: &AppState,
    robot: &str,
    kind: CommandKind,
    payload: &[u8],
    headers: &HeaderMap,
    wait: bool,
    route: &'static str,
) -> Result<CommandResponse, ApiError> {
    let robot_id = RobotId::new(robot).map_err(|_| unknown_robot(robot))?;
    let known = state.fleet.robot(robot).is_some();
    let envelope = match CommandEnvelope::parse(kind, payload) {
        Ok(envelope) => envelope,
        Err(_) if !known => return Err(unknown_robot(robot)),
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                e.code(),
                e.to_string(),
            ));
        }
    };
    // A stop goes out to any valid robot id, known or not (one beyond --max-robots, one
    // that has not reported yet): stopping a robot that is not there does no harm.
    if !known && !commands::is_stop(&envelope.command) {
        return Err(unknown_robot(robot));
    }
    send_to(state, robot_id, envelope, headers, wait, route).await
}

/// Sends a validated command to one robot.
async fn send_to(
    state: &AppState,
    robot: RobotId,
    envelope: CommandEnvelope,
    headers: &HeaderMap,
    wait: bool,
    route: &'static str,
) -> Result<CommandResponse, ApiError> {
    let kind = envelope.command.kind();
    let topics = state.fleet.topics();
    let target = Target {
        topic: topics.command(&robot, kind),
        template: format!("{}/+/cmd/{kind}", topics.prefix()),
        robot: Some(robot),
    };
    let span = commands::http_span(route, headers, &envelope);
    let wait = wait.then_some(state.command_timeout);
    let sent = commands::send(state, target, envelope, headers, wait)
        .instrument(span)
        .await?;
    Ok(respond(sent, kind))
}

fn respond(sent: Sent, kind: CommandKind) -> CommandResponse {
    match sent {
        Sent::Answered(result) => (StatusCode::OK, Json(result)),
        Sent::Accepted { id, traceparent } => (
            StatusCode::ACCEPTED,
            Json(json!({
                "id": id,
                "command": kind.as_str(),
                "traceparent": traceparent.map(|t| t.to_string()),
            })),
        ),
    }
}

/// Stops one robot, whatever the body: a stop is never refused for its payload. A body
/// that parses keeps its id and trace context; anything else (bad JSON, an unknown
/// field, too large, not UTF-8, unreadable) becomes a plain stop.
async fn robot_stop(
    State(state): State<AppState>,
    Path(robot): Path<String>,
    query: Result<Query<WaitQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<CommandResponse, ApiError> {
    let robot_id = RobotId::new(&robot).map_err(|_| unknown_robot(&robot))?;
    // The body keeps what it can (id, trace context); what is wrong with it is told in
    // the answer's `warning`, counted and logged, and the stop goes out anyway.
    let (envelope, warning) = match &body {
        Ok(body) => {
            let (envelope, problem) = CommandEnvelope::parse_stop(body);
            (envelope, problem.as_ref().map(CommandWarning::from))
        }
        Err(rejection) => (
            CommandEnvelope::new(Command::Stop),
            Some(CommandWarning::new(
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    "payload_too_large"
                } else {
                    "bad_payload"
                },
                rejection.body_text(),
            )),
        ),
    };
    if let Some(warning) = &warning {
        state.metrics.record_stop_body_ignored(&warning.code);
        if let Admission::Log { held_back } = state
            .log_limit
            .admit("stop_body_ignored", std::time::Instant::now())
        {
            tracing::warn!(%robot, code = %warning.code, problem = %warning.message, held_back, "a stop with a bad body: sent anyway, the body ignored");
        }
    }
    let wait = query.is_ok_and(|q| q.wait);
    let (status, Json(mut answer)) = send_to(
        &state,
        robot_id,
        envelope,
        &headers,
        wait,
        "POST /api/robots/{robot}/commands/stop",
    )
    .await?;
    if let (Some(warning), Some(answer)) = (warning, answer.as_object_mut()) {
        answer.entry("warning").or_insert_with(|| json!(warning));
    }
    Ok((status, Json(answer)))
}

/// Stops every robot (`<prefix>/all/cmd/stop`). Never waits: many robots answer.
async fn fleet_stop(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<CommandResponse, ApiError> {
    let topic = state.fleet.topics().fleet_command(CommandKind::Stop);
    let envelope = CommandEnvelope::new(Command::Stop);
    let span = commands::http_span("POST /api/fleet/stop", &headers, &envelope);
    let target = Target {
        template: topic.clone(),
        topic,
        robot: None,
    };
    let sent = commands::send(&state, target, envelope, &headers, None)
        .instrument(span)
        .await?;
    Ok(respond(sent, CommandKind::Stop))
}

/// Holds one of the `--max-event-streams` places while a live stream is open.
struct StreamSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl StreamSlot {
    fn new(permit: tokio::sync::OwnedSemaphorePermit, state: &AppState) -> Self {
        let gauge = state.metrics.event_streams.clone();
        gauge.inc();
        Self {
            _permit: permit,
            gauge,
        }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Server-sent events: a `snapshot` of every robot first, then each change as it happens.
/// At most `--max-event-streams` at once (each holds a connection and a buffer); beyond
/// that `503 too_many_streams`.
async fn events(
    State(state): State<AppState>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Response> {
    let Ok(permit) = state.event_streams.clone().try_acquire_owned() else {
        state.metrics.record_refusal("too_many_streams");
        if let fleet_runtime::log_limit::Admission::Log { held_back } = state
            .log_limit
            .admit("too_many_streams", std::time::Instant::now())
        {
            tracing::warn!(
                held_back,
                "live event stream refused: too many open (see --max-event-streams)"
            );
        }
        let mut response = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_streams",
            "too many live event streams are open; retry later",
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("10"));
        return Err(response);
    };
    let slot = StreamSlot::new(permit, &state);
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
    let mut closing = state.closing.subscribe();
    let closed = async move {
        let _ = closing.wait_for(|closing| *closing).await;
    };
    // Browsers retry after `retry` ms when the stream ends (restart, deploy, network).
    let retry = stream::once(async { Event::default().retry(Duration::from_secs(1)) });
    let stream = retry
        .chain(snapshot)
        .chain(updates)
        .take_until(closed)
        // The slot is given back when the stream is dropped (client gone, shutdown).
        .map(move |event| {
            let _open = &slot;
            Ok(event)
        });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

async fn snapshot_event(fleet: Arc<crate::Fleet>) -> Event {
    let body = json!({
        "robots": fleet.robots(),
        "broker_connected": fleet.is_connected(),
        // The latched e-stop (`null` before anything was read on its topic).
        "estop": fleet.latch(),
    });
    Event::default().event("snapshot").data(body.to_string())
}
