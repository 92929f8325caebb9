//! The node: one robot on one MQTT connection. Commands in, results and state out,
//! availability through the last will, and the dead-man timer that stops the motors when
//! drive commands stop coming or the broker link is lost.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fleet_protocol::trace::TRACESTATE;
use fleet_protocol::{
    Availability, COMMAND_ID_PROPERTY, Command, CommandAddress, CommandEnvelope, CommandKind,
    CommandOutcome, CommandResult, CommandTarget, CommandWarning, DiscoveryDevice, EyesCommand,
    LastCommand, TopicError, Topics, TraceParent, command::validate_id,
};
use fleet_runtime::telemetry::set_remote_parent;
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, Publish, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior, sleep, sleep_until};

use crate::config::NodeConfig;
use crate::driver::{Driver, DriverError};
use crate::metrics::NodeMetrics;
use crate::robot::{CommandFailure, Robot};

/// Answers to fleet-wide commands held back at once (see `NodeConfig::fleet_reply_spread`);
/// past that, a flood of fleet-wide commands is answered at once instead of piling up.
const MAX_DEFERRED_REPLIES: usize = 64;
/// The longest refusal reason kept in the retained state's `last_command.error` (the
/// full one is in the result).
const MAX_STATE_ERROR_CHARS: usize = 200;

/// Largest packet the node accepts. Bigger than any valid command and than the broker's
/// largest packet (1 MiB by default), so that an oversized command reaches the parser
/// and gets an error result instead of killing the link, and an oversized stop is
/// carried out.
const MAX_INCOMING_PACKET: u32 = 2 * 1024 * 1024;
/// Requests queued towards the MQTT event loop.
const OUTGOING_CAPACITY: usize = 1024;
/// QoS 1 publishes (results, state) awaiting their PUBACK at once.
const OUTGOING_INFLIGHT: u16 = 64;
/// Publishes held back while the client's queue is full (see `Node::publish`).
const MAX_UNSENT: usize = 4096;
/// How often a held-back publish is retried.
const UNSENT_RETRY: Duration = Duration::from_millis(5);
/// At most one state publish per this interval; changes in between are folded into the
/// next one (the state is "latest wins"), so a command burst does not double the traffic.
const STATE_INTERVAL: Duration = Duration::from_millis(20);
/// Shortest MQTT keep-alive the client library accepts.
pub const MIN_KEEP_ALIVE: Duration = Duration::from_secs(5);
/// A connection that lasted this long resets the reconnect backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot drive the hardware to its safe state: {0}")]
    Hardware(#[from] DriverError),
}

enum LinkEvent {
    Connected,
    Disconnected(String),
    Message(Box<Received>),
}

/// A message and when the link task took it off the wire (orders it against stops).
struct Received {
    at: Instant,
    publish: Publish,
}

/// Runs the robot until `shutdown` completes, then drives every output to its safe state
/// and says `offline` before leaving.
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

fn mqtt_options(config: &NodeConfig) -> MqttOptions {
    let topics = &config.topics;
    let mut options = MqttOptions::new(
        config.client_id.clone(),
        config.broker.host.clone(),
        config.broker.port,
    );
    // rumqttc refuses (panics on) keep-alives under 5 s; the binary refuses them too.
    options.set_keep_alive(config.keep_alive.max(MIN_KEEP_ALIVE));
    if let Some((username, password)) = &config.credentials {
        options.set_credentials(username.clone(), password.clone());
    }
    // A persistent session: QoS 1 commands sent while the node was briefly away are
    // delivered when it returns (stale ones are refused by their deadline or expiry).
    options.set_clean_start(false);
    options.set_session_expiry_interval(Some(
        u32::try_from(config.session_expiry.as_secs()).unwrap_or(u32::MAX),
    ));
    options.set_max_packet_size(Some(MAX_INCOMING_PACKET));
    // Small packets must leave at once (Nagle plus delayed ACKs adds up to 40 ms).
    let mut network = options.network_options();
    network.set_tcp_nodelay(true);
    options.set_network_options(network);
    if let Some(tls) = &config.tls {
        options.set_transport(tls.transport());
    }
    // rumqttc preallocates a slot per in-flight publish, 65,535 by default (about 13 MB);
    // a node has a handful of publishes in flight.
    options.set_outgoing_inflight_upper_limit(OUTGOING_INFLIGHT);
    options.set_last_will(LastWill::new(
        topics.status(&config.robot.id),
        Availability::Offline.as_str(),
        QoS::AtLeastOnce,
        true,
        None,
    ));
    options
}

