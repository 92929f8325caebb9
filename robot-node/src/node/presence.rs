//! The node's presence on the broker: subscriptions and announcements on every connect
//! (availability, Home Assistant discovery, state), Home Assistant's birth message,
//! decommissioning, and leaving.

use fleet_protocol::{Availability, DiscoveryDevice};
use rumqttc::v5::mqttbytes::QoS;
use tokio::time::Instant;

use super::Node;

impl Node {
    pub(super) fn on_connected(&mut self) {
        let topics = &self.config.topics;
        let id = &self.config.robot.id;
        if !self.connected {
            self.connected = true;
            self.metrics.robots_connected.inc();
        }
        self.metrics.connects.inc();
        tracing::info!(robot = %id, broker = %format!("{}:{}", self.config.broker.host, self.config.broker.port), "connected");
        // rumqttc does not restore subscriptions, and the session may be new: subscribe
        // after every connect (repeating a subscription is harmless). The latch first, on
        // its own: the link knows its SUBACK as the first one of the connection.
        self.latch.set_visible(false);
        self.latch_settled_due = None;
        let mut filters = vec![
            topics.estop(),
            topics.command_filter(id),
            topics.fleet_command_filter(),
        ];
        if self.config.discovery.enabled {
            // Home Assistant's birth message: it has (re)started and wants discovery again.
            filters.push(self.config.discovery.prefix.status_topic());
        }
        for filter in filters {
            if let Err(error) = self.client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                tracing::error!(%filter, %error, "cannot queue the subscription");
            }
        }
        // Announced (`online`) once the latch is known: see `on_latch_subscribed`.
    }

    /// Availability, then the discovery document, then the state: Home Assistant reads
    /// the retained state once the entities exist.
    pub(super) fn announce(&mut self) {
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

    pub(super) fn discovery_device(&self) -> DiscoveryDevice<'_> {
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
    pub(super) fn on_home_assistant_status(&mut self, payload: &[u8]) {
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
    pub(super) fn clear_retained_topics(&mut self) {
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

    /// Safe state, last state, `offline`, and a clean DISCONNECT (so no will is sent).
    /// A decommissioned node has cleared its topics and leaves them empty.
    pub(super) async fn leave(&mut self) {
        self.send_deferred_replies(true);
        if self.latch.engaged() {
            // This robot no longer counts among the process's latched ones.
            self.metrics.robots_latched.dec();
        }
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
