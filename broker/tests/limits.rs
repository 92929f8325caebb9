//! What the broker drops is counted, per-topic counters stay bounded at fleet scale, and
//! websocket clients share the topics of TCP clients.

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::time::Duration;

use fleet_broker::BrokerConfig;
use fleet_testkit::{WAIT, Watcher};
use rumqttc::v5;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A 3.1.1 subscriber that subscribes at QoS 1 to `fleet/linus/state` and then never reads
/// or acknowledges; with `keep_session` its session outlives the connection.
async fn stuck_subscriber(addr: SocketAddr, keep_session: bool) -> tokio::net::TcpStream {
    let mut stuck = tokio::net::TcpStream::connect(addr).await.unwrap();
    let flags = if keep_session { 0 } else { 0x02 };
    stuck
        .write_all(&[
            0x10, 17, 0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 60, 0, 5, b's', b't', b'u', b'c',
            b'k',
        ])
        .await
        .unwrap();
    let mut connack = [0u8; 4];
    stuck.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);
    let topic = b"fleet/linus/state";
    let mut subscribe = vec![
        0x82,
        (2 + 2 + topic.len() + 1) as u8,
        0,
        1,
        0,
        topic.len() as u8,
    ];
    subscribe.extend_from_slice(topic);
    subscribe.push(1);
    stuck.write_all(&subscribe).await.unwrap();
    let mut suback = [0u8; 5];
    stuck.read_exact(&mut suback).await.unwrap();
    assert_eq!(suback[0], 0x90);
    stuck
}

/// A broker whose subscribers may have 5 messages waiting (10 kept) and 1 in flight.
async fn small_queue_broker() -> fleet_broker::RunningBroker {
    fleet_broker::start(BrokerConfig {
        mqtt_addr: loopback(),
        http_addr: Some(loopback()),
        max_inflight: NonZeroU16::MIN,
        max_queue_len: 5,
        ..BrokerConfig::default()
    })
    .await
    .unwrap()
}

/// 100 QoS 1 publishes to the stuck subscriber's topic.
async fn publish_100_states(broker: &fleet_broker::RunningBroker) -> Watcher {
    let publisher = Watcher::v5(broker.mqtt_addr(), "publisher", "nothing/#").await;
    for i in 0..100 {
        publisher
            .publish("fleet/linus/state", format!("{{\"n\":{i}}}"))
            .await;
    }
    publisher
}

