//! Who may use which MQTT client id. The client id names a session, and the session
//! holds queued commands: a client that takes over `robot-linus` swallows linus's
//! commands. Robot ids are reserved for their robots, and a session stays with the user
//! who opened it.

use std::fmt;

use crate::acl::Role;

/// The client id a robot node uses (`robot-<id>`, docs/protocol.md *Sessions*).
pub const ROBOT_CLIENT_PREFIX: &str = "robot-";

/// Who is connecting: the user (none for anonymous clients) and their role.
#[derive(Debug, Clone, Copy)]
pub struct Connecting<'a> {
    pub username: Option<&'a str>,
    pub role: Role,
}

/// Why a client id was refused (CONNACK 0x85 / 3.1.1 0x02 "identifier rejected").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientIdRefusal {
    /// A robot user must use its own robot's client id.
    RobotMustUseOwn { expected: String },
    /// `robot-<id>` belongs to robot `<id>`.
    ReservedForRobot { robot: String },
    /// Another user's session (connected, or waiting for its client to come back) has it.
    HeldByAnotherUser,
}

impl ClientIdRefusal {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            ClientIdRefusal::RobotMustUseOwn { .. } => "robot_client_id",
            ClientIdRefusal::ReservedForRobot { .. } => "client_id_reserved",
            ClientIdRefusal::HeldByAnotherUser => "client_id_taken",
        }
    }
}

impl fmt::Display for ClientIdRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientIdRefusal::RobotMustUseOwn { expected } => {
                write!(f, "a robot connects with its own client id, {expected:?}")
            }
            ClientIdRefusal::ReservedForRobot { robot } => {
                write!(f, "this client id belongs to robot {robot:?}")
            }
            ClientIdRefusal::HeldByAnotherUser => {
                f.write_str("another user's session has this client id")
            }
        }
    }
}

/// Whether `who` may connect with `client_id` (empty: the broker assigns one).
/// `holder` is the username of the session that has the id now, `Some(None)` for an
/// anonymous one, `None` when there is no such session.
pub fn check_client_id(
    who: Connecting<'_>,
    client_id: &str,
    holder: Option<Option<&str>>,
) -> Result<(), ClientIdRefusal> {
    if who.role == Role::Robot {
        let expected = format!("{ROBOT_CLIENT_PREFIX}{}", who.username.unwrap_or_default());
        if client_id != expected {
            return Err(ClientIdRefusal::RobotMustUseOwn { expected });
        }
    } else if let Some(robot) = client_id.strip_prefix(ROBOT_CLIENT_PREFIX) {
        // Anonymous admins are the all-in-one's own robots on loopback (no users there).
        let anonymous_admin = who.username.is_none() && who.role == Role::Admin;
        if !anonymous_admin {
            return Err(ClientIdRefusal::ReservedForRobot {
                robot: robot.to_owned(),
            });
        }
    }
    match holder {
        Some(holder) if holder != who.username => Err(ClientIdRefusal::HeldByAnotherUser),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &'static str, role: Role) -> Connecting<'static> {
        Connecting {
            username: Some(name),
            role,
        }
    }

    #[test]
    fn robots_use_their_own_ids() {
        let linus = user("linus", Role::Robot);
        assert_eq!(check_client_id(linus, "robot-linus", None), Ok(()));
        assert_eq!(
            check_client_id(linus, "robot-linus", Some(Some("linus"))),
            Ok(()),
            "its own session back"
        );
        assert_eq!(
            check_client_id(linus, "robot-torvalds", None),
            Err(ClientIdRefusal::RobotMustUseOwn {
                expected: "robot-linus".to_owned()
            })
        );
        assert!(check_client_id(linus, "fleet-gateway-1", None).is_err());
        assert!(check_client_id(linus, "", None).is_err());
    }

    #[test]
    fn robot_ids_are_reserved() {
        for role in [Role::Admin, Role::Controller, Role::Reader] {
            assert_eq!(
                check_client_id(user("mallory", role), "robot-linus", None),
                Err(ClientIdRefusal::ReservedForRobot {
                    robot: "linus".to_owned()
                }),
                "{role}"
            );
        }
        let anonymous_admin = Connecting {
            username: None,
            role: Role::Admin,
        };
        assert_eq!(
            check_client_id(anonymous_admin, "robot-linus", None),
            Ok(())
        );
        let anonymous_reader = Connecting {
            username: None,
            role: Role::Reader,
        };
        assert!(check_client_id(anonymous_reader, "robot-linus", None).is_err());
    }

    #[test]
    fn sessions_stay_with_their_user() {
        let gateway = user("gateway", Role::Controller);
        let grafana = user("grafana", Role::Reader);
        assert_eq!(check_client_id(gateway, "fleet-gateway-1", None), Ok(()));
        assert_eq!(
            check_client_id(gateway, "fleet-gateway-1", Some(Some("gateway"))),
            Ok(())
        );
        assert_eq!(
            check_client_id(grafana, "fleet-gateway-1", Some(Some("gateway"))),
            Err(ClientIdRefusal::HeldByAnotherUser)
        );
        assert_eq!(
            check_client_id(grafana, "mine", Some(None)),
            Err(ClientIdRefusal::HeldByAnotherUser),
            "an anonymous session is not a logged-in user's"
        );
        assert_eq!(
            check_client_id(grafana, "", None),
            Ok(()),
            "assigned by the broker"
        );
    }
}
