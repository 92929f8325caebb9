//! A node against the real broker, driven by real MQTT clients, with the recording
//! backend standing in for the hardware so every pin change can be checked and timed.

mod common;

use std::time::{Duration, Instant};

use common::{
    config, latest_state, motors_off, motors_off_at_once, online, spawn, stop_behind_queued_drives,
};
use fleet_testkit::{TcpProxy, WAIT, Watcher, start_broker};
use robot_node::RobotConfig;
use rumqttc::v5::mqttbytes::v5::PublishProperties;

#[tokio::test]
async fn plain_text_drive_from_a_v311_client_moves_the_robot() {
    let broker = start_broker().await;
    let watcher = Watcher::v311(broker.mqtt_addr(), "watcher", "fleet/#").await;
    let robot = spawn(config(broker.mqtt_addr(), RobotConfig::linus()));
    online(&watcher, "linus").await;

    // As `mosquitto_pub -t fleet/linus/cmd/drive -m forward` would.
    watcher.publish("fleet/linus/cmd/drive", "forward").await;
    let state = watcher
        .wait_for_json("fleet/linus/state", |s| s["motion"] == "forward")
        .await;
    assert_eq!(state["motors"][0]["direction"], "forward");
    assert_eq!(state["last_command"]["status"], "ok");
    assert!(
        state["last_seen_ms"]
            .as_u64()
            .is_some_and(|t| t > 1_600_000_000_000)
    );
    let result = watcher
        .wait_for_json("fleet/linus/result", |r| r["command"] == "drive")
        .await;
    assert_eq!(result["status"], "ok");
    assert_eq!(result["id"], state["last_command"]["id"]);
    assert_eq!(robot.recording.levels(&robot.inputs), "1010");
}

