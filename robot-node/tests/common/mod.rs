//! What the node's integration tests share: a node with the recording driver against
//! the test broker, and waits on what it publishes and the pins it sets. Each test file
//! uses part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_testkit::{WAIT, Watcher};
use robot_node::driver::Recording;
use robot_node::{
    BrokerAddress, NodeConfig, NodeHandle, NodeMetrics, RecordingDriver, RobotConfig,
};

pub struct TestRobot {
    pub node: NodeHandle,
    pub recording: Recording,
    pub metrics: Arc<NodeMetrics>,
    pub inputs: [u8; 4],
}

pub fn config(addr: SocketAddr, robot: RobotConfig) -> NodeConfig {
    let broker = BrokerAddress {
        host: addr.ip().to_string(),
        port: addr.port(),
    };
    NodeConfig::new(robot, broker)
}

pub fn spawn(config: NodeConfig) -> TestRobot {
    let (driver, recording) = RecordingDriver::new();
    let metrics = Arc::new(NodeMetrics::default());
    let inputs = config.robot.motor_inputs;
    let node = robot_node::spawn(config, Box::new(driver), metrics.clone());
    TestRobot {
        node,
        recording,
        metrics,
        inputs,
    }
}

pub async fn online(watcher: &Watcher, robot: &str) {
    let topic = format!("fleet/{robot}/status");
    watcher
        .wait_for("online", |m| m.topic == topic && m.text() == "online")
        .await;
}

/// The latest retained state of `robot` that `watcher` has seen.
pub fn latest_state(watcher: &Watcher, robot: &str) -> serde_json::Value {
    let topic = format!("fleet/{robot}/state");
    watcher
        .messages()
        .iter()
        .rev()
        .find(|m| m.topic == topic)
        .map(|m| m.json())
        .unwrap_or_default()
}

/// Waits until the recording shows every motor input off; returns when that happened.
pub async fn motors_off(robot: &TestRobot) -> Instant {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(at) = robot.recording.all_inactive_since(&robot.inputs) {
            return at;
        }
        assert!(Instant::now() < deadline, "the motors never stopped");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits for the motors to go off, and checks that they did within 500 ms of `sent`
/// (long before any dead-man would have stopped them).
pub async fn motors_off_at_once(robot: &TestRobot, sent: Instant) {
    let stopped = motors_off(robot).await;
    assert!(
        stopped.duration_since(sent) < Duration::from_millis(500),
        "motors off {:?} after the stop",
        stopped.duration_since(sent)
    );
}

/// Queues 300 drive commands for linus (5 s hold each), then publishes `stop_payload` on
/// `stop_topic`; waits for every answer and checks that each drive still queued when the
/// stop came was refused as `superseded`, and for the state after the last of them
/// (state publishes are folded, so it may come after the last result). Returns the
/// stop's result (its id must be `stop_id`).
pub async fn stop_behind_queued_drives(
    watcher: &Watcher,
    stop_topic: &str,
    stop_payload: &str,
    stop_id: &str,
) -> serde_json::Value {
    let drives = 300;
    for i in 0..drives {
        watcher
            .publish(
                "fleet/linus/cmd/drive",
                format!(r#"{{"direction":"forward","hold_ms":5000,"id":"d{i}"}}"#),
            )
            .await;
    }
    watcher.publish(stop_topic, stop_payload).await;
    watcher
        .wait_for("every result", |_| {
            watcher
                .messages()
                .iter()
                .filter(|m| m.topic == "fleet/linus/result")
                .count()
                > drives
        })
        .await;
    let results: Vec<_> = watcher
        .messages()
        .into_iter()
        .filter(|m| m.topic == "fleet/linus/result")
        .map(|m| m.json())
        .collect();
    let stop_at = results
        .iter()
        .position(|r| r["id"] == stop_id)
        .expect("the stop's result");
    assert!(
        results[stop_at + 1..]
            .iter()
            .all(|r| r["status"] == "error" && r["code"] == "superseded"),
        "no drive that came before the stop ran after it"
    );
    let last_id = results.last().map(|r| r["id"].clone()).unwrap_or_default();
    watcher
        .wait_for_json("fleet/linus/state", |s| s["last_command"]["id"] == last_id)
        .await;
    results[stop_at].clone()
}
