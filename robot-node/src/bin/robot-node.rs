//! robot-node: one robot's node as its own process (on the Pi, or simulated), or many
//! simulated robots in one process for load tests (`--simulate N`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, ValueEnum};
use fleet_protocol::{DiscoveryPrefix, RobotId};
use fleet_runtime::{HostPort, TopicArgs};
use robot_node::driver::{RppalDriver, is_raspberry_pi};
use robot_node::{
    BrokerAddress, ConfigFile, DECOMMISSIONED_EXIT_CODE, Driver, Ending, NodeConfig, NodeMetrics,
    RobotConfig, SimulatedDriver,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DriverKind {
    /// rppal on a Raspberry Pi, the simulator anywhere else
    Auto,
    /// The Raspberry Pi's GPIO through rppal
    Rppal,
    /// No hardware: pin changes are kept in memory and logged at debug level
    Simulated,
}

/// Runs one robot: takes commands from MQTT, drives the hardware, publishes its state.
///
/// Settings come from flags, then FLEET_* environment variables, then the [node] table of
/// the --config file, then the defaults shown here.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Config file with the robot's pin map and optional [node] settings
    /// (examples: robot-node/config/linus.toml, torvalds.toml)
    #[arg(long, env = "FLEET_CONFIG")]
    config: Option<PathBuf>,
    /// Robot id; without --config, linus and torvalds use their built-in pin maps and
    /// other ids use linus's
    #[arg(long, env = "FLEET_ROBOT")]
    robot: Option<RobotId>,
    /// MQTT broker as host:port
    #[arg(long, env = "FLEET_BROKER", default_value = "127.0.0.1:1883")]
    broker: HostPort,
    #[command(flatten)]
    topics: TopicArgs,
    /// Hardware backend
    #[arg(long, env = "FLEET_DRIVER", value_enum, default_value = "auto")]
    driver: DriverKind,
    /// How long a drive command keeps the motors on without a refresh (dead-man), in ms
    #[arg(long, env = "FLEET_HOLD_MS", default_value_t = 1000)]
    hold_ms: u64,
    /// The longest hold a drive command may ask for, in ms
    #[arg(long, env = "FLEET_MAX_HOLD_MS", default_value_t = 5000)]
    max_hold_ms: u64,
    /// How long `eyes blink` keeps the eye on, in ms
    #[arg(long, env = "FLEET_BLINK_MS", default_value_t = 500)]
    blink_ms: u64,
    /// MQTT keep-alive in seconds, at least 5 (the broker declares the node offline after
    /// 1.5 × this)
    #[arg(long, env = "FLEET_KEEP_ALIVE_S", default_value_t = 5)]
    keep_alive_s: u64,
    /// How often the state is republished while idle (its last_seen_ms), in seconds
    #[arg(long, env = "FLEET_HEARTBEAT_S", default_value_t = 30)]
    heartbeat_s: u64,
    /// Answer fleet-wide commands (result and state) at a random moment within this many
    /// milliseconds; the command itself runs at once. For large fleets (about 0.1 ms per
    /// robot): thousands of robots answering an e-stop at the same instant slow the broker
    /// down while it is still delivering the stop to the rest. 0 answers at once
    #[arg(long, env = "FLEET_REPLY_SPREAD_MS", default_value_t = 0)]
    fleet_reply_spread_ms: u64,
    /// How long the broker keeps the session (and queued commands) while the node is away, in seconds
    #[arg(long, env = "FLEET_SESSION_EXPIRY_S", default_value_t = 300)]
    session_expiry_s: u64,
    /// MQTT client id (default robot-<id>)
    #[arg(long, env = "FLEET_CLIENT_ID")]
    client_id: Option<String>,
    /// Where to serve /metrics and /health; "off" to disable
    #[arg(long, env = "FLEET_METRICS_ADDR", default_value = "127.0.0.1:9102")]
    metrics_addr: String,
    /// MQTT password (the username is the robot id); for brokers with authentication
    #[arg(long, env = "FLEET_MQTT_PASSWORD", hide_env_values = true)]
    mqtt_password: Option<String>,
    /// Connect to the broker over TLS, verifying its certificate against this PEM CA
    /// file (the certificate must name the host given in --broker)
    #[arg(long, env = "FLEET_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Do not publish Home Assistant discovery (a `decommission` still clears it)
    #[arg(long, env = "FLEET_NO_DISCOVERY")]
    no_discovery: bool,
    /// Home Assistant's discovery prefix
    #[arg(long, env = "FLEET_DISCOVERY_PREFIX", default_value = "homeassistant")]
    discovery_prefix: DiscoveryPrefix,
    /// The gateway's web UI (e.g. http://fleet.local:8080/), linked from the robot's
    /// Home Assistant device page
    #[arg(long, env = "FLEET_GATEWAY_URL")]
    gateway_url: Option<String>,
    /// Run N simulated robots named <robot>-1 .. <robot>-N in this process (load tests)
    #[arg(long, env = "FLEET_SIMULATE")]
    simulate: Option<u32>,
}

