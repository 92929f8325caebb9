//! Command payloads: the plain-text forms people type into `mosquitto_pub`, and the JSON
//! form that carries everything (direction, speed, hold time, id, trace context, operator).

use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value, json};

use crate::trace::TraceParent;

/// Largest command payload accepted. Commands are tiny; anything bigger is a mistake or
/// an attack, and is refused before it is parsed.
pub const MAX_COMMAND_PAYLOAD: usize = 4096;
/// Motor speed scale: 0 (stopped) ..= 10 (full).
pub const MAX_SPEED: u8 = 10;
/// Servo angle range in degrees.
pub const MIN_SERVO_ANGLE: i16 = -90;
pub const MAX_SERVO_ANGLE: i16 = 90;
/// Longest hold a drive command may ask for. Robots configure a lower maximum.
pub const MAX_HOLD_MS: u32 = 60_000;
/// Longest eye blink.
pub const MAX_BLINK_MS: u32 = 10_000;
/// Longest command id.
pub const MAX_ID_LEN: usize = 64;
/// Longest operator name, in characters.
pub const MAX_OPERATOR_LEN: usize = 64;
/// Longest `tracestate` (W3C allows 32 members of up to 256 characters; 512 is plenty here).
pub const MAX_TRACESTATE_LEN: usize = 512;
/// Motors per robot (one H-bridge channel each) and servos per robot.
pub const MOTORS: usize = 2;
pub const SERVOS: usize = 2;

/// The command named by the last topic level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CommandKind {
    Drive,
    Speed,
    Eyes,
    Servo,
    Stop,
    /// Does nothing but answer: how the gateway's prober sees that a robot is alive.
    Ping,
    /// Takes the robot out of the fleet: outputs safe, its retained topics and Home
    /// Assistant discovery cleared, the node disconnects. Starting the node brings it back.
    Decommission,
}

impl CommandKind {
    pub const ALL: [CommandKind; 7] = [
        CommandKind::Drive,
        CommandKind::Speed,
        CommandKind::Eyes,
        CommandKind::Servo,
        CommandKind::Stop,
        CommandKind::Ping,
        CommandKind::Decommission,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::Drive => "drive",
            CommandKind::Speed => "speed",
            CommandKind::Eyes => "eyes",
            CommandKind::Servo => "servo",
            CommandKind::Stop => "stop",
            CommandKind::Ping => "ping",
            CommandKind::Decommission => "decommission",
        }
    }
}

impl fmt::Display for CommandKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CommandKind {
    type Err = CommandError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CommandKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| CommandError::InvalidValue {
                field: "command",
                expected: "one of drive, speed, eyes, servo, stop, ping, decommission",
                got: s.to_owned(),
            })
    }
}

/// One motor's speed or one servo's angle on a topic of its own (`cmd/motor1`,
/// `cmd/servo2`). The payload is a single value, as Home Assistant's number entities send
/// it, so they need no command template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Motor 1 or 2 (index 0 or 1): a speed 0..=10.
    Motor(usize),
    /// Servo 1 or 2 (index 0 or 1): an angle -90..=90.
    Servo(usize),
}

impl Channel {
    pub const ALL: [Channel; 4] = [
        Channel::Motor(0),
        Channel::Motor(1),
        Channel::Servo(0),
        Channel::Servo(1),
    ];

    /// The topic level: `motor1`, `motor2`, `servo1`, `servo2`.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Motor(0) => "motor1",
            Channel::Motor(_) => "motor2",
            Channel::Servo(0) => "servo1",
            Channel::Servo(_) => "servo2",
        }
    }

    /// The command a value on this channel becomes.
    pub fn kind(self) -> CommandKind {
        match self {
            Channel::Motor(_) => CommandKind::Speed,
            Channel::Servo(_) => CommandKind::Servo,
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Channel::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// Builds the command for one value; the other motor or servo is left as it is.
    fn command(self, value: i64) -> Result<Command, CommandError> {
        let field = self.as_str();
        Ok(match self {
            Channel::Motor(index) => {
                let mut motors = [None; MOTORS];
                motors[index.min(MOTORS - 1)] = Some(check_speed(field, value)?);
                Command::Speed(SpeedTarget(motors))
            }
            Channel::Servo(index) => {
                let mut servos = [None; SERVOS];
                servos[index.min(SERVOS - 1)] = Some(check_angle(field, value)?);
                Command::Servo(ServoTarget(servos))
            }
        })
    }
}

/// What the last level of a command topic names: a whole command, or one channel of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandAddress {
    Command(CommandKind),
    Channel(Channel),
}

impl CommandAddress {
    /// Every command topic level a node answers to.
    pub fn all() -> impl Iterator<Item = CommandAddress> {
        CommandKind::ALL
            .into_iter()
            .map(CommandAddress::Command)
            .chain(Channel::ALL.into_iter().map(CommandAddress::Channel))
    }

    pub fn kind(self) -> CommandKind {
        match self {
            CommandAddress::Command(kind) => kind,
            CommandAddress::Channel(channel) => channel.kind(),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CommandAddress::Command(kind) => kind.as_str(),
            CommandAddress::Channel(channel) => channel.as_str(),
        }
    }
}

impl fmt::Display for CommandAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<CommandKind> for CommandAddress {
    fn from(kind: CommandKind) -> Self {
        CommandAddress::Command(kind)
    }
}

impl FromStr for CommandAddress {
    type Err = CommandError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match Channel::from_name(s) {
            Some(channel) => Ok(CommandAddress::Channel(channel)),
            None => s.parse().map(CommandAddress::Command),
        }
    }
}

/// Where to drive. torvalds' compass names are aliases: north = forward, south = backward,
/// west = left, east = right (each robot maps a direction to its own pin pattern).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Forward,
    Backward,
    Left,
    Right,
    Stop,
}

impl Direction {
    pub const ALL: [Direction; 5] = [
        Direction::Forward,
        Direction::Backward,
        Direction::Left,
        Direction::Right,
        Direction::Stop,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Forward => "forward",
            Direction::Backward => "backward",
            Direction::Left => "left",
            Direction::Right => "right",
            Direction::Stop => "stop",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Direction {
    type Err = CommandError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "forward" | "north" => Ok(Direction::Forward),
            "backward" | "south" => Ok(Direction::Backward),
            "left" | "west" => Ok(Direction::Left),
            "right" | "east" => Ok(Direction::Right),
            "stop" => Ok(Direction::Stop),
            _ => Err(CommandError::InvalidValue {
                field: "direction",
                expected: "forward, backward, left, right or stop (or north, south, west, east)",
                got: s.to_owned(),
            }),
        }
    }
}

/// New speeds for the motors (0..=10); `None` leaves that motor as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpeedTarget(pub [Option<u8>; MOTORS]);

