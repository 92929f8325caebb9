//! The node: one robot on one MQTT connection. Commands in, results and state out,
//! availability through the last will, and the dead-man timer that stops the motors when
//! drive commands stop coming or the broker link is lost.
//!
//! This module dispatches commands; `link` runs the MQTT connection, `outbox` sends
//! (results, state, held-back publishes), `presence` announces the robot and leaves.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fleet_protocol::trace::TRACESTATE;
use fleet_protocol::{
    COMMAND_ID_PROPERTY, Command, CommandAddress, CommandEnvelope, CommandKind, CommandOutcome,
    CommandResult, CommandTarget, CommandWarning, EyesCommand, LastCommand, OPERATOR_PROPERTY,
    TopicError, TraceParent,
    command::{validate_id, validate_operator},
};
use fleet_runtime::telemetry::set_remote_parent;
use rumqttc::v5::AsyncClient;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior, sleep_until};

use crate::config::NodeConfig;
use crate::driver::{Driver, DriverError};
use crate::metrics::NodeMetrics;
use crate::robot::{CommandFailure, Robot};

mod handle;
mod latch;
mod link;
mod outbox;
mod presence;

pub use handle::{NodeHandle, spawn};
use latch::Latch;
pub use link::MIN_KEEP_ALIVE;
use link::{LinkEvent, OUTGOING_CAPACITY, Received, drive_link, mqtt_options};
use outbox::OutgoingPublish;

/// Answers to fleet-wide commands held back at once (see `NodeConfig::fleet_reply_spread`);
/// past that, a flood of fleet-wide commands is answered at once instead of piling up.
const MAX_DEFERRED_REPLIES: usize = 64;
/// The longest refusal reason kept in the retained state's `last_command.error` (the
/// full one is in the result).
const MAX_STATE_ERROR_CHARS: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot drive the hardware to its safe state: {0}")]
    Hardware(#[from] DriverError),
}

/// Why a node stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Told to (`shutdown`, SIGTERM, Ctrl-C).
    Stopped,
    /// A `decommission` command took the robot out of the fleet. A supervisor should not
    /// start it again (the systemd unit's `RestartPreventExitStatus`, see
    /// [`DECOMMISSIONED_EXIT_CODE`]).
    Decommissioned,
}

/// The robot-node binary's exit status after a decommission: not a failure, and not to
/// be restarted. (Exit statuses 0 and 1 are a clean stop and an error.)
pub const DECOMMISSIONED_EXIT_CODE: u8 = 10;

