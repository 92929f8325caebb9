//! Topic names: `<prefix>/<robot>/cmd/<command>`, `<prefix>/<robot>/state`, and so on.

use std::fmt;
use std::str::FromStr;

use crate::command::{CommandAddress, CommandKind};

/// The robot id that addresses every robot at once (`fleet/all/cmd/stop` is the e-stop).
pub const ALL_ROBOTS: &str = "all";

/// The level under the prefix where the gateways' own topics live. Robot ids may not
/// start with `_`, so it never names a robot.
pub const GATEWAY_LEVEL: &str = "_gateway";

/// Longest robot id accepted; keeps topics and metric labels bounded.
pub const MAX_ROBOT_ID_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("robot id must not be empty")]
    EmptyRobotId,
    #[error("robot id is longer than {MAX_ROBOT_ID_LEN} characters")]
    RobotIdTooLong,
    #[error(
        "robot id {0:?} may only contain ASCII letters, digits, '-' and '_', and must not start with '_'"
    )]
    InvalidRobotId(String),
    #[error("robot id {0:?} is reserved")]
    ReservedRobotId(String),
    #[error(
        "topic prefix {0:?} must be non-empty and must not contain '+', '#', NUL or start/end with '/'"
    )]
    InvalidPrefix(String),
    #[error("topic {0:?} is not a command topic (<prefix>/<robot>/cmd/<command>)")]
    NotACommandTopic(String),
    #[error(
        "unknown command {0:?} (expected drive, speed, eyes, servo, stop, ping, decommission, motor1, motor2, servo1 or servo2)"
    )]
    UnknownCommand(String),
}

/// A robot's name as it appears in topics, e.g. `linus`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RobotId(String);

