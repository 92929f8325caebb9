use std::collections::BTreeMap;

use super::{Driver, DriverError, PinOutput, Pwm};

/// No hardware: keeps every pin's output in memory and logs changes at debug level. The
/// robot's state is visible over MQTT like a real robot's.
#[derive(Debug, Default)]
pub struct SimulatedDriver {
    robot: String,
    pins: BTreeMap<u8, PinOutput>,
}

impl SimulatedDriver {
    pub fn new(robot: impl Into<String>) -> Self {
        Self {
            robot: robot.into(),
            pins: BTreeMap::new(),
        }
    }

    pub fn pin(&self, pin: u8) -> Option<PinOutput> {
        self.pins.get(&pin).copied()
    }

    fn set(&mut self, pin: u8, output: PinOutput) {
        if self.pins.insert(pin, output) != Some(output) {
            tracing::debug!(robot = %self.robot, pin, ?output, "simulated pin change");
        }
    }
}

impl Driver for SimulatedDriver {
    fn set_output(&mut self, pin: u8, high: bool) -> Result<(), DriverError> {
        self.set(pin, PinOutput::Level(high));
        Ok(())
    }

    fn set_pwm(&mut self, pin: u8, pwm: Pwm) -> Result<(), DriverError> {
        self.set(pin, PinOutput::Pwm(pwm));
        Ok(())
    }
}
