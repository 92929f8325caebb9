//! The fleet's MQTT broker: rmqtt embedded with the settings the fleet needs.
//!
//! MQTT 3.1.1 and 5 share one TCP port (and, optionally, a websocket listener on `/mqtt`).
//! A publish check refuses what would hurt the fleet: retained commands (they would
//! re-fire on every reconnect) and topic names with wildcards or NUL, which rmqtt accepts.

pub mod acl;
pub mod auth;
pub mod clients;
pub(crate) mod fitter;
pub mod gate;
mod hooks;
pub mod http;
pub mod limits;
pub mod logins;
pub mod metrics;
pub mod retained;

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::Duration;

use std::sync::Mutex;

use rmqtt::context::ServerContext;
use rmqtt::hook::Type;
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;
use tokio::task::JoinHandle;

use crate::acl::{AclTopics, Role};
use crate::auth::Users;
use crate::gate::{ConnectionLimits, FleetGate, Refusals};
use crate::hooks::FleetHooks;
use crate::limits::TopicLimits;
use crate::logins::{LoginLimits, Logins};
use crate::metrics::BrokerMetrics;
use crate::retained::{RetainedLedger, RetainedQuota};
use fleet_runtime::log_limit::{LogLimiter, report_held_back};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen for MQTT on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: rmqtt::Error,
    },
    #[error("anonymous access is off and there is no users file: nobody could connect")]
    NobodyCanConnect,
    #[error("cannot serve metrics on {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the password-checking threads: {0}")]
    Threads(#[source] std::io::Error),
    #[error("cannot register the rmqtt plugin {plugin}: {source}")]
    Plugin {
        plugin: &'static str,
        #[source]
        source: rmqtt::Error,
    },
}

/// A TLS listener: where, and the PEM certificate chain and private key files.
#[derive(Debug, Clone)]
pub struct TlsListener {
    pub addr: SocketAddr,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// Everything the broker needs to start. `Default` is the all-in-one setup: loopback only.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// MQTT 3.1.1 and 5 over TCP.
    pub mqtt_addr: SocketAddr,
    /// MQTT over websockets on `/mqtt`; off when `None`.
    pub ws_addr: Option<SocketAddr>,
    /// MQTT over TLS (3.1.1 and 5); off when `None`.
    pub tls: Option<TlsListener>,
    pub topics: AclTopics,
    /// Users with argon2 password hashes and roles; `None` turns authentication off
    /// (then every client is anonymous).
    pub users: Option<Arc<Users>>,
    /// Whether clients may connect without a username.
    pub allow_anonymous: bool,
    /// What anonymous clients may do.
    pub anonymous_role: Role,
    /// Where to serve `/metrics` and `/health`; off when `None`.
    pub http_addr: Option<SocketAddr>,
    /// Connections open at once, per address before their CONNECT, and the web pages
    /// allowed to use the websocket listener.
    pub connections: ConnectionLimits,
    /// How long a new connection has to send its CONNECT (each of the first bytes and the
    /// rest of the packet, so at most twice this).
    pub handshake_timeout: Duration,
    /// Password checks: threads, queue, per-address backoff.
    pub logins: LoginLimits,
    /// How long and deep topic names and filters may be.
    pub topic_limits: TopicLimits,
    /// Retained messages per user and in total.
    pub retained: RetainedQuota,
    /// Unacknowledged QoS 1/2 messages per client. rmqtt's default (16) disconnects a
    /// 3.1.1 client that pipelines more QoS 2 publishes.
    pub max_inflight: NonZeroU16,
    /// Messages waiting for one subscriber before the clients publishing QoS 1/2 to it
    /// are held back; twice as many are kept before any is dropped (and counted).
    pub max_queue_len: usize,
    pub max_packet_size: u32,
    /// The longest keep-alive, in seconds, an MQTT 5 client is allowed (Server Keep Alive
    /// in CONNACK); 0 for no cap. 3.1.1 clients keep theirs: they cannot be told.
    pub max_keepalive: u16,
    /// Topic aliases per MQTT 5 connection, each way (0: none).
    pub max_topic_aliases: u16,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            mqtt_addr: SocketAddr::from(([127, 0, 0, 1], 1883)),
            ws_addr: None,
            tls: None,
            topics: AclTopics::default(),
            users: None,
            allow_anonymous: true,
            anonymous_role: Role::Admin,
            http_addr: None,
            connections: ConnectionLimits::default(),
            handshake_timeout: Duration::from_secs(10),
            logins: LoginLimits::default(),
            topic_limits: TopicLimits::default(),
            retained: RetainedQuota::default(),
            max_inflight: NonZeroU16::new(1024).unwrap_or(NonZeroU16::MIN),
            max_queue_len: 10_000,
            max_packet_size: 1024 * 1024,
            max_keepalive: 60,
            max_topic_aliases: 10,
        }
    }
}