#[tokio::test]
async fn pin_patterns_of_every_direction_of_both_robots() {
    let broker = start_broker().await;
    let watcher = Watcher::v311(broker.mqtt_addr(), "watcher", "fleet/#").await;
    let linus = spawn(config(broker.mqtt_addr(), RobotConfig::linus()));
    let torvalds = spawn(config(broker.mqtt_addr(), RobotConfig::torvalds()));
    online(&watcher, "linus").await;
    online(&watcher, "torvalds").await;

    let cases = [
        ("linus", &linus, "forward", "forward", "1010"),
        ("linus", &linus, "backward", "backward", "0101"),
        ("linus", &linus, "left", "left", "0110"),
        ("linus", &linus, "right", "right", "1001"),
        ("linus", &linus, "stop", "stop", "0000"),
        ("torvalds", &torvalds, "north", "forward", "0110"),
        ("torvalds", &torvalds, "south", "backward", "1001"),
        ("torvalds", &torvalds, "west", "left", "1010"),
        ("torvalds", &torvalds, "east", "right", "0101"),
        ("torvalds", &torvalds, "stop", "stop", "0000"),
    ];
    for (name, robot, word, motion, pins) in cases {
        watcher.clear();
        let id = format!("{name}-{word}");
        let payload = format!(r#"{{"direction":"{word}","id":"{id}","hold_ms":5000}}"#);
        watcher
            .publish(&format!("fleet/{name}/cmd/drive"), payload)
            .await;
        let state = watcher
            .wait_for_json(&format!("fleet/{name}/state"), |s| {
                s["last_command"]["id"] == id.as_str()
            })
            .await;
        assert_eq!(state["motion"], motion, "{name} {word}");
        assert_eq!(
            robot.recording.levels(&robot.inputs),
            pins,
            "{name} {word}: pins {:?}",
            robot.inputs
        );
    }
    // linus's speed sets the duty cycle of its enable pins while driving.
    watcher.publish("fleet/linus/cmd/speed", "3 7").await;
    watcher.publish("fleet/linus/cmd/drive", "forward").await;
    watcher
        .wait_for_json("fleet/linus/state", |s| {
            s["motion"] == "forward" && s["motors"][1]["speed"] == 7
        })
        .await;
    let outputs = linus.recording.outputs();
    let duty = |pin| match outputs.get(&pin) {
        Some(robot_node::driver::PinOutput::Pwm(p)) => p.pulse_us * 100 / p.period_us,
        other => panic!("GPIO{pin} is not PWM: {other:?}"),
    };
    assert_eq!((duty(12), duty(26)), (30, 70));
}

#[tokio::test]
async fn bad_input_gets_error_results_and_the_node_keeps_serving() {
    let broker = start_broker().await;
    let watcher = Watcher::v311(broker.mqtt_addr(), "watcher", "fleet/#").await;
    let robot = spawn(config(broker.mqtt_addr(), RobotConfig::torvalds()));
    online(&watcher, "torvalds").await;

    let megabyte = vec![b'x'; 1_000_000];
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("drive", b"sideways".to_vec(), "bad_payload"),
        ("drive", b"{\"direction\":".to_vec(), "bad_payload"),
        (
            "drive",
            b"{\"direction\":\"forward\",\"speed\":\"fast\"}".to_vec(),
            "bad_payload",
        ),
        (
            "drive",
            b"{\"direction\":\"forward\",\"hold_ms\":6000}".to_vec(),
            "out_of_range",
        ),
        (
            "drive",
            b"{\"direction\":\"forward\",\"deadline_ms\":1000}".to_vec(),
            "expired",
        ),
        (
            "servo",
            b"{\"id\":\"srv-1\",\"servo1\":120}".to_vec(),
            "out_of_range",
        ),
        ("servo", b"mid".to_vec(), "not_supported"),
        ("speed", b"5".to_vec(), "not_supported"),
        ("dance", b"now".to_vec(), "unknown_command"),
        ("eyes", vec![0xff, 0xfe, 0x00], "bad_payload"),
        ("eyes", b"[1,2]".to_vec(), "bad_payload"),
        ("drive", megabyte, "payload_too_large"),
    ];
    let count = cases.len() as u64;
    for (command, payload, code) in cases {
        watcher.clear();
        watcher
            .publish(&format!("fleet/torvalds/cmd/{command}"), payload)
            .await;
        let result = watcher
            .wait_for_json("fleet/torvalds/result", |r| r["command"] == command)
            .await;
        assert_eq!(result["status"], "error", "{command}: {result}");
        assert_eq!(result["code"], code, "{command}: {result}");
        assert!(result["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    assert_eq!(
        robot.recording.levels(&robot.inputs),
        "0000",
        "nothing moved"
    );

    // Still serving: a good command works, and north is torvalds' forward.
    watcher.publish("fleet/torvalds/cmd/drive", "north").await;
    watcher
        .wait_for_json("fleet/torvalds/state", |s| s["motion"] == "forward")
        .await;
    assert_eq!(robot.metrics.commands_total("error"), count);
    assert_eq!(robot.metrics.commands_total("ok"), 1);
    let text = robot.metrics.encode();
    assert!(
        text.contains("fleet_node_commands_total{topic=\"+/cmd/other\",result=\"error\"} 1"),
        "{text}"
    );
    robot.node.stop().await.expect("clean stop");
}

#[tokio::test]
async fn results_go_to_the_response_topic_with_correlation_data() {
    let broker = start_broker().await;
    let client = Watcher::v5(broker.mqtt_addr(), "requester", "replies/#").await;
    let watcher = Watcher::v311(broker.mqtt_addr(), "watcher", "fleet/#").await;
    let _robot = spawn(config(broker.mqtt_addr(), RobotConfig::linus()));
    online(&watcher, "linus").await;
    let properties = PublishProperties {
        response_topic: Some("replies/me".into()),
        correlation_data: Some("corr-7".into()),
        user_properties: vec![("command-id".into(), "cmd-7".into())],
        ..Default::default()
    };
    client
        .publish_with_properties("fleet/linus/cmd/eyes", "on", properties)
        .await;
    let reply = client
        .wait_for("a reply", |m| m.topic == "replies/me")
        .await;
    assert_eq!(reply.correlation_data.as_deref(), Some(&b"corr-7"[..]));
    assert_eq!(reply.json()["id"], "cmd-7");
    assert_eq!(reply.json()["status"], "ok");
}

#[tokio::test]
async fn the_dead_man_stops_the_motors_within_500_ms_of_the_last_refresh() {
    let broker = start_broker().await;
    let watcher = Watcher::v311(broker.mqtt_addr(), "watcher", "fleet/#").await;
    let mut linus_config = config(broker.mqtt_addr(), RobotConfig::linus());
    linus_config.default_hold = Duration::from_millis(300);
    let robot = spawn(linus_config);
    online(&watcher, "linus").await;

    // Refreshed every 150 ms for a while (as the web UI does), then not any more.
    let mut last_refresh = Instant::now();
    for _ in 0..6 {
        watcher.publish("fleet/linus/cmd/drive", "forward").await;
        last_refresh = Instant::now();
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            robot.recording.levels(&robot.inputs),
            "1010",
            "still driving while refreshed"
        );
    }
    watcher
        .wait_for_json("fleet/linus/state", |s| {
            s["motion"] == "stop" && s["last_command"]["command"] == "drive"
        })
        .await;
    let off = robot
        .recording
        .all_inactive_since(&robot.inputs)
        .expect("motors off");
    let after_refresh = off.duration_since(last_refresh);
    assert!(
        after_refresh <= Duration::from_millis(500),
        "off {after_refresh:?} after the last refresh"
    );
    assert!(
        after_refresh >= Duration::from_millis(250),
        "not before the hold ran out ({after_refresh:?})"
    );
    assert_eq!(robot.metrics.dead_man_stops.get(), 1);
}

#[tokio::test]
async fn losing_the_broker_stops_the_motors_at_once_and_the_node_comes_back() {
    let broker = start_broker().await;
    let proxy = TcpProxy::start(broker.mqtt_addr()).await;
    let watcher = Watcher::v311(broker.mqtt_addr(), "watcher", "fleet/#").await;
    let mut linus_config = config(proxy.addr(), RobotConfig::linus());
    linus_config.default_hold = Duration::from_secs(5);
    let robot = spawn(linus_config);
    online(&watcher, "linus").await;
    watcher.publish("fleet/linus/cmd/drive", "forward").await;
    watcher
        .wait_for_json("fleet/linus/state", |s| s["motion"] == "forward")
        .await;

    let cut = Instant::now();
    proxy.cut();
    let deadline = cut + WAIT;
    let off = loop {
        if let Some(off) = robot.recording.all_inactive_since(&robot.inputs) {
            break off;
        }
        assert!(
            Instant::now() < deadline,
            "motors still on after the link was cut"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(
        off.duration_since(cut) <= Duration::from_millis(500),
        "off {:?} after the cut",
        off.duration_since(cut)
    );
    assert_eq!(robot.metrics.link_loss_stops.get(), 1);
    // The broker noticed the node is gone (the socket closed): the last will says offline.
    watcher
        .wait_for("offline", |m| {
            m.topic == "fleet/linus/status" && m.text() == "offline"
        })
        .await;

    watcher.clear();
    proxy.restore();
    online(&watcher, "linus").await;
    watcher.publish("fleet/linus/cmd/drive", "left").await;
    watcher
        .wait_for_json("fleet/linus/state", |s| s["motion"] == "left")
        .await;
    assert!(robot.metrics.connects.get() >= 2);
}

/// Waits, past the watcher's usual patience, until linus's status is `status`.
async fn status_by(watcher: &Watcher, status: &str, deadline: Instant) {
    while !watcher
        .messages()
        .iter()
        .any(|m| m.topic == "fleet/linus/status" && m.text() == status)
    {
        assert!(Instant::now() < deadline, "linus never said {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_blackholed_link_stops_the_motors_and_the_broker_declares_the_node_offline() {
    let broker = start_broker().await;
    let proxy = TcpProxy::start(broker.mqtt_addr()).await;
    let watcher = Watcher::v311(broker.mqtt_addr(), "watcher", "fleet/#").await;
    let mut linus_config = config(proxy.addr(), RobotConfig::linus());
    linus_config.default_hold = Duration::from_millis(300);
    let keep_alive = linus_config.keep_alive;
    let robot = spawn(linus_config);
    online(&watcher, "linus").await;

    // Someone holds the button: a refresh every 100 ms, through the proxy's dead route.
    let refreshing = {
        let client = Watcher::v311(broker.mqtt_addr(), "holder", "nothing/#").await;
        tokio::spawn(async move {
            loop {
                client.publish("fleet/linus/cmd/drive", "forward").await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    watcher
        .wait_for_json("fleet/linus/state", |s| s["motion"] == "forward")
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Nothing is closed; packets just stop. The node cannot tell; the dead-man can.
    let silenced = Instant::now();
    proxy.blackhole();
    let off = loop {
        if let Some(off) = robot.recording.all_inactive_since(&robot.inputs) {
            break off;
        }
        assert!(silenced.elapsed() < WAIT, "motors still on in a blackhole");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let after = off.saturating_duration_since(silenced);
    assert!(
        after <= Duration::from_millis(500),
        "off {after:?} after the link went silent"
    );

    // The broker hears nothing either: the last will after 1.5 x the keep-alive.
    let deadline = silenced + keep_alive * 2 + Duration::from_secs(2);
    status_by(&watcher, "offline", deadline).await;
    let declared = silenced.elapsed();
    assert!(
        declared <= keep_alive.mul_f64(1.5) + Duration::from_millis(1500),
        "offline after {declared:?} (keep-alive {keep_alive:?})"
    );
    eprintln!("blackhole: motors off after {after:?}, offline after {declared:?}");

    // The route comes back: the node notices its dead connection and reconnects.
    watcher.clear();
    proxy.restore();
    status_by(&watcher, "online", Instant::now() + keep_alive * 3).await;
    refreshing.abort();
    assert!(robot.metrics.connects.get() >= 2);
}

#[tokio::test]
async fn commands_sent_while_the_node_was_away_are_delivered_when_it_returns() {
    let broker = start_broker().await;
    let watcher = Watcher::v311(broker.mqtt_addr(), "watcher", "fleet/#").await;
    let first = spawn(config(broker.mqtt_addr(), RobotConfig::linus()));
    online(&watcher, "linus").await;
    watcher
        .wait_for_json("fleet/linus/state", |s| s["eyes"] == "off")
        .await;

    first.node.kill();
    watcher
        .wait_for("the last will", |m| {
            m.topic == "fleet/linus/status" && m.text() == "offline"
        })
        .await;
    // A drive that expires after 1 s (as the gateway sends them), then an eyes command
    // without expiry.
    let sender = Watcher::v5(broker.mqtt_addr(), "sender", "nothing/#").await;
    let expires = PublishProperties {
        message_expiry_interval: Some(1),
        ..Default::default()
    };
    sender
        .publish_with_properties(
            "fleet/linus/cmd/drive",
            r#"{"direction":"forward","id":"stale"}"#,
            expires,
        )
        .await;
    watcher
        .publish(
            "fleet/linus/cmd/eyes",
            r#"{"state":"on","id":"while-away"}"#,
        )
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let second = spawn(config(broker.mqtt_addr(), RobotConfig::linus()));
    let result = watcher
        .wait_for_json("fleet/linus/result", |r| r["id"] == "while-away")
        .await;
    assert_eq!(result["status"], "ok");
    watcher
        .wait_for_json("fleet/linus/state", |s| s["eyes"] == "on")
        .await;
    assert_eq!(
        second.recording.outputs().get(&16).map(|o| o.is_active()),
        Some(true)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !watcher.messages().iter().any(|m| !m.topic.contains("/cmd/")
            && (m.json()["id"] == "stale" || m.json()["last_command"]["id"] == "stale")),
        "the expired drive was not delivered"
    );
    assert_eq!(second.recording.levels(&second.inputs), "0000");
}

#[tokio::test]
async fn a_stop_wins_over_queued_drive_commands() {
    let broker = start_broker().await;
    let watcher = Watcher::v311(broker.mqtt_addr(), "watcher", "fleet/#").await;
    let robot = spawn(config(broker.mqtt_addr(), RobotConfig::linus()));
    online(&watcher, "linus").await;

    stop_behind_queued_drives(&watcher, "fleet/all/cmd/stop", r#"{"id":"estop"}"#, "estop").await;
    assert_eq!(robot.recording.levels(&robot.inputs), "0000");
    assert_eq!(latest_state(&watcher, "linus")["motion"], "stop");
}

#[tokio::test]
async fn the_e_stop_reaches_everyone_and_shutdown_leaves_outputs_safe() {
    let broker = start_broker().await;
    let watcher = Watcher::v311(broker.mqtt_addr(), "watcher", "fleet/#").await;
    let linus = spawn(config(broker.mqtt_addr(), RobotConfig::linus()));
    let torvalds = spawn(config(broker.mqtt_addr(), RobotConfig::torvalds()));
    online(&watcher, "linus").await;
    online(&watcher, "torvalds").await;

    watcher.publish("fleet/torvalds/cmd/drive", "east").await;
    watcher.publish("fleet/linus/cmd/eyes", "on").await;
    watcher.publish("fleet/linus/cmd/drive", "backward").await;
    watcher
        .wait_for_json("fleet/torvalds/state", |s| s["motion"] == "right")
        .await;
    watcher
        .wait_for_json("fleet/linus/state", |s| s["motion"] == "backward")
        .await;
    watcher.publish("fleet/all/cmd/stop", "").await;
    watcher
        .wait_for_json("fleet/torvalds/state", |s| s["motion"] == "stop")
        .await;
    watcher
        .wait_for_json("fleet/linus/state", |s| {
            s["motion"] == "stop" && s["eyes"] == "off"
        })
        .await;

    watcher.publish("fleet/linus/cmd/servo", "45").await;
    watcher.publish("fleet/linus/cmd/eyes", "on").await;
    watcher
        .wait_for_json("fleet/linus/state", |s| s["eyes"] == "on")
        .await;
    let recording = linus.recording.clone();
    linus.node.stop().await.expect("clean stop");
    watcher
        .wait_for("offline", |m| {
            m.topic == "fleet/linus/status" && m.text() == "offline"
        })
        .await;
    let outputs = recording.outputs();
    assert!(
        outputs
            .iter()
            .filter(|(pin, _)| **pin != 22 && **pin != 23)
            .all(|(_, o)| !o.is_active()),
        "{outputs:?}"
    );
    assert_eq!(
        outputs.get(&22),
        Some(&robot_node::driver::PinOutput::Pwm(
            robot_node::driver::Pwm {
                period_us: 20_000,
                pulse_us: 1_500
            }
        )),
        "servos centred"
    );
    torvalds.node.stop().await.expect("clean stop");
}

#[tokio::test]
async fn outputs_start_safe_and_an_idle_node_keeps_a_heartbeat() {
    let broker = start_broker().await;
    let watcher = Watcher::v311(broker.mqtt_addr(), "watcher", "fleet/linus/state").await;
    let mut linus_config = config(broker.mqtt_addr(), RobotConfig::linus());
    linus_config.heartbeat = Duration::from_millis(200);
    let robot = spawn(linus_config);
    watcher.wait_for("the first state", |_| true).await;

    // Before anything else, every output was driven to its safe state.
    let first_writes: std::collections::BTreeMap<u8, robot_node::driver::PinOutput> = robot
        .recording
        .timeline()
        .iter()
        .rev()
        .map(|c| (c.pin, c.output))
        .collect();
    for pin in [13, 21, 17, 27, 12, 26, 16] {
        assert_eq!(
            first_writes.get(&pin).map(|o| o.is_active()),
            Some(false),
            "GPIO{pin} starts inactive"
        );
    }

    // Idle, the state is republished every heartbeat with a fresh last_seen_ms.
    watcher
        .wait_for("three states", |_| watcher.messages().len() >= 3)
        .await;
    let seen: Vec<u64> = watcher
        .messages()
        .iter()
        .filter_map(|m| m.json()["last_seen_ms"].as_u64())
        .collect();
    assert!(
        seen.windows(2).all(|w| w[1] >= w[0]) && seen.last() > seen.first(),
        "{seen:?}"
    );
}

#[tokio::test]
async fn a_flood_of_fleet_wide_commands_is_not_held_back_without_bound() {
    let broker = start_broker().await;
    let watcher = Watcher::v311(broker.mqtt_addr(), "watcher", "fleet/#").await;
    let mut linus_config = config(broker.mqtt_addr(), RobotConfig::linus());
    linus_config.fleet_reply_spread = Duration::from_secs(30);
    let _linus = spawn(linus_config);
    online(&watcher, "linus").await;

    // 100 fleet-wide stops: the node holds back a bounded number of answers and answers
    // the rest at once, long before the 30 s window ends.
    for i in 0..100 {
        watcher
            .publish("fleet/all/cmd/stop", format!(r#"{{"id":"flood-{i}"}}"#))
            .await;
    }
    watcher
        .wait_for("answers beyond the held-back ones", |_| {
            watcher
                .messages()
                .iter()
                .filter(|m| {
                    m.topic == "fleet/linus/result"
                        && m.json()["id"]
                            .as_str()
                            .is_some_and(|id| id.starts_with("flood-"))
                })
                .count()
                >= 100 - 64
        })
        .await;
}

#[tokio::test]
async fn answers_to_fleet_wide_commands_are_spread_out_but_the_stop_is_immediate() {
    let broker = start_broker().await;
    let watcher = Watcher::v311(broker.mqtt_addr(), "watcher", "fleet/#").await;
    let mut linus_config = config(broker.mqtt_addr(), RobotConfig::linus());
    linus_config.fleet_reply_spread = Duration::from_secs(3);
    let linus = spawn(linus_config);
    online(&watcher, "linus").await;

    // A command to this robot alone is answered at once, whatever the spread.
    let sent = Instant::now();
    watcher
        .publish(
            "fleet/linus/cmd/drive",
            r#"{"direction":"forward","hold_ms":5000,"id":"go"}"#,
        )
        .await;
    watcher
        .wait_for_json("fleet/linus/result", |r| r["id"] == "go")
        .await;
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "{:?}",
        sent.elapsed()
    );
    assert_eq!(linus.recording.levels(&linus.inputs), "1010");

    // The fleet-wide stop runs at once; its answer comes within the spread.
    let sent = Instant::now();
    watcher
        .publish("fleet/all/cmd/stop", r#"{"id":"everyone-1"}"#)
        .await;
    motors_off_at_once(&linus, sent).await;
    let result = watcher
        .wait_for_json("fleet/linus/result", |r| r["id"] == "everyone-1")
        .await;
    assert_eq!(result["status"], "ok");
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "{:?}",
        sent.elapsed()
    );
    let state = watcher
        .wait_for_json("fleet/linus/state", |s| {
            s["last_command"]["id"] == "everyone-1"
        })
        .await;
    assert_eq!(state["motion"], "stop");
    // `at_ms` says when the stop ran, not when the state left.
    let ran_at = state["last_command"]["at_ms"].as_u64().expect("at_ms");
    let published_at = state["last_seen_ms"].as_u64().expect("last_seen_ms");
    assert!(ran_at <= published_at, "{state}");

    // Leaving sends the answers still held back, before `offline`.
    watcher.clear();
    watcher
        .publish(
            "fleet/linus/cmd/drive",
            r#"{"direction":"left","hold_ms":5000,"id":"go-2"}"#,
        )
        .await;
    watcher
        .wait_for_json("fleet/linus/result", |r| r["id"] == "go-2")
        .await;
    watcher
        .publish("fleet/all/cmd/stop", r#"{"id":"everyone-2"}"#)
        .await;
    motors_off(&linus).await;
    linus.node.stop().await.expect("clean stop");
    watcher
        .wait_for("offline", |m| {
            m.topic == "fleet/linus/status" && m.text() == "offline"
        })
        .await;
    let messages = watcher.messages();
    let answered = messages
        .iter()
        .position(|m| m.topic == "fleet/linus/result" && m.json()["id"] == "everyone-2");
    let offline = messages
        .iter()
        .position(|m| m.topic == "fleet/linus/status" && m.text() == "offline");
    assert!(
        answered.is_some() && answered < offline,
        "answer {answered:?}, offline {offline:?}"
    );
}
