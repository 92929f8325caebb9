//! The robot as a state machine over its driver: commands in, pin changes out. No MQTT
//! here; the node decides when to call what (timers, link loss, shutdown).

use std::time::{Duration, Instant};

use fleet_protocol::command::{MAX_SPEED, MOTORS};
use fleet_protocol::state::EyesState;
use fleet_protocol::{
    Command, CommandError, Direction, EyesCommand, LastCommand, MotorDirection, MotorState,
    RobotState, ServoTarget, SpeedTarget,
};

use crate::config::{InputPattern, RobotConfig};
use crate::driver::{Driver, DriverError, Pwm};

/// Motor enable PWM: 1 kHz.
const MOTOR_PWM_PERIOD_US: u32 = 1_000;
/// Hobby servos: 50 Hz, 500 µs at -90° to 2500 µs at +90°.
const SERVO_PERIOD_US: u32 = 20_000;
const SERVO_CENTER_US: i32 = 1_500;
/// Pulse change from centre to either end (±90°).
const SERVO_HALF_RANGE_US: i32 = 1_000;

/// Why a command was not carried out. `code` is stable; `message` is for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandFailure {
    pub code: &'static str,
    pub message: String,
}

impl From<CommandError> for CommandFailure {
    fn from(error: CommandError) -> Self {
        Self {
            code: error.code(),
            message: error.to_string(),
        }
    }
}

impl From<DriverError> for CommandFailure {
    fn from(error: DriverError) -> Self {
        Self {
            code: "hardware_error",
            message: error.to_string(),
        }
    }
}

fn not_supported(message: String) -> CommandFailure {
    CommandFailure {
        code: "not_supported",
        message,
    }
}

/// Timers a command asks the node to arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timers {
    /// Stop the motors at this instant unless a refresh comes first (dead-man).
    pub motors_until: Option<Instant>,
    /// Turn the eye off at this instant (end of a blink).
    pub eye_until: Option<Instant>,
}

pub struct Robot {
    config: RobotConfig,
    driver: Box<dyn Driver>,
    started: Instant,
    motion: Direction,
    inputs: InputPattern,
    speeds: [u8; MOTORS],
    eye_on: bool,
    servo_angles: Vec<i16>,
    last_command: Option<LastCommand>,
}

impl Robot {
    /// Takes the hardware and drives every output to its safe state.
    pub fn new(config: RobotConfig, driver: Box<dyn Driver>) -> Result<Self, DriverError> {
        let servo_angles = vec![0; config.servos.len()];
        let mut robot = Self {
            config,
            driver,
            started: Instant::now(),
            motion: Direction::Stop,
            inputs: [false; 4],
            speeds: [MAX_SPEED; MOTORS],
            eye_on: false,
            servo_angles,
            last_command: None,
        };
        robot.safe_state()?;
        Ok(robot)
    }

    pub fn config(&self) -> &RobotConfig {
        &self.config
    }

    pub fn is_moving(&self) -> bool {
        self.motion != Direction::Stop
    }

    /// Motors off, eye off, servos centred.
    pub fn safe_state(&mut self) -> Result<(), DriverError> {
        let motors = self.stop_motors();
        let eye = self.set_eye(false);
        let servos = self.move_servos(ServoTarget([Some(0); 2]));
        motors.and(eye).and(servos)
    }

    /// Stops the motors. Used by the dead-man timer, on link loss and by `stop`; it tries
    /// every pin even when one fails, so one bad pin cannot keep the others driving.
    pub fn stop_motors(&mut self) -> Result<(), DriverError> {
        self.motion = Direction::Stop;
        self.inputs = [false; 4];
        let mut outcome = Ok(());
        for pin in self.config.motor_inputs {
            if let Err(e) = self.driver.set_output(pin, false) {
                outcome = Err(e);
            }
        }
        if let Some(enables) = self.config.motor_enables {
            for pin in enables {
                if let Err(e) = self.driver.set_pwm(pin, Pwm::OFF) {
                    outcome = Err(e);
                }
            }
        }
        outcome
    }

    pub fn set_eye(&mut self, on: bool) -> Result<(), DriverError> {
        self.eye_on = on;
        self.driver.set_output(self.config.eye, on)
    }

