//! The hardware interface. Backends work at the pin level (a GPIO output or a PWM
//! signal), so a simulated or recording backend sees exactly what the real one would.

use std::collections::BTreeMap;

/// A PWM signal: motor enables use it for speed, servos for their angle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pwm {
    pub period_us: u32,
    pub pulse_us: u32,
}

impl Pwm {
    pub const OFF: Pwm = Pwm {
        period_us: 0,
        pulse_us: 0,
    };
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("GPIO{pin}: {message}")]
    Pin { pin: u8, message: String },
    #[error("the GPIO device cannot be opened: {0}")]
    Unavailable(String),
}

/// What every hardware backend implements.
pub trait Driver: Send {
    /// Sets a digital output high or low.
    fn set_output(&mut self, pin: u8, high: bool) -> Result<(), DriverError>;
    /// Sets a PWM output; `Pwm::OFF` stops the signal (output low).
    fn set_pwm(&mut self, pin: u8, pwm: Pwm) -> Result<(), DriverError>;
}

/// One pin's current output as the simulator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinOutput {
    Level(bool),
    Pwm(Pwm),
}

/// No hardware: keeps every pin's output in memory and logs changes. The robot's state
/// is visible over MQTT like a real robot's.
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
