//! An e-stop is never refused for its payload: whatever a message on
//! `<prefix>/<robot>/cmd/stop` or `<prefix>/all/cmd/stop` carries, the robot stops at
//! once, answers `ok`, and tells the sender what was wrong in the result's `warning`.
//! Against the real broker, with real MQTT clients and the recording driver.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{TestRobot, config, motors_off_at_once, online, spawn, stop_behind_queued_drives};
use fleet_testkit::{Watcher, start_broker};
use robot_node::RobotConfig;

/// The broker (kept for as long as the test holds it), a watcher of everything under
/// `fleet/`, and linus online with a long hold allowed: without a stop it would keep
/// driving for 30 s.
async fn linus_online() -> (impl Sized, Watcher, TestRobot) {
    let broker = start_broker().await;
    let watcher = Watcher::v311(broker.mqtt_addr(), "watcher", "fleet/#").await;
    let mut config = config(broker.mqtt_addr(), RobotConfig::linus());
    config.max_hold = Duration::from_secs(30);
    let robot = spawn(config);
    online(&watcher, "linus").await;
    (broker, watcher, robot)
}

/// A payload and the warning code its stop's result must carry (`None`: no warning).
struct Case {
    name: &'static str,
    payload: Vec<u8>,
    warning: Option<&'static str>,
    /// The id the result must echo, when the payload carries a valid one.
    id: Option<&'static str>,
}

fn case(
    name: &'static str,
    payload: impl Into<Vec<u8>>,
    warning: Option<&'static str>,
    id: Option<&'static str>,
) -> Case {
    Case {
        name,
        payload: payload.into(),
        warning,
        id,
    }
}

#[tokio::test]
async fn a_stop_is_carried_out_whatever_its_payload() {
    let (_broker, watcher, robot) = linus_online().await;

    let bad = Some("bad_payload");
    let cases = [
        case("unknown field", r#"{"directoin":1}"#, bad, None),
        case("bad JSON", "{", bad, None),
        case(
            "5000 bytes",
            vec![b'x'; 5000],
            Some("payload_too_large"),
            None,
        ),
        case("not UTF-8", [0xff, 0xfe], bad, None),
        case(
            "deadline passed",
            r#"{"deadline_ms":1}"#,
            Some("expired"),
            None,
        ),
        case("invalid id", r#"{"id":"has space"}"#, bad, None),
        case("id of the wrong type", r#"{"id":5}"#, bad, None),
        case(
            "invalid traceparent, valid id",
            r#"{"id":"estop-7","traceparent":"nope"}"#,
            bad,
            Some("estop-7"),
        ),
        case(
            "unknown field, valid id",
            r#"{"id":"estop-8","directoin":1}"#,
            bad,
            Some("estop-8"),
        ),
        case(
            "a megabyte",
            vec![b'{'; 1_000_000],
            Some("payload_too_large"),
            None,
        ),
        // Clean stops: carried out without a warning.
        case("empty", "", None, None),
        case("text", "now", None, None),
        case(
            "JSON with an id",
            r#"{"id":"estop-9"}"#,
            None,
            Some("estop-9"),
        ),
    ];
    let mut expected_counts = BTreeMap::<&str, u64>::new();
    for (n, case) in cases.iter().enumerate() {
        for topic in ["fleet/linus/cmd/stop", "fleet/all/cmd/stop"] {
            let what = format!("{} on {topic}", case.name);
            eprintln!("case: {what}");
            // Driving, with a hold far longer than the test waits.
            let go = format!("go-{n}-{}", topic.len());
            watcher.clear();
            robot.recording.clear();
            watcher
                .publish(
                    "fleet/linus/cmd/drive",
                    format!(r#"{{"direction":"forward","hold_ms":30000,"id":"{go}"}}"#),
                )
                .await;
            watcher
                .wait_for_json("fleet/linus/state", |s| {
                    s["last_command"]["id"] == go.as_str() && s["motion"] == "forward"
                })
                .await;
            assert_eq!(robot.recording.levels(&robot.inputs), "1010", "{what}");

            let sent = Instant::now();
            watcher.publish(topic, case.payload.clone()).await;
            motors_off_at_once(&robot, sent).await;

            let result = watcher
                .wait_for_json("fleet/linus/result", |r| r["command"] == "stop")
                .await;
            assert_eq!(result["status"], "ok", "{what}: {result}");
            assert!(result.get("code").is_none(), "{what}: {result}");
            assert!(result.get("error").is_none(), "{what}: {result}");
            match case.warning {
                Some(code) => {
                    assert_eq!(result["warning"]["code"], code, "{what}: {result}");
                    assert!(
                        result["warning"]["message"]
                            .as_str()
                            .is_some_and(|m| !m.is_empty()),
                        "{what}: {result}"
                    );
                    *expected_counts.entry(code).or_default() += 1;
                }
                None => assert!(result.get("warning").is_none(), "{what}: {result}"),
            }
            if let Some(id) = case.id {
                assert_eq!(result["id"], id, "{what}: {result}");
            }

            let state = watcher
                .wait_for_json("fleet/linus/state", |s| {
                    s["last_command"]["command"] == "stop"
                })
                .await;
            assert_eq!(state["motion"], "stop", "{what}: {state}");
            assert_eq!(state["eyes"], "off", "{what}: {state}");
            assert_eq!(state["last_command"]["status"], "ok", "{what}: {state}");
            assert_eq!(state["last_command"]["id"], result["id"], "{what}");
            for reason in ["bad_payload", "payload_too_large", "expired"] {
                assert_eq!(
                    robot.metrics.stop_payloads_ignored(reason),
                    expected_counts.get(reason).copied().unwrap_or(0),
                    "{what}: fleet_node_stop_payloads_ignored_total{{reason={reason:?}}}"
                );
            }
        }
    }

    let text = robot.metrics.encode();
    for (reason, count) in [
        ("bad_payload", 14),
        ("payload_too_large", 4),
        ("expired", 2),
        ("out_of_range", 0),
    ] {
        let line = format!("fleet_node_stop_payloads_ignored_total{{reason=\"{reason}\"}} {count}");
        assert!(text.contains(&line), "{line} in\n{text}");
    }
    // Every stop counted as a stop that went well.
    assert_eq!(robot.metrics.commands_total("error"), 0);
    robot.node.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_bad_stop_still_supersedes_the_commands_queued_before_it() {
    let (_broker, watcher, robot) = linus_online().await;

    let stop = stop_behind_queued_drives(
        &watcher,
        "fleet/all/cmd/stop",
        r#"{"id":"estop","directoin":1}"#,
        "estop",
    )
    .await;
    assert_eq!(stop["status"], "ok", "{stop}");
    assert_eq!(stop["warning"]["code"], "bad_payload", "{stop}");
    assert_eq!(robot.recording.levels(&robot.inputs), "0000");
    assert_eq!(robot.metrics.stop_payloads_ignored("bad_payload"), 1);
    robot.node.stop().await.expect("clean stop");
}
