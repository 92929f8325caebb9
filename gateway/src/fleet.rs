//! The gateway's view of the fleet, kept up to date from the broker: each robot's retained
//! state, availability and last result, pushed to browsers as live events.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleet_protocol::{Availability, RobotId, Topics};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::broadcast;

use crate::commands::Pending;
use crate::metrics::Metrics;

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
    connected: AtomicBool,
    events: broadcast::Sender<LiveEvent>,
}

impl Fleet {
    pub fn new(topics: Topics, known: &[RobotId]) -> Self {
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
            connected: AtomicBool::new(false),
            events,
        }
    }

    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn robots(&self) -> Vec<RobotView> {
        self.read().values().cloned().collect()
    }

    pub fn robot(&self, id: &str) -> Option<RobotView> {
        self.read().get(id).cloned()
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
        if self.connected.swap(connected, Ordering::Relaxed) != connected {
            let _ = self.events.send(LiveEvent {
                kind: "broker",
                robot: String::new(),
                data: Value::Bool(connected),
            });
        }
    }

    /// Folds one message from the bus into the view. Returns what kind it was, if ours.
    fn absorb(&self, topic: &str, payload: &[u8]) -> Option<&'static str> {
        let (kind, robot) = ["state", "status", "result"]
            .into_iter()
            .find_map(|leaf| self.topics.robot_of(topic, leaf).map(|r| (leaf, r)))?;
        let robot = RobotId::new(robot).ok()?.to_string();
        let data = match kind {
            "status" => {
                let text = String::from_utf8_lossy(payload);
                match text.parse::<Availability>() {
                    Ok(a) => Value::Bool(a == Availability::Online),
                    // An empty retained payload clears the status (robot removed).
                    Err(()) if payload.is_empty() => Value::Null,
                    Err(()) => {
                        tracing::warn!(%topic, payload = %text, "ignoring an unknown status value");
                        return None;
                    }
                }
            }
            _ if payload.is_empty() => Value::Null,
            _ => match serde_json::from_slice::<Value>(payload) {
                Ok(v) => v,
                Err(error) => {
                    tracing::warn!(%topic, %error, "ignoring a robot message that is not JSON");
                    return None;
                }
            },
        };
        {
            let mut robots = self.robots.write().unwrap_or_else(|e| e.into_inner());
            let view = robots.entry(robot.clone()).or_insert_with(|| RobotView {
                id: robot.clone(),
                ..RobotView::default()
            });
            match kind {
                "status" => view.online = data.as_bool(),
                "state" => view.state = Some(data.clone()).filter(|d| !d.is_null()),
                _ => view.last_result = Some(data.clone()).filter(|d| !d.is_null()),
            }
            view.last_seen_ms = Some(now_ms());
        }
        let _ = self.events.send(LiveEvent { kind, robot, data });
        Some(kind)
    }

    /// A result that came to this gateway's own reply topic.
    fn absorb_reply(&self, payload: &[u8]) -> bool {
        let Ok(result) = serde_json::from_slice::<Value>(payload) else {
            tracing::warn!("ignoring a reply that is not JSON");
            return false;
        };
        if result["command"] == "ping" {
            // The prober's pings are not what a person did last.
            return false;
        }
        let Some(robot) = result["robot"].as_str().and_then(|r| RobotId::new(r).ok()) else {
            return false;
        };
        let topic = self.topics.result(&robot);
        self.absorb(&topic, payload).is_some()
    }
}

fn now_ms() -> u64 {
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

/// Runs the MQTT event loop for the gateway: (re)subscribes on every connect and feeds
/// the fleet view. Reconnects with capped exponential backoff.
pub(crate) async fn drive_link(
    mut eventloop: EventLoop,
    client: AsyncClient,
    fleet: Arc<Fleet>,
    pending: Arc<Pending>,
    reply_topic: String,
    metrics: Arc<Metrics>,
) {
    let mut delay = Duration::from_millis(100);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                delay = Duration::from_millis(100);
                let topics = fleet.topics();
                let filters = [
                    topics.every_robot("state"),
                    topics.every_robot("status"),
                    topics.every_robot("result"),
                    reply_topic.clone(),
                ];
                for filter in filters {
                    if let Err(error) = client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                        tracing::error!(%filter, %error, "cannot queue the subscription");
                    }
                }
                tracing::info!("connected to the broker");
                fleet.set_connected(true);
                metrics.broker_connected.set(1);
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                on_publish(&fleet, &pending, &metrics, &reply_topic, &publish)
            }
            Ok(_) => {}
            Err(error) => {
                fleet_runtime::mqtt_link::fresh_state_after_error(&mut eventloop);
                if fleet.is_connected() {
                    tracing::warn!(%error, "lost the broker connection");
                } else {
                    tracing::debug!(%error, "cannot reach the broker, retrying");
                }
                fleet.set_connected(false);
                metrics.broker_connected.set(0);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn on_publish(
    fleet: &Fleet,
    pending: &Pending,
    metrics: &Metrics,
    reply_topic: &str,
    publish: &Publish,
) {
    let topic = String::from_utf8_lossy(&publish.topic);
    let is_reply = topic == reply_topic;
    let kind = if is_reply {
        fleet.absorb_reply(&publish.payload);
        Some("result")
    } else {
        fleet.absorb(&topic, &publish.payload)
    };
    if kind != Some("result") {
        return;
    }
    let Ok(result) = serde_json::from_slice::<Value>(&publish.payload) else {
        return;
    };
    metrics.record_result(result["status"].as_str().unwrap_or("unknown"));
    if let Some((latency, waited)) = result["id"]
        .as_str()
        .and_then(|id| pending.resolve(id, &result))
    {
        metrics.record_latency(latency, waited);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absorbs_state_status_and_results() {
        let fleet = Fleet::new(Topics::default(), &[RobotId::new("linus").unwrap()]);
        let mut events = fleet.subscribe();
        assert_eq!(
            fleet.absorb("fleet/linus/status", b"online"),
            Some("status")
        );
        assert_eq!(
            fleet.absorb("fleet/linus/state", br#"{"motion":"forward"}"#),
            Some("state")
        );
        assert_eq!(
            fleet.absorb("fleet/torvalds/status", b"offline"),
            Some("status")
        );
        assert_eq!(fleet.absorb("fleet/linus/state", b"not json"), None);
        assert_eq!(fleet.absorb("fleet/linus/status", b"sleepy"), None);
        assert_eq!(fleet.absorb("fleet/linus/cmd/drive", b"forward"), None);
        let linus = fleet.robot("linus").unwrap();
        assert_eq!(linus.online, Some(true));
        assert_eq!(linus.state.unwrap()["motion"], "forward");
        assert_eq!(fleet.robot("torvalds").unwrap().online, Some(false));
        assert_eq!(events.try_recv().unwrap().kind, "status");
        assert!(
            fleet.absorb_reply(br#"{"id":"1","robot":"linus","command":"stop","status":"ok"}"#)
        );
        assert_eq!(
            fleet.robot("linus").unwrap().last_result.unwrap()["id"],
            "1"
        );
    }
}
