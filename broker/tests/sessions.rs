//! MQTT 5 session behaviour that the Eclipse Paho interoperability suites check and that
//! rmqtt got wrong (fixed in patches/rmqtt, see patches/README.md): reconnecting at once
//! with the same client id, the server's DISCONNECT with a reason code, a session that
//! ends with its connection, messages larger than a subscriber accepts, and the order of
//! a subscription and a publish on two connections in the standalone broker, keep-alive,
//! topic aliases, a slow subscriber holding its publishers back instead of losing
//! their messages, deliveries and PUBACKs ready at once written together, and what an
//! idle connection costs. Raw packets over real TCP.

use std::net::SocketAddr;
use std::time::Duration;

use fleet_testkit::raw::{
    Connect, connect_with, disconnect_v5, find_u16, packet, parse_properties, parse_publish_v5,
    property_u16, property_u32, publish_v5, publish_v5_id, read_packet, string, subscribe_v5,
};
use fleet_testkit::{WAIT, free_port, metric, process_rss_mib};
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

/// `threads` MQTT threads: several make the races between connections likelier, which
/// these tests must survive.
async fn binary(threads: usize) -> Broker {
    binary_with(threads, &[]).await
}

async fn binary_with(threads: usize, args: &[&str]) -> Broker {
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
        .args(args)
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

/// The write syscalls `pid` has made so far (`/proc/<pid>/io`).
fn write_syscalls(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("syscw: "))
        .and_then(|count| count.trim().parse().ok())
        .unwrap()
}

/// Messages forwarded to a subscriber at once are written to it together, in order: a
/// write costs more than the rest of a delivery. (Without the patch: one write each, 200
/// or more here.)
#[tokio::test]
async fn messages_ready_at_once_leave_in_few_writes() {
    const MESSAGES: usize = 200;
    let broker = binary(1).await;
    let (mut subscriber, _) = connect_with(broker.mqtt, &v5("burst-reader")).await;
    subscriber
        .write_all(&subscribe_v5(1, b"fleet/burst/#", 0))
        .await
        .unwrap();
    next_of(&mut subscriber, 0x90).await.expect("SUBACK");
    let (mut publisher, _) = connect_with(broker.mqtt, &v5("burst-writer")).await;
    let burst: Vec<u8> = (0..MESSAGES)
        .flat_map(|n| publish_v5(b"fleet/burst/n", n.to_string().as_bytes(), 0, &[]))
        .collect();
    let before = write_syscalls(broker.child.id());
    publisher.write_all(&burst).await.unwrap();
    for n in 0..MESSAGES {
        let (first, body) = read_packet(&mut subscriber, WAIT)
            .await
            .expect("a delivery");
        let delivered = parse_publish_v5(first, &body).expect("a PUBLISH");
        assert_eq!(delivered.payload, n.to_string().as_bytes(), "in order");
    }
    let writes = write_syscalls(broker.child.id()) - before;
    assert!(
        writes < (MESSAGES / 4) as u64,
        "{MESSAGES} messages took {writes} writes"
    );
}