/// New angles for the servos (-90..=90); `None` leaves that servo as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServoTarget(pub [Option<i16>; SERVOS]);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EyesCommand {
    On,
    Off,
    /// On for `duration_ms` (the robot's default when `None`), then off.
    Blink {
        duration_ms: Option<u32>,
    },
}

/// One command, validated against the contract's ranges. Robot-specific limits (a robot
/// without speed control, a lower maximum hold) are checked by the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Drive {
        direction: Direction,
        /// Speed for both motors while driving; the current speed when `None`.
        speed: Option<u8>,
        /// How long to keep driving without a refresh; the robot's default when `None`.
        hold_ms: Option<u32>,
    },
    Speed(SpeedTarget),
    Eyes(EyesCommand),
    Servo(ServoTarget),
    Stop,
    Ping,
    Decommission,
}

impl Command {
    pub fn kind(&self) -> CommandKind {
        match self {
            Command::Drive { .. } => CommandKind::Drive,
            Command::Speed(_) => CommandKind::Speed,
            Command::Eyes(_) => CommandKind::Eyes,
            Command::Servo(_) => CommandKind::Servo,
            Command::Stop => CommandKind::Stop,
            Command::Ping => CommandKind::Ping,
            Command::Decommission => CommandKind::Decommission,
        }
    }

    /// Whether carrying it out moves the robot (a drive other than stop, a servo): what a
    /// latched e-stop refuses (docs/protocol.md, *The latched e-stop*). A speed moves
    /// nothing by itself.
    pub fn moves(&self) -> bool {
        match self {
            Command::Drive { direction, .. } => *direction != Direction::Stop,
            Command::Servo(_) => true,
            _ => false,
        }
    }
}

/// A command with what travels next to it: the sender's id and trace context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandEnvelope {
    pub id: Option<String>,
    pub traceparent: Option<TraceParent>,
    pub tracestate: Option<String>,
    /// Do not carry the command out after this time (milliseconds since the Unix epoch):
    /// a command that waited in a queue too long is refused, not executed late.
    pub deadline_ms: Option<u64>,
    /// Who sent the command (a person's or a service's name), for people and the audit
    /// trail: echoed in the result and the state. Checked by [`validate_operator`]. MQTT 5
    /// senders may send it as the [`crate::OPERATOR_PROPERTY`] user property instead.
    pub operator: Option<String>,
    pub command: Command,
}

impl CommandEnvelope {
    pub fn new(command: Command) -> Self {
        Self {
            id: None,
            traceparent: None,
            tracestate: None,
            deadline_ms: None,
            operator: None,
            command,
        }
    }

    /// Parses a payload published to `.../cmd/<kind>`: JSON when it starts with `{`,
    /// otherwise the plain-text form.
    ///
    /// Strict for every kind, `stop` included: a stop payload with a problem is an
    /// error here, and the error is the problem [`CommandEnvelope::parse_stop`] reports
    /// (`parse(Stop, p)` is `Ok(e)` exactly when `parse_stop(p)` is `(e, None)`). Use
    /// `parse` to check a payload; use `parse_stop` to carry a stop out.
    pub fn parse(kind: CommandKind, payload: &[u8]) -> Result<Self, CommandError> {
        if kind == CommandKind::Stop {
            return match Self::parse_stop(payload) {
                (envelope, None) => Ok(envelope),
                (_, Some(problem)) => Err(problem),
            };
        }
        let text = payload_text(payload)?;
        if text.starts_with('{') {
            parse_json(kind, text)
        } else {
            parse_text(kind, text).map(CommandEnvelope::new)
        }
    }

    /// Parses a stop payload leniently: an e-stop is never refused for its payload.
    ///
    /// Always returns a [`Command::Stop`] envelope, whatever the bytes: empty, text, bad
    /// JSON, unknown fields, wrong types, oversized, not UTF-8. From a JSON object it
    /// keeps the `id`, `traceparent`, `tracestate`, `deadline_ms` and `operator` that are
    /// valid and leaves out the ones that are not. The second value is the first problem
    /// found (an unknown field, then `id`, `traceparent`, `tracestate`, `deadline_ms`,
    /// `operator`, as for every JSON command), so that the sender can be told in the
    /// result's `warning`;
    /// `None` for a clean payload. Plain text is the text form
    /// of `stop` and is ignored without a problem (`mosquitto_pub -m now`). A payload
    /// over [`MAX_COMMAND_PAYLOAD`] or not UTF-8 is not read at all.
    ///
    /// `deadline_ms` is kept but not judged here: a stop that arrives late is still
    /// safe to carry out, so the caller carries it out and may warn `expired`.
    pub fn parse_stop(payload: &[u8]) -> (Self, Option<CommandError>) {
        let mut envelope = Self::new(Command::Stop);
        let doc = match payload_text(payload) {
            Ok(text) if text.starts_with('{') => match json_object(text) {
                Ok(doc) => doc,
                Err(problem) => return (envelope, Some(problem)),
            },
            Ok(_) => return (envelope, None),
            Err(problem) => return (envelope, Some(problem)),
        };
        let mut problem = unknown_field(&doc, CommandKind::Stop, &[], ENVELOPE_EXPECTED);
        envelope.id = usable(envelope_id(&doc), &mut problem);
        envelope.traceparent = usable(envelope_traceparent(&doc), &mut problem);
        envelope.tracestate = usable(envelope_tracestate(&doc), &mut problem).map(str::to_owned);
        envelope.deadline_ms = usable(envelope_deadline(&doc), &mut problem);
        envelope.operator = usable(envelope_operator(&doc), &mut problem);
        (envelope, problem)
    }

    /// Parses a payload published to `.../cmd/<address>`: a whole command as `parse`
    /// does, or a single value on a channel topic (`45`, `45.0`, or JSON
    /// `{"value": 45}` with the usual envelope fields: id, trace context, deadline, operator).
    pub fn parse_at(address: CommandAddress, payload: &[u8]) -> Result<Self, CommandError> {
        let channel = match address {
            CommandAddress::Command(kind) => return Self::parse(kind, payload),
            CommandAddress::Channel(channel) => channel,
        };
        let text = payload_text(payload)?;
        let field = channel.as_str();
        if !text.starts_with('{') {
            let value = match text.split_whitespace().collect::<Vec<_>>().as_slice() {
                [] => {
                    return Err(CommandError::Empty {
                        expected: "a single number",
                    });
                }
                // A motor also takes a percentage (Home Assistant's percent slider).
                [word] if matches!(channel, Channel::Motor(_)) => {
                    parse_speed_text(field, word)?.into()
                }
                [word] => parse_integer_text(field, word)?,
                _ => {
                    return Err(CommandError::InvalidValue {
                        field,
                        expected: "a single number",
                        got: text.chars().take(80).collect(),
                    });
                }
            };
            return channel.command(value).map(CommandEnvelope::new);
        }
        let doc = json_object(text)?;
        if let Some(unknown) = unknown_field(
            &doc,
            channel.kind(),
            &["value"],
            "value, id, traceparent, tracestate, deadline_ms, operator",
        ) {
            return Err(unknown);
        }
        let value =
            optional_int(&doc, "value")?.ok_or(CommandError::MissingField { field: "value" })?;
        with_envelope_fields(&doc, channel.command(value)?)
    }

