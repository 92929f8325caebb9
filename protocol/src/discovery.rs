//! Home Assistant MQTT discovery: one device document per robot, published retained on
//! `<discovery prefix>/device/<object id>/config` (device-based discovery, Home Assistant
//! 2024.11 and later). An empty retained payload on the same topic removes the device.
//!
//! Every command topic in the document is one the node answers to, and every payload Home
//! Assistant sends on it (`PRESS`, `ON`/`OFF`, a bare number, an option) is a valid command
//! payload, so nothing needs a command template. State is read from the robot's retained
//! state document with value templates; availability is the robot's status topic.

use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value, json};

use crate::command::{
    Channel, CommandAddress, CommandKind, Direction, MAX_SERVO_ANGLE, MAX_SPEED, MIN_SERVO_ANGLE,
};
use crate::state::{Availability, EstopLatch};
use crate::topic::{RobotId, TopicError, Topics, checked_prefix};

/// Home Assistant's default discovery prefix.
pub const DEFAULT_DISCOVERY_PREFIX: &str = "homeassistant";

/// The speed presets offered by the select entity; each is a valid `cmd/speed` payload.
pub const SPEED_PRESETS: [(&str, u8); 3] = [("30%", 3), ("50%", 5), ("100%", MAX_SPEED)];

/// The topic prefix Home Assistant watches for discovery documents (default
/// `homeassistant`). Its `status` topic carries Home Assistant's birth message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryPrefix(String);

impl DiscoveryPrefix {
    pub fn new(prefix: impl Into<String>) -> Result<Self, TopicError> {
        checked_prefix(prefix.into()).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `<prefix>/status`: Home Assistant publishes `online` there when it starts.
    pub fn status_topic(&self) -> String {
        format!("{}/status", self.0)
    }

    /// Whether `topic` is [`DiscoveryPrefix::status_topic`], without building it.
    pub fn is_status_topic(&self, topic: &str) -> bool {
        topic.strip_prefix(self.0.as_str()) == Some("/status")
    }
}

impl Default for DiscoveryPrefix {
    fn default() -> Self {
        Self(DEFAULT_DISCOVERY_PREFIX.to_owned())
    }
}

impl FromStr for DiscoveryPrefix {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for DiscoveryPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a robot's hardware can do; it decides which entities it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// PWM enable pins: per-motor speed numbers and the speed preset select.
    pub speed_control: bool,
    /// Number of servos (0..=2): one angle number each.
    pub servos: usize,
}

/// A robot's Home Assistant object id: `<topic prefix>_<robot>`, with characters Home
/// Assistant does not allow in object ids replaced by `_`, so two fleets with different
/// topic prefixes do not collide. The broker's ACL lets a robot publish discovery under
/// this id only.
pub fn object_id(topics: &Topics, robot: &str) -> String {
    let prefix: String = topics
        .prefix()
        .as_str()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{prefix}_{robot}")
}

/// The object id of the fleet's own device (the bridge, published by the gateway):
/// `<topic prefix>__bridge`. No robot's object id can be it, because robot ids may not
/// start with `_`.
pub fn bridge_object_id(topics: &Topics) -> String {
    object_id(topics, "_bridge")
}

/// `my robot` → `My robot`: Home Assistant shows device names as written.
fn display_name(id: &str) -> String {
    let mut chars = id.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Which topic decides whether Home Assistant shows a component as available.
#[derive(Clone, Copy)]
enum ComponentAvailability {
    /// The publisher's status topic (`online`/`offline`).
    Publisher,
    /// Always available while Home Assistant is connected to the broker: the e-stop (it
    /// goes to the robots, not through the gateway) and what stays meaningful while the
    /// publisher is gone (last seen, the gateway's own connectivity).
    Always,
}

/// A discovery document's components, keyed by `unique_id`.
struct Components<'a> {
    object_id: &'a str,
    availability_topic: &'a str,
    map: Map<String, Value>,
}

impl Components<'_> {
    fn add(
        &mut self,
        key: &str,
        platform: &str,
        name: &str,
        availability: ComponentAvailability,
        mut config: Value,
    ) {
        let unique_id = format!("{}_{key}", self.object_id);
        if let Some(map) = config.as_object_mut() {
            map.insert("platform".into(), platform.into());
            map.insert("name".into(), name.into());
            map.insert("unique_id".into(), unique_id.clone().into());
            // On every component: Home Assistant takes `qos` from the component, not from
            // the device document, and sent every command (the stops too) at QoS 0 while
            // it was only there.
            map.insert("qos".into(), 1.into());
            // Per component too, so that some can stay available without it.
            if let ComponentAvailability::Publisher = availability {
                map.insert("availability_topic".into(), self.availability_topic.into());
                map.insert(
                    "payload_available".into(),
                    Availability::Online.as_str().into(),
                );
                map.insert(
                    "payload_not_available".into(),
                    Availability::Offline.as_str().into(),
                );
            }
        }
        self.map.insert(unique_id, config);
    }
}

