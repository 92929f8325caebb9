//! fleet-gateway: the web UI and HTTP API as its own process.

use std::net::SocketAddr;

use clap::Parser;
use fleet_gateway::GatewayConfig;
use fleet_protocol::{RobotId, TopicPrefix, Topics};
use fleet_runtime::HostPort;

/// Serves the fleet's web UI and HTTP API and turns clicks into MQTT commands.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Where to serve HTTP
    #[arg(long, env = "FLEET_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    http_addr: SocketAddr,
    /// MQTT broker as host:port
    #[arg(long, env = "FLEET_BROKER", default_value = "127.0.0.1:1883")]
    broker: HostPort,
    /// Robots known before they first report (comma-separated); others are discovered
    #[arg(
        long,
        env = "FLEET_ROBOTS",
        value_delimiter = ',',
        default_value = "linus,torvalds"
    )]
    robots: Vec<RobotId>,
    /// First topic level of every fleet topic
    #[arg(long, env = "FLEET_TOPIC_PREFIX", default_value = "fleet")]
    topic_prefix: TopicPrefix,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    fleet_runtime::init_logging();
    let args = Args::parse();
    let mut config = GatewayConfig::new(args.broker.host, args.broker.port);
    config.http_addr = args.http_addr;
    config.robots = args.robots;
    config.topics = Topics::new(args.topic_prefix);
    fleet_gateway::run(config, fleet_runtime::shutdown_signal()).await
}