/// Waits until every `(series, at least)` holds (counters update as the broker works).
async fn wait_for_counters(broker: &fleet_broker::RunningBroker, wanted: &[(&str, f64)]) {
    let http = broker.http_addr().unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut missing = Vec::new();
        for (series, at_least) in wanted {
            let value = fleet_testkit::metric(http, series).await;
            if value < *at_least {
                missing.push(format!("{series} = {value}, wanted {at_least}"));
            }
        }
        if missing.is_empty() {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{missing:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Nobody drains an offline session: what does not fit in its queue (twice
/// `max_queue_len`) is dropped and counted, and its publishers are not held back for it.
#[tokio::test]
async fn messages_dropped_for_an_offline_session_are_counted() {
    let broker = small_queue_broker().await;
    let mut stuck = stuck_subscriber(broker.mqtt_addr(), true).await;
    stuck.write_all(&[0xe0, 0]).await.unwrap();
    drop(stuck);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let _publisher = publish_100_states(&broker).await;
    wait_for_counters(
        &broker,
        &[(
            "fleet_broker_messages_dropped_total{reason=\"queue_full\"}",
            90.0,
        )],
    )
    .await;
}

/// A connected subscriber that reads nothing holds its publisher back for a moment, then
/// is disconnected as a slow consumer (counted) and the publisher carries on.
#[tokio::test]
async fn a_stalled_subscriber_is_disconnected_and_its_publisher_carries_on() {
    let broker = small_queue_broker().await;
    let _stuck = stuck_subscriber(broker.mqtt_addr(), false).await;
    let _publisher = publish_100_states(&broker).await;
    wait_for_counters(
        &broker,
        &[
            (
                "fleet_broker_disconnects_total{reason=\"slow_consumer\"}",
                1.0,
            ),
            (
                "fleet_broker_messages_received_total{topic=\"fleet/+/state\"}",
                100.0,
            ),
        ],
    )
    .await;
}

#[tokio::test]
async fn per_topic_counters_stay_bounded_for_10000_robots() {
    let broker = fleet_broker::start(BrokerConfig {
        mqtt_addr: loopback(),
        http_addr: Some(loopback()),
        ..BrokerConfig::default()
    })
    .await
    .unwrap();
    let watcher = Watcher::v311(broker.mqtt_addr(), "watcher", "fleet/+/status").await;
    let options = v5::MqttOptions::new("many", "127.0.0.1", broker.mqtt_addr().port());
    let (client, mut eventloop) = v5::AsyncClient::new(options, 20_000);
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    for i in 0..10_000 {
        client
            .publish(
                format!("fleet/robot-{i}/status"),
                v5::mqttbytes::QoS::AtMostOnce,
                false,
                "online",
            )
            .await
            .unwrap();
    }
    watcher
        .wait_for("the last robot", |m| m.topic == "fleet/robot-9999/status")
        .await;
    let text = fleet_testkit::metrics_text(broker.http_addr().unwrap()).await;
    let received: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("fleet_broker_messages_received_total{"))
        .collect();
    assert_eq!(
        received,
        ["fleet_broker_messages_received_total{topic=\"fleet/+/status\"} 10000"]
    );
    let delivered: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("fleet_broker_messages_delivered_total{"))
        .collect();
    assert_eq!(
        delivered,
        ["fleet_broker_messages_delivered_total{topic=\"fleet/+/status\"} 10000"]
    );
}

#[tokio::test]
async fn websocket_clients_meet_tcp_clients_on_the_same_topics() {
    let broker = fleet_broker::start(BrokerConfig {
        mqtt_addr: loopback(),
        ws_addr: Some(loopback()),
        ..BrokerConfig::default()
    })
    .await
    .unwrap();
    let tcp = Watcher::v311(broker.mqtt_addr(), "tcp", "fleet/#").await;
    let ws = broker.ws_addr().unwrap();
    let mut options = v5::MqttOptions::new("browser", format!("ws://{ws}/mqtt"), ws.port());
    options.set_transport(rumqttc::Transport::Ws);
    let (client, mut eventloop) = v5::AsyncClient::new(options, 10);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let v5::Event::Incoming(packet) = event {
                let _ = tx.send(packet);
            }
        }
    });
    client
        .subscribe("fleet/linus/state", v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    client
        .publish(
            "fleet/linus/cmd/drive",
            v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "forward",
        )
        .await
        .unwrap();
    tcp.wait_for("the websocket client's command", |m| {
        m.topic == "fleet/linus/cmd/drive" && m.text() == "forward"
    })
    .await;
    tcp.publish("fleet/linus/state", "{\"motion\":\"forward\"}")
        .await;
    let got = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(v5::mqttbytes::v5::Packet::Publish(p)) = rx.recv().await {
                return p;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(got.topic, "fleet/linus/state");
}

#[tokio::test]
async fn shared_subscriptions_qos2_and_message_expiry() {
    let broker = fleet_broker::start(BrokerConfig {
        mqtt_addr: loopback(),
        ..BrokerConfig::default()
    })
    .await
    .unwrap();
    let addr = broker.mqtt_addr();
    // Two members of one shared subscription: each message reaches exactly one of them.
    let first = Watcher::v5(addr, "worker-1", "$share/workers/fleet/+/result").await;
    let second = Watcher::v5(addr, "worker-2", "$share/workers/fleet/+/result").await;
    let watcher = Watcher::v5(addr, "watcher", "fleet/#").await;
    let publisher = Watcher::v5(addr, "publisher", "nothing/#").await;
    for i in 0..10 {
        publisher
            .publish("fleet/linus/result", format!("{{\"id\":\"r{i}\"}}"))
            .await;
    }
    watcher
        .wait_for("all ten", |m| m.json()["id"] == "r9")
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (a, b) = (first.messages().len(), second.messages().len());
    assert_eq!(a + b, 10, "each message to one member ({a} + {b})");
    assert!(a > 0 && b > 0, "spread over both members ({a} + {b})");

    // QoS 2 end to end, exactly once.
    let options = v5::MqttOptions::new("qos2", "127.0.0.1", addr.port());
    let (client, mut eventloop) = v5::AsyncClient::new(options, 10);
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    client
        .publish(
            "fleet/linus/state",
            v5::mqttbytes::QoS::ExactlyOnce,
            false,
            "{\"q\":2}",
        )
        .await
        .unwrap();
    watcher
        .wait_for("the QoS 2 message", |m| m.json()["q"] == 2)
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        watcher
            .messages()
            .iter()
            .filter(|m| m.json()["q"] == 2)
            .count(),
        1
    );

    // A sender's message expiry reaches MQTT 5 subscribers (counted down, never raised).
    let properties = v5::mqttbytes::v5::PublishProperties {
        message_expiry_interval: Some(30),
        ..Default::default()
    };
    publisher
        .publish_with_properties(
            "fleet/linus/cmd/drive",
            "{\"direction\":\"forward\"}",
            properties,
        )
        .await;
    let command = watcher
        .wait_for("the command", |m| m.topic == "fleet/linus/cmd/drive")
        .await;
    assert!(
        command
            .message_expiry
            .is_some_and(|left| left > 0 && left <= 30),
        "{:?}",
        command.message_expiry
    );
}
