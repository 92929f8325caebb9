//! The gateway's view of the fleet, kept up to date from the broker: each robot's retained
//! state, availability and last result, pushed to browsers as live events.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleet_protocol::{Availability, EstopLatch, RobotId, Topics};
use fleet_runtime::log_limit::{Admission, LogLimiter, quoted};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{broadcast, watch};

use crate::commands::Pending;
use crate::metrics::Metrics;

/// Default of `--max-robots`: ten times the largest fleet measured on one broker
/// (docs/benchmarks.md); about 1 KiB each.
pub const DEFAULT_MAX_ROBOTS: usize = 10_000;

/// What the gateway knows about one robot.
#[derive(Debug, Clone, Serialize, Default)]
pub struct RobotView {
    pub id: String,
    /// `None` until the robot's retained status has been seen.
    pub online: Option<bool>,
    pub state: Option<Value>,
    pub last_result: Option<Value>,
    /// Milliseconds since the Unix epoch of the last message from the robot.
    pub last_seen_ms: Option<u64>,
}

/// A change pushed to browsers: `{"type":"state","robot":"linus","data":{...}}`.
#[derive(Debug, Clone, Serialize)]
pub struct LiveEvent {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub robot: String,
    pub data: Value,
}

pub struct Fleet {
    topics: Topics,
    robots: RwLock<BTreeMap<String, RobotView>>,
    /// Robots learnt from their state and status topics stop here; later ones are
    /// ignored. Anyone allowed to publish there could otherwise make up ids until the
    /// gateway runs out of memory.
    max_robots: usize,
    /// Whether the broker link is up (a watch, so that a stop waiting for room in the
    /// MQTT queue notices the link going down).
    link: watch::Sender<bool>,
    events: broadcast::Sender<LiveEvent>,
    /// The fleet's latched e-stop as last read on `<prefix>/estop`; `None` before any.
    latch: RwLock<Option<EstopLatch>>,
}

/// Why a message on one of the robots' topics did not change the fleet table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ignored {
    /// Not a state, status or result topic of a valid robot id.
    NotOurs,
    /// A payload that does not parse.
    BadPayload,
    /// A result from a robot the table does not hold: results never add robots.
    UnknownRobot,
    /// A new robot, but the table holds `max_robots` already.
    TableFull,
}

impl Fleet {
    pub fn new(topics: Topics, known: &[RobotId]) -> Self {
        Self::with_capacity(topics, known, DEFAULT_MAX_ROBOTS)
    }

    /// A fleet table that learns at most `max_robots` robots (the known ones count).
    pub fn with_capacity(topics: Topics, known: &[RobotId], max_robots: usize) -> Self {
        let robots = known
            .iter()
            .map(|id| {
                let view = RobotView {
                    id: id.to_string(),
                    ..RobotView::default()
                };
                (id.to_string(), view)
            })
            .collect();
        let (events, _) = broadcast::channel(1024);
        Self {
            topics,
            robots: RwLock::new(robots),
            max_robots,
            link: watch::Sender::new(false),
            events,
            latch: RwLock::new(None),
        }
    }

    /// The latch as last read (`None` before any message on the latch topic).
    pub fn latch(&self) -> Option<EstopLatch> {
        self.latch.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn latch_engaged(&self) -> bool {
        self.latch().is_some_and(|l| l.engaged)
    }

    /// A message on the latch topic, read as the robots read it; browsers hear of it.
    fn absorb_latch(&self, payload: &[u8]) {
        let (latch, problem) = EstopLatch::read(payload);
        if let Some(problem) = problem {
            tracing::warn!(%problem, "latch message");
        }
        let data = serde_json::to_value(&latch).unwrap_or(Value::Null);
        *self.latch.write().unwrap_or_else(|e| e.into_inner()) = Some(latch);
        let _ = self.events.send(LiveEvent {
            kind: "estop",
            robot: String::new(),
            data,
        });
    }

    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    pub fn is_connected(&self) -> bool {
        *self.link.borrow()
    }

    /// Follows the broker link: `true` while it is up.
    pub fn link(&self) -> watch::Receiver<bool> {
        self.link.subscribe()
    }

    /// How many robots the table holds.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn robots(&self) -> Vec<RobotView> {
        self.read().values().cloned().collect()
    }

    pub fn robot(&self, id: &str) -> Option<RobotView> {
        self.read().get(id).cloned()
    }