/// Polls the MQTT event loop (which also reconnects) and turns what happens into
/// `LinkEvent`s; stop commands go to their own channel. Retries with exponential backoff
/// and full jitter, reset once a connection has been stable.
async fn drive_link(
    mut eventloop: EventLoop,
    topics: Topics,
    events: mpsc::Sender<LinkEvent>,
    stops: mpsc::Sender<Received>,
) {
    let mut backoff = Backoff::default();
    let mut connected_at: Option<Instant> = None;
    let mut failures: u32 = 0;
    loop {
        let polled = tokio::select! {
            polled = eventloop.poll() => polled,
            // The node is gone (stopped or killed): drop the connection with it.
            () = events.closed() => return,
        };
        let event = match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected_at = Some(Instant::now());
                failures = 0;
                LinkEvent::Connected
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let received = Received {
                    at: Instant::now(),
                    publish,
                };
                let topic = String::from_utf8_lossy(&received.publish.topic);
                let stop = CommandAddress::Command(CommandKind::Stop);
                if matches!(topics.parse_command(&topic), Ok((_, address)) if address == stop) {
                    if stops.send(received).await.is_err() {
                        return;
                    }
                    continue;
                }
                LinkEvent::Message(Box::new(received))
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                // rumqttc reports the DISCONNECT before it has flushed it (and whatever
                // was queued before it): keep polling until the broker closes the link.
                let flush = async { while eventloop.poll().await.is_ok() {} };
                let _ = tokio::time::timeout(Duration::from_secs(1), flush).await;
                return;
            }
            Ok(_) => continue,
            Err(error) => {
                fleet_runtime::mqtt_link::fresh_state_after_error(&mut eventloop);
                if connected_at
                    .take()
                    .is_some_and(|at| at.elapsed() >= STABLE_CONNECTION)
                {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                let message = error.to_string();
                failures += 1;
                // Loud at first, then less and less often: a broker that stays away (or a
                // certificate that is not trusted) must be visible without flooding the log.
                if failures.is_power_of_two() {
                    tracing::warn!(error = %message, failures, ?delay, "cannot connect to the broker, retrying");
                } else {
                    tracing::debug!(error = %message, failures, ?delay, "cannot connect to the broker, retrying");
                }
                if events.send(LinkEvent::Disconnected(message)).await.is_err() {
                    return;
                }
                sleep(delay).await;
                continue;
            }
        };
        if events.send(event).await.is_err() {
            return;
        }
    }
}

/// Exponential backoff with full jitter (0.1 s doubling to 5 s).
#[derive(Default)]
struct Backoff {
    attempt: u32,
}

impl Backoff {
    const BASE: Duration = Duration::from_millis(100);
    const CAP: Duration = Duration::from_secs(5);

    fn reset(&mut self) {
        self.attempt = 0;
    }

    fn next_delay(&mut self) -> Duration {
        let ceiling = Self::BASE
            .saturating_mul(1 << self.attempt.min(16))
            .min(Self::CAP);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(rand::random::<f64>())
    }
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

/// A QoS 1 publish the node wants to send.
#[derive(Clone)]
struct OutgoingPublish {
    topic: String,
    retain: bool,
    payload: Vec<u8>,
    properties: Option<PublishProperties>,
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
                () = sleep_until_opt(self.discovery_due) => {
                    self.discovery_due = None;
                    if self.connected { self.announce() }
                }
                event = events.recv() => match event {
                    Some(LinkEvent::Connected) => self.on_connected(),
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

    fn on_connected(&mut self) {
        let topics = &self.config.topics;
        let id = &self.config.robot.id;
        if !self.connected {
            self.connected = true;
            self.metrics.robots_connected.inc();
        }
        self.metrics.connects.inc();
        tracing::info!(robot = %id, broker = %format!("{}:{}", self.config.broker.host, self.config.broker.port), "connected");
        // rumqttc does not restore subscriptions, and the session may be new: subscribe
        // after every connect (repeating a subscription is harmless).
        let mut filters = vec![topics.command_filter(id), topics.fleet_command_filter()];
        if self.config.discovery.enabled {
            // Home Assistant's birth message: it has (re)started and wants discovery again.
            filters.push(self.config.discovery.prefix.status_topic());
        }
        for filter in filters {
            if let Err(error) = self.client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                tracing::error!(%filter, %error, "cannot queue the subscription");
            }
        }
        self.announce();
    }

