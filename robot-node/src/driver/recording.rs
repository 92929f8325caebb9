use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::{Driver, DriverError, PinOutput, Pwm};

/// One pin change, as the recording backend saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinChange {
    pub at: Instant,
    pub pin: u8,
    pub output: PinOutput,
}

/// For tests: records every pin write with its time. The [`Recording`] handle stays with
/// the test while the driver goes to the robot.
#[derive(Debug, Clone, Default)]
pub struct RecordingDriver {
    timeline: Arc<Mutex<Vec<PinChange>>>,
}

/// Read access to what a [`RecordingDriver`] recorded.
#[derive(Debug, Clone)]
pub struct Recording {
    timeline: Arc<Mutex<Vec<PinChange>>>,
}

impl RecordingDriver {
    pub fn new() -> (Self, Recording) {
        let driver = Self::default();
        let recording = Recording {
            timeline: driver.timeline.clone(),
        };
        (driver, recording)
    }

    fn record(&self, pin: u8, output: PinOutput) {
        lock(&self.timeline).push(PinChange {
            at: Instant::now(),
            pin,
            output,
        });
    }
}

/// The timeline stays usable even if a test thread panicked while holding it.
fn lock(timeline: &Mutex<Vec<PinChange>>) -> MutexGuard<'_, Vec<PinChange>> {
    timeline.lock().unwrap_or_else(|e| e.into_inner())
}

impl Driver for RecordingDriver {
    fn set_output(&mut self, pin: u8, high: bool) -> Result<(), DriverError> {
        self.record(pin, PinOutput::Level(high));
        Ok(())
    }

    fn set_pwm(&mut self, pin: u8, pwm: Pwm) -> Result<(), DriverError> {
        self.record(pin, PinOutput::Pwm(pwm));
        Ok(())
    }
}

impl Recording {
    /// Every pin write so far, oldest first.
    pub fn timeline(&self) -> Vec<PinChange> {
        lock(&self.timeline).clone()
    }

    /// Each pin's latest output.
    pub fn outputs(&self) -> BTreeMap<u8, PinOutput> {
        lock(&self.timeline)
            .iter()
            .map(|change| (change.pin, change.output))
            .collect()
    }

    /// The current levels of `pins` as a string of `0` and `1` (e.g. `"1010"`); a pin
    /// never written, or a PWM pin, reads as `0` unless it has pulses.
    pub fn levels(&self, pins: &[u8]) -> String {
        let outputs = self.outputs();
        pins.iter()
            .map(|pin| match outputs.get(pin) {
                Some(output) if output.is_active() => '1',
                _ => '0',
            })
            .collect()
    }

    /// When every one of `pins` last became inactive after being active, if all are
    /// inactive now: "the motors were off from this instant".
    pub fn all_inactive_since(&self, pins: &[u8]) -> Option<Instant> {
        let timeline = lock(&self.timeline);
        let mut since: Option<Instant> = None;
        for pin in pins {
            let writes: Vec<&PinChange> = timeline.iter().filter(|c| c.pin == *pin).collect();
            let last = writes.last()?;
            if last.output.is_active() {
                return None;
            }
            // The first inactive write after the last active one.
            let off_at = writes
                .iter()
                .rev()
                .take_while(|c| !c.output.is_active())
                .last()
                .map(|c| c.at)?;
            since = Some(since.map_or(off_at, |s| s.max(off_at)));
        }
        since
    }

    pub fn clear(&self) {
        lock(&self.timeline).clear();
    }
}
