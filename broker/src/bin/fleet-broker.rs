//! fleet-broker: the fleet's MQTT broker as its own process (compose, Helm).

use std::io::BufRead;
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleet_broker::acl::{AclTopics, Role};
use fleet_broker::auth::{Users, hash_password};
use fleet_broker::gate::ConnectionLimits;
use fleet_broker::limits::TopicLimits;
use fleet_broker::logins::LoginLimits;
use fleet_broker::retained::RetainedQuota;
use fleet_broker::{BrokerConfig, TlsListener};
use fleet_runtime::TopicArgs;

// mimalloc, not the system's allocator: after a flood (a backlog of queued messages for a
// slow subscriber, a burst of logins) glibc keeps the freed memory in its heap for reuse,
// tens of MiB that the process never gives back; mimalloc hands freed pages back to the
// system within milliseconds (docs/benchmarks.md, "Memory after floods").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    #[arg(long, env = "FLEET_MQTT_ADDR", value_parser = fleet_runtime::listen_addr, default_value = "127.0.0.1:1883")]
    mqtt_addr: SocketAddr,
    /// Where to accept MQTT over websockets (path /mqtt); "off" to disable
    #[arg(long, env = "FLEET_WS_ADDR", default_value = "127.0.0.1:8083")]
    ws_addr: String,
    /// Where to accept MQTT over TLS (needs --tls-cert and --tls-key); off unless set
    #[arg(long, env = "FLEET_TLS_ADDR", value_parser = fleet_runtime::listen_addr, requires_all = ["tls_cert", "tls_key"])]
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
    /// Let clients connect without a username (only on loopback or a trusted network).
    /// Without it and without --users-file, a broker whose listeners are all on loopback
    /// lets in clients on this machine only (local only mode, as Mosquitto 2 does), and
    /// any other broker refuses to start
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
    /// Messages waiting for one subscriber before clients publishing QoS 1/2 to it are held
    /// back (not read, for up to 2 s per publish); twice as many are kept before any is
    /// dropped (and counted)
    #[arg(long, env = "FLEET_MAX_QUEUE_LEN", default_value_t = 10_000)]
    max_queue_len: usize,
    /// Largest MQTT packet accepted, in bytes
    #[arg(long, env = "FLEET_MAX_PACKET_SIZE", default_value_t = 1024 * 1024)]
    max_packet_size: u32,
    /// Longest keep-alive in seconds an MQTT 5 client may use (told in CONNACK's Server Keep
    /// Alive, also to clients asking for none); 3.1.1 clients keep theirs. 0: no cap
    #[arg(long, env = "FLEET_MAX_KEEPALIVE_S", default_value_t = 60)]
    max_keepalive_s: u16,
    /// Topic aliases per MQTT 5 connection, in each direction; 0 turns them off
    #[arg(long, env = "FLEET_MAX_TOPIC_ALIASES", default_value_t = 10)]
    max_topic_aliases: u16,
    /// Connections open at once over every listener (never more than the process's file
    /// descriptor limit allows); beyond it new connections are closed at once
    #[arg(long, env = "FLEET_MAX_CONNECTIONS", default_value_t = 100_000)]
    max_connections: usize,
    /// Connections from one address that may wait for their CONNECT at once
    #[arg(long, env = "FLEET_MAX_PENDING_PER_ADDRESS", default_value_t = 500)]
    max_pending_per_address: usize,
    /// Seconds a new connection has to send its CONNECT (the first bytes, then the rest)
    #[arg(long, env = "FLEET_HANDSHAKE_TIMEOUT_S", default_value_t = 10)]
    handshake_timeout_s: u64,
    /// Web pages (Origin, e.g. https://ops.example.com) that may use MQTT over websockets,
    /// comma-separated; "*" for any. Clients that send no Origin are not affected
    #[arg(long, env = "FLEET_WS_ALLOWED_ORIGINS", value_delimiter = ',')]
    ws_allowed_origins: Vec<String>,
    /// Most levels in a topic name or filter (a/b/c has 3)
    #[arg(long, env = "FLEET_MAX_TOPIC_LEVELS", default_value_t = 32)]
    max_topic_levels: usize,
    /// Longest topic name or filter, in bytes
    #[arg(long, env = "FLEET_MAX_TOPIC_LENGTH", default_value_t = 1024)]
    max_topic_length: usize,
    /// Retained messages one user may hold (admins: no limit but --max-retained)
    #[arg(long, env = "FLEET_MAX_RETAINED_PER_USER", default_value_t = 64)]
    max_retained_per_user: usize,
    /// Retained payload bytes one user may hold
    #[arg(long, env = "FLEET_MAX_RETAINED_BYTES_PER_USER", default_value_t = 1024 * 1024)]
    max_retained_bytes_per_user: usize,
    /// Retained messages in the whole broker
    #[arg(long, env = "FLEET_MAX_RETAINED", default_value_t = 200_000)]
    max_retained: usize,
    /// Threads checking passwords (argon2, 19 MiB each while busy); default: one per core, at most 4
    #[arg(long, env = "FLEET_LOGIN_THREADS")]
    login_threads: Option<usize>,
    /// Password checks that may wait for a thread; beyond it CONNECT gets "server busy"
    #[arg(long, env = "FLEET_LOGIN_QUEUE", default_value_t = 32)]
    login_queue: usize,
    /// Threads serving MQTT. With one, connections are served in the order their packets
    /// arrive (as Mosquitto does); more spread the work over cores but a publish may
    /// overtake a subscription just sent on another connection
    #[arg(long, env = "FLEET_WORKER_THREADS", default_value_t = 1)]
    worker_threads: usize,
    /// Failed logins from one address before it must wait (1 s, doubling up to 60 s)
    #[arg(long, env = "FLEET_LOGIN_FAILURES_BEFORE_BACKOFF", default_value_t = 5)]
    login_failures_before_backoff: u32,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Read a password from standard input and print its argon2 hash for the users file
    HashPassword,
}

