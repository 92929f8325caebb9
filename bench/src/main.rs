//! fleet-bench: MQTT broker benchmarks (publish-to-deliver latency at a fixed rate,
//! fan-in and fan-out throughput with every message counted by sequence number, broker
//! CPU per message). Each run prints one JSON line.
//!
//! Every client is an MQTT 5 connection (rumqttc) in this process; publishers write the
//! send time (nanoseconds since one shared `Instant`) into each payload and subscribers
//! take the difference on arrival.

mod run;
mod stats;

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::json;

use crate::run::{Credentials, Outcome, Plan};

/// MQTT broker benchmarks: latency, fan-in, fan-out. Prints one JSON line per run.
///
/// Topic and username templates may contain `{i}`, the client's index (1-based): with
/// the fleet's ACL, robot `bench-{i}` may publish `fleet/bench-{i}/state` and subscribe
/// `fleet/bench-{i}/cmd/#` and `fleet/all/cmd/#`; a controller may publish
/// `fleet/+/cmd/+` and subscribe `fleet/#`.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// One publisher, one subscriber, a fixed rate: publish-to-deliver latency.
    /// Default topics: a controller's command to robot bench-1 (fleet/bench-1/cmd/drive),
    /// the robot subscribed to fleet/bench-1/cmd/#.
    Latency {
        /// Messages per second
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// How long to publish
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        #[command(flatten)]
        common: Common,
    },
    /// Many publishers, one subscriber. Default topics: robots bench-{i} publish their
    /// state (fleet/bench-{i}/state), a controller subscribes to fleet/+/state.
    FanIn {
        #[arg(long, default_value_t = 8)]
        publishers: usize,
        /// Messages each publisher sends
        #[arg(long, default_value_t = 10_000)]
        messages: u64,
        /// Offered rate over all publishers, messages per second (0: as fast as possible)
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        #[command(flatten)]
        common: Common,
    },
    /// One publisher, many subscribers. Default topics: a controller publishes
    /// fleet/all/cmd/drive, robots bench-{i} subscribe to fleet/all/cmd/#.
    FanOut {
        #[arg(long, default_value_t = 50)]
        subscribers: usize,
        /// Messages the publisher sends
        #[arg(long, default_value_t = 2_000)]
        messages: u64,
        /// Offered rate, messages per second (0: as fast as possible)
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Debug, Args)]
struct Common {
    /// The broker, host:port
    #[arg(long, default_value = "127.0.0.1:1883")]
    broker: String,
    /// QoS of every publish and subscription: 0 or 1
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// Username of every client (unless --pub-username / --sub-username)
    #[arg(long, env = "FLEET_BENCH_USERNAME")]
    username: Option<String>,
    /// Password of every client (unless --pub-password / --sub-password)
    #[arg(long, env = "FLEET_BENCH_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Publishers' username template ({i}: publisher index)
    #[arg(long, env = "FLEET_BENCH_PUB_USERNAME")]
    pub_username: Option<String>,
    /// Publishers' password template ({i}: publisher index)
    #[arg(long, env = "FLEET_BENCH_PUB_PASSWORD", hide_env_values = true)]
    pub_password: Option<String>,
    /// Subscribers' username template ({i}: subscriber index)
    #[arg(long, env = "FLEET_BENCH_SUB_USERNAME")]
    sub_username: Option<String>,
    /// Subscribers' password template ({i}: subscriber index)
    #[arg(long, env = "FLEET_BENCH_SUB_PASSWORD", hide_env_values = true)]
    sub_password: Option<String>,
    /// Publishers' client id template ({i}: publisher index; default: a tag of this run).
    /// A broker with a users file binds robot users to `robot-<username>`
    #[arg(long, env = "FLEET_BENCH_PUB_CLIENT_ID")]
    pub_client_id: Option<String>,
    /// Subscribers' client id template ({i}: subscriber index; default: a tag of this run)
    #[arg(long, env = "FLEET_BENCH_SUB_CLIENT_ID")]
    sub_client_id: Option<String>,
    /// Topic template publisher {i} publishes to (default: per scenario)
    #[arg(long)]
    pub_topic: Option<String>,
    /// Filter template subscriber {i} subscribes to (default: per scenario)
    #[arg(long)]
    sub_topic: Option<String>,
    /// Payload size in bytes (at least 24: run, publisher, sequence, send time)
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Publishers' in-flight window and subscribers' receive maximum (QoS 1)
    #[arg(long, default_value_t = 1024)]
    inflight: u16,
    /// End the run when nothing was delivered or acknowledged for this long (ms)
    #[arg(long, default_value_t = 3000)]
    drain_ms: u64,
    /// Give up when the clients are not connected and subscribed within this long (s)
    #[arg(long, default_value_t = 60)]
    connect_timeout_s: u64,
    /// The broker's process id: its CPU time (/proc/<pid>/stat utime + stime) is read
    /// when publishing starts and when the run ends
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Free text copied into the JSON line (e.g. the broker's name)
    #[arg(long)]
    label: Option<String>,
}

struct Shape {
    name: &'static str,
    publishers: usize,
    subscribers: usize,
    per_publisher: u64,
    rate: Option<f64>,
    pub_topic: &'static str,
    sub_filter: &'static str,
}

fn credentials(
    username: &Option<String>,
    password: &Option<String>,
    common: &Common,
) -> Option<Credentials> {
    let username = username.as_ref().or(common.username.as_ref())?;
    let password = password
        .as_ref()
        .or(common.password.as_ref())
        .cloned()
        .unwrap_or_default();
    Some(Credentials {
        username: username.clone(),
        password,
    })
}

fn plan(shape: &Shape, common: &Common) -> anyhow::Result<Plan> {
    let (host, port) = common
        .broker
        .rsplit_once(':')
        .with_context(|| format!("--broker {:?} is not host:port", common.broker))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("--broker {:?}: bad port", common.broker))?;
    if common.payload < stats::HEADER_LEN {
        bail!("--payload must be at least {} bytes", stats::HEADER_LEN);
    }
    if shape.publishers == 0 || shape.subscribers == 0 || shape.per_publisher == 0 {
        bail!("nothing to do: publishers, subscribers and messages must be at least 1");
    }
    // Every subscriber keeps a byte per message sent (and a latency per delivery).
    let deliveries =
        (shape.publishers as u128) * (shape.subscribers as u128) * u128::from(shape.per_publisher);
    if deliveries > 500_000_000 {
        bail!("{deliveries} deliveries to keep track of: at most 500,000,000 per run");
    }
    if shape.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        bail!("--rate must be a positive number");
    }
    Ok(Plan {
        host: host.trim_matches(['[', ']']).to_owned(),
        port,
        qos: if common.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        },
        publishers: shape.publishers,
        subscribers: shape.subscribers,
        per_publisher: shape.per_publisher,
        rate: shape.rate,
        pub_topic: common
            .pub_topic
            .clone()
            .unwrap_or_else(|| shape.pub_topic.to_owned()),
        sub_filter: common
            .sub_topic
            .clone()
            .unwrap_or_else(|| shape.sub_filter.to_owned()),
        pub_credentials: credentials(&common.pub_username, &common.pub_password, common),
        sub_credentials: credentials(&common.sub_username, &common.sub_password, common),
        pub_client_id: common.pub_client_id.clone(),
        sub_client_id: common.sub_client_id.clone(),
        payload_len: common.payload,
        inflight: common.inflight.max(1),
        drain: Duration::from_millis(common.drain_ms),
        connect_timeout: Duration::from_secs(common.connect_timeout_s),
        broker_pid: common.broker_pid,
    })
}

