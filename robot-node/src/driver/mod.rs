//! The hardware interface. Backends work at the pin level (a GPIO output or a PWM
//! signal), so a simulated or recording backend sees exactly what the real one would.
//!
//! - [`RppalDriver`]: a Raspberry Pi's GPIO through `rppal`.
//! - [`SimulatedDriver`]: no hardware; pin changes are kept in memory and logged.
//! - [`RecordingDriver`]: for tests; keeps a timestamped timeline of every pin change.

mod recording;
mod rppal;
mod simulated;

pub use self::recording::{PinChange, Recording, RecordingDriver};
pub use self::rppal::{RppalDriver, is_raspberry_pi};
pub use self::simulated::SimulatedDriver;

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

/// One pin's current output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinOutput {
    Level(bool),
    Pwm(Pwm),
}

impl PinOutput {
    /// Whether the pin drives anything: a high level or a PWM signal with pulses.
    pub fn is_active(self) -> bool {
        match self {
            PinOutput::Level(high) => high,
            PinOutput::Pwm(pwm) => pwm.pulse_us > 0,
        }
    }
}
