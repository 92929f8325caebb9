//! What a robot is made of (its pins) and how the node behaves. Pin maps are data, not
//! code: the two robots of the original system ship as presets.

use std::time::Duration;

use fleet_protocol::{Capabilities, Direction, DiscoveryPrefix, RobotId, Topics};
use serde::Deserialize;

/// Levels of the four H-bridge inputs, in the order of `RobotConfig::motor_inputs`.
pub type InputPattern = [bool; 4];

/// The input pattern for each direction. Robots are wired differently, so the same
/// direction can mean different pins (torvalds' forward is linus's left pattern).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrivePatterns {
    pub forward: InputPattern,
    pub backward: InputPattern,
    pub left: InputPattern,
    pub right: InputPattern,
}

impl DrivePatterns {
    pub fn for_direction(&self, direction: Direction) -> InputPattern {
        match direction {
            Direction::Forward => self.forward,
            Direction::Backward => self.backward,
            Direction::Left => self.left,
            Direction::Right => self.right,
            Direction::Stop => [false; 4],
        }
    }
}

/// One robot's hardware: GPIO numbers (BCM) and drive patterns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RobotConfig {
    pub id: RobotId,
    /// The four H-bridge inputs: motor 1 is inputs 0 and 1, motor 2 is inputs 2 and 3.
    pub motor_inputs: [u8; 4],
    /// PWM enable pins that set each motor's speed; `None` when the robot has no speed
    /// control (speed commands then answer "not supported").
    pub motor_enables: Option<[u8; 2]>,
    pub eye: u8,
    /// Servo pins (at most two).
    pub servos: Vec<u8>,
    pub patterns: DrivePatterns,
}

/// The example configs shipped with the node, compiled in so the all-in-one binary and
/// the simulator need no files.
const LINUS_TOML: &str = include_str!("../config/linus.toml");
const TORVALDS_TOML: &str = include_str!("../config/torvalds.toml");

impl RobotConfig {
    /// linus, from `config/linus.toml`.
    pub fn linus() -> Self {
        builtin(LINUS_TOML)
    }

    /// torvalds, from `config/torvalds.toml`.
    pub fn torvalds() -> Self {
        builtin(TORVALDS_TOML)
    }

    /// The built-in config of that name, or linus's layout under another name (for
    /// simulated robots that only need to exist).
    pub fn preset_or_default(id: RobotId) -> Self {
        match id.as_str() {
            "torvalds" => Self::torvalds(),
            _ => Self {
                id,
                ..Self::linus()
            },
        }
    }

    /// What the hardware can do, for the Home Assistant entities it gets.
    pub fn capabilities(&self) -> Capabilities {
        Capabilities {
            speed_control: self.motor_enables.is_some(),
            servos: self.servos.len(),
        }
    }

    /// Every pin the robot uses (for claiming them from the GPIO driver).
    pub fn pins(&self) -> Vec<u8> {
        let mut pins = self.motor_inputs.to_vec();
        pins.extend(self.motor_enables.into_iter().flatten());
        pins.push(self.eye);
        pins.extend(&self.servos);
        pins
    }
}

