//! fleet-gateway: the web UI and HTTP API as its own process.

use clap::Parser;
use fleet_gateway::{GatewayArgs, GatewayConfig};
use fleet_runtime::{HostPort, TopicArgs};

/// Serves the fleet's web UI and HTTP API and turns clicks into MQTT commands.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    gateway: GatewayArgs,
    /// MQTT broker as host:port
    #[arg(long, env = "FLEET_BROKER", default_value = "127.0.0.1:1883")]
    broker: HostPort,
    #[command(flatten)]
    topics: TopicArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = fleet_runtime::telemetry::init("fleet-gateway");
    let args = Args::parse();
    let config = GatewayConfig::from_args(
        &args.gateway,
        args.topics.topics(),
        args.broker.host,
        args.broker.port,
    );
    fleet_gateway::run(config, fleet_runtime::shutdown_signal()).await
}