/// Shows the last command's whole record (id, command, status, time, and the error code
/// and reason of a refusal) as a component's attributes.
const LAST_COMMAND_ATTRIBUTES: &str =
    "{{ value_json.last_command | tojson if value_json.last_command else '{}' }}";

/// One robot's discovery document and where it goes.
#[derive(Debug, Clone)]
pub struct DiscoveryDevice<'a> {
    pub topics: &'a Topics,
    pub prefix: &'a DiscoveryPrefix,
    pub robot: &'a RobotId,
    pub capabilities: Capabilities,
    /// The node's version, shown as the device's firmware.
    pub sw_version: &'a str,
    /// The gateway's web UI, linked from the device page ("Visit").
    pub configuration_url: Option<&'a str>,
}

impl DiscoveryDevice<'_> {
    /// Identifies the device and prefixes every `unique_id`: see [`object_id`].
    pub fn object_id(&self) -> String {
        object_id(self.topics, self.robot.as_str())
    }

    /// `<discovery prefix>/device/<object id>/config` (retained).
    pub fn config_topic(&self) -> String {
        format!("{}/device/{}/config", self.prefix, self.object_id())
    }

    /// The device discovery document.
    pub fn document(&self) -> Value {
        let object_id = self.object_id();
        let state_topic = self.topics.state(self.robot);
        let status_topic = self.topics.status(self.robot);
        let mut components = Components {
            object_id: &object_id,
            availability_topic: &status_topic,
            map: Map::new(),
        };
        let robot_availability = ComponentAvailability::Publisher;

        let drive_topic = self.topics.command(self.robot, CommandKind::Drive);
        for (direction, name, icon) in [
            (Direction::Forward, "Forward", "mdi:arrow-up-bold"),
            (Direction::Backward, "Backward", "mdi:arrow-down-bold"),
            (Direction::Left, "Left", "mdi:arrow-left-bold"),
            (Direction::Right, "Right", "mdi:arrow-right-bold"),
            (Direction::Stop, "Stop", "mdi:stop"),
        ] {
            components.add(
                direction.as_str(),
                "button",
                name,
                robot_availability,
                json!({
                    "command_topic": drive_topic,
                    "payload_press": direction.as_str(),
                    "icon": icon,
                }),
            );
        }
        let eyes_topic = self.topics.command(self.robot, CommandKind::Eyes);
        components.add(
            "identify",
            "button",
            "Identify",
            robot_availability,
            json!({
                "command_topic": eyes_topic,
                "payload_press": "blink",
                "device_class": "identify",
                "entity_category": "config",
            }),
        );
        components.add(
            "eyes",
            "light",
            "Eyes",
            robot_availability,
            json!({
                "command_topic": eyes_topic,
                "payload_on": "ON",
                "payload_off": "OFF",
                "state_topic": state_topic,
                "state_value_template": "{{ 'ON' if value_json.eyes == 'on' else 'OFF' }}",
                "icon": "mdi:eye",
            }),
        );
        for index in 0..self.capabilities.servos.min(crate::command::SERVOS) {
            let channel = Channel::Servo(index);
            components.add(
                channel.as_str(),
                "number",
                &format!("Servo {}", index + 1),
                robot_availability,
                json!({
                    "command_topic": self.topics.command_at(self.robot, CommandAddress::Channel(channel)),
                    "state_topic": state_topic,
                    "value_template": format!("{{{{ value_json.servos[{index}] }}}}"),
                    "min": MIN_SERVO_ANGLE,
                    "max": MAX_SERVO_ANGLE,
                    "step": 1,
                    "mode": "slider",
                    "unit_of_measurement": "°",
                    "icon": "mdi:rotate-3d-variant",
                }),
            );
        }
        if self.capabilities.speed_control {
            for index in 0..crate::command::MOTORS {
                let channel = Channel::Motor(index);
                // In percent, as Home Assistant shows speeds; a motor's command topic
                // takes `70%` as speed 7.
                components.add(
                    &format!("{}_speed", channel.as_str()),
                    "number",
                    &format!("Motor {} speed", index + 1),
                    robot_availability,
                    json!({
                        "command_topic": self.topics.command_at(self.robot, CommandAddress::Channel(channel)),
                        "command_template": "{{ value | int }}%",
                        "state_topic": state_topic,
                        "value_template": format!("{{{{ value_json.motors[{index}].speed * {PERCENT_PER_SPEED_STEP} }}}}"),
                        "min": 0,
                        "max": u32::from(MAX_SPEED) * PERCENT_PER_SPEED_STEP,
                        "step": PERCENT_PER_SPEED_STEP,
                        "mode": "slider",
                        "unit_of_measurement": "%",
                        "icon": "mdi:speedometer",
                    }),
                );
            }
            // Shows the preset both motors are at, or nothing ("None") between presets.
            let cases: String = SPEED_PRESETS
                .iter()
                .map(|(label, speed)| format!("{{% elif s == {speed} %}}{label}"))
                .collect();
            components.add(
                "speed_preset",
                "select",
                "Speed preset",
                robot_availability,
                json!({
                    "command_topic": self.topics.command(self.robot, CommandKind::Speed),
                    "state_topic": state_topic,
                    "value_template": format!(
                        "{{% set s = value_json.motors[0].speed %}}{{% if value_json.motors[1].speed != s %}}None{cases}{{% else %}}None{{% endif %}}"
                    ),
                    "options": SPEED_PRESETS.iter().map(|(label, _)| *label).collect::<Vec<_>>(),
                    "icon": "mdi:speedometer-medium",
                }),
            );
        }
        components.add(
            "moving",
            "binary_sensor",
            "Moving",
            robot_availability,
            json!({
                "state_topic": state_topic,
                "value_template": "{{ 'OFF' if value_json.motion == 'stop' else 'ON' }}",
                "device_class": "moving",
            }),
        );
        components.add(
            "last_command",
            "sensor",
            "Last command",
            robot_availability,
            json!({
                "state_topic": state_topic,
                "value_template": "{{ value_json.last_command.command if value_json.last_command else 'none' }}",
                "json_attributes_topic": state_topic,
                "json_attributes_template": LAST_COMMAND_ATTRIBUTES,
                "entity_category": "diagnostic",
                "icon": "mdi:console-line",
            }),
        );
        components.add(
            "last_result",
            "sensor",
            "Last command result",
            robot_availability,
            json!({
                "state_topic": state_topic,
                "value_template": "{{ value_json.last_command.status if value_json.last_command else 'none' }}",
                "json_attributes_topic": state_topic,
                "json_attributes_template": LAST_COMMAND_ATTRIBUTES,
                "entity_category": "diagnostic",
                "icon": "mdi:check-circle-outline",
            }),
        );
        components.add(
            "uptime",
            "sensor",
            "Uptime",
            robot_availability,
            json!({
                "state_topic": state_topic,
                "value_template": "{{ value_json.uptime_s }}",
                "device_class": "duration",
                "unit_of_measurement": "s",
                "entity_category": "diagnostic",
            }),
        );
        // Stays available while the robot is offline: when it was last heard of is what
        // matters then. The node republishes its state every heartbeat.
        components.add(
            "last_seen",
            "sensor",
            "Last seen",
            ComponentAvailability::Always,
            json!({
                "state_topic": state_topic,
                "value_template": "{{ (value_json.last_seen_ms / 1000) | timestamp_custom('%Y-%m-%dT%H:%M:%S+00:00', false) }}",
                "device_class": "timestamp",
                "entity_category": "diagnostic",
                "icon": "mdi:clock-check-outline",
            }),
        );

        let mut device = json!({
            "identifiers": [object_id],
            "name": display_name(self.robot.as_str()),
            "manufacturer": "fleet",
            "model": self.model(),
            "sw_version": self.sw_version,
            // Listed under the fleet's device, which holds the e-stop.
            "via_device": bridge_object_id(self.topics),
        });
        if let (Some(url), Some(map)) = (self.configuration_url, device.as_object_mut()) {
            map.insert("configuration_url".into(), url.into());
        }
        json!({
            "device": device,
            "origin": {
                "name": "fleet robot-node",
                "sw_version": self.sw_version,
            },
            "qos": 1,
            "components": components.map,
        })
    }

    fn model(&self) -> String {
        let Capabilities {
            speed_control,
            servos,
        } = self.capabilities;
        let speed = if speed_control {
            "speed control"
        } else {
            "on/off motors"
        };
        match servos {
            0 => format!("Raspberry Pi robot (2 motors, {speed}, eye LED)"),
            1 => format!("Raspberry Pi robot (2 motors, {speed}, eye LED, 1 servo)"),
            n => format!("Raspberry Pi robot (2 motors, {speed}, eye LED, {n} servos)"),
        }
    }
}