fn builtin(toml: &str) -> RobotConfig {
    match ConfigFile::parse(toml) {
        Ok(file) => file.robot,
        // The files are compiled in and parsed by the tests, so this cannot happen.
        Err(e) => unreachable!("built-in robot config is invalid: {e}"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Syntax(String),
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// A node config file: the robot's hardware, and optional node settings.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub robot: RobotConfig,
    pub node: NodeSettings,
}

/// Node settings a config file may give; flags and environment variables win.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    pub broker: Option<String>,
    pub driver: Option<String>,
    pub topic_prefix: Option<String>,
    pub client_id: Option<String>,
    pub hold_ms: Option<u64>,
    pub max_hold_ms: Option<u64>,
    pub blink_ms: Option<u64>,
    pub keep_alive_s: Option<u64>,
    pub heartbeat_s: Option<u64>,
    pub fleet_reply_spread_ms: Option<u64>,
    pub metrics_addr: Option<String>,
    pub discovery: Option<bool>,
    pub discovery_prefix: Option<String>,
    pub gateway_url: Option<String>,
    pub tls_ca: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    robot: RawRobot,
    #[serde(default)]
    node: NodeSettings,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRobot {
    id: String,
    motor_inputs: [u8; 4],
    motor_enables: Option<[u8; 2]>,
    eye: u8,
    #[serde(default)]
    servos: Vec<u8>,
    patterns: RawPatterns,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPatterns {
    forward: String,
    backward: String,
    left: String,
    right: String,
}

/// Highest BCM GPIO number on a Raspberry Pi header.
const MAX_GPIO: u8 = 27;

impl ConfigFile {
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        let invalid = |m: String| ConfigError::Invalid(m);
        let id = RobotId::new(raw.robot.id).map_err(|e| invalid(e.to_string()))?;
        let pattern = |name: &str, text: &str| -> Result<InputPattern, ConfigError> {
            let bits: Vec<bool> = text
                .chars()
                .filter_map(|c| match c {
                    '0' => Some(false),
                    '1' => Some(true),
                    _ => None,
                })
                .collect();
            match <[bool; 4]>::try_from(bits) {
                Ok(bits) if text.len() == 4 => Ok(bits),
                _ => Err(invalid(format!(
                    "pattern {name} = {text:?} must be four of 0 and 1, e.g. \"1010\""
                ))),
            }
        };
        let patterns = DrivePatterns {
            forward: pattern("forward", &raw.robot.patterns.forward)?,
            backward: pattern("backward", &raw.robot.patterns.backward)?,
            left: pattern("left", &raw.robot.patterns.left)?,
            right: pattern("right", &raw.robot.patterns.right)?,
        };
        let robot = RobotConfig {
            id,
            motor_inputs: raw.robot.motor_inputs,
            motor_enables: raw.robot.motor_enables,
            eye: raw.robot.eye,
            servos: raw.robot.servos,
            patterns,
        };
        if robot.servos.len() > fleet_protocol::command::SERVOS {
            return Err(invalid(format!(
                "at most {} servos",
                fleet_protocol::command::SERVOS
            )));
        }
        let mut pins = robot.pins();
        if let Some(pin) = pins.iter().find(|p| **p > MAX_GPIO) {
            return Err(invalid(format!(
                "GPIO{pin} does not exist (0..={MAX_GPIO})"
            )));
        }
        pins.sort_unstable();
        if let Some(pair) = pins.windows(2).find(|w| w[0] == w[1]) {
            return Err(invalid(format!("GPIO{} is used twice", pair[0])));
        }
        Ok(Self {
            robot,
            node: raw.node,
        })
    }
}

/// Where the broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
}

/// Home Assistant MQTT discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoverySettings {
    /// Publish the discovery document (on every connect and when Home Assistant starts).
    /// When off, nothing is published, but `decommission` still clears the topic.
    pub enabled: bool,
    pub prefix: DiscoveryPrefix,
    /// The gateway's web UI, linked from the Home Assistant device page.
    pub configuration_url: Option<String>,
    /// Longest random wait before re-publishing after Home Assistant's birth message, so
    /// that a large fleet does not answer all at once.
    pub birth_delay_max: Duration,
}

impl Default for DiscoverySettings {
    fn default() -> Self {
        Self {
            enabled: true,
            prefix: DiscoveryPrefix::default(),
            configuration_url: None,
            birth_delay_max: Duration::from_secs(3),
        }
    }
}

