//! Authentication and the per-robot ACL over real TCP with MQTT 3.1.1 and 5 clients,
//! and the metrics endpoint that counts what was refused.

use std::net::SocketAddr;
use std::time::Duration;

use fleet_broker::{BrokerConfig, RunningBroker};
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode as V5Code, Packet as V5Packet, PubAckReason, SubscribeReasonCode as V5Sub,
};
use rumqttc::{ConnectReturnCode, ConnectionError, Event, Packet, SubscribeReasonCode, v5};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);

async fn secured_broker() -> RunningBroker {
    fleet_testkit::start_secured_broker(
        &[
            ("linus", "robot"),
            ("torvalds", "robot"),
            ("gateway", "controller"),
            ("grafana", "reader"),
        ],
        BrokerConfig::default(),
    )
    .await
}

/// The first CONNACK outcome of an MQTT 3.1.1 client.
async fn v311_connect(
    addr: SocketAddr,
    id: &str,
    login: Option<(&str, &str)>,
) -> Result<(), ConnectReturnCode> {
    let mut options = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    if let Some((user, pass)) = login {
        options.set_credentials(user, pass);
    }
    let (_client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    match timeout(WAIT, eventloop.poll())
        .await
        .expect("CONNACK in time")
    {
        Ok(Event::Incoming(Packet::ConnAck(_))) => Ok(()),
        Err(ConnectionError::ConnectionRefused(code)) => Err(code),
        other => panic!("unexpected {other:?}"),
    }
}

/// An MQTT 5 client logged in as `user`, with its event loop driven in the background;
/// returns the client and a channel of incoming packets.
async fn v5_client(
    addr: SocketAddr,
    user: &str,
) -> (
    v5::AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<V5Packet>,
) {
    // A robot's username is its robot id, and it connects as `robot-<id>`.
    let client_id = match user {
        "linus" | "torvalds" => format!("robot-{user}"),
        _ => format!("{user}-client"),
    };
    let mut options = v5::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_credentials(user, format!("{user}-pw"));
    let (client, mut eventloop) = v5::AsyncClient::new(options, 100);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let v5::Event::Incoming(packet) = event {
                let _ = tx.send(packet);
            }
        }
    });
    match timeout(WAIT, rx.recv()).await.expect("CONNACK in time") {
        Some(V5Packet::ConnAck(ack)) => assert_eq!(ack.code, V5Code::Success, "{user} logs in"),
        other => panic!("{user}: {other:?}"),
    }
    (client, rx)
}

async fn suback(rx: &mut tokio::sync::mpsc::UnboundedReceiver<V5Packet>) -> Vec<V5Sub> {
    next_matching(rx, |p| match p {
        V5Packet::SubAck(a) => Some(a.return_codes),
        _ => None,
    })
    .await
}

async fn puback(rx: &mut tokio::sync::mpsc::UnboundedReceiver<V5Packet>) -> PubAckReason {
    next_matching(rx, |p| match p {
        V5Packet::PubAck(a) => Some(a.reason),
        _ => None,
    })
    .await
}

async fn next_matching<T>(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<V5Packet>,
    pick: impl Fn(V5Packet) -> Option<T>,
) -> T {
    timeout(WAIT, async {
        loop {
            if let Some(found) = rx.recv().await.and_then(&pick) {
                return found;
            }
        }
    })
    .await
    .expect("packet in time")
}