    /// The canonical JSON form: what the gateway publishes, and what `parse` reads back.
    pub fn to_json(&self) -> Value {
        let mut doc = match self.command {
            Command::Drive {
                direction,
                speed,
                hold_ms,
            } => {
                let mut doc = json!({ "direction": direction });
                insert_opt(&mut doc, "speed", speed);
                insert_opt(&mut doc, "hold_ms", hold_ms);
                doc
            }
            Command::Speed(SpeedTarget(motors)) => {
                let mut doc = json!({});
                insert_opt(&mut doc, "motor1", motors[0]);
                insert_opt(&mut doc, "motor2", motors[1]);
                doc
            }
            Command::Eyes(EyesCommand::On) => json!({ "state": "on" }),
            Command::Eyes(EyesCommand::Off) => json!({ "state": "off" }),
            Command::Eyes(EyesCommand::Blink { duration_ms }) => {
                let mut doc = json!({ "state": "blink" });
                insert_opt(&mut doc, "duration_ms", duration_ms);
                doc
            }
            Command::Servo(ServoTarget(servos)) => {
                let mut doc = json!({});
                insert_opt(&mut doc, "servo1", servos[0]);
                insert_opt(&mut doc, "servo2", servos[1]);
                doc
            }
            Command::Stop | Command::Ping | Command::Decommission => json!({}),
        };
        insert_opt(&mut doc, "id", self.id.clone());
        insert_opt(
            &mut doc,
            "traceparent",
            self.traceparent.map(|t| t.to_string()),
        );
        insert_opt(&mut doc, "tracestate", self.tracestate.clone());
        insert_opt(&mut doc, "deadline_ms", self.deadline_ms);
        insert_opt(&mut doc, "operator", self.operator.clone());
        doc
    }
}

/// The payload as trimmed text, refused before parsing when it is too big or not UTF-8.
fn payload_text(payload: &[u8]) -> Result<&str, CommandError> {
    if payload.len() > MAX_COMMAND_PAYLOAD {
        return Err(CommandError::TooLarge {
            size: payload.len(),
            max: MAX_COMMAND_PAYLOAD,
        });
    }
    let text = std::str::from_utf8(payload).map_err(|_| CommandError::NotUtf8)?;
    Ok(text.trim())
}

fn insert_opt<T: Into<Value>>(doc: &mut Value, key: &str, value: Option<T>) {
    if let (Some(map), Some(value)) = (doc.as_object_mut(), value) {
        map.insert(key.to_owned(), value.into());
    }
}

/// Why a payload was refused. The text is what the sender sees in the error result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("payload is {size} bytes; the limit is {max}")]
    TooLarge { size: usize, max: usize },
    #[error("payload is not valid UTF-8")]
    NotUtf8,
    #[error("payload is empty; expected {expected}")]
    Empty { expected: &'static str },
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("JSON payload must be an object")]
    NotAnObject,
    #[error("unknown field {field:?} for {command}; expected {expected}")]
    UnknownField {
        command: CommandKind,
        field: String,
        expected: &'static str,
    },
    #[error("{field} is required")]
    MissingField { field: &'static str },
    #[error("{field} must be {expected}, got {got:?}")]
    InvalidValue {
        field: &'static str,
        expected: &'static str,
        got: String,
    },
    #[error("{field} = {value} is out of range {min}..={max}")]
    OutOfRange {
        field: &'static str,
        value: i64,
        min: i64,
        max: i64,
    },
    #[error("{0}")]
    Conflict(&'static str),
}

impl CommandError {
    /// A stable, machine-readable error code for results and HTTP bodies.
    pub fn code(&self) -> &'static str {
        match self {
            CommandError::TooLarge { .. } => "payload_too_large",
            CommandError::OutOfRange { .. } => "out_of_range",
            _ => "bad_payload",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Plain text

fn parse_text(kind: CommandKind, text: &str) -> Result<Command, CommandError> {
    let words: Vec<&str> = text.split_whitespace().collect();
    match kind {
        CommandKind::Stop => Ok(Command::Stop),
        CommandKind::Ping => Ok(Command::Ping),
        CommandKind::Decommission => Ok(Command::Decommission),
        CommandKind::Drive => match words.as_slice() {
            [] => Err(CommandError::Empty {
                expected: "a direction: forward, backward, left, right or stop",
            }),
            [direction] => Ok(Command::Drive {
                direction: direction.parse()?,
                speed: None,
                hold_ms: None,
            }),
            _ => Err(CommandError::InvalidValue {
                field: "direction",
                expected: "one word (use JSON for speed and hold time)",
                got: text.to_owned(),
            }),
        },
        CommandKind::Eyes => match words.as_slice() {
            [] => Err(CommandError::Empty {
                expected: "on, off or blink",
            }),
            [state] => parse_eyes_state(state, None).map(Command::Eyes),
            _ => Err(invalid_eyes(text)),
        },
        CommandKind::Speed => match words.as_slice() {
            [] => Err(CommandError::Empty {
                expected: "a speed 0..10, two speeds, or a preset 30%, 50%, 100%",
            }),
            [single] => match speed_preset(single) {
                Some(speed) => Ok(Command::Speed(SpeedTarget([Some(speed); MOTORS]))),
                None => {
                    let speed = parse_speed_text("speed", single)?;
                    Ok(Command::Speed(SpeedTarget([Some(speed); MOTORS])))
                }
            },
            [first, second] => Ok(Command::Speed(SpeedTarget([
                Some(parse_speed_text("motor1", first)?),
                Some(parse_speed_text("motor2", second)?),
            ]))),
            _ => Err(CommandError::InvalidValue {
                field: "speed",
                expected: "one or two numbers 0..10, or a preset",
                got: text.to_owned(),
            }),
        },
        CommandKind::Servo => match words.as_slice() {
            [] => Err(CommandError::Empty {
                expected: "an angle -90..90, two angles, or min, mid, max",
            }),
            [single] => match servo_preset(single) {
                Some(angle) => Ok(Command::Servo(ServoTarget([Some(angle); SERVOS]))),
                None => {
                    let angle = parse_angle_text("angle", single)?;
                    Ok(Command::Servo(ServoTarget([Some(angle); SERVOS])))
                }
            },
            [first, second] => Ok(Command::Servo(ServoTarget([
                Some(parse_angle_text("servo1", first)?),
                Some(parse_angle_text("servo2", second)?),
            ]))),
            _ => Err(CommandError::InvalidValue {
                field: "servo",
                expected: "one or two angles -90..90, or min, mid, max",
                got: text.to_owned(),
            }),
        },
    }
}

fn invalid_eyes(got: &str) -> CommandError {
    CommandError::InvalidValue {
        field: "eyes",
        expected: "on, off or blink",
        got: got.to_owned(),
    }
}

fn parse_eyes_state(state: &str, duration_ms: Option<u32>) -> Result<EyesCommand, CommandError> {
    // Case-insensitive so that Home Assistant's ON / OFF work as they are.
    match state.to_ascii_lowercase().as_str() {
        "on" => Ok(EyesCommand::On),
        "off" => Ok(EyesCommand::Off),
        "blink" => Ok(EyesCommand::Blink { duration_ms }),
        _ => Err(invalid_eyes(state)),
    }
}

/// 30 %, 50 % and 100 % of full speed, as the original buttons offered.
fn speed_preset(word: &str) -> Option<u8> {
    match word.to_ascii_lowercase().trim_end_matches('%') {
        "30" | "thirty" => Some(3),
        "50" | "fifty" => Some(5),
        "100" | "full" => Some(MAX_SPEED),
        _ => None,
    }
}

fn servo_preset(word: &str) -> Option<i16> {
    match word.to_ascii_lowercase().as_str() {
        "min" => Some(MIN_SERVO_ANGLE),
        "mid" => Some(0),
        "max" => Some(MAX_SERVO_ANGLE),
        _ => None,
    }
}

/// Reads an integer written as `7`, `7.0` or `-12` (Home Assistant sends numbers as floats).
fn parse_integer_text(field: &'static str, word: &str) -> Result<i64, CommandError> {
    let invalid = || CommandError::InvalidValue {
        field,
        expected: "a whole number",
        got: word.to_owned(),
    };
    if let Ok(n) = word.parse::<i64>() {
        return Ok(n);
    }
    let float: f64 = word.parse().map_err(|_| invalid())?;
    integral(float).ok_or_else(invalid)
}

fn integral(float: f64) -> Option<i64> {
    let in_range = float.is_finite() && float.abs() < 1e15;
    (in_range && float.fract() == 0.0).then_some(float as i64)
}

/// A speed `0`..`10`, or a percentage of full speed in steps of 10 (`70%` is 7; Home
/// Assistant's speed sliders send percentages).
fn parse_speed_text(field: &'static str, word: &str) -> Result<u8, CommandError> {
    let Some(percent) = word.strip_suffix('%') else {
        return check_speed(field, parse_integer_text(field, word)?);
    };
    let percent = check_range(
        field,
        parse_integer_text(field, percent.trim_end())?,
        0,
        100,
    )?;
    if percent % 10 != 0 {
        return Err(CommandError::InvalidValue {
            field,
            expected: "a speed 0..10 or a percentage in steps of 10 (0%, 10%, … 100%)",
            got: word.to_owned(),
        });
    }
    check_speed(field, percent / 10)
}

fn parse_angle_text(field: &'static str, word: &str) -> Result<i16, CommandError> {
    check_angle(field, parse_integer_text(field, word)?)
}

fn check_range(field: &'static str, value: i64, min: i64, max: i64) -> Result<i64, CommandError> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(CommandError::OutOfRange {
            field,
            value,
            min,
            max,
        })
    }
}

