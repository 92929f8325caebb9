//! Password checks under attack. argon2 is slow and takes 19 MiB on purpose, so a flood
//! of wrong passwords must neither take the broker's memory nor keep robots out:
//! - a password verified before is accepted from the cache at once, before any queue;
//! - the rest run on a few threads of their own that keep their argon2 memory (bounded:
//!   threads × 19 MiB, handed back after 10 quiet seconds), behind a short queue; when the
//!   queue is full the client is told the server is busy instead of waiting;
//! - an address with failed logins backs off: after a few failures its next attempts are
//!   refused without a check, for a time that doubles with every failure (capped);
//! - one address has at most a couple of checks in flight; further logins from it wait
//!   their turn (a fleet behind one NAT address all logging in after a broker restart),
//!   a bounded number of them for a bounded time, and the rest are refused.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, oneshot};

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
    /// Logins from one address waiting for one of its checks to end ...
    pub waiting_per_address: usize,
    /// ... each for at most this long before it is refused.
    pub wait_for_turn: Duration,
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
            waiting_per_address: 64,
            wait_for_turn: Duration::from_secs(5),
            max_tracked_addresses: 10_000,
        }
    }
}

/// What a login attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginOutcome {
    Allowed(Role),
    BadCredentials,
    /// This address failed too often, or too many of its logins were in line: not checked.
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
    /// Logins in line for one of this address's checks.
    waiting: usize,
    /// Woken when one of its checks ends.
    turn: Arc<Notify>,
}

impl AddressRecord {
    fn forgettable(&self, now: Instant) -> bool {
        self.in_flight == 0 && self.waiting == 0 && self.blocked_until.is_none_or(|t| t <= now)
    }
}

/// What `begin` found for one login.
enum Turn {
    Now(InFlight),
    /// All of the address's checks are taken: wait for this, then ask again.
    Wait(Arc<Notify>),
    Refused,
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

/// A login in line looks for a free check at least this often.
const RECHECK_TURN: Duration = Duration::from_millis(50);

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
        let deadline = tokio::time::Instant::now() + self.limits.wait_for_turn;
        let mut in_line: Option<InLine> = None;
        let _in_flight = loop {
            match self.begin(address, in_line.is_some()) {
                Turn::Now(slot) => break slot,
                Turn::Refused => return LoginOutcome::Throttled,
                Turn::Wait(turn) => {
                    if in_line.is_none() {
                        in_line = Some(InLine {
                            table: self.addresses.clone(),
                            address,
                        });
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return LoginOutcome::Throttled;
                    }
                    // A wake-up can be taken by another login in line: look again now
                    // and then even without one.
                    let _ = tokio::time::timeout_at(
                        deadline.min(tokio::time::Instant::now() + RECHECK_TURN),
                        turn.notified(),
                    )
                    .await;
                }
            }
        };
        drop(in_line);
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

    /// A slot for one check from `address`, a place in its line, or a refusal.
    /// `in_line`: this login already counts among the address's waiting ones.
    fn begin(&self, address: IpAddr, in_line: bool) -> Turn {
        let now = Instant::now();
        let mut table = self.lock();
        if !table.contains_key(&address) && table.len() >= self.limits.max_tracked_addresses {
            table.retain(|_, r| !r.forgettable(now));
            if table.len() >= self.limits.max_tracked_addresses {
                // Still full of addresses that are waiting: forget the one that frees first.
                let soonest = table
                    .iter()
                    .filter(|(_, r)| r.in_flight == 0 && r.waiting == 0)
                    .min_by_key(|(_, r)| r.blocked_until)
                    .map(|(ip, _)| *ip);
                match soonest {
                    Some(ip) => {
                        table.remove(&ip);
                    }
                    None => return Turn::Refused,
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
        if record.blocked_until.is_some_and(|until| until > now) {
            return Turn::Refused;
        }
        if record.in_flight >= self.limits.in_flight_per_address {
            if in_line {
                return Turn::Wait(record.turn.clone());
            }
            if record.waiting >= self.limits.waiting_per_address {
                return Turn::Refused;
            }
            record.waiting += 1;
            return Turn::Wait(record.turn.clone());
        }
        record.in_flight += 1;
        Turn::Now(InFlight {
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
        count_out(&self.table, self.address, |record| {
            record.in_flight = record.in_flight.saturating_sub(1);
            record.turn.notify_one();
        });
    }
}

/// A login waiting for one of its address's checks; counted out when it gets one, gives
/// up, or the client goes away.
struct InLine {
    table: Arc<Mutex<HashMap<IpAddr, AddressRecord>>>,
    address: IpAddr,
}

impl Drop for InLine {
    fn drop(&mut self) {
        count_out(&self.table, self.address, |record| {
            record.waiting = record.waiting.saturating_sub(1);
        });
    }
}

/// Updates an address's record as a login leaves, and forgets an address with nothing
/// left to remember.
fn count_out(
    table: &Mutex<HashMap<IpAddr, AddressRecord>>,
    address: IpAddr,
    leave: impl FnOnce(&mut AddressRecord),
) {
    let mut table = table.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(record) = table.get_mut(&address) {
        leave(record);
        if record.failures == 0 && record.forgettable(Instant::now()) {
            table.remove(&address);
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

    /// One login per username from `address`, all started at once.
    async fn all_at_once(
        logins: &Arc<Logins>,
        address: IpAddr,
        usernames: &[&'static str],
        password: &'static [u8],
    ) -> Vec<LoginOutcome> {
        let attempts: Vec<_> = usernames
            .iter()
            .map(|&username| {
                let logins = logins.clone();
                tokio::spawn(async move { logins.check(address, username, password).await })
            })
            .collect();
        let mut outcomes = Vec::new();
        for attempt in attempts {
            outcomes.push(attempt.await.unwrap());
        }
        outcomes
    }

    #[tokio::test]
    async fn logins_from_one_address_wait_their_turn_up_to_a_bound() {
        // Two checks at a time per address, as by default: the rest of a fleet behind one
        // NAT address, logging in at once, waits instead of being refused.
        let limits = LoginLimits {
            in_flight_per_address: 2,
            waiting_per_address: 8,
            ..LoginLimits::default()
        };
        let logins = Arc::new(Logins::start(users(), limits).unwrap());
        let nat: IpAddr = "10.0.0.1".parse().unwrap();
        // Wrong passwords are never cached, so every one of these is a real check.
        let outcomes = all_at_once(&logins, nat, &["linus"; 10], b"not-it").await;
        let checked = outcomes
            .iter()
            .filter(|o| **o == LoginOutcome::BadCredentials)
            .count();
        // 2 checked at once and 8 in line; the 5th failure makes the address wait (the
        // 6th may be running by then), so the logins still in line are refused unchecked.
        assert!((5..=6).contains(&checked), "{outcomes:?}");
        assert_eq!(
            outcomes
                .iter()
                .filter(|o| **o == LoginOutcome::Throttled)
                .count(),
            10 - checked
        );

        let limits = LoginLimits {
            in_flight_per_address: 1,
            waiting_per_address: 2,
            ..LoginLimits::default()
        };
        let logins = Arc::new(Logins::start(users(), limits).unwrap());
        let mut outcomes = all_at_once(&logins, nat, &["a", "b", "c", "d"], b"x").await;
        outcomes.sort_by_key(|o| format!("{o:?}"));
        assert_eq!(
            outcomes,
            [
                LoginOutcome::BadCredentials,
                LoginOutcome::BadCredentials,
                LoginOutcome::BadCredentials,
                LoginOutcome::Throttled
            ],
            "one checked, two in line, the fourth refused"
        );
    }
}
