//! Users and passwords. A users file lists each user's argon2 password hash (PHC string,
//! made with `fleet-broker hash-password`) and role; plain passwords are never stored.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use blake2::Blake2bMac512;
use blake2::digest::{KeyInit, Mac};
use serde::Deserialize;

use crate::acl::Role;

#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("cannot read the users file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid users file: {0}")]
    Invalid(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    #[serde(default, rename = "user")]
    users: Vec<UserEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    username: String,
    password_hash: String,
    role: String,
}

struct User {
    password_hash: String,
    role: Role,
}

/// The outcome of checking a CONNECT's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed(Role),
    /// Unknown user or wrong password (the client is not told which).
    BadCredentials,
}

/// The users the broker knows.
pub struct Users {
    users: HashMap<String, User>,
    /// Argon2 is slow on purpose (tens of ms); a reconnecting robot should not pay it
    /// every time. Remembers a keyed digest of passwords already verified.
    verified: Mutex<HashMap<String, [u8; 64]>>,
    cache_key: [u8; 32],
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: hashes stay out of logs.
        let mut names: Vec<&String> = self.users.keys().collect();
        names.sort();
        f.debug_struct("Users").field("names", &names).finish()
    }
}

impl Users {
    pub fn empty() -> Self {
        Self {
            users: HashMap::new(),
            verified: Mutex::new(HashMap::new()),
            cache_key: rand::random(),
        }
    }

    pub fn load(path: &Path) -> Result<Self, UsersError> {
        let text = std::fs::read_to_string(path).map_err(|source| UsersError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, UsersError> {
        let file: UsersFile =
            toml::from_str(text).map_err(|e| UsersError::Invalid(e.to_string()))?;
        let mut users = HashMap::new();
        for entry in file.users {
            let role: Role = entry.role.parse().map_err(UsersError::Invalid)?;
            PasswordHash::new(&entry.password_hash).map_err(|e| {
                UsersError::Invalid(format!(
                    "user {:?}: password_hash is not a PHC string: {e}",
                    entry.username
                ))
            })?;
            if role == Role::Robot {
                fleet_protocol::RobotId::new(&entry.username).map_err(|e| {
                    UsersError::Invalid(format!(
                        "robot user {:?}: its username must be its robot id: {e}",
                        entry.username
                    ))
                })?;
            }
            let user = User {
                password_hash: entry.password_hash,
                role,
            };
            if users.insert(entry.username.clone(), user).is_some() {
                return Err(UsersError::Invalid(format!(
                    "user {:?} appears twice",
                    entry.username
                )));
            }
        }
        Ok(Self {
            users,
            ..Self::empty()
        })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn role_of(&self, username: &str) -> Option<Role> {
        self.users.get(username).map(|u| u.role)
    }

    fn digest(&self, username: &str, password: &[u8]) -> [u8; 64] {
        let mut mac = match <Blake2bMac512 as KeyInit>::new_from_slice(&self.cache_key) {
            Ok(mac) => mac,
            // A 32-byte key is always accepted by BLAKE2b (up to 64 bytes).
            Err(_) => return [0; 64],
        };
        mac.update(username.as_bytes());
        mac.update(&[0]);
        mac.update(password);
        mac.finalize().into_bytes().into()
    }

    /// Checks a username and password. Blocking (argon2 on a cache miss): call it from a
    /// blocking thread.
    pub fn verify(&self, username: &str, password: &[u8]) -> Verdict {
        let Some(user) = self.users.get(username) else {
            return Verdict::BadCredentials;
        };
        let digest = self.digest(username, password);
        let cached = self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(username)
            .is_some_and(|d| d == &digest);
        if cached {
            return Verdict::Allowed(user.role);
        }
        let Ok(hash) = PasswordHash::new(&user.password_hash) else {
            return Verdict::BadCredentials;
        };
        if Argon2::default().verify_password(password, &hash).is_ok() {
            self.verified
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(username.to_owned(), digest);
            Verdict::Allowed(user.role)
        } else {
            Verdict::BadCredentials
        }
    }
}

/// An argon2id PHC string for `password`, for the users file.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_hashed_passwords_and_roles() {
        let hash = hash_password("pa55").unwrap();
        let users = Users::parse(&format!(
            "[[user]]\nusername = \"linus\"\npassword_hash = \"{hash}\"\nrole = \"robot\"\n"
        ))
        .unwrap();
        assert_eq!(
            users.verify("linus", b"pa55"),
            Verdict::Allowed(Role::Robot)
        );
        assert_eq!(
            users.verify("linus", b"pa55"),
            Verdict::Allowed(Role::Robot),
            "cached"
        );
        assert_eq!(users.verify("linus", b"wrong"), Verdict::BadCredentials);
        assert_eq!(users.verify("nobody", b"pa55"), Verdict::BadCredentials);
    }

    #[test]
    fn bad_files_are_refused() {
        let hash = hash_password("x").unwrap();
        for (text, needle) in [
            (
                "[[user]]\nusername = \"a\"\npassword_hash = \"plain\"\nrole = \"admin\"\n"
                    .to_owned(),
                "PHC",
            ),
            (
                format!("[[user]]\nusername = \"a\"\npassword_hash = \"{hash}\"\nrole = \"god\"\n"),
                "unknown role",
            ),
            (
                format!(
                    "[[user]]\nusername = \"a b\"\npassword_hash = \"{hash}\"\nrole = \"robot\"\n"
                ),
                "robot id",
            ),
            (
                format!(
                    "[[user]]\nusername = \"a\"\npassword_hash = \"{hash}\"\nrole = \"admin\"\n[[user]]\nusername = \"a\"\npassword_hash = \"{hash}\"\nrole = \"admin\"\n"
                ),
                "twice",
            ),
        ] {
            let error = Users::parse(&text)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(error.contains(needle), "{error}");
        }
    }
}
