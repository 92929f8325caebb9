//! The fleet's own Home Assistant device (the "bridge") and the gateway topics behind it.
//!
//! - `<prefix>/_gateway/status` (retained): `online` on every connect, `offline` as the
//!   gateway's last will. When several gateways share a fleet, one that sees `offline`
//!   there while it is connected (another one's will) says `online` again.
//! - `<prefix>/_gateway/state` (retained): the [`FleetSummary`], when it changes.
//! - `<discovery prefix>/device/<prefix>__bridge/config` (retained): the device with the
//!   fleet-wide e-stop, published on every connect and after Home Assistant's birth
//!   message, unless discovery is off.

use std::sync::Arc;
use std::time::Duration;

use fleet_protocol::state::FleetSummary;
use fleet_protocol::{Availability, BridgeDevice, Direction, DiscoveryPrefix, Topics};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::LastWill;
use rumqttc::v5::{AsyncClient, MqttOptions};
use tokio::sync::watch;

use crate::fleet::Fleet;

/// How often the summary is looked at; it is published only when it changed.
const SUMMARY_INTERVAL: Duration = Duration::from_secs(1);

/// What the gateway tells Home Assistant.
#[derive(Debug, Clone)]
pub struct HomeAssistantSettings {
    /// Where to publish the fleet's device; `None`: no discovery (the status and summary
    /// topics are published all the same).
    pub discovery: Option<DiscoveryPrefix>,
    /// The gateway's web UI as other machines reach it: the devices' "Visit" link.
    pub public_url: Option<String>,
}

impl Default for HomeAssistantSettings {
    fn default() -> Self {
        Self {
            discovery: Some(DiscoveryPrefix::default()),
            public_url: None,
        }
    }
}

/// The gateway's side of Home Assistant, shared by the MQTT event loop and the summary
/// task.
pub(crate) struct BridgeLink {
    pub topics: Topics,
    pub settings: HomeAssistantSettings,
    pub client: AsyncClient,
}

impl BridgeLink {
    /// `offline` on the gateway's status topic, retained, when the connection drops
    /// without a goodbye (a crash, a lost network, the process ending).
    pub fn set_last_will(topics: &Topics, options: &mut MqttOptions) {
        options.set_last_will(LastWill::new(
            topics.gateway_status(),
            Availability::Offline.as_str(),
            QoS::AtLeastOnce,
            true,
            None,
        ));
    }

    /// On every (re)connect: subscribe to what the gateway answers, then say `online`
    /// and publish the fleet's device.
    pub fn on_connected(&self) {
        let mut filters = vec![self.topics.gateway_status()];
        if let Some(prefix) = &self.settings.discovery {
            filters.push(prefix.status_topic());
        }
        for filter in filters {
            if let Err(error) = self.client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                tracing::error!(%filter, %error, "cannot queue the subscription");
            }
        }
        self.say_online();
        self.publish_discovery();
    }

    /// A message on one of this link's topics; `false` when it is not one.
    pub fn on_publish(&self, topic: &str, payload: &[u8]) -> bool {
        if self.topics.is_gateway_status(topic) {
            // Another gateway's will (or a stale retained value): this one is still here.
            if payload == Availability::Offline.as_str().as_bytes() {
                self.say_online();
            }
            return true;
        }
        match &self.settings.discovery {
            Some(prefix) if prefix.is_status_topic(topic) => {
                // Home Assistant's birth message: it (re)started and reads discovery anew.
                if payload == b"online" {
                    tracing::info!("Home Assistant started: re-publishing the fleet's device");
                    self.publish_discovery();
                }
                true
            }
            _ => false,
        }
    }

    fn say_online(&self) {
        self.publish(
            self.topics.gateway_status(),
            Availability::Online.as_str().as_bytes().to_vec(),
        );
    }

    fn publish_discovery(&self) {
        let Some(prefix) = &self.settings.discovery else {
            return;
        };
        let device = BridgeDevice {
            topics: &self.topics,
            prefix,
            sw_version: env!("CARGO_PKG_VERSION"),
            configuration_url: self.settings.public_url.as_deref(),
        };
        self.publish(
            device.config_topic(),
            device.document().to_string().into_bytes(),
        );
    }

    fn publish(&self, topic: String, payload: Vec<u8>) {
        if let Err(error) = self
            .client
            .try_publish(topic.clone(), QoS::AtLeastOnce, true, payload)
        {
            tracing::warn!(%topic, %error, "cannot queue a publish for Home Assistant");
        }
    }
}

