//! The node's Prometheus metrics. One set per process (a `--simulate N` process shares
//! it between its robots), with no robot label, so series stay few at any fleet size.
//! The rate limit for log lines that clients can trigger lives next to the counters and
//! is shared the same way.

use std::time::{Duration, Instant};

use fleet_runtime::log_limit::{Admission, LogLimiter};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    /// The topic template the command came on: `+/cmd/<command>` or `all/cmd/<command>`.
    topic: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// Why a stop's payload was ignored: the code of its result's `warning`.
pub const STOP_PAYLOAD_REASONS: [&str; 4] = [
    "bad_payload",
    "payload_too_large",
    "out_of_range",
    "expired",
];

pub struct NodeMetrics {
    registry: Registry,
    commands: Family<CommandLabels, Counter>,
    handling: Histogram,
    pub connects: Counter,
    pub dead_man_stops: Counter,
    pub link_loss_stops: Counter,
    pub publishes_dropped: Counter,
    pub robots_connected: Gauge,
    pub discovery_published: Counter,
    /// Robots of this process that see the fleet's latched e-stop engaged.
    pub robots_latched: Gauge,
    /// Latch messages that were not latch documents (each one engages the latch).
    pub latch_unreadable: Counter,
    stop_payloads_ignored: Family<ReasonLabels, Counter>,
    /// Rate limit for the log lines clients can trigger at will, shared like the
    /// counters by the robots of the process (the counters count every event).
    log_limit: LogLimiter,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let commands = Family::<CommandLabels, Counter>::default();
        registry.register(
            "fleet_node_commands",
            "Commands received, by topic template and result (ok or error)",
            commands.clone(),
        );
        // 10 µs .. ~0.3 s: handling is pin writes and a publish into a queue.
        let handling = Histogram::new(exponential_buckets(0.00001, 2.5, 12));
        registry.register(
            "fleet_node_command_handling_seconds",
            "Time from receiving a command to queueing its result",
            handling.clone(),
        );
        let connects = Counter::default();
        registry.register(
            "fleet_node_connects",
            "Successful connections to the broker (the first one and every reconnect)",
            connects.clone(),
        );
        let dead_man_stops = Counter::default();
        registry.register(
            "fleet_node_dead_man_stops",
            "Motor stops because no drive refresh came within the hold time",
            dead_man_stops.clone(),
        );
        let link_loss_stops = Counter::default();
        registry.register(
            "fleet_node_link_loss_stops",
            "Motor stops because the broker connection was lost",
            link_loss_stops.clone(),
        );
        let publishes_dropped = Counter::default();
        registry.register(
            "fleet_node_publishes_dropped",
            "Publishes that could not be queued (outgoing queue full)",
            publishes_dropped.clone(),
        );
        let robots_connected = Gauge::default();
        registry.register(
            "fleet_node_robots_connected",
            "Robots of this process currently connected to the broker",
            robots_connected.clone(),
        );
        let discovery_published = Counter::default();
        registry.register(
            "fleet_node_discovery_published",
            "Home Assistant discovery documents published (each connect and each Home Assistant start)",
            discovery_published.clone(),
        );
        let robots_latched = Gauge::default();
        registry.register(
            "fleet_node_estop_latched_robots",
            "Robots of this process that see the fleet's latched e-stop engaged (they refuse motion)",
            robots_latched.clone(),
        );
        let latch_unreadable = Counter::default();
        registry.register(
            "fleet_node_estop_latch_unreadable",
            "Messages on the latch topic that were not latch documents (each engages the latch)",
            latch_unreadable.clone(),
        );
        let stop_payloads_ignored = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "fleet_node_stop_payloads_ignored",
            "Stops carried out although their payload was refused or ignored, by reason (the code of the result's warning)",
            stop_payloads_ignored.clone(),
        );
        // Every reason from the start, at 0: a rate over a series that does not exist yet
        // is "no data", not 0.
        for reason in STOP_PAYLOAD_REASONS {
            stop_payloads_ignored
                .get_or_create(&ReasonLabels {
                    reason: reason.to_owned(),
                })
                .inc_by(0);
        }
        fleet_runtime::process::register(&mut registry);
        Self {
            registry,
            commands,
            handling,
            connects,
            dead_man_stops,
            link_loss_stops,
            publishes_dropped,
            robots_connected,
            discovery_published,
            robots_latched,
            latch_unreadable,
            stop_payloads_ignored,
            log_limit: LogLimiter::default(),
        }
    }
}

impl NodeMetrics {
    /// `fleet_wide`: the command came on `<prefix>/all/cmd/...`. `command` must already
    /// be bounded (a known command or `other`).
    pub fn record_command(&self, fleet_wide: bool, command: &str, ok: bool, took: Duration) {
        let target = if fleet_wide { "all" } else { "+" };
        self.commands
            .get_or_create(&CommandLabels {
                topic: format!("{target}/cmd/{command}"),
                result: if ok { "ok" } else { "error" }.to_owned(),
            })
            .inc();
        self.handling.observe(took.as_secs_f64());
    }

    /// How many commands ended with `result` ("ok" or "error"), over every topic.
    pub fn commands_total(&self, result: &str) -> u64 {
        let commands = ["drive", "speed", "eyes", "servo", "stop", "ping", "other"];
        ["+", "all"]
            .iter()
            .flat_map(|target| commands.iter().map(move |c| format!("{target}/cmd/{c}")))
            .filter_map(|topic| {
                let labels = CommandLabels {
                    topic,
                    result: result.to_owned(),
                };
                self.commands.get(&labels).map(|counter| counter.get())
            })
            .sum()
    }

    /// A stop was carried out although its payload was ignored for `reason` (one of
    /// `STOP_PAYLOAD_REASONS`; anything else counts as `bad_payload`).
    pub fn record_stop_payload_ignored(&self, reason: &str) {
        let reason = STOP_PAYLOAD_REASONS
            .into_iter()
            .find(|known| *known == reason)
            .unwrap_or("bad_payload");
        self.stop_payloads_ignored
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// How many stops were carried out with their payload ignored for `reason`.
    pub fn stop_payloads_ignored(&self, reason: &str) -> u64 {
        self.stop_payloads_ignored
            .get(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .map_or(0, |counter| counter.get())
    }

    /// Whether to write a client-triggered log line of `kind` now: `Some(lines of that
    /// kind held back before it)`, or `None` to leave it out.
    pub fn log_line(&self, kind: &'static str) -> Option<u64> {
        match self.log_limit.admit(kind, Instant::now()) {
            Admission::Log { held_back } => Some(held_back),
            Admission::HoldBack => None,
        }
    }

    /// Logs, once per window, how many client-triggered lines were held back. Runs until
    /// dropped.
    pub async fn report_held_back_log_lines(&self) {
        fleet_runtime::log_limit::report_held_back(&self.log_limit).await;
    }

    /// Prometheus text format (see `fleet_runtime::exposition`).
    pub fn encode(&self) -> String {
        fleet_runtime::exposition::encode(&self.registry)
    }
}
