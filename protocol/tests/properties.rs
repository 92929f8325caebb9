//! Property tests of everything in the contract that reads input from the network: the
//! command parser (bytes, text and JSON, at every command and channel topic), the topic
//! parser and the trace-context parser never panic and refuse what they cannot read with
//! an error that has a code; a stop is a stop whatever its payload; the encoders (canonical command JSON, state and result
//! documents, discovery documents) produce what the parsers read back.
//!
//! `.ci/run` runs this file with a fixed number of cases per property
//! (`PROPTEST_CASES`, 256 by default). Failures proptest finds are kept in
//! `tests/properties.proptest-regressions` and replayed first on every run.

use std::collections::HashSet;

use fleet_protocol::command::{
    MAX_COMMAND_PAYLOAD, MAX_OPERATOR_LEN, MAX_TRACESTATE_LEN, validate_id, validate_operator,
};
use fleet_protocol::{
    Capabilities, Channel, Command, CommandAddress, CommandEnvelope, CommandError, CommandKind,
    CommandOutcome, CommandResult, CommandTarget, CommandWarning, Direction, DiscoveryDevice,
    DiscoveryPrefix, EyesCommand, EyesState, LastCommand, MotorDirection, MotorState, RobotId,
    RobotState, ServoTarget, SpeedTarget, TopicPrefix, Topics, TraceParent,
};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

// ---- strategies ------------------------------------------------------------------------

fn address() -> impl Strategy<Value = CommandAddress> {
    let all: Vec<CommandAddress> = CommandAddress::all().collect();
    proptest::sample::select(all)
}

fn direction() -> impl Strategy<Value = Direction> {
    proptest::sample::select(Direction::ALL.to_vec())
}

/// Words a sender might plausibly use, so that random text reaches deep into the parser
/// instead of failing on the first character.
const VOCABULARY: &[&str] = &[
    "forward", "backward", "left", "right", "stop", "north", "south", "east", "west", "on", "off",
    "ON", "OFF", "blink", "PRESS", "min", "mid", "max", "30%", "50%", "100%", "30", "50", "100",
    "0", "10", "11", "-90", "90", "91", "45.0", "45.5", "1e3", "-0", "NaN", "inf", "speed",
    "hold_ms", "{", "}", "\"", ":", ",",
];

fn vocabulary_text() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            proptest::sample::select(VOCABULARY).prop_map(str::to_owned),
            any::<i64>().prop_map(|n| n.to_string()),
            "[ \t\n]{1,3}",
        ],
        0..6,
    )
    .prop_map(|words| words.join(" "))
}

/// Field names the JSON parser knows, and a few it does not.
const FIELDS: &[&str] = &[
    "direction",
    "speed",
    "hold_ms",
    "motor1",
    "motor2",
    "preset",
    "state",
    "duration_ms",
    "servo1",
    "servo2",
    "value",
    "id",
    "traceparent",
    "tracestate",
    "deadline_ms",
    "operator",
    "extra",
    "",
];

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-200i64..200).prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        proptest::sample::select(VOCABULARY).prop_map(Value::from),
        ".{0,20}".prop_map(Value::from),
        Just(Value::from(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        )),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec((proptest::sample::select(FIELDS), inner), 0..4).prop_map(
                |fields| Value::Object(
                    fields
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect::<Map<_, _>>()
                )
            ),
        ]
    })
}

/// JSON objects built from the parser's own field names with values of every type.
fn json_command_object() -> impl Strategy<Value = Value> {
    proptest::collection::vec((proptest::sample::select(FIELDS), json_value()), 0..5).prop_map(
        |fields| Value::Object(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()),
    )
}

fn command_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._:-]{1,64}"
}

/// Operator names: any characters but control characters, 1 to 64 of them.
fn operator() -> impl Strategy<Value = String> {
    "[^\\p{Cc}]{1,64}"
}

fn traceparent() -> impl Strategy<Value = TraceParent> {
    (any::<[u8; 16]>(), any::<[u8; 8]>(), any::<u8>()).prop_filter_map(
        "ids must not be all zero",
        |(trace_id, span_id, flags)| {
            TraceParent::new_root(trace_id, span_id).map(|t| TraceParent { flags, ..t })
        },
    )
}