/// A client's pipelined QoS 1 publishes are acknowledged together, in order. (Without the
/// patch: one write per PUBACK.)
#[tokio::test]
async fn pipelined_publishes_are_acknowledged_in_few_writes() {
    const MESSAGES: u16 = 100;
    let broker = binary(1).await;
    let (mut publisher, _) = connect_with(broker.mqtt, &v5("pipelining-writer")).await;
    let burst: Vec<u8> = (1..=MESSAGES)
        .flat_map(|id| qos1_publish(b"fleet/pipelined/n", id, b"x"))
        .collect();
    let before = write_syscalls(broker.child.id());
    publisher.write_all(&burst).await.unwrap();
    for id in 1..=MESSAGES {
        let puback = next_of(&mut publisher, 0x40).await.expect("a PUBACK");
        assert_eq!(puback[..2], id.to_be_bytes(), "in order");
    }
    let writes = write_syscalls(broker.child.id()) - before;
    assert!(
        writes < u64::from(MESSAGES / 4),
        "{MESSAGES} PUBACKs took {writes} writes"
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

/// CONNACK's properties for `connect` (MQTT 5), with its reason code.
async fn connack_properties(addr: SocketAddr, connect: &Connect<'_>) -> (u8, Vec<(u8, Vec<u8>)>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(&connect.encode()).await.unwrap();
    let connack = next_of(&mut stream, 0x20).await.expect("CONNACK");
    let (properties, _) = parse_properties(&connack[2..]).expect("CONNACK properties parse");
    (connack[1], properties)
}

#[tokio::test]
async fn mqtt5_clients_are_held_to_the_longest_keepalive_and_311_clients_keep_theirs() {
    let broker = binary(1).await;
    for (asked, told) in [(30, 30), (60, 60), (120, 60), (0, 60)] {
        let connect = Connect {
            keep_alive: Some(asked),
            ..v5("keepalive")
        };
        let (code, properties) = connack_properties(broker.mqtt, &connect).await;
        assert_eq!(code, 0);
        assert_eq!(
            find_u16(&properties, 0x13),
            Some(told),
            "asked for {asked} s"
        );
    }
    // 3.1.1 has no Server Keep Alive: refusing the client would be the only way to cap it.
    let old = Connect {
        client_id: "keepalive-311",
        keep_alive: Some(600),
        ..Connect::default()
    };
    assert_eq!(connect_with(broker.mqtt, &old).await.1, 0);
}

#[tokio::test]
async fn a_topic_alias_above_the_announced_maximum_is_a_protocol_error() {
    let broker = binary(1).await;
    let (code, properties) = connack_properties(broker.mqtt, &v5("aliases")).await;
    assert_eq!(code, 0);
    assert_eq!(find_u16(&properties, 0x22), Some(10), "Topic Alias Maximum");

    let (mut subscriber, _) = connect_with(broker.mqtt, &v5("alias-reader")).await;
    subscriber
        .write_all(&subscribe_v5(1, b"fleet/alias/#", 0))
        .await
        .unwrap();
    next_of(&mut subscriber, 0x90).await.expect("SUBACK");
    let (mut publisher, _) = connect_with(broker.mqtt, &v5("alias-writer")).await;
    // Alias 10 is set up with its topic, then used alone.
    for topic in [&b"fleet/alias/ten"[..], b""] {
        publisher
            .write_all(&publish_v5(topic, b"10", 0, &property_u16(0x23, 10)))
            .await
            .unwrap();
        let delivered = next_of(&mut subscriber, 0x30).await.expect("delivered");
        assert!(delivered.starts_with(&string(b"fleet/alias/ten")));
    }
    // Alias 11 is above the maximum, even with only one alias in use: DISCONNECT 0x94.
    publisher
        .write_all(&publish_v5(
            b"fleet/alias/eleven",
            b"11",
            0,
            &property_u16(0x23, 11),
        ))
        .await
        .unwrap();
    let disconnect = next_of(&mut publisher, 0xe0).await.expect("a DISCONNECT");
    assert_eq!(disconnect[0], 0x94, "Topic Alias invalid");
    assert!(
        read_packet(&mut subscriber, Duration::from_millis(300))
            .await
            .is_none(),
        "nothing delivered for the invalid alias"
    );
}

#[tokio::test]
async fn a_subscriber_that_accepts_topic_aliases_gets_them() {
    let broker = binary(1).await;
    let accepting = Connect {
        properties: property_u16(0x22, 2),
        ..v5("alias-taker")
    };
    let (mut subscriber, _) = connect_with(broker.mqtt, &accepting).await;
    subscriber
        .write_all(&subscribe_v5(1, b"fleet/aliased", 0))
        .await
        .unwrap();
    next_of(&mut subscriber, 0x90).await.expect("SUBACK");
    let (mut publisher, _) = connect_with(broker.mqtt, &v5("alias-giver")).await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        publisher
            .write_all(&publish_v5(b"fleet/aliased", b"x", 0, &[]))
            .await
            .unwrap();
        let body = next_of(&mut subscriber, 0x30).await.expect("delivered");
        let delivered = parse_publish_v5(0x30, &body).expect("a PUBLISH");
        assert_eq!(delivered.payload, b"x");
        seen.push((delivered.topic.len(), find_u16(&delivered.properties, 0x23)));
    }
    // The first carries the topic and sets the alias; the second has the alias alone.
    assert_eq!(seen, [(13, Some(1)), (0, Some(1))]);
}

/// A client that keeps sending after breaking the protocol still reads why it was
/// disconnected: closing with its packets unread would reset the connection and throw
/// away the DISCONNECT before the client reads it.
#[tokio::test]
async fn a_client_past_receive_maximum_reads_the_disconnect() {
    let broker = binary(1).await;
    let (mut stream, _) = connect_with(broker.mqtt, &v5("flooder")).await;
    // One more unreleased QoS 2 publish than the broker's Receive Maximum (1024), each
    // with its own packet id, sent without reading a single PUBREC.
    let mut burst = Vec::new();
    for packet_id in 1..=1025u16 {
        burst.extend(publish_v5_id(b"fleet/flood", b"payload", 2, packet_id, &[]));
    }
    stream.write_all(&burst).await.unwrap();
    // The broker has answered and disconnected by now; the client, slower, keeps going as
    // the Paho client does: a PUBREL for each PUBREC it reads.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut reason = None;
    while let Some((first, body)) = read_packet(&mut stream, WAIT).await {
        match first & 0xf0 {
            0x50 => {
                let release = packet(0x62, &[body[0], body[1]]);
                if stream.write_all(&release).await.is_err() {
                    break;
                }
            }
            0xe0 => {
                reason = body.first().copied();
                break;
            }
            _ => {}
        }
    }
    assert_eq!(reason, Some(0x93), "DISCONNECT: Receive Maximum exceeded");
}

/// A PUBLISH at QoS 1 with its own packet id (MQTT 5, no properties).
fn qos1_publish(topic: &[u8], packet_id: u16, payload: &[u8]) -> Vec<u8> {
    publish_v5_id(topic, payload, 1, packet_id, &[])
}

/// A subscriber that stops reading holds back the client publishing QoS 1 to it, instead
/// of the broker acknowledging everything and dropping what does not fit in its queue;
/// once it reads again, every message arrives. (Without the patch: 2,000 acknowledged at
/// once and all but about 200 of them dropped.)
#[tokio::test]
async fn a_slow_subscriber_holds_its_publisher_back_and_loses_nothing() {
    const MESSAGES: u16 = 2_000;
    let broker = binary_with(1, &["--max-queue-len", "100"]).await;
    let slow = Connect {
        properties: property_u16(0x21, 10), // Receive Maximum: 10 unacknowledged
        ..v5("slow-reader")
    };
    let (mut subscriber, _) = connect_with(broker.mqtt, &slow).await;
    subscriber
        .write_all(&subscribe_v5(1, b"fleet/slow/state", 1))
        .await
        .unwrap();
    next_of(&mut subscriber, 0x90).await.expect("SUBACK");

    let (publisher, _) = connect_with(broker.mqtt, &v5("fast-writer")).await;
    let (mut from_broker, mut to_broker) = publisher.into_split();
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = acked.clone();
    tokio::spawn(async move {
        // PUBACKs: first byte 0x40, then the length, the packet id and maybe a reason.
        let mut buf = [0u8; 4096];
        let mut seen = Vec::new();
        while let Ok(n) = tokio::io::AsyncReadExt::read(&mut from_broker, &mut buf).await {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            while seen.len() >= 2 && seen.len() >= 2 + usize::from(seen[1]) {
                let len = 2 + usize::from(seen[1]);
                if seen[0] == 0x40 {
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                seen.drain(..len);
            }
        }
    });
    tokio::spawn(async move {
        for packet_id in 1..=MESSAGES {
            let payload = packet_id.to_string();
            let publish = qos1_publish(b"fleet/slow/state", packet_id, payload.as_bytes());
            if to_broker.write_all(&publish).await.is_err() {
                break;
            }
        }
        // Kept open until the test ends.
        std::future::pending::<()>().await;
    });

    tokio::time::sleep(Duration::from_millis(700)).await;
    let acked_while_stalled = acked.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        acked_while_stalled < 300,
        "{acked_while_stalled} publishes acknowledged while the subscriber was not reading"
    );

    // The subscriber reads again, acknowledging each message.
    let mut received = Vec::new();
    while received.len() < usize::from(MESSAGES) {
        let Some((first, body)) = read_packet(&mut subscriber, WAIT).await else {
            break;
        };
        if first & 0xf0 != 0x30 {
            continue;
        }
        let delivered = parse_publish_v5(first, &body).expect("a PUBLISH");
        let packet_id = delivered.packet_id.expect("QoS 1").to_be_bytes();
        received.push(
            String::from_utf8_lossy(delivered.payload)
                .parse::<u16>()
                .unwrap(),
        );
        subscriber
            .write_all(&packet(0x40, &packet_id))
            .await
            .unwrap();
    }
    let expected: Vec<u16> = (1..=MESSAGES).collect();
    assert_eq!(received.len(), expected.len(), "every message arrives");
    assert_eq!(received, expected, "in order");
    assert_eq!(
        metric(
            broker.http,
            "fleet_broker_messages_dropped_total{reason=\"queue_full\"}"
        )
        .await,
        0.0
    );
}

/// While a robot is held back for publishing its state to a subscriber that does not read,
/// its own session still delivers to it: an e-stop arrives at once.
#[tokio::test]
async fn a_held_back_robot_still_gets_its_estop() {
    let broker = binary_with(1, &["--max-queue-len", "50"]).await;
    let stalled_reader = Connect {
        properties: property_u16(0x21, 10),
        ..v5("stalled-reader")
    };
    let (mut stalled, _) = connect_with(broker.mqtt, &stalled_reader).await;
    stalled
        .write_all(&subscribe_v5(1, b"fleet/+/state", 1))
        .await
        .unwrap();
    next_of(&mut stalled, 0x90).await.expect("SUBACK");

    let (mut robot, _) = connect_with(broker.mqtt, &v5("robot-held")).await;
    robot
        .write_all(&subscribe_v5(1, b"fleet/held/cmd/#", 1))
        .await
        .unwrap();
    next_of(&mut robot, 0x90).await.expect("SUBACK");
    let mut states = Vec::new();
    for packet_id in 1..=500u16 {
        states.extend(qos1_publish(b"fleet/held/state", packet_id, b"{}"));
    }
    robot.write_all(&states).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (mut controller, _) = connect_with(broker.mqtt, &v5("controller-estop")).await;
    controller
        .write_all(&qos1_publish(b"fleet/held/cmd/stop", 1, b"stop"))
        .await
        .unwrap();
    let sent = tokio::time::Instant::now();
    let mut acked = 0;
    let estop = loop {
        let (first, body) = read_packet(&mut robot, WAIT).await.expect("the e-stop");
        match first & 0xf0 {
            0x40 => acked += 1,
            0x30 => break body,
            _ => {}
        }
    };
    assert!(estop.starts_with(&string(b"fleet/held/cmd/stop")));
    assert!(
        sent.elapsed() < Duration::from_millis(500),
        "e-stop after {:?}",
        sent.elapsed()
    );
    assert!(
        acked < 500,
        "the robot was being held back ({acked} acknowledged)"
    );
}

#[tokio::test]
async fn robots_connecting_all_at_once_cost_little_memory() {
    // A fleet reconnecting together after a broker restart: 1,000 CONNECTs at once, each
    // followed by its subscription. What the handshakes use in between is freed once they
    // are done, but freed inside the heap among the sessions they made: rmqtt queued each
    // handshake with its whole future held twice inline (this debug binary, with mimalloc:
    // 13.0 KiB per connection without the boxed handshake, 9.0 with it; 11.5 and 7.8 with
    // glibc's allocator, whose heap takes less room per allocation).
    const CONNECTIONS: usize = 1000;
    let broker = binary_with(1, &["--max-pending-per-address", "2000"]).await;
    let pid = broker.child.id();
    let (_first, _) = connect_with(broker.mqtt, &v5("robot-warmup")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = process_rss_mib(pid);
    let mut robots = tokio::task::JoinSet::new();
    for n in 0..CONNECTIONS {
        let addr = broker.mqtt;
        robots.spawn(async move {
            let client_id = format!("robot-{n}");
            let (mut stream, code) = connect_with(addr, &v5(&client_id)).await;
            assert_eq!(code, 0);
            let filter = format!("fleet/{client_id}/cmd/#");
            stream
                .write_all(&subscribe_v5(1, filter.as_bytes(), 1))
                .await
                .unwrap();
            next_of(&mut stream, 0x90).await.expect("a SUBACK");
            stream
        });
    }
    let connections = robots.join_all().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let per_connection = (process_rss_mib(pid) - before) * 1024.0 / connections.len() as f64;
    println!("broker memory per connection, all at once: {per_connection:.1} KiB");
    assert!(
        per_connection < 9.8,
        "{per_connection:.1} KiB per connection"
    );
}

#[tokio::test]
async fn an_idle_connection_costs_little_memory() {
    // What one idle robot's connection costs the broker: a CONNECT, its subscription,
    // and then nothing. rmqtt gave each connection 8 KiB read and write buffers, a task
    // with room for every state of a connection and for copies of its stream it no longer
    // used, and topic-tree nodes with room for four children each (this debug binary:
    // 19.7 KiB per connection before the patches, 9.9 with the buffers and the first
    // boxing, 7.2 with the task layout and `branches`; the release numbers against
    // Mosquitto are in docs/benchmarks.md; without `branches` alone 8.0). The bound leaves
    // room for allocator noise.
    const CONNECTIONS: usize = 1000;
    let broker = binary_with(1, &["--max-pending-per-address", "2000"]).await;
    let pid = broker.child.id();
    // A connection first, so that what the first one allocates once is not counted.
    let (_first, _) = connect_with(broker.mqtt, &v5("robot-warmup")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = process_rss_mib(pid);
    let mut connections = Vec::with_capacity(CONNECTIONS);
    for n in 0..CONNECTIONS {
        let client_id = format!("robot-{n}");
        let (mut stream, code) = connect_with(broker.mqtt, &v5(&client_id)).await;
        assert_eq!(code, 0);
        let filter = format!("fleet/{client_id}/cmd/#");
        stream
            .write_all(&subscribe_v5(1, filter.as_bytes(), 1))
            .await
            .unwrap();
        next_of(&mut stream, 0x90).await.expect("a SUBACK");
        connections.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let per_connection = (process_rss_mib(pid) - before) * 1024.0 / CONNECTIONS as f64;
    println!("broker memory per idle connection: {per_connection:.1} KiB");
    assert!(
        per_connection < 7.8,
        "{per_connection:.1} KiB per connection"
    );
}