fn main() -> anyhow::Result<()> {
    let args: Args =
        fleet_runtime::config::parse_with_file("config").map_err(anyhow::Error::msg)?;
    // One thread, like Mosquitto: connections are served in the order their packets
    // arrive, so a SUBSCRIBE is in place before a PUBLISH that another connection sent
    // after it (clients and the Paho suites rely on that), and a delivery costs no
    // hand-over between threads. Password checks have threads of their own.
    let mut runtime = if args.worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(args.worker_threads);
        builder
    };
    runtime
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
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
    let ws_addr = fleet_runtime::listen_addr_or_off("--ws-addr", &args.ws_addr)
        .map_err(anyhow::Error::msg)?;
    let tls = match (args.tls_addr, args.tls_cert, args.tls_key) {
        (Some(addr), Some(cert), Some(key)) => Some(TlsListener { addr, cert, key }),
        _ => None,
    };
    // As Mosquitto 2 does without a configured listener ("local only mode"): with no users
    // file and every listener on loopback, clients on this machine get in without
    // credentials. A broker reachable from elsewhere without users refuses to start.
    let local_only = users.is_none()
        && !args.allow_anonymous
        && std::iter::once(args.mqtt_addr)
            .chain(ws_addr)
            .chain(tls.as_ref().map(|tls| tls.addr))
            .all(|addr| addr.ip().is_loopback());
    if local_only {
        tracing::warn!(
            mqtt_addr = %args.mqtt_addr,
            role = ?args.anonymous_role,
            "no --users-file: local only mode, clients on this machine connect without \
             credentials (give a users file for logins, or --allow-anonymous to say so)"
        );
    }
    let defaults = LoginLimits::default();
    let broker = fleet_broker::start(BrokerConfig {
        mqtt_addr: args.mqtt_addr,
        ws_addr,
        tls,
        http_addr: fleet_runtime::listen_addr_or_off("--metrics-addr", &args.metrics_addr)
            .map_err(anyhow::Error::msg)?,
        topics: AclTopics {
            fleet: args.topics.topics(),
            discovery_prefix: args.discovery_prefix,
        },
        users,
        allow_anonymous: args.allow_anonymous || local_only,
        anonymous_role: args.anonymous_role,
        max_inflight: args.max_inflight,
        max_queue_len: args.max_queue_len,
        max_packet_size: args.max_packet_size,
        max_keepalive: args.max_keepalive_s,
        max_topic_aliases: args.max_topic_aliases,
        connections: ConnectionLimits {
            max_connections: args.max_connections,
            max_pending_per_address: args.max_pending_per_address,
            ws_allowed_origins: args.ws_allowed_origins,
        },
        handshake_timeout: Duration::from_secs(args.handshake_timeout_s.max(1)),
        topic_limits: TopicLimits {
            max_levels: args.max_topic_levels.max(1),
            max_bytes: args.max_topic_length.max(1),
        },
        retained: RetainedQuota {
            messages_per_user: args.max_retained_per_user,
            bytes_per_user: args.max_retained_bytes_per_user,
            messages_total: args.max_retained,
        },
        logins: LoginLimits {
            workers: args.login_threads.unwrap_or(defaults.workers).max(1),
            queue: args.login_queue,
            failures_before_backoff: args.login_failures_before_backoff,
            ..defaults
        },
    })
    .await?;
    fleet_runtime::shutdown_signal().await;
    broker.stop();
    Ok(())
}