/// A speed step (0..=10) in percent of full speed.
const PERCENT_PER_SPEED_STEP: u32 = 10;

/// The fleet's own device ("bridge", as Zigbee2MQTT calls its own), published by the
/// gateway: the fleet-wide e-stop, the gateway's connectivity and the fleet summary.
/// Every robot's device names it as its `via_device`.
#[derive(Debug, Clone)]
pub struct BridgeDevice<'a> {
    pub topics: &'a Topics,
    pub prefix: &'a DiscoveryPrefix,
    /// The gateway's version.
    pub sw_version: &'a str,
    /// The gateway's web UI, as other machines reach it.
    pub configuration_url: Option<&'a str>,
}

impl BridgeDevice<'_> {
    pub fn object_id(&self) -> String {
        bridge_object_id(self.topics)
    }

    /// `<discovery prefix>/device/<prefix>__bridge/config` (retained).
    pub fn config_topic(&self) -> String {
        format!("{}/device/{}/config", self.prefix, self.object_id())
    }

    pub fn document(&self) -> Value {
        let object_id = self.object_id();
        let status_topic = self.topics.gateway_status();
        let summary_topic = self.topics.gateway_state();
        let mut components = Components {
            object_id: &object_id,
            availability_topic: &status_topic,
            map: Map::new(),
        };
        // Straight to every robot's stop topic: pressable whether or not a gateway is up.
        components.add(
            "stop_all",
            "button",
            "Stop all robots",
            ComponentAvailability::Always,
            json!({
                "command_topic": self.topics.fleet_command(CommandKind::Stop),
                "payload_press": "PRESS",
                "icon": "mdi:alert-octagon",
            }),
        );
        // The latch: straight to the broker too, retained, as every node reads it.
        let latch_topic = self.topics.estop();
        for (key, name, engaged, icon) in [
            ("latch", "Latch e-stop", true, "mdi:lock-alert"),
            ("release", "Release e-stop", false, "mdi:lock-open-variant"),
        ] {
            let payload = EstopLatch {
                engaged,
                by: Some("Home Assistant".to_owned()),
                reason: None,
                at_ms: None,
            };
            components.add(
                key,
                "button",
                name,
                ComponentAvailability::Always,
                json!({
                    "command_topic": latch_topic,
                    "payload_press": serde_json::to_string(&payload).unwrap_or_default(),
                    "retain": true,
                    "icon": icon,
                }),
            );
        }
        // On unless the latch says engaged: false or is gone (empty), as the nodes read it.
        components.add(
            "latched",
            "binary_sensor",
            "E-stop latched",
            ComponentAvailability::Always,
            json!({
                "state_topic": latch_topic,
                "value_template": "{{ 'OFF' if value == '' or (value_json is defined and value_json.engaged == false) else 'ON' }}",
                "json_attributes_topic": latch_topic,
                "json_attributes_template": "{{ value_json | tojson if value_json is defined and value_json is mapping else '{}' }}",
                "icon": "mdi:octagon",
            }),
        );
        components.add(
            "gateway",
            "binary_sensor",
            "Gateway",
            ComponentAvailability::Always,
            json!({
                "state_topic": status_topic,
                "payload_on": Availability::Online.as_str(),
                "payload_off": Availability::Offline.as_str(),
                "device_class": "connectivity",
                "entity_category": "diagnostic",
            }),
        );
        for (key, name, field, icon) in [
            ("robots_online", "Robots online", "online", "mdi:robot"),
            (
                "robots_moving",
                "Robots moving",
                "moving",
                "mdi:robot-excited",
            ),
            ("robots", "Robots", "robots", "mdi:robot-outline"),
        ] {
            components.add(
                key,
                "sensor",
                name,
                ComponentAvailability::Publisher,
                json!({
                    "state_topic": summary_topic,
                    "value_template": format!("{{{{ value_json.{field} }}}}"),
                    "json_attributes_topic": summary_topic,
                    "json_attributes_template": "{{ {'online': value_json.online_robots, 'offline': value_json.offline_robots} | tojson }}",
                    "state_class": "measurement",
                    "icon": icon,
                }),
            );
        }
        let prefix = self.topics.prefix().as_str();
        let name = if prefix == crate::topic::DEFAULT_PREFIX {
            "Fleet".to_owned()
        } else {
            format!("Fleet {prefix}")
        };
        let mut device = json!({
            "identifiers": [object_id],
            "name": name,
            "manufacturer": "fleet",
            "model": "Robot fleet (gateway)",
            "sw_version": self.sw_version,
        });
        if let (Some(url), Some(map)) = (self.configuration_url, device.as_object_mut()) {
            map.insert("configuration_url".into(), url.into());
        }
        json!({
            "device": device,
            "origin": {
                "name": "fleet gateway",
                "sw_version": self.sw_version,
            },
            "qos": 1,
            "components": components.map,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::TopicPrefix;

    #[test]
    fn prefixes_are_validated() {
        assert_eq!(DiscoveryPrefix::default().as_str(), "homeassistant");
        assert_eq!(
            DiscoveryPrefix::new("ha/test").unwrap().status_topic(),
            "ha/test/status"
        );
        for bad in ["", "/ha", "ha/", "ha/+", "#", "a\0"] {
            assert!(DiscoveryPrefix::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn object_ids_keep_fleets_apart() {
        let robot = RobotId::new("linus").unwrap();
        let prefix = DiscoveryPrefix::default();
        let topics = Topics::new(TopicPrefix::new("site/a").unwrap());
        let device = DiscoveryDevice {
            topics: &topics,
            prefix: &prefix,
            robot: &robot,
            capabilities: Capabilities {
                speed_control: false,
                servos: 0,
            },
            sw_version: "1.0.0",
            configuration_url: None,
        };
        assert_eq!(device.object_id(), "site_a_linus");
        assert_eq!(
            device.config_topic(),
            "homeassistant/device/site_a_linus/config"
        );
        let doc = device.document();
        assert!(doc["device"].get("configuration_url").is_none());
        assert_eq!(
            doc["components"]["site_a_linus_forward"]["availability_topic"],
            "site/a/linus/status"
        );
        assert_eq!(doc["device"]["via_device"], "site_a__bridge");
        assert_eq!(doc["device"]["name"], "Linus");
        assert_eq!(display_name("écluse-2"), "Écluse-2");
        assert_eq!(bridge_object_id(&topics), "site_a__bridge");
    }

    #[test]
    fn the_preset_template_names_each_preset() {
        let robot = RobotId::new("linus").unwrap();
        let (topics, prefix) = (Topics::default(), DiscoveryPrefix::default());
        let device = DiscoveryDevice {
            topics: &topics,
            prefix: &prefix,
            robot: &robot,
            capabilities: Capabilities {
                speed_control: true,
                servos: 2,
            },
            sw_version: "1.0.0",
            configuration_url: Some("http://gateway:8080/"),
        };
        let doc = device.document();
        let template = doc["components"]["fleet_linus_speed_preset"]["value_template"]
            .as_str()
            .unwrap();
        assert!(
            template.contains(
                "!= s %}None{% elif s == 3 %}30%{% elif s == 5 %}50%{% elif s == 10 %}100%"
            )
        );
        assert!(template.ends_with("{% else %}None{% endif %}"));
    }
}
