//! Malformed MQTT against the broker over raw TCP: garbage instead of a CONNECT, broken
//! length encodings, packets over the size limit, topic names that are not UTF-8,
//! invalid subscription filters and a flood of connects. The broker closes or refuses
//! each offender, counts it, stays up, and the well-behaved clients connected next to
//! them lose nothing.

use std::net::SocketAddr;
use std::time::Duration;

use fleet_broker::{BrokerConfig, RunningBroker};
use fleet_testkit::raw::{connect, packet, publish, remaining_length, string, subscribe};
use fleet_testkit::{WAIT, Watcher};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MAX_PACKET: u32 = 64 * 1024;

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

async fn open_broker() -> RunningBroker {
    fleet_broker::start(BrokerConfig {
        mqtt_addr: loopback(),
        http_addr: Some(loopback()),
        max_packet_size: MAX_PACKET,
        ..BrokerConfig::default()
    })
    .await
    .unwrap()
}

/// A raw client that has sent a valid CONNECT and read a successful CONNACK.
async fn connected(addr: SocketAddr, client_id: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(&connect(client_id, None)).await.unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(WAIT, stream.read_exact(&mut connack))
        .await
        .expect("CONNACK in time")
        .unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "{client_id}: CONNACK");
    stream
}

/// What the broker did with a connection after the offending bytes: everything it sent
/// until it closed the connection. Panics if it keeps the connection open.
async fn bytes_until_closed(stream: &mut TcpStream, what: &str) -> Vec<u8> {
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    let outcome = tokio::time::timeout(WAIT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        outcome.is_ok(),
        "{what}: the broker kept the connection open"
    );
    received
}

/// The well-behaved clients still talk: a publish from one reaches the other.
async fn still_serving(publisher: &Watcher, subscriber: &Watcher, tag: &str) {
    let topic = format!("fleet/canary/{tag}");
    publisher.publish(&topic, tag.as_bytes().to_vec()).await;
    subscriber
        .wait_for(&format!("canary after {tag}"), |m| m.topic == topic)
        .await;
}

// ---- tests -------------------------------------------------------------------------------