fn command() -> impl Strategy<Value = Command> {
    let speed = 0u8..=10;
    let angle = -90i16..=90;
    prop_oneof![
        (
            direction(),
            proptest::option::of(speed.clone()),
            proptest::option::of(1u32..=60_000)
        )
            .prop_map(|(direction, speed, hold_ms)| Command::Drive {
                direction,
                speed,
                hold_ms
            }),
        [
            proptest::option::of(speed.clone()),
            proptest::option::of(speed)
        ]
        .prop_filter("at least one motor", |m| m.iter().any(Option::is_some))
        .prop_map(|m| Command::Speed(SpeedTarget(m))),
        [
            proptest::option::of(angle.clone()),
            proptest::option::of(angle)
        ]
        .prop_filter("at least one servo", |s| s.iter().any(Option::is_some))
        .prop_map(|s| Command::Servo(ServoTarget(s))),
        Just(Command::Eyes(EyesCommand::On)),
        Just(Command::Eyes(EyesCommand::Off)),
        proptest::option::of(1u32..=10_000)
            .prop_map(|duration_ms| Command::Eyes(EyesCommand::Blink { duration_ms })),
        Just(Command::Stop),
        Just(Command::Ping),
        Just(Command::Decommission),
    ]
}

fn envelope() -> impl Strategy<Value = CommandEnvelope> {
    (
        command(),
        proptest::option::of(command_id()),
        proptest::option::of(traceparent()),
        proptest::option::of("[ -~]{0,64}"),
        proptest::option::of(0..=i64::MAX as u64),
        proptest::option::of(operator()),
    )
        .prop_map(
            |(command, id, traceparent, tracestate, deadline_ms, operator)| CommandEnvelope {
                id,
                traceparent,
                tracestate,
                deadline_ms,
                operator,
                command,
            },
        )
}

fn robot_id() -> impl Strategy<Value = RobotId> {
    "[A-Za-z0-9-][A-Za-z0-9_-]{0,63}"
        .prop_filter_map("not the reserved id", |id| RobotId::new(id).ok())
}

fn topic_prefix() -> impl Strategy<Value = String> {
    "[a-z0-9_ .-]{1,10}(/[a-z0-9_-]{1,10}){0,2}"
}

fn robot_state() -> impl Strategy<Value = RobotState> {
    let motor = (
        proptest::sample::select(vec![
            MotorDirection::Forward,
            MotorDirection::Backward,
            MotorDirection::Stopped,
        ]),
        proptest::option::of(0u8..=10),
    )
        .prop_map(|(direction, speed)| MotorState { direction, speed });
    let last_command = (
        command_id(),
        proptest::sample::select(CommandKind::ALL.to_vec()),
        any::<bool>(),
        proptest::option::of(any::<u64>()),
        proptest::option::of(operator()),
    )
        .prop_map(|(id, command, ok, at_ms, operator)| LastCommand {
            id,
            command,
            status: if ok {
                CommandOutcome::Ok
            } else {
                CommandOutcome::Error
            },
            at_ms,
            code: (!ok).then(|| "out_of_range".to_owned()),
            error: (!ok).then(|| "angle 500 is outside -90..90".to_owned()),
            operator,
        });
    (
        robot_id(),
        direction(),
        proptest::collection::vec(motor, 0..=2),
        any::<bool>(),
        proptest::collection::vec(-90i16..=90, 0..=2),
        proptest::option::of(last_command),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(robot, motion, motors, eyes_on, servos, last_command, uptime_s, last_seen_ms)| {
                RobotState {
                    robot: robot.to_string(),
                    motion,
                    motors,
                    eyes: if eyes_on {
                        EyesState::On
                    } else {
                        EyesState::Off
                    },
                    servos,
                    last_command,
                    uptime_s,
                    last_seen_ms,
                    // The latch view follows from the uptime's parity (no 9-tuples).
                    estop: [
                        Some(fleet_protocol::LatchView::Clear),
                        Some(fleet_protocol::LatchView::Engaged),
                        Some(fleet_protocol::LatchView::Unknown),
                        None,
                    ]
                    .get((uptime_s % 4) as usize)
                    .copied()
                    .flatten(),
                }
            },
        )
}

/// Every refusal names a stable code and a readable reason, and the reason is bounded
/// (it is echoed into the error result).
fn assert_reported(error: &CommandError) {
    assert!(!error.code().is_empty());
    let text = error.to_string();
    assert!(!text.is_empty());
    assert!(
        text.len() < 1024,
        "error text too long: {} bytes",
        text.len()
    );
}

// ---- the parser never panics ----------------------------------------------------------

