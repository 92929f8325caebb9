//! The fleet's MQTT broker: rmqtt embedded with the settings the fleet needs.
//!
//! MQTT 3.1.1 and 5 share one TCP port (and, optionally, a websocket listener on `/mqtt`).
//! A publish check refuses what would hurt the fleet: retained commands (they would
//! re-fire on every reconnect) and topic names with wildcards or NUL, which rmqtt accepts.

pub mod acl;
pub mod auth;
pub mod http;
pub mod metrics;

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;
use rmqtt::types::{AuthResult, PublishAclResult, SubscribeAclResult};
use tokio::task::JoinHandle;

use crate::acl::{AclTopics, Role};
use crate::auth::{Users, Verdict};
use crate::metrics::BrokerMetrics;
use fleet_runtime::log_limit::{Admission, LogLimiter, report_held_back};

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
    /// Most clients connected at once per listener.
    pub max_connections: usize,
    /// Unacknowledged QoS 1/2 messages per client. rmqtt's default (16) disconnects a
    /// 3.1.1 client that pipelines more QoS 2 publishes.
    pub max_inflight: NonZeroU16,
    /// Messages queued per client before rmqtt drops (and counts) them.
    pub max_queue_len: usize,
    pub max_packet_size: u32,
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
            max_connections: 100_000,
            max_inflight: NonZeroU16::new(1024).unwrap_or(NonZeroU16::MIN),
            max_queue_len: 10_000,
            max_packet_size: 1024 * 1024,
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
    let hooks = FleetHooks {
        topics: config.topics.clone(),
        users: config.users.clone(),
        allow_anonymous: config.allow_anonymous,
        anonymous_role: config.anonymous_role,
        metrics: metrics.clone(),
        log_limit: log_limit.clone(),
        password_checks: Arc::new(tokio::sync::Semaphore::new(concurrent_password_checks())),
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

    let tcp = listener(&config, "fleet/tcp", config.mqtt_addr)
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
        let ws = listener(&config, "fleet/ws", addr)
            .bind()
            .and_then(|l| l.ws())
            .map_err(|source| BrokerError::Bind { addr, source })?;
        ws_addr = Some(ws.local_addr().unwrap_or(addr));
        server = server.listener_by_id(ws, WS_LISTENER_ID);
    }

    let mut tls_addr = None;
    if let Some(tls) = &config.tls {
        let listener = listener(&config, "fleet/tls", tls.addr)
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

fn listener(config: &BrokerConfig, name: &str, addr: SocketAddr) -> Builder {
    Builder::new()
        .name(name)
        .laddr(addr)
        // A restarted broker must be able to bind while old connections sit in TIME_WAIT.
        .reuseaddr(Some(true))
        // Commands and results are small packets: without TCP_NODELAY, Nagle's algorithm
        // and delayed ACKs hold them back by up to 40 ms.
        .nodelay(true)
        // With authentication on, rmqtt must ask the fleet's hook about every client
        // (it skips the hook for clients without a username when anonymous is allowed).
        .allow_anonymous(config.users.is_none())
        .max_connections(config.max_connections)
        .max_inflight(config.max_inflight)
        .max_mqueue_len(config.max_queue_len)
        .max_packet_size(config.max_packet_size)
        // rmqtt stamps a 5-minute expiry on every message by default, which silently
        // drops queued commands. Senders set expiry themselves.
        .message_expiry_interval(Duration::ZERO)
}

/// The fleet's rules in rmqtt's hooks: authentication, the ACL, the publish rules rmqtt
/// lacks, and the counts behind the metrics.
#[derive(Clone)]
struct FleetHooks {
    topics: AclTopics,
    users: Option<Arc<Users>>,
    allow_anonymous: bool,
    anonymous_role: Role,
    metrics: Arc<BrokerMetrics>,
    log_limit: Arc<LogLimiter>,
    /// Each argon2 check holds 19 MiB for tens of milliseconds. Without a bound, a flood
    /// of logins with wrong passwords runs hundreds at once on blocking threads and takes
    /// gigabytes; with it, they wait their turn and the rest of the broker keeps going.
    password_checks: Arc<tokio::sync::Semaphore>,
}

impl FleetHooks {
    /// Whether to write a log line of `kind` now: `Some(lines held back before it)`.
    fn log_line(&self, kind: &'static str) -> Option<u64> {
        match self.log_limit.admit(kind, std::time::Instant::now()) {
            Admission::Log { held_back } => Some(held_back),
            Admission::HoldBack => None,
        }
    }

    /// The role of a connected client (it passed authentication already).
    fn role_of(&self, username: Option<&str>) -> Option<Role> {
        match (&self.users, username) {
            (Some(users), Some(name)) => users.role_of(name),
            _ => self.allow_anonymous.then_some(self.anonymous_role),
        }
    }

    fn refusal(&self, topic: &str, retain: bool) -> Option<(&'static str, &'static str)> {
        if topic.is_empty() || topic.contains(['+', '#', '\0']) {
            Some((
                "invalid_topic",
                "topic names must not be empty or contain '+', '#' or NUL",
            ))
        } else if retain && self.topics.fleet.is_command_topic(topic) {
            Some((
                "retained_command",
                "commands must not be retained: a retained command re-fires on every reconnect",
            ))
        } else {
            None
        }
    }

    async fn authenticate(
        &self,
        username: Option<String>,
        password: Option<Vec<u8>>,
    ) -> AuthResult {
        let Some(users) = self.users.clone() else {
            return AuthResult::Allow(false, None);
        };
        let Some(username) = username else {
            if self.allow_anonymous {
                return AuthResult::Allow(false, None);
            }
            self.metrics.record_auth_failure("anonymous");
            if let Some(held_back) = self.log_line("anonymous_refused") {
                tracing::warn!(
                    held_back,
                    "refused a client without credentials (anonymous access is off)"
                );
            }
            return AuthResult::NotAuthorized;
        };
        let password = password.unwrap_or_default();
        let name = username.clone();
        let Ok(_permit) = self.password_checks.acquire().await else {
            // Only closed when the broker stops.
            return AuthResult::NotAuthorized;
        };
        // argon2 takes tens of milliseconds on a cache miss: off the async threads.
        let verdict = tokio::task::spawn_blocking(move || users.verify(&name, &password))
            .await
            .unwrap_or(Verdict::BadCredentials);
        match verdict {
            Verdict::Allowed(_) => AuthResult::Allow(false, None),
            Verdict::BadCredentials => {
                self.metrics.record_auth_failure("bad_credentials");
                if let Some(held_back) = self.log_line("bad_credentials") {
                    tracing::warn!(%username, held_back, "refused a client: bad username or password");
                }
                AuthResult::BadUsernameOrPassword
            }
        }
    }
}

fn username(session: &rmqtt::session::Session) -> Option<&str> {
    session.id.username.as_deref()
}

#[async_trait]
impl Handler for FleetHooks {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::ClientAuthenticate(info) => {
                let username = info.username().map(|u| u.to_string());
                let password = info.password().map(|p| p.to_vec());
                let result = self.authenticate(username, password).await;
                (false, Some(HookResult::AuthResult(result)))
            }
            Parameter::ClientSubscribeCheckAcl(session, subscribe) => {
                let filter = subscribe.topic_filter.to_string();
                let user = username(session);
                let allowed = self.role_of(user).is_some_and(|role| {
                    self.topics
                        .may_subscribe(role, user.unwrap_or_default(), &filter)
                });
                if allowed {
                    return (true, acc);
                }
                self.metrics.record_acl_denial("subscribe");
                if let Some(held_back) = self.log_line("subscription_refused") {
                    tracing::warn!(client = %session.id.client_id, user = user.unwrap_or("(anonymous)"), %filter, held_back, "subscription refused by the ACL");
                }
                let denied = SubscribeAclResult::new_failure(SubscribeAckReason::NotAuthorized);
                (false, Some(HookResult::SubscribeAclResult(denied)))
            }
            Parameter::MessagePublishCheckAcl(session, publish) => {
                let topic: &str = &publish.topic;
                let user = username(session);
                let refusal = self.refusal(topic, publish.retain).or_else(|| {
                    let allowed = self.role_of(user).is_some_and(|role| {
                        self.topics
                            .may_publish(role, user.unwrap_or_default(), topic)
                    });
                    (!allowed).then_some(("acl", "not allowed to publish to this topic"))
                });
                if let Some((reason, text)) = refusal {
                    if reason == "acl" {
                        self.metrics.record_acl_denial("publish");
                    } else {
                        self.metrics.record_refused(reason);
                    }
                    if let Some(held_back) = self.log_line("publish_refused") {
                        tracing::warn!(client = %session.id.client_id, user = user.unwrap_or("(anonymous)"), topic = %topic.escape_debug(), reason = text, held_back, "publish refused");
                    }
                    let result = PublishAclResult::rejected(false, Some(text.into()));
                    return (false, Some(HookResult::PublishAclResult(result)));
                }
                self.metrics
                    .record_received(topic, publish.retain, publish.payload.is_empty());
                if self.topics.fleet.is_command_topic(topic) {
                    // Follow a click through the broker's log by its trace id.
                    let traceparent = publish.properties.as_ref().and_then(|p| {
                        p.user_properties
                            .iter()
                            .find(|(k, _)| &**k == "traceparent")
                            .map(|(_, v)| v.to_string())
                    });
                    tracing::debug!(client = %session.id.client_id, %topic, traceparent = traceparent.as_deref().unwrap_or("-"), "command");
                }
                (true, acc)
            }
            Parameter::MessageDelivered(_, _, publish) => {
                self.metrics.record_delivered(&publish.topic);
                (true, acc)
            }
            Parameter::MessageDropped(to, from, publish, reason) => {
                let kind = drop_reason(reason);
                self.metrics.record_dropped(kind);
                if let Some(held_back) = self.log_line("message_dropped") {
                    tracing::warn!(?to, ?from, topic = %publish.topic, reason = kind, held_back, "message dropped");
                }
                (true, acc)
            }
            Parameter::ClientConnected(_) => {
                self.metrics.connects.inc();
                self.metrics.connections.inc();
                (true, acc)
            }
            Parameter::ClientDisconnected(session, reason) => {
                let kind = disconnect_reason(reason);
                self.metrics.record_disconnect(kind);
                if kind == "protocol_error"
                    && let Some(held_back) = self.log_line("protocol_error")
                {
                    tracing::warn!(client = %session.id.client_id, user = username(session).unwrap_or("(anonymous)"), %reason, held_back, "disconnected a client that broke the protocol");
                }
                self.metrics.connections.dec();
                (true, acc)
            }
            _ => (true, acc),
        }
    }
}

