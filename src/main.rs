//! `fleet`: the whole fleet in one process — the MQTT broker, the gateway with its web UI,
//! and simulated robots — for trying it out and for development. Only wiring: each part
//! is a library that also runs as its own binary.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use fleet_broker::BrokerConfig;
use fleet_gateway::{GatewayArgs, GatewayConfig};
use fleet_runtime::TopicArgs;
use robot_node::{
    BrokerAddress, NodeConfig, NodeHandle, NodeMetrics, RobotConfig, SimulatedDriver,
};

/// Runs the MQTT broker, the gateway and simulated robots in one process.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Where the broker accepts MQTT over TCP (3.1.1 and 5)
    #[arg(long, env = "FLEET_MQTT_ADDR", value_parser = fleet_runtime::listen_addr, default_value = "127.0.0.1:1883")]
    mqtt_addr: SocketAddr,
    /// Where the broker accepts MQTT over websockets (path /mqtt)
    #[arg(long, env = "FLEET_WS_ADDR", value_parser = fleet_runtime::listen_addr, default_value = "127.0.0.1:8083")]
    ws_addr: SocketAddr,
    /// The all-in-one broker lets clients in without credentials, with full access. That
    /// is only allowed on loopback addresses unless this is given
    #[arg(long, env = "FLEET_ALLOW_REMOTE_ANONYMOUS")]
    allow_remote_anonymous: bool,
    /// The gateway's flags; every robot in --robots runs simulated (linus and torvalds
    /// with their own pin maps)
    #[command(flatten)]
    gateway: GatewayArgs,
    #[command(flatten)]
    topics: TopicArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = fleet_runtime::telemetry::init("fleet");
    let args = Args::parse();
    let topics = args.topics.topics();
    let remote = [args.mqtt_addr, args.ws_addr]
        .into_iter()
        .find(|a| !a.ip().is_loopback());
    if let (Some(addr), false) = (remote, args.allow_remote_anonymous) {
        anyhow::bail!(
            "the all-in-one broker has no users: anyone reaching {addr} could drive the robots. \
             Bind to 127.0.0.1, run fleet-broker with a users file, or pass --allow-remote-anonymous"
        );
    }

    // Before anything starts: a gateway beyond loopback without a token is refused.
    fleet_gateway::check_exposure(
        args.gateway.http_addr,
        args.gateway.control_secret(),
        args.gateway.allow_no_token,
    )?;
    let operators = args.gateway.operators().context("--operators-file")?;

    let broker = fleet_broker::start(BrokerConfig {
        mqtt_addr: args.mqtt_addr,
        ws_addr: Some(args.ws_addr),
        topics: fleet_broker::acl::AclTopics {
            fleet: topics.clone(),
            discovery_prefix: args.gateway.discovery_prefix.to_string(),
        },
        ..BrokerConfig::default()
    })
    .await
    .context(
        "starting the broker (is another MQTT broker already using the port? see --mqtt-addr)",
    )?;
    let mqtt = broker.mqtt_addr();

    let http_addr = args.gateway.http_addr;
    let listener = tokio::net::TcpListener::bind(http_addr)
        .await
        .with_context(|| format!("cannot serve HTTP on {http_addr} (see --http-addr)"))?;
    let http = listener.local_addr()?;
    let mut gateway_config = GatewayConfig::from_args(
        &args.gateway,
        topics.clone(),
        mqtt.ip().to_string(),
        mqtt.port(),
    );
    // The port actually listened on (the flag may say :0).
    gateway_config.operators = operators;
    let public_url = args.gateway.public_url_for(http);
    gateway_config.home_assistant.public_url = Some(public_url.clone());
    let mut gateway_state = fleet_gateway::connect(&gateway_config);
    let node_metrics = std::sync::Arc::new(NodeMetrics::default());
    // One process, one scrape: the gateway's /metrics also serves the broker's (per-topic
    // counters) and the robots' metrics.
    let broker_metrics = broker.metrics().clone();
    let robots_metrics = node_metrics.clone();
    gateway_state.extra_metrics = vec![
        std::sync::Arc::new(move || broker_metrics.encode()),
        std::sync::Arc::new(move || robots_metrics.encode()),
    ];
    let (stop_gateway, gateway_stopped) = tokio::sync::oneshot::channel::<()>();
    let gateway = tokio::spawn(fleet_gateway::serve(listener, gateway_state, async {
        let _ = gateway_stopped.await;
    }));

    let robots = &args.gateway.robots;
    let nodes: Vec<_> = robots
        .iter()
        .map(|id| {
            let address = BrokerAddress {
                host: mqtt.ip().to_string(),
                port: mqtt.port(),
            };
            let mut config = NodeConfig::new(RobotConfig::preset_or_default(id.clone()), address);
            config.topics = topics.clone();
            config.discovery.enabled = !args.gateway.no_discovery;
            config.discovery.prefix = args.gateway.discovery_prefix.clone();
            config.discovery.configuration_url = Some(public_url.clone());
            robot_node::spawn(
                config,
                Box::new(SimulatedDriver::new(id.to_string())),
                node_metrics.clone(),
            )
        })
        .collect();

    let names: Vec<String> = robots.iter().map(ToString::to_string).collect();
    let first = names.first().map(String::as_str).unwrap_or("linus");
    println!();
    println!(
        "  fleet is running: {} simulated robot(s): {}",
        names.len(),
        names.join(", ")
    );
    println!("  web UI      http://{http}/");
    println!(
        "  MQTT        {mqtt} (3.1.1 and 5), websockets ws://{}/mqtt",
        broker.ws_addr().unwrap_or(args.ws_addr)
    );
    println!(
        "  try         mosquitto_pub -h {} -p {} -t {}/{first}/cmd/drive -m forward",
        mqtt.ip(),
        mqtt.port(),
        topics.prefix()
    );
    println!(
        "              mosquitto_sub -h {} -p {} -v -t '{}/#'",
        mqtt.ip(),
        mqtt.port(),
        topics.prefix()
    );
    println!("  Ctrl-C stops everything (motors off first).");
    println!();

    fleet_runtime::shutdown_signal().await;
    // Every robot is told at once: one after the other, each waited for its goodbye to the
    // broker (up to a second) while the next robot kept driving.
    let stopped = futures_util::future::join_all(nodes.into_iter().map(NodeHandle::stop)).await;
    for error in stopped.into_iter().filter_map(Result::err) {
        tracing::error!(%error, "a robot did not stop cleanly");
    }
    let _ = stop_gateway.send(());
    let _ = gateway.await;
    // The robots' last words (state, `offline`) are on their way through the broker:
    // let it deliver them to subscribers before it goes.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    broker.stop();
    Ok(())
}