/// Runs the robot until `shutdown` completes, then drives every output to its safe state
/// and says `offline` before leaving.
pub async fn run(
    config: NodeConfig,
    driver: Box<dyn Driver>,
    metrics: Arc<NodeMetrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<Ending, NodeError> {
    let robot = Robot::new(config.robot.clone(), driver)?;
    let (client, eventloop) = AsyncClient::new(mqtt_options(&config), OUTGOING_CAPACITY);
    let (events_tx, mut events) = mpsc::channel(256);
    // Stops skip the queue: a backlog of drive commands must not delay an e-stop.
    let (stops_tx, mut stops) = mpsc::channel(64);
    let link = tokio::spawn(drive_link(
        eventloop,
        config.topics.clone(),
        events_tx,
        stops_tx,
    ));
    let mut node = Node {
        id_nonce: rand::random::<u32>(),
        next_id: 0,
        config,
        robot,
        client,
        metrics,
        connected: false,
        motors_deadline: None,
        eye_deadline: None,
        last_stop_received: None,
        discovery_due: None,
        latch: Latch::default(),
        latch_settled_due: None,
        deferred_replies: Vec::new(),
        decommissioned: false,
        unsent: RefCell::default(),
        state_dirty: Cell::new(false),
        state_published_at: Cell::new(None),
    };
    let metrics = node.metrics.clone();
    tokio::select! {
        biased;
        () = node.serve(&mut events, &mut stops, shutdown) => {}
        // Never ends; goes with the node (also when the node's task is aborted).
        () = metrics.report_held_back_log_lines() => {}
    }
    node.leave().await;
    // The link task ends once the last publishes and the DISCONNECT are written (the
    // receivers stay open until then: closing them would end it before it flushed);
    // don't wait forever for a dead link.
    let _ = tokio::time::timeout(Duration::from_secs(1), link).await;
    drop((events, stops));
    Ok(if node.decommissioned {
        Ending::Decommissioned
    } else {
        Ending::Stopped
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

struct Node {
    config: NodeConfig,
    robot: Robot,
    client: AsyncClient,
    metrics: Arc<NodeMetrics>,
    connected: bool,
    id_nonce: u32,
    next_id: u64,
    motors_deadline: Option<Instant>,
    eye_deadline: Option<Instant>,
    /// When the latest stop was received: commands received before it are stale.
    last_stop_received: Option<Instant>,
    /// When to re-publish discovery (a random moment after Home Assistant's birth message).
    discovery_due: Option<Instant>,
    /// The fleet's latched e-stop as this node knows it.
    latch: Latch,
    /// When the granted latch subscription has settled (see `latch::LATCH_SETTLE`).
    latch_settled_due: Option<Instant>,
    /// Answers to fleet-wide commands waiting for their moment.
    deferred_replies: Vec<DeferredReply>,
    /// Set by `decommission`: the node clears its topics and leaves.
    decommissioned: bool,
    /// Publishes (results first of all) waiting for room in the client's queue.
    unsent: RefCell<VecDeque<OutgoingPublish>>,
    /// The state changed since the last state publish, which was too recent to repeat.
    state_dirty: Cell<bool>,
    state_published_at: Cell<Option<Instant>>,
}

/// The answer to a fleet-wide command, held back until `due` (see
/// `NodeConfig::fleet_reply_spread`).
struct DeferredReply {
    due: Instant,
    result: CommandResult,
    response_topic: Option<String>,
    correlation: Option<Bytes>,
    with_state: bool,
}

impl Node {
    async fn serve(
        &mut self,
        events: &mut mpsc::Receiver<LinkEvent>,
        stops: &mut mpsc::Receiver<Received>,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut heartbeat = tokio::time::interval_at(
            Instant::now() + self.config.heartbeat,
            self.config.heartbeat,
        );
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            // `biased`: shutdown first, then stops, then timers, then everything else.
            tokio::select! {
                biased;
                () = &mut shutdown => return,
                Some(stop) = stops.recv() => self.on_message(stop),
                () = sleep_until_opt(self.motors_deadline) => self.dead_man_stop(),
                () = sleep_until_opt(self.eye_deadline) => self.end_blink(),
                () = sleep_until_opt(self.next_reply_due()) => self.send_deferred_replies(false),
                () = sleep_until_opt(self.latch_settled_due) => self.on_latch_settled(),
                () = sleep_until_opt(self.discovery_due) => {
                    self.discovery_due = None;
                    if self.connected { self.announce() }
                }
                event = events.recv() => match event {
                    Some(LinkEvent::Connected) => self.on_connected(),
                    Some(LinkEvent::LatchSubscribed { granted }) => self.on_latch_subscribed(granted),
                    Some(LinkEvent::Disconnected(reason)) => self.on_link_lost(&reason),
                    Some(LinkEvent::Message(received)) => self.on_message(*received),
                    None => return,
                },
                _ = heartbeat.tick() => if self.connected { self.publish_state() },
                () = sleep_until_opt(self.flush_due()) => self.flush(),
            }
            if self.decommissioned {
                return;
            }
        }
    }

    fn robot_name(&self) -> &str {
        self.config.robot.id.as_str()
    }

    fn on_link_lost(&mut self, reason: &str) {
        if self.connected {
            self.connected = false;
            self.metrics.robots_connected.dec();
            tracing::warn!(robot = %self.robot_name(), reason, "lost the broker connection");
        }
        if self.robot.is_moving() {
            self.metrics.link_loss_stops.inc();
            tracing::warn!(robot = %self.robot_name(), "stopping the motors: no broker link");
            self.stop_motors_now();
        }
    }

    fn dead_man_stop(&mut self) {
        self.metrics.dead_man_stops.inc();
        tracing::info!(robot = %self.robot_name(), "no drive refresh within the hold time: stopping the motors");
        self.stop_motors_now();
        self.publish_state();
    }

    fn stop_motors_now(&mut self) {
        self.motors_deadline = None;
        if let Err(error) = self.robot.stop_motors() {
            tracing::error!(robot = %self.robot_name(), %error, "could not stop every motor pin");
        }
    }

    fn end_blink(&mut self) {
        self.eye_deadline = None;
        if let Err(error) = self.robot.set_eye(false) {
            tracing::error!(robot = %self.robot_name(), %error, "could not turn the eye off");
        }
        self.publish_state();
    }

    fn on_message(
        &mut self,
        Received {
            at: received,
            publish,
        }: Received,
    ) {
        let topic = String::from_utf8_lossy(&publish.topic).into_owned();
        if self.config.topics.is_estop(&topic) {
            return self.on_latch(&publish.payload);
        }
        if self.config.discovery.enabled && self.config.discovery.prefix.is_status_topic(&topic) {
            self.on_home_assistant_status(&publish.payload);
            return;
        }
        let properties = publish.properties.unwrap_or_default();
        let user_properties = || {
            properties
                .user_properties
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
        };

        let mut fleet_wide = false;
        // What was wrong with a stop that is carried out all the same.
        let mut warning: Option<CommandFailure> = None;
        let (command_name, parsed) = match self.config.topics.parse_command(&topic) {
            Ok((target, address)) => {
                fleet_wide = target == CommandTarget::All;
                let parsed = if address == CommandAddress::Command(CommandKind::Stop) {
                    // An e-stop is never refused for its payload.
                    let (envelope, problem) = CommandEnvelope::parse_stop(&publish.payload);
                    warning = problem.map(CommandFailure::from);
                    Ok(envelope)
                } else {
                    CommandEnvelope::parse_at(address, &publish.payload)
                        .map_err(CommandFailure::from)
                };
                (address.as_str().to_owned(), parsed)
            }
            Err(error @ TopicError::UnknownCommand(_)) => {
                let name = topic.rsplit('/').next().unwrap_or_default().to_owned();
                let message = error.to_string();
                (
                    name,
                    Err(CommandFailure {
                        code: "unknown_command",
                        message,
                    }),
                )
            }
            Err(error) => {
                let name = topic.rsplit('/').next().unwrap_or_default().to_owned();
                (
                    name,
                    Err(CommandFailure {
                        code: "bad_topic",
                        message: error.to_string(),
                    }),
                )
            }
        };

        let envelope = parsed.as_ref().ok();
        let id = envelope
            .and_then(|e| e.id.clone())
            .or_else(|| {
                user_properties()
                    .find(|(k, v)| *k == COMMAND_ID_PROPERTY && validate_id(v).is_ok())
                    .map(|(_, v)| v.to_owned())
            })
            .unwrap_or_else(|| self.generate_id());
        let traceparent = TraceParent::from_properties(user_properties())
            .or(envelope.and_then(|e| e.traceparent));
        let tracestate = user_properties()
            .find(|(k, _)| k.eq_ignore_ascii_case(TRACESTATE))
            .map(|(_, v)| v.to_owned())
            .or_else(|| envelope.and_then(|e| e.tracestate.clone()));
        // Who sent it: the MQTT 5 user property, else the JSON `operator`. An invalid
        // property is ignored (and logged below, inside the command's span).
        let (operator_property, invalid_operator) =
            match user_properties().find(|(k, _)| *k == OPERATOR_PROPERTY) {
                Some((_, v)) => match validate_operator(v) {
                    Ok(()) => (Some(v.to_owned()), None),
                    Err(error) => (None, Some(error)),
                },
                None => (None, None),
            };
        let operator = operator_property.or_else(|| envelope.and_then(|e| e.operator.clone()));
        let trace_id = traceparent.map(|t| t.trace_id_hex()).unwrap_or_default();
        // An OpenTelemetry consumer span (messaging conventions; `mqtt` is not yet a
        // registered messaging.system value), child of the sender's span.
        let template = if fleet_wide { "all" } else { "+" };
        let span = tracing::info_span!(
            "command",
            otel.name = %format!("process {}/{template}/cmd/{command_name}", self.config.topics.prefix()),
            otel.kind = "consumer",
            messaging.system = "mqtt",
            messaging.operation.type = "process",
            messaging.destination.name = %topic,
            messaging.message.id = %id,
            robot = %self.robot_name(),
            command = %command_name,
            operator = operator.as_deref(),
            %trace_id,
        );
        if let Some(parent) = &traceparent {
            set_remote_parent(&span, parent, tracestate.as_deref());
        }
        let _entered = span.enter();
        if let Some(error) = &invalid_operator
            && let Some(held_back) = self.metrics.log_line("invalid_operator")
        {
            tracing::warn!(%error, held_back, "invalid {OPERATOR_PROPERTY} user property ignored");
        }

        let outcome = parsed.and_then(|envelope| {
            if envelope.command == Command::Stop {
                // A late stop is still safe to carry out: the deadline only warns.
                if let Err(late) = check_deadline(envelope.deadline_ms) {
                    warning.get_or_insert(late);
                }
                self.last_stop_received = Some(received);
                return self.execute(&envelope.command);
            }
            check_deadline(envelope.deadline_ms)?;
            if envelope.command == Command::Decommission && fleet_wide {
                return Err(CommandFailure {
                    code: "not_allowed",
                    message: "decommission addresses one robot, not the whole fleet".to_owned(),
                });
            }
            if self.last_stop_received.is_some_and(|stop| received < stop) {
                // It was queued when a stop overtook it: running it now would undo the stop.
                return Err(CommandFailure {
                    code: "superseded",
                    message: "a stop arrived after this command; not carried out".to_owned(),
                });
            }
            self.latch.check(&envelope.command)?;
            self.execute(&envelope.command)
        });
        if let Some(warning) = &warning {
            self.metrics.record_stop_payload_ignored(warning.code);
            if let Some(held_back) = self.metrics.log_line("stop_payload_ignored") {
                tracing::warn!(code = warning.code, error = %warning.message, held_back, "stop payload ignored; the stop was carried out regardless");
            }
        }
        let result = match &outcome {
            Ok(()) => {
                tracing::info!("command done");
                CommandResult::ok(id.clone(), self.robot_name().to_owned(), &command_name)
            }
            Err(failure) => {
                tracing::warn!(code = failure.code, error = %failure.message, "command refused");
                CommandResult::error(
                    id.clone(),
                    self.robot_name().to_owned(),
                    &command_name,
                    failure.code,
                    failure.message.clone(),
                )
            }
        }
        .with_warning(warning.map(|w| CommandWarning::new(w.code, w.message)))
        .with_operator(operator.clone());
        let known_kind = command_name
            .parse::<CommandAddress>()
            .ok()
            .map(CommandAddress::kind);
        let decommissioning = outcome.is_ok() && known_kind == Some(CommandKind::Decommission);
        // A ping (the gateway's prober) changes nothing, so it is not the "last command".
        let changes_state = known_kind.is_some_and(|k| k != CommandKind::Ping);
        if let Some(kind) = known_kind.filter(|_| changes_state) {
            self.robot.record_last_command(LastCommand {
                id,
                command: kind,
                status: if outcome.is_ok() {
                    CommandOutcome::Ok
                } else {
                    CommandOutcome::Error
                },
                at_ms: Some(now_ms()),
                code: outcome.as_ref().err().map(|f| f.code.to_owned()),
                // The reason may quote the payload: the retained state keeps a short one.
                error: outcome
                    .as_ref()
                    .err()
                    .map(|f| f.message.chars().take(MAX_STATE_ERROR_CHARS).collect()),
                operator,
            });
        }
        let spread = self.config.fleet_reply_spread;
        if fleet_wide && !spread.is_zero() && self.deferred_replies.len() < MAX_DEFERRED_REPLIES {
            self.deferred_replies.push(DeferredReply {
                due: Instant::now() + spread.mul_f64(rand::random::<f64>()),
                result,
                response_topic: properties.response_topic,
                correlation: properties.correlation_data,
                with_state: changes_state,
            });
        } else {
            self.publish_result(
                &result,
                properties.response_topic,
                properties.correlation_data,
            );
            if changes_state {
                self.publish_state();
            }
        }
        let label = known_kind.map_or("other", CommandKind::as_str);
        self.metrics
            .record_command(fleet_wide, label, outcome.is_ok(), received.elapsed());
        if decommissioning {
            self.clear_retained_topics();
        }
    }

    fn next_reply_due(&self) -> Option<Instant> {
        self.deferred_replies.iter().map(|reply| reply.due).min()
    }

    /// Sends the held-back answers whose moment has come (all of them when leaving).
    fn send_deferred_replies(&mut self, all: bool) {
        let now = Instant::now();
        let due: Vec<DeferredReply> = self
            .deferred_replies
            .extract_if(.., |reply| all || reply.due <= now)
            .collect();
        let mut state_changed = false;
        for reply in due {
            self.publish_result(&reply.result, reply.response_topic, reply.correlation);
            state_changed |= reply.with_state;
        }
        if state_changed {
            self.publish_state();
        }
    }

    fn generate_id(&mut self) -> String {
        self.next_id += 1;
        format!(
            "{}-{:08x}-{}",
            self.robot_name(),
            self.id_nonce,
            self.next_id
        )
    }

    /// Applies the robot's own limits, runs the command and arms its timers.
    fn execute(&mut self, command: &Command) -> Result<(), CommandFailure> {
        let hold = match command {
            Command::Drive {
                hold_ms: Some(ms), ..
            } => {
                let asked = Duration::from_millis(u64::from(*ms));
                if asked > self.config.max_hold {
                    return Err(CommandFailure {
                        code: "out_of_range",
                        message: format!(
                            "hold_ms = {ms} is longer than {}'s maximum of {} ms",
                            self.robot_name(),
                            self.config.max_hold.as_millis()
                        ),
                    });
                }
                asked
            }
            _ => self.config.default_hold,
        };
        let blink = match command {
            Command::Eyes(EyesCommand::Blink {
                duration_ms: Some(ms),
            }) => Duration::from_millis(u64::from(*ms)),
            _ => self.config.blink,
        };
        let timers =
            tracing::info_span!("driver", robot = %self.config.robot.id, command = %command.kind())
                .in_scope(|| self.robot.execute(command, hold, blink))?;
        self.motors_deadline = if self.robot.is_moving() {
            timers
                .motors_until
                .map(Instant::from_std)
                .or(self.motors_deadline)
        } else {
            None
        };
        match (timers.eye_until, command) {
            (Some(until), _) => self.eye_deadline = Some(Instant::from_std(until)),
            (None, Command::Eyes(_) | Command::Stop) => self.eye_deadline = None,
            _ => {}
        }
        Ok(())
    }
}

/// Refuses a command whose deadline has passed: it waited too long to be safe to run.
fn check_deadline(deadline_ms: Option<u64>) -> Result<(), CommandFailure> {
    match deadline_ms {
        Some(deadline) if now_ms() > deadline => Err(CommandFailure {
            code: "expired",
            message: format!(
                "the command's deadline passed {} ms ago; not carried out",
                now_ms() - deadline
            ),
        }),
        _ => Ok(()),
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
