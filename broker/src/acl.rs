//! Who may publish and subscribe to what. Pure rules over topic names and filters, so the
//! whole matrix is unit-tested; the broker's hooks only look up the client's role.

use std::fmt;
use std::str::FromStr;

use fleet_protocol::topic::GATEWAY_LEVEL;
use fleet_protocol::{CommandKind, Topics};

/// What a user is for. Templated by username: a robot's username is its robot id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything (operators, the all-in-one default for anonymous loopback clients).
    Admin,
    /// The gateway: send commands, read everything of the fleet, publish the fleet's own
    /// Home Assistant device and the gateway's status and summary.
    Controller,
    /// Home Assistant (or a Mosquitto bridge in front of it): read everything of the
    /// fleet, drive and stop robots, announce itself. It may not decommission a robot, and
    /// its subscriptions to other integrations' discovery topics (`tasmota/discovery/#`,
    /// `dsmr/#`, …, made on every connect) are granted: nothing of the fleet is there.
    HomeAssistant,
    /// A robot node: its own commands in, its own topics, replies and discovery out.
    Robot,
    /// Dashboards: read only.
    Reader,
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "controller" => Ok(Role::Controller),
            "homeassistant" => Ok(Role::HomeAssistant),
            "robot" => Ok(Role::Robot),
            "reader" => Ok(Role::Reader),
            other => Err(format!(
                "unknown role {other:?} (expected admin, controller, homeassistant, robot or reader)"
            )),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Admin => "admin",
            Role::Controller => "controller",
            Role::HomeAssistant => "homeassistant",
            Role::Robot => "robot",
            Role::Reader => "reader",
        })
    }
}

/// The topic trees the rules talk about.
#[derive(Debug, Clone)]
pub struct AclTopics {
    pub fleet: Topics,
    /// Home Assistant's discovery prefix (default `homeassistant`).
    pub discovery_prefix: String,
}

impl Default for AclTopics {
    fn default() -> Self {
        Self {
            fleet: Topics::default(),
            discovery_prefix: "homeassistant".to_owned(),
        }
    }
}

/// Whether every topic `filter` can match is also matched by `allowed` (both MQTT
/// filters). `fleet/linus/cmd/+` is within `fleet/linus/cmd/#`; `fleet/+/cmd/+` is not
/// within `fleet/linus/cmd/#`.
pub fn filter_within(filter: &str, allowed: &str) -> bool {
    levels_within(filter.split('/'), allowed.split('/'))
}

