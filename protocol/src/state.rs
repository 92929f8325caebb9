//! What robots publish: retained state, availability, and one result per command.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::command::{CommandError, CommandKind, Direction};

/// Availability on `<prefix>/<robot>/status` (retained). `offline` is the node's last will.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    Online,
    Offline,
}

impl Availability {
    pub fn as_str(self) -> &'static str {
        match self {
            Availability::Online => "online",
            Availability::Offline => "offline",
        }
    }
}

impl fmt::Display for Availability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Availability {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s.trim() {
            "online" => Ok(Availability::Online),
            "offline" => Ok(Availability::Offline),
            _ => Err(()),
        }
    }
}

/// Which way one motor turns (from its pair of H-bridge inputs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MotorDirection {
    Forward,
    Backward,
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MotorState {
    pub direction: MotorDirection,
    /// 0..=10; `null` on robots without speed control (no enable pins).
    pub speed: Option<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandOutcome {
    Ok,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastCommand {
    pub id: String,
    pub command: CommandKind,
    pub status: CommandOutcome,
    /// When the robot carried it out (or refused it), in milliseconds since the Unix
    /// epoch by the robot's clock. The state that reports it may be published later: the
    /// answers to a fleet-wide command are spread out (docs/protocol.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_ms: Option<u64>,
    /// Why it was refused: the result's error code and reason (absent when it was carried
    /// out), so a refusal is visible where the state is read (Home Assistant's attributes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Who sent it (the command's `fleet-operator` user property or JSON `operator`), for
    /// people and the audit trail. Absent when the command named nobody, and in documents
    /// from older nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
}

/// Retained JSON on `<prefix>/<robot>/state`, published on every change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RobotState {
    pub robot: String,
    /// What the robot is doing as a whole: the direction it was last told to drive.
    pub motion: Direction,
    pub motors: Vec<MotorState>,
    /// `on` or `off` (a blink shows as `on` until it ends).
    pub eyes: EyesState,
    /// Servo angles in degrees (-90..=90), one per servo the robot has.
    pub servos: Vec<i16>,
    pub last_command: Option<LastCommand>,
    pub uptime_s: u64,
    /// When the node published this (milliseconds since the Unix epoch). The node
    /// republishes its state every heartbeat interval, so a stale value means a silent node.
    pub last_seen_ms: u64,
    /// The fleet's latched e-stop as this robot sees it (`<prefix>/estop`). Absent in
    /// documents from nodes older than the latch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estop: Option<LatchView>,
}

/// Retained JSON on `<prefix>/estop`: the fleet's latched e-stop. While `engaged`, every
/// node keeps its motors stopped and refuses motion, until a document with `engaged:
/// false` (or an empty retained message) clears it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EstopLatch {
    pub engaged: bool,
    /// Who engaged or cleared it (the gateway's operator, a user's name), for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When, in milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_ms: Option<u64>,
}

/// Longest `by` and `reason` a latch document may carry.
pub const MAX_LATCH_TEXT: usize = 200;

impl EstopLatch {
    /// Reads a latch message. An empty payload (the retained message deleted) clears it.
    /// Anything else that is not a latch document engages it: a latch nobody can read is
    /// not a reason to move. The error says what was wrong.
    pub fn read(payload: &[u8]) -> (EstopLatch, Option<String>) {
        if payload.is_empty() {
            return (EstopLatch::cleared(None), None);
        }
        match serde_json::from_slice::<EstopLatch>(payload) {
            Ok(mut latch) => {
                for text in [&mut latch.by, &mut latch.reason].into_iter().flatten() {
                    if text.chars().count() > MAX_LATCH_TEXT {
                        *text = text.chars().take(MAX_LATCH_TEXT).collect();
                    }
                }
                (latch, None)
            }
            Err(error) => (
                EstopLatch {
                    engaged: true,
                    by: None,
                    reason: Some("unreadable latch message".to_owned()),
                    at_ms: None,
                },
                Some(format!(
                    "not a latch document ({error}); treated as engaged"
                )),
            ),
        }
    }

    pub fn engaged(by: Option<String>, reason: Option<String>, at_ms: u64) -> Self {
        Self {
            engaged: true,
            by,
            reason,
            at_ms: Some(at_ms),
        }
    }

    pub fn cleared(by: Option<String>) -> Self {
        Self {
            engaged: false,
            by,
            reason: None,
            at_ms: None,
        }
    }
}

/// What a robot knows of the latch: `engaged`, `clear`, or `unknown` while it has not
/// yet subscribed to it on this connection (it then refuses motion too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LatchView {
    Engaged,
    Clear,
    Unknown,
}

