//! The fleet's Home Assistant device over the real broker: the gateway publishes it with
//! its status (last will included) and the fleet summary, answers Home Assistant's birth
//! message, and outlasts another gateway's will.

use std::time::Duration;

use fleet_gateway::GatewayConfig;
use fleet_protocol::RobotId;
use fleet_testkit::{TcpProxy, Watcher, start_broker};
use robot_node::{BrokerAddress, NodeConfig, RobotConfig, SimulatedDriver};

const BRIDGE: &str = "homeassistant/device/fleet__bridge/config";
const STATUS: &str = "fleet/_gateway/status";
const SUMMARY: &str = "fleet/_gateway/state";

#[tokio::test]
async fn the_gateway_publishes_the_fleet_device_its_status_and_the_summary() {
    let broker = start_broker().await;
    // The gateway reaches the broker through a proxy, so the test can cut its link.
    let proxy = TcpProxy::start(broker.mqtt_addr()).await;
    let watcher = Watcher::v311(broker.mqtt_addr(), "ha-watcher", "#").await;

    let address = BrokerAddress {
        host: broker.mqtt_addr().ip().to_string(),
        port: broker.mqtt_addr().port(),
    };
    let linus = RobotConfig::preset_or_default(RobotId::new("linus").unwrap());
    let _node = robot_node::spawn(
        NodeConfig::new(linus, address),
        Box::new(SimulatedDriver::new("linus".to_owned())),
        Default::default(),
    );
    let mut config = GatewayConfig::new(proxy.addr().ip().to_string(), proxy.addr().port());
    config.robots = vec![
        RobotId::new("linus").unwrap(),
        RobotId::new("torvalds").unwrap(),
    ];
    config.home_assistant.public_url = Some("http://fleet.test:8080/".to_owned());
    let _gateway = fleet_gateway::connect(&config);

    let device = watcher
        .wait_for_json(BRIDGE, |doc| doc["device"].is_object())
        .await;
    assert_eq!(device["device"]["name"], "Fleet");
    assert_eq!(
        device["device"]["configuration_url"],
        "http://fleet.test:8080/"
    );
    assert_eq!(
        device["components"]["fleet__bridge_stop_all"]["command_topic"],
        "fleet/all/cmd/stop"
    );
    let retained_online = |m: &fleet_testkit::Message| m.topic == STATUS && m.text() == "online";
    watcher
        .wait_for("the gateway online", retained_online)
        .await;
    watcher
        .wait_for_json(SUMMARY, |s| {
            s["online"] == 1 && s["robots"] == 2 && s["offline_robots"][0] == "torvalds"
        })
        .await;

    // A robot driving shows in the summary.
    watcher.publish("fleet/linus/cmd/drive", "forward").await;
    watcher.wait_for_json(SUMMARY, |s| s["moving"] == 1).await;

    // Home Assistant restarted: the device is published again.
    watcher.clear();
    watcher.publish("homeassistant/status", "online").await;
    watcher
        .wait_for_json(BRIDGE, |doc| doc["device"].is_object())
        .await;

    // Another gateway's will says offline: this one, still connected, says online again.
    watcher.clear();
    watcher.publish(STATUS, "offline").await;
    let back = |m: &fleet_testkit::Message| m.topic == STATUS && m.text() == "online";
    watcher.wait_for("online again after a will", back).await;

    // The link drops without a goodbye: the broker publishes the will, and the gateway
    // says online once it is back.
    watcher.clear();
    proxy.cut();
    let will = |m: &fleet_testkit::Message| m.topic == STATUS && m.text() == "offline";
    watcher.wait_for("the gateway's will", will).await;
    watcher.clear();
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.restore();
    watcher.wait_for("online after reconnecting", back).await;
}
