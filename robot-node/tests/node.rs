//! A node on the simulated backend against the real broker, driven by real MQTT clients.

use std::time::{Duration, Instant};

use fleet_testkit::{Watcher, start_broker};
use robot_node::{BrokerAddress, NodeConfig, NodeHandle, RobotConfig, SimulatedDriver};
use rumqttc::v5::mqttbytes::v5::PublishProperties;

fn spawn_node(addr: std::net::SocketAddr, robot: RobotConfig, hold: Duration) -> NodeHandle {
    let broker = BrokerAddress {
        host: addr.ip().to_string(),
        port: addr.port(),
    };
    let mut config = NodeConfig::new(robot, broker);
    config.default_hold = hold;
    let driver = Box::new(SimulatedDriver::new(config.robot.id.to_string()));
    robot_node::spawn(config, driver)
}

#[tokio::test]
async fn plain_text_drive_from_a_v311_client_moves_the_robot() {
    let broker = start_broker().await;
    let watcher = Watcher::v311(broker.mqtt_addr(), "watcher", "fleet/#").await;
    let _node = spawn_node(
        broker.mqtt_addr(),
        RobotConfig::linus(),
        Duration::from_secs(5),
    );
    watcher
        .wait_for("online", |m| {
            m.topic == "fleet/linus/status" && m.text() == "online"
        })
        .await;
    watcher
        .wait_for_json("fleet/linus/state", |s| s["motion"] == "stop")
        .await;

    // As `mosquitto_pub -t fleet/linus/cmd/drive -m forward` would.
    watcher.publish("fleet/linus/cmd/drive", "forward").await;
    let state = watcher
        .wait_for_json("fleet/linus/state", |s| s["motion"] == "forward")
        .await;
    assert_eq!(state["motors"][0]["direction"], "forward");
    assert_eq!(state["last_command"]["status"], "ok");
    let result = watcher
        .wait_for_json("fleet/linus/result", |r| r["command"] == "drive")
        .await;
    assert_eq!(result["status"], "ok");
    assert_eq!(result["id"], state["last_command"]["id"]);
}

#[tokio::test]
async fn bad_payloads_get_error_results_and_the_node_keeps_serving() {
    let broker = start_broker().await;
    let watcher = Watcher::v311(broker.mqtt_addr(), "watcher", "fleet/#").await;
    let node = spawn_node(
        broker.mqtt_addr(),
        RobotConfig::torvalds(),
        Duration::from_secs(5),
    );
    watcher
        .wait_for("online", |m| {
            m.topic == "fleet/torvalds/status" && m.text() == "online"
        })
        .await;

    let cases: [(&str, &[u8], &str); 7] = [
        ("drive", b"sideways", "bad_payload"),
        ("drive", b"{\"direction\":", "bad_payload"),
        (
            "servo",
            b"{\"id\":\"srv-1\",\"servo1\":120}",
            "out_of_range",
        ),
        ("speed", b"5", "not_supported"),
        ("dance", b"now", "unknown_command"),
        ("eyes", &[0xff, 0xfe, 0x00], "bad_payload"),
        ("drive", &[b'x'; 100_000], "payload_too_large"),
    ];
    for (command, payload, code) in cases {
        watcher.clear();
        watcher
            .publish(&format!("fleet/torvalds/cmd/{command}"), payload.to_vec())
            .await;
        let result = watcher
            .wait_for_json("fleet/torvalds/result", |r| r["command"] == command)
            .await;
        assert_eq!(result["status"], "error", "{command}: {result}");
        assert_eq!(result["code"], code, "{command}: {result}");
        assert!(result["error"].as_str().is_some_and(|e| !e.is_empty()));
    }

    // Still serving: a good command works, and north is torvalds' forward.
    watcher.publish("fleet/torvalds/cmd/drive", "north").await;
    watcher
        .wait_for_json("fleet/torvalds/state", |s| s["motion"] == "forward")
        .await;
    assert_eq!(
        node.counters()
            .commands_failed
            .load(std::sync::atomic::Ordering::Relaxed),
        7
    );
    node.stop().await.expect("clean stop");
}

#[tokio::test]
async fn results_go_to_the_response_topic_with_correlation_data() {
    let broker = start_broker().await;
    let client = Watcher::v5(broker.mqtt_addr(), "requester", "replies/#").await;
    let _node = spawn_node(
        broker.mqtt_addr(),
        RobotConfig::linus(),
        Duration::from_secs(5),
    );
    let properties = PublishProperties {
        response_topic: Some("replies/me".into()),
        correlation_data: Some("corr-7".into()),
        user_properties: vec![("command-id".into(), "cmd-7".into())],
        ..Default::default()
    };
    // The node may not be subscribed yet: repeat until it answers.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        client
            .publish_with_properties("fleet/linus/cmd/eyes", "on", properties.clone())
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !client.messages().is_empty() || Instant::now() > deadline {
            break;
        }
    }
    let reply = client
        .wait_for("a reply", |m| m.topic == "replies/me")
        .await;
    assert_eq!(reply.correlation_data.as_deref(), Some(&b"corr-7"[..]));
    assert_eq!(reply.json()["id"], "cmd-7");
    assert_eq!(reply.json()["status"], "ok");
}

#[tokio::test]
async fn the_dead_man_stops_the_motors_and_the_e_stop_reaches_everyone() {
    let broker = start_broker().await;
    let watcher = Watcher::v311(broker.mqtt_addr(), "watcher", "fleet/#").await;
    let linus = spawn_node(
        broker.mqtt_addr(),
        RobotConfig::linus(),
        Duration::from_millis(300),
    );
    let torvalds = spawn_node(
        broker.mqtt_addr(),
        RobotConfig::torvalds(),
        Duration::from_secs(30),
    );
    for robot in ["linus", "torvalds"] {
        let topic = format!("fleet/{robot}/status");
        watcher
            .wait_for("online", |m| m.topic == topic && m.text() == "online")
            .await;
    }

    watcher.publish("fleet/linus/cmd/drive", "forward").await;
    watcher
        .wait_for_json("fleet/linus/state", |s| s["motion"] == "forward")
        .await;
    watcher.clear();
    let started = Instant::now();
    watcher
        .wait_for_json("fleet/linus/state", |s| s["motion"] == "stop")
        .await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        linus
            .counters()
            .dead_man_stops
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    watcher.publish("fleet/torvalds/cmd/drive", "east").await;
    watcher
        .wait_for_json("fleet/torvalds/state", |s| s["motion"] == "right")
        .await;
    watcher.publish("fleet/all/cmd/stop", "").await;
    watcher
        .wait_for_json("fleet/torvalds/state", |s| s["motion"] == "stop")
        .await;
    watcher
        .wait_for_json("fleet/linus/result", |r| {
            r["command"] == "stop" && r["status"] == "ok"
        })
        .await;

    // A clean shutdown says offline (and a crash would, through the last will).
    torvalds.stop().await.expect("clean stop");
    watcher
        .wait_for("offline", |m| {
            m.topic == "fleet/torvalds/status" && m.text() == "offline"
        })
        .await;
}
