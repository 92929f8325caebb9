//! Golden tests of the Home Assistant discovery documents: the exact JSON each robot
//! publishes is checked in (`tests/golden/`), and every command topic and payload in it
//! is one the node's parser accepts. `UPDATE_GOLDEN=1 cargo test -p fleet-protocol`
//! rewrites the files after a deliberate change; review the diff.

use std::collections::HashSet;
use std::path::PathBuf;

use fleet_protocol::{
    BridgeDevice, Capabilities, CommandEnvelope, CommandTarget, DiscoveryDevice, DiscoveryPrefix,
    RobotId, Topics,
};
use serde_json::Value;

const VERSION: &str = "0.0.0-golden";
const GATEWAY: &str = "http://127.0.0.1:8080/";

fn document(robot: &str, capabilities: Capabilities) -> (String, Value) {
    let topics = Topics::default();
    let prefix = DiscoveryPrefix::default();
    let robot = RobotId::new(robot).unwrap();
    let device = DiscoveryDevice {
        topics: &topics,
        prefix: &prefix,
        robot: &robot,
        capabilities,
        sw_version: VERSION,
        configuration_url: Some(GATEWAY),
    };
    (device.config_topic(), device.document())
}

fn linus() -> (String, Value) {
    document(
        "linus",
        Capabilities {
            speed_control: true,
            servos: 2,
        },
    )
}

fn torvalds() -> (String, Value) {
    document(
        "torvalds",
        Capabilities {
            speed_control: false,
            servos: 0,
        },
    )
}

fn bridge() -> (String, Value) {
    let topics = Topics::default();
    let prefix = DiscoveryPrefix::default();
    let device = BridgeDevice {
        topics: &topics,
        prefix: &prefix,
        sw_version: VERSION,
        configuration_url: Some(GATEWAY),
    };
    (device.config_topic(), device.document())
}

fn check_golden(name: &str, doc: &Value) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(doc).unwrap() + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &text).unwrap();
    }
    let golden = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
    let golden: Value = serde_json::from_str(&golden).expect("golden file is valid JSON");
    assert_eq!(
        &golden,
        doc,
        "{name}: the discovery document changed; UPDATE_GOLDEN=1 rewrites {}",
        path.display()
    );
}

#[test]
fn documents_match_the_golden_files() {
    let (topic, doc) = linus();
    assert_eq!(topic, "homeassistant/device/fleet_linus/config");
    check_golden("discovery-linus", &doc);
    let (topic, doc) = torvalds();
    assert_eq!(topic, "homeassistant/device/fleet_torvalds/config");
    check_golden("discovery-torvalds", &doc);
    let (topic, doc) = bridge();
    assert_eq!(topic, "homeassistant/device/fleet__bridge/config");
    check_golden("discovery-bridge", &doc);
}

/// What Home Assistant sends on a component's command topic: its values through the
/// component's command template, of which only the one form the documents use is known.
fn payloads_home_assistant_sends(component: &Value) -> Vec<String> {
    let values = values_home_assistant_sends(component);
    match component.get("command_template").and_then(Value::as_str) {
        None => values,
        Some("{{ value | int }}%") => values
            .iter()
            .map(|v| format!("{}%", v.parse::<f64>().unwrap() as i64))
            .collect(),
        Some(other) => panic!("no rendering for the command template {other:?}"),
    }
}

fn values_home_assistant_sends(component: &Value) -> Vec<String> {
    let text = |key: &str, default: &str| {
        component
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_owned()
    };
    match component["platform"].as_str().unwrap() {
        "button" => vec![text("payload_press", "PRESS")],
        "switch" | "light" => vec![text("payload_on", "ON"), text("payload_off", "OFF")],
        // Home Assistant sends whole numbers without a fraction, others as floats.
        "number" => {
            let (min, max) = (
                component["min"].as_f64().unwrap(),
                component["max"].as_f64().unwrap(),
            );
            vec![
                format!("{min}"),
                format!("{max}"),
                format!("{:.1}", (min + max) / 2.0),
            ]
        }
        "select" => component["options"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_str().unwrap().to_owned())
            .collect(),
        other => panic!("{other} has a command topic"),
    }
}

