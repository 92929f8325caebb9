//! The gateway's operators (`--operators-file`): people with a name, a role and a token.
//! A control request carries `Authorization: Bearer <name>:<token>`; the token is checked
//! against the operator's argon2id hash once (on a blocking thread, two at a time), then
//! from memory. Every command an operator sends carries their name to the robot.
//!
//! ```toml
//! [[operator]]
//! name = "ada"
//! token_hash = "$argon2id$v=19$m=19456,t=2,p=1$…"   # echo 'token' | fleet-broker hash-password
//! role = "operator"                                 # viewer, operator or admin
//! ```

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordVerifier};
use serde::Deserialize;
use tokio::sync::Semaphore;

/// Longest operator name (it travels with every command, as `fleet-operator`).
pub const MAX_NAME_LEN: usize = fleet_protocol::command::MAX_OPERATOR_LEN;
/// Password checks running at once: argon2 takes 19 MiB and tens of milliseconds each.
const CHECKS_AT_ONCE: usize = 2;

/// What an operator may do, each role including the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum OperatorRole {
    /// Identified, controls nothing (stops, which anyone may send, excepted).
    Viewer,
    /// Drives robots, sends commands, latches the e-stop.
    Operator,
    /// Also releases the latched e-stop and decommissions robots.
    Admin,
}

impl FromStr for OperatorRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "viewer" => Ok(Self::Viewer),
            "operator" => Ok(Self::Operator),
            "admin" => Ok(Self::Admin),
            other => Err(format!(
                "unknown role {other:?} (expected viewer, operator or admin)"
            )),
        }
    }
}

impl fmt::Display for OperatorRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        })
    }
}

/// Who made a request: put in the request's extensions by the control guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    pub name: String,
    pub role: OperatorRole,
}

#[derive(Debug, thiserror::Error)]
pub enum OperatorsError {
    #[error("cannot read the operators file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("operators file: {0}")]
    Invalid(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    operator: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    token_hash: String,
    role: String,
}

struct Known {
    token_hash: String,
    role: OperatorRole,
}

pub struct Operators {
    by_name: HashMap<String, Known>,
    /// Tokens already checked against their hash, by operator name.
    verified: Mutex<HashMap<String, String>>,
    checks: Arc<Semaphore>,
}

impl fmt::Debug for Operators {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names only: hashes and tokens stay out of logs.
        f.debug_struct("Operators")
            .field("names", &self.by_name.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Operators {
    pub fn load(path: &Path) -> Result<Self, OperatorsError> {
        let text = std::fs::read_to_string(path).map_err(|source| OperatorsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, OperatorsError> {
        let file: File =
            toml::from_str(text).map_err(|e| OperatorsError::Invalid(e.to_string()))?;
        let mut by_name = HashMap::new();
        for entry in file.operator {
            let name = entry.name;
            // What the robots accept as an operator (or every command would be refused),
            // and no ':', which ends the name in a credential.
            let valid_name =
                fleet_protocol::command::validate_operator(&name).is_ok() && !name.contains(':');
            if !valid_name {
                return Err(OperatorsError::Invalid(format!(
                    "operator name {name:?}: 1 to {MAX_NAME_LEN} characters, no ':' and no control characters"
                )));
            }
            let role = entry
                .role
                .parse()
                .map_err(|e| OperatorsError::Invalid(format!("operator {name:?}: {e}")))?;
            if PasswordHash::new(&entry.token_hash).is_err() {
                return Err(OperatorsError::Invalid(format!(
                    "operator {name:?}: token_hash is not a PHC string (make one with `fleet-broker hash-password`)"
                )));
            }
            let known = Known {
                token_hash: entry.token_hash,
                role,
            };
            if by_name.insert(name.clone(), known).is_some() {
                return Err(OperatorsError::Invalid(format!(
                    "operator {name:?} is listed twice"
                )));
            }
        }
        Ok(Self {
            by_name,
            verified: Mutex::default(),
            checks: Arc::new(Semaphore::new(CHECKS_AT_ONCE)),
        })
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The operator a bearer credential (`<name>:<token>`) names, if its token is right.
    pub async fn authenticate(&self, credential: &str) -> Option<Operator> {
        if let Some(known) = self.cached(credential) {
            return Some(known);
        }
        let (name, token) = credential.split_once(':')?;
        let known = self.by_name.get(name)?;
        let hash = known.token_hash.clone();
        let given = token.to_owned();
        let _permit = self.checks.clone().acquire_owned().await.ok()?;
        let matches = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash).is_ok_and(|hash| {
                Argon2::default()
                    .verify_password(given.as_bytes(), &hash)
                    .is_ok()
            })
        })
        .await
        .unwrap_or(false);
        if !matches {
            return None;
        }
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), token.to_owned());
        Some(Operator {
            name: name.to_owned(),
            role: known.role,
        })
    }

