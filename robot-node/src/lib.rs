//! robot-node: runs on each robot. Takes commands from its MQTT topics, drives the
//! hardware through a [`driver::Driver`], and publishes state, results and availability.

pub mod config;
pub mod driver;
pub mod http;
pub mod metrics;
pub mod node;
pub mod robot;

pub use config::{BrokerAddress, ConfigFile, DiscoverySettings, NodeConfig, RobotConfig};
pub use driver::{Driver, RecordingDriver, SimulatedDriver};
pub use metrics::NodeMetrics;
pub use node::{DECOMMISSIONED_EXIT_CODE, Ending, NodeError, NodeHandle, run, spawn};