#[test]
fn every_component_is_complete_and_routed() {
    let topics = Topics::default();
    for (robot, (_, doc)) in [("linus", linus()), ("torvalds", torvalds())] {
        assert_eq!(doc["device"]["identifiers"][0], format!("fleet_{robot}"));
        assert_eq!(doc["device"]["configuration_url"], GATEWAY);
        assert_eq!(doc["origin"]["name"], "fleet robot-node");
        assert_eq!(doc["device"]["via_device"], "fleet__bridge");
        let name = doc["device"]["name"].as_str().unwrap();
        assert!(
            name.starts_with(char::is_uppercase),
            "{name} is capitalised"
        );
        let components = doc["components"].as_object().unwrap();
        let mut unique_ids = HashSet::new();
        let mut platforms = HashSet::new();
        for (key, component) in components {
            let unique_id = component["unique_id"].as_str().unwrap();
            assert_eq!(key, unique_id);
            assert!(
                unique_id.starts_with(&format!("fleet_{robot}_")),
                "{unique_id}"
            );
            assert!(unique_ids.insert(unique_id.to_owned()), "{unique_id} twice");
            assert!(component["name"].is_string(), "{unique_id} has a name");
            // Home Assistant reads `qos` per component only (the device's is ignored).
            assert_eq!(component["qos"], 1, "{unique_id} is at QoS 1");
            platforms.insert(component["platform"].as_str().unwrap().to_owned());

            // Unavailable while the robot is offline, except when it was last seen.
            let availability = component.get("availability_topic");
            if unique_id.ends_with("_last_seen") {
                assert!(availability.is_none(), "{unique_id}");
            } else {
                assert_eq!(
                    availability.and_then(Value::as_str),
                    Some(format!("fleet/{robot}/status").as_str()),
                    "{unique_id}"
                );
                assert_eq!(component["payload_available"], "online");
                assert_eq!(component["payload_not_available"], "offline");
            }
            // Every state topic is one the node publishes: its retained state.
            if let Some(state_topic) = component.get("state_topic") {
                assert_eq!(state_topic, &format!("fleet/{robot}/state"), "{unique_id}");
                let template = component
                    .get("value_template")
                    .or(component.get("state_value_template"));
                assert!(template.is_some_and(Value::is_string), "{unique_id}");
            }
            // Every command topic is routed by the node, and every payload Home
            // Assistant sends there is a valid command, with no template.
            let Some(command_topic) = component.get("command_topic") else {
                assert!(
                    ["sensor", "binary_sensor"].contains(&component["platform"].as_str().unwrap())
                );
                continue;
            };
            let (target, address) = topics
                .parse_command(command_topic.as_str().unwrap())
                .unwrap_or_else(|e| panic!("{unique_id}: {e}"));
            assert_eq!(target, CommandTarget::Robot(RobotId::new(robot).unwrap()));
            for payload in payloads_home_assistant_sends(component) {
                CommandEnvelope::parse_at(address, payload.as_bytes())
                    .unwrap_or_else(|e| panic!("{unique_id} payload {payload:?}: {e}"));
            }
        }
        let expected: &[&str] = if robot == "linus" {
            &[
                "button",
                "light",
                "number",
                "select",
                "sensor",
                "binary_sensor",
            ]
        } else {
            // torvalds has no speed control and no servos.
            &["button", "light", "sensor", "binary_sensor"]
        };
        assert_eq!(
            platforms,
            expected
                .iter()
                .map(|p| p.to_string())
                .collect::<HashSet<_>>(),
            "{robot}"
        );
    }
}

/// The top-level fields a template reads (`value_json.<field>`).
fn fields_read(template: &str) -> impl Iterator<Item = String> + '_ {
    template.split("value_json.").skip(1).map(|part| {
        part.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    })
}