#[tokio::test]
async fn garbage_instead_of_a_connect_is_closed() {
    // The counter of connections closed before a CONNECT comes from rmqtt's log lines,
    // through the layer every fleet binary installs with its logging.
    let _telemetry = fleet_runtime::telemetry::init("malformed-mqtt-test");
    let broker = open_broker().await;
    let not_mqtt = r#"fleet_broker_handshake_failures_total{reason="not_mqtt"}"#;
    let bad_connect = r#"fleet_broker_handshake_failures_total{reason="bad_connect"}"#;
    let not_mqtt_before = fleet_testkit::metric(broker.http_addr().unwrap(), not_mqtt).await;
    let bad_connect_before = fleet_testkit::metric(broker.http_addr().unwrap(), bad_connect).await;
    let subscriber = Watcher::v311(broker.mqtt_addr(), "canary-sub", "fleet/#").await;
    let publisher = Watcher::v5(broker.mqtt_addr(), "canary-pub", "nothing/#").await;

    let mut bad_protocol_name = string(b"MQTX");
    bad_protocol_name.extend([4, 0x02, 0, 60]);
    bad_protocol_name.extend(string(b"x"));
    let mut bad_protocol_level = string(b"MQTT");
    bad_protocol_level.extend([9, 0x02, 0, 60]);
    bad_protocol_level.extend(string(b"x"));
    let mut reserved_flag = string(b"MQTT");
    reserved_flag.extend([4, 0x03, 0, 60]);
    reserved_flag.extend(string(b"x"));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "random bytes",
            vec![0xde, 0xad, 0xbe, 0xef, 0x00, 0xff, 0x13, 0x37],
        ),
        (
            "an HTTP request",
            b"GET / HTTP/1.1\r\nHost: broker\r\n\r\n".to_vec(),
        ),
        (
            "a PUBLISH before CONNECT",
            publish(b"fleet/linus/cmd/drive", b"forward"),
        ),
        (
            "a protocol name that is not MQTT",
            packet(0x10, &bad_protocol_name),
        ),
        ("protocol level 9", packet(0x10, &bad_protocol_level)),
        (
            "the reserved CONNECT flag set",
            packet(0x10, &reserved_flag),
        ),
        (
            "a five-byte remaining length",
            vec![0x10, 0xff, 0xff, 0xff, 0xff, 0x7f],
        ),
        ("a CONNECT over the size limit", {
            let mut head = vec![0x10];
            head.extend(remaining_length(MAX_PACKET as usize * 4));
            head.extend(vec![0u8; 4096]);
            head
        }),
    ];
    for (what, bytes) in cases {
        let mut stream = TcpStream::connect(broker.mqtt_addr()).await.unwrap();
        // The broker may close while we are still writing: that is a refusal too.
        let _ = stream.write_all(&bytes).await;
        let answer = bytes_until_closed(&mut stream, what).await;
        assert!(
            !answer.starts_with(&[0x20, 2, 0, 0]) && !answer.starts_with(&[0x20, 3, 0, 0]),
            "{what}: accepted with {answer:02x?}"
        );
        still_serving(&publisher, &subscriber, &what.replace(' ', "-")).await;
    }
    assert!(subscriber.errors().is_empty(), "{:?}", subscriber.errors());

    // Counted: each of these is a connection that never started a session. (The counts
    // are per process; other tests here may add to them, never take away.)
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let not_mqtt_seen =
            fleet_testkit::metric(broker.http_addr().unwrap(), not_mqtt).await - not_mqtt_before;
        let bad_connect_seen = fleet_testkit::metric(broker.http_addr().unwrap(), bad_connect)
            .await
            - bad_connect_before;
        if not_mqtt_seen >= 7.0 && bad_connect_seen >= 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "handshake failures counted: not_mqtt {not_mqtt_seen}, bad_connect {bad_connect_seen}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn broken_packets_after_connect_close_only_that_client() {
    let broker = open_broker().await;
    let subscriber = Watcher::v311(broker.mqtt_addr(), "canary-sub", "#").await;
    let publisher = Watcher::v5(broker.mqtt_addr(), "canary-pub", "nothing/#").await;

    let mut big = vec![0x30];
    big.extend(remaining_length(MAX_PACKET as usize + 1024));
    big.extend(string(b"fleet/linus/state"));
    big.extend(vec![b'x'; MAX_PACKET as usize + 1024 - 19]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a PUBLISH over the size limit", big),
        (
            "a topic name that is not UTF-8",
            publish(b"fleet/\xff\xfe/state", b"{}"),
        ),
        (
            "a topic name with an encoded NUL",
            publish(b"fleet/a\xc0\x80b/state", b"{}"),
        ),
        ("a second CONNECT", connect("again", None)),
        ("a reserved packet type", packet(0xf0, &[])),
        (
            "a topic length past the packet's end",
            packet(0x30, &[0x00, 0x40, b'f', b'l']),
        ),
    ];
    for (index, (what, bytes)) in cases.into_iter().enumerate() {
        let mut stream = connected(broker.mqtt_addr(), &format!("offender-{index}")).await;
        let _ = stream.write_all(&bytes).await;
        bytes_until_closed(&mut stream, what).await;
        still_serving(&publisher, &subscriber, &format!("case-{index}")).await;
    }
    // Nothing of what the offenders sent reached anyone.
    assert!(
        subscriber
            .messages()
            .iter()
            .all(|m| m.topic.starts_with("fleet/canary/")),
        "{:?}",
        subscriber.messages()
    );
    // Each offender was counted, as a protocol error.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let counted = fleet_testkit::metric(
            broker.http_addr().unwrap(),
            "fleet_broker_disconnects_total{reason=\"protocol_error\"}",
        )
        .await;
        if counted >= 6.0 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            let text = fleet_testkit::metrics_text(broker.http_addr().unwrap()).await;
            let disconnects: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("fleet_broker_disconnects"))
                .collect();
            panic!("offenders counted: {counted} of 6; {disconnects:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn invalid_subscription_filters_are_refused() {
    let broker = open_broker().await;
    let subscriber = Watcher::v311(broker.mqtt_addr(), "canary-sub", "fleet/#").await;
    let publisher = Watcher::v5(broker.mqtt_addr(), "canary-pub", "nothing/#").await;

    for (index, filter) in [
        &b"fleet/#/state"[..],
        b"fleet/linus+/state",
        b"fleet/#x",
        b"",
        b"fleet/\xff/state",
    ]
    .into_iter()
    .enumerate()
    {
        let what = format!("filter {:?}", String::from_utf8_lossy(filter));
        let mut stream = connected(broker.mqtt_addr(), &format!("filters-{index}")).await;
        stream.write_all(&subscribe(7, filter)).await.unwrap();
        // Either a SUBACK that refuses the filter (0x80) or a closed connection; never a
        // granted subscription.
        let mut suback = [0u8; 5];
        match tokio::time::timeout(WAIT, stream.read_exact(&mut suback)).await {
            Ok(Ok(_)) => assert_eq!(suback, [0x90, 3, 0, 7, 0x80], "{what}"),
            Ok(Err(_)) => {}
            Err(_) => panic!("{what}: no SUBACK and the connection stayed open"),
        }
        still_serving(&publisher, &subscriber, &format!("filter-{index}")).await;
    }
}