/// The flag's value unless it was left at its default and the file gives one.
fn pick<T>(matches: &ArgMatches, id: &str, flag: T, file: Option<T>) -> T {
    match (matches.value_source(id), file) {
        (Some(ValueSource::DefaultValue) | None, Some(from_file)) => from_file,
        _ => flag,
    }
}

fn parse_file_value<T: std::str::FromStr>(
    key: &str,
    value: Option<String>,
) -> anyhow::Result<Option<T>>
where
    T::Err: std::fmt::Display,
{
    value
        .map(|v| {
            v.parse::<T>()
                .map_err(|e| anyhow::anyhow!("config [node] {key} = {v:?}: {e}"))
        })
        .transpose()
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    let matches = Args::command().get_matches();
    let args = Args::from_arg_matches(&matches)?;
    // One robot needs one thread (a Pi Zero has one core, and every worker thread costs
    // memory); many simulated robots use every core.
    let runtime = match args.simulate {
        Some(_) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
        None => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
    };
    let ending = runtime.block_on(run(matches, args))?;
    Ok(match ending {
        Ending::Stopped => std::process::ExitCode::SUCCESS,
        // Distinct, so that a supervisor does not bring the robot straight back.
        Ending::Decommissioned => std::process::ExitCode::from(DECOMMISSIONED_EXIT_CODE),
    })
}

async fn run(matches: ArgMatches, args: Args) -> anyhow::Result<Ending> {
    let _telemetry = fleet_runtime::telemetry::init("robot-node");

    let file = args
        .config
        .as_deref()
        .map(ConfigFile::load)
        .transpose()
        .context("loading --config")?;
    let settings = file.as_ref().map(|f| f.node.clone()).unwrap_or_default();
    let robot = match (&args.robot, &file) {
        (Some(id), Some(file)) => RobotConfig {
            id: id.clone(),
            ..file.robot.clone()
        },
        (None, Some(file)) => file.robot.clone(),
        (Some(id), None) => RobotConfig::preset_or_default(id.clone()),
        (None, None) => bail!("say which robot this is: --robot <id> or --config <file>"),
    };

    let broker = pick(
        &matches,
        "broker",
        args.broker.clone(),
        parse_file_value("broker", settings.broker)?,
    );
    let topics = match parse_file_value("topic_prefix", settings.topic_prefix)? {
        Some(prefix) if matches.value_source("topic_prefix") == Some(ValueSource::DefaultValue) => {
            fleet_protocol::Topics::new(prefix)
        }
        _ => args.topics.topics(),
    };
    let driver_kind = match settings.driver.as_deref() {
        Some(name) if matches.value_source("driver") == Some(ValueSource::DefaultValue) => {
            DriverKind::from_str(name, true)
                .map_err(|e| anyhow::anyhow!("config [node] driver: {e}"))?
        }
        _ => args.driver,
    };
    let hold_ms = pick(&matches, "hold_ms", args.hold_ms, settings.hold_ms);
    let max_hold_ms = pick(
        &matches,
        "max_hold_ms",
        args.max_hold_ms,
        settings.max_hold_ms,
    );
    if hold_ms == 0 || hold_ms > max_hold_ms {
        bail!(
            "the hold time must be between 1 and the maximum hold ({max_hold_ms} ms), not {hold_ms}"
        );
    }
    let metrics_addr = pick(
        &matches,
        "metrics_addr",
        args.metrics_addr.clone(),
        settings.metrics_addr,
    );

    let mut config = NodeConfig::new(
        robot,
        BrokerAddress {
            host: broker.host.clone(),
            port: broker.port,
        },
    );
    config.topics = topics;
    config.default_hold = Duration::from_millis(hold_ms);
    config.max_hold = Duration::from_millis(max_hold_ms);
    config.blink =
        Duration::from_millis(pick(&matches, "blink_ms", args.blink_ms, settings.blink_ms));
    config.keep_alive = Duration::from_secs(pick(
        &matches,
        "keep_alive_s",
        args.keep_alive_s,
        settings.keep_alive_s,
    ));
    if config.keep_alive < robot_node::node::MIN_KEEP_ALIVE {
        bail!(
            "the keep-alive must be at least {} s, not {} s",
            robot_node::node::MIN_KEEP_ALIVE.as_secs(),
            config.keep_alive.as_secs()
        );
    }
    config.heartbeat = Duration::from_secs(
        pick(
            &matches,
            "heartbeat_s",
            args.heartbeat_s,
            settings.heartbeat_s,
        )
        .max(1),
    );
    config.fleet_reply_spread = Duration::from_millis(pick(
        &matches,
        "fleet_reply_spread_ms",
        args.fleet_reply_spread_ms,
        settings.fleet_reply_spread_ms,
    ));
    config.session_expiry = Duration::from_secs(args.session_expiry_s);
    if let Some(password) = args.mqtt_password.clone() {
        config.credentials = Some((config.robot.id.to_string(), password));
    }
    if let Some(client_id) = args.client_id.or(settings.client_id) {
        config.client_id = client_id;
    }
    config.discovery.enabled = match settings.discovery {
        Some(enabled)
            if matches.value_source("no_discovery") == Some(ValueSource::DefaultValue) =>
        {
            enabled
        }
        _ => !args.no_discovery,
    };
    config.discovery.prefix = pick(
        &matches,
        "discovery_prefix",
        args.discovery_prefix.clone(),
        parse_file_value("discovery_prefix", settings.discovery_prefix)?,
    );
    config.discovery.configuration_url = args.gateway_url.clone().or(settings.gateway_url);
    config.tls = args
        .tls_ca
        .clone()
        .or(settings.tls_ca.map(PathBuf::from))
        .map(|path| fleet_runtime::mqtt_tls::MqttTls::from_ca_file(&path))
        .transpose()
        .context("--tls-ca")?;
    if let Some(url) = &config.discovery.configuration_url
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        bail!("--gateway-url {url:?} must start with http:// or https://");
    }

    let metrics = Arc::new(NodeMetrics::default());
    if let Some(addr) = fleet_runtime::listen_addr_or_off("--metrics-addr", &metrics_addr)
        .map_err(anyhow::Error::msg)?
    {
        let listener_metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(error) =
                robot_node::http::serve(addr, listener_metrics, std::future::pending()).await
            {
                tracing::error!(%error, %addr, "cannot serve /metrics");
            }
        });
    }

    match args.simulate {
        Some(count) => run_simulated(config, count, metrics)
            .await
            .map(|()| Ending::Stopped),
        None => {
            let driver = open_driver(driver_kind, &config.robot)?;
            let ending =
                robot_node::run(config, driver, metrics, fleet_runtime::shutdown_signal()).await?;
            if ending == Ending::Decommissioned {
                tracing::warn!(
                    exit_code = DECOMMISSIONED_EXIT_CODE,
                    "decommissioned: exiting with the status that tells a supervisor not to restart"
                );
            }
            Ok(ending)
        }
    }
}

