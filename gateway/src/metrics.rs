//! Prometheus metrics of the gateway, named by Prometheus conventions (base units,
//! `_total` counters, route templates rather than raw paths as labels).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DurationLabels {
    method: String,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    command: String,
    /// Topic template, robot replaced by `+` (`fleet/+/cmd/drive`, `fleet/all/cmd/stop`).
    topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RobotLabels {
    robot: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    /// `true` for `?wait=true` requests, `false` for results seen on the bus.
    wait: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EstopLabels {
    /// `true` when the request carried the right bearer token (stops need none).
    authenticated: String,
}

/// Per-robot series stop here; later robots share the `other` series.
const MAX_ROBOT_SERIES: usize = 100;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    status: String,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~3 s: commands on loopback take well under a millisecond.
    Histogram::new(exponential_buckets(0.0001, 2.5, 12))
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<DurationLabels, Histogram, fn() -> Histogram>,
    commands_published: Family<CommandLabels, Counter>,
    robot_commands: Family<RobotLabels, Counter>,
    command_results: Family<ResultLabels, Counter>,
    click_to_result: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    refused: Family<ReasonLabels, Counter>,
    robot_up: Family<RobotLabels, Gauge>,
    robot_probe_seconds: Family<RobotLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    robot_series: std::sync::Mutex<std::collections::HashSet<String>>,
    pub broker_connected: Gauge,
    estops: Family<EstopLabels, Counter>,
    latch_changes: Family<ActionLabels, Counter>,
    replies_refused: Family<ReasonLabels, Counter>,
    stop_bodies_ignored: Family<ReasonLabels, Counter>,
    robots_ignored: Counter,
    pub event_streams: Gauge,
    /// Connections of the HTTP server (`fleet_runtime::http`).
    pub http: fleet_runtime::http::HttpMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by method, route template and status",
            requests.clone(),
        );
        let request_duration =
            Family::<DurationLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request duration by method and route template",
            request_duration.clone(),
        );
        let commands_published = Family::<CommandLabels, Counter>::default();
        registry.register(
            "fleet_gateway_commands_published",
            "Commands published to the broker, by command and topic template",
            commands_published.clone(),
        );
        let robot_commands = Family::<RobotLabels, Counter>::default();
        registry.register(
            "fleet_gateway_robot_commands_published",
            "Commands published to one robot, by robot (the first 100 robots; then other)",
            robot_commands.clone(),
        );
        let click_to_result =
            Family::<LatencyLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register(
            "fleet_gateway_click_to_result_seconds",
            "Time from publishing a command to receiving its result",
            click_to_result.clone(),
        );
        let refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "fleet_gateway_requests_refused",
            "Requests refused before publishing, by reason (forbidden_host, forbidden_origin, unauthorized, rate_limited, too_many_streams)",
            refused.clone(),
        );
        let robot_up = Family::<RobotLabels, Gauge>::default();
        registry.register(
            "fleet_robot_up",
            "1 when the robot answered the last probe in time, else 0",
            robot_up.clone(),
        );
        let robot_probe_seconds =
            Family::<RobotLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "fleet_robot_probe_duration_seconds",
            "How long the robot took to answer the last probe (the timeout when it did not)",
            robot_probe_seconds.clone(),
        );
        let command_results = Family::<ResultLabels, Counter>::default();
        registry.register(
            "fleet_gateway_command_results",
            "Command results seen on the bus, by status",
            command_results.clone(),
        );
        let broker_connected = Gauge::default();
        registry.register(
            "fleet_gateway_broker_connected",
            "1 while the gateway is connected to the broker",
            broker_connected.clone(),
        );
        let estops = Family::<EstopLabels, Counter>::default();
        // Both series from the start: an alert on unauthenticated stops sees the first.
        for authenticated in ["true", "false"] {
            estops
                .get_or_create(&EstopLabels {
                    authenticated: authenticated.to_owned(),
                })
                .inc_by(0);
        }
        registry.register(
            "fleet_gateway_estops",
            "Stop requests received over HTTP (fleet and robot stops, /stop, /stoptwo), by whether they carried the bearer token",
            estops.clone(),
        );
        let latch_changes = Family::<ActionLabels, Counter>::default();
        for action in ["engage", "release"] {
            latch_changes
                .get_or_create(&ActionLabels {
                    action: action.to_owned(),
                })
                .get();
        }
        registry.register(
            "fleet_gateway_estop_latch_changes",
            "Latched e-stop requests the gateway published to the fleet's latch topic, by action (engage, release)",
            latch_changes.clone(),
        );
        let replies_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "fleet_gateway_replies_refused",
            "Results on this gateway's reply topics that answered no awaited command, by reason (bad_topic, not_json, robot_mismatch; unknown_id: late after a timeout, sent untracked, or made up)",
            replies_refused.clone(),
        );
        let stop_bodies_ignored = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "fleet_gateway_stop_bodies_ignored",
            "Robot stops sent although their body was bad (bad_payload, payload_too_large): a stop is never refused for its body",
            stop_bodies_ignored.clone(),
        );
        let robots_ignored = Counter::default();
        registry.register(
            "fleet_gateway_robots_ignored",
            "Messages from robots not in the fleet table that were ignored because it holds --max-robots robots",
            robots_ignored.clone(),
        );
        let event_streams = Gauge::default();
        registry.register(
            "fleet_gateway_event_streams",
            "Live event streams (GET /api/events) open now",
            event_streams.clone(),
        );
        let http = fleet_runtime::http::HttpMetrics::default();
        http.register(&mut registry);
        fleet_runtime::process::register(&mut registry);
        Self {
            registry,
            requests,
            request_duration,
            commands_published,
            robot_commands,
            command_results,
            click_to_result,
            refused,
            robot_up,
            robot_probe_seconds,
            robot_series: Default::default(),
            broker_connected,
            estops,
            latch_changes,
            replies_refused,
            stop_bodies_ignored,
            robots_ignored,
            event_streams,
            http,
        }
    }
}

