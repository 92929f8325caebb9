//! Users and passwords. A users file lists each user's argon2 password hash (PHC string,
//! made with `fleet-broker hash-password`) and role; plain passwords are never stored.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{Output, PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
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

    /// The role of `username` when this exact password was verified before: no argon2,
    /// so a reconnecting robot never waits behind the queue of slow checks.
    pub fn cached(&self, username: &str, password: &[u8]) -> Option<Role> {
        let user = self.users.get(username)?;
        let digest = self.digest(username, password);
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(username)
            .is_some_and(|d| d == &digest)
            .then_some(user.role)
    }

    /// Checks a username and password. Blocking (argon2 on a cache miss): call it from a
    /// blocking thread. `scratch` is argon2's working memory, kept by the caller so that
    /// a thread checking passwords all day reuses the same 19 MiB.
    ///
    /// An unknown user costs the same argon2 run as a wrong password: answering faster
    /// would tell an attacker which usernames exist.
    pub fn verify_with(
        &self,
        username: &str,
        password: &[u8],
        scratch: &mut Vec<Block>,
    ) -> Verdict {
        if let Some(role) = self.cached(username, password) {
            return Verdict::Allowed(role);
        }
        let Some(user) = self.users.get(username) else {
            decoy_check(password, scratch);
            return Verdict::BadCredentials;
        };
        let matches = PasswordHash::new(&user.password_hash)
            .is_ok_and(|hash| argon2_matches(&hash, password, scratch));
        if !matches {
            return Verdict::BadCredentials;
        }
        let digest = self.digest(username, password);
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(username.to_owned(), digest);
        Verdict::Allowed(user.role)
    }

    /// [`Users::verify_with`] with working memory of its own.
    pub fn verify(&self, username: &str, password: &[u8]) -> Verdict {
        self.verify_with(username, password, &mut Vec::new())
    }
}

/// Whether `password` hashes to `hash`, computed in `scratch` (grown as needed).
fn argon2_matches(hash: &PasswordHash<'_>, password: &[u8], scratch: &mut Vec<Block>) -> bool {
    let (Some(salt), Some(expected)) = (hash.salt, hash.hash) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(hash.algorithm) else {
        return false;
    };
    let version = match hash.version.map(Version::try_from).transpose() {
        Ok(version) => version.unwrap_or_default(),
        Err(_) => return false,
    };
    let Ok(params) = Params::try_from(hash) else {
        return false;
    };
    let mut salt_bytes = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_bytes) else {
        return false;
    };
    let mut computed = vec![0u8; expected.len()];
    if !run_argon2(
        algorithm,
        version,
        params,
        password,
        salt,
        &mut computed,
        scratch,
    ) {
        return false;
    }
    // `Output`'s comparison takes the same time wherever the bytes differ.
    Output::new(&computed).is_ok_and(|computed| computed == expected)
}

/// The same work as checking a password hashed with the default parameters.
fn decoy_check(password: &[u8], scratch: &mut Vec<Block>) {
    let mut out = [0u8; 32];
    let _ = run_argon2(
        Algorithm::default(),
        Version::default(),
        Params::default(),
        password,
        b"fleet-decoy-salt",
        &mut out,
        scratch,
    );
}

fn run_argon2(
    algorithm: Algorithm,
    version: Version,
    params: Params,
    password: &[u8],
    salt: &[u8],
    out: &mut [u8],
    scratch: &mut Vec<Block>,
) -> bool {
    let blocks = params.block_count();
    if scratch.len() < blocks {
        scratch.resize(blocks, Block::default());
    }
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password, salt, out, &mut scratch[..blocks])
        .is_ok()
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
