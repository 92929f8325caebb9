use std::collections::BTreeMap;
use std::time::Duration;

use rppal::gpio::{Gpio, OutputPin};

use super::{Driver, DriverError, Pwm};

/// A Raspberry Pi's GPIO through `rppal`: plain outputs for the motor inputs and the eye,
/// software PWM for the motor enables and the servos (any pin can do it, so pin maps are
/// not limited to the two hardware PWM channels).
pub struct RppalDriver {
    pins: BTreeMap<u8, OutputPin>,
}

impl RppalDriver {
    /// Opens the GPIO device and claims `pins` as outputs, all low. Fails with a plain
    /// message when this is not a Pi or the device is not accessible.
    pub fn open(pins: &[u8]) -> Result<Self, DriverError> {
        let gpio = Gpio::new().map_err(|e| {
            DriverError::Unavailable(format!(
                "{e} (is this a Raspberry Pi, and may this user open /dev/gpiomem? \
                 Use --driver simulated to run without hardware)"
            ))
        })?;
        let mut claimed = BTreeMap::new();
        for &pin in pins {
            let output = gpio
                .get(pin)
                .map_err(|e| DriverError::Pin {
                    pin,
                    message: format!("cannot claim it: {e}"),
                })?
                .into_output_low();
            claimed.insert(pin, output);
        }
        Ok(Self { pins: claimed })
    }

    fn pin(&mut self, pin: u8) -> Result<&mut OutputPin, DriverError> {
        self.pins.get_mut(&pin).ok_or_else(|| DriverError::Pin {
            pin,
            message: "not in this robot's pin map".to_owned(),
        })
    }
}

impl Driver for RppalDriver {
    fn set_output(&mut self, pin: u8, high: bool) -> Result<(), DriverError> {
        let output = self.pin(pin)?;
        if high {
            output.set_high();
        } else {
            output.set_low();
        }
        Ok(())
    }

    fn set_pwm(&mut self, pin: u8, pwm: Pwm) -> Result<(), DriverError> {
        let output = self.pin(pin)?;
        let outcome = if pwm.period_us == 0 || pwm.pulse_us == 0 {
            output.clear_pwm().map(|()| output.set_low())
        } else {
            output.set_pwm(
                Duration::from_micros(pwm.period_us.into()),
                Duration::from_micros(pwm.pulse_us.min(pwm.period_us).into()),
            )
        };
        outcome.map_err(|e| DriverError::Pin {
            pin,
            message: format!("PWM: {e}"),
        })
    }
}

/// Whether this machine is a Raspberry Pi (by its device-tree model string).
pub fn is_raspberry_pi() -> bool {
    std::fs::read_to_string("/proc/device-tree/model")
        .map(|model| model.starts_with("Raspberry Pi"))
        .unwrap_or(false)
}
