//! The fleet's MQTT broker: rmqtt embedded with the settings the fleet needs.
//!
//! MQTT 3.1.1 and 5 share one TCP port (and, optionally, a websocket listener on `/mqtt`).
//! A publish check refuses what would hurt the fleet: retained commands (they would
//! re-fire on every reconnect) and topic names with wildcards or NUL, which rmqtt accepts.

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use fleet_protocol::Topics;
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;
use rmqtt::types::PublishAclResult;
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen for MQTT on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: rmqtt::Error,
    },
    #[error("cannot register the rmqtt plugin {plugin}: {source}")]
    Plugin {
        plugin: &'static str,
        #[source]
        source: rmqtt::Error,
    },
}

/// Everything the broker needs to start. `Default` is the all-in-one setup: loopback only.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// MQTT 3.1.1 and 5 over TCP.
    pub mqtt_addr: SocketAddr,
    /// MQTT over websockets on `/mqtt`; off when `None`.
    pub ws_addr: Option<SocketAddr>,
    pub topics: Topics,
    /// Whether clients may connect without credentials. Authentication is issue 5's
    /// work; until then only bind it to loopback or a trusted network.
    pub allow_anonymous: bool,
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
            topics: Topics::default(),
            allow_anonymous: true,
            max_inflight: NonZeroU16::new(1024).unwrap_or(NonZeroU16::MIN),
            max_queue_len: 10_000,
            max_packet_size: 1024 * 1024,
        }
    }
}

/// Counters kept by the fleet's hooks; exported as Prometheus metrics in issue 5.
#[derive(Debug, Default)]
pub struct BrokerCounters {
    pub publishes_refused: AtomicU64,
    pub messages_dropped: AtomicU64,
}

/// A running broker. Dropping it does not stop it; call [`RunningBroker::stop`].
pub struct RunningBroker {
    mqtt_addr: SocketAddr,
    ws_addr: Option<SocketAddr>,
    counters: Arc<BrokerCounters>,
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

    pub fn counters(&self) -> &Arc<BrokerCounters> {
        &self.counters
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

/// Binds the listeners and starts the broker on the current tokio runtime.
pub async fn start(config: BrokerConfig) -> Result<RunningBroker, BrokerError> {
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

    let counters = Arc::new(BrokerCounters::default());
    let register = scx.extends.hook_mgr().register();
    let guard = FleetGuard {
        topics: config.topics.clone(),
        counters: counters.clone(),
    };
    register
        .add(Type::MessagePublishCheckAcl, Box::new(guard.clone()))
        .await;
    register.add(Type::MessageDropped, Box::new(guard)).await;
    register.start().await;

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

    let server = server.build();
    let task = tokio::spawn(async move {
        if let Err(error) = server.run().await {
            tracing::error!(%error, "MQTT broker stopped");
        }
    });
    tracing::info!(%mqtt_addr, ws = ?ws_addr, "MQTT broker listening (MQTT 3.1.1 and 5)");
    Ok(RunningBroker {
        mqtt_addr,
        ws_addr,
        counters,
        task,
    })
}

fn listener(config: &BrokerConfig, name: &str, addr: SocketAddr) -> Builder {
    Builder::new()
        .name(name)
        .laddr(addr)
        // A restarted broker must be able to bind while old connections sit in TIME_WAIT.
        .reuseaddr(Some(true))
        .allow_anonymous(config.allow_anonymous)
        .max_inflight(config.max_inflight)
        .max_mqueue_len(config.max_queue_len)
        .max_packet_size(config.max_packet_size)
        // rmqtt stamps a 5-minute expiry on every message by default, which silently
        // drops queued commands. Senders set expiry themselves.
        .message_expiry_interval(Duration::ZERO)
}

/// The fleet's own publish rules, and the count of what rmqtt drops.
#[derive(Clone)]
struct FleetGuard {
    topics: Topics,
    counters: Arc<BrokerCounters>,
}

impl FleetGuard {
    fn refusal(&self, topic: &str, retain: bool) -> Option<&'static str> {
        if topic.contains(['+', '#', '\0']) {
            Some("topic names must not contain '+', '#' or NUL")
        } else if retain && self.topics.is_command_topic(topic) {
            Some("commands must not be retained: a retained command re-fires on every reconnect")
        } else {
            None
        }
    }
}

#[async_trait]
impl Handler for FleetGuard {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::MessagePublishCheckAcl(session, publish) => {
                if let Some(reason) = self.refusal(&publish.topic, publish.retain) {
                    self.counters
                        .publishes_refused
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(client = %session.id, topic = %publish.topic.escape_debug(), reason, "publish refused");
                    let result = PublishAclResult::rejected(false, Some(reason.into()));
                    return (false, Some(HookResult::PublishAclResult(result)));
                }
                (true, acc)
            }
            Parameter::MessageDropped(to, from, publish, reason) => {
                self.counters
                    .messages_dropped
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(?to, ?from, topic = %publish.topic, %reason, "message dropped");
                (true, acc)
            }
            _ => (true, acc),
        }
    }
}
