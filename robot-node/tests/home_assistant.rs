//! Home Assistant discovery against the real broker: an MQTT 3.1.1 client plays Home
//! Assistant (3.1.1 is its default protocol). It reads the discovery document, uses the
//! topics and payloads in it exactly as Home Assistant would, and watches the robot's
//! state and availability change.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fleet_testkit::{TcpProxy, Watcher, start_broker};
use robot_node::{
    BrokerAddress, NodeConfig, NodeHandle, NodeMetrics, RecordingDriver, RobotConfig,
};
use serde_json::Value;

const DISCOVERY_LINUS: &str = "homeassistant/device/fleet_linus/config";
const GATEWAY_URL: &str = "http://127.0.0.1:8080/";

fn config(addr: SocketAddr, robot: RobotConfig) -> NodeConfig {
    let broker = BrokerAddress {
        host: addr.ip().to_string(),
        port: addr.port(),
    };
    let mut config = NodeConfig::new(robot, broker);
    config.discovery.configuration_url = Some(GATEWAY_URL.to_owned());
    config.discovery.birth_delay_max = Duration::from_millis(300);
    config
}

fn spawn(config: NodeConfig) -> (NodeHandle, Arc<NodeMetrics>) {
    let (driver, _recording) = RecordingDriver::new();
    let metrics = Arc::new(NodeMetrics::default());
    (
        robot_node::spawn(config, Box::new(driver), metrics.clone()),
        metrics,
    )
}

async fn discovery(ha: &Watcher, topic: &str) -> Value {
    ha.wait_for("the discovery document", |m| {
        m.topic == topic && !m.payload.is_empty()
    })
    .await
    .json()
}

fn component<'d>(doc: &'d Value, key: &str) -> &'d Value {
    let id = format!("fleet_linus_{key}");
    let found = &doc["components"][&id];
    assert!(found.is_object(), "no component {id}");
    found
}

fn text<'v>(value: &'v Value, key: &str) -> &'v str {
    value[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} in {value}"))
}

/// Sends what Home Assistant sends for `component` and waits for the robot's state to
/// satisfy `expect`.
async fn operate(
    ha: &Watcher,
    component: &Value,
    payload: &str,
    expect: impl Fn(&Value) -> bool,
) -> Value {
    ha.clear();
    ha.publish(text(component, "command_topic"), payload).await;
    // Buttons have no state topic; what they do shows in the robot's state.
    let state_topic = component["state_topic"]
        .as_str()
        .unwrap_or("fleet/linus/state");
    ha.wait_for_json(state_topic, expect).await
}

