//! The broker's Prometheus metrics. Messages are counted per topic template (robot ids
//! replaced by `+`) with a hard cap on distinct series, so 10,000 robots cannot blow up
//! the series count.

use std::collections::{HashMap, HashSet};
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

/// Exact topics whose counters are kept at hand (see `TopicCounters`), and the longest
/// topic kept: at most about 1.5 MiB, whatever topics clients make up.
const CACHED_TOPICS: usize = 8192;
const CACHED_TOPIC_MAX_BYTES: usize = 128;

/// Counters by topic template, with the counter of each topic counted recently kept under
/// the topic's own name: counting a message to a topic seen before is one lookup, not a
/// template built (three allocations) and then looked up. Most messages go to topics
/// seen before, and this runs for every message and every delivery.
#[derive(Default)]
struct TopicCounters {
    family: Family<TopicLabels, Counter>,
    by_topic: Mutex<HashMap<Box<str>, Counter>>,
}

impl TopicCounters {
    fn inc(&self, topic: &str, template: impl FnOnce(&str) -> String) {
        let mut by_topic = self.by_topic.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(counter) = by_topic.get(topic) {
            counter.inc();
            return;
        }
        let counter = self
            .family
            .get_or_create(&TopicLabels {
                topic: template(topic),
            })
            .clone();
        counter.inc();
        if topic.len() <= CACHED_TOPIC_MAX_BYTES {
            // Past the bound it starts over rather than tracking which topics are stale.
            if by_topic.len() >= CACHED_TOPICS {
                by_topic.clear();
            }
            by_topic.insert(topic.into(), counter);
        }
    }
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
pub const DISCONNECT_REASONS: [&str; 7] = [
    "client",
    "connection_closed",
    "keepalive_timeout",
    "protocol_error",
    "slow_consumer",
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
    received: TopicCounters,
    delivered: TopicCounters,
    dropped: Family<ReasonLabels, Counter>,
    pub retained: Gauge,
    connections_refused: Family<ReasonLabels, Counter>,
    connects_refused: Family<ReasonLabels, Counter>,
    subscriptions_refused: Family<ReasonLabels, Counter>,
    /// Connections accepted that have not sent their CONNECT yet.
    pub handshakes_pending: Gauge,
    templates: Mutex<HashSet<String>>,
}

/// The `reason` label values of `fleet_broker_auth_failures_total`.
pub const AUTH_FAILURE_REASONS: [&str; 4] = ["bad_credentials", "anonymous", "throttled", "busy"];
/// The `reason` label values of `fleet_broker_connections_refused_total`.
pub const CONNECTION_REFUSAL_REASONS: [&str; 3] =
    ["max_connections", "pending_per_address", "ws_origin"];
/// The `reason` label values of `fleet_broker_connects_refused_total`.
pub const CONNECT_REFUSAL_REASONS: [&str; 9] = [
    "robot_client_id",
    "client_id_reserved",
    "client_id_taken",
    "will_not_allowed",
    "will_invalid_topic",
    "will_topic_too_long",
    "will_too_many_levels",
    "will_retained_command",
    "will_retained_quota",
];
/// The `reason` label values of `fleet_broker_publishes_refused_total`.
pub const PUBLISH_REFUSAL_REASONS: [&str; 5] = [
    "invalid_topic",
    "topic_too_long",
    "too_many_levels",
    "retained_command",
    "retained_quota",
];
/// The `reason` label values of `fleet_broker_subscriptions_refused_total`.
pub const SUBSCRIPTION_REFUSAL_REASONS: [&str; 3] =
    ["invalid_topic", "topic_too_long", "too_many_levels"];

/// A counter family with every `reasons` series present from the start, at 0: a rate
/// over a series that does not exist yet is "no data", not 0.
fn reason_family(reasons: &[&str]) -> Family<ReasonLabels, Counter> {
    let family = Family::<ReasonLabels, Counter>::default();
    for reason in reasons {
        family
            .get_or_create(&ReasonLabels {
                reason: (*reason).to_owned(),
            })
            .inc_by(0);
    }
    family
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
        let disconnects = reason_family(&DISCONNECT_REASONS);
        registry.register(
            "fleet_broker_disconnects",
            "Client disconnections, by reason",
            disconnects.clone(),
        );
        let auth_failures = reason_family(&AUTH_FAILURE_REASONS);
        registry.register(
            "fleet_broker_auth_failures",
            "CONNECTs refused at the login, by reason (bad_credentials, anonymous; throttled: \
             the address failed too often and must wait; busy: every password check was taken)",
            auth_failures.clone(),
        );
        let acl_denials = Family::<ActionLabels, Counter>::default();
        registry.register(
            "fleet_broker_acl_denials",
            "Publishes and subscriptions the ACL refused, by action",
            acl_denials.clone(),
        );
        let publishes_refused = reason_family(&PUBLISH_REFUSAL_REASONS);
        registry.register(
            "fleet_broker_publishes_refused",
            "Publishes refused by the fleet's rules, by reason (invalid_topic, topic_too_long, \
             too_many_levels, retained_command, retained_quota)",
            publishes_refused.clone(),
        );
        let subscriptions_refused = reason_family(&SUBSCRIPTION_REFUSAL_REASONS);
        registry.register(
            "fleet_broker_subscriptions_refused",
            "Subscriptions refused for their filter, by reason (invalid_topic, topic_too_long, \
             too_many_levels); the ACL's refusals are in fleet_broker_acl_denials_total",
            subscriptions_refused.clone(),
        );
        let connections_refused = reason_family(&CONNECTION_REFUSAL_REASONS);
        registry.register(
            "fleet_broker_connections_refused",
            "Connections closed before their first packet was read, by reason \
             (max_connections, pending_per_address, ws_origin)",
            connections_refused.clone(),
        );
        let connects_refused = reason_family(&CONNECT_REFUSAL_REASONS);
        registry.register(
            "fleet_broker_connects_refused",
            "CONNECTs with good credentials refused for their client id or their will, by reason",
            connects_refused.clone(),
        );
        let handshakes_pending = Gauge::default();
        registry.register(
            "fleet_broker_handshakes_pending",
            "Connections accepted that have not sent their CONNECT yet",
            handshakes_pending.clone(),
        );
        let received = TopicCounters::default();
        registry.register(
            "fleet_broker_messages_received",
            "Messages accepted from publishers, by topic template",
            received.family.clone(),
        );
        let delivered = TopicCounters::default();
        registry.register(
            "fleet_broker_messages_delivered",
            "Messages delivered to subscribers, by topic template",
            delivered.family.clone(),
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
            connections_refused,
            connects_refused,
            subscriptions_refused,
            handshakes_pending,
            templates: Mutex::new(HashSet::new()),
        }
    }

