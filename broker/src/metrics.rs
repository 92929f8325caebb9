//! The broker's Prometheus metrics. Messages are counted per topic template (robot ids
//! replaced by `+`) with a hard cap on distinct series, so 10,000 robots cannot blow up
//! the series count.

use std::collections::HashSet;
use std::fmt;
use std::sync::Mutex;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::acl::AclTopics;

/// Distinct topic templates counted before the rest go to `other`.
pub const MAX_TOPIC_SERIES: usize = 200;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicLabels {
    topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: String,
}

/// The `reason` label values of `fleet_broker_disconnects_total`.
pub const DISCONNECT_REASONS: [&str; 6] = [
    "client",
    "connection_closed",
    "keepalive_timeout",
    "protocol_error",
    "taken_over",
    "other",
];

pub struct BrokerMetrics {
    registry: Registry,
    topics: AclTopics,
    pub connections: Gauge,
    pub connects: Counter,
    disconnects: Family<ReasonLabels, Counter>,
    auth_failures: Family<ReasonLabels, Counter>,
    acl_denials: Family<ActionLabels, Counter>,
    publishes_refused: Family<ReasonLabels, Counter>,
    received: Family<TopicLabels, Counter>,
    delivered: Family<TopicLabels, Counter>,
    dropped: Family<ReasonLabels, Counter>,
    pub retained: Gauge,
    /// Retained topics (with a non-empty payload), for the retained gauge.
    retained_topics: Mutex<HashSet<String>>,
    templates: Mutex<HashSet<String>>,
}