fn check_speed(field: &'static str, value: i64) -> Result<u8, CommandError> {
    let value = check_range(field, value, 0, MAX_SPEED.into())?;
    Ok(u8::try_from(value).unwrap_or(MAX_SPEED))
}

fn check_angle(field: &'static str, value: i64) -> Result<i16, CommandError> {
    let value = check_range(field, value, MIN_SERVO_ANGLE.into(), MAX_SERVO_ANGLE.into())?;
    Ok(i16::try_from(value).unwrap_or(0))
}

// ---------------------------------------------------------------------------------------
// JSON

const ENVELOPE_FIELDS: [&str; 5] = ["id", "traceparent", "tracestate", "deadline_ms", "operator"];
/// What a command without fields of its own (stop, ping, decommission) may carry.
const ENVELOPE_EXPECTED: &str = "id, traceparent, tracestate, deadline_ms, operator";

/// The text as a JSON object.
fn json_object(text: &str) -> Result<Map<String, Value>, CommandError> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| CommandError::InvalidJson(e.to_string()))?;
    match value {
        Value::Object(doc) => Ok(doc),
        _ => Err(CommandError::NotAnObject),
    }
}

/// The first field that is neither one of `own_fields` nor an envelope field.
fn unknown_field(
    doc: &Map<String, Value>,
    command: CommandKind,
    own_fields: &[&str],
    expected: &'static str,
) -> Option<CommandError> {
    doc.keys()
        .find(|k| !own_fields.contains(&k.as_str()) && !ENVELOPE_FIELDS.contains(&k.as_str()))
        .map(|field| CommandError::UnknownField {
            command,
            field: field.clone(),
            expected,
        })
}