#[tokio::test]
async fn a_flood_of_connects_leaves_the_others_alone() {
    let broker = fleet_testkit::start_secured_broker(
        &[("linus", "robot"), ("gateway", "controller")],
        BrokerConfig {
            max_packet_size: MAX_PACKET,
            ..BrokerConfig::default()
        },
    )
    .await;
    let addr = broker.mqtt_addr();

    // A robot and a controller log in properly and keep a command stream going.
    let mut robot = TcpStream::connect(addr).await.unwrap();
    robot
        .write_all(&connect("robot-linus", Some(("linus", "linus-pw"))))
        .await
        .unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(WAIT, robot.read_exact(&mut connack))
        .await
        .expect("robot CONNACK in time")
        .unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);
    robot
        .write_all(&subscribe(1, b"fleet/linus/cmd/+"))
        .await
        .unwrap();
    let mut suback = [0u8; 5];
    robot.read_exact(&mut suback).await.unwrap();
    assert_eq!(suback, [0x90, 3, 0, 1, 0]);
    let mut controller = TcpStream::connect(addr).await.unwrap();
    controller
        .write_all(&connect("controller", Some(("gateway", "gateway-pw"))))
        .await
        .unwrap();
    tokio::time::timeout(WAIT, controller.read_exact(&mut connack))
        .await
        .expect("controller CONNACK in time")
        .unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);

    // The flood: anonymous connects, wrong passwords for real users (each one an argon2
    // check), and connections that open and send nothing, all at once.
    const ANONYMOUS: usize = 200;
    const WRONG_PASSWORDS: usize = 12;
    const SILENT: usize = 200;
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..ANONYMOUS + WRONG_PASSWORDS {
        flood.spawn(async move {
            let login = (i >= ANONYMOUS).then_some(("linus", "not-the-password"));
            let mut stream = TcpStream::connect(addr).await.ok()?;
            stream
                .write_all(&connect(&format!("flood-{i}"), login))
                .await
                .ok()?;
            let mut answer = [0u8; 4];
            tokio::time::timeout(Duration::from_secs(30), stream.read_exact(&mut answer))
                .await
                .ok()?
                .ok()?;
            Some(answer)
        });
    }
    let mut silent = Vec::new();
    for _ in 0..SILENT {
        if let Ok(stream) = TcpStream::connect(addr).await {
            silent.push(stream);
        }
    }

    // Meanwhile the commands keep flowing, in order, none lost.
    const COMMANDS: usize = 50;
    for n in 0..COMMANDS {
        controller
            .write_all(&publish(b"fleet/linus/cmd/ping", format!("{n}").as_bytes()))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let topic_len = "fleet/linus/cmd/ping".len();
    let mut received = Vec::new();
    for n in 0..COMMANDS {
        let digits = n.to_string().len();
        let mut frame = vec![0u8; 2 + 2 + topic_len + digits];
        tokio::time::timeout(WAIT, robot.read_exact(&mut frame))
            .await
            .unwrap_or_else(|_| panic!("command {n} did not arrive during the flood"))
            .unwrap();
        received.push(String::from_utf8_lossy(&frame[4 + topic_len..]).to_string());
    }
    let expected: Vec<String> = (0..COMMANDS).map(|n| n.to_string()).collect();
    assert_eq!(received, expected);

    let mut refused = 0;
    while let Some(answer) = flood.join_next().await {
        if let Ok(Some(answer)) = answer {
            assert_eq!(&answer[..3], &[0x20, 2, 0], "a flood connect got in");
            assert_ne!(answer[3], 0, "a flood connect got in");
            refused += 1;
        }
    }
    assert_eq!(
        refused,
        ANONYMOUS + WRONG_PASSWORDS,
        "every flood connect answered"
    );
    drop(silent);

    assert_eq!(
        fleet_testkit::metric(
            broker.http_addr().unwrap(),
            "fleet_broker_auth_failures_total{reason=\"anonymous\"}"
        )
        .await,
        ANONYMOUS as f64
    );
    // All from one address: a few are checked, the rest refused unchecked (two checks in
    // flight per address, then the address backs off).
    let mut refusals = 0.0;
    for reason in ["bad_credentials", "throttled", "busy"] {
        refusals += fleet_testkit::metric(
            broker.http_addr().unwrap(),
            &format!("fleet_broker_auth_failures_total{{reason=\"{reason}\"}}"),
        )
        .await;
    }
    assert_eq!(refusals, WRONG_PASSWORDS as f64);
    assert!(
        fleet_testkit::metric(
            broker.http_addr().unwrap(),
            "fleet_broker_auth_failures_total{reason=\"throttled\"}"
        )
        .await
            > 0.0
    );
}

