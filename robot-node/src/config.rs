//! What a robot is made of (its pins) and how the node behaves. Pin maps are data, not
//! code: the two robots of the original system ship as presets.

use std::time::Duration;

use fleet_protocol::{Direction, RobotId, Topics};

/// Levels of the four H-bridge inputs, in the order of `RobotConfig::motor_inputs`.
pub type InputPattern = [bool; 4];

const fn pattern(bits: [u8; 4]) -> InputPattern {
    [bits[0] == 1, bits[1] == 1, bits[2] == 1, bits[3] == 1]
}

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

impl RobotConfig {
    /// linus: inputs GPIO13, 21, 17, 27; enables GPIO12, 26; eye GPIO16; servos GPIO22, 23.
    pub fn linus() -> Self {
        Self {
            id: RobotId::new("linus").unwrap_or_else(|_| unreachable!("valid literal")),
            motor_inputs: [13, 21, 17, 27],
            motor_enables: Some([12, 26]),
            eye: 16,
            servos: vec![22, 23],
            patterns: DrivePatterns {
                forward: pattern([1, 0, 1, 0]),
                backward: pattern([0, 1, 0, 1]),
                left: pattern([0, 1, 1, 0]),
                right: pattern([1, 0, 0, 1]),
            },
        }
    }

    /// torvalds: inputs GPIO7, 8, 9, 10; eye GPIO25; no enables, no servos. Its original
    /// page called the directions north 0110, south 1001, west 1010, east 0101.
    pub fn torvalds() -> Self {
        Self {
            id: RobotId::new("torvalds").unwrap_or_else(|_| unreachable!("valid literal")),
            motor_inputs: [7, 8, 9, 10],
            motor_enables: None,
            eye: 25,
            servos: Vec::new(),
            patterns: DrivePatterns {
                forward: pattern([0, 1, 1, 0]),
                backward: pattern([1, 0, 0, 1]),
                left: pattern([1, 0, 1, 0]),
                right: pattern([0, 1, 0, 1]),
            },
        }
    }

    /// The preset of that name, or linus's layout under another name (for simulated
    /// robots that only need to exist).
    pub fn preset_or_default(id: RobotId) -> Self {
        match id.as_str() {
            "torvalds" => Self::torvalds(),
            _ => Self {
                id,
                ..Self::linus()
            },
        }
    }
}

/// Where the broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
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
        }
    }
}