/// Retained JSON on `<prefix>/_gateway/state`: the gateway's view of the fleet, published
/// when it changes. Home Assistant's fleet device reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetSummary {
    /// Robots the gateway knows of (configured or seen).
    pub robots: usize,
    /// Of those, the ones whose status is `online`.
    pub online: usize,
    /// Of those, the ones whose last state says they are moving.
    pub moving: usize,
    /// The ids of the robots that are online and offline, sorted.
    pub online_robots: Vec<String>,
    pub offline_robots: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EyesState {
    On,
    Off,
}

/// Exactly one per command: on the MQTT 5 response topic when the sender gave one,
/// otherwise on `<prefix>/<robot>/result`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    pub id: String,
    pub robot: String,
    /// The command named by the topic (a string, so unknown commands get a result too).
    pub command: String,
    pub status: CommandOutcome,
    /// Stable error code (`bad_payload`, `out_of_range`, `not_supported`, ...).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub code: Option<String>,
    /// Readable reason, for people.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// Something the sender should know about a command that was carried out anyway: a
    /// stop whose payload was refused or ignored (an e-stop is never refused for its
    /// payload). Absent from the document when there is none; results without it (from
    /// older nodes) read as `None`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub warning: Option<CommandWarning>,
    /// The operator of the command it answers (its `fleet-operator` user property or JSON
    /// `operator`), for people and the audit trail. Absent when the command named nobody;
    /// results without it (from older nodes) read as `None`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub operator: Option<String>,
}

/// `"warning": {"code": "bad_payload", "message": "..."}` in a result: what was wrong with
/// a command that was carried out all the same. The codes are the error codes
/// (`bad_payload`, `payload_too_large`, `out_of_range`, `expired`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandWarning {
    pub code: String,
    /// Readable reason, for people.
    pub message: String,
}

impl CommandWarning {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_owned(),
            message: message.into(),
        }
    }
}

/// The problem [`crate::CommandEnvelope::parse_stop`] found, as the stop's warning.
impl From<&CommandError> for CommandWarning {
    fn from(error: &CommandError) -> Self {
        Self::new(error.code(), error.to_string())
    }
}

impl CommandResult {
    pub fn ok(id: String, robot: String, command: &str) -> Self {
        Self {
            id,
            robot,
            command: command.to_owned(),
            status: CommandOutcome::Ok,
            code: None,
            error: None,
            warning: None,
            operator: None,
        }
    }

    /// The same result with `warning` (or without one, for `None`).
    pub fn with_warning(self, warning: Option<CommandWarning>) -> Self {
        Self { warning, ..self }
    }

    /// The same result with `operator` (or without one, for `None`).
    pub fn with_operator(self, operator: Option<String>) -> Self {
        Self { operator, ..self }
    }

    pub fn error(id: String, robot: String, command: &str, code: &str, error: String) -> Self {
        Self {
            id,
            robot,
            command: command.to_owned(),
            status: CommandOutcome::Error,
            code: Some(code.to_owned()),
            error: Some(error),
            warning: None,
            operator: None,
        }
    }
}