    /// The topic with its robot (or client) level replaced by `+`, capped in number.
    pub fn template(&self, topic: &str) -> String {
        let template = self.raw_template(topic);
        let mut seen = self.templates.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(&template) {
            template
        } else if seen.len() < MAX_TOPIC_SERIES {
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
                // `_gateway/<instance>/<robot>/result`
                ["_gateway", _, _, ..] => {
                    levels[1] = "+";
                    levels[2] = "+";
                }
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

    pub fn record_received(&self, topic: &str) {
        self.received.inc(topic, |topic| self.template(topic));
    }

    pub fn record_delivered(&self, topic: &str) {
        self.delivered.inc(topic, |topic| self.template(topic));
    }

    pub fn record_disconnect(&self, reason: &str) {
        inc(&self.disconnects, reason);
    }

    pub fn record_dropped(&self, reason: &str) {
        inc(&self.dropped, reason);
    }

    pub fn record_auth_failure(&self, reason: &str) {
        inc(&self.auth_failures, reason);
    }

    pub fn record_acl_denial(&self, action: &str) {
        self.acl_denials
            .get_or_create(&ActionLabels {
                action: action.to_owned(),
            })
            .inc();
    }

    pub fn record_refused(&self, reason: &str) {
        inc(&self.publishes_refused, reason);
    }

    pub fn record_connection_refused(&self, reason: &str) {
        inc(&self.connections_refused, reason);
    }

    pub fn record_connect_refused(&self, reason: &str) {
        inc(&self.connects_refused, reason);
    }

    pub fn record_subscription_refused(&self, reason: &str) {
        inc(&self.subscriptions_refused, reason);
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

fn inc(family: &Family<ReasonLabels, Counter>, reason: &str) {
    family
        .get_or_create(&ReasonLabels {
            reason: reason.to_owned(),
        })
        .inc();
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
             than the login, which fleet_broker_auth_failures_total counts; timeout: no whole \
             CONNECT within the handshake timeout)",
            None,
            MetricType::Counter,
        )?;
        for (reason, count) in [
            ("not_mqtt", counts.not_mqtt),
            ("bad_connect", counts.bad_connect),
            ("timeout", counts.timeout),
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
    fn counters_kept_by_topic_count_every_message_and_stay_bounded() {
        let metrics = BrokerMetrics::new(AclTopics::default());
        for _ in 0..3 {
            metrics.record_delivered("fleet/linus/cmd/drive");
            metrics.record_delivered("fleet/torvalds/cmd/drive");
        }
        let long = format!("fleet/linus/{}", "x".repeat(CACHED_TOPIC_MAX_BYTES));
        metrics.record_delivered(&long);
        metrics.record_delivered(&long);
        let text = metrics.encode();
        assert!(
            text.contains("fleet_broker_messages_delivered_total{topic=\"fleet/+/cmd/drive\"} 6"),
            "{text}"
        );
        let cached = |counters: &TopicCounters| counters.by_topic.lock().unwrap().len();
        assert_eq!(cached(&metrics.delivered), 2, "the long topic is not kept");
        for i in 0..CACHED_TOPICS + 10 {
            metrics.record_received(&format!("fleet/robot-{i}/state"));
        }
        assert!(cached(&metrics.received) <= CACHED_TOPICS);
        let text = metrics.encode();
        assert!(
            text.contains(&format!(
                "fleet_broker_messages_received_total{{topic=\"fleet/+/state\"}} {}",
                CACHED_TOPICS + 10
            )),
            "{text}"
        );
    }

    #[test]
    fn templates_hide_robot_ids_and_stay_bounded() {
        let metrics = BrokerMetrics::new(AclTopics::default());
        assert_eq!(
            metrics.template("fleet/linus/cmd/drive"),
            "fleet/+/cmd/drive"
        );
        assert_eq!(metrics.template("fleet/all/cmd/stop"), "fleet/all/cmd/stop");
        assert_eq!(
            metrics.template("fleet/_gateway/gw-7/linus/result"),
            "fleet/_gateway/+/+/result"
        );
        assert_eq!(
            metrics.template("homeassistant/device/linus/config"),
            "homeassistant/device/+/config"
        );
        assert_eq!(metrics.template("something/else"), "other");
        for i in 0..10_000 {
            metrics.record_received(&format!("fleet/robot-{i}/state/x{}", i % 500));
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
