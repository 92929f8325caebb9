//! fleet-gateway: the web UI and HTTP API as its own process.

use anyhow::Context;
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
    /// Connect to the broker over TLS, verifying its certificate against this PEM CA
    /// file (the certificate must name the host given in --broker)
    #[arg(long, env = "FLEET_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// MQTT username, for brokers with authentication
    #[arg(long, env = "FLEET_MQTT_USERNAME", requires = "mqtt_password")]
    mqtt_username: Option<String>,
    /// MQTT password (with --mqtt-username)
    #[arg(
        long,
        env = "FLEET_MQTT_PASSWORD",
        hide_env_values = true,
        requires = "mqtt_username"
    )]
    mqtt_password: Option<String>,
    #[command(flatten)]
    topics: TopicArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = fleet_runtime::telemetry::init("fleet-gateway");
    let args = Args::parse();
    let mut config = GatewayConfig::from_args(
        &args.gateway,
        args.topics.topics(),
        args.broker.host,
        args.broker.port,
    );
    config.operators = args.gateway.operators().context("--operators-file")?;
    config.credentials = args.mqtt_username.zip(args.mqtt_password);
    config.tls = args
        .tls_ca
        .as_deref()
        .map(fleet_runtime::mqtt_tls::MqttTls::from_ca_file)
        .transpose()
        .context("--tls-ca")?;
    fleet_gateway::run(config, fleet_runtime::shutdown_signal()).await
}