impl RobotId {
    pub fn new(id: impl Into<String>) -> Result<Self, TopicError> {
        let id = id.into();
        if id.is_empty() {
            return Err(TopicError::EmptyRobotId);
        }
        if id.len() > MAX_ROBOT_ID_LEN {
            return Err(TopicError::RobotIdTooLong);
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if !id.chars().all(allowed) || id.starts_with('_') {
            return Err(TopicError::InvalidRobotId(id));
        }
        if id == ALL_ROBOTS {
            return Err(TopicError::ReservedRobotId(id));
        }
        Ok(Self(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RobotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for RobotId {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A prefix of topic levels: non-empty, no wildcards or NUL, no leading or trailing `/`.
pub(crate) fn checked_prefix(prefix: String) -> Result<String, TopicError> {
    let bad = prefix.is_empty()
        || prefix.starts_with('/')
        || prefix.ends_with('/')
        || prefix.contains(['+', '#', '\0']);
    if bad {
        return Err(TopicError::InvalidPrefix(prefix));
    }
    Ok(prefix)
}

/// The first topic level of every fleet topic (default `fleet`). May contain `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPrefix(String);

impl TopicPrefix {
    pub fn new(prefix: impl Into<String>) -> Result<Self, TopicError> {
        checked_prefix(prefix.into()).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The topic prefix when none is given.
pub const DEFAULT_PREFIX: &str = "fleet";

impl Default for TopicPrefix {
    fn default() -> Self {
        Self(DEFAULT_PREFIX.to_owned())
    }
}

impl FromStr for TopicPrefix {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for TopicPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who a command topic addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandTarget {
    Robot(RobotId),
    All,
}

/// Builds and parses every topic of the contract for one prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topics {
    prefix: TopicPrefix,
}

impl Topics {
    pub fn new(prefix: TopicPrefix) -> Self {
        Self { prefix }
    }

    pub fn prefix(&self) -> &TopicPrefix {
        &self.prefix
    }

    /// `<prefix>/<robot>/cmd/<command>`
    pub fn command(&self, robot: &RobotId, kind: CommandKind) -> String {
        format!("{}/{}/cmd/{}", self.prefix, robot, kind)
    }

    /// `<prefix>/<robot>/cmd/<command or channel>`, e.g. `fleet/linus/cmd/servo1`.
    pub fn command_at(&self, robot: &RobotId, address: CommandAddress) -> String {
        format!("{}/{}/cmd/{}", self.prefix, robot, address)
    }

    /// `<prefix>/all/cmd/<command>`: reaches every robot.
    pub fn fleet_command(&self, kind: CommandKind) -> String {
        format!("{}/{ALL_ROBOTS}/cmd/{}", self.prefix, kind)
    }

    /// Subscription filter for one robot's commands.
    pub fn command_filter(&self, robot: &RobotId) -> String {
        format!("{}/{}/cmd/+", self.prefix, robot)
    }

    /// Subscription filter for fleet-wide commands.
    pub fn fleet_command_filter(&self) -> String {
        format!("{}/{ALL_ROBOTS}/cmd/+", self.prefix)
    }

    /// `<prefix>/<robot>/state`: retained JSON state.
    pub fn state(&self, robot: &RobotId) -> String {
        format!("{}/{}/state", self.prefix, robot)
    }

    /// `<prefix>/<robot>/status`: retained `online` / `offline` (the last will).
    pub fn status(&self, robot: &RobotId) -> String {
        format!("{}/{}/status", self.prefix, robot)
    }

    /// `<prefix>/<robot>/result`: command results for senders that gave no response topic.
    pub fn result(&self, robot: &RobotId) -> String {
        format!("{}/{}/result", self.prefix, robot)
    }

    /// `<prefix>/+/<leaf>`: one leaf topic of every robot (`state`, `status`, `result`).
    pub fn every_robot(&self, leaf: &str) -> String {
        format!("{}/+/{leaf}", self.prefix)
    }

    /// Where a gateway instance asks `robot` to send the result of a command (MQTT 5
    /// response topic): `<prefix>/_gateway/<instance>/<robot>/result`. One topic per
    /// robot, so that the broker's ACL can let a robot publish only to its own
    /// (`<prefix>/_gateway/+/<robot>/result`) and no robot can answer for another. The
    /// leading `_` keeps it apart from robot ids, which may not start with `_`.
    pub fn gateway_reply(&self, instance: &str, robot: &RobotId) -> String {
        format!("{}/{GATEWAY_LEVEL}/{instance}/{robot}/result", self.prefix)
    }

    /// `<prefix>/estop` (retained): the fleet's latched e-stop ([`crate::EstopLatch`]).
    /// Two levels, so no robot's topic (three or more) is it.
    pub fn estop(&self) -> String {
        format!("{}/estop", self.prefix)
    }

    /// Whether `topic` is [`Topics::estop`], without building it (every message is asked).
    pub fn is_estop(&self, topic: &str) -> bool {
        self.leaf_is(topic, "estop")
    }

    /// Whether `topic` is [`Topics::gateway_status`], without building it.
    pub fn is_gateway_status(&self, topic: &str) -> bool {
        topic
            .strip_prefix(self.prefix.as_str())
            .and_then(|t| t.strip_prefix('/'))
            .and_then(|t| t.strip_prefix(GATEWAY_LEVEL))
            == Some("/status")
    }

    /// `<prefix>/<rest>` is `topic`.
    fn leaf_is(&self, topic: &str, rest: &str) -> bool {
        topic
            .strip_prefix(self.prefix.as_str())
            .and_then(|t| t.strip_prefix('/'))
            == Some(rest)
    }

    /// `<prefix>/_gateway/status` (retained): `online` while a gateway is connected,
    /// `offline` (its last will) when it is gone. The fleet's Home Assistant device is
    /// available by it.
    pub fn gateway_status(&self) -> String {
        format!("{}/{GATEWAY_LEVEL}/status", self.prefix)
    }

    /// `<prefix>/_gateway/state` (retained): the gateway's summary of the fleet
    /// ([`crate::state::FleetSummary`]).
    pub fn gateway_state(&self) -> String {
        format!("{}/{GATEWAY_LEVEL}/state", self.prefix)
    }

    /// Subscription filter for every reply to one gateway instance:
    /// `<prefix>/_gateway/<instance>/+/result`.
    pub fn gateway_replies_filter(&self, instance: &str) -> String {
        format!("{}/{GATEWAY_LEVEL}/{instance}/+/result", self.prefix)
    }

    /// The robot a reply topic of `instance` belongs to
    /// (`<prefix>/_gateway/<instance>/<robot>/result`), if it is one and names a valid
    /// robot id.
    pub fn gateway_reply_robot<'t>(&self, instance: &str, topic: &'t str) -> Option<&'t str> {
        let robot = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("/_gateway/")?
            .strip_prefix(instance)?
            .strip_prefix('/')?
            .strip_suffix("/result")?;
        RobotId::new(robot).is_ok().then_some(robot)
    }

    /// Parses `<prefix>/<robot|all>/cmd/<command or channel>`.
    pub fn parse_command(
        &self,
        topic: &str,
    ) -> Result<(CommandTarget, CommandAddress), TopicError> {
        let not_command = || TopicError::NotACommandTopic(topic.to_owned());
        let rest = topic
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(not_command)?;
        let mut levels = rest.split('/');
        let (Some(robot), Some("cmd"), Some(command), None) =
            (levels.next(), levels.next(), levels.next(), levels.next())
        else {
            return Err(not_command());
        };
        let target = if robot == ALL_ROBOTS {
            CommandTarget::All
        } else {
            CommandTarget::Robot(RobotId::new(robot)?)
        };
        let address = command
            .parse()
            .map_err(|_| TopicError::UnknownCommand(command.to_owned()))?;
        Ok((target, address))
    }

    /// The robot a `<prefix>/<robot>/<leaf>` topic belongs to, if it is one of ours.
    pub fn robot_of<'t>(&self, topic: &'t str, leaf: &str) -> Option<&'t str> {
        let rest = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('/')?;
        let robot = rest.strip_suffix(leaf)?.strip_suffix('/')?;
        (!robot.is_empty() && !robot.contains('/')).then_some(robot)
    }

    /// Whether `topic` is any command topic (`<prefix>/<x>/cmd/<y>`), valid or not.
    /// The broker uses it to refuse retained commands.
    pub fn is_command_topic(&self, topic: &str) -> bool {
        topic
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .map(|rest| rest.split('/').nth(1) == Some("cmd"))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linus() -> RobotId {
        RobotId::new("linus").unwrap()
    }

    #[test]
    fn builds_the_documented_topics() {
        let t = Topics::default();
        assert_eq!(
            t.command(&linus(), CommandKind::Drive),
            "fleet/linus/cmd/drive"
        );
        assert_eq!(t.fleet_command(CommandKind::Stop), "fleet/all/cmd/stop");
        assert_eq!(t.state(&linus()), "fleet/linus/state");
        assert_eq!(t.status(&linus()), "fleet/linus/status");
        assert_eq!(t.result(&linus()), "fleet/linus/result");
        assert_eq!(t.command_filter(&linus()), "fleet/linus/cmd/+");
        assert_eq!(t.every_robot("state"), "fleet/+/state");
    }

    #[test]
    fn parses_command_topics() {
        let t = Topics::default();
        assert_eq!(
            t.parse_command("fleet/linus/cmd/drive").unwrap(),
            (CommandTarget::Robot(linus()), CommandKind::Drive.into())
        );
        assert_eq!(
            t.parse_command("fleet/all/cmd/stop").unwrap(),
            (CommandTarget::All, CommandKind::Stop.into())
        );
        assert_eq!(
            t.parse_command("fleet/linus/cmd/servo2").unwrap(),
            (
                CommandTarget::Robot(linus()),
                CommandAddress::Channel(crate::command::Channel::Servo(1))
            )
        );
        assert!(matches!(
            t.parse_command("fleet/linus/cmd/dance"),
            Err(TopicError::UnknownCommand(c)) if c == "dance"
        ));
        for bad in [
            "fleet/linus/state",
            "other/linus/cmd/drive",
            "fleet/linus/cmd/drive/x",
            "fleetx/linus/cmd/drive",
        ] {
            assert!(t.parse_command(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn prefixes_may_have_levels() {
        let t = Topics::new(TopicPrefix::new("site/a").unwrap());
        assert_eq!(
            t.command(&linus(), CommandKind::Stop),
            "site/a/linus/cmd/stop"
        );
        assert!(t.parse_command("site/a/linus/cmd/stop").is_ok());
        assert_eq!(t.robot_of("site/a/linus/state", "state"), Some("linus"));
        for bad in ["", "/x", "x/", "a/+", "#", "a\0b"] {
            assert!(TopicPrefix::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn robot_ids_are_validated() {
        for bad in [
            "",
            "all",
            "_gateway",
            "a/b",
            "a+b",
            "a#",
            "li nus",
            &"x".repeat(65),
        ] {
            assert!(RobotId::new(bad).is_err(), "{bad:?}");
        }
        for good in ["linus", "torvalds", "robot-7", "R2_D2"] {
            assert!(RobotId::new(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn recognises_command_topics_for_the_broker() {
        let t = Topics::default();
        assert!(t.is_command_topic("fleet/linus/cmd/drive"));
        assert!(t.is_command_topic("fleet/anything/cmd/whatever/deeper"));
        assert!(!t.is_command_topic("fleet/linus/state"));
        assert!(!t.is_command_topic("other/linus/cmd/drive"));
    }

    #[test]
    fn latch_and_gateway_status_topics_are_recognised_without_building_them() {
        for topics in [
            Topics::default(),
            Topics::new(TopicPrefix::new("site/a").unwrap()),
        ] {
            assert!(topics.is_estop(&topics.estop()));
            assert!(topics.is_gateway_status(&topics.gateway_status()));
            for other in [
                topics.gateway_state(),
                topics.estop() + "/x",
                topics.gateway_status() + "x",
                "estop".to_owned(),
                "other/estop".to_owned(),
            ] {
                assert!(!topics.is_estop(&other), "{other}");
                assert!(!topics.is_gateway_status(&other), "{other}");
            }
        }
        let prefix = crate::DiscoveryPrefix::new("ha/test").unwrap();
        assert!(prefix.is_status_topic(&prefix.status_topic()));
        assert!(!prefix.is_status_topic("ha/test/statusx"));
        assert!(!prefix.is_status_topic("ha/status"));
    }

    #[test]
    fn gateway_reply_topics_name_the_robot() {
        let t = Topics::default();
        assert_eq!(
            t.gateway_reply("gw-1", &linus()),
            "fleet/_gateway/gw-1/linus/result"
        );
        assert_eq!(
            t.gateway_replies_filter("gw-1"),
            "fleet/_gateway/gw-1/+/result"
        );
        assert_eq!(
            t.gateway_reply_robot("gw-1", "fleet/_gateway/gw-1/linus/result"),
            Some("linus")
        );
        let round_trip = t.gateway_reply("gw-1", &linus());
        assert_eq!(t.gateway_reply_robot("gw-1", &round_trip), Some("linus"));
        for bad in [
            "fleet/_gateway/gw-1/result",
            "fleet/_gateway/gw-2/linus/result",
            "fleet/_gateway/gw-1/linus/state",
            "fleet/_gateway/gw-1/a/b/result",
            "fleet/_gateway/gw-1//result",
            "fleet/_gateway/gw-1/all/result",
            "fleet/_gateway/gw-1/_x/result",
            "fleet/_gateway/gw-1/li nus/result",
            "fleet/_gateway/gw-10/linus/result",
            "other/_gateway/gw-1/linus/result",
            "fleet/linus/result",
        ] {
            assert_eq!(t.gateway_reply_robot("gw-1", bad), None, "{bad}");
        }
        let site = Topics::new(TopicPrefix::new("site/a").unwrap());
        assert_eq!(
            site.gateway_reply_robot("gw-1", "site/a/_gateway/gw-1/linus/result"),
            Some("linus")
        );
    }

    #[test]
    fn finds_the_robot_of_a_leaf_topic() {
        let t = Topics::default();
        assert_eq!(t.robot_of("fleet/linus/state", "state"), Some("linus"));
        assert_eq!(t.robot_of("fleet/linus/status", "state"), None);
        assert_eq!(t.robot_of("fleet//state", "state"), None);
        assert_eq!(t.robot_of("fleet/a/b/state", "state"), None);
    }
}
