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
use crate::state::Availability;
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
        let mut components = Map::new();
        let mut add = |key: &str, platform: &str, name: &str, mut config: Value| {
            let unique_id = format!("{object_id}_{key}");
            if let Some(map) = config.as_object_mut() {
                map.insert("platform".into(), platform.into());
                map.insert("name".into(), name.into());
                map.insert("unique_id".into(), unique_id.clone().into());
                // On every component: Home Assistant takes `qos` from the component, not
                // from the device document, and sent every command (the stops too) at
                // QoS 0 while it was only there.
                map.insert("qos".into(), 1.into());
            }
            components.insert(unique_id, config);
        };

        let drive_topic = self.topics.command(self.robot, CommandKind::Drive);
        for (direction, name, icon) in [
            (Direction::Forward, "Forward", "mdi:arrow-up-bold"),
            (Direction::Backward, "Backward", "mdi:arrow-down-bold"),
            (Direction::Left, "Left", "mdi:arrow-left-bold"),
            (Direction::Right, "Right", "mdi:arrow-right-bold"),
            (Direction::Stop, "Stop", "mdi:stop"),
        ] {
            add(
                direction.as_str(),
                "button",
                name,
                json!({
                    "command_topic": drive_topic,
                    "payload_press": direction.as_str(),
                    "icon": icon,
                }),
            );
        }
        add(
            "stop_all",
            "button",
            "Stop all robots",
            json!({
                "command_topic": self.topics.fleet_command(CommandKind::Stop),
                "payload_press": "PRESS",
                "icon": "mdi:alert-octagon",
            }),
        );
        add(
            "eyes",
            "switch",
            "Eyes",
            json!({
                "command_topic": self.topics.command(self.robot, CommandKind::Eyes),
                "payload_on": "ON",
                "payload_off": "OFF",
                "state_topic": state_topic,
                "value_template": "{{ value_json.eyes }}",
                "state_on": "on",
                "state_off": "off",
                "icon": "mdi:eye",
            }),
        );
        for index in 0..self.capabilities.servos.min(crate::command::SERVOS) {
            let channel = Channel::Servo(index);
            add(
                channel.as_str(),
                "number",
                &format!("Servo {}", index + 1),
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
                add(
                    &format!("{}_speed", channel.as_str()),
                    "number",
                    &format!("Motor {} speed", index + 1),
                    json!({
                        "command_topic": self.topics.command_at(self.robot, CommandAddress::Channel(channel)),
                        "state_topic": state_topic,
                        "value_template": format!("{{{{ value_json.motors[{index}].speed }}}}"),
                        "min": 0,
                        "max": MAX_SPEED,
                        "step": 1,
                        "mode": "slider",
                        "icon": "mdi:speedometer",
                    }),
                );
            }
            // Shows the preset both motors are at, or nothing ("None") between presets.
            let cases: String = SPEED_PRESETS
                .iter()
                .map(|(label, speed)| format!("{{% elif s == {speed} %}}{label}"))
                .collect();
            add(
                "speed_preset",
                "select",
                "Speed preset",
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
        add(
            "moving",
            "binary_sensor",
            "Moving",
            json!({
                "state_topic": state_topic,
                "value_template": "{{ 'OFF' if value_json.motion == 'stop' else 'ON' }}",
                "device_class": "moving",
            }),
        );
        add(
            "last_command",
            "sensor",
            "Last command",
            json!({
                "state_topic": state_topic,
                "value_template": "{{ value_json.last_command.command if value_json.last_command else 'none' }}",
                "icon": "mdi:console-line",
            }),
        );
        add(
            "last_result",
            "sensor",
            "Last command result",
            json!({
                "state_topic": state_topic,
                "value_template": "{{ value_json.last_command.status if value_json.last_command else 'none' }}",
                "icon": "mdi:check-circle-outline",
            }),
        );
        add(
            "uptime",
            "sensor",
            "Uptime",
            json!({
                "state_topic": state_topic,
                "value_template": "{{ value_json.uptime_s }}",
                "device_class": "duration",
                "unit_of_measurement": "s",
                "entity_category": "diagnostic",
            }),
        );

        let mut device = json!({
            "identifiers": [object_id],
            "name": self.robot.as_str(),
            "manufacturer": "fleet",
            "model": self.model(),
            "sw_version": self.sw_version,
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
            // Shared by every component: the robot's last will decides availability.
            "availability_topic": self.topics.status(self.robot),
            "payload_available": Availability::Online.as_str(),
            "payload_not_available": Availability::Offline.as_str(),
            "qos": 1,
            "components": components,
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
        assert_eq!(doc["availability_topic"], "site/a/linus/status");
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