impl BrokerMetrics {
    pub fn new(topics: AclTopics) -> Self {
        let mut registry = Registry::default();
        let connections = Gauge::default();
        registry.register(
            "fleet_broker_connections",
            "Clients connected now",
            connections.clone(),
        );
        let connects = Counter::default();
        registry.register(
            "fleet_broker_connects",
            "Client connections accepted",
            connects.clone(),
        );
        let disconnects = Family::<ReasonLabels, Counter>::default();
        // Every reason from the start, at 0: a rate over a series that does not exist yet
        // is "no data", not 0.
        for reason in DISCONNECT_REASONS {
            disconnects
                .get_or_create(&ReasonLabels {
                    reason: reason.to_owned(),
                })
                .inc_by(0);
        }
        registry.register(
            "fleet_broker_disconnects",
            "Client disconnections, by reason",
            disconnects.clone(),
        );
        let auth_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "fleet_broker_auth_failures",
            "Refused CONNECTs, by reason (bad_credentials, anonymous)",
            auth_failures.clone(),
        );
        let acl_denials = Family::<ActionLabels, Counter>::default();
        registry.register(
            "fleet_broker_acl_denials",
            "Publishes and subscriptions the ACL refused, by action",
            acl_denials.clone(),
        );
        let publishes_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "fleet_broker_publishes_refused",
            "Publishes refused by the fleet's rules, by reason (retained_command, invalid_topic)",
            publishes_refused.clone(),
        );
        let received = Family::<TopicLabels, Counter>::default();
        registry.register(
            "fleet_broker_messages_received",
            "Messages accepted from publishers, by topic template",
            received.clone(),
        );
        let delivered = Family::<TopicLabels, Counter>::default();
        registry.register(
            "fleet_broker_messages_delivered",
            "Messages delivered to subscribers, by topic template",
            delivered.clone(),
        );
        let dropped = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "fleet_broker_messages_dropped",
            "Messages dropped instead of delivered, by reason",
            dropped.clone(),
        );
        let retained = Gauge::default();
        registry.register(
            "fleet_broker_retained_messages",
            "Retained messages held",
            retained.clone(),
        );
        registry.register_collector(Box::new(HandshakeFailureCollector));
        fleet_runtime::process::register(&mut registry);
        Self {
            registry,
            topics,
            connections,
            connects,
            disconnects,
            auth_failures,
            acl_denials,
            publishes_refused,
            received,
            delivered,
            dropped,
            retained,
            retained_topics: Mutex::new(HashSet::new()),
            templates: Mutex::new(HashSet::new()),
        }
    }

    /// The topic with its robot (or client) level replaced by `+`, capped in number.
    pub fn template(&self, topic: &str) -> String {
        let template = self.raw_template(topic);
        let mut seen = self.templates.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(&template) || seen.len() < MAX_TOPIC_SERIES {
            seen.insert(template.clone());
            template
        } else {
            "other".to_owned()
        }
    }

    fn raw_template(&self, topic: &str) -> String {
        let prefix = self.topics.fleet.prefix().as_str();
        if let Some(rest) = topic.strip_prefix(prefix).and_then(|r| r.strip_prefix('/')) {
            let mut levels: Vec<&str> = rest.split('/').collect();
            match levels.as_slice() {
                ["_gateway", _, ..] => levels[1] = "+",
                [robot, ..] if *robot != "all" => levels[0] = "+",
                _ => {}
            }
            return format!("{prefix}/{}", levels.join("/"));
        }
        let discovery = self.topics.discovery_prefix.as_str();
        if let Some(rest) = topic
            .strip_prefix(discovery)
            .and_then(|r| r.strip_prefix('/'))
        {
            let mut levels: Vec<&str> = rest.split('/').collect();
            if levels.len() >= 2 {
                levels[1] = "+";
            }
            return format!("{discovery}/{}", levels.join("/"));
        }
        "other".to_owned()
    }

    pub fn record_received(&self, topic: &str, retain: bool, empty: bool) {
        self.received
            .get_or_create(&TopicLabels {
                topic: self.template(topic),
            })
            .inc();
        if retain {
            let mut retained = self
                .retained_topics
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if empty {
                retained.remove(topic);
            } else {
                retained.insert(topic.to_owned());
            }
            self.retained
                .set(i64::try_from(retained.len()).unwrap_or(i64::MAX));
        }
    }

    pub fn record_delivered(&self, topic: &str) {
        self.delivered
            .get_or_create(&TopicLabels {
                topic: self.template(topic),
            })
            .inc();
    }

    pub fn record_disconnect(&self, reason: &str) {
        self.disconnects
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn record_dropped(&self, reason: &str) {
        self.dropped
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn record_auth_failure(&self, reason: &str) {
        self.auth_failures
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn record_acl_denial(&self, action: &str) {
        self.acl_denials
            .get_or_create(&ActionLabels {
                action: action.to_owned(),
            })
            .inc();
    }

    pub fn record_refused(&self, reason: &str) {
        self.publishes_refused
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Refused publishes with `reason`, for tests.
    pub fn refused(&self, reason: &str) -> u64 {
        self.publishes_refused
            .get(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .map(|c| c.get())
            .unwrap_or(0)
    }

    /// Prometheus text format (see `fleet_runtime::exposition`).
    pub fn encode(&self) -> String {
        fleet_runtime::exposition::encode(&self.registry)
    }
}

/// `fleet_broker_handshake_failures_total`, read at scrape time from the process-wide
/// counts of `fleet_runtime::handshake_failures` (rmqtt has no hook before a CONNECT, so
/// they come from its log lines; every fleet binary installs that layer at start-up).
#[derive(Debug)]
struct HandshakeFailureCollector;

impl Collector for HandshakeFailureCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let counts = fleet_runtime::handshake_failures::counts();
        let mut family = encoder.encode_descriptor(
            "fleet_broker_handshake_failures",
            "Connections closed before their session started, by reason (not_mqtt: the first \
             bytes were not an MQTT CONNECT; bad_connect: a CONNECT refused for another reason \
             than the login, which fleet_broker_auth_failures_total counts)",
            None,
            MetricType::Counter,
        )?;
        for (reason, count) in [
            ("not_mqtt", counts.not_mqtt),
            ("bad_connect", counts.bad_connect),
        ] {
            let labels = ReasonLabels {
                reason: reason.to_owned(),
            };
            ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_hide_robot_ids_and_stay_bounded() {
        let metrics = BrokerMetrics::new(AclTopics::default());
        assert_eq!(
            metrics.template("fleet/linus/cmd/drive"),
            "fleet/+/cmd/drive"
        );
        assert_eq!(metrics.template("fleet/all/cmd/stop"), "fleet/all/cmd/stop");
        assert_eq!(
            metrics.template("fleet/_gateway/gw-7/result"),
            "fleet/_gateway/+/result"
        );
        assert_eq!(
            metrics.template("homeassistant/device/linus/config"),
            "homeassistant/device/+/config"
        );
        assert_eq!(metrics.template("something/else"), "other");
        for i in 0..10_000 {
            metrics.record_received(&format!("fleet/robot-{i}/state/x{}", i % 500), false, false);
        }
        let text = metrics.encode();
        let series = text
            .lines()
            .filter(|l| l.starts_with("fleet_broker_messages_received_total{"))
            .count();
        assert!(series <= MAX_TOPIC_SERIES + 1, "{series} series");
        assert!(text.contains("fleet_broker_messages_received_total{topic=\"other\"}"));
    }
}