fn parse_json(kind: CommandKind, text: &str) -> Result<CommandEnvelope, CommandError> {
    let doc = json_object(text)?;
    let (own_fields, expected): (&[&str], &'static str) = match kind {
        CommandKind::Drive => (
            &["direction", "speed", "hold_ms"],
            "direction, speed, hold_ms, id, traceparent, tracestate, deadline_ms, operator",
        ),
        CommandKind::Speed => (
            &["motor1", "motor2", "preset"],
            "motor1, motor2, preset, id, traceparent, tracestate, deadline_ms, operator",
        ),
        CommandKind::Eyes => (
            &["state", "duration_ms"],
            "state, duration_ms, id, traceparent, tracestate, deadline_ms, operator",
        ),
        CommandKind::Servo => (
            &["servo1", "servo2", "preset"],
            "servo1, servo2, preset, id, traceparent, tracestate, deadline_ms, operator",
        ),
        CommandKind::Stop | CommandKind::Ping | CommandKind::Decommission => {
            (&[], ENVELOPE_EXPECTED)
        }
    };
    if let Some(unknown) = unknown_field(&doc, kind, own_fields, expected) {
        return Err(unknown);
    }

    let command = match kind {
        CommandKind::Stop => Command::Stop,
        CommandKind::Ping => Command::Ping,
        CommandKind::Decommission => Command::Decommission,
        CommandKind::Drive => Command::Drive {
            direction: required_str(&doc, "direction")?.parse()?,
            speed: optional_int(&doc, "speed")?
                .map(|v| check_speed("speed", v))
                .transpose()?,
            hold_ms: optional_int(&doc, "hold_ms")?
                .map(|v| check_range("hold_ms", v, 1, MAX_HOLD_MS.into()))
                .transpose()?
                .map(|v| u32::try_from(v).unwrap_or(MAX_HOLD_MS)),
        },
        CommandKind::Eyes => {
            let duration_ms = optional_int(&doc, "duration_ms")?
                .map(|v| check_range("duration_ms", v, 1, MAX_BLINK_MS.into()))
                .transpose()?
                .map(|v| u32::try_from(v).unwrap_or(MAX_BLINK_MS));
            let state = parse_eyes_state(required_str(&doc, "state")?, duration_ms)?;
            if duration_ms.is_some() && !matches!(state, EyesCommand::Blink { .. }) {
                return Err(CommandError::Conflict(
                    "duration_ms only goes with state \"blink\"",
                ));
            }
            Command::Eyes(state)
        }
        CommandKind::Speed => {
            let motors = [
                optional_int(&doc, "motor1")?
                    .map(|v| check_speed("motor1", v))
                    .transpose()?,
                optional_int(&doc, "motor2")?
                    .map(|v| check_speed("motor2", v))
                    .transpose()?,
            ];
            let preset = match doc.get("preset") {
                None => None,
                Some(value) => Some(json_word(value).and_then(|w| speed_preset(&w)).ok_or_else(
                    || CommandError::InvalidValue {
                        field: "preset",
                        expected: "30, 50 or 100 (percent)",
                        got: value.to_string(),
                    },
                )?),
            };
            match (preset, motors) {
                (Some(_), [Some(_), _] | [_, Some(_)]) => {
                    return Err(CommandError::Conflict(
                        "give either preset or motor1/motor2, not both",
                    ));
                }
                (Some(speed), _) => Command::Speed(SpeedTarget([Some(speed); MOTORS])),
                (None, [None, None]) => {
                    return Err(CommandError::MissingField {
                        field: "motor1, motor2 or preset",
                    });
                }
                (None, motors) => Command::Speed(SpeedTarget(motors)),
            }
        }
        CommandKind::Servo => {
            let servos = [
                optional_int(&doc, "servo1")?
                    .map(|v| check_angle("servo1", v))
                    .transpose()?,
                optional_int(&doc, "servo2")?
                    .map(|v| check_angle("servo2", v))
                    .transpose()?,
            ];
            let preset = match doc.get("preset") {
                None => None,
                Some(value) => Some(json_word(value).and_then(|w| servo_preset(&w)).ok_or_else(
                    || CommandError::InvalidValue {
                        field: "preset",
                        expected: "min, mid or max",
                        got: value.to_string(),
                    },
                )?),
            };
            match (preset, servos) {
                (Some(_), [Some(_), _] | [_, Some(_)]) => {
                    return Err(CommandError::Conflict(
                        "give either preset or servo1/servo2, not both",
                    ));
                }
                (Some(angle), _) => Command::Servo(ServoTarget([Some(angle); SERVOS])),
                (None, [None, None]) => {
                    return Err(CommandError::MissingField {
                        field: "servo1, servo2 or preset",
                    });
                }
                (None, servos) => Command::Servo(ServoTarget(servos)),
            }
        }
    };

    with_envelope_fields(&doc, command)
}

/// The fields every JSON command may carry next to its own: id, trace context, deadline,
/// operator.
fn with_envelope_fields(
    doc: &Map<String, Value>,
    command: Command,
) -> Result<CommandEnvelope, CommandError> {
    Ok(CommandEnvelope {
        id: envelope_id(doc)?,
        traceparent: envelope_traceparent(doc)?,
        tracestate: envelope_tracestate(doc)?.map(str::to_owned),
        deadline_ms: envelope_deadline(doc)?,
        operator: envelope_operator(doc)?,
        command,
    })
}

/// A field's value when it is valid; otherwise `None`, and the error becomes the problem
/// unless an earlier one was found.
fn usable<T>(
    field: Result<Option<T>, CommandError>,
    problem: &mut Option<CommandError>,
) -> Option<T> {
    field.unwrap_or_else(|error| {
        problem.get_or_insert(error);
        None
    })
}

fn envelope_id(doc: &Map<String, Value>) -> Result<Option<String>, CommandError> {
    let Some(id) = optional_str(doc, "id")? else {
        return Ok(None);
    };
    validate_id(id).map(|()| Some(id.to_owned()))
}

fn envelope_traceparent(doc: &Map<String, Value>) -> Result<Option<TraceParent>, CommandError> {
    optional_str(doc, "traceparent")?
        .map(|t| {
            t.parse().map_err(|_| CommandError::InvalidValue {
                field: "traceparent",
                expected: "a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)",
                got: t.to_owned(),
            })
        })
        .transpose()
}

fn envelope_tracestate(doc: &Map<String, Value>) -> Result<Option<&str>, CommandError> {
    optional_str(doc, "tracestate")?
        .map(|t| {
            if t.len() <= MAX_TRACESTATE_LEN && t.is_ascii() {
                Ok(t)
            } else {
                Err(CommandError::InvalidValue {
                    field: "tracestate",
                    expected: "ASCII of at most 512 characters",
                    got: t.chars().take(40).collect(),
                })
            }
        })
        .transpose()
}

fn envelope_deadline(doc: &Map<String, Value>) -> Result<Option<u64>, CommandError> {
    optional_int(doc, "deadline_ms")?
        .map(|v| {
            u64::try_from(v).map_err(|_| CommandError::OutOfRange {
                field: "deadline_ms",
                value: v,
                min: 0,
                max: i64::MAX,
            })
        })
        .transpose()
}

fn envelope_operator(doc: &Map<String, Value>) -> Result<Option<String>, CommandError> {
    let Some(operator) = optional_str(doc, "operator")? else {
        return Ok(None);
    };
    validate_operator(operator).map(|()| Some(operator.to_owned()))
}

/// A preset may be written as a string (`"mid"`, `"30%"`) or a number (`30`).
fn json_word(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn optional_str<'d>(
    doc: &'d Map<String, Value>,
    field: &'static str,
) -> Result<Option<&'d str>, CommandError> {
    match doc.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(CommandError::InvalidValue {
            field,
            expected: "a string",
            got: other.to_string(),
        }),
    }
}

fn required_str<'d>(
    doc: &'d Map<String, Value>,
    field: &'static str,
) -> Result<&'d str, CommandError> {
    optional_str(doc, field)?.ok_or(CommandError::MissingField { field })
}

