//! The real broker on port 0 with real MQTT 3.1.1 and 5 clients over TCP.

use std::net::SocketAddr;
use std::time::Duration;

use fleet_broker::{BrokerConfig, RunningBroker};
use rumqttc::v5::mqttbytes::v5::{PubAckReason, PublishProperties};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, v5};
use tokio::sync::mpsc;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);

async fn start_broker() -> RunningBroker {
    fleet_broker::start(BrokerConfig {
        mqtt_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..BrokerConfig::default()
    })
    .await
    .expect("broker starts")
}

/// An MQTT 3.1.1 client subscribed to `filter`; incoming publishes arrive on the channel,
/// and connection errors too (as `Err`), so a test sees a dropped subscriber.
async fn v311_subscriber(
    addr: SocketAddr,
    id: &str,
    filter: &str,
) -> (
    AsyncClient,
    mpsc::UnboundedReceiver<Result<(String, Vec<u8>, bool), String>>,
) {
    let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let (tx, rx) = mpsc::unbounded_channel();
    let (subscribed_tx, mut subscribed_rx) = mpsc::unbounded_channel();
    let sub_client = client.clone();
    let filter = filter.to_owned();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = sub_client.subscribe(filter.clone(), QoS::AtLeastOnce).await;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = subscribed_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = p.topic.clone();
                    let _ = tx.send(Ok((topic, p.payload.to_vec(), p.retain)));
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    timeout(WAIT, subscribed_rx.recv())
        .await
        .expect("subscribed in time");
    (client, rx)
}

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
    let (_sub, mut received) = v311_subscriber(broker.mqtt_addr(), "watcher", "fleet/#").await;
    let (publisher, _acks) = v5_publisher(broker.mqtt_addr(), "gateway").await;

    for i in 0..20 {
        publisher
            .publish_with_properties(
                "fleet/linus/cmd/drive",
                v5::mqttbytes::QoS::AtLeastOnce,
                false,
                format!("{{\"direction\":\"forward\",\"id\":\"c{i}\"}}"),
                with_traceparent(),
            )
            .await
            .unwrap();
    }
    for i in 0..20 {
        let (topic, payload, _) = timeout(WAIT, received.recv())
            .await
            .expect("message in time")
            .expect("channel open")
            .expect("3.1.1 connection stays up");
        assert_eq!(topic, "fleet/linus/cmd/drive");
        assert!(String::from_utf8_lossy(&payload).contains(&format!("\"c{i}\"")));
    }
    // And a brand-new 3.1.1 connection still works afterwards.
    let (_late, mut late_rx) = v311_subscriber(broker.mqtt_addr(), "late", "fleet/#").await;
    publisher
        .publish_with_properties(
            "fleet/linus/cmd/stop",
            v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "",
            with_traceparent(),
        )
        .await
        .unwrap();
    let got = timeout(WAIT, late_rx.recv())
        .await
        .expect("in time")
        .expect("open");
    assert_eq!(got.expect("connected").0, "fleet/linus/cmd/stop");
}

#[tokio::test]
async fn retained_commands_and_wildcard_topics_are_refused() {
    let broker = start_broker().await;
    let (publisher, mut acks) = v5_publisher(broker.mqtt_addr(), "p").await;
    let qos1 = v5::mqttbytes::QoS::AtLeastOnce;

    publisher
        .publish("fleet/linus/cmd/drive", qos1, true, "forward")
        .await
        .unwrap();
    assert_eq!(
        timeout(WAIT, acks.recv()).await.unwrap(),
        Some(PubAckReason::NotAuthorized),
        "retained command refused"
    );
    // rumqttc will not send a wildcard topic name, so this one goes over a raw socket.
    assert_eq!(
        raw_v5_publish_qos1(broker.mqtt_addr(), "fleet/+/state").await,
        0x87
    );
    assert_eq!(
        raw_v5_publish_qos1(broker.mqtt_addr(), "fleet/a\0b/state").await,
        0x87
    );
    publisher
        .publish("fleet/linus/state", qos1, true, "{}")
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
    assert_eq!(
        broker
            .counters()
            .publishes_refused
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );

    // The retained state reaches a later subscriber; the refused command does not.
    let (_sub, mut received) = v311_subscriber(broker.mqtt_addr(), "later", "fleet/#").await;
    let (topic, payload, retain) = timeout(WAIT, received.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (topic.as_str(), payload.as_slice(), retain),
        ("fleet/linus/state", &b"{}"[..], true)
    );
    assert!(
        timeout(Duration::from_millis(300), received.recv())
            .await
            .is_err(),
        "nothing else retained"
    );
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