fn round(x: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (x * scale).round() / scale
}

fn report(shape: &Shape, plan: &Plan, common: &Common, o: &Outcome) -> serde_json::Value {
    let us = |q: f64| stats::quantile(&o.latencies_ns, q).map(|ns| round(ns as f64 / 1000.0, 1));
    let per_s = |n: u64, s: f64| if s > 0.0 { round(n as f64 / s, 0) } else { 0.0 };
    let cpu_us_per_msg = o
        .broker_cpu_ms
        .filter(|_| o.received > 0)
        .map(|ms| round(ms * 1000.0 / o.received as f64, 2));
    json!({
        "scenario": shape.name,
        "label": common.label,
        "broker": common.broker,
        "mqtt": "5",
        "qos": common.qos,
        "publishers": plan.publishers,
        "subscribers": plan.subscribers,
        "payload_bytes": plan.payload_len,
        "offered_per_s": plan.rate,
        "sent": o.sent,
        "acked": (plan.qos == QoS::AtLeastOnce).then_some(o.acked),
        "refused": o.refused,
        "expected": o.expected,
        "received": o.received,
        "unique": o.unique,
        "lost": o.lost,
        "duplicates": o.duplicates,
        "reordered": o.reordered,
        "malformed": o.malformed,
        "subscribers_with_loss": o.subscribers_with_loss,
        "max_lost_by_one_subscriber": o.max_lost_by_one_subscriber,
        "reconnects": o.reconnects,
        "timed_out": o.timed_out,
        "publish_s": round(o.publish_s, 3),
        "duration_s": round(o.duration_s, 3),
        "published_per_s": per_s(o.sent, o.publish_s),
        "msgs_per_s": per_s(o.unique, o.duration_s),
        "p50_us": us(0.5),
        "p99_us": us(0.99),
        "p999_us": us(0.999),
        "max_us": us(1.0),
        "broker_cpu_ms": o.broker_cpu_ms,
        "broker_cpu_us_per_msg": cpu_us_per_msg,
        "broker_receive_max": o.broker_receive_max,
        "errors": o.errors,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (shape, common) = match &cli.scenario {
        Scenario::Latency {
            rate,
            seconds,
            common,
        } => {
            let messages = (rate * seconds).round();
            if !(1.0..1e9).contains(&messages) {
                bail!("--rate × --seconds must be between 1 and 10⁹ messages");
            }
            let shape = Shape {
                name: "latency",
                publishers: 1,
                subscribers: 1,
                per_publisher: messages as u64,
                rate: Some(*rate),
                pub_topic: "fleet/bench-1/cmd/drive",
                sub_filter: "fleet/bench-1/cmd/#",
            };
            (shape, common)
        }
        Scenario::FanIn {
            publishers,
            messages,
            rate,
            common,
        } => {
            let shape = Shape {
                name: "fan-in",
                publishers: *publishers,
                subscribers: 1,
                per_publisher: *messages,
                rate: (*rate != 0.0).then_some(*rate),
                pub_topic: "fleet/bench-{i}/state",
                sub_filter: "fleet/+/state",
            };
            (shape, common)
        }
        Scenario::FanOut {
            subscribers,
            messages,
            rate,
            common,
        } => {
            let shape = Shape {
                name: "fan-out",
                publishers: 1,
                subscribers: *subscribers,
                per_publisher: *messages,
                rate: (*rate != 0.0).then_some(*rate),
                pub_topic: "fleet/all/cmd/drive",
                sub_filter: "fleet/all/cmd/#",
            };
            (shape, common)
        }
    };
    let plan = plan(&shape, common)?;
    let outcome = run::run(&plan).await?;
    let line = report(&shape, &plan, common, &outcome);
    // A closed pipe is an error to report, not a panic.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .context("writing the result")
}