impl Metrics {
    pub fn record_command(&self, command: &str, topic_template: &str, robot: Option<&str>) {
        self.commands_published
            .get_or_create(&CommandLabels {
                command: command.to_owned(),
                topic: topic_template.to_owned(),
            })
            .inc();
        if let Some(robot) = robot {
            self.robot_commands
                .get_or_create(&RobotLabels {
                    robot: self.robot_label(robot),
                })
                .inc();
        }
    }

    /// The robot's own label while there are few robots, `other` beyond that.
    fn robot_label(&self, robot: &str) -> String {
        let mut seen = self.robot_series.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(robot) || seen.len() < MAX_ROBOT_SERIES {
            seen.insert(robot.to_owned());
            robot.to_owned()
        } else {
            "other".to_owned()
        }
    }

    pub fn record_latency(&self, latency: std::time::Duration, waited: bool) {
        self.click_to_result
            .get_or_create(&LatencyLabels {
                wait: waited.to_string(),
            })
            .observe(latency.as_secs_f64());
    }

    pub fn record_refusal(&self, reason: &str) {
        self.refused
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn record_latch_change(&self, engaged: bool) {
        let action = if engaged { "engage" } else { "release" };
        self.latch_changes
            .get_or_create(&ActionLabels {
                action: action.to_owned(),
            })
            .inc();
    }

    pub fn record_estop(&self, authenticated: bool) {
        self.estops
            .get_or_create(&EstopLabels {
                authenticated: authenticated.to_string(),
            })
            .inc();
    }

    pub fn record_reply_refused(&self, reason: &'static str) {
        self.replies_refused
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn record_stop_body_ignored(&self, reason: &str) {
        self.stop_bodies_ignored
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn record_robot_ignored(&self) {
        self.robots_ignored.inc();
    }

    pub fn record_probe(&self, robot: &str, up: bool, took: std::time::Duration) {
        let labels = RobotLabels {
            robot: self.robot_label(robot),
        };
        self.robot_up.get_or_create(&labels).set(i64::from(up));
        self.robot_probe_seconds
            .get_or_create(&labels)
            .set(took.as_secs_f64());
    }

    pub fn record_result(&self, status: &str) {
        // Only the two documented statuses, so a misbehaving robot cannot add series.
        let status = match status {
            "ok" | "error" => status,
            _ => "other",
        };
        self.command_results
            .get_or_create(&ResultLabels {
                status: status.to_owned(),
            })
            .inc();
    }

    /// Prometheus text format (see `fleet_runtime::exposition`).
    pub fn encode(&self) -> String {
        fleet_runtime::exposition::encode(&self.registry)
    }
}

/// Counts every request by its route template (unmatched paths count as one `other`).
pub async fn track(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    // Only standard methods become label values, so odd requests cannot add series.
    let method = match request.method().as_str() {
        m @ ("GET" | "POST" | "PUT" | "DELETE" | "PATCH" | "HEAD" | "OPTIONS") => m.to_owned(),
        _ => "other".to_owned(),
    };
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "other".to_owned());
    let response = next.run(request).await;
    metrics
        .requests
        .get_or_create(&RequestLabels {
            method: method.clone(),
            route: route.clone(),
            status: response.status().as_u16(),
        })
        .inc();
    metrics
        .request_duration
        .get_or_create(&DurationLabels { method, route })
        .observe(started.elapsed().as_secs_f64());
    response
}
