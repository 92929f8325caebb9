//! The fleet's latched e-stop (`fleet/estop`, retained) over the real broker: an engaged
//! latch stops a driving robot and refuses motion until it is cleared, also for a node
//! that starts while it is engaged, and for one whose broker lost its retained messages;
//! a latch message nobody can read engages it.

use std::net::SocketAddr;

use fleet_testkit::{Message, TcpProxy, Watcher, start_broker};
use robot_node::{BrokerAddress, NodeConfig, NodeHandle, RobotConfig, SimulatedDriver};
use serde_json::Value;

const STATE: &str = "fleet/linus/state";
const RESULT: &str = "fleet/linus/result";
const LATCH: &str = "fleet/estop";

fn spawn_linus(broker: SocketAddr) -> NodeHandle {
    let address = BrokerAddress {
        host: broker.ip().to_string(),
        port: broker.port(),
    };
    let mut config = NodeConfig::new(RobotConfig::linus(), address);
    config.discovery.enabled = false;
    robot_node::spawn(
        config,
        Box::new(SimulatedDriver::new("linus".to_owned())),
        Default::default(),
    )
}

fn online(m: &Message) -> bool {
    m.topic == "fleet/linus/status" && m.text() == "online"
}

/// Sends `command` to linus and waits for its result.
async fn command(watcher: &Watcher, command: &str, payload: &str) -> Value {
    watcher.clear();
    watcher
        .publish(&format!("fleet/linus/cmd/{command}"), payload)
        .await;
    watcher
        .wait_for_json(RESULT, |r| r["command"] == command)
        .await
}

#[tokio::test]
async fn an_engaged_latch_stops_the_fleet_until_it_is_cleared() {
    let broker = start_broker().await;
    let watcher = Watcher::v311(broker.mqtt_addr(), "operator", "fleet/#").await;
    let node = spawn_linus(broker.mqtt_addr());
    watcher.wait_for("online", online).await;
    watcher
        .wait_for_json(STATE, |s| s["estop"] == "clear")
        .await;

    // Driving, then latched: the motors stop at once and motion is refused.
    assert_eq!(command(&watcher, "drive", "forward").await["status"], "ok");
    watcher.clear();
    watcher
        .publish_retained(LATCH, r#"{"engaged":true,"by":"ada","reason":"drill"}"#)
        .await;
    watcher
        .wait_for_json(STATE, |s| s["motion"] == "stop" && s["estop"] == "engaged")
        .await;
    let refused = command(&watcher, "drive", "forward").await;
    assert_eq!(refused["status"], "error");
    assert_eq!(refused["code"], "estop_engaged");
    assert!(
        refused["error"].as_str().unwrap().contains("ada"),
        "{refused}"
    );
    assert_eq!(
        command(&watcher, "servo", "45").await["code"],
        "estop_engaged"
    );
    // What moves nothing still works: a stop, the eyes, a speed.
    assert_eq!(command(&watcher, "stop", "").await["status"], "ok");
    assert_eq!(command(&watcher, "eyes", "on").await["status"], "ok");
    assert_eq!(command(&watcher, "speed", "5").await["status"], "ok");

    // A node that starts while the latch is engaged reads it before it says online.
    node.stop().await.unwrap();
    watcher.clear();
    let node = spawn_linus(broker.mqtt_addr());
    watcher.wait_for("online again", online).await;
    watcher
        .wait_for_json(STATE, |s| s["estop"] == "engaged")
        .await;
    assert_eq!(
        command(&watcher, "drive", "forward").await["code"],
        "estop_engaged"
    );

    // Cleared: motion again.
    watcher.clear();
    watcher
        .publish_retained(LATCH, r#"{"engaged":false,"by":"ada"}"#)
        .await;
    watcher
        .wait_for_json(STATE, |s| s["estop"] == "clear")
        .await;
    assert_eq!(command(&watcher, "drive", "forward").await["status"], "ok");

    // A latch message nobody can read engages it.
    watcher.clear();
    watcher.publish_retained(LATCH, "stop everything").await;
    watcher
        .wait_for_json(STATE, |s| s["motion"] == "stop" && s["estop"] == "engaged")
        .await;
    // An empty retained message deletes the latch: cleared.
    watcher.clear();
    watcher.publish_retained(LATCH, "").await;
    watcher
        .wait_for_json(STATE, |s| s["estop"] == "clear")
        .await;
    node.stop().await.unwrap();
}

#[tokio::test]
async fn a_broker_that_lost_the_latch_does_not_lift_it() {
    let first = start_broker().await;
    let second = start_broker().await;
    // linus reaches the broker through a proxy that the test moves to the second broker,
    // which never saw the latch (a broker restarted without its retained messages).
    let proxy = TcpProxy::start(first.mqtt_addr()).await;
    let on_first = Watcher::v311(first.mqtt_addr(), "operator-1", "fleet/#").await;
    let on_second = Watcher::v311(second.mqtt_addr(), "operator-2", "fleet/#").await;
    let node = spawn_linus(proxy.addr());
    on_first.wait_for("online", online).await;
    on_first
        .publish_retained(LATCH, r#"{"engaged":true}"#)
        .await;
    on_first
        .wait_for_json(STATE, |s| s["estop"] == "engaged")
        .await;

    proxy.fail_over_to(second.mqtt_addr());
    on_second
        .wait_for("online on the second broker", online)
        .await;
    on_second
        .wait_for_json(STATE, |s| s["estop"] == "engaged")
        .await;
    assert_eq!(
        command(&on_second, "drive", "forward").await["code"],
        "estop_engaged",
        "only an explicit clear lifts the latch"
    );
    node.stop().await.unwrap();
}
