//! Sending commands: the MQTT 5 publish with its properties and spans, and the table of
//! commands awaiting their result (for `?wait=true`, the prober, and latency metrics).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use fleet_protocol::trace::{TRACEPARENT, TRACESTATE};
use fleet_protocol::{
    COMMAND_ID_PROPERTY, Command, CommandEnvelope, Direction, EstopLatch, OPERATOR_PROPERTY,
    RobotId, TraceParent,
};
use fleet_runtime::telemetry::{set_remote_parent, traceparent_of};
use rumqttc::v5::ClientError;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde_json::Value;
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::AppState;
use crate::api::ApiError;

/// Commands tracked at once; beyond this, new commands go out untracked (no latency, no
/// wait) rather than growing the table without bound.
const MAX_PENDING: usize = 10_000;
/// A result later than this is not matched any more.
const PENDING_TTL: Duration = Duration::from_secs(60);

struct Entry {
    sent_at: Instant,
    /// The robot the command went to; `None` for a fleet-wide command (any robot
    /// answers it, on its own result topic).
    robot: Option<RobotId>,
    waiter: Option<oneshot::Sender<Value>>,
}

/// Why a result did not resolve a pending command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmatched {
    /// No command with this id is awaiting a result (never sent, answered, or expired).
    UnknownId,
    /// The command went to another robot (or to the whole fleet, for a reply topic).
    WrongRobot,
}

impl Unmatched {
    pub fn reason(self) -> &'static str {
        match self {
            Unmatched::UnknownId => "unknown_id",
            Unmatched::WrongRobot => "robot_mismatch",
        }
    }
}

/// Commands this gateway sent whose result has not come back yet.
#[derive(Default)]
pub struct Pending {
    entries: Mutex<HashMap<String, Entry>>,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts tracking `id`, sent to `robot`. Returns false when the table is full.
    fn track(
        &self,
        id: &str,
        robot: Option<RobotId>,
        waiter: Option<oneshot::Sender<Value>>,
    ) -> bool {
        let mut entries = self.lock();
        if entries.len() >= MAX_PENDING {
            entries.retain(|_, e| e.sent_at.elapsed() < PENDING_TTL);
        }
        if entries.len() >= MAX_PENDING {
            return false;
        }
        entries.insert(
            id.to_owned(),
            Entry {
                sent_at: Instant::now(),
                robot,
                waiter,
            },
        );
        true
    }

    fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    /// A result from `robot` arrived: when the command `id` went to that robot (or,
    /// with `fleet_wide`, to the whole fleet), hands it to a waiting request and returns
    /// how long it took and whether someone waited. Anything else leaves the table as it
    /// is, so a result from one robot can never answer a command to another.
    pub fn resolve(
        &self,
        id: &str,
        robot: &str,
        fleet_wide: bool,
        result: &Value,
    ) -> Result<(Duration, bool), Unmatched> {
        let entry = {
            let mut entries = self.lock();
            let entry = entries.get(id).ok_or(Unmatched::UnknownId)?;
            let agrees = match &entry.robot {
                Some(sent_to) => sent_to.as_str() == robot,
                None => fleet_wide,
            };
            if !agrees {
                return Err(Unmatched::WrongRobot);
            }
            entries.remove(id).ok_or(Unmatched::UnknownId)?
        };
        let waited = entry.waiter.is_some();
        if let Some(waiter) = entry.waiter {
            let _ = waiter.send(result.clone());
        }
        Ok((entry.sent_at.elapsed(), waited))
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a command goes.
pub struct Target {
    pub topic: String,
    /// The topic with the robot replaced by `+` (metrics and span names).
    pub template: String,
    /// The robot, or `None` for the whole fleet.
    pub robot: Option<RobotId>,
}

/// Whether a command stops a robot: such a command is never refused for load (it waits
/// for room in the MQTT queue instead) and never waits in vain for a full table.
pub fn is_stop(command: &Command) -> bool {
    matches!(
        command,
        Command::Stop
            | Command::Drive {
                direction: Direction::Stop,
                ..
            }
    )
}

/// What a sent command turned into.
pub enum Sent {
    /// Published; the robot answers later.
    Accepted {
        id: String,
        traceparent: Option<TraceParent>,
    },
    /// Published and answered in time.
    Answered(Value),
}

/// Publishes a command (QoS 1, not retained) in its canonical JSON form, with the command
/// id, trace context, expiry, response topic and correlation data as MQTT 5 properties.
/// With `wait`, waits that long for the robot's result (504 when it does not come).
///
/// The response topic is the addressed robot's own reply topic of this gateway; a
/// fleet-wide command has none (every robot answers on its own result topic), so no
/// robot is ever asked to answer on another's topic.
pub async fn send(
    state: &AppState,
    target: Target,
    mut envelope: CommandEnvelope,
    headers: &HeaderMap,
    wait: Option<Duration>,
) -> Result<Sent, ApiError> {
    if !state.fleet.is_connected() {
        return Err(broker_unavailable());
    }
    // Who sends it: the operator the guard identified, never what the body claims.
    let operator = crate::guard::current_operator();
    if envelope.command == Command::Decommission {
        crate::guard::require_admin(operator.as_ref(), "decommissioning a robot")?;
    }
    envelope.operator = operator.map(|o| o.name);
    if state.fleet.latch_engaged() && envelope.command.moves() {
        // The robots refuse it too; this says so at once, without a round trip.
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "estop_engaged",
            "the fleet e-stop is latched; nothing moves until it is released (DELETE /api/fleet/estop)",
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
        otel.name = %format!("send {}", target.template),
        otel.kind = "producer",
        messaging.system = "mqtt",
        messaging.operation.type = "send",
        messaging.destination.name = %target.topic,
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
    // The operator goes both ways: as a property (MQTT 5) and in the payload (3.1.1
    // subscribers and the audit trail read it there).
    if let Some(name) = &envelope.operator {
        user_properties.push((OPERATOR_PROPERTY.to_owned(), name.clone()));
    }
    let properties = PublishProperties {
        message_expiry_interval: expiry_seconds(&envelope.command),
        payload_format_indicator: Some(1),
        content_type: Some("application/json".to_owned()),
        response_topic: target
            .robot
            .as_ref()
            .map(|robot| state.fleet.topics().gateway_reply(&state.instance, robot)),
        correlation_data: Some(Bytes::from(id.clone())),
        user_properties,
        ..PublishProperties::default()
    };
    let command = envelope.command.kind();
    let stop = is_stop(&envelope.command);
    let payload = envelope.to_json().to_string();

    let (waiter, mut answer) = match wait {
        Some(timeout) => {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some((rx, timeout)))
        }
        None => (None, None),
    };
    if !state.pending.track(&id, target.robot.clone(), waiter) && wait.is_some() {
        if !stop {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "overloaded",
                "too many commands awaiting results; retry shortly",
            ));
        }
        // A stop goes out all the same; nobody can wait for its result then.
        answer = None;
    }
    let queued = if stop {
        queue_stop(state, &target.topic, payload, properties)
            .instrument(producer.clone())
            .await
    } else {
        // Never wait for room in the MQTT queue: a full queue is an overload, answered
        // at once.
        let _in_producer = producer.enter();
        state
            .mqtt
            .try_publish_with_properties(
                target.topic.clone(),
                QoS::AtLeastOnce,
                false,
                payload,
                properties,
            )
            .map_err(|error| match error {
                ClientError::TryRequest(_) => ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "overloaded",
                    "the gateway's MQTT queue is full; retry shortly",
                ),
                other => cannot_queue(&other),
            })
    };
    if let Err(error) = queued {
        state.pending.forget(&id);
        return Err(error);
    }
    state.metrics.record_command(
        command.as_str(),
        &target.template,
        target.robot.as_ref().map(RobotId::as_str),
    );
    tracing::info!(topic = %target.topic, %id, trace_id = %traceparent.map(|t| t.trace_id_hex()).unwrap_or_default(), "command published");

    let Some((answer, timeout)) = answer else {
        return Ok(Sent::Accepted { id, traceparent });
    };
    match tokio::time::timeout(timeout, answer)
        .instrument(tracing::info_span!("wait for result", %id))
        .await
    {
        Ok(Ok(result)) => Ok(Sent::Answered(result)),
        _ => {
            state.pending.forget(&id);
            Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!(
                    "no result from the robot within {} ms (command id {id})",
                    timeout.as_millis()
                ),
            ))
        }
    }
}

/// Queues a stop, waiting for room in the MQTT client's queue when it is full (a stop is
/// never refused for load), unless the broker link goes down meanwhile: then nothing can
/// be sent, and the robots stop by themselves on losing the link.
async fn queue_stop(
    state: &AppState,
    topic: &str,
    payload: String,
    properties: PublishProperties,
) -> Result<(), ApiError> {
    queue_urgent(state, topic, false, payload, properties).await
}

/// Queues the latch (retained) the way a stop is queued: see [`queue_stop`].
pub(crate) async fn queue_latch(state: &AppState, latch: &EstopLatch) -> Result<(), ApiError> {
    let payload = serde_json::to_string(latch).unwrap_or_default();
    let topic = state.fleet.topics().estop();
    queue_urgent(state, &topic, true, payload, PublishProperties::default()).await
}

async fn queue_urgent(
    state: &AppState,
    topic: &str,
    retain: bool,
    payload: String,
    properties: PublishProperties,
) -> Result<(), ApiError> {
    let publish = state.mqtt.publish_with_properties(
        topic.to_owned(),
        QoS::AtLeastOnce,
        retain,
        payload,
        properties,
    );
    let mut link = state.fleet.link();
    tokio::select! {
        queued = publish => queued.map_err(|error| cannot_queue(&error)),
        _ = link.wait_for(|up| !up) => Err(broker_unavailable()),
    }
}

fn broker_unavailable() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "broker_unavailable",
        "the gateway is not connected to the MQTT broker",
    )
}

fn cannot_queue(error: &ClientError) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "broker_unavailable",
        format!("cannot queue the command: {error}"),
    )
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
pub fn http_span(
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
