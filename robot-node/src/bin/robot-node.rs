//! robot-node: one robot's node as its own process (on the Pi, or simulated).

use std::time::Duration;

use clap::{Parser, ValueEnum};
use fleet_protocol::RobotId;
use fleet_runtime::{HostPort, TopicArgs};
use robot_node::{BrokerAddress, NodeConfig, NodeCounters, RobotConfig, SimulatedDriver};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DriverKind {
    /// No hardware: pin changes are kept in memory and logged at debug level
    Simulated,
}

/// Runs one robot: takes commands from MQTT, drives the hardware, publishes its state.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Robot id; linus and torvalds have built-in pin maps, other ids use linus's
    #[arg(long, env = "FLEET_ROBOT")]
    robot: RobotId,
    /// MQTT broker as host:port
    #[arg(long, env = "FLEET_BROKER", default_value = "127.0.0.1:1883")]
    broker: HostPort,
    #[command(flatten)]
    topics: TopicArgs,
    /// Hardware backend
    #[arg(long, env = "FLEET_DRIVER", value_enum, default_value = "simulated")]
    driver: DriverKind,
    /// How long a drive command keeps the motors on without a refresh (dead-man), in ms
    #[arg(long, env = "FLEET_HOLD_MS", default_value_t = 1000)]
    hold_ms: u64,
    /// The longest hold a drive command may ask for, in ms
    #[arg(long, env = "FLEET_MAX_HOLD_MS", default_value_t = 5000)]
    max_hold_ms: u64,
    /// MQTT keep-alive in seconds (how soon the broker declares the node offline)
    #[arg(long, env = "FLEET_KEEP_ALIVE_S", default_value_t = 5)]
    keep_alive_s: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    fleet_runtime::init_logging();
    let args = Args::parse();
    if args.hold_ms == 0 || args.hold_ms > args.max_hold_ms {
        anyhow::bail!(
            "--hold-ms must be between 1 and --max-hold-ms ({})",
            args.max_hold_ms
        );
    }
    let robot = RobotConfig::preset_or_default(args.robot);
    let broker = BrokerAddress {
        host: args.broker.host,
        port: args.broker.port,
    };
    let mut config = NodeConfig::new(robot, broker);
    config.topics = args.topics.topics();
    config.default_hold = Duration::from_millis(args.hold_ms);
    config.max_hold = Duration::from_millis(args.max_hold_ms);
    config.keep_alive = Duration::from_secs(args.keep_alive_s.max(1));
    let driver = match args.driver {
        DriverKind::Simulated => Box::new(SimulatedDriver::new(config.robot.id.to_string())),
    };
    let counters = std::sync::Arc::new(NodeCounters::default());
    robot_node::run(config, driver, counters, fleet_runtime::shutdown_signal()).await?;
    Ok(())
}