#[tokio::test]
async fn a_v311_home_assistant_discovers_and_drives_linus() {
    let broker = start_broker().await;
    let ha = Watcher::v311(broker.mqtt_addr(), "home-assistant", "#").await;
    let (node, metrics) = spawn(config(broker.mqtt_addr(), RobotConfig::linus()));

    let doc = discovery(&ha, DISCOVERY_LINUS).await;
    let message = ha
        .wait_for("retained discovery", |m| m.topic == DISCOVERY_LINUS)
        .await;
    assert!(message.payload.starts_with(b"{"));
    assert_eq!(doc["device"]["name"], "Linus");
    assert_eq!(doc["device"]["configuration_url"], GATEWAY_URL);
    assert_eq!(doc["device"]["via_device"], "fleet__bridge");
    assert_eq!(
        component(&doc, "forward")["availability_topic"],
        "fleet/linus/status"
    );
    ha.wait_for("online", |m| {
        m.topic == "fleet/linus/status" && m.text() == "online"
    })
    .await;

    // Buttons: payload_press is the direction.
    let forward = component(&doc, "forward");
    let state = operate(&ha, forward, text(forward, "payload_press"), |s| {
        s["motion"] == "forward"
    })
    .await;
    assert_eq!(state["motors"][0]["direction"], "forward");
    let stop = component(&doc, "stop");
    operate(&ha, stop, text(stop, "payload_press"), |s| {
        s["motion"] == "stop"
    })
    .await;

    // The light: ON / OFF as Home Assistant sends them; its state comes from the robot.
    let eyes = component(&doc, "eyes");
    assert_eq!(text(eyes, "platform"), "light");
    operate(&ha, eyes, text(eyes, "payload_on"), |s| s["eyes"] == "on").await;
    operate(&ha, eyes, text(eyes, "payload_off"), |s| s["eyes"] == "off").await;
    // Identify blinks the eye LED (on until the blink ends).
    let identify = component(&doc, "identify");
    operate(&ha, identify, text(identify, "payload_press"), |s| {
        s["eyes"] == "on"
    })
    .await;
    ha.wait_for_json("fleet/linus/state", |s| s["eyes"] == "off")
        .await;

    // Numbers: a bare value on the channel's own topic moves only that servo or motor.
    let servo1 = component(&doc, "servo1");
    let state = operate(&ha, servo1, "45", |s| s["servos"][0] == 45).await;
    assert_eq!(state["servos"][1], 0, "servo 2 is left alone");
    let servo2 = component(&doc, "servo2");
    operate(&ha, servo2, "-30.0", |s| s["servos"][1] == -30).await;
    // Speeds in percent: the slider's 70.0 goes out as `70%` (its command template).
    let motor2 = component(&doc, "motor2_speed");
    assert_eq!(text(motor2, "command_template"), "{{ value | int }}%");
    let state = operate(&ha, motor2, "70%", |s| s["motors"][1]["speed"] == 7).await;
    assert_eq!(state["motors"][0]["speed"], 10, "motor 1 is left alone");

    // The select: an option is a payload the node understands.
    let preset = component(&doc, "speed_preset");
    operate(&ha, preset, "50%", |s| {
        s["motors"][0]["speed"] == 5 && s["motors"][1]["speed"] == 5
    })
    .await;

    // Sensors read the state the node publishes.
    let state = operate(&ha, forward, "forward", |s| s["motion"] == "forward").await;
    assert_eq!(state["last_command"]["command"], "drive");
    assert_eq!(state["last_command"]["status"], "ok");
    assert!(state["uptime_s"].is_u64());

    // A refusal shows in the state, with its code, for the sensors' attributes.
    let state = operate(&ha, servo1, "500", |s| {
        s["last_command"]["status"] == "error"
    })
    .await;
    assert_eq!(state["last_command"]["code"], "out_of_range");
    assert!(state["last_command"]["error"].is_string());

    // The fleet-wide stop is on the fleet's device (the gateway's), not the robot's.
    assert!(doc["components"].get("fleet_linus_stop_all").is_none());
    let (topics, prefix) = (
        fleet_protocol::Topics::default(),
        fleet_protocol::DiscoveryPrefix::default(),
    );
    let bridge = fleet_protocol::BridgeDevice {
        topics: &topics,
        prefix: &prefix,
        sw_version: "test",
        configuration_url: None,
    }
    .document();
    let stop_all = &bridge["components"]["fleet__bridge_stop_all"];
    operate(&ha, forward, "forward", |s| s["motion"] == "forward").await;
    operate(&ha, stop_all, text(stop_all, "payload_press"), |s| {
        s["motion"] == "stop"
    })
    .await;

    // Home Assistant restarts: its birth message brings the discovery document again.
    ha.clear();
    let before = metrics.discovery_published.get();
    ha.publish("homeassistant/status", "online").await;
    discovery(&ha, DISCOVERY_LINUS).await;
    assert_eq!(metrics.discovery_published.get(), before + 1);
    // `offline` (Home Assistant stopping) is not a reason to publish.
    ha.clear();
    ha.publish("homeassistant/status", "offline").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!ha.messages().iter().any(|m| m.topic == DISCOVERY_LINUS));

    // Availability: the node dies, the broker publishes its last will once 1.5 × the
    // keep-alive (5 s) has passed.
    node.kill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    ha.wait_for("offline (last will)", |m| {
        m.topic == "fleet/linus/status" && m.text() == "offline"
    })
    .await;
}

#[tokio::test]
async fn every_command_topic_in_the_document_gets_an_ok_result() {
    let broker = start_broker().await;
    let ha = Watcher::v311(broker.mqtt_addr(), "home-assistant", "#").await;
    let (node, _) = spawn(config(broker.mqtt_addr(), RobotConfig::linus()));
    let doc = discovery(&ha, DISCOVERY_LINUS).await;
    let mut routed = 0;
    for (id, component) in doc["components"].as_object().unwrap() {
        let Some(topic) = component["command_topic"].as_str() else {
            continue;
        };
        let payloads: Vec<String> = match text(component, "platform") {
            "button" => vec![text(component, "payload_press").to_owned()],
            "switch" | "light" => vec![
                text(component, "payload_on").to_owned(),
                text(component, "payload_off").to_owned(),
            ],
            // Through the sliders' one command template (`{{ value | int }}%`).
            "number" if component.get("command_template").is_some() => {
                assert_eq!(text(component, "command_template"), "{{ value | int }}%");
                vec![
                    format!("{}%", component["min"]),
                    format!("{}%", component["max"]),
                ]
            }
            "number" => vec![
                component["min"].to_string(),
                component["max"].to_string(),
                "0".to_owned(),
            ],
            "select" => component["options"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o.as_str().unwrap().to_owned())
                .collect(),
            other => panic!("{id}: {other} with a command topic"),
        };
        let level = topic.rsplit('/').next().unwrap();
        for payload in payloads {
            ha.clear();
            ha.publish(topic, payload.clone()).await;
            let result = ha
                .wait_for_json("fleet/linus/result", |r| r["command"] == level)
                .await;
            assert_eq!(result["status"], "ok", "{id} {payload:?}: {result}");
            routed += 1;
        }
    }
    assert!(routed >= 14, "only {routed} payloads routed");
    node.stop().await.unwrap();
}