fn open_driver(kind: DriverKind, robot: &RobotConfig) -> anyhow::Result<Box<dyn Driver>> {
    let use_rppal = match kind {
        DriverKind::Rppal => true,
        DriverKind::Simulated => false,
        DriverKind::Auto => is_raspberry_pi(),
    };
    if use_rppal {
        tracing::info!(robot = %robot.id, pins = ?robot.pins(), "driving the GPIO pins through rppal");
        let driver = RppalDriver::open(&robot.pins()).context("opening the GPIO device")?;
        Ok(Box::new(driver))
    } else {
        tracing::info!(robot = %robot.id, "no hardware: simulated driver");
        Ok(Box::new(SimulatedDriver::new(robot.id.to_string())))
    }
}

/// N simulated robots `<id>-1 .. <id>-N`, each with its own MQTT connection.
async fn run_simulated(
    template: NodeConfig,
    count: u32,
    metrics: Arc<NodeMetrics>,
) -> anyhow::Result<()> {
    let mut nodes = Vec::new();
    for i in 1..=count {
        let id = RobotId::new(format!("{}-{i}", template.robot.id))?;
        let mut config = template.clone();
        config.client_id = format!("robot-{id}");
        if let Some((_, password)) = &template.credentials {
            config.credentials = Some((id.to_string(), password.clone()));
        }
        config.robot.id = id.clone();
        let driver = Box::new(SimulatedDriver::new(id.to_string()));
        nodes.push(robot_node::spawn(config, driver, metrics.clone()));
    }
    tracing::info!(count, "simulated robots started");
    fleet_runtime::shutdown_signal().await;
    // All at once: each stop waits for its link to flush, and thousands in a row add up.
    let mut stopping = tokio::task::JoinSet::new();
    for node in nodes {
        stopping.spawn(node.stop());
    }
    let mut failed = 0;
    while let Some(stopped) = stopping.join_next().await {
        if !matches!(stopped, Ok(Ok(()))) {
            failed += 1;
        }
    }
    if failed > 0 {
        bail!("{failed} of {count} simulated robots did not stop cleanly");
    }
    Ok(())
}