    /// The operator, when this exact credential was checked before: no argon2, so it may
    /// run where nothing may wait (stops).
    pub fn cached(&self, credential: &str) -> Option<Operator> {
        let (name, token) = credential.split_once(':')?;
        let known = self.by_name.get(name)?;
        let verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        let remembered = verified.get(name)?;
        crate::guard::same_secret(token, remembered).then(|| Operator {
            name: name.to_owned(),
            role: known.role,
        })
    }
}

/// Failed operator logins allowed per address within `LOGIN_WINDOW`, then refused
/// without a check until the window ends.
const MAX_LOGIN_FAILURES: u32 = 5;
const LOGIN_WINDOW: Duration = Duration::from_secs(60);

/// Addresses with failed logins remembered at once.
const MAX_TRACKED_ADDRESSES: usize = 10_000;

/// Recent failed operator logins by client address (bounded).
#[derive(Default)]
pub struct LoginFailures {
    by_client: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl LoginFailures {
    pub(crate) fn blocked(&self, client: IpAddr, now: Instant) -> bool {
        let by_client = self.by_client.lock().unwrap_or_else(|e| e.into_inner());
        by_client.get(&client).is_some_and(|(failures, since)| {
            *failures >= MAX_LOGIN_FAILURES && now.duration_since(*since) < LOGIN_WINDOW
        })
    }

    pub(crate) fn record(&self, client: IpAddr, now: Instant) {
        let mut by_client = self.by_client.lock().unwrap_or_else(|e| e.into_inner());
        if by_client.len() >= MAX_TRACKED_ADDRESSES {
            by_client.retain(|_, (_, since)| now.duration_since(*since) < LOGIN_WINDOW);
        }
        if by_client.len() >= MAX_TRACKED_ADDRESSES {
            // Still full of recent failures (a flood from many addresses): forget them
            // all rather than grow; each address gets its few checks again.
            by_client.clear();
        }
        let entry = by_client.entry(client).or_insert((0, now));
        if now.duration_since(entry.1) >= LOGIN_WINDOW {
            *entry = (0, now);
        }
        entry.0 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::{PasswordHasher, SaltString};

    fn hash(token: &str) -> String {
        let salt = SaltString::encode_b64(b"fleet-test-salt!").unwrap();
        Argon2::default()
            .hash_password(token.as_bytes(), &salt)
            .unwrap()
            .to_string()
    }

    fn file() -> String {
        format!(
            "[[operator]]\nname = \"ada\"\ntoken_hash = \"{}\"\nrole = \"admin\"\n\n[[operator]]\nname = \"vic\"\ntoken_hash = \"{}\"\nrole = \"viewer\"\n",
            hash("ada-token"),
            hash("vic-token")
        )
    }

    #[tokio::test]
    async fn tokens_name_their_operator() {
        let operators = Operators::parse(&file()).unwrap();
        assert_eq!(operators.len(), 2);
        assert!(
            operators.cached("ada:ada-token").is_none(),
            "not checked yet"
        );
        let ada = operators.authenticate("ada:ada-token").await.unwrap();
        assert_eq!((ada.name.as_str(), ada.role), ("ada", OperatorRole::Admin));
        assert_eq!(operators.cached("ada:ada-token"), Some(ada));
        assert!(operators.authenticate("ada:wrong").await.is_none());
        assert!(operators.cached("ada:wrong").is_none());
        assert!(operators.authenticate("vic:ada-token").await.is_none());
        assert!(operators.authenticate("nobody:ada-token").await.is_none());
        assert!(
            operators.authenticate("ada-token").await.is_none(),
            "no name"
        );
        let vic = operators.authenticate("vic:vic-token").await.unwrap();
        assert_eq!(vic.role, OperatorRole::Viewer);
        assert!(OperatorRole::Viewer < OperatorRole::Operator);
        assert!(OperatorRole::Operator < OperatorRole::Admin);
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let h = hash("t");
        for (text, reason) in [
            (
                format!("[[operator]]\nname = \"a:b\"\ntoken_hash = \"{h}\"\nrole = \"admin\"\n"),
                "no ':'",
            ),
            (
                format!("[[operator]]\nname = \"a\"\ntoken_hash = \"{h}\"\nrole = \"root\"\n"),
                "unknown role",
            ),
            (
                "[[operator]]\nname = \"a\"\ntoken_hash = \"plain\"\nrole = \"admin\"\n".to_owned(),
                "PHC",
            ),
            (
                format!(
                    "[[operator]]\nname = \"a\"\ntoken_hash = \"{h}\"\nrole = \"admin\"\n[[operator]]\nname = \"a\"\ntoken_hash = \"{h}\"\nrole = \"viewer\"\n"
                ),
                "twice",
            ),
            ("[[operator]]\nname = \"a\"\n".to_owned(), "missing"),
        ] {
            let error = Operators::parse(&text).unwrap_err().to_string();
            assert!(error.contains(reason), "{error}");
        }
    }
}