    /// Availability, then the discovery document, then the state: Home Assistant reads
    /// the retained state once the entities exist.
    fn announce(&mut self) {
        let topics = &self.config.topics;
        let id = &self.config.robot.id;
        self.publish(
            topics.status(id),
            true,
            Availability::Online.as_str().into(),
            None,
        );
        if self.config.discovery.enabled {
            let device = self.discovery_device();
            let payload = serde_json::to_vec(&device.document()).unwrap_or_default();
            self.publish(device.config_topic(), true, payload, None);
            self.metrics.discovery_published.inc();
        }
        self.publish_state();
    }

    fn discovery_device(&self) -> DiscoveryDevice<'_> {
        DiscoveryDevice {
            topics: &self.config.topics,
            prefix: &self.config.discovery.prefix,
            robot: &self.config.robot.id,
            capabilities: self.config.robot.capabilities(),
            sw_version: env!("CARGO_PKG_VERSION"),
            configuration_url: self.config.discovery.configuration_url.as_deref(),
        }
    }

    /// Home Assistant said `online` on its status topic: re-publish after a random delay
    /// (a whole fleet answering at the same instant would be a burst for nothing).
    fn on_home_assistant_status(&mut self, payload: &[u8]) {
        let status = String::from_utf8_lossy(payload);
        if status.trim() != "online" {
            tracing::debug!(status = %status.escape_debug(), "Home Assistant status");
            return;
        }
        if self.discovery_due.is_none() {
            let delay = self
                .config
                .discovery
                .birth_delay_max
                .mul_f64(rand::random::<f64>());
            tracing::info!(?delay, "Home Assistant started: re-publishing discovery");
            self.discovery_due = Some(Instant::now() + delay);
        }
    }