/// `filter_within` over the filters' levels.
fn levels_within<'f, 'a>(
    mut f: impl Iterator<Item = &'f str>,
    mut a: impl Iterator<Item = &'a str>,
) -> bool {
    loop {
        match (f.next(), a.next()) {
            (_, Some("#")) => return true,
            (None, None) => return true,
            (Some(fl), Some("+")) => {
                if fl == "#" {
                    return false;
                }
            }
            (Some(fl), Some(al)) => {
                if fl != al {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

impl AclTopics {
    fn prefix(&self) -> &str {
        self.fleet.prefix().as_str()
    }

    /// Filters a user may subscribe within.
    fn subscribe_scopes(&self, role: Role, username: &str) -> Vec<String> {
        let (p, d) = (self.prefix(), &self.discovery_prefix);
        match role {
            Role::Admin => vec!["#".to_owned()],
            Role::Controller | Role::HomeAssistant | Role::Reader => {
                vec![format!("{p}/#"), format!("{d}/#")]
            }
            Role::Robot => vec![
                format!("{p}/{username}/cmd/#"),
                format!("{p}/all/cmd/#"),
                // The fleet's latched e-stop: a robot refuses motion until it can read it.
                format!("{p}/estop"),
                // Home Assistant's birth message, to re-publish discovery.
                format!("{d}/status"),
            ],
        }
    }

    pub fn may_subscribe(&self, role: Role, username: &str, filter: &str) -> bool {
        // A shared subscription is judged by the filter it shares.
        let filter = match filter.strip_prefix("$share/") {
            Some(rest) => rest.split_once('/').map(|(_, f)| f).unwrap_or(""),
            None => filter,
        };
        self.subscribe_scopes(role, username)
            .iter()
            .any(|scope| filter_within(filter, scope))
            || (role == Role::HomeAssistant && self.outside_the_fleet(filter))
    }

    /// Whether every topic `filter` can match lies outside the fleet's and Home
    /// Assistant's trees and `$SYS`: its first level is a name, not a wildcard, and not
    /// the first level of either prefix. Only admins may publish there.
    fn outside_the_fleet(&self, filter: &str) -> bool {
        let first = filter.split('/').next().unwrap_or("");
        let first_of = |prefix: &str| prefix.split('/').next().unwrap_or("").to_owned();
        !first.is_empty()
            && !first.starts_with('$')
            && !first.contains(['+', '#'])
            && first != first_of(self.prefix())
            && first != first_of(&self.discovery_prefix)
    }

    /// Whether the user may publish to `topic`. Runs for every message, so the filters
    /// a role may publish within are matched piece by piece (the prefixes may have
    /// several levels) rather than built as strings first.
    pub fn may_publish(&self, role: Role, username: &str, topic: &str) -> bool {
        if topic.contains(['+', '#']) {
            return false;
        }
        let within = |scope: &[&str]| {
            levels_within(
                topic.split('/'),
                scope.iter().flat_map(|piece| piece.split('/')),
            )
        };
        let (p, d) = (self.prefix(), self.discovery_prefix.as_str());
        match role {
            Role::Admin => true,
            Role::Controller => {
                within(&[p, "+", "cmd", "+"])
                    || within(&[p, "estop"])
                    || within(&[d, "status"])
                    || within(&[p, GATEWAY_LEVEL, "status"])
                    || within(&[p, GATEWAY_LEVEL, "state"])
                    || within(&[
                        d,
                        "device",
                        &fleet_protocol::discovery::bridge_object_id(&self.fleet),
                        "config",
                    ])
            }
            Role::HomeAssistant => {
                (within(&[p, "+", "cmd", "+"])
                    && !within(&[p, "+", "cmd", CommandKind::Decommission.as_str()]))
                    || within(&[p, "estop"])
                    || within(&[d, "status"])
            }
            Role::Reader => false,
            Role::Robot => {
                within(&[p, username, "state"])
                    || within(&[p, username, "status"])
                    || within(&[p, username, "result"])
                    // Results for a gateway's commands, on that gateway's reply topic for
                    // this robot: a robot cannot answer for another one.
                    || within(&[p, "_gateway", "+", username, "result"])
                    // Its own Home Assistant device, nobody else's.
                    || within(&[
                        d,
                        "device",
                        &fleet_protocol::discovery::object_id(&self.fleet, username),
                        "config",
                    ])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_within_filters() {
        assert!(filter_within("fleet/linus/cmd/+", "fleet/linus/cmd/#"));
        assert!(filter_within("fleet/linus/cmd/drive", "fleet/linus/cmd/#"));
        assert!(filter_within("fleet/linus/cmd", "fleet/linus/cmd/#"));
        assert!(filter_within("fleet/linus/cmd/#", "fleet/linus/cmd/#"));
        assert!(!filter_within("fleet/+/cmd/+", "fleet/linus/cmd/#"));
        assert!(!filter_within("fleet/#", "fleet/linus/cmd/#"));
        assert!(!filter_within("#", "fleet/#"));
        assert!(filter_within("fleet/+/state", "fleet/+/state"));
        assert!(!filter_within("fleet/#", "fleet/+/state"));
        assert!(!filter_within("fleet/linus/state/x", "fleet/+/state"));
        assert!(filter_within("anything/at/all", "#"));
    }

    #[test]
    fn the_robot_matrix() {
        let acl = AclTopics::default();
        let r = Role::Robot;
        assert!(acl.may_subscribe(r, "linus", "fleet/linus/cmd/+"));
        assert!(acl.may_subscribe(r, "linus", "fleet/all/cmd/+"));
        assert!(acl.may_subscribe(r, "linus", "homeassistant/status"));
        assert!(acl.may_subscribe(r, "linus", "fleet/estop"), "the latch");
        assert!(
            !acl.may_publish(r, "linus", "fleet/estop"),
            "a robot cannot lift it"
        );
        assert!(
            !acl.may_subscribe(r, "linus", "fleet/torvalds/cmd/+"),
            "cannot read another robot's commands"
        );
        assert!(!acl.may_subscribe(r, "linus", "fleet/+/cmd/+"));
        assert!(!acl.may_subscribe(r, "linus", "fleet/#"));
        assert!(!acl.may_subscribe(r, "linus", "#"));
        assert!(!acl.may_subscribe(r, "linus", "$share/g/fleet/torvalds/cmd/+"));
        assert!(acl.may_publish(r, "linus", "fleet/linus/state"));
        assert!(acl.may_publish(r, "linus", "fleet/linus/result"));
        assert!(acl.may_publish(r, "linus", "fleet/_gateway/gw-1/linus/result"));
        assert!(
            !acl.may_publish(r, "linus", "fleet/_gateway/gw-1/torvalds/result"),
            "cannot answer for another robot"
        );
        assert!(!acl.may_publish(r, "linus", "fleet/_gateway/gw-1/result"));
        assert!(acl.may_publish(r, "linus", "homeassistant/device/fleet_linus/config"));
        assert!(
            !acl.may_publish(r, "linus", "homeassistant/device/fleet_torvalds/config"),
            "cannot touch another robot's Home Assistant device"
        );
        assert!(!acl.may_publish(r, "linus", "homeassistant/status"));
        assert!(!acl.may_publish(r, "linus", "homeassistant/switch/x/config"));
        assert!(
            !acl.may_publish(r, "linus", "fleet/torvalds/state"),
            "cannot speak for another robot"
        );
        assert!(
            !acl.may_publish(r, "linus", "fleet/torvalds/cmd/drive"),
            "cannot command another robot"
        );
        assert!(!acl.may_publish(r, "linus", "fleet/all/cmd/stop"));
    }

    #[test]
    fn controllers_readers_and_admins() {
        let acl = AclTopics::default();
        assert!(acl.may_publish(Role::Controller, "gateway", "fleet/linus/cmd/drive"));
        assert!(acl.may_publish(Role::Controller, "gateway", "fleet/all/cmd/stop"));
        assert!(
            !acl.may_publish(Role::Controller, "gateway", "fleet/linus/state"),
            "cannot fake a robot"
        );
        assert!(acl.may_subscribe(Role::Controller, "gateway", "fleet/#"));
        assert!(acl.may_subscribe(Role::Reader, "grafana", "fleet/+/state"));
        assert!(!acl.may_publish(Role::Reader, "grafana", "fleet/linus/cmd/drive"));
        assert!(!acl.may_subscribe(Role::Reader, "grafana", "#"));
        assert!(acl.may_subscribe(Role::Admin, "root", "#"));
        assert!(acl.may_publish(Role::Admin, "root", "anything/else"));
        let gw = Role::Controller;
        assert!(acl.may_publish(gw, "gateway", "fleet/estop"));
        assert!(!acl.may_publish(Role::Reader, "grafana", "fleet/estop"));
        assert!(acl.may_publish(gw, "gateway", "fleet/_gateway/status"));
        assert!(acl.may_publish(gw, "gateway", "fleet/_gateway/state"));
        assert!(acl.may_publish(gw, "gateway", "homeassistant/device/fleet__bridge/config"));
        assert!(!acl.may_publish(gw, "gateway", "homeassistant/device/fleet_linus/config"));
        assert!(!acl.may_subscribe(gw, "gateway", "tasmota/discovery/#"));
    }

    #[test]
    fn home_assistant_drives_but_does_not_decommission() {
        let acl = AclTopics::default();
        let ha = Role::HomeAssistant;
        assert_eq!("homeassistant".parse(), Ok(ha));
        assert!(acl.may_publish(ha, "ha", "fleet/linus/cmd/drive"));
        assert!(acl.may_publish(ha, "ha", "fleet/all/cmd/stop"));
        assert!(acl.may_publish(ha, "ha", "homeassistant/status"));
        assert!(
            acl.may_publish(ha, "ha", "fleet/estop"),
            "latch and release"
        );
        assert!(!acl.may_publish(ha, "ha", "fleet/linus/cmd/decommission"));
        assert!(!acl.may_publish(ha, "ha", "fleet/all/cmd/decommission"));
        assert!(!acl.may_publish(ha, "ha", "fleet/linus/state"));
        assert!(!acl.may_publish(ha, "ha", "fleet/_gateway/status"));
        assert!(!acl.may_publish(ha, "ha", "homeassistant/device/fleet_linus/config"));
        assert!(!acl.may_publish(ha, "ha", "tasmota/discovery/x"));
        for filter in [
            "fleet/#",
            "homeassistant/+/+/config",
            "homeassistant/status",
        ] {
            assert!(acl.may_subscribe(ha, "ha", filter), "{filter}");
        }
        // What Home Assistant 2025.4 subscribes to for its other integrations.
        for filter in [
            "drop_connect/discovery/#",
            "dsmr/#",
            "esphome/discover/#",
            "fully/deviceInfo/+",
            "pglab/discovery/#",
            "cloudapp/QBUSMQTTGW/state",
            "cloudapp/QBUSMQTTGW/config",
            "cloudapp/QBUSMQTTGW/+/state",
            "tasmota/discovery/#",
        ] {
            assert!(acl.may_subscribe(ha, "ha", filter), "{filter}");
        }
        for filter in ["#", "+/linus/state", "$SYS/#", "fleetx", "/fleet/#"] {
            let granted = acl.may_subscribe(ha, "ha", filter);
            assert_eq!(granted, filter == "fleetx", "{filter}");
        }
        let multi_level = AclTopics {
            fleet: Topics::new(fleet_protocol::TopicPrefix::new("site/a").unwrap()),
            discovery_prefix: "homeassistant".to_owned(),
        };
        assert!(!multi_level.may_subscribe(ha, "ha", "site/b/#"));
    }
}