fn optional_int(
    doc: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<i64>, CommandError> {
    let invalid = |got: &Value| CommandError::InvalidValue {
        field,
        expected: "a whole number",
        got: got.to_string(),
    };
    match doc.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().and_then(integral))
            .map(Some)
            .ok_or_else(|| invalid(&Value::Number(n.clone()))),
        Some(other) => Err(invalid(other)),
    }
}

/// Command ids are short and safe to echo into topics, logs and metrics exemplars.
pub fn validate_id(id: &str) -> Result<(), CommandError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':');
    if id.is_empty() || id.len() > MAX_ID_LEN || !id.chars().all(allowed) {
        return Err(CommandError::InvalidValue {
            field: "id",
            expected: "1 to 64 characters of A-Z a-z 0-9 - _ . :",
            got: id.chars().take(80).collect(),
        });
    }
    Ok(())
}

/// Operator names are for people (`ada`, `Grace Hopper`, `ops-bot`): 1 to
/// [`MAX_OPERATOR_LEN`] characters of any kind but control characters, so that they are
/// safe to echo into results, the state and log lines.
pub fn validate_operator(operator: &str) -> Result<(), CommandError> {
    let length = operator.chars().count();
    if length == 0 || length > MAX_OPERATOR_LEN || operator.chars().any(char::is_control) {
        return Err(CommandError::InvalidValue {
            field: "operator",
            expected: "1 to 64 characters, none of them control characters",
            got: operator.chars().take(80).collect(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(kind: CommandKind, payload: &str) -> Result<Command, CommandError> {
        CommandEnvelope::parse(kind, payload.as_bytes()).map(|e| e.command)
    }

    fn drive(direction: Direction) -> Command {
        Command::Drive {
            direction,
            speed: None,
            hold_ms: None,
        }
    }

    #[test]
    fn plain_text_drive_with_aliases() {
        use Direction::*;
        for (word, direction) in [
            ("forward", Forward),
            ("backward", Backward),
            ("left", Left),
            ("right", Right),
            ("stop", Stop),
            ("north", Forward),
            ("south", Backward),
            ("west", Left),
            ("east", Right),
            (" Forward\n", Forward),
        ] {
            assert_eq!(
                text(CommandKind::Drive, word).unwrap(),
                drive(direction),
                "{word}"
            );
        }
        assert!(matches!(
            text(CommandKind::Drive, "sideways"),
            Err(CommandError::InvalidValue {
                field: "direction",
                ..
            })
        ));
        assert!(matches!(
            text(CommandKind::Drive, ""),
            Err(CommandError::Empty { .. })
        ));
    }

    #[test]
    fn plain_text_speed_servo_eyes_stop() {
        let both = |s| Command::Speed(SpeedTarget([Some(s), Some(s)]));
        assert_eq!(text(CommandKind::Speed, "7").unwrap(), both(7));
        assert_eq!(text(CommandKind::Speed, "30%").unwrap(), both(3));
        assert_eq!(text(CommandKind::Speed, "fifty").unwrap(), both(5));
        assert_eq!(text(CommandKind::Speed, "100").unwrap(), both(10));
        assert_eq!(
            text(CommandKind::Speed, "3 8").unwrap(),
            Command::Speed(SpeedTarget([Some(3), Some(8)]))
        );
        assert!(matches!(
            text(CommandKind::Speed, "11"),
            Err(CommandError::OutOfRange { value: 11, .. })
        ));
        assert_eq!(
            text(CommandKind::Servo, "mid").unwrap(),
            Command::Servo(ServoTarget([Some(0), Some(0)]))
        );
        assert_eq!(
            text(CommandKind::Servo, "-45 90").unwrap(),
            Command::Servo(ServoTarget([Some(-45), Some(90)]))
        );
        assert_eq!(
            text(CommandKind::Servo, "12.0").unwrap(),
            Command::Servo(ServoTarget([Some(12), Some(12)]))
        );
        assert!(matches!(
            text(CommandKind::Servo, "91"),
            Err(CommandError::OutOfRange { value: 91, .. })
        ));
        assert!(text(CommandKind::Servo, "12.5").is_err());
        assert_eq!(
            text(CommandKind::Eyes, "ON").unwrap(),
            Command::Eyes(EyesCommand::On)
        );
        assert_eq!(
            text(CommandKind::Eyes, "blink").unwrap(),
            Command::Eyes(EyesCommand::Blink { duration_ms: None })
        );
        assert!(text(CommandKind::Eyes, "maybe").is_err());
        // The e-stop is never refused for its payload.
        assert_eq!(text(CommandKind::Stop, "").unwrap(), Command::Stop);
        assert_eq!(
            text(CommandKind::Stop, "now please").unwrap(),
            Command::Stop
        );
    }

    #[test]
    fn json_full_form() {
        let env = CommandEnvelope::parse(
            CommandKind::Drive,
            br#"{"direction":"north","speed":7,"hold_ms":800,"id":"c-1",
                "traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}"#,
        )
        .unwrap();
        assert_eq!(
            env.command,
            Command::Drive {
                direction: Direction::Forward,
                speed: Some(7),
                hold_ms: Some(800)
            }
        );
        assert_eq!(env.id.as_deref(), Some("c-1"));
        assert!(env.traceparent.is_some());
    }

    #[test]
    fn json_errors_are_specific() {
        let err =
            |kind, payload: &str| CommandEnvelope::parse(kind, payload.as_bytes()).unwrap_err();
        assert!(matches!(
            err(CommandKind::Drive, "{"),
            CommandError::InvalidJson(_)
        ));
        assert!(matches!(
            err(CommandKind::Drive, "{}"),
            CommandError::MissingField { field: "direction" }
        ));
        assert!(matches!(
            err(CommandKind::Drive, r#"{"directoin":"forward"}"#),
            CommandError::UnknownField { .. }
        ));
        assert!(matches!(
            err(CommandKind::Drive, r#"{"direction":5}"#),
            CommandError::InvalidValue {
                field: "direction",
                ..
            }
        ));
        assert!(matches!(
            err(CommandKind::Drive, r#"{"direction":"forward","hold_ms":0}"#),
            CommandError::OutOfRange {
                field: "hold_ms",
                ..
            }
        ));
        assert!(matches!(
            err(CommandKind::Speed, r#"{"preset":30,"motor1":2}"#),
            CommandError::Conflict(_)
        ));
        assert!(matches!(
            err(CommandKind::Servo, r#"{}"#),
            CommandError::MissingField { .. }
        ));
        assert!(matches!(
            err(CommandKind::Stop, r#"{"id":"has space"}"#),
            CommandError::InvalidValue { field: "id", .. }
        ));
        assert!(matches!(
            err(CommandKind::Stop, r#"{"traceparent":"nope"}"#),
            CommandError::InvalidValue {
                field: "traceparent",
                ..
            }
        ));
        assert!(matches!(
            CommandEnvelope::parse(CommandKind::Drive, &[0xff, 0xfe]).unwrap_err(),
            CommandError::NotUtf8
        ));
        let huge = vec![b'a'; MAX_COMMAND_PAYLOAD + 1];
        let too_large = CommandEnvelope::parse(CommandKind::Drive, &huge).unwrap_err();
        assert_eq!(too_large.code(), "payload_too_large");
    }

    #[test]
    fn a_stop_is_always_a_stop_whatever_its_payload() {
        let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let huge = vec![b'{'; MAX_COMMAND_PAYLOAD + 1];
        let cases: [(&[u8], Option<&str>); 14] = [
            (b"", None),
            (b"now please", None),
            (b"  {} ", None),
            (br#"{"id":"e-1","deadline_ms":1}"#, None),
            (br#"{"directoin":1}"#, Some("bad_payload")),
            (b"{", Some("bad_payload")),
            (b"{}}", Some("bad_payload")),
            (&[0xff, 0xfe], Some("bad_payload")),
            (&huge, Some("payload_too_large")),
            (br#"{"id":"has space"}"#, Some("bad_payload")),
            (br#"{"id":5}"#, Some("bad_payload")),
            (br#"{"traceparent":"nope"}"#, Some("bad_payload")),
            (br#"{"tracestate":"caf\u00e9"}"#, Some("bad_payload")),
            (br#"{"deadline_ms":-1}"#, Some("out_of_range")),
        ];
        for (payload, code) in cases {
            let shown = String::from_utf8_lossy(payload)
                .chars()
                .take(20)
                .collect::<String>();
            let (envelope, problem) = CommandEnvelope::parse_stop(payload);
            assert_eq!(envelope.command, Command::Stop, "{shown}");
            assert_eq!(problem.as_ref().map(CommandError::code), code, "{shown}");
            // The strict parser refuses exactly what the lenient one warns about.
            let strict = CommandEnvelope::parse(CommandKind::Stop, payload);
            assert_eq!(strict, problem.clone().map_or(Ok(envelope), Err), "{shown}");
            let at = CommandEnvelope::parse_at(CommandKind::Stop.into(), payload);
            assert_eq!(at, strict, "{shown}");
        }

        // What is usable is kept, what is not is left out; the first problem is reported.
        let (envelope, problem) = CommandEnvelope::parse_stop(
            format!(
                r#"{{"directoin":1,"id":"estop-7","traceparent":"{traceparent}",
                    "tracestate":"vendor=1","deadline_ms":1}}"#
            )
            .as_bytes(),
        );
        assert!(matches!(
            problem,
            Some(CommandError::UnknownField { ref field, .. }) if field == "directoin"
        ));
        assert_eq!(envelope.id.as_deref(), Some("estop-7"));
        assert_eq!(envelope.traceparent, traceparent.parse().ok());
        assert_eq!(envelope.tracestate.as_deref(), Some("vendor=1"));
        assert_eq!(
            envelope.deadline_ms,
            Some(1),
            "a late stop is for the node to judge"
        );

        let (envelope, problem) = CommandEnvelope::parse_stop(
            format!(r#"{{"id":"has space","traceparent":"{traceparent}","tracestate":7}}"#)
                .as_bytes(),
        );
        assert!(matches!(
            problem,
            Some(CommandError::InvalidValue { field: "id", .. })
        ));
        assert_eq!(envelope.id, None);
        assert!(envelope.traceparent.is_some());
        assert_eq!(envelope.tracestate, None);

        let (envelope, problem) =
            CommandEnvelope::parse_stop(br#"{"id":"e-2","traceparent":"nope"}"#);
        assert!(matches!(
            problem,
            Some(CommandError::InvalidValue {
                field: "traceparent",
                ..
            })
        ));
        assert_eq!(envelope.id.as_deref(), Some("e-2"));
        assert_eq!(envelope.traceparent, None);

        // An oversized or non-UTF-8 payload is not read at all, whatever it holds.
        let mut big = br#"{"id":"big-1","pad":""#.to_vec();
        big.resize(MAX_COMMAND_PAYLOAD + 10, b'x');
        big.extend_from_slice(br#""}"#);
        let (envelope, problem) = CommandEnvelope::parse_stop(&big);
        assert_eq!(envelope, CommandEnvelope::new(Command::Stop));
        assert!(matches!(problem, Some(CommandError::TooLarge { .. })));
    }

    #[test]
    fn channel_topics_take_one_value() {
        let at = |name: &str, payload: &str| {
            let address: CommandAddress = name.parse().unwrap();
            CommandEnvelope::parse_at(address, payload.as_bytes()).map(|e| e.command)
        };
        assert_eq!(
            at("servo1", "45").unwrap(),
            Command::Servo(ServoTarget([Some(45), None]))
        );
        assert_eq!(
            at("servo2", "-90.0").unwrap(),
            Command::Servo(ServoTarget([None, Some(-90)]))
        );
        assert_eq!(
            at("motor2", "7").unwrap(),
            Command::Speed(SpeedTarget([None, Some(7)]))
        );
        assert_eq!(
            at("motor1", r#"{"value":3,"id":"ha-1"}"#).unwrap(),
            Command::Speed(SpeedTarget([Some(3), None]))
        );
        assert!(matches!(
            at("servo1", "91"),
            Err(CommandError::OutOfRange {
                field: "servo1",
                ..
            })
        ));
        assert_eq!(
            at("motor1", "70%").unwrap(),
            Command::Speed(SpeedTarget([Some(7), None])),
            "Home Assistant's percent slider"
        );
        assert_eq!(
            at("motor2", "0%").unwrap(),
            Command::Speed(SpeedTarget([None, Some(0)]))
        );
        assert!(matches!(
            at("motor1", "110%"),
            Err(CommandError::OutOfRange { max: 100, .. })
        ));
        assert!(matches!(
            at("motor1", "55%"),
            Err(CommandError::InvalidValue { .. })
        ));
        assert!(at("motor1", "%").is_err());
        assert!(at("motor1", "-10%").is_err());
        assert!(matches!(at("motor1", ""), Err(CommandError::Empty { .. })));
        assert!(at("motor1", "3 4").is_err());
        assert!(at("motor1", r#"{"speed":3}"#).is_err());
        assert!(at("motor1", r#"{}"#).is_err());
        assert!(at("servo1", "12.5").is_err());
        // Whole commands go through the same entry point.
        assert_eq!(at("eyes", "ON").unwrap(), Command::Eyes(EyesCommand::On));
        assert_eq!(at("decommission", "").unwrap(), Command::Decommission);
        assert!("servo3".parse::<CommandAddress>().is_err());
        assert_eq!(CommandAddress::all().count(), 11);
    }

    #[test]
    fn canonical_json_round_trips() {
        let commands = [
            Command::Drive {
                direction: Direction::Left,
                speed: Some(4),
                hold_ms: Some(1500),
            },
            drive(Direction::Stop),
            Command::Speed(SpeedTarget([Some(2), None])),
            Command::Eyes(EyesCommand::Blink {
                duration_ms: Some(300),
            }),
            Command::Eyes(EyesCommand::Off),
            Command::Servo(ServoTarget([None, Some(-90)])),
            Command::Stop,
            Command::Ping,
            Command::Decommission,
        ];
        for command in commands {
            let mut env = CommandEnvelope::new(command);
            env.id = Some("abc-1".into());
            env.tracestate = Some("vendor=1".into());
            env.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .ok();
            env.operator = Some("Grace Hopper".into());
            let bytes = env.to_json().to_string();
            assert!(bytes.contains(r#""operator":"Grace Hopper""#), "{bytes}");
            let back = CommandEnvelope::parse(command.kind(), bytes.as_bytes()).unwrap();
            assert_eq!(back, env, "{bytes}");
        }
        // Without an operator, the canonical form has none.
        let plain = CommandEnvelope::new(Command::Ping).to_json();
        assert_eq!(plain, json!({}));
    }

    #[test]
    fn json_commands_may_name_their_operator() {
        let env = CommandEnvelope::parse(
            CommandKind::Drive,
            r#"{"direction":"forward","operator":"ada"}"#.as_bytes(),
        )
        .unwrap();
        assert_eq!(env.operator.as_deref(), Some("ada"));
        let env =
            CommandEnvelope::parse(CommandKind::Drive, br#"{"direction":"forward"}"#).unwrap();
        assert_eq!(env.operator, None);
        let env = CommandEnvelope::parse(CommandKind::Eyes, br#"{"state":"on","operator":null}"#)
            .unwrap();
        assert_eq!(env.operator, None, "null is no operator");
        // Plain text has no envelope fields.
        assert_eq!(
            CommandEnvelope::parse(CommandKind::Drive, b"forward")
                .unwrap()
                .operator,
            None
        );
        // Channel topics and commands without fields of their own take it too.
        let at = CommandEnvelope::parse_at(
            CommandAddress::Channel(Channel::Servo(0)),
            r#"{"value":45,"operator":"Åsa Ødegård"}"#.as_bytes(),
        )
        .unwrap();
        assert_eq!(at.operator.as_deref(), Some("Åsa Ødegård"));
        let ping = CommandEnvelope::parse(CommandKind::Ping, br#"{"operator":"ops-bot"}"#).unwrap();
        assert_eq!(ping.operator.as_deref(), Some("ops-bot"));
        // 64 characters (not bytes) is the limit.
        let longest = "é".repeat(MAX_OPERATOR_LEN);
        let doc = json!({"direction": "left", "operator": longest}).to_string();
        let env = CommandEnvelope::parse(CommandKind::Drive, doc.as_bytes()).unwrap();
        assert_eq!(env.operator.as_deref(), Some(longest.as_str()));
    }

    #[test]
    fn an_invalid_operator_is_an_error_like_an_invalid_id() {
        let too_long = "a".repeat(MAX_OPERATOR_LEN + 1);
        for operator in [
            json!(""),
            json!(too_long),
            json!("ada\nlovelace"),
            json!("ada\u{0}"),
            json!("tab\there"),
            json!("\u{7f}"),
            json!("\u{9b}"),
            json!(5),
            json!(["ada"]),
        ] {
            let doc = json!({"direction": "forward", "operator": operator}).to_string();
            let error = CommandEnvelope::parse(CommandKind::Drive, doc.as_bytes()).unwrap_err();
            assert!(
                matches!(
                    error,
                    CommandError::InvalidValue {
                        field: "operator",
                        ..
                    }
                ),
                "{doc}: {error:?}"
            );
            assert_eq!(error.code(), "bad_payload", "{doc}");
            let bad_id = CommandEnvelope::parse(
                CommandKind::Drive,
                br#"{"direction":"forward","id":"has space"}"#,
            )
            .unwrap_err();
            assert_eq!(error.code(), bad_id.code());
        }
        assert!(validate_operator("Grace Hopper").is_ok());
        assert!(validate_operator(&"x".repeat(MAX_OPERATOR_LEN)).is_ok());
        assert!(validate_operator(&"x".repeat(MAX_OPERATOR_LEN + 1)).is_err());
        assert!(validate_operator("").is_err());
        assert!(validate_operator("bell\u{7}").is_err());
        // The error quotes a bounded part of what it got.
        let huge = "y".repeat(1000);
        let error = validate_operator(&huge).unwrap_err();
        assert!(error.to_string().len() < 300, "{error}");
    }

    #[test]
    fn an_invalid_operator_on_a_stop_is_dropped_with_a_warning() {
        let (envelope, problem) =
            CommandEnvelope::parse_stop(br#"{"id":"estop-3","operator":"ada\nlovelace"}"#);
        assert_eq!(envelope.command, Command::Stop);
        assert_eq!(envelope.id.as_deref(), Some("estop-3"), "the rest is kept");
        assert_eq!(envelope.operator, None, "the invalid operator is dropped");
        let problem = problem.expect("a warning");
        assert!(
            matches!(
                problem,
                CommandError::InvalidValue {
                    field: "operator",
                    ..
                }
            ),
            "{problem:?}"
        );
        assert_eq!(problem.code(), "bad_payload");
        assert!(problem.to_string().contains("operator"), "{problem}");
        // The strict parser refuses the same payload with the same error.
        assert_eq!(
            CommandEnvelope::parse(
                CommandKind::Stop,
                br#"{"id":"estop-3","operator":"ada\nlovelace"}"#
            ),
            Err(problem)
        );

        // A valid one is kept, without a warning.
        let (envelope, problem) = CommandEnvelope::parse_stop(br#"{"operator":"ada"}"#);
        assert_eq!(envelope.operator.as_deref(), Some("ada"));
        assert_eq!(problem, None);

        // An earlier problem is the one reported; the operator is still judged on its own.
        let (envelope, problem) =
            CommandEnvelope::parse_stop(br#"{"id":"has space","operator":"ada"}"#);
        assert!(matches!(
            problem,
            Some(CommandError::InvalidValue { field: "id", .. })
        ));
        assert_eq!(envelope.operator.as_deref(), Some("ada"));
        let (envelope, problem) = CommandEnvelope::parse_stop(br#"{"operator":""}"#);
        assert_eq!(envelope, CommandEnvelope::new(Command::Stop));
        assert!(matches!(
            problem,
            Some(CommandError::InvalidValue {
                field: "operator",
                ..
            })
        ));
    }
}
