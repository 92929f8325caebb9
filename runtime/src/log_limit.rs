//! Rate limits for log lines that clients can trigger at will.
//!
//! A subscriber that stops reading, a client that retries a refused publish in a tight
//! loop, or a script hammering the gateway without its token, can cause tens of thousands
//! of drops or refusals a second. One log line each
//! would fill the disk (a benchmark run wrote 60 MB) and bury everything else, so each kind
//! of event logs its first few lines per window and then only a count of the lines it
//! held back. The metrics still count every event.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines logged per kind of event and window before the rest are only counted.
pub const DEFAULT_BURST: u32 = 10;
/// How long a window lasts; held-back lines are reported once per window.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);

/// Decides which log lines of a kind are written; counts the rest.
#[derive(Debug)]
pub struct LogLimiter {
    burst: u32,
    window: Duration,
    kinds: Mutex<HashMap<&'static str, Window>>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    logged: u32,
    held_back: u64,
}

/// What to do with one log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Write it; `held_back` lines of the same kind were held back since the last report.
    Log { held_back: u64 },
    /// Only count it.
    HoldBack,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new(DEFAULT_BURST, DEFAULT_WINDOW)
    }
}

impl LogLimiter {
    pub fn new(burst: u32, window: Duration) -> Self {
        Self {
            burst,
            window,
            kinds: Mutex::new(HashMap::new()),
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// Whether a line of `kind` happening at `now` is written.
    pub fn admit(&self, kind: &'static str, now: Instant) -> Admission {
        // A panic elsewhere while holding the lock leaves only counts behind: keep going.
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        let window = kinds.entry(kind).or_insert(Window {
            started: now,
            logged: 0,
            held_back: 0,
        });
        let mut held_back = 0;
        if now.saturating_duration_since(window.started) >= self.window {
            held_back = std::mem::take(&mut window.held_back);
            window.started = now;
            window.logged = 0;
        }
        if window.logged < self.burst {
            window.logged += 1;
            Admission::Log { held_back }
        } else {
            window.held_back += held_back + 1;
            Admission::HoldBack
        }
    }

    /// The kinds whose window ended with lines held back, and how many; they start over.
    pub fn take_held_back(&self, now: Instant) -> Vec<(&'static str, u64)> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        let mut report = Vec::new();
        for (kind, window) in kinds.iter_mut() {
            if window.held_back > 0 && now.saturating_duration_since(window.started) >= self.window
            {
                report.push((*kind, std::mem::take(&mut window.held_back)));
                window.started = now;
                window.logged = 0;
            }
        }
        report.sort_unstable();
        report
    }
}

/// Text a client sent (a header, a topic), fit for a log line: at most `max_chars`
/// characters, control characters and quotes escaped, so that it can neither flood nor
/// forge log lines.
pub fn quoted(text: &str, max_chars: usize) -> String {
    text.chars()
        .take(max_chars)
        .flat_map(char::escape_debug)
        .collect()
}

/// Logs, once per window, how many lines of each kind were held back. Runs until dropped.
pub async fn report_held_back(limiter: &LogLimiter) {
    let mut ticks = tokio::time::interval(limiter.window());
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        for (kind, held_back) in limiter.take_held_back(Instant::now()) {
            tracing::warn!(
                kind,
                held_back,
                window_s = limiter.window().as_secs(),
                "more log lines of this kind were held back; the metrics count every event"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_text_is_bounded_and_escaped() {
        assert_eq!(quoted("evil\nINFO forged line", 8), "evil\\nINF");
        assert_eq!(quoted("plain", 100), "plain");
    }

    #[test]
    fn logs_a_burst_per_window_then_counts() {
        let limiter = LogLimiter::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(limiter.admit("drop", t0), Admission::Log { held_back: 0 });
        assert_eq!(limiter.admit("drop", t0), Admission::Log { held_back: 0 });
        assert_eq!(limiter.admit("drop", t0), Admission::HoldBack);
        assert_eq!(limiter.admit("drop", t0), Admission::HoldBack);
        // Another kind has its own budget.
        assert_eq!(limiter.admit("acl", t0), Admission::Log { held_back: 0 });
        // The next window's first line carries the count of the previous one.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(limiter.admit("drop", t1), Admission::Log { held_back: 2 });
        assert_eq!(limiter.admit("drop", t1), Admission::Log { held_back: 0 });
        assert_eq!(limiter.admit("drop", t1), Admission::HoldBack);
    }

    #[test]
    fn quiet_kinds_are_reported_by_the_ticker() {
        let limiter = LogLimiter::new(1, Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(limiter.admit("drop", t0), Admission::Log { held_back: 0 });
        for _ in 0..5 {
            assert_eq!(limiter.admit("drop", t0), Admission::HoldBack);
        }
        assert_eq!(limiter.admit("auth", t0), Admission::Log { held_back: 0 });
        // Not before the window ends.
        assert!(
            limiter
                .take_held_back(t0 + Duration::from_secs(9))
                .is_empty()
        );
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(limiter.take_held_back(t1), vec![("drop", 5)]);
        // Reported once; the next line starts a clean window.
        assert!(
            limiter
                .take_held_back(t1 + Duration::from_secs(20))
                .is_empty()
        );
        assert_eq!(limiter.admit("drop", t1), Admission::Log { held_back: 0 });
    }
}