/// How one node runs one robot.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub broker: BrokerAddress,
    pub topics: Topics,
    pub robot: RobotConfig,
    /// MQTT client id; `robot-<id>` by default.
    pub client_id: String,
    /// How long a drive command keeps the motors on without a refresh (dead-man).
    pub default_hold: Duration,
    /// The longest hold a drive command may ask for.
    pub max_hold: Duration,
    /// How long `eyes blink` keeps the eye on.
    pub blink: Duration,
    /// MQTT keep-alive: how fast the broker notices the node is gone.
    pub keep_alive: Duration,
    /// How long the broker keeps the node's session (subscriptions and queued QoS 1
    /// commands) while it is away.
    pub session_expiry: Duration,
    /// How often the node republishes its state (with `last_seen_ms`) while idle.
    pub heartbeat: Duration,
    /// The result and state after a fleet-wide command (`<prefix>/all/cmd/...`) are sent
    /// at a random moment within this window, so that thousands of robots answering an
    /// e-stop at once do not hold up the broker while it is still delivering the stop to
    /// the rest of the fleet. The command itself is carried out at once. Zero (the default)
    /// sends at once.
    pub fleet_reply_spread: Duration,
    /// MQTT username and password, when the broker wants them (the username is the
    /// robot id: the broker's ACL is templated by it).
    pub credentials: Option<(String, String)>,
    pub discovery: DiscoverySettings,
    /// Connect over TLS, trusting this CA; plain TCP when `None`.
    pub tls: Option<fleet_runtime::mqtt_tls::MqttTls>,
}

impl NodeConfig {
    pub fn new(robot: RobotConfig, broker: BrokerAddress) -> Self {
        Self {
            client_id: format!("robot-{}", robot.id),
            broker,
            topics: Topics::default(),
            robot,
            default_hold: Duration::from_millis(1000),
            max_hold: Duration::from_millis(5000),
            blink: Duration::from_millis(500),
            keep_alive: Duration::from_secs(5),
            session_expiry: Duration::from_secs(300),
            heartbeat: Duration::from_secs(30),
            fleet_reply_spread: Duration::ZERO,
            credentials: None,
            discovery: DiscoverySettings::default(),
            tls: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_configs_are_the_original_robots() {
        let linus = RobotConfig::linus();
        assert_eq!(linus.id.as_str(), "linus");
        assert_eq!(linus.motor_inputs, [13, 21, 17, 27]);
        assert_eq!(linus.motor_enables, Some([12, 26]));
        assert_eq!((linus.eye, linus.servos.as_slice()), (16, &[22, 23][..]));
        assert_eq!(linus.patterns.forward, [true, false, true, false]);
        let torvalds = RobotConfig::torvalds();
        assert_eq!(torvalds.motor_inputs, [7, 8, 9, 10]);
        assert_eq!((torvalds.motor_enables, torvalds.eye), (None, 25));
        assert!(torvalds.servos.is_empty());
        assert_eq!(torvalds.patterns.forward, [false, true, true, false]);
    }

    #[test]
    fn bad_files_get_clear_errors() {
        let base = |patch: &str| {
            format!(
                "[robot]\nid = \"r\"\nmotor_inputs = [1, 2, 3, 4]\neye = 5\n{patch}\n[robot.patterns]\nforward = \"1010\"\nbackward = \"0101\"\nleft = \"0110\"\nright = \"1001\"\n"
            )
        };
        assert!(ConfigFile::parse(&base("")).is_ok());
        for (patch, needle) in [
            ("servos = [5]", "used twice"),
            ("servos = [40]", "does not exist"),
            ("servos = [20, 21, 22]", "at most 2"),
            ("colour = \"red\"", "unknown field"),
        ] {
            let err = ConfigFile::parse(&base(patch)).unwrap_err().to_string();
            assert!(err.contains(needle), "{patch}: {err}");
        }
        let bad_pattern = base("").replace("\"1010\"", "\"10x0\"");
        assert!(
            ConfigFile::parse(&bad_pattern)
                .unwrap_err()
                .to_string()
                .contains("four of 0 and 1")
        );
        assert!(ConfigFile::parse("not toml [").is_err());
    }
}
