//! Counts the connections the MQTT broker closes before a session starts.
//!
//! rmqtt offers no hook before a client's CONNECT is accepted: bytes that are not MQTT at
//! all (a port scanner, an HTTP request, a TCP probe that sends nothing) and CONNECT
//! packets it cannot take leave nothing but one `info` line from its listener
//! (`rmqtt::server`). This tracing layer counts those lines, whatever level the logs are
//! printed at, so the broker can export them as a counter. The counts are per process:
//! every fleet process runs at most one broker.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::Context;

/// Where rmqtt's listener logs (through the `log` crate) what happened to a connection.
const LISTENER_TARGET: &str = "rmqtt::server";

static NOT_MQTT: AtomicU64 = AtomicU64::new(0);
static BAD_CONNECT: AtomicU64 = AtomicU64::new(0);
static TIMEOUT: AtomicU64 = AtomicU64::new(0);

/// Why connections were closed before their session started, since the process began.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HandshakeFailures {
    /// The first bytes were not an MQTT CONNECT (or there were none).
    pub not_mqtt: u64,
    /// A CONNECT the broker refused for a reason other than the login (malformed, an
    /// overloaded broker). Refused logins are counted by the broker's own authentication.
    pub bad_connect: u64,
    /// No (whole) CONNECT within the handshake timeout: an idle or half-open connection.
    pub timeout: u64,
}

/// The counts so far.
pub fn counts() -> HandshakeFailures {
    HandshakeFailures {
        not_mqtt: NOT_MQTT.load(Ordering::Relaxed),
        bad_connect: BAD_CONNECT.load(Ordering::Relaxed),
        timeout: TIMEOUT.load(Ordering::Relaxed),
    }
}

/// What a line of rmqtt's listener says about a connection, if it is a refusal we count.
fn classify(message: &str) -> Option<&'static AtomicU64> {
    let listener_line = message.starts_with("MQTT version detection failed")
        || message.contains("processing error:");
    if listener_line && message.to_ascii_lowercase().contains("timeout") {
        Some(&TIMEOUT)
    } else if message.starts_with("MQTT version detection failed") {
        Some(&NOT_MQTT)
    } else if message.contains("processing error:") && !message.contains("Authentication failed") {
        Some(&BAD_CONNECT)
    } else {
        None
    }
}

/// The layer, with its own filter: it sees rmqtt's listener lines even when the printed
/// log level hides them.
pub fn layer<S>() -> impl Layer<S>
where
    S: Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    HandshakeFailureLayer.with_filter(Targets::new().with_target(LISTENER_TARGET, Level::INFO))
}

struct HandshakeFailureLayer;

impl<S: Subscriber> Layer<S> for HandshakeFailureLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut message = MessageText(String::new());
        event.record(&mut message);
        if let Some(counter) = classify(&message.0) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct MessageText(String);

impl Visit for MessageText {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            value.clone_into(&mut self.0);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_rmqtt_listener_lines() {
        let not_mqtt = |m: &str| classify(m).is_some_and(|c| std::ptr::eq(c, &NOT_MQTT));
        let bad_connect = |m: &str| classify(m).is_some_and(|c| std::ptr::eq(c, &BAD_CONNECT));
        assert!(not_mqtt(
            "MQTT version detection failed: Invalid protocol, from: 127.0.0.1:35024"
        ));
        assert!(bad_connect(
            "MQTTv3 processing error: Connect frame's reserved flag is set, from: 127.0.0.1:1"
        ));
        let timeout = |m: &str| classify(m).is_some_and(|c| std::ptr::eq(c, &TIMEOUT));
        assert!(timeout(
            "MQTTv5 processing error: handshake timeout, from: 127.0.0.1:1"
        ));
        assert!(timeout(
            "MQTT version detection failed: handshake timeout: no CONNECT within 10s, from: 127.0.0.1:1"
        ));
        assert!(timeout(
            "MQTTv3 processing error: Read timeout, from: 127.0.0.1:1"
        ));
        assert!(
            classify("MQTTv3 processing error: Authentication failed, from: 127.0.0.1:1").is_none()
        );
        assert!(classify("TCP connection from 127.0.0.1:1").is_none());
    }
}