#[test]
fn value_templates_read_fields_the_state_document_has() {
    // A state document as the node publishes it (see the state module's own tests).
    let state = serde_json::json!({
        "robot": "linus", "motion": "forward",
        "motors": [{"direction": "forward", "speed": 5}, {"direction": "forward", "speed": 5}],
        "eyes": "on", "servos": [0, -90],
        "last_command": {"id": "c1", "command": "drive", "status": "ok"},
        "uptime_s": 5, "last_seen_ms": 1
    });
    let (_, doc) = linus();
    let templates = doc["components"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|component| {
            [
                "value_template",
                "state_value_template",
                "json_attributes_template",
            ]
            .map(|key| (component, component.get(key).and_then(Value::as_str)))
        });
    for (component, template) in templates {
        let Some(template) = template else {
            continue;
        };
        // Every `value_json.<field>` the template reads exists in the state document.
        for field in fields_read(template) {
            assert!(
                state.get(&field).is_some(),
                "{} reads {field}",
                component["unique_id"]
            );
        }
    }
}

#[test]
fn the_bridge_holds_the_e_stop_and_stays_pressable() {
    let (_, doc) = bridge();
    let topics = Topics::default();
    assert_eq!(doc["device"]["identifiers"][0], "fleet__bridge");
    assert_eq!(doc["device"]["name"], "Fleet");
    assert_eq!(doc["device"]["configuration_url"], GATEWAY);
    let components = doc["components"].as_object().unwrap();
    let stop = &components["fleet__bridge_stop_all"];
    let (target, address) = topics
        .parse_command(stop["command_topic"].as_str().unwrap())
        .unwrap();
    assert_eq!(target, CommandTarget::All);
    CommandEnvelope::parse_at(address, b"PRESS").unwrap();
    assert_eq!(stop["qos"], 1);
    // Never greyed out: the e-stop goes to the robots, not through the gateway.
    assert!(stop.get("availability_topic").is_none());
    for (key, component) in components {
        assert_eq!(component["qos"], 1, "{key}");
        if let Some(state_topic) = component.get("state_topic") {
            let expected = [
                topics.gateway_status(),
                topics.gateway_state(),
                topics.estop(),
            ];
            assert!(expected.iter().any(|t| t == state_topic), "{key}");
        }
        let summary = component.get("state_topic") == Some(&topics.gateway_state().into());
        assert_eq!(
            component.get("availability_topic").is_some(),
            summary,
            "{key}: only the gateway's summary goes unavailable with the gateway"
        );
    }
    // The latch buttons publish retained latch documents the nodes read as meant.
    for (key, engaged) in [("latch", true), ("release", false)] {
        let button = &components[&format!("fleet__bridge_{key}")];
        assert_eq!(button["command_topic"], "fleet/estop");
        assert_eq!(button["retain"], true, "{key}: the latch is retained");
        let payload = button["payload_press"].as_str().unwrap();
        let (latch, problem) = fleet_protocol::EstopLatch::read(payload.as_bytes());
        assert_eq!((latch.engaged, problem), (engaged, None), "{key}");
        assert!(button.get("availability_topic").is_none(), "{key}");
    }
    // The summary fields the templates read are those the gateway publishes.
    let summary = serde_json::to_value(fleet_protocol::FleetSummary {
        robots: 2,
        online: 1,
        moving: 0,
        online_robots: vec!["linus".into()],
        offline_robots: vec!["torvalds".into()],
    })
    .unwrap();
    let summary_topic = topics.gateway_state();
    for component in components
        .values()
        .filter(|c| c["state_topic"] == summary_topic.as_str())
    {
        for key in ["value_template", "json_attributes_template"] {
            let Some(template) = component.get(key).and_then(Value::as_str) else {
                continue;
            };
            for field in fields_read(template) {
                assert!(summary.get(&field).is_some(), "{template} reads {field}");
            }
        }
    }
}