impl Serialize for CommandKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for CommandKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn state_document_shape() {
        let state = RobotState {
            robot: "linus".into(),
            motion: Direction::Forward,
            motors: vec![
                MotorState {
                    direction: MotorDirection::Forward,
                    speed: Some(10),
                },
                MotorState {
                    direction: MotorDirection::Forward,
                    speed: Some(10),
                },
            ],
            eyes: EyesState::Off,
            servos: vec![0, -90],
            last_command: Some(LastCommand {
                id: "c1".into(),
                command: CommandKind::Drive,
                status: CommandOutcome::Ok,
                at_ms: Some(1_699_999_999_990),
                code: None,
                error: None,
                operator: Some("ada".into()),
            }),
            uptime_s: 5,
            last_seen_ms: 1_700_000_000_000,
            estop: Some(LatchView::Clear),
        };
        let doc = serde_json::to_value(&state).unwrap();
        assert_eq!(doc["motion"], "forward");
        assert_eq!(doc["motors"][0], json!({"direction":"forward","speed":10}));
        assert_eq!(doc["last_command"]["command"], "drive");
        assert_eq!(doc["last_command"]["operator"], "ada");
        assert_eq!(doc["estop"], "clear");
        let back: RobotState = serde_json::from_value(doc).unwrap();
        assert_eq!(back, state);
    }

    #[test]
    fn last_command_operator_is_optional_both_ways() {
        let last = LastCommand {
            id: "c1".into(),
            command: CommandKind::Stop,
            status: CommandOutcome::Ok,
            at_ms: None,
            code: None,
            error: None,
            operator: None,
        };
        let doc = serde_json::to_value(&last).unwrap();
        assert_eq!(doc, json!({"id":"c1","command":"stop","status":"ok"}));
        // A document from a node older than the field reads as `None`.
        let old: LastCommand =
            serde_json::from_value(json!({"id":"c1","command":"stop","status":"ok"})).unwrap();
        assert_eq!(old, last);
    }

    #[test]
    fn a_result_echoes_its_operator_only_when_there_is_one() {
        let named = CommandResult::ok("c4".into(), "linus".into(), "drive")
            .with_operator(Some("ada".into()));
        let doc = serde_json::to_value(&named).unwrap();
        assert_eq!(
            doc,
            json!({"id":"c4","robot":"linus","command":"drive","status":"ok","operator":"ada"})
        );
        let back: CommandResult = serde_json::from_value(doc).unwrap();
        assert_eq!(back, named);
        let refused = CommandResult::error(
            "c5".into(),
            "linus".into(),
            "drive",
            "bad_payload",
            "no".into(),
        )
        .with_operator(Some("bob".into()));
        assert_eq!(serde_json::to_value(&refused).unwrap()["operator"], "bob");
        let nobody = CommandResult::ok("c6".into(), "linus".into(), "drive").with_operator(None);
        assert!(
            serde_json::to_value(&nobody)
                .unwrap()
                .get("operator")
                .is_none()
        );
    }

    #[test]
    fn latch_messages_engage_unless_they_clear() {
        let read = |payload: &[u8]| EstopLatch::read(payload);
        assert!(!read(b"").0.engaged, "an empty retained message clears");
        assert!(!read(br#"{"engaged":false}"#).0.engaged);
        let (latch, problem) = read(br#"{"engaged":true,"by":"ada","reason":"fire"}"#);
        assert!(latch.engaged && problem.is_none());
        assert_eq!(latch.by.as_deref(), Some("ada"));
        for unreadable in [&b"{}"[..], b"yes", b"{\"engaged\":\"no\"}", b"\xff"] {
            let (latch, problem) = read(unreadable);
            assert!(latch.engaged, "{unreadable:?} engages");
            assert!(problem.is_some());
        }
        let long = format!(r#"{{"engaged":true,"reason":"{}"}}"#, "x".repeat(5000));
        let (latch, _) = read(long.as_bytes());
        assert_eq!(latch.reason.map(|r| r.len()), Some(MAX_LATCH_TEXT));
    }

    #[test]
    fn results_omit_empty_error_fields() {
        let ok = CommandResult::ok("c1".into(), "linus".into(), "stop");
        assert_eq!(
            serde_json::to_value(&ok).unwrap(),
            json!({"id":"c1","robot":"linus","command":"stop","status":"ok"})
        );
        let err = CommandResult::error(
            "c2".into(),
            "torvalds".into(),
            "speed",
            "not_supported",
            "no".into(),
        );
        let doc = serde_json::to_value(&err).unwrap();
        assert_eq!(doc["status"], "error");
        assert_eq!(doc["code"], "not_supported");
    }

    #[test]
    fn a_warning_is_serialized_only_when_present_and_old_results_still_parse() {
        let (_, problem) = crate::CommandEnvelope::parse_stop(b"{");
        let warned = CommandResult::ok("c3".into(), "linus".into(), "stop")
            .with_warning(problem.as_ref().map(CommandWarning::from));
        let doc = serde_json::to_value(&warned).unwrap();
        assert_eq!(doc["status"], "ok");
        assert_eq!(doc["warning"]["code"], "bad_payload");
        assert!(
            doc["warning"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("invalid JSON"))
        );
        assert!(doc.get("code").is_none() && doc.get("error").is_none());
        let back: CommandResult = serde_json::from_value(doc).unwrap();
        assert_eq!(back, warned);
        // A result from before the field existed, and one with fields this crate does
        // not know yet, read as they did.
        let old: CommandResult = serde_json::from_value(
            json!({"id":"c1","robot":"linus","command":"stop","status":"ok","later":1}),
        )
        .unwrap();
        assert_eq!(old, CommandResult::ok("c1".into(), "linus".into(), "stop"));
        assert_eq!(
            serde_json::to_value(
                CommandResult::ok("c1".into(), "linus".into(), "stop").with_warning(None)
            )
            .unwrap(),
            json!({"id":"c1","robot":"linus","command":"stop","status":"ok"})
        );
    }

    #[test]
    fn availability_parses() {
        assert_eq!("online".parse(), Ok(Availability::Online));
        assert_eq!("offline\n".parse(), Ok(Availability::Offline));
        assert!("maybe".parse::<Availability>().is_err());
    }
}