    /// Takes the robot out: empty retained payloads remove it from Home Assistant and
    /// clear its state and availability; then the node leaves without a last will.
    fn clear_retained_topics(&mut self) {
        let topics = &self.config.topics;
        let id = &self.config.robot.id;
        let cleared = [
            self.discovery_device().config_topic(),
            topics.state(id),
            topics.status(id),
        ];
        // A folded state publish must not bring the state back after it was cleared.
        self.state_dirty.set(false);
        for topic in cleared {
            self.publish(topic, true, Vec::new(), None);
        }
        tracing::warn!(robot = %self.robot_name(), "decommissioned: discovery, state and status cleared; leaving");
        self.decommissioned = true;
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
        if self.config.discovery.enabled && topic == self.config.discovery.prefix.status_topic() {
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
            %trace_id,
        );
        if let Some(parent) = &traceparent {
            set_remote_parent(&span, parent, tracestate.as_deref());
        }
        let _entered = span.enter();

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
        .with_warning(warning.map(|w| CommandWarning::new(w.code, w.message)));
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

    fn publish_result(
        &mut self,
        result: &CommandResult,
        response_topic: Option<String>,
        correlation: Option<Bytes>,
    ) {
        let topics = &self.config.topics;
        let topic = match response_topic {
            Some(t)
                if !t.is_empty()
                    && !t.contains(['+', '#', '\0'])
                    && !topics.is_command_topic(&t) =>
            {
                t
            }
            Some(t) => {
                tracing::warn!(response_topic = %t.escape_debug(), "unusable response topic; answering on the result topic");
                topics.result(&self.config.robot.id)
            }
            None => topics.result(&self.config.robot.id),
        };
        let payload = serde_json::to_vec(result).unwrap_or_default();
        let properties = correlation.map(|data| PublishProperties {
            correlation_data: Some(data),
            ..Default::default()
        });
        self.publish(topic, false, payload, properties);
    }

    /// Publishes the state now, or folds it into the next publish when the last one was
    /// less than `STATE_INTERVAL` ago.
    fn publish_state(&self) {
        let too_soon = self
            .state_published_at
            .get()
            .is_some_and(|at| at.elapsed() < STATE_INTERVAL);
        if too_soon {
            self.state_dirty.set(true);
        } else {
            self.publish_state_now();
        }
    }

    fn publish_state_now(&self) {
        self.state_dirty.set(false);
        self.state_published_at.set(Some(Instant::now()));
        let payload = serde_json::to_vec(&self.robot.state(now_ms())).unwrap_or_default();
        self.publish(
            self.config.topics.state(&self.config.robot.id),
            true,
            payload,
            None,
        );
    }

    /// When the held-back work (a folded state, publishes waiting for room) is due.
    fn flush_due(&self) -> Option<Instant> {
        let state = self
            .state_dirty
            .get()
            .then(|| self.state_published_at.get().map(|at| at + STATE_INTERVAL))
            .flatten();
        let unsent = (!self.unsent.borrow().is_empty()).then(|| Instant::now() + UNSENT_RETRY);
        state.into_iter().chain(unsent).min()
    }

    fn flush(&self) {
        if self.state_dirty.get()
            && self
                .state_published_at
                .get()
                .is_none_or(|at| at.elapsed() >= STATE_INTERVAL)
        {
            self.publish_state_now();
        }
        loop {
            let Some(next) = self.unsent.borrow().front().cloned() else {
                return;
            };
            if !self.try_queue(&next) {
                return;
            }
            self.unsent.borrow_mut().pop_front();
        }
    }

    /// Queues a QoS 1 publish without waiting, so the node never blocks on the network
    /// while motors may be running. When the client's queue is full (its event loop
    /// serves incoming packets first, so a burst of commands can outpace the results),
    /// the publish waits in `unsent` and is retried in order; only beyond `MAX_UNSENT`
    /// is one dropped, counted and logged.
    fn publish(
        &self,
        topic: String,
        retain: bool,
        payload: Vec<u8>,
        properties: Option<PublishProperties>,
    ) {
        let message = OutgoingPublish {
            topic,
            retain,
            payload,
            properties,
        };
        let waiting = !self.unsent.borrow().is_empty();
        if !waiting && self.try_queue(&message) {
            return;
        }
        let mut unsent = self.unsent.borrow_mut();
        if unsent.len() < MAX_UNSENT {
            unsent.push_back(message);
        } else {
            self.metrics.publishes_dropped.inc();
            tracing::warn!(topic = %message.topic, held = unsent.len(), "publish dropped: too many publishes waiting for the broker link");
        }
    }

    /// Hands one publish to the MQTT client; false when the client's queue is full.
    fn try_queue(&self, message: &OutgoingPublish) -> bool {
        let OutgoingPublish {
            topic,
            retain,
            payload,
            properties,
        } = message.clone();
        let queued = match properties {
            Some(p) => {
                self.client
                    .try_publish_with_properties(topic, QoS::AtLeastOnce, retain, payload, p)
            }
            None => self
                .client
                .try_publish(topic, QoS::AtLeastOnce, retain, payload),
        };
        queued.is_ok()
    }

    /// Safe state, last state, `offline`, and a clean DISCONNECT (so no will is sent).
    /// A decommissioned node has cleared its topics and leaves them empty.
    async fn leave(&mut self) {
        self.send_deferred_replies(true);
        if self.decommissioned {
            self.motors_deadline = None;
            self.eye_deadline = None;
            if self.connected {
                self.connected = false;
                self.metrics.robots_connected.dec();
            }
            self.flush();
            let _ = self.client.try_disconnect();
            return;
        }
        if let Err(error) = self.robot.safe_state() {
            tracing::error!(robot = %self.robot_name(), %error, "could not reach the safe state on shutdown");
        }
        self.motors_deadline = None;
        self.eye_deadline = None;
        if self.connected {
            self.connected = false;
            self.metrics.robots_connected.dec();
        }
        self.publish_state_now();
        self.publish(
            self.config.topics.status(&self.config.robot.id),
            true,
            Availability::Offline.as_str().into(),
            None,
        );
        self.flush();
        let left_behind = self.unsent.borrow().len();
        if left_behind > 0 {
            tracing::warn!(
                left_behind,
                "leaving with publishes the broker link never took"
            );
        }
        let _ = self.client.try_disconnect();
        tracing::info!(robot = %self.robot_name(), "stopped: outputs safe, status offline");
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

/// A node running in the background (the all-in-one binary and tests run several).
pub struct NodeHandle {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<Ending, NodeError>>,
}

impl NodeHandle {
    /// Shuts the node down cleanly (safe state, `offline`) and waits for it.
    pub async fn stop(mut self) -> Result<(), NodeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.await {
            Ok(outcome) => outcome.map(|_| ()),
            // The task only ends by returning; a join error means it was cancelled.
            Err(_) => Ok(()),
        }
    }

    /// Ends the node abruptly, like `kill -9`: no safe state, no `offline`, no
    /// DISCONNECT. The broker publishes the last will.
    pub fn kill(mut self) {
        self.stop.take();
        self.task.abort();
    }
}

/// Starts a node on the current runtime.
pub fn spawn(config: NodeConfig, driver: Box<dyn Driver>, metrics: Arc<NodeMetrics>) -> NodeHandle {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(run(config, driver, metrics, async {
        let _ = stopped.await;
    }));
    NodeHandle {
        stop: Some(stop),
        task,
    }
}
