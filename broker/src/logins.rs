//! Password checks under attack. argon2 is slow and takes 19 MiB on purpose, so a flood
//! of wrong passwords must neither take the broker's memory nor keep robots out:
//! - a password verified before is accepted from the cache at once, before any queue;
//! - the rest run on a few threads of their own that keep their argon2 memory (bounded:
//!   threads × 19 MiB, handed back after 10 quiet seconds), behind a short queue; when the
//!   queue is full the client is told the server is busy instead of waiting;
//! - an address with failed logins backs off: after a few failures its next attempts are
//!   refused without a check, for a time that doubles with every failure (capped);
//! - one address has at most a couple of checks in flight.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::acl::Role;
use crate::auth::{Users, Verdict};

/// How hard the broker works at checking passwords, and how it backs off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginLimits {
    /// Threads running argon2 (each holds 19 MiB while busy).
    pub workers: usize,
    /// Checks waiting for a thread; beyond it CONNECT is answered "server busy".
    pub queue: usize,
    /// Checks in flight from one address.
    pub in_flight_per_address: usize,
    /// Failed logins from one address before it has to wait.
    pub failures_before_backoff: u32,
    /// The first wait; it doubles with every further failure.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// Addresses remembered (failures and checks in flight).
    pub max_tracked_addresses: usize,
}

impl Default for LoginLimits {
    fn default() -> Self {
        Self {
            workers: std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4)),
            queue: 32,
            in_flight_per_address: 2,
            failures_before_backoff: 5,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            max_tracked_addresses: 10_000,
        }
    }
}

/// What a login attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginOutcome {
    Allowed(Role),
    BadCredentials,
    /// This address failed too often or has too many checks in flight: not checked.
    Throttled,
    /// Every checking thread is busy and the queue is full: not checked.
    Busy,
}

#[derive(Debug, Default)]
struct AddressRecord {
    failures: u32,
    last_failure: Option<Instant>,
    blocked_until: Option<Instant>,
    in_flight: usize,
}

struct Job {
    username: String,
    password: Vec<u8>,
    answer: oneshot::Sender<Verdict>,
}

pub struct Logins {
    users: Arc<Users>,
    limits: LoginLimits,
    queue: SyncSender<Job>,
    addresses: Arc<Mutex<HashMap<IpAddr, AddressRecord>>>,
}

/// An address's failures are forgotten this long after its last one.
const FORGIVE_AFTER: Duration = Duration::from_secs(600);

/// Working memory is handed back after this long without a check.
const IDLE_RELEASE: Duration = Duration::from_secs(10);