#[tokio::test]
async fn a_mosquitto_private_bridge_connect_is_told_to_retry_as_a_plain_client() {
    // Mosquitto's bridge (3.1.1 with `try_private true`, its default) sets the top bit of
    // the protocol level. The broker answers "unacceptable protocol version" (CONNACK 1,
    // as MQTT-3.1.2-2 wants for any level it does not speak) and closes, which makes
    // Mosquitto retry without the bit; before, the connection was closed without an
    // answer and the bridge retried the same CONNECT forever.
    let broker = open_broker().await;
    let cases = [
        (&b"MQTT"[..], 0x84u8),
        (b"MQIsdp", 0x83),
        (b"MQTT", 9),
        (b"MQTT", 0),
    ];
    for (name, level) in cases {
        let mut body = string(name);
        body.extend([level, 0x02, 0, 60]);
        body.extend(string(b"bridge-test"));
        let mut stream = TcpStream::connect(broker.mqtt_addr()).await.unwrap();
        stream.write_all(&packet(0x10, &body)).await.unwrap();
        let answer = bytes_until_closed(&mut stream, "a private bridge CONNECT").await;
        assert_eq!(
            answer,
            [0x20, 2, 0, 1],
            "level {level:#x}: CONNACK 1, then closed"
        );
    }
    // The same bridge retrying as a plain 3.1.1 client gets in.
    connected(broker.mqtt_addr(), "bridge-test").await;
}
