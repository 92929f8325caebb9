//! The fleet's MQTT wire contract, shared by the broker, the robot node and the gateway.
//!
//! Everything here is pure data and parsing: topics, command payloads (plain text and
//! JSON), state, status and result documents, and the W3C trace-context carrier. No I/O,
//! so every rule of the contract can be unit-tested and fuzzed in isolation.
//! `docs/protocol.md` is the human-readable version of this crate.

pub mod command;
pub mod discovery;
pub mod state;
pub mod topic;
pub mod trace;

pub use command::{
    Channel, Command, CommandAddress, CommandEnvelope, CommandError, CommandKind, Direction,
    EyesCommand, ServoTarget, SpeedTarget,
};
pub use discovery::{BridgeDevice, Capabilities, DiscoveryDevice, DiscoveryPrefix};
pub use state::{
    Availability, CommandOutcome, CommandResult, CommandWarning, EstopLatch, EyesState,
    FleetSummary, LastCommand, LatchView, MotorDirection, MotorState, RobotState,
};
pub use topic::{CommandTarget, RobotId, TopicError, TopicPrefix, Topics};
pub use trace::{TraceContextError, TraceParent};

/// MQTT 5 user property that carries the command id alongside the payload.
pub const COMMAND_ID_PROPERTY: &str = "command-id";

/// MQTT 5 user property that carries the operator's name (who sent the command) alongside
/// the payload; MQTT 3.1.1 senders put it in the JSON `operator` field instead. Validated
/// as [`command::validate_operator`] says, and echoed in the result and the state.
pub const OPERATOR_PROPERTY: &str = "fleet-operator";
