//! The real broker on port 0 with real MQTT 3.1.1 and 5 clients over TCP.

use std::net::SocketAddr;
use std::time::Duration;

use fleet_testkit::{WAIT, Watcher, start_broker};
use rumqttc::v5;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{PubAckReason, PublishProperties};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// An MQTT 5 publisher whose publishes are acknowledged in order; returns the PUBACK
/// reason codes.
async fn v5_publisher(
    addr: SocketAddr,
    id: &str,
) -> (v5::AsyncClient, mpsc::UnboundedReceiver<PubAckReason>) {
    let options = v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    let (client, mut eventloop) = v5::AsyncClient::new(options, 100);
    let (tx, rx) = mpsc::unbounded_channel();
    let (connected_tx, mut connected_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            match event {
                v5::Event::Incoming(v5::mqttbytes::v5::Packet::ConnAck(_)) => {
                    let _ = connected_tx.send(());
                }
                v5::Event::Incoming(v5::mqttbytes::v5::Packet::PubAck(ack)) => {
                    let _ = tx.send(ack.reason);
                }
                _ => {}
            }
        }
    });
    timeout(WAIT, connected_rx.recv())
        .await
        .expect("connected in time");
    (client, rx)
}

fn with_traceparent() -> PublishProperties {
    PublishProperties {
        user_properties: vec![(
            "traceparent".into(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        )],
        response_topic: Some("fleet/_gateway/t/result".into()),
        correlation_data: Some("c-1".into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn v311_subscriber_survives_v5_publishes_with_properties() {
    let broker = start_broker().await;
    let watcher = Watcher::v311(broker.mqtt_addr(), "watcher", "fleet/#").await;
    let (publisher, _acks) = v5_publisher(broker.mqtt_addr(), "gateway").await;

    for i in 0..20 {
        let payload = format!("{{\"direction\":\"forward\",\"id\":\"c{i}\"}}");
        publisher
            .publish_with_properties(
                "fleet/linus/cmd/drive",
                QoS::AtLeastOnce,
                false,
                payload,
                with_traceparent(),
            )
            .await
            .unwrap();
    }
    watcher
        .wait_for("the 20th command", |m| m.json()["id"] == "c19")
        .await;
    let ids: Vec<_> = watcher
        .messages()
        .iter()
        .map(|m| m.json()["id"].clone())
        .collect();
    assert_eq!(ids.len(), 20, "every command delivered once, in order");
    assert!(
        ids.iter()
            .enumerate()
            .all(|(i, id)| *id == format!("c{i}").as_str())
    );
    assert!(
        watcher.errors().is_empty(),
        "3.1.1 connection stayed up: {:?}",
        watcher.errors()
    );

    // And a brand-new 3.1.1 connection still works afterwards.
    let late = Watcher::v311(broker.mqtt_addr(), "late", "fleet/#").await;
    publisher
        .publish_with_properties(
            "fleet/linus/cmd/stop",
            QoS::AtLeastOnce,
            false,
            "",
            with_traceparent(),
        )
        .await
        .unwrap();
    late.wait_for("the stop", |m| m.topic == "fleet/linus/cmd/stop")
        .await;
}

#[tokio::test]
async fn retained_commands_and_wildcard_topics_are_refused() {
    let broker = start_broker().await;
    let (publisher, mut acks) = v5_publisher(broker.mqtt_addr(), "p").await;

    publisher
        .publish("fleet/linus/cmd/drive", QoS::AtLeastOnce, true, "forward")
        .await
        .unwrap();
    let ack = timeout(WAIT, acks.recv()).await.unwrap();
    assert_eq!(
        ack,
        Some(PubAckReason::NotAuthorized),
        "retained command refused"
    );
    // rumqttc will not send a wildcard topic name, so these go over a raw socket.
    assert_eq!(
        raw_v5_publish_qos1(broker.mqtt_addr(), "fleet/+/state").await,
        0x87
    );
    assert_eq!(
        raw_v5_publish_qos1(broker.mqtt_addr(), "fleet/a\0b/state").await,
        0x87
    );
    publisher
        .publish("fleet/linus/state", QoS::AtLeastOnce, true, "{}")
        .await
        .unwrap();
    let ok = timeout(WAIT, acks.recv()).await.unwrap();
    assert!(
        matches!(
            ok,
            Some(PubAckReason::Success | PubAckReason::NoMatchingSubscribers)
        ),
        "retained state accepted, got {ok:?}"
    );
    assert_eq!(broker.metrics().refused("retained_command"), 1);
    assert_eq!(broker.metrics().refused("invalid_topic"), 2);

    // The retained state reaches a later subscriber; the refused command does not.
    let later = Watcher::v311(broker.mqtt_addr(), "later", "fleet/#").await;
    let state = later
        .wait_for("retained state", |m| m.topic == "fleet/linus/state")
        .await;
    assert!(state.retain);
    assert_eq!(state.payload, b"{}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(later.messages().len(), 1, "nothing else retained");
}

/// Sends CONNECT (MQTT 5) and a QoS 1 PUBLISH by hand; returns the PUBACK reason code.
async fn raw_v5_publish_qos1(addr: SocketAddr, topic: &str) -> u8 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connect = [
        0x10, 16, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0, 0, 3, b'r', b'a', b'w',
    ];
    stream.write_all(&connect).await.unwrap();
    let mut connack = [0u8; 64];
    let n = timeout(WAIT, stream.read(&mut connack))
        .await
        .unwrap()
        .unwrap();
    assert!(
        n >= 4 && connack[0] == 0x20 && connack[3] == 0,
        "CONNACK success"
    );
    let mut body = Vec::new();
    body.extend_from_slice(&u16::try_from(topic.len()).unwrap().to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&[0, 1, 0]); // packet id 1, no properties
    body.extend_from_slice(b"x");
    let mut publish = vec![0x32, u8::try_from(body.len()).unwrap()];
    publish.extend_from_slice(&body);
    stream.write_all(&publish).await.unwrap();
    let mut puback = [0u8; 64];
    let n = timeout(WAIT, stream.read(&mut puback))
        .await
        .unwrap()
        .unwrap();
    assert!(
        n >= 5 && puback[0] == 0x40,
        "PUBACK with a reason code, got {:?}",
        &puback[..n]
    );
    puback[4]
}
