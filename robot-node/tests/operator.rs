//! The operator's name travels with every command (MQTT 5 user property `fleet-operator`,
//! JSON `operator` for 3.1.1 senders) and is echoed in the result and the state's
//! `last_command`. Against the real broker, with real MQTT clients.

mod common;

use common::{config, online, spawn};
use fleet_testkit::{Watcher, start_broker};
use robot_node::RobotConfig;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde_json::Value;

fn user_properties(pairs: &[(&str, &str)]) -> PublishProperties {
    PublishProperties {
        user_properties: pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Default::default()
    }
}

/// The result with `id` on `fleet/linus/result`, and the state that reports it.
async fn result_and_state(watcher: &Watcher, id: &str) -> (Value, Value) {
    let result = watcher
        .wait_for_json("fleet/linus/result", |r| r["id"] == id)
        .await;
    let state = watcher
        .wait_for_json("fleet/linus/state", |s| s["last_command"]["id"] == id)
        .await;
    (result, state)
}

#[tokio::test]
async fn the_operator_is_echoed_in_the_result_and_the_state() {
    let broker = start_broker().await;
    let v5 = Watcher::v5(broker.mqtt_addr(), "operator-v5", "replies/#").await;
    let watcher = Watcher::v311(broker.mqtt_addr(), "watcher", "fleet/#").await;
    let robot = spawn(config(broker.mqtt_addr(), RobotConfig::linus()));
    online(&watcher, "linus").await;

    // (a) MQTT 5: the `fleet-operator` user property.
    v5.publish_with_properties(
        "fleet/linus/cmd/eyes",
        "on",
        user_properties(&[("command-id", "op-a"), ("fleet-operator", "ada")]),
    )
    .await;
    let (result, state) = result_and_state(&watcher, "op-a").await;
    assert_eq!(result["status"], "ok", "{result}");
    assert_eq!(result["operator"], "ada", "{result}");
    assert_eq!(state["last_command"]["operator"], "ada", "{state}");

    // The property wins over the JSON field.
    v5.publish_with_properties(
        "fleet/linus/cmd/eyes",
        r#"{"state":"off","id":"op-a2","operator":"bob"}"#,
        user_properties(&[("fleet-operator", "ada")]),
    )
    .await;
    let (result, state) = result_and_state(&watcher, "op-a2").await;
    assert_eq!(result["operator"], "ada", "{result}");
    assert_eq!(state["last_command"]["operator"], "ada", "{state}");

    // An invalid property is ignored: the JSON field is used, or there is no operator,
    // and the command is carried out all the same.
    let too_long = "x".repeat(65);
    v5.publish_with_properties(
        "fleet/linus/cmd/eyes",
        r#"{"state":"on","id":"op-a3","operator":"bob"}"#,
        user_properties(&[("fleet-operator", &too_long)]),
    )
    .await;
    let (result, _) = result_and_state(&watcher, "op-a3").await;
    assert_eq!(result["status"], "ok", "{result}");
    assert_eq!(result["operator"], "bob", "{result}");
    v5.publish_with_properties(
        "fleet/linus/cmd/eyes",
        "off",
        user_properties(&[("command-id", "op-a4"), ("fleet-operator", "")]),
    )
    .await;
    let (result, state) = result_and_state(&watcher, "op-a4").await;
    assert_eq!(result["status"], "ok", "{result}");
    assert!(result.get("operator").is_none(), "{result}");
    assert!(state["last_command"].get("operator").is_none(), "{state}");

    // (b) MQTT 3.1.1: the JSON `operator` field.
    watcher
        .publish(
            "fleet/linus/cmd/eyes",
            r#"{"state":"on","id":"op-b","operator":"bob"}"#,
        )
        .await;
    let (result, state) = result_and_state(&watcher, "op-b").await;
    assert_eq!(result["status"], "ok", "{result}");
    assert_eq!(result["operator"], "bob", "{result}");
    assert_eq!(state["last_command"]["operator"], "bob", "{state}");

    // (c) Neither: no operator in the result or the state.
    watcher
        .publish("fleet/linus/cmd/eyes", r#"{"state":"off","id":"op-c"}"#)
        .await;
    let (result, state) = result_and_state(&watcher, "op-c").await;
    assert_eq!(result["status"], "ok", "{result}");
    assert!(result.get("operator").is_none(), "{result}");
    assert!(state["last_command"].get("operator").is_none(), "{state}");
    watcher.clear();
    watcher.publish("fleet/linus/cmd/eyes", "on").await;
    let result = watcher
        .wait_for_json("fleet/linus/result", |r| r["command"] == "eyes")
        .await;
    assert_eq!(result["status"], "ok", "{result}");
    assert!(result.get("operator").is_none(), "{result}");

    assert_eq!(robot.metrics.commands_total("error"), 0);
    robot.node.stop().await.expect("clean stop");
}

#[tokio::test]
async fn an_invalid_operator_is_refused_except_on_a_stop() {
    let broker = start_broker().await;
    let watcher = Watcher::v311(broker.mqtt_addr(), "watcher", "fleet/#").await;
    let robot = spawn(config(broker.mqtt_addr(), RobotConfig::linus()));
    online(&watcher, "linus").await;

    // (d) An invalid JSON operator is an error like an invalid id.
    let too_long = "x".repeat(65);
    for payload in [
        format!(r#"{{"state":"on","operator":"{too_long}"}}"#),
        r#"{"state":"on","operator":""}"#.to_owned(),
        r#"{"state":"on","operator":"ada\u0007"}"#.to_owned(),
        r#"{"state":"on","operator":"ada\nlovelace"}"#.to_owned(),
        r#"{"state":"on","operator":7}"#.to_owned(),
    ] {
        watcher.clear();
        watcher
            .publish("fleet/linus/cmd/eyes", payload.clone())
            .await;
        let result = watcher
            .wait_for_json("fleet/linus/result", |r| r["command"] == "eyes")
            .await;
        assert_eq!(result["status"], "error", "{payload}: {result}");
        assert_eq!(result["code"], "bad_payload", "{payload}: {result}");
        assert!(
            result["error"]
                .as_str()
                .is_some_and(|e| e.contains("operator")),
            "{payload}: {result}"
        );
        assert!(result.get("operator").is_none(), "{payload}: {result}");
        let state = watcher
            .wait_for_json("fleet/linus/state", |s| {
                s["last_command"]["command"] == "eyes"
            })
            .await;
        assert_eq!(state["last_command"]["status"], "error", "{state}");
        assert_eq!(state["eyes"], "off", "{payload}: not carried out");
    }

    // A stop is carried out all the same: the operator is dropped and named in the warning.
    watcher
        .publish(
            "fleet/linus/cmd/drive",
            r#"{"direction":"forward","hold_ms":5000,"id":"go-1","operator":"bob"}"#,
        )
        .await;
    let (result, _) = result_and_state(&watcher, "go-1").await;
    assert_eq!(result["operator"], "bob", "{result}");
    assert_eq!(robot.recording.levels(&robot.inputs), "1010");
    watcher
        .publish(
            "fleet/linus/cmd/stop",
            r#"{"id":"estop-op","operator":"ada\u0007"}"#,
        )
        .await;
    let (result, state) = result_and_state(&watcher, "estop-op").await;
    assert_eq!(result["status"], "ok", "{result}");
    assert_eq!(result["warning"]["code"], "bad_payload", "{result}");
    assert!(
        result["warning"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("operator")),
        "{result}"
    );
    assert!(result.get("operator").is_none(), "{result}");
    assert_eq!(state["motion"], "stop", "{state}");
    assert_eq!(state["last_command"]["status"], "ok", "{state}");
    assert!(state["last_command"].get("operator").is_none(), "{state}");
    assert_eq!(robot.recording.levels(&robot.inputs), "0000");
    assert_eq!(robot.metrics.stop_payloads_ignored("bad_payload"), 1);

    // A stop with a valid operator echoes it.
    watcher
        .publish(
            "fleet/linus/cmd/stop",
            r#"{"id":"estop-ok","operator":"ada"}"#,
        )
        .await;
    let (result, state) = result_and_state(&watcher, "estop-ok").await;
    assert_eq!(result["status"], "ok", "{result}");
    assert!(result.get("warning").is_none(), "{result}");
    assert_eq!(result["operator"], "ada", "{result}");
    assert_eq!(state["last_command"]["operator"], "ada", "{state}");
    robot.node.stop().await.expect("clean stop");
}