proptest! {
    #[test]
    fn any_bytes_at_any_address(address in address(), payload in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Err(error) = CommandEnvelope::parse_at(address, &payload) {
            assert_reported(&error);
        }
    }

    #[test]
    fn any_text_at_any_address(address in address(), text in ".{0,200}") {
        if let Err(error) = CommandEnvelope::parse_at(address, text.as_bytes()) {
            assert_reported(&error);
        }
    }

    #[test]
    fn words_and_numbers_at_any_address(address in address(), text in vocabulary_text()) {
        if let Err(error) = CommandEnvelope::parse_at(address, text.as_bytes()) {
            assert_reported(&error);
        }
    }

    #[test]
    fn any_json_at_any_address(address in address(), doc in prop_oneof![json_command_object(), json_value()]) {
        let payload = doc.to_string();
        match CommandEnvelope::parse_at(address, payload.as_bytes()) {
            Err(error) => assert_reported(&error),
            // Whatever was accepted is a command of the kind the topic names, and its
            // canonical form reads back as the same command.
            Ok(envelope) => {
                prop_assert_eq!(envelope.command.kind(), address.kind());
                let canonical = envelope.to_json().to_string();
                let again = CommandEnvelope::parse(address.kind(), canonical.as_bytes());
                prop_assert_eq!(again, Ok(envelope));
            }
        }
    }

    #[test]
    fn a_stop_is_a_stop_whatever_its_payload(payload in prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..600),
        ".{0,200}".prop_map(String::into_bytes),
        vocabulary_text().prop_map(String::into_bytes),
        prop_oneof![json_command_object(), json_value()].prop_map(|doc| doc.to_string().into_bytes()),
        (1usize..2048, any::<u8>()).prop_map(|(extra, byte)| vec![byte; MAX_COMMAND_PAYLOAD + extra]),
    ]) {
        let (envelope, problem) = CommandEnvelope::parse_stop(&payload);
        prop_assert_eq!(envelope.command, Command::Stop);
        if let Some(problem) = &problem {
            assert_reported(problem);
        }
        // The strict parser (at both entry points) refuses exactly what the lenient one
        // warns about, with the same error.
        let strict = problem.map_or(Ok(envelope), Err);
        prop_assert_eq!(&CommandEnvelope::parse(CommandKind::Stop, &payload), &strict);
        prop_assert_eq!(&CommandEnvelope::parse_at(CommandKind::Stop.into(), &payload), &strict);
    }

    #[test]
    fn a_stop_keeps_the_valid_fields_of_any_json_object(doc in json_command_object()) {
        let payload = doc.to_string();
        prop_assume!(payload.len() <= MAX_COMMAND_PAYLOAD);
        let (envelope, _) = CommandEnvelope::parse_stop(payload.as_bytes());
        let id = doc.get("id").and_then(Value::as_str).filter(|id| validate_id(id).is_ok());
        prop_assert_eq!(envelope.id.as_deref(), id);
        let traceparent = doc.get("traceparent").and_then(Value::as_str).and_then(|t| t.parse::<TraceParent>().ok());
        prop_assert_eq!(envelope.traceparent, traceparent);
        let operator = doc.get("operator").and_then(Value::as_str).filter(|o| validate_operator(o).is_ok());
        prop_assert_eq!(envelope.operator.as_deref(), operator);
        // What was kept is clean: its canonical form passes the strict parser.
        let canonical = envelope.to_json().to_string();
        prop_assert_eq!(CommandEnvelope::parse(CommandKind::Stop, canonical.as_bytes()), Ok(envelope));
    }

    #[test]
    fn oversized_payloads_are_refused_before_parsing(address in address(), extra in 1usize..2048, byte in any::<u8>()) {
        let payload = vec![byte; MAX_COMMAND_PAYLOAD + extra];
        let refused = CommandEnvelope::parse_at(address, &payload);
        prop_assert!(matches!(refused, Err(CommandError::TooLarge { .. })), "{:?}", refused);
    }
}

// ---- encoders and parsers agree -------------------------------------------------------

