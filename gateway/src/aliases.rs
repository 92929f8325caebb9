//! The routes users of the original robot apps knew. Each publishes the same command as
//! the API would (drive commands hold for the robot's default time, so a lost `/stop` no
//! longer drives forever) and answers like the API: 202 with the command id.

use std::collections::HashMap;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use fleet_protocol::CommandKind;

use crate::AppState;
use crate::api::{ApiError, CommandResponse, WaitQuery, command_for};

/// A fixed command: robot, command and plain-text payload.
const FIXED: [(&str, &str, CommandKind, &str); 23] = [
    ("/forward", "linus", CommandKind::Drive, "forward"),
    ("/backward", "linus", CommandKind::Drive, "backward"),
    ("/left", "linus", CommandKind::Drive, "left"),
    ("/right", "linus", CommandKind::Drive, "right"),
    ("/stop", "linus", CommandKind::Drive, "stop"),
    ("/north", "torvalds", CommandKind::Drive, "north"),
    ("/south", "torvalds", CommandKind::Drive, "south"),
    ("/west", "torvalds", CommandKind::Drive, "west"),
    ("/east", "torvalds", CommandKind::Drive, "east"),
    ("/stoptwo", "torvalds", CommandKind::Drive, "stop"),
    ("/linuson", "linus", CommandKind::Eyes, "on"),
    ("/linusoff", "linus", CommandKind::Eyes, "off"),
    ("/torvaldson", "torvalds", CommandKind::Eyes, "on"),
    ("/torvaldsoff", "torvalds", CommandKind::Eyes, "off"),
    (
        "/servomin",
        "linus",
        CommandKind::Servo,
        r#"{"servo1":-90}"#,
    ),
    ("/servomid", "linus", CommandKind::Servo, r#"{"servo1":0}"#),
    ("/servomax", "linus", CommandKind::Servo, r#"{"servo1":90}"#),
    (
        "/servomin2",
        "linus",
        CommandKind::Servo,
        r#"{"servo2":-90}"#,
    ),
    ("/servomid2", "linus", CommandKind::Servo, r#"{"servo2":0}"#),
    (
        "/servomax2",
        "linus",
        CommandKind::Servo,
        r#"{"servo2":90}"#,
    ),
    ("/thirty", "linus", CommandKind::Speed, "30%"),
    ("/fifty", "linus", CommandKind::Speed, "50%"),
    ("/full", "linus", CommandKind::Speed, "100%"),
];

/// Every alias path, for the OpenAPI test and the docs.
pub fn paths() -> impl Iterator<Item = &'static str> {
    FIXED
        .iter()
        .map(|(path, ..)| *path)
        .chain(["/servoarm", "/motorpwm"])
}

/// The original stop routes. They are stops like the API's (no origin, token or rate
/// limit check: see `guard::stop`), so they get a router of their own.
const STOPS: [&str; 2] = ["/stop", "/stoptwo"];

/// Every original route but the stops.
pub fn router() -> Router<AppState> {
    let router = Router::new()
        .route("/servoarm", post(servo_arm))
        .route("/motorpwm", post(motor_pwm));
    fixed(router, |path| !STOPS.contains(&path))
}

/// The original stop routes, `/stop` and `/stoptwo`.
pub fn stop_router() -> Router<AppState> {
    fixed(Router::new(), |path| STOPS.contains(&path))
}

fn fixed(mut router: Router<AppState>, take: impl Fn(&str) -> bool) -> Router<AppState> {
    for (path, robot, kind, payload) in FIXED.into_iter().filter(|(path, ..)| take(path)) {
        // A query that does not parse (`?wait=maybe`) is no reason to refuse a stop.
        let handler = move |State(state): State<AppState>,
                            query: Result<Query<WaitQuery>, QueryRejection>,
                            headers: HeaderMap| async move {
            command_for(
                &state,
                robot,
                kind,
                payload.as_bytes(),
                &headers,
                query.is_ok_and(|q| q.wait),
                path,
            )
            .await
        };
        router = router.route(path, get(handler).post(handler));
    }
    router
}

/// Reads form fields (`application/x-www-form-urlencoded`).
fn form(body: &Bytes) -> Result<HashMap<String, String>, ApiError> {
    serde_urlencoded::from_bytes(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_body",
            format!("not a form: {e}"),
        )
    })
}

fn field<'f>(form: &'f HashMap<String, String>, name: &'static str) -> Result<&'f str, ApiError> {
    form.get(name).map(|v| v.trim()).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_payload",
            format!("form field {name} is required"),
        )
    })
}

/// POST /servoarm: form fields `degree` and `degree2` (-90..90) for linus's two servos.
async fn servo_arm(
    State(state): State<AppState>,
    Query(query): Query<WaitQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<CommandResponse, ApiError> {
    let fields = ("degree", "degree2", CommandKind::Servo, "/servoarm");
    two_field_form(&state, query.wait, &headers, &body, fields).await
}

/// POST /motorpwm: form fields `speed` and `speed2` (0..10) for linus's two motors.
async fn motor_pwm(
    State(state): State<AppState>,
    Query(query): Query<WaitQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<CommandResponse, ApiError> {
    let fields = ("speed", "speed2", CommandKind::Speed, "/motorpwm");
    two_field_form(&state, query.wait, &headers, &body, fields).await
}

/// The originals' two-value forms become the two-value text form of the command.
async fn two_field_form(
    state: &AppState,
    wait: bool,
    headers: &HeaderMap,
    body: &Bytes,
    (first, second, kind, route): (&'static str, &'static str, CommandKind, &'static str),
) -> Result<CommandResponse, ApiError> {
    let form = form(body)?;
    let payload = format!("{} {}", field(&form, first)?, field(&form, second)?);
    command_for(
        state,
        "linus",
        kind,
        payload.as_bytes(),
        headers,
        wait,
        route,
    )
    .await
}
