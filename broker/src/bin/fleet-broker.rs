//! fleet-broker: the fleet's MQTT broker as its own process (compose, Helm).

use std::io::BufRead;
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleet_broker::acl::{AclTopics, Role};
use fleet_broker::auth::{Users, hash_password};
use fleet_broker::{BrokerConfig, TlsListener};
use fleet_runtime::TopicArgs;

/// The fleet's MQTT broker: MQTT 3.1.1 and 5 on one port, websockets, users and
/// per-robot topic ACLs, Prometheus metrics.
///
/// Settings come from flags, then FLEET_* environment variables, then the --config file
/// (TOML, one key per flag: mqtt_addr = "0.0.0.0:1883"), then the defaults shown here.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML file with any of the settings below
    #[arg(long, env = "FLEET_BROKER_CONFIG")]
    config: Option<PathBuf>,
    /// Where to accept MQTT over TCP (3.1.1 and 5)
    #[arg(long, env = "FLEET_MQTT_ADDR", default_value = "127.0.0.1:1883")]
    mqtt_addr: SocketAddr,
    /// Where to accept MQTT over websockets (path /mqtt); "off" to disable
    #[arg(long, env = "FLEET_WS_ADDR", default_value = "127.0.0.1:8083")]
    ws_addr: String,
    /// Where to accept MQTT over TLS (needs --tls-cert and --tls-key); off unless set
    #[arg(long, env = "FLEET_TLS_ADDR", requires_all = ["tls_cert", "tls_key"])]
    tls_addr: Option<SocketAddr>,
    /// PEM certificate chain for the TLS listener
    #[arg(long, env = "FLEET_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for the TLS listener
    #[arg(long, env = "FLEET_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Where to serve /metrics and /health; "off" to disable
    #[arg(long, env = "FLEET_METRICS_ADDR", default_value = "127.0.0.1:9101")]
    metrics_addr: String,
    /// Users file (TOML: [[user]] username, password_hash, role); turns authentication on
    #[arg(long, env = "FLEET_USERS_FILE")]
    users_file: Option<PathBuf>,
    /// Let clients connect without a username (only on loopback or a trusted network)
    #[arg(long, env = "FLEET_ALLOW_ANONYMOUS")]
    allow_anonymous: bool,
    /// What anonymous clients may do: admin, controller, robot or reader
    #[arg(long, env = "FLEET_ANONYMOUS_ROLE", default_value = "admin")]
    anonymous_role: Role,
    #[command(flatten)]
    topics: TopicArgs,
    /// Home Assistant's discovery prefix (robots may publish there)
    #[arg(long, env = "FLEET_DISCOVERY_PREFIX", default_value = "homeassistant")]
    discovery_prefix: String,
    /// Unacknowledged QoS 1/2 messages allowed per client
    #[arg(long, env = "FLEET_MAX_INFLIGHT", default_value = "1024")]
    max_inflight: NonZeroU16,
    /// Messages queued per client before they are dropped (and counted)
    #[arg(long, env = "FLEET_MAX_QUEUE_LEN", default_value_t = 10_000)]
    max_queue_len: usize,
    /// Largest MQTT packet accepted, in bytes
    #[arg(long, env = "FLEET_MAX_PACKET_SIZE", default_value_t = 1024 * 1024)]
    max_packet_size: u32,
    /// Most clients connected at once per listener
    #[arg(long, env = "FLEET_MAX_CONNECTIONS", default_value_t = 100_000)]
    max_connections: usize,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Read a password from standard input and print its argon2 hash for the users file
    HashPassword,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Args =
        fleet_runtime::config::parse_with_file("config").map_err(anyhow::Error::msg)?;
    if let Some(Command::HashPassword) = args.command {
        let mut password = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut password)
            .context("reading the password")?;
        let password = password.trim_end_matches(['\r', '\n']);
        anyhow::ensure!(!password.is_empty(), "the password is empty");
        println!("{}", hash_password(password).map_err(anyhow::Error::msg)?);
        return Ok(());
    }
    let _telemetry = fleet_runtime::telemetry::init("fleet-broker");
    let users = args
        .users_file
        .as_deref()
        .map(Users::load)
        .transpose()
        .context("loading --users-file")?
        .map(Arc::new);
    if let Some(users) = &users {
        tracing::info!(users = users.len(), "authentication on");
    }
    let broker = fleet_broker::start(BrokerConfig {
        mqtt_addr: args.mqtt_addr,
        ws_addr: address_or_off("--ws-addr", &args.ws_addr)?,
        tls: match (args.tls_addr, args.tls_cert, args.tls_key) {
            (Some(addr), Some(cert), Some(key)) => Some(TlsListener { addr, cert, key }),
            _ => None,
        },
        http_addr: address_or_off("--metrics-addr", &args.metrics_addr)?,
        topics: AclTopics {
            fleet: args.topics.topics(),
            discovery_prefix: args.discovery_prefix,
        },
        users,
        allow_anonymous: args.allow_anonymous,
        anonymous_role: args.anonymous_role,
        max_inflight: args.max_inflight,
        max_queue_len: args.max_queue_len,
        max_packet_size: args.max_packet_size,
        max_connections: args.max_connections,
    })
    .await?;
    fleet_runtime::shutdown_signal().await;
    broker.stop();
    Ok(())
}

/// A listen address, or `None` for "off".
fn address_or_off(flag: &str, value: &str) -> anyhow::Result<Option<SocketAddr>> {
    if value == "off" {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .with_context(|| format!("{flag} {value:?} is neither an address nor \"off\""))
}
