//! fleet-broker: the fleet's MQTT broker as its own process (compose, Helm).

use std::net::SocketAddr;
use std::num::NonZeroU16;

use clap::Parser;
use fleet_broker::BrokerConfig;
use fleet_runtime::TopicArgs;

/// The fleet's MQTT broker: MQTT 3.1.1 and 5 on one port, optional websockets.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Where to accept MQTT over TCP (3.1.1 and 5)
    #[arg(long, env = "FLEET_MQTT_ADDR", default_value = "127.0.0.1:1883")]
    mqtt_addr: SocketAddr,
    /// Where to accept MQTT over websockets (path /mqtt); off unless set
    #[arg(long, env = "FLEET_WS_ADDR")]
    ws_addr: Option<SocketAddr>,
    #[command(flatten)]
    topics: TopicArgs,
    /// Unacknowledged QoS 1/2 messages allowed per client
    #[arg(long, env = "FLEET_MAX_INFLIGHT", default_value = "1024")]
    max_inflight: NonZeroU16,
    /// Messages queued per client before they are dropped (and counted)
    #[arg(long, env = "FLEET_MAX_QUEUE_LEN", default_value_t = 10_000)]
    max_queue_len: usize,
    /// Largest MQTT packet accepted, in bytes
    #[arg(long, env = "FLEET_MAX_PACKET_SIZE", default_value_t = 1024 * 1024)]
    max_packet_size: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = fleet_runtime::telemetry::init("fleet-broker");
    let args = Args::parse();
    let broker = fleet_broker::start(BrokerConfig {
        mqtt_addr: args.mqtt_addr,
        ws_addr: args.ws_addr,
        topics: args.topics.topics(),
        max_inflight: args.max_inflight,
        max_queue_len: args.max_queue_len,
        max_packet_size: args.max_packet_size,
        ..BrokerConfig::default()
    })
    .await?;
    fleet_runtime::shutdown_signal().await;
    broker.stop();
    Ok(())
}