/// The fleet as the summary tells it.
pub(crate) fn summary(fleet: &Fleet) -> FleetSummary {
    let mut online_robots = Vec::new();
    let mut offline_robots = Vec::new();
    let mut moving = 0;
    // Read in place: the table may hold thousands of robots, once a second.
    fleet.for_each_robot(|robot| {
        if robot.online == Some(true) {
            online_robots.push(robot.id.clone());
            let motion = robot.state.as_ref().and_then(|s| s["motion"].as_str());
            if motion.is_some_and(|m| m != Direction::Stop.as_str()) {
                moving += 1;
            }
        } else {
            offline_robots.push(robot.id.clone());
        }
    });
    // The table is ordered by id already.
    FleetSummary {
        robots: online_robots.len() + offline_robots.len(),
        online: online_robots.len(),
        moving,
        online_robots,
        offline_robots,
    }
}

/// Publishes the summary whenever it changed, and again after every reconnect (the
/// broker may have restarted without its retained messages).
pub(crate) fn spawn_summary(link: Arc<BridgeLink>, fleet: Arc<Fleet>) {
    tokio::spawn(async move {
        let mut connected: watch::Receiver<bool> = fleet.link();
        let mut ticks = tokio::time::interval(SUMMARY_INTERVAL);
        let mut published: Option<FleetSummary> = None;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                changed = connected.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    published = None;
                }
            }
            if !fleet.is_connected() {
                continue;
            }
            let now = summary(&fleet);
            if published.as_ref() != Some(&now) {
                match serde_json::to_vec(&now) {
                    Ok(payload) => link.publish(link.topics.gateway_state(), payload),
                    Err(error) => tracing::error!(%error, "cannot encode the fleet summary"),
                }
                published = Some(now);
            }
        }
    });
}

/// The UI's address as another machine would use it, when none is configured: this
/// host's name when listening on every address, the address itself otherwise.
pub fn default_public_url(http: std::net::SocketAddr) -> String {
    let host = if http.ip().is_unspecified() {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "127.0.0.1".to_owned())
    } else {
        http.ip().to_string()
    };
    match http {
        std::net::SocketAddr::V6(v6) if !http.ip().is_unspecified() => {
            format!("http://[{}]:{}/", v6.ip(), v6.port())
        }
        _ => format!("http://{host}:{}/", http.port()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_urls_are_reachable_addresses() {
        let url = |addr: &str| default_public_url(addr.parse().unwrap());
        assert_eq!(url("127.0.0.1:8080"), "http://127.0.0.1:8080/");
        assert_eq!(url("192.168.1.20:80"), "http://192.168.1.20:80/");
        assert_eq!(url("[::1]:8080"), "http://[::1]:8080/");
        let any = url("0.0.0.0:8080");
        assert!(!any.contains("0.0.0.0"), "{any}");
        assert!(
            any.starts_with("http://") && any.ends_with(":8080/"),
            "{any}"
        );
    }

    #[test]
    fn the_summary_counts_online_and_moving_robots() {
        let topics = Topics::default();
        let known = [
            fleet_protocol::RobotId::new("linus").unwrap(),
            fleet_protocol::RobotId::new("torvalds").unwrap(),
        ];
        let fleet = Fleet::new(topics.clone(), &known);
        assert_eq!(summary(&fleet).offline_robots, ["linus", "torvalds"]);
        fleet
            .absorb("fleet/torvalds/status", b"online")
            .expect("absorbed");
        fleet
            .absorb(
                "fleet/torvalds/state",
                br#"{"robot":"torvalds","motion":"forward"}"#,
            )
            .expect("absorbed");
        fleet
            .absorb("fleet/linus/status", b"online")
            .expect("absorbed");
        fleet
            .absorb("fleet/linus/state", br#"{"robot":"linus","motion":"stop"}"#)
            .expect("absorbed");
        let now = summary(&fleet);
        assert_eq!((now.robots, now.online, now.moving), (2, 2, 1));
        assert_eq!(now.online_robots, ["linus", "torvalds"]);
    }
}
