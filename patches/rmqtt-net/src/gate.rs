//! Fleet patch: a hook for the embedding server at the two moments rmqtt's hooks cannot
//! see, the TCP accept and the websocket upgrade, so that it can cap connections (in
//! total, and those from one address still waiting to send their CONNECT) and refuse
//! websocket upgrades from foreign web pages; and name the precise reason for a refused
//! CONNECT, which rmqtt's hooks cannot.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use rmqtt_codec::{v3, v5};

/// Decides about connections before any MQTT packet has been read.
pub trait ConnectionGate: Send + Sync {
    /// A connection was accepted from `remote`. `None` closes it at once; otherwise the
    /// returned ticket travels with the connection.
    fn admit(&self, remote: SocketAddr) -> Option<Ticket>;

    /// A websocket upgrade request arrived from `remote` with this `Origin` header
    /// (absent for most non-browser clients). `false` answers it with HTTP 403.
    fn accept_websocket(&self, remote: SocketAddr, origin: Option<&str>) -> bool {
        let _ = (remote, origin);
        true
    }

    /// The CONNACK code for a refused MQTT 3.1.1 CONNECT from `remote` (rmqtt's login
    /// hook can only say "bad credentials" or "not authorized").
    fn refusal_v3(&self, remote: SocketAddr, code: v3::ConnectAckReason) -> v3::ConnectAckReason {
        let _ = remote;
        code
    }

    /// The CONNACK reason code for a refused MQTT 5 CONNECT from `remote`.
    fn refusal_v5(&self, remote: SocketAddr, code: v5::ConnectAckReason) -> v5::ConnectAckReason {
        let _ = remote;
        code
    }
}

/// What a connection holds while it lives: `connection` is dropped when it closes,
/// `until_connect` as soon as its CONNECT packet has been read.
pub struct Ticket {
    pub connection: Box<dyn Send + Sync>,
    pub until_connect: Option<Box<dyn Send + Sync>>,
}

impl Ticket {
    pub(crate) fn connect_received(&mut self) {
        self.until_connect = None;
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket").field("waiting_for_connect", &self.until_connect.is_some()).finish()
    }
}

/// The gate a listener asks, in its [`crate::Builder`].
#[derive(Clone)]
pub struct Gate(pub Arc<dyn ConnectionGate>);

impl fmt::Debug for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Gate")
    }
}