/// How many argon2 checks may run at once: one per core, at least two.
fn concurrent_password_checks() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().max(2))
}

/// A bounded label for why a client went away.
fn disconnect_reason(reason: &rmqtt::types::Reason) -> &'static str {
    use rmqtt::types::Reason;
    match reason {
        Reason::ConnectDisconnect(_) => "client",
        Reason::ConnectRemoteClose
        | Reason::ConnectReadWriteError
        | Reason::ConnectReadWriteTimeout => "connection_closed",
        Reason::ConnectKeepaliveTimeout => "keepalive_timeout",
        Reason::ConnectKicked(_) => "taken_over",
        // rmqtt reports what its decoder refused (oversized packets, topics that are not
        // UTF-8, a second CONNECT, unknown packet types) as a plain error text.
        Reason::ProtocolError(_) | Reason::MqttError(_) | Reason::Error(_) => "protocol_error",
        Reason::Reasons(reasons) => reasons.first().map_or("other", disconnect_reason),
        _ => "other",
    }
}

/// A bounded label for why rmqtt dropped a message.
fn drop_reason(reason: &rmqtt::types::Reason) -> &'static str {
    use rmqtt::types::Reason;
    match reason {
        Reason::MessageQueueFull => "queue_full",
        Reason::InflightWindowFull => "inflight_full",
        Reason::MessageExpiration => "expired",
        Reason::SessionExpiration => "session_expired",
        Reason::PublishResult(_) | Reason::DelayedPublishRefused => "refused",
        Reason::ConnectDisconnect(_)
        | Reason::ConnectRemoteClose
        | Reason::ConnectReadWriteError
        | Reason::ConnectReadWriteTimeout
        | Reason::ConnectKeepaliveTimeout
        | Reason::ConnectKicked(_) => "disconnected",
        _ => "other",
    }
}
