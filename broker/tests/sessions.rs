//! MQTT 5 session behaviour that the Eclipse Paho interoperability suites check and that
//! rmqtt got wrong (fixed in patches/rmqtt, see patches/README.md): reconnecting at once
//! with the same client id, the server's DISCONNECT with a reason code, a session that
//! ends with its connection, messages larger than a subscriber accepts, and the order of
//! a subscription and a publish on two connections in the standalone broker. Raw packets
//! over real TCP.

use std::net::SocketAddr;
use std::time::Duration;

use fleet_testkit::raw::{
    Connect, connect_with, disconnect_v5, property_u16, property_u32, publish_v5, read_packet,
    subscribe_v5,
};
use fleet_testkit::{WAIT, metric};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The `fleet-broker` binary on free loopback ports, anonymous clients allowed. Killed
/// when dropped.
struct Broker {
    child: std::process::Child,
    mqtt: SocketAddr,
    http: SocketAddr,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// `threads` MQTT threads: several make the races between connections likelier, which
/// these tests must survive.
async fn binary(threads: usize) -> Broker {
    let (mqtt, http) = (
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        SocketAddr::from(([127, 0, 0, 1], free_port())),
    );
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_fleet-broker"))
        .args(["--allow-anonymous", "--ws-addr", "off", "--worker-threads"])
        .arg(threads.to_string())
        .arg("--mqtt-addr")
        .arg(mqtt.to_string())
        .arg("--metrics-addr")
        .arg(http.to_string())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let broker = Broker { child, mqtt, http };
    let deadline = tokio::time::Instant::now() + WAIT;
    while TcpStream::connect(mqtt).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "the broker starts");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    broker
}

fn v5(client_id: &str) -> Connect<'_> {
    Connect {
        v5: true,
        client_id,
        ..Connect::default()
    }
}

/// The next packet of type `first_byte & 0xf0` on `stream`, skipping others.
async fn next_of(stream: &mut TcpStream, kind: u8) -> Option<Vec<u8>> {
    loop {
        let (first, body) = read_packet(stream, WAIT).await?;
        if first & 0xf0 == kind {
            return Some(body);
        }
    }
}

#[tokio::test]
async fn a_client_that_reconnects_at_once_gets_in() {
    let broker = binary(2).await;
    for n in 0..200 {
        let (mut stream, code) = connect_with(broker.mqtt, &v5("again")).await;
        assert_eq!(code, 0, "reconnect {n}: CONNACK {code:#x}");
        stream.write_all(&disconnect_v5(&[])).await.unwrap();
    }
}

#[tokio::test]
async fn two_connects_with_one_client_id_at_once_both_get_in() {
    let broker = binary(2).await;
    let addr = broker.mqtt;
    let connect = v5("twice");
    for n in 0..20 {
        let (first, second) =
            tokio::join!(connect_with(addr, &connect), connect_with(addr, &connect));
        assert_eq!((first.1, second.1), (0, 0), "round {n}");
    }
}

#[tokio::test]
async fn the_server_says_why_it_disconnects() {
    let broker = binary(2).await;
    let addr = broker.mqtt;
    // A topic alias of 0 is a protocol error.
    let (mut stream, _) = connect_with(addr, &v5("alias")).await;
    stream
        .write_all(&publish_v5(b"fleet/x", b"x", 1, &property_u16(0x23, 0)))
        .await
        .unwrap();
    let disconnect = next_of(&mut stream, 0xe0).await.expect("a DISCONNECT");
    assert!(disconnect[0] >= 0x80, "reason {:#x}", disconnect[0]);

    // Another connection takes the session over: 0x8E.
    let (mut old, _) = connect_with(addr, &v5("taken")).await;
    let (_new, code) = connect_with(addr, &v5("taken")).await;
    assert_eq!(code, 0);
    let disconnect = next_of(&mut old, 0xe0).await.expect("a DISCONNECT");
    assert_eq!(disconnect[0], 0x8e, "session taken over");
}

#[tokio::test]
async fn a_session_that_expires_at_disconnect_is_gone_at_once() {
    let broker = binary(2).await;
    let addr = broker.mqtt;
    for n in 0..20 {
        let long = Connect {
            properties: property_u32(0x11, 60),
            ..v5("expiring")
        };
        let (mut stream, _) = connect_with(addr, &long).await;
        stream
            .write_all(&subscribe_v5(1, b"fleet/expiring", 1))
            .await
            .unwrap();
        next_of(&mut stream, 0x90).await.expect("SUBACK");
        // The DISCONNECT ends the session now (expiry 0), and the client is back at once.
        stream
            .write_all(&disconnect_v5(&property_u32(0x11, 0)))
            .await
            .unwrap();
        drop(stream);
        let again = Connect {
            keep_session: true,
            ..long.clone()
        };
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(&again.encode()).await.unwrap();
        let connack = next_of(&mut stream, 0x20).await.expect("CONNACK");
        assert_eq!(connack[..2], [0, 0], "round {n}: no session present");
    }
}

#[tokio::test]
async fn a_message_larger_than_a_subscriber_accepts_is_dropped_for_it() {
    let broker = binary(2).await;
    let addr = broker.mqtt;
    let small = Connect {
        properties: property_u32(0x27, 200),
        ..v5("small")
    };
    let (mut subscriber, _) = connect_with(addr, &small).await;
    subscriber
        .write_all(&subscribe_v5(1, b"fleet/size/#", 0))
        .await
        .unwrap();
    next_of(&mut subscriber, 0x90).await.expect("SUBACK");
    let (mut publisher, _) = connect_with(addr, &v5("big")).await;
    publisher
        .write_all(&publish_v5(b"fleet/size/big", &[b'x'; 500], 0, &[]))
        .await
        .unwrap();
    publisher
        .write_all(&publish_v5(b"fleet/size/small", b"ok", 0, &[]))
        .await
        .unwrap();
    let delivered = next_of(&mut subscriber, 0x30).await.expect("the small one");
    assert!(
        delivered.ends_with(b"ok"),
        "the subscriber is still there and got the small message"
    );
    assert_eq!(
        metric(
            broker.http,
            "fleet_broker_messages_dropped_total{reason=\"too_large\"}"
        )
        .await,
        1.0
    );
}

/// The standalone broker serves MQTT on one thread by default, like Mosquitto: what one
/// connection sent before another connection's publish is handled first. With several
/// threads, a publish sent just after a SUBSCRIBE on another connection often reached
/// the router first and was not delivered (the Paho suites' request/response and noLocal
/// tests fail that way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standalone_broker_handles_connections_in_arrival_order() {
    let broker = binary(1).await;
    let addr = broker.mqtt;
    let (mut publisher, _) = connect_with(addr, &v5("publisher")).await;
    let mut missed = 0;
    for n in 0..50 {
        let id = format!("subscriber-{n}");
        let (mut subscriber, _) = connect_with(addr, &v5(&id)).await;
        let topic = format!("order/{n}");
        // No wait for the SUBACK: the publish leaves right behind the SUBSCRIBE.
        subscriber
            .write_all(&subscribe_v5(1, topic.as_bytes(), 0))
            .await
            .unwrap();
        publisher
            .write_all(&publish_v5(topic.as_bytes(), b"after", 0, &[]))
            .await
            .unwrap();
        let delivered = loop {
            match read_packet(&mut subscriber, Duration::from_secs(1)).await {
                Some((first, _)) if first & 0xf0 == 0x30 => break true,
                Some(_) => {}
                None => break false,
            }
        };
        missed += usize::from(!delivered);
    }
    assert_eq!(
        missed, 0,
        "{missed} of 50 publishes were routed before the subscription"
    );
}
