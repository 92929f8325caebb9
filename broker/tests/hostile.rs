//! A hostile client that has a login (or none) against the production layout: a users
//! file with robots, a controller, a reader and an admin. Each test is one attack that
//! used to work; over real TCP with raw packets, because a hostile client sends what no
//! client library would.

use std::net::SocketAddr;
use std::time::Duration;

use fleet_broker::{BrokerConfig, RunningBroker};
use fleet_testkit::raw::{Connect, Will, closed_within, connect_with, publish_qos1, read_packet};
use fleet_testkit::{WAIT, metric};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const USERS: [(&str, &str); 5] = [
    ("linus", "robot"),
    ("torvalds", "robot"),
    ("gateway", "controller"),
    ("grafana", "reader"),
    ("root", "admin"),
];

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

async fn secured(config: BrokerConfig) -> RunningBroker {
    fleet_testkit::start_secured_broker(&USERS, config).await
}

fn login(user: &'static str) -> Option<(&'static str, &'static str)> {
    let password = USERS
        .iter()
        .find(|(name, _)| *name == user)
        .map(|(name, _)| -> &'static str { Box::leak(format!("{name}-pw").into_boxed_str()) })
        .unwrap();
    Some((user, password))
}

fn as_user<'a>(v5: bool, user: &'static str, client_id: &'a str) -> Connect<'a> {
    Connect {
        v5,
        client_id,
        login: login(user),
        ..Connect::default()
    }
}

/// A logged-in raw client subscribed to `filter` (QoS 0, MQTT 3.1.1).
async fn watcher(addr: SocketAddr, filter: &str) -> TcpStream {
    let (mut stream, code) = connect_with(addr, &as_user(false, "root", "watcher")).await;
    assert_eq!(code, 0, "the admin watcher logs in");
    stream
        .write_all(&fleet_testkit::raw::subscribe(1, filter.as_bytes()))
        .await
        .unwrap();
    let (first, _) = read_packet(&mut stream, WAIT).await.expect("SUBACK");
    assert_eq!(first, 0x90);
    stream
}

/// Topics of the PUBLISH packets `stream` receives within `within`.
async fn topics_received(stream: &mut TcpStream, within: Duration) -> Vec<String> {
    let mut topics = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while let Some((first, body)) =
        read_packet(stream, deadline - tokio::time::Instant::now()).await
    {
        if first & 0xf0 == 0x30 && body.len() >= 2 {
            let len = usize::from(u16::from_be_bytes([body[0], body[1]]));
            topics.push(String::from_utf8_lossy(&body[2..2 + len]).into_owned());
        }
    }
    topics
}

/// The PUBACK reason code (MQTT 5) for a QoS 1 publish on `stream`.
async fn puback_code(stream: &mut TcpStream) -> u8 {
    loop {
        let (first, body) = read_packet(stream, WAIT).await.expect("a PUBACK");
        if first == 0x40 {
            return body.get(2).copied().unwrap_or(0);
        }
    }
}

#[tokio::test]
async fn a_will_is_checked_like_a_publish() {
    let broker = secured(BrokerConfig::default()).await;
    let addr = broker.mqtt_addr();
    let http = broker.http_addr().unwrap();
    let mut watch = watcher(addr, "fleet/#").await;

    let drive = |retain| Will {
        topic: "fleet/linus/cmd/drive",
        payload: b"forward",
        retain,
    };
    let deep = "a/".repeat(100) + "b";
    let hostile = [
        // A read-only user makes linus drive when it drops its connection.
        (
            "reader, will on a command",
            false,
            "grafana",
            "r1",
            drive(false),
            0x05,
        ),
        (
            "reader, will on a command (5)",
            true,
            "grafana",
            "r2",
            drive(false),
            0x87,
        ),
        // A retained will would re-fire on every reconnect.
        (
            "controller, retained will on a command",
            true,
            "gateway",
            "g1",
            drive(true),
            0x87,
        ),
        (
            "robot, will faking another robot's status",
            true,
            "torvalds",
            "robot-torvalds",
            Will {
                topic: "fleet/linus/status",
                payload: b"offline",
                retain: true,
            },
            0x87,
        ),
        (
            "robot, will decommissioning another robot's device",
            true,
            "torvalds",
            "robot-torvalds",
            Will {
                topic: "homeassistant/device/fleet_linus/config",
                payload: b"",
                retain: true,
            },
            0x87,
        ),
        (
            "admin, will with 101 levels",
            true,
            "root",
            "deep",
            Will {
                topic: &deep,
                payload: b"x",
                retain: true,
            },
            0x90,
        ),
    ];
    for (what, v5, user, client_id, will, expected) in hostile {
        let connect = Connect {
            will: Some(will),
            ..as_user(v5, user, client_id)
        };
        let (stream, code) = connect_with(addr, &connect).await;
        assert_eq!(code, expected, "{what}: CONNACK");
        drop(stream);
    }
    // The robot's own will is what availability is made of.
    let own = Connect {
        will: Some(Will {
            topic: "fleet/linus/status",
            payload: b"offline",
            retain: true,
        }),
        ..as_user(true, "linus", "robot-linus")
    };
    let (linus, code) = connect_with(addr, &own).await;
    assert_eq!(code, 0, "a robot's own will");
    drop(linus);

    let seen = topics_received(&mut watch, Duration::from_secs(1)).await;
    assert_eq!(
        seen,
        ["fleet/linus/status"],
        "only the robot's own will fired"
    );
    for (reason, count) in [
        ("will_not_allowed", 4.0),
        ("will_retained_command", 1.0),
        ("will_too_many_levels", 1.0),
    ] {
        let series = format!("fleet_broker_connects_refused_total{{reason=\"{reason}\"}}");
        assert_eq!(metric(http, &series).await, count, "{series}");
    }
}

#[tokio::test]
async fn deep_and_long_topics_are_refused_and_the_broker_stays_up() {
    let broker = secured(BrokerConfig::default()).await;
    let addr = broker.mqtt_addr();
    let http = broker.http_addr().unwrap();
    let (mut root, code) = connect_with(addr, &as_user(true, "root", "root-5")).await;
    assert_eq!(code, 0);

    // One SUBSCRIBE with 6,000 levels (MQTT 5: SUBACK 0x8F, topic filter invalid).
    let mut body = vec![0, 7, 0];
    body.extend(fleet_testkit::raw::string("+/".repeat(3_000).as_bytes()));
    body.push(0);
    root.write_all(&fleet_testkit::raw::packet(0x82, &body))
        .await
        .unwrap();
    let (first, suback) = read_packet(&mut root, WAIT).await.expect("SUBACK");
    assert_eq!((first, suback.last().copied()), (0x90, Some(0x8f)));

    // A retained publish to 8,000 levels used to overflow the stack of the retainer.
    for topic in ["x/".repeat(8_000), "x/".repeat(40)] {
        root.write_all(&publish_qos1(topic.as_bytes(), b"boom", true, true))
            .await
            .unwrap();
        assert_ne!(puback_code(&mut root).await, 0, "refused");
    }
    let (_still, code) = connect_with(addr, &as_user(false, "grafana", "after")).await;
    assert_eq!(code, 0, "the broker is still up");
    assert_eq!(
        metric(
            http,
            "fleet_broker_publishes_refused_total{reason=\"topic_too_long\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            http,
            "fleet_broker_publishes_refused_total{reason=\"too_many_levels\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            http,
            "fleet_broker_subscriptions_refused_total{reason=\"topic_too_long\"}"
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn client_ids_stay_with_their_owners() {
    let broker = secured(BrokerConfig::default()).await;
    let addr = broker.mqtt_addr();
    let http = broker.http_addr().unwrap();

    // The gateway is connected; a reader tries to take its session over.
    let (mut gateway, code) =
        connect_with(addr, &as_user(true, "gateway", "fleet-gateway-1")).await;
    assert_eq!(code, 0);
    let (_, code) = connect_with(addr, &as_user(true, "grafana", "fleet-gateway-1")).await;
    assert_eq!(code, 0x85, "taking over another user's session");
    gateway
        .write_all(&publish_qos1(b"fleet/linus/cmd/ping", b"", false, true))
        .await
        .unwrap();
    assert!(
        puback_code(&mut gateway).await < 0x80,
        "the gateway was not kicked off"
    );

    // A persistent session waiting for its client belongs to that client's user too.
    let mut persistent = as_user(false, "gateway", "ha-bridge").encode();
    persistent[9] &= !0x02; // clean session off
    let mut ha = TcpStream::connect(addr).await.unwrap();
    ha.write_all(&persistent).await.unwrap();
    let (first, _) = read_packet(&mut ha, WAIT).await.expect("CONNACK");
    assert_eq!(first, 0x20);
    drop(ha);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, code) = connect_with(addr, &as_user(false, "grafana", "ha-bridge")).await;
    assert_eq!(code, 0x02, "3.1.1: identifier rejected");

    // Robot ids are their robots'.
    for (user, client_id, expected) in [
        ("grafana", "robot-linus", 0x85),
        ("root", "robot-linus", 0x85),
        ("torvalds", "robot-linus", 0x85),
        ("linus", "linus", 0x85),
        ("linus", "robot-linus", 0),
    ] {
        let (_, code) = connect_with(addr, &as_user(true, user, client_id)).await;
        assert_eq!(code, expected, "{user} as {client_id}");
    }
    assert_eq!(
        metric(
            http,
            "fleet_broker_connects_refused_total{reason=\"client_id_taken\"}"
        )
        .await,
        2.0
    );
    assert_eq!(
        metric(
            http,
            "fleet_broker_connects_refused_total{reason=\"client_id_reserved\"}"
        )
        .await,
        2.0
    );
}

#[tokio::test]
async fn robots_write_only_their_own_devices_and_answers() {
    let broker = secured(BrokerConfig::default()).await;
    let addr = broker.mqtt_addr();
    let (mut linus, code) = connect_with(addr, &as_user(true, "linus", "robot-linus")).await;
    assert_eq!(code, 0);
    for (topic, retain, payload, allowed) in [
        (
            "homeassistant/device/fleet_linus/config",
            true,
            &b"{}"[..],
            true,
        ),
        (
            "homeassistant/device/fleet_torvalds/config",
            true,
            b"",
            false,
        ),
        ("homeassistant/switch/fake/config", true, b"{}", false),
        ("homeassistant/status", false, b"online", false),
        ("fleet/_gateway/gw-1/linus/result", false, b"{}", true),
        ("fleet/_gateway/gw-1/torvalds/result", false, b"{}", false),
        ("fleet/_gateway/gw-1/result", false, b"{}", false),
    ] {
        linus
            .write_all(&publish_qos1(topic.as_bytes(), payload, retain, true))
            .await
            .unwrap();
        let code = puback_code(&mut linus).await;
        assert_eq!(code < 0x80, allowed, "{topic}: PUBACK {code:#x}");
    }
}

#[tokio::test]
async fn retained_storage_per_user_is_bounded() {
    let broker = secured(BrokerConfig::default()).await;
    let addr = broker.mqtt_addr();
    let http = broker.http_addr().unwrap();
    let (mut linus, code) = connect_with(addr, &as_user(true, "linus", "robot-linus")).await;
    assert_eq!(code, 0);
    let big = vec![b'x'; 600 * 1024];
    let mut codes = Vec::new();
    for topic in ["fleet/linus/state", "fleet/linus/status"] {
        linus
            .write_all(&publish_qos1(topic.as_bytes(), &big, true, true))
            .await
            .unwrap();
        codes.push(puback_code(&mut linus).await);
    }
    assert!(codes[0] < 0x80, "the first fits: {codes:?}");
    assert_eq!(codes[1], 0x87, "1.2 MB of retained messages from one robot");
    assert_eq!(
        metric(
            http,
            "fleet_broker_publishes_refused_total{reason=\"retained_quota\"}"
        )
        .await,
        1.0
    );
    // Replacing its own message is always possible.
    linus
        .write_all(&publish_qos1(b"fleet/linus/state", b"{}", true, true))
        .await
        .unwrap();
    assert!(puback_code(&mut linus).await < 0x80);
}

#[tokio::test]
async fn idle_and_half_open_connections_are_closed() {
    let broker = secured(BrokerConfig {
        handshake_timeout: Duration::from_secs(1),
        ..BrokerConfig::default()
    })
    .await;
    let addr = broker.mqtt_addr();
    let mut idle = TcpStream::connect(addr).await.unwrap();
    let mut half = TcpStream::connect(addr).await.unwrap();
    let connect = as_user(false, "linus", "robot-linus").encode();
    half.write_all(&connect[..connect.len() / 2]).await.unwrap();
    let mut first_bytes = TcpStream::connect(addr).await.unwrap();
    first_bytes.write_all(&connect[..3]).await.unwrap();
    for (what, stream) in [
        ("nothing sent", &mut idle),
        ("half a CONNECT", &mut half),
        ("three bytes", &mut first_bytes),
    ] {
        assert!(
            closed_within(stream, Duration::from_secs(4)).await,
            "{what}: still open"
        );
    }
}

#[tokio::test]
async fn connections_are_capped_in_total_and_per_address_before_connect() {
    let broker = secured(BrokerConfig {
        connections: fleet_broker::gate::ConnectionLimits {
            max_connections: 300,
            max_pending_per_address: 100,
            ws_allowed_origins: Vec::new(),
        },
        ..BrokerConfig::default()
    })
    .await;
    let addr = broker.mqtt_addr();
    let http = broker.http_addr().unwrap();
    let before = fleet_testkit::rss_mib();
    // An attacker at 127.0.0.2 opens connections and sends nothing.
    let mut idle = Vec::new();
    for _ in 0..150 {
        idle.push(from_address([127, 0, 0, 2], addr).await);
    }
    let mut closed = 0;
    for stream in &mut idle {
        if closed_within(stream, Duration::from_millis(20)).await {
            closed += 1;
        }
    }
    assert_eq!(
        closed, 50,
        "beyond 100 waiting from one address, closed at once"
    );
    // A robot elsewhere still gets in.
    let (_linus, code) = connect_with(addr, &as_user(false, "linus", "robot-linus")).await;
    assert_eq!(code, 0, "a robot connects during the flood");
    // From many addresses the total cap holds.
    for n in 3..=6u8 {
        for _ in 0..60 {
            idle.push(from_address([127, 0, 0, n], addr).await);
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused_total = metric(
        http,
        "fleet_broker_connections_refused_total{reason=\"max_connections\"}",
    )
    .await;
    assert!(refused_total > 0.0, "the total cap bites");
    assert_eq!(
        metric(
            http,
            "fleet_broker_connections_refused_total{reason=\"pending_per_address\"}"
        )
        .await,
        50.0
    );
    eprintln!(
        "connection flood: {} connections opened, RSS {before:.1} -> {:.1} MiB",
        idle.len(),
        fleet_testkit::rss_mib()
    );
}

async fn from_address(ip: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((ip, 0))).unwrap();
    socket.connect(to).await.unwrap()
}

#[tokio::test]
async fn websockets_from_foreign_web_pages_are_refused() {
    let broker = fleet_broker::start(BrokerConfig {
        mqtt_addr: loopback(),
        ws_addr: Some(loopback()),
        http_addr: Some(loopback()),
        connections: fleet_broker::gate::ConnectionLimits {
            ws_allowed_origins: vec!["https://ops.example.com".to_owned()],
            ..Default::default()
        },
        ..BrokerConfig::default()
    })
    .await
    .unwrap();
    let ws = broker.ws_addr().unwrap();
    for (origin, expected) in [
        (Some("http://evil.example"), "403"),
        (Some("null"), "403"),
        (Some("http://127.0.0.1:8080"), "403"),
        (Some("https://ops.example.com"), "101"),
        (None, "101"),
    ] {
        let mut stream = TcpStream::connect(ws).await.unwrap();
        let origin_line = origin
            .map(|o| format!("Origin: {o}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "GET /mqtt HTTP/1.1\r\nHost: {ws}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: mqtt\r\n{origin_line}\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = [0u8; 12];
        tokio::time::timeout(
            WAIT,
            tokio::io::AsyncReadExt::read_exact(&mut stream, &mut answer),
        )
        .await
        .expect("an answer")
        .unwrap();
        let status = String::from_utf8_lossy(&answer[9..12]).into_owned();
        assert_eq!(status, expected, "Origin {origin:?}");
    }
    assert_eq!(
        metric(
            broker.http_addr().unwrap(),
            "fleet_broker_connections_refused_total{reason=\"ws_origin\"}"
        )
        .await,
        3.0
    );
}