impl Logins {
    /// Starts the checking threads.
    pub fn start(users: Arc<Users>, limits: LoginLimits) -> std::io::Result<Self> {
        let (queue, jobs) = sync_channel::<Job>(limits.queue);
        let jobs = Arc::new(Mutex::new(jobs));
        for n in 0..limits.workers.max(1) {
            let (users, jobs) = (users.clone(), jobs.clone());
            std::thread::Builder::new()
                .name(format!("fleet-argon2-{n}"))
                .spawn(move || check_passwords(&users, &jobs))?;
        }
        Ok(Self {
            users,
            limits,
            queue,
            addresses: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// Checks one login from `address`.
    pub async fn check(&self, address: IpAddr, username: &str, password: &[u8]) -> LoginOutcome {
        if let Some(role) = self.users.cached(username, password) {
            return LoginOutcome::Allowed(role);
        }
        let Some(_in_flight) = self.begin(address) else {
            return LoginOutcome::Throttled;
        };
        let (answer, verdict) = oneshot::channel();
        let job = Job {
            username: username.to_owned(),
            password: password.to_vec(),
            answer,
        };
        match self.queue.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return LoginOutcome::Busy,
            // The checking threads are gone (cannot happen while the broker runs).
            Err(TrySendError::Disconnected(_)) => return LoginOutcome::Busy,
        }
        let verdict = verdict.await.unwrap_or(Verdict::BadCredentials);
        self.record(address, verdict);
        match verdict {
            Verdict::Allowed(role) => LoginOutcome::Allowed(role),
            Verdict::BadCredentials => LoginOutcome::BadCredentials,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, AddressRecord>> {
        self.addresses.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for one check from `address`, or `None` while it must wait.
    fn begin(&self, address: IpAddr) -> Option<InFlight> {
        let now = Instant::now();
        let mut table = self.lock();
        if !table.contains_key(&address) && table.len() >= self.limits.max_tracked_addresses {
            table.retain(|_, r| r.in_flight > 0 || r.blocked_until.is_some_and(|t| t > now));
            if table.len() >= self.limits.max_tracked_addresses {
                // Still full of addresses that are waiting: forget the one that frees first.
                let soonest = table
                    .iter()
                    .filter(|(_, r)| r.in_flight == 0)
                    .min_by_key(|(_, r)| r.blocked_until)
                    .map(|(ip, _)| *ip);
                match soonest {
                    Some(ip) => {
                        table.remove(&ip);
                    }
                    None => return None,
                }
            }
        }
        let record = table.entry(address).or_default();
        if record
            .last_failure
            .is_some_and(|at| now.duration_since(at) > FORGIVE_AFTER)
        {
            record.failures = 0;
            record.last_failure = None;
        }
        if record.blocked_until.is_some_and(|until| until > now)
            || record.in_flight >= self.limits.in_flight_per_address
        {
            return None;
        }
        record.in_flight += 1;
        Some(InFlight {
            table: self.addresses.clone(),
            address,
        })
    }

    fn record(&self, address: IpAddr, verdict: Verdict) {
        let mut table = self.lock();
        let Some(record) = table.get_mut(&address) else {
            return;
        };
        match verdict {
            Verdict::Allowed(_) => {
                record.failures = 0;
                record.last_failure = None;
                record.blocked_until = None;
            }
            Verdict::BadCredentials => {
                record.failures = record.failures.saturating_add(1);
                record.last_failure = Some(Instant::now());
                if let Some(over) = record
                    .failures
                    .checked_sub(self.limits.failures_before_backoff)
                {
                    let wait = self
                        .limits
                        .backoff
                        .saturating_mul(2u32.saturating_pow(over.min(16)))
                        .min(self.limits.max_backoff);
                    record.blocked_until = Some(Instant::now() + wait);
                }
            }
        }
    }

    /// Addresses that must wait now, for tests and metrics.
    pub fn blocked_addresses(&self) -> usize {
        let now = Instant::now();
        self.lock()
            .values()
            .filter(|r| r.blocked_until.is_some_and(|t| t > now))
            .count()
    }
}

/// A check in flight from one address; counted out when the check ends or the client
/// goes away while it waits.
struct InFlight {
    table: Arc<Mutex<HashMap<IpAddr, AddressRecord>>>,
    address: IpAddr,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(record) = table.get_mut(&self.address) {
            record.in_flight = record.in_flight.saturating_sub(1);
            if record.in_flight == 0 && record.failures == 0 {
                table.remove(&self.address);
            }
        }
    }
}

/// One checking thread: takes jobs until the broker goes away.
fn check_passwords(users: &Users, jobs: &Mutex<Receiver<Job>>) {
    let mut scratch = Vec::new();
    loop {
        let next = jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .recv_timeout(IDLE_RELEASE);
        match next {
            Ok(job) => {
                // A client that went away while it waited needs no answer.
                if job.answer.is_closed() {
                    continue;
                }
                let verdict = users.verify_with(&job.username, &job.password, &mut scratch);
                let _ = job.answer.send(verdict);
            }
            Err(RecvTimeoutError::Timeout) => scratch = Vec::new(),
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::hash_password;

    fn users() -> Arc<Users> {
        let hash = hash_password("pa55").unwrap();
        Arc::new(
            Users::parse(&format!(
                "[[user]]\nusername = \"linus\"\npassword_hash = \"{hash}\"\nrole = \"robot\"\n"
            ))
            .unwrap(),
        )
    }

    #[tokio::test]
    async fn failures_make_an_address_wait_and_the_cache_does_not() {
        let limits = LoginLimits {
            failures_before_backoff: 2,
            backoff: Duration::from_secs(30),
            ..LoginLimits::default()
        };
        let logins = Logins::start(users(), limits).unwrap();
        let attacker: IpAddr = "10.0.0.66".parse().unwrap();
        let robot: IpAddr = "10.0.0.7".parse().unwrap();
        assert_eq!(
            logins.check(robot, "linus", b"pa55").await,
            LoginOutcome::Allowed(Role::Robot)
        );
        for _ in 0..2 {
            assert_eq!(
                logins.check(attacker, "linus", b"guess").await,
                LoginOutcome::BadCredentials
            );
        }
        assert_eq!(
            logins.check(attacker, "linus", b"guess").await,
            LoginOutcome::Throttled
        );
        assert_eq!(logins.blocked_addresses(), 1);
        assert_eq!(
            logins.check(attacker, "linus", b"pa55").await,
            LoginOutcome::Allowed(Role::Robot),
            "a verified password is still accepted from the cache"
        );
        assert_eq!(
            logins.check(robot, "nobody", b"x").await,
            LoginOutcome::BadCredentials,
            "other addresses are checked as usual"
        );
    }
}