proptest! {
    #[test]
    fn canonical_json_round_trips(envelope in envelope()) {
        let payload = envelope.to_json().to_string();
        prop_assert!(payload.len() <= MAX_COMMAND_PAYLOAD);
        let parsed = CommandEnvelope::parse(envelope.command.kind(), payload.as_bytes());
        prop_assert_eq!(parsed, Ok(envelope));
    }

    #[test]
    fn plain_text_directions_drive(direction in direction(), padding in "[ \t\n]{0,3}") {
        let payload = format!("{padding}{}{padding}", direction.as_str());
        let parsed = CommandEnvelope::parse(CommandKind::Drive, payload.as_bytes()).map(|e| e.command);
        prop_assert_eq!(parsed, Ok(Command::Drive { direction, speed: None, hold_ms: None }));
    }

    #[test]
    fn channel_values_in_range_are_accepted(channel in proptest::sample::select(Channel::ALL.to_vec()), value in -200i64..200) {
        let (min, max) = match channel.kind() {
            CommandKind::Servo => (-90, 90),
            _ => (0, 10),
        };
        let in_range = (min..=max).contains(&value);
        for payload in [value.to_string(), format!("{value}.0"), json!({ "value": value }).to_string()] {
            let parsed = CommandEnvelope::parse_at(CommandAddress::Channel(channel), payload.as_bytes());
            prop_assert_eq!(parsed.is_ok(), in_range, "{} on {}: {:?}", payload, channel.as_str(), parsed);
            if let Ok(envelope) = parsed {
                prop_assert_eq!(envelope.command.kind(), channel.kind());
            }
        }
    }

    #[test]
    fn tracestate_longer_than_the_limit_is_refused(extra in 1usize..64) {
        let doc = json!({ "tracestate": "a".repeat(MAX_TRACESTATE_LEN + extra) });
        let parsed = CommandEnvelope::parse(CommandKind::Stop, doc.to_string().as_bytes());
        prop_assert!(parsed.is_err());
    }

    #[test]
    fn operators_are_validated_by_length_and_control_characters(text in prop_oneof![".{0,80}", "\\PC{0,70}", "[a-z\t\n\u{0}\u{7f}\u{85}]{0,70}"]) {
        let valid = (1..=MAX_OPERATOR_LEN).contains(&text.chars().count()) && !text.chars().any(char::is_control);
        prop_assert_eq!(validate_operator(&text).is_ok(), valid, "{:?}", text);
        let doc = json!({ "operator": text });
        let parsed = CommandEnvelope::parse(CommandKind::Ping, doc.to_string().as_bytes());
        prop_assert_eq!(parsed.is_ok(), valid, "{:?}", parsed);
        if let Ok(envelope) = parsed {
            prop_assert_eq!(envelope.operator, Some(text));
        }
    }

    #[test]
    fn traceparent_parser_never_panics(text in ".{0,80}") {
        let _ = text.parse::<TraceParent>();
    }

    #[test]
    fn traceparent_round_trips(traceparent in traceparent()) {
        prop_assert_eq!(traceparent.to_string().parse::<TraceParent>(), Ok(traceparent));
    }

    #[test]
    fn robot_state_round_trips(state in robot_state()) {
        let text = serde_json::to_string(&state).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let parsed: RobotState = serde_json::from_str(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(parsed, state);
    }

    #[test]
    fn command_result_round_trips(id in command_id(), robot in robot_id(), command in ".{0,20}", error in proptest::option::of(("[a-z_]{1,20}", ".{0,80}")), warning in proptest::option::of(("[a-z_]{1,20}", ".{0,80}")), operator in proptest::option::of(operator())) {
        let result = match error {
            None => CommandResult::ok(id, robot.to_string(), &command),
            Some((code, text)) => CommandResult::error(id, robot.to_string(), &command, &code, text),
        }
        .with_warning(warning.map(|(code, message)| CommandWarning::new(&code, message)))
        .with_operator(operator);
        let text = serde_json::to_string(&result).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(text.contains("\"warning\""), result.warning.is_some(), "{}", text);
        prop_assert_eq!(text.contains("\"operator\""), result.operator.is_some(), "{}", text);
        let parsed: CommandResult = serde_json::from_str(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(parsed, result);
    }
}

// ---- topics ----------------------------------------------------------------------------

proptest! {
    #[test]
    fn topic_parser_never_panics(prefix in topic_prefix(), topic in prop_oneof![".{0,80}", "[a-z/+#]{0,40}", "fleet/[a-z_+#/]{0,20}/cmd/[a-z0-9]{0,10}"]) {
        let Ok(prefix) = TopicPrefix::new(prefix) else { return Ok(()) };
        let topics = Topics::new(prefix);
        let _ = topics.parse_command(&topic);
        let _ = topics.robot_of(&topic, "state");
        let _ = topics.is_command_topic(&topic);
    }

    #[test]
    fn command_topics_round_trip(prefix in topic_prefix(), robot in robot_id(), address in address()) {
        let Ok(prefix) = TopicPrefix::new(prefix) else { return Ok(()) };
        let topics = Topics::new(prefix);
        let topic = topics.command_at(&robot, address);
        prop_assert!(topics.is_command_topic(&topic));
        prop_assert_eq!(topics.parse_command(&topic), Ok((CommandTarget::Robot(robot.clone()), address)));
        let state_topic = topics.state(&robot);
        prop_assert_eq!(topics.robot_of(&state_topic, "state"), Some(robot.as_str()));
    }

    #[test]
    fn robot_ids_are_validated_without_panicking(id in ".{0,80}") {
        if let Ok(robot) = RobotId::new(id.clone()) {
            prop_assert!(!robot.as_str().contains(['/', '+', '#', '\0']));
            prop_assert!(robot.as_str().len() <= 64);
        }
    }
}

// ---- discovery documents ---------------------------------------------------------------

proptest! {
    #[test]
    fn discovery_documents_are_consistent(
        prefix in topic_prefix(),
        discovery_prefix in topic_prefix(),
        robot in robot_id(),
        speed_control in any::<bool>(),
        servos in 0usize..=2,
        sw_version in "[0-9a-z.+-]{1,20}",
        configuration_url in proptest::option::of("http://[a-z0-9.]{1,20}:[0-9]{2,5}/"),
    ) {
        let (Ok(prefix), Ok(discovery_prefix)) = (TopicPrefix::new(prefix), DiscoveryPrefix::new(discovery_prefix)) else {
            return Ok(());
        };
        let topics = Topics::new(prefix);
        let device = DiscoveryDevice {
            topics: &topics,
            prefix: &discovery_prefix,
            robot: &robot,
            capabilities: Capabilities { speed_control, servos },
            sw_version: &sw_version,
            configuration_url: configuration_url.as_deref(),
        };
        let config_topic = device.config_topic();
        let device_topics = format!("{discovery_prefix}/device/");
        prop_assert!(config_topic.starts_with(&device_topics), "{}", config_topic);
        prop_assert!(config_topic.ends_with("/config"));
        prop_assert!(!config_topic.contains(['+', '#', '\0']));

        let doc = device.document();
        // What goes on the wire reads back as the same document.
        let text = doc.to_string();
        let reread: Value = serde_json::from_str(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&reread, &doc);
        let status_topic = topics.status(&robot);
        let bridge = fleet_protocol::discovery::bridge_object_id(&topics);
        prop_assert_eq!(doc["device"]["via_device"].as_str(), Some(bridge.as_str()));

        let Some(components) = doc["components"].as_object() else {
            return Err(TestCaseError::fail("no components"));
        };
        let mut unique_ids = HashSet::new();
        for (key, component) in components {
            let unique_id = component["unique_id"].as_str().unwrap_or_default();
            prop_assert_eq!(unique_id, key.as_str());
            prop_assert!(unique_id.starts_with(&device.object_id()), "{}", unique_id);
            prop_assert!(unique_ids.insert(unique_id.to_owned()), "duplicate {}", unique_id);
            if let Some(state_topic) = component.get("state_topic").and_then(Value::as_str) {
                prop_assert_eq!(state_topic, topics.state(&robot));
            }
            // Available by the robot's status, except its last-seen time.
            let availability = component.get("availability_topic").and_then(Value::as_str);
            if unique_id.ends_with("_last_seen") {
                prop_assert_eq!(availability, None);
            } else {
                prop_assert_eq!(availability, Some(status_topic.as_str()), "{}", unique_id);
            }
            if let Some(command_topic) = component.get("command_topic").and_then(Value::as_str) {
                let routed = topics.parse_command(command_topic);
                prop_assert!(routed.is_ok(), "{} does not route: {:?}", command_topic, routed);
            }
        }
        // One number per servo; per-motor speed numbers only with speed control.
        let own = format!("{}_", device.object_id());
        let names: Vec<&str> = components.keys().filter_map(|k| k.strip_prefix(own.as_str())).collect();
        prop_assert_eq!(names.len(), components.len());
        prop_assert_eq!(names.iter().filter(|n| n.starts_with("servo")).count(), servos);
        let motor_numbers = names.iter().filter(|n| n.starts_with("motor")).count();
        prop_assert_eq!(motor_numbers, if speed_control { 2 } else { 0 });
    }
}