    /// Runs one command. `hold` and `blink` are the durations the node resolved
    /// (request or default, already checked against the robot's maximum).
    pub fn execute(
        &mut self,
        command: &Command,
        hold: Duration,
        blink: Duration,
    ) -> Result<Timers, CommandFailure> {
        let now = Instant::now();
        match *command {
            Command::Ping => Ok(Timers::default()),
            Command::Decommission => {
                self.safe_state()?;
                Ok(Timers::default())
            }
            Command::Stop => {
                let motors = self.stop_motors();
                let eye = self.set_eye(false);
                motors.and(eye)?;
                Ok(Timers::default())
            }
            Command::Drive {
                direction: Direction::Stop,
                ..
            } => {
                self.stop_motors()?;
                Ok(Timers::default())
            }
            Command::Drive {
                direction, speed, ..
            } => {
                if let Some(speed) = speed {
                    self.set_speeds(SpeedTarget([Some(speed); MOTORS]))?;
                }
                self.drive(direction)?;
                Ok(Timers {
                    motors_until: Some(now + hold),
                    eye_until: None,
                })
            }
            Command::Speed(target) => {
                self.set_speeds(target)?;
                Ok(Timers::default())
            }
            Command::Eyes(EyesCommand::On) => {
                self.set_eye(true)?;
                Ok(Timers::default())
            }
            Command::Eyes(EyesCommand::Off) => {
                self.set_eye(false)?;
                Ok(Timers::default())
            }
            Command::Eyes(EyesCommand::Blink { .. }) => {
                self.set_eye(true)?;
                Ok(Timers {
                    motors_until: None,
                    eye_until: Some(now + blink),
                })
            }
            Command::Servo(target) => {
                if self.config.servos.is_empty() {
                    return Err(not_supported(format!("{} has no servos", self.config.id)));
                }
                let wanted = target.0.iter().filter(|a| a.is_some()).count();
                let last_asked = target.0.iter().rposition(|a| a.is_some()).unwrap_or(0);
                if last_asked >= self.config.servos.len() && wanted > 0 {
                    return Err(not_supported(format!(
                        "{} has {} servo(s)",
                        self.config.id,
                        self.config.servos.len()
                    )));
                }
                self.move_servos(target)?;
                Ok(Timers::default())
            }
        }
    }

    fn drive(&mut self, direction: Direction) -> Result<(), DriverError> {
        let pattern = self.config.patterns.for_direction(direction);
        if let Some(enables) = self.config.motor_enables {
            for (pin, speed) in enables.into_iter().zip(self.speeds) {
                self.driver.set_pwm(pin, motor_pwm(speed))?;
            }
        }
        // Inputs that go low first, so the bridge never sees both sides high mid-change.
        let order = (0..4)
            .filter(|&i| !pattern[i])
            .chain((0..4).filter(|&i| pattern[i]));
        for i in order {
            if let Err(e) = self
                .driver
                .set_output(self.config.motor_inputs[i], pattern[i])
            {
                let _ = self.stop_motors();
                return Err(e);
            }
        }
        self.inputs = pattern;
        self.motion = direction;
        Ok(())
    }

    fn set_speeds(&mut self, target: SpeedTarget) -> Result<(), CommandFailure> {
        let Some(enables) = self.config.motor_enables else {
            return Err(not_supported(format!(
                "{} has no motor enable pins, so its speed cannot be set",
                self.config.id
            )));
        };
        for (m, speed) in target.0.iter().enumerate() {
            if let Some(speed) = *speed {
                self.speeds[m] = speed;
                if self.is_moving() {
                    self.driver.set_pwm(enables[m], motor_pwm(speed))?;
                }
            }
        }
        Ok(())
    }

    fn move_servos(&mut self, target: ServoTarget) -> Result<(), DriverError> {
        for (i, pin) in self.config.servos.iter().copied().enumerate() {
            if let Some(angle) = target.0.get(i).copied().flatten() {
                self.driver.set_pwm(pin, servo_pwm(angle))?;
                self.servo_angles[i] = angle;
            }
        }
        Ok(())
    }

    pub fn record_last_command(&mut self, last: LastCommand) {
        self.last_command = Some(last);
    }

    /// The state document; `now_ms` is the wall-clock time it is published at.
    pub fn state(&self, now_ms: u64) -> RobotState {
        let forward = self.config.patterns.forward;
        let motors = (0..MOTORS)
            .map(|m| {
                let pair = [self.inputs[2 * m], self.inputs[2 * m + 1]];
                let forward_pair = [forward[2 * m], forward[2 * m + 1]];
                let direction = if pair == [false, false] || pair == [true, true] {
                    MotorDirection::Stopped
                } else if pair == forward_pair {
                    MotorDirection::Forward
                } else {
                    MotorDirection::Backward
                };
                MotorState {
                    direction,
                    speed: self.config.motor_enables.map(|_| self.speeds[m]),
                }
            })
            .collect();
        RobotState {
            robot: self.config.id.to_string(),
            motion: self.motion,
            motors,
            eyes: if self.eye_on {
                EyesState::On
            } else {
                EyesState::Off
            },
            servos: self.servo_angles.clone(),
            last_command: self.last_command.clone(),
            uptime_s: self.started.elapsed().as_secs(),
            last_seen_ms: now_ms,
            // The node knows the latch; it fills this in.
            estop: None,
        }
    }
}

fn motor_pwm(speed: u8) -> Pwm {
    Pwm {
        period_us: MOTOR_PWM_PERIOD_US,
        pulse_us: MOTOR_PWM_PERIOD_US * u32::from(speed.min(MAX_SPEED)) / u32::from(MAX_SPEED),
    }
}