#[tokio::test]
async fn discovery_is_republished_after_a_reconnect() {
    let broker = start_broker().await;
    let proxy = TcpProxy::start(broker.mqtt_addr()).await;
    let ha = Watcher::v311(broker.mqtt_addr(), "home-assistant", "homeassistant/#").await;
    let (node, metrics) = spawn(config(proxy.addr(), RobotConfig::linus()));
    discovery(&ha, DISCOVERY_LINUS).await;
    assert_eq!(metrics.discovery_published.get(), 1);

    ha.clear();
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.restore();
    discovery(&ha, DISCOVERY_LINUS).await;
    assert!(metrics.discovery_published.get() >= 2);
    node.stop().await.unwrap();
}

#[tokio::test]
async fn decommission_removes_the_robot_and_the_node_leaves() {
    let broker = start_broker().await;
    let ha = Watcher::v311(broker.mqtt_addr(), "home-assistant", "#").await;
    let (node, _) = spawn(config(broker.mqtt_addr(), RobotConfig::linus()));
    discovery(&ha, DISCOVERY_LINUS).await;

    // Not for the whole fleet at once.
    ha.publish("fleet/all/cmd/decommission", "").await;
    let refused = ha
        .wait_for_json("fleet/linus/result", |r| r["command"] == "decommission")
        .await;
    assert_eq!(refused["status"], "error");
    assert_eq!(refused["code"], "not_allowed");

    ha.clear();
    ha.publish("fleet/linus/cmd/decommission", "").await;
    let done = ha
        .wait_for_json("fleet/linus/result", |r| r["command"] == "decommission")
        .await;
    assert_eq!(done["status"], "ok");
    for topic in [DISCOVERY_LINUS, "fleet/linus/state", "fleet/linus/status"] {
        ha.wait_for(&format!("{topic} cleared"), |m| {
            m.topic == topic && m.payload.is_empty()
        })
        .await;
    }
    // The node has left by itself.
    tokio::time::timeout(Duration::from_secs(5), node.stop())
        .await
        .expect("the node ended")
        .unwrap();

    // Home Assistant starting later finds nothing retained for linus.
    let late = Watcher::v311(broker.mqtt_addr(), "home-assistant-2", "#").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let leftovers: Vec<_> = late
        .messages()
        .into_iter()
        .filter(|m| m.topic.contains("linus"))
        .map(|m| m.topic)
        .collect();
    assert!(leftovers.is_empty(), "retained: {leftovers:?}");
}

#[tokio::test]
async fn discovery_can_be_turned_off_and_the_prefix_changed() {
    let broker = start_broker().await;
    let ha = Watcher::v311(broker.mqtt_addr(), "home-assistant", "#").await;

    let mut off = config(broker.mqtt_addr(), RobotConfig::torvalds());
    off.discovery.enabled = false;
    let (quiet, _) = spawn(off);
    ha.wait_for("torvalds online", |m| {
        m.topic == "fleet/torvalds/status" && m.text() == "online"
    })
    .await;
    ha.publish("homeassistant/status", "online").await;

    let mut custom = config(broker.mqtt_addr(), RobotConfig::linus());
    custom.discovery.prefix = "ha-test".parse().unwrap();
    let (linus, _) = spawn(custom);
    let doc = discovery(&ha, "ha-test/device/fleet_linus/config").await;
    assert_eq!(doc["device"]["identifiers"][0], "fleet_linus");

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !ha.messages()
            .iter()
            .any(|m| m.topic.starts_with("homeassistant/device")),
        "nothing under the default prefix"
    );
    quiet.stop().await.unwrap();
    linus.stop().await.unwrap();
}