#[tokio::test]
async fn wrong_or_missing_credentials_get_the_proper_connack() {
    let broker = secured_broker().await;
    let addr = broker.mqtt_addr();
    assert_eq!(
        v311_connect(addr, "anon", None).await,
        Err(ConnectReturnCode::NotAuthorized)
    );
    assert_eq!(
        v311_connect(addr, "bad", Some(("linus", "nope"))).await,
        Err(ConnectReturnCode::BadUserNamePassword)
    );
    assert_eq!(
        v311_connect(addr, "who", Some(("nobody", "x"))).await,
        Err(ConnectReturnCode::BadUserNamePassword)
    );
    assert_eq!(
        v311_connect(addr, "robot-linus", Some(("linus", "linus-pw"))).await,
        Ok(())
    );

    let mut options = v5::MqttOptions::new("bad-v5", addr.ip().to_string(), addr.port());
    options.set_credentials("linus", "nope");
    let (_client, mut eventloop) = v5::AsyncClient::new(options, 10);
    match timeout(WAIT, eventloop.poll()).await.unwrap() {
        Err(v5::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, V5Code::BadUserNamePassword)
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn a_robot_can_neither_read_nor_command_another_robot() {
    let broker = secured_broker().await;
    let addr = broker.mqtt_addr();
    let (linus, mut linus_rx) = v5_client(addr, "linus").await;
    let (gateway, mut gateway_rx) = v5_client(addr, "gateway").await;
    let (grafana, mut grafana_rx) = v5_client(addr, "grafana").await;

    // Subscriptions: own commands yes, another robot's no.
    linus
        .subscribe("fleet/linus/cmd/+", v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    let ok = suback(&mut linus_rx).await;
    assert!(matches!(ok[0], V5Sub::Success(_)), "{ok:?}");
    linus
        .subscribe("fleet/torvalds/cmd/+", v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    let denied = suback(&mut linus_rx).await;
    assert_eq!(denied[0], V5Sub::NotAuthorized);
    linus
        .subscribe("fleet/#", v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    let denied = suback(&mut linus_rx).await;
    assert_eq!(denied[0], V5Sub::NotAuthorized);

    // Publishing: another robot's command topic no, its own state yes.
    let qos1 = v5::mqttbytes::QoS::AtLeastOnce;
    linus
        .publish("fleet/torvalds/cmd/drive", qos1, false, "forward")
        .await
        .unwrap();
    let ack = puback(&mut linus_rx).await;
    assert_eq!(ack, PubAckReason::NotAuthorized);
    linus
        .publish("fleet/linus/state", qos1, true, "{}")
        .await
        .unwrap();
    let ack = puback(&mut linus_rx).await;
    assert!(
        matches!(
            ack,
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers
        ),
        "{ack:?}"
    );

    // The gateway commands linus; a reader may watch but not command.
    gateway
        .publish("fleet/linus/cmd/drive", qos1, false, "forward")
        .await
        .unwrap();
    let delivered = next_matching(&mut linus_rx, |p| match p {
        V5Packet::Publish(p) => Some(p.topic),
        _ => None,
    })
    .await;
    assert_eq!(delivered, "fleet/linus/cmd/drive");
    next_matching(&mut gateway_rx, |p| {
        matches!(p, V5Packet::PubAck(_)).then_some(())
    })
    .await;
    grafana.subscribe("fleet/+/state", qos1).await.unwrap();
    let ok = suback(&mut grafana_rx).await;
    assert!(matches!(ok[0], V5Sub::Success(_)));
    grafana
        .publish("fleet/linus/cmd/drive", qos1, false, "forward")
        .await
        .unwrap();
    let ack = puback(&mut grafana_rx).await;
    assert_eq!(ack, PubAckReason::NotAuthorized);

    // MQTT 3.1.1: a refused subscription is SUBACK 0x80.
    let mut options =
        rumqttc::MqttOptions::new("robot-torvalds", addr.ip().to_string(), addr.port());
    options.set_credentials("torvalds", "torvalds-pw");
    let (torvalds, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    torvalds
        .subscribe("fleet/linus/cmd/+", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let codes = timeout(WAIT, async {
        loop {
            if let Ok(Event::Incoming(Packet::SubAck(ack))) = eventloop.poll().await {
                return ack.return_codes;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(codes, vec![SubscribeReasonCode::Failure]);

    // Counted, and visible on /metrics.
    let metrics = reqwest::get(format!("http://{}/metrics", broker.http_addr().unwrap()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("fleet_broker_acl_denials_total{action=\"subscribe\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fleet_broker_acl_denials_total{action=\"publish\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fleet_broker_messages_received_total{topic=\"fleet/+/cmd/drive\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fleet_broker_messages_delivered_total{topic=\"fleet/+/cmd/drive\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fleet_broker_retained_messages 1"),
        "{metrics}"
    );
    assert!(metrics.contains("fleet_broker_connections "), "{metrics}");
    assert!(
        metrics.contains("process_resident_memory_bytes "),
        "{metrics}"
    );
    let health = reqwest::get(format!("http://{}/health", broker.http_addr().unwrap()))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}