fn servo_pwm(angle: i16) -> Pwm {
    let pulse = SERVO_CENTER_US + i32::from(angle.clamp(-90, 90)) * SERVO_HALF_RANGE_US / 90;
    Pwm {
        period_us: SERVO_PERIOD_US,
        pulse_us: u32::try_from(pulse).unwrap_or(SERVO_CENTER_US as u32),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::driver::PinOutput;

    /// Shares pin outputs with the test so it can look at them after the robot acts.
    #[derive(Clone, Default)]
    struct Pins(Arc<Mutex<std::collections::BTreeMap<u8, PinOutput>>>);

    impl Driver for Pins {
        fn set_output(&mut self, pin: u8, high: bool) -> Result<(), DriverError> {
            self.0.lock().unwrap().insert(pin, PinOutput::Level(high));
            Ok(())
        }
        fn set_pwm(&mut self, pin: u8, pwm: Pwm) -> Result<(), DriverError> {
            self.0.lock().unwrap().insert(pin, PinOutput::Pwm(pwm));
            Ok(())
        }
    }

    impl Pins {
        fn levels(&self, pins: [u8; 4]) -> String {
            let map = self.0.lock().unwrap();
            pins.iter()
                .map(|p| match map.get(p) {
                    Some(PinOutput::Level(true)) => '1',
                    _ => '0',
                })
                .collect()
        }
    }

    fn drive(direction: Direction) -> Command {
        Command::Drive {
            direction,
            speed: None,
            hold_ms: None,
        }
    }

    const HOLD: Duration = Duration::from_secs(1);

    #[test]
    fn pin_patterns_of_both_robots() {
        for (config, expected) in [
            (
                RobotConfig::linus(),
                ["1010", "0101", "0110", "1001", "0000"],
            ),
            (
                RobotConfig::torvalds(),
                ["0110", "1001", "1010", "0101", "0000"],
            ),
        ] {
            let pins = Pins::default();
            let inputs = config.motor_inputs;
            let mut robot = Robot::new(config, Box::new(pins.clone())).unwrap();
            for (direction, want) in Direction::ALL.into_iter().zip(expected) {
                robot.execute(&drive(direction), HOLD, HOLD).unwrap();
                assert_eq!(pins.levels(inputs), want, "{direction}");
            }
        }
    }

    #[test]
    fn drive_arms_the_dead_man_and_stop_clears_it() {
        let mut robot = Robot::new(RobotConfig::linus(), Box::new(Pins::default())).unwrap();
        let timers = robot
            .execute(&drive(Direction::Forward), HOLD, HOLD)
            .unwrap();
        assert!(timers.motors_until.is_some());
        assert!(robot.is_moving());
        let state = robot.state(0);
        assert_eq!(state.motors[0].direction, MotorDirection::Forward);
        assert_eq!(state.motors[1].direction, MotorDirection::Forward);
        robot.execute(&Command::Stop, HOLD, HOLD).unwrap();
        assert!(!robot.is_moving());
        assert_eq!(robot.state(0).motors[0].direction, MotorDirection::Stopped);
    }

    #[test]
    fn left_turns_motor_one_backward() {
        let mut robot = Robot::new(RobotConfig::torvalds(), Box::new(Pins::default())).unwrap();
        robot.execute(&drive(Direction::Left), HOLD, HOLD).unwrap();
        let motors = robot.state(0).motors;
        assert_eq!(motors[0].direction, MotorDirection::Backward);
        assert_eq!(motors[1].direction, MotorDirection::Forward);
        assert_eq!(motors[0].speed, None, "torvalds has no speed control");
    }

    #[test]
    fn speed_and_servos_where_the_robot_has_them() {
        let pins = Pins::default();
        let mut linus = Robot::new(RobotConfig::linus(), Box::new(pins.clone())).unwrap();
        linus
            .execute(&Command::Speed(SpeedTarget([Some(3), Some(7)])), HOLD, HOLD)
            .unwrap();
        linus
            .execute(&drive(Direction::Forward), HOLD, HOLD)
            .unwrap();
        assert_eq!(
            pins.0.lock().unwrap().get(&12),
            Some(&PinOutput::Pwm(Pwm {
                period_us: 1000,
                pulse_us: 300
            }))
        );
        linus
            .execute(
                &Command::Servo(ServoTarget([Some(-90), Some(90)])),
                HOLD,
                HOLD,
            )
            .unwrap();
        assert_eq!(linus.state(0).servos, vec![-90, 90]);
        assert_eq!(
            pins.0.lock().unwrap().get(&22),
            Some(&PinOutput::Pwm(Pwm {
                period_us: 20_000,
                pulse_us: 500
            }))
        );

        let mut torvalds = Robot::new(RobotConfig::torvalds(), Box::new(Pins::default())).unwrap();
        let err = torvalds
            .execute(&Command::Speed(SpeedTarget([Some(3), None])), HOLD, HOLD)
            .unwrap_err();
        assert_eq!(err.code, "not_supported");
        let err = torvalds
            .execute(&Command::Servo(ServoTarget([Some(0), None])), HOLD, HOLD)
            .unwrap_err();
        assert_eq!(err.code, "not_supported");
    }
}