/// A running broker. Dropping it does not stop it; call [`RunningBroker::stop`].
pub struct RunningBroker {
    mqtt_addr: SocketAddr,
    ws_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    metrics: Arc<BrokerMetrics>,
    task: JoinHandle<()>,
}

impl RunningBroker {
    /// The bound MQTT address (the real port when configured with port 0).
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.ws_addr
    }

    /// The bound metrics address (the real port when configured with port 0).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    pub fn metrics(&self) -> &Arc<BrokerMetrics> {
        &self.metrics
    }

    /// Stops accepting connections. Established connections end with the runtime.
    pub fn stop(self) {
        self.task.abort();
    }

    /// Waits until the broker stops (it only stops on error or `stop`).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// rmqtt keys listener settings by id; fixed ids keep them apart even on port 0.
const TCP_LISTENER_ID: u16 = 1;
const WS_LISTENER_ID: u16 = 2;
const TLS_LISTENER_ID: u16 = 3;

/// Binds the listeners and starts the broker on the current tokio runtime.
pub async fn start(config: BrokerConfig) -> Result<RunningBroker, BrokerError> {
    if !config.allow_anonymous && config.users.is_none() {
        return Err(BrokerError::NobodyCanConnect);
    }
    // Retained messages live in memory and never expire on their own: state, status and
    // discovery must stay until their owner replaces or clears them.
    let scx = ServerContext::new()
        .plugins_config_map_add(
            "rmqtt-retainer",
            "storage.type = \"ram\"\nmax_retained_messages = 0\nmax_payload_size = \"1MB\"\nretained_message_ttl = \"0m\"\n",
        )
        // MQTT 5 shared subscriptions (`$share/<group>/<filter>`) spread messages evenly.
        .plugins_config_map_add("rmqtt-shared-subscription", "strategy = \"round_robin\"\n")
        .build()
        .await;
    rmqtt_retainer::register(&scx, true, false)
        .await
        .map_err(|source| BrokerError::Plugin {
            plugin: "rmqtt-retainer",
            source,
        })?;
    // Without this plugin `$share/...` subscriptions are acknowledged and never deliver.
    rmqtt_shared_subscription::register(&scx, true, false)
        .await
        .map_err(|source| BrokerError::Plugin {
            plugin: "rmqtt-shared-subscription",
            source,
        })?;

    let metrics = Arc::new(BrokerMetrics::new(config.topics.clone()));
    let register = scx.extends.hook_mgr().register();
    let log_limit = Arc::new(LogLimiter::default());
    let logins = match &config.users {
        Some(users) => Some(Arc::new(
            Logins::start(users.clone(), config.logins).map_err(BrokerError::Threads)?,
        )),
        None => None,
    };
    let refusals = Arc::new(Refusals::default());
    let hooks = FleetHooks {
        scx: scx.clone(),
        topics: config.topics.clone(),
        limits: config.topic_limits,
        users: config.users.clone(),
        logins,
        allow_anonymous: config.allow_anonymous,
        anonymous_role: config.anonymous_role,
        metrics: metrics.clone(),
        log_limit: log_limit.clone(),
        retained: Arc::new(Mutex::new(RetainedLedger::new(config.retained))),
        refusals: refusals.clone(),
    };
    for hook in [
        Type::ClientAuthenticate,
        Type::ClientSubscribeCheckAcl,
        Type::MessagePublishCheckAcl,
        Type::MessageDelivered,
        Type::MessageDropped,
        Type::ClientConnected,
        Type::ClientDisconnected,
    ] {
        register.add(hook, Box::new(hooks.clone())).await;
    }
    register.start().await;
    *scx.extends.fitter_mgr_mut().await = Box::new(fitter::FleetFitterManager {
        max_keepalive: config.max_keepalive,
    });
    // One gate for every listener: the connection cap is the broker's, not a port's.
    let mut connections = config.connections.clone();
    connections.max_connections = within_file_limit(connections.max_connections);
    let gate = Arc::new(FleetGate::new(
        connections,
        refusals,
        metrics.clone(),
        log_limit.clone(),
    ));

    let http_addr = match config.http_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| BrokerError::Http { addr, source })?;
            let bound = listener.local_addr().unwrap_or(addr);
            tokio::spawn(http::serve(listener, metrics.clone()));
            Some(bound)
        }
        None => None,
    };

    let tcp = listener(&config, &gate, "fleet/tcp", config.mqtt_addr)
        .bind()
        .and_then(|l| l.tcp())
        .map_err(|source| BrokerError::Bind {
            addr: config.mqtt_addr,
            source,
        })?;
    let mqtt_addr = tcp.local_addr().unwrap_or(config.mqtt_addr);
    let mut server = MqttServer::new(scx).listener_by_id(tcp, TCP_LISTENER_ID);

    let mut ws_addr = None;
    if let Some(addr) = config.ws_addr {
        let ws = listener(&config, &gate, "fleet/ws", addr)
            .bind()
            .and_then(|l| l.ws())
            .map_err(|source| BrokerError::Bind { addr, source })?;
        ws_addr = Some(ws.local_addr().unwrap_or(addr));
        server = server.listener_by_id(ws, WS_LISTENER_ID);
    }

    let mut tls_addr = None;
    if let Some(tls) = &config.tls {
        let listener = listener(&config, &gate, "fleet/tls", tls.addr)
            .tls_cert(Some(tls.cert.display().to_string()))
            .tls_key(Some(tls.key.display().to_string()))
            .bind()
            .and_then(|l| l.tls())
            .map_err(|source| BrokerError::Bind {
                addr: tls.addr,
                source,
            })?;
        tls_addr = Some(listener.local_addr().unwrap_or(tls.addr));
        server = server.listener_by_id(listener, TLS_LISTENER_ID);
    }

    let server = server.build();
    let task = tokio::spawn(async move {
        tokio::select! {
            result = server.run() => {
                if let Err(error) = result {
                    tracing::error!(%error, "MQTT broker stopped");
                }
            }
            () = report_held_back(&log_limit) => {}
        }
    });
    tracing::info!(%mqtt_addr, ws = ?ws_addr, tls = ?tls_addr, "MQTT broker listening (MQTT 3.1.1 and 5)");
    Ok(RunningBroker {
        mqtt_addr,
        ws_addr,
        http_addr,
        metrics,
        task,
    })
}

