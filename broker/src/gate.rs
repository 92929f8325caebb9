//! The broker's door, before any MQTT packet is read (rmqtt-net patched with a gate,
//! patches/README.md): a cap on open connections, a cap on connections from one address
//! that have not sent their CONNECT yet, and websocket upgrades only from web pages the
//! operator allowed. With the handshake timeout this bounds what idle or half-open
//! connections can hold: 20,000 of them used to exhaust the broker's file descriptors.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rmqtt::codec::{v3, v5};
use rmqtt::net::{ConnectionGate, Ticket};

use crate::hooks::Refusal;
use crate::metrics::BrokerMetrics;
use fleet_runtime::log_limit::{Admission, LogLimiter};

/// What the gate lets in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once over every listener; beyond it new ones are closed.
    pub max_connections: usize,
    /// Connections from one address that have not sent their CONNECT yet.
    pub max_pending_per_address: usize,
    /// Web pages (`Origin` header, e.g. `https://ops.example.com`) that may open MQTT
    /// over websockets; `*` allows any. Clients that send no `Origin` (everything but a
    /// browser) are not affected.
    pub ws_allowed_origins: Vec<String>,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            max_pending_per_address: 500,
            ws_allowed_origins: Vec::new(),
        }
    }
}

/// CONNECTs the login hook refused, by the client's address, until the CONNACK that
/// carries the precise reason is written (rmqtt itself only knows two).
#[derive(Default)]
pub(crate) struct Refusals(Mutex<HashMap<SocketAddr, Refusal>>);

/// Bounded by the handshakes in progress; an entry is taken when its CONNACK is written.
const MAX_REFUSALS: usize = 100_000;

impl Refusals {
    pub(crate) fn remember(&self, remote: SocketAddr, refusal: Refusal) {
        let mut table = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if table.len() < MAX_REFUSALS {
            table.insert(remote, refusal);
        }
    }

    fn take(&self, remote: SocketAddr) -> Option<Refusal> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&remote)
    }
}

pub struct FleetGate {
    limits: ConnectionLimits,
    refusals: Arc<Refusals>,
    open: Arc<AtomicUsize>,
    pending: Arc<Mutex<HashMap<IpAddr, usize>>>,
    metrics: Arc<BrokerMetrics>,
    log_limit: Arc<LogLimiter>,
}

impl FleetGate {
    pub(crate) fn new(
        limits: ConnectionLimits,
        refusals: Arc<Refusals>,
        metrics: Arc<BrokerMetrics>,
        log_limit: Arc<LogLimiter>,
    ) -> Self {
        Self {
            limits,
            refusals,
            open: Arc::new(AtomicUsize::new(0)),
            pending: Arc::new(Mutex::new(HashMap::new())),
            metrics,
            log_limit,
        }
    }

    /// Connections open now (whether or not they have logged in).
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    fn refuse(&self, remote: SocketAddr, reason: &'static str, why: &str) {
        self.metrics.record_connection_refused(reason);
        if let Admission::Log { held_back } = self.log_limit.admit(reason, Instant::now()) {
            tracing::warn!(%remote, reason, held_back, "{why}");
        }
    }

    pub fn origin_allowed(&self, origin: &str) -> bool {
        let origin = origin.trim_end_matches('/');
        self.limits.ws_allowed_origins.iter().any(|allowed| {
            allowed == "*" || allowed.trim_end_matches('/').eq_ignore_ascii_case(origin)
        })
    }
}

/// Held while a connection is open.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Held until a connection's CONNECT has been read.
struct Pending {
    table: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
    metrics: Arc<BrokerMetrics>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = table.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                table.remove(&self.ip);
            }
        }
        self.metrics.handshakes_pending.dec();
    }
}

impl ConnectionGate for FleetGate {
    fn admit(&self, remote: SocketAddr) -> Option<Ticket> {
        let already_open = self.open.fetch_add(1, Ordering::Relaxed);
        // Counted from here on; dropping it (refused, or closed later) counts it out.
        let open = Open(self.open.clone());
        if already_open >= self.limits.max_connections {
            drop(open);
            self.refuse(
                remote,
                "max_connections",
                "connection refused: the broker has as many connections as --max-connections allows",
            );
            return None;
        }
        let ip = remote.ip();
        {
            let mut table = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let count = table.entry(ip).or_insert(0);
            if *count >= self.limits.max_pending_per_address {
                drop(table);
                drop(open);
                self.refuse(
                    remote,
                    "pending_per_address",
                    "connection refused: too many connections from this address have not sent their CONNECT yet",
                );
                return None;
            }
            *count += 1;
        }
        self.metrics.handshakes_pending.inc();
        let pending = Pending {
            table: self.pending.clone(),
            ip,
            metrics: self.metrics.clone(),
        };
        Some(Ticket {
            connection: Box::new(open),
            until_connect: Some(Box::new(pending)),
        })
    }

    fn refusal_v3(&self, remote: SocketAddr, code: v3::ConnectAckReason) -> v3::ConnectAckReason {
        self.refusals.take(remote).map_or(code, Refusal::v3)
    }

    fn refusal_v5(&self, remote: SocketAddr, code: v5::ConnectAckReason) -> v5::ConnectAckReason {
        self.refusals.take(remote).map_or(code, Refusal::v5)
    }

    fn accept_websocket(&self, remote: SocketAddr, origin: Option<&str>) -> bool {
        match origin {
            None => true,
            Some(origin) if self.origin_allowed(origin) => true,
            Some(origin) => {
                self.metrics.record_connection_refused("ws_origin");
                if let Admission::Log { held_back } =
                    self.log_limit.admit("ws_origin", Instant::now())
                {
                    tracing::warn!(%remote, origin = %origin.escape_debug(), held_back, "websocket refused: a web page from this origin may not use the broker (see --ws-allowed-origins)");
                }
                false
            }
        }
    }
}