    /// Looks at every robot in id order, under the table's read lock (no copies).
    pub(crate) fn for_each_robot(&self, f: impl FnMut(&RobotView)) {
        self.read().values().for_each(f);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<LiveEvent> {
        self.events.subscribe()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, RobotView>> {
        // A panic while holding the lock cannot leave a view half-written in a way that
        // matters (each update is one assignment), so a poisoned lock is still usable.
        self.robots.read().unwrap_or_else(|e| e.into_inner())
    }

    fn set_connected(&self, connected: bool) {
        if self.link.send_replace(connected) != connected {
            let _ = self.events.send(LiveEvent {
                kind: "broker",
                robot: String::new(),
                data: Value::Bool(connected),
            });
        }
    }

    /// Folds one message from a robot's own topic into the view. Returns its kind and
    /// robot. State and status may add a robot (up to `max_robots`); results only update
    /// robots the table holds.
    pub(crate) fn absorb(
        &self,
        topic: &str,
        payload: &[u8],
    ) -> Result<(&'static str, RobotId), Ignored> {
        let (kind, robot) = ["state", "status", "result"]
            .into_iter()
            .find_map(|leaf| self.topics.robot_of(topic, leaf).map(|r| (leaf, r)))
            .ok_or(Ignored::NotOurs)?;
        let robot = RobotId::new(robot).map_err(|_| Ignored::NotOurs)?;
        let data = match kind {
            "status" => {
                let text = String::from_utf8_lossy(payload);
                match text.parse::<Availability>() {
                    Ok(a) => Value::Bool(a == Availability::Online),
                    // An empty retained payload clears the status (robot removed).
                    Err(()) if payload.is_empty() => Value::Null,
                    Err(()) => {
                        tracing::warn!(%topic, payload = %text.escape_debug(), "ignoring an unknown status value");
                        return Err(Ignored::BadPayload);
                    }
                }
            }
            _ if payload.is_empty() => Value::Null,
            _ => match serde_json::from_slice::<Value>(payload) {
                Ok(v) => v,
                Err(error) => {
                    tracing::warn!(%topic, %error, "ignoring a robot message that is not JSON");
                    return Err(Ignored::BadPayload);
                }
            },
        };
        self.update(&robot, kind, data, kind != "result")?;
        Ok((kind, robot))
    }

    /// A result that came to this gateway's reply topic of `robot` and answered one of
    /// its commands. Updates the robot's view if the table holds it; never adds one.
    fn absorb_reply(&self, robot: &RobotId, result: &Value) -> Result<(), Ignored> {
        if result["command"] == "ping" {
            // The prober's pings are not what a person did last.
            return Ok(());
        }
        self.update(robot, "result", result.clone(), false)
    }

    fn update(
        &self,
        robot: &RobotId,
        kind: &'static str,
        data: Value,
        may_add: bool,
    ) -> Result<(), Ignored> {
        {
            let mut robots = self.robots.write().unwrap_or_else(|e| e.into_inner());
            let full = robots.len() >= self.max_robots;
            let view = match robots.get_mut(robot.as_str()) {
                Some(view) => view,
                None if !may_add => return Err(Ignored::UnknownRobot),
                None if full => return Err(Ignored::TableFull),
                None => robots
                    .entry(robot.to_string())
                    .or_insert_with(|| RobotView {
                        id: robot.to_string(),
                        ..RobotView::default()
                    }),
            };
            match kind {
                "status" => view.online = data.as_bool(),
                "state" => view.state = Some(data.clone()).filter(|d| !d.is_null()),
                _ => view.last_result = Some(data.clone()).filter(|d| !d.is_null()),
            }
            view.last_seen_ms = Some(now_ms());
        }
        let _ = self.events.send(LiveEvent {
            kind,
            robot: robot.to_string(),
            data,
        });
        Ok(())
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Connection settings for the gateway's MQTT client.
pub(crate) fn mqtt_options(
    client_id: &str,
    host: &str,
    port: u16,
    tls: Option<&fleet_runtime::mqtt_tls::MqttTls>,
) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, host, port);
    options.set_keep_alive(Duration::from_secs(10));
    options.set_clean_start(true);
    options.set_max_packet_size(Some(1024 * 1024));
    // rumqttc preallocates a slot per in-flight publish (65,535 by default, ~13 MB);
    // 1,024 commands in flight covers bursts at well over 1,000 commands/s.
    options.set_outgoing_inflight_upper_limit(1024);
    // Small packets must leave at once (Nagle plus delayed ACKs adds up to 40 ms).
    let mut network = options.network_options();
    network.set_tcp_nodelay(true);
    options.set_network_options(network);
    if let Some(tls) = tls {
        options.set_transport(tls.transport());
    }
    options
}

/// What the MQTT event loop feeds.
pub(crate) struct Bus {
    pub fleet: Arc<Fleet>,
    pub pending: Arc<Pending>,
    pub metrics: Arc<Metrics>,
    pub log_limit: Arc<LogLimiter>,
    /// This gateway's MQTT client id; it names the gateway's reply topics.
    pub instance: String,
    /// `<prefix>/_gateway/<instance>/`: where this gateway's reply topics start.
    pub reply_prefix: String,
    /// The gateway's status, the fleet summary and the fleet's Home Assistant device.
    pub bridge: Arc<crate::home_assistant::BridgeLink>,
}

/// The longest topic quoted in a log line.
const MAX_LOGGED_TOPIC: usize = 200;

/// Runs the MQTT event loop for the gateway: (re)subscribes on every connect and feeds
/// the fleet view. Reconnects with capped exponential backoff.
pub(crate) async fn drive_link(mut eventloop: EventLoop, client: AsyncClient, bus: Bus) {
    let mut delay = Duration::from_millis(100);
    let mut failures: u32 = 0;
    let (fleet, metrics) = (bus.fleet.clone(), bus.metrics.clone());
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                delay = Duration::from_millis(100);
                failures = 0;
                let topics = fleet.topics();
                let filters = [
                    topics.estop(),
                    topics.every_robot("state"),
                    topics.every_robot("status"),
                    topics.every_robot("result"),
                    topics.gateway_replies_filter(&bus.instance),
                ];
                for filter in filters {
                    if let Err(error) = client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                        tracing::error!(%filter, %error, "cannot queue the subscription");
                    }
                }
                bus.bridge.on_connected();
                tracing::info!("connected to the broker");
                fleet.set_connected(true);
                metrics.broker_connected.set(1);
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => bus.on_publish(&publish),
            Ok(_) => {}
            Err(error) => {
                fleet_runtime::mqtt_link::fresh_state_after_error(&mut eventloop);
                let (host, port) = eventloop.options.broker_address();
                if fleet.is_connected() {
                    tracing::warn!(%error, broker = %format!("{host}:{port}"), "lost the broker connection");
                } else {
                    // A broker that is not there (wrong address, not started yet, refused
                    // login) must show at the default log level, but less and less often.
                    failures = failures.saturating_add(1);
                    if failures.is_power_of_two() {
                        tracing::warn!(%error, broker = %format!("{host}:{port}"), failures, ?delay, "cannot reach the broker, retrying");
                    } else {
                        tracing::debug!(%error, failures, "cannot reach the broker, retrying");
                    }
                }
                fleet.set_connected(false);
                metrics.broker_connected.set(0);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

impl Bus {
    fn on_publish(&self, publish: &Publish) {
        let topic = String::from_utf8_lossy(&publish.topic);
        if topic.starts_with(&self.reply_prefix) {
            return self.on_reply(&topic, &publish.payload);
        }
        if self.bridge.on_publish(&topic, &publish.payload) {
            return;
        }
        if self.fleet.topics().is_estop(&topic) {
            return self.fleet.absorb_latch(&publish.payload);
        }
        match self.fleet.absorb(&topic, &publish.payload) {
            Ok(("result", robot)) => self.on_result(&robot, &publish.payload),
            Ok(_) => {}
            Err(Ignored::UnknownRobot) => {
                // Not in the table (and results never add robots), but it may still
                // answer a fleet-wide command.
                if let Some(robot) = self
                    .fleet
                    .topics()
                    .robot_of(&topic, "result")
                    .and_then(|r| RobotId::new(r).ok())
                {
                    self.on_result(&robot, &publish.payload);
                }
            }
            Err(Ignored::TableFull) => {
                self.metrics.record_robot_ignored();
                if let Admission::Log { held_back } =
                    self.log_limit.admit("robot_ignored", Instant::now())
                {
                    tracing::warn!(topic = %quoted(&topic, MAX_LOGGED_TOPIC), max_robots = self.fleet.max_robots, held_back, "ignoring a robot: the fleet table is full (see --max-robots)");
                }
            }
            Err(Ignored::NotOurs | Ignored::BadPayload) => {}
        }
    }

    /// A result on a robot's own result topic: counted, and it answers a pending
    /// command sent to that robot or to the whole fleet.
    fn on_result(&self, robot: &RobotId, payload: &[u8]) {
        let Ok(result) = serde_json::from_slice::<Value>(payload) else {
            return;
        };
        self.metrics
            .record_result(result["status"].as_str().unwrap_or("unknown"));
        if result["robot"].as_str() != Some(robot.as_str()) {
            return;
        }
        if let Some(Ok((latency, waited))) = result["id"]
            .as_str()
            .map(|id| self.pending.resolve(id, robot.as_str(), true, &result))
        {
            self.metrics.record_latency(latency, waited);
        }
    }

    /// A result on one of this gateway's reply topics. Accepted only when the topic's
    /// robot, the result's `robot` and the robot the command went to agree; anything
    /// else is refused, counted and logged, and changes nothing.
    fn on_reply(&self, topic: &str, payload: &[u8]) {
        let refuse = |reason: &'static str| {
            self.metrics.record_reply_refused(reason);
            if let Admission::Log { held_back } =
                self.log_limit.admit("reply_refused", Instant::now())
            {
                tracing::warn!(topic = %quoted(topic, MAX_LOGGED_TOPIC), reason, held_back, "refused a reply");
            }
        };
        let Some(robot) = self
            .fleet
            .topics()
            .gateway_reply_robot(&self.instance, topic)
            .and_then(|r| RobotId::new(r).ok())
        else {
            return refuse("bad_topic");
        };
        let Ok(result) = serde_json::from_slice::<Value>(payload) else {
            return refuse("not_json");
        };
        if result["robot"].as_str() != Some(robot.as_str()) {
            return refuse("robot_mismatch");
        }
        // A result from the robot its topic names (the broker lets only that robot publish
        // there): counted like those on the robots' own result topics, also when it
        // answers nothing awaited (late after a timeout, or sent untracked).
        self.metrics
            .record_result(result["status"].as_str().unwrap_or("unknown"));
        let Some(id) = result["id"].as_str() else {
            return refuse("unknown_id");
        };
        match self.pending.resolve(id, robot.as_str(), false, &result) {
            Ok((latency, waited)) => {
                self.metrics.record_latency(latency, waited);
                // A robot the table does not hold stays out of it.
                let _ = self.fleet.absorb_reply(&robot, &result);
            }
            Err(unmatched) => refuse(unmatched.reason()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(robot: &str) -> RobotId {
        RobotId::new(robot).unwrap()
    }

    #[test]
    fn absorbs_state_status_and_results() {
        let fleet = Fleet::new(Topics::default(), &[id("linus")]);
        let mut events = fleet.subscribe();
        let kind = |r: Result<(&'static str, RobotId), Ignored>| r.map(|(kind, _)| kind);
        assert_eq!(
            kind(fleet.absorb("fleet/linus/status", b"online")),
            Ok("status")
        );
        assert_eq!(
            kind(fleet.absorb("fleet/linus/state", br#"{"motion":"forward"}"#)),
            Ok("state")
        );
        assert_eq!(
            kind(fleet.absorb("fleet/torvalds/status", b"offline")),
            Ok("status")
        );
        assert_eq!(
            kind(fleet.absorb("fleet/linus/state", b"not json")),
            Err(Ignored::BadPayload)
        );
        assert_eq!(
            kind(fleet.absorb("fleet/linus/status", b"sleepy")),
            Err(Ignored::BadPayload)
        );
        assert_eq!(
            kind(fleet.absorb("fleet/linus/cmd/drive", b"forward")),
            Err(Ignored::NotOurs)
        );
        let linus = fleet.robot("linus").unwrap();
        assert_eq!(linus.online, Some(true));
        assert_eq!(linus.state.unwrap()["motion"], "forward");
        assert_eq!(fleet.robot("torvalds").unwrap().online, Some(false));
        assert_eq!(events.try_recv().unwrap().kind, "status");
        let result = serde_json::json!({"id":"1","robot":"linus","command":"stop","status":"ok"});
        assert_eq!(fleet.absorb_reply(&id("linus"), &result), Ok(()));
        assert_eq!(
            fleet.robot("linus").unwrap().last_result.unwrap()["id"],
            "1"
        );
    }

    #[test]
    fn results_never_add_robots_and_the_table_is_bounded() {
        let fleet = Fleet::with_capacity(Topics::default(), &[id("linus")], 3);
        let result = br#"{"id":"1","robot":"ghost","command":"stop","status":"ok"}"#;
        assert_eq!(
            fleet.absorb("fleet/ghost/result", result).map(|_| ()),
            Err(Ignored::UnknownRobot)
        );
        let reply = serde_json::json!({"id":"1","robot":"ghost","command":"stop","status":"ok"});
        assert_eq!(
            fleet.absorb_reply(&id("ghost"), &reply),
            Err(Ignored::UnknownRobot)
        );
        assert_eq!(fleet.len(), 1);
        assert!(fleet.absorb("fleet/a/status", b"online").is_ok());
        assert!(fleet.absorb("fleet/b/state", b"{}").is_ok());
        assert_eq!(
            fleet.absorb("fleet/c/status", b"online").map(|_| ()),
            Err(Ignored::TableFull)
        );
        assert_eq!(fleet.len(), 3);
        assert!(
            fleet.absorb("fleet/a/state", b"{}").is_ok(),
            "known robots still update"
        );
    }
}
