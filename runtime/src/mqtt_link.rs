//! Keeps rumqttc's MQTT 5 event loop sound across reconnects.
//!
//! rumqttc numbers QoS 1/2 packets from 1 up to the receive maximum the broker announced
//! in its CONNACK, and wraps only when it reaches that number exactly. Reconnect to a
//! broker that announces a smaller window (a restart with other settings, a fail-over to
//! another broker) while the last id is above it, and the ids never wrap again: they
//! climb past the client's own table, every publish ends the connection with
//! "unsolicited ack", and the client never recovers. Starting every connection with
//! fresh packet-id state avoids that.

use rumqttc::v5::{EventLoop, MqttState, Request};

/// Call after `EventLoop::poll` returned an error, before polling again.
///
/// By then rumqttc has moved everything unacknowledged to the event loop's pending queue
/// (re-sent, with its packet id, if the broker resumes the session), so the state holds
/// only the packet-id counter and, at most, one publish that waited for a free id; that
/// one is queued too.
pub fn fresh_state_after_error(eventloop: &mut EventLoop) {
    let window = eventloop
        .options
        .get_outgoing_inflight_upper_limit()
        .unwrap_or(u16::MAX);
    let manual_acks = eventloop.state.manual_acks;
    let mut old = std::mem::replace(&mut eventloop.state, MqttState::new(window, manual_acks));
    if let Some(publish) = old.collision.take() {
        eventloop.pending.push_back(Request::Publish(publish));
    }
}
