//! The MQTT link: connection options, the event loop with its reconnect backoff, and what
//! it hands the node (connects, losses, messages with their arrival time; stops on a
//! channel of their own).

use std::time::Duration;

use fleet_protocol::{Availability, CommandAddress, CommandKind, Topics};
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, Publish, SubscribeReasonCode};
use rumqttc::v5::{Event, EventLoop, MqttOptions};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep};

use crate::config::NodeConfig;

/// Largest packet the node accepts. Bigger than any valid command and than the broker's
/// largest packet (1 MiB by default), so that an oversized command reaches the parser
/// and gets an error result instead of killing the link, and an oversized stop is
/// carried out.
const MAX_INCOMING_PACKET: u32 = 2 * 1024 * 1024;
/// Requests queued towards the MQTT event loop.
pub(super) const OUTGOING_CAPACITY: usize = 1024;
/// QoS 1 publishes (results, state) awaiting their PUBACK at once.
const OUTGOING_INFLIGHT: u16 = 64;
/// Shortest MQTT keep-alive the client library accepts.
pub const MIN_KEEP_ALIVE: Duration = Duration::from_secs(5);
/// A connection that lasted this long resets the reconnect backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

pub(super) enum LinkEvent {
    Connected,
    /// The broker answered the connection's first SUBSCRIBE, the latch's.
    LatchSubscribed {
        granted: bool,
    },
    Disconnected(String),
    Message(Box<Received>),
}

/// A message and when the link task took it off the wire (orders it against stops).
pub(super) struct Received {
    pub(super) at: Instant,
    pub(super) publish: Publish,
}

pub(super) fn mqtt_options(config: &NodeConfig) -> MqttOptions {
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
pub(super) async fn drive_link(
    mut eventloop: EventLoop,
    topics: Topics,
    events: mpsc::Sender<LinkEvent>,
    stops: mpsc::Sender<Received>,
) {
    let mut backoff = Backoff::default();
    let mut connected_at: Option<Instant> = None;
    let mut failures: u32 = 0;
    // The node subscribes to the latch first after every connect: the first SUBSCRIBE
    // that goes out after a CONNACK is that one, and its SUBACK says whether it is granted.
    let mut latch_subscribe_due = false;
    let mut latch_pkid: Option<u16> = None;
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
                latch_subscribe_due = true;
                latch_pkid = None;
                LinkEvent::Connected
            }
            Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) if latch_subscribe_due => {
                latch_subscribe_due = false;
                latch_pkid = Some(pkid);
                continue;
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) if latch_pkid == Some(ack.pkid) => {
                latch_pkid = None;
                let granted = ack
                    .return_codes
                    .iter()
                    .all(|code| matches!(code, SubscribeReasonCode::Success(_)));
                LinkEvent::LatchSubscribed { granted }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let received = Received {
                    at: Instant::now(),
                    publish,
                };
                let topic = String::from_utf8_lossy(&received.publish.topic);
                let stop = CommandAddress::Command(CommandKind::Stop);
                // Stops and the latch skip the queue of commands.
                let urgent = topics.is_estop(&topic)
                    || matches!(topics.parse_command(&topic), Ok((_, address)) if address == stop);
                if urgent {
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