/// File descriptors kept for everything but client connections: listeners, the metrics
/// port, logs, TLS files.
const RESERVED_DESCRIPTORS: u64 = 256;

/// `wanted` connections, or fewer if the process cannot open that many sockets: once
/// accept() fails for lack of descriptors, nobody (robots included) gets in any more, so
/// the cap must bite first. Raises the soft limit to the hard one on the way.
fn within_file_limit(wanted: usize) -> usize {
    let limit = rlimit::increase_nofile_limit(u64::MAX)
        .or_else(|_| rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft));
    let Ok(limit) = limit else {
        return wanted;
    };
    let room = usize::try_from(limit.saturating_sub(RESERVED_DESCRIPTORS)).unwrap_or(usize::MAX);
    if wanted > room {
        tracing::warn!(
            wanted,
            allowed = room,
            file_limit = limit,
            "--max-connections is above what the file descriptor limit allows: capped (raise `ulimit -n` / LimitNOFILE for more)"
        );
    }
    wanted.min(room.max(1))
}

fn listener(config: &BrokerConfig, gate: &Arc<FleetGate>, name: &str, addr: SocketAddr) -> Builder {
    Builder::new()
        .name(name)
        .laddr(addr)
        // A restarted broker must be able to bind while old connections sit in TIME_WAIT.
        .reuseaddr(Some(true))
        // Commands and results are small packets: without TCP_NODELAY, Nagle's algorithm
        // and delayed ACKs hold them back by up to 40 ms.
        .nodelay(true)
        // rmqtt skips the login hook for clients without a username when anonymous access
        // is on; the fleet's hook decides about anonymous clients itself, so that client
        // ids and wills are checked for everyone.
        .allow_anonymous(false)
        .gate(gate.clone())
        .handshake_timeout(config.handshake_timeout)
        .max_connections(config.connections.max_connections)
        .max_inflight(config.max_inflight)
        // Publishers to a subscriber with `max_queue_len` messages waiting are held back
        // (patches/rmqtt, `Backlog`); the second half takes what they sent meanwhile.
        .max_mqueue_len(config.max_queue_len.saturating_mul(2))
        .max_packet_size(config.max_packet_size)
        // rmqtt's own level limit answers a bare 0x80 that nobody counts; the subscribe
        // hook refuses deeper filters itself (0x8F, counted, logged) before any trie.
        .max_topic_levels(0)
        // rmqtt stamps a 5-minute expiry on every message by default, which silently
        // drops queued commands. Senders set expiry themselves.
        .message_expiry_interval(Duration::ZERO)
        .max_topic_aliases(config.max_topic_aliases)
}
