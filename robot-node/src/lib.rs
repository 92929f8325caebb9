//! robot-node: runs on each robot. Takes commands from its MQTT topics, drives the
//! hardware through a [`driver::Driver`], and publishes state, results and availability.

pub mod config;
pub mod driver;
pub mod node;
pub mod robot;

pub use config::{BrokerAddress, NodeConfig, RobotConfig};
pub use driver::{Driver, SimulatedDriver};
pub use node::{NodeCounters, NodeError, NodeHandle, run, spawn};
