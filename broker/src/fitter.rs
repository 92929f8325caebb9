//! Per-connection negotiation: rmqtt's defaults, except for keep-alive.
//!
//! rmqtt's listener setting `max_keepalive` treats both protocol versions alike: above it an
//! MQTT 5 client is told a lower Server Keep Alive (right) and a 3.1.1 client is refused
//! (wrong for us: mosquitto_pub, Home Assistant and robots on old libraries would be locked
//! out by a setting meant to bound how long a dead connection goes unnoticed). Here MQTT 5
//! clients that ask for more than the maximum, or for none at all, get the maximum in
//! CONNACK; 3.1.1 clients keep what they asked for, as with Mosquitto's `max_keepalive`
//! for MQTT 5 only.

use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;
use std::time::Duration;

use rmqtt::codec::types::{MQTT_LEVEL_5, Publish};
use rmqtt::fitter::{DefaultFitter, Fitter, FitterManager};
use rmqtt::types::{ConnectInfo, Disconnect, FitterType, Id, ListenerConfig};

/// Creates a [`FleetFitter`] for every connection.
pub(crate) struct FleetFitterManager {
    /// Seconds; 0 leaves every client's keep-alive as it asked.
    pub(crate) max_keepalive: u16,
}

impl FitterManager for FleetFitterManager {
    fn create(&self, conn_info: Arc<ConnectInfo>, id: Id, cfg: ListenerConfig) -> FitterType {
        let is_v5 = conn_info.proto_ver() == MQTT_LEVEL_5;
        Arc::new(FleetFitter {
            default: DefaultFitter::new(conn_info, id, cfg),
            max_keepalive: if is_v5 { self.max_keepalive } else { 0 },
        })
    }
}

struct FleetFitter {
    default: DefaultFitter,
    /// The Server Keep Alive cap for this connection; 0 for none (3.1.1 clients).
    max_keepalive: u16,
}

/// The keep-alive an MQTT 5 client is told to use: what it asked for, unless that is none
/// (0, which would let a half-open connection live forever) or more than the cap.
fn server_keepalive(requested: u16, max_keepalive: u16) -> u16 {
    if max_keepalive == 0 || (requested != 0 && requested <= max_keepalive) {
        requested
    } else {
        max_keepalive
    }
}

impl Fitter for FleetFitter {
    fn keep_alive(&self, keep_alive: &mut u16) -> rmqtt::Result<u16> {
        *keep_alive = server_keepalive(*keep_alive, self.max_keepalive);
        self.default.keep_alive(keep_alive)
    }

    fn max_mqueue_len(&self) -> usize {
        self.default.max_mqueue_len()
    }

    fn mqueue_rate_limit(&self) -> (NonZeroU32, Duration) {
        self.default.mqueue_rate_limit()
    }

    fn max_inflight(&self) -> NonZeroU16 {
        self.default.max_inflight()
    }

    fn session_expiry_interval(&self, disconnect: Option<&Disconnect>) -> Duration {
        self.default.session_expiry_interval(disconnect)
    }

    fn message_expiry_interval(&self, publish: &Publish) -> Duration {
        self.default.message_expiry_interval(publish)
    }

    fn max_client_topic_aliases(&self) -> u16 {
        self.default.max_client_topic_aliases()
    }

    fn max_server_topic_aliases(&self) -> u16 {
        self.default.max_server_topic_aliases()
    }
}

#[cfg(test)]
mod tests {
    use super::server_keepalive;

    #[test]
    fn mqtt5_keepalive_is_capped_and_never_left_off() {
        assert_eq!(server_keepalive(30, 60), 30);
        assert_eq!(server_keepalive(60, 60), 60);
        assert_eq!(server_keepalive(120, 60), 60);
        assert_eq!(server_keepalive(0, 60), 60);
    }

    #[test]
    fn no_cap_leaves_the_clients_choice() {
        assert_eq!(server_keepalive(0, 0), 0);
        assert_eq!(server_keepalive(65535, 0), 65535);
    }
}
