//! What the node sends: results, the state (at most one per `STATE_INTERVAL`, latest
//! wins), and publishes held back while the client's queue is full.

use std::time::Duration;

use bytes::Bytes;
use fleet_protocol::CommandResult;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use tokio::time::Instant;

use super::{Node, now_ms};

/// Publishes held back while the client's queue is full (see `Node::publish`).
const MAX_UNSENT: usize = 4096;
/// How often a held-back publish is retried.
const UNSENT_RETRY: Duration = Duration::from_millis(5);
/// At most one state publish per this interval; changes in between are folded into the
/// next one (the state is "latest wins"), so a command burst does not double the traffic.
const STATE_INTERVAL: Duration = Duration::from_millis(20);

/// A QoS 1 publish the node wants to send.
#[derive(Clone)]
pub(super) struct OutgoingPublish {
    topic: String,
    retain: bool,
    payload: Vec<u8>,
    properties: Option<PublishProperties>,
}

impl Node {
    pub(super) fn publish_result(
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
    pub(super) fn publish_state(&self) {
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

    pub(super) fn publish_state_now(&self) {
        self.state_dirty.set(false);
        self.state_published_at.set(Some(Instant::now()));
        let mut state = self.robot.state(now_ms());
        state.estop = Some(self.latch.view());
        let payload = serde_json::to_vec(&state).unwrap_or_default();
        self.publish(
            self.config.topics.state(&self.config.robot.id),
            true,
            payload,
            None,
        );
    }

    /// When the held-back work (a folded state, publishes waiting for room) is due.
    pub(super) fn flush_due(&self) -> Option<Instant> {
        let state = self
            .state_dirty
            .get()
            .then(|| self.state_published_at.get().map(|at| at + STATE_INTERVAL))
            .flatten();
        let unsent = (!self.unsent.borrow().is_empty()).then(|| Instant::now() + UNSENT_RETRY);
        state.into_iter().chain(unsent).min()
    }

    pub(super) fn flush(&self) {
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
    pub(super) fn publish(
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
    pub(super) fn try_queue(&self, message: &OutgoingPublish) -> bool {
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
}
