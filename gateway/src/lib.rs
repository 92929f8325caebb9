//! fleet-gateway: the web UI and HTTP API. Turns clicks into MQTT 5 commands that carry
//! W3C trace context as user properties, and shows the fleet's live state.

pub mod aliases;
pub mod api;
pub mod commands;
pub mod fleet;
pub mod guard;
pub mod metrics;
pub mod probe;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fleet_protocol::{RobotId, Topics};
use fleet_runtime::log_limit::{LogLimiter, report_held_back};
use rumqttc::v5::AsyncClient;
use tokio::net::TcpListener;

pub use api::app;
use commands::Pending;
pub use fleet::{Fleet, RobotView};
use guard::RateLimiter;
pub use metrics::Metrics;

/// The gateway's own command-line flags, shared by `fleet-gateway` and the all-in-one.
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// Where to serve the web UI and HTTP API
    #[arg(long, env = "FLEET_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// Robots known before they first report (comma-separated); others are discovered
    #[arg(
        long,
        env = "FLEET_ROBOTS",
        value_delimiter = ',',
        default_value = "linus,torvalds"
    )]
    pub robots: Vec<RobotId>,
    /// How long `?wait=true` waits for a robot's result before answering 504, in ms
    #[arg(long, env = "FLEET_COMMAND_TIMEOUT_MS", default_value_t = 2000)]
    pub command_timeout_ms: u64,
    /// Bearer token required for control requests (commands, stop, aliases, probe). Set it
    /// whenever the gateway listens beyond localhost
    #[arg(long, env = "FLEET_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Control requests allowed per second per client address (sustained)
    #[arg(long, env = "FLEET_RATE_LIMIT", default_value_t = 50.0)]
    pub rate_limit: f64,
    /// Control requests a client may send in a burst
    #[arg(long, env = "FLEET_RATE_BURST", default_value_t = 100)]
    pub rate_burst: u32,
    /// How often the prober pings every robot, in seconds (first run at start-up; 0 = off)
    #[arg(long, env = "FLEET_PROBE_INTERVAL_S", default_value_t = 15)]
    pub probe_interval_s: u64,
    /// How long a probe waits for a robot's answer before counting it down, in ms
    #[arg(long, env = "FLEET_PROBE_TIMEOUT_MS", default_value_t = 2000)]
    pub probe_timeout_ms: u64,
    /// MQTT username, for brokers with authentication
    #[arg(long, env = "FLEET_MQTT_USERNAME")]
    pub mqtt_username: Option<String>,
    /// MQTT password
    #[arg(long, env = "FLEET_MQTT_PASSWORD", hide_env_values = true)]
    pub mqtt_password: Option<String>,
}

/// Everything the gateway needs to start.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub http_addr: SocketAddr,
    pub broker_host: String,
    pub broker_port: u16,
    pub topics: Topics,
    /// Robots the gateway knows before they have said anything (others are learnt from
    /// their status and state topics).
    pub robots: Vec<RobotId>,
    /// MQTT client id; also names this gateway's reply topic.
    pub client_id: String,
    pub command_timeout: Duration,
    pub api_token: Option<String>,
    pub rate_limit: f64,
    pub rate_burst: u32,
    /// `None` turns the background prober off (`GET /api/probe` still works).
    pub probe_interval: Option<Duration>,
    pub probe_timeout: Duration,
    /// MQTT username and password, when the broker wants them.
    pub credentials: Option<(String, String)>,
    /// Connect over TLS, trusting this CA; plain TCP when `None`.
    pub tls: Option<fleet_runtime::mqtt_tls::MqttTls>,
}

impl GatewayConfig {
    pub fn from_args(
        args: &GatewayArgs,
        topics: Topics,
        broker_host: impl Into<String>,
        broker_port: u16,
    ) -> Self {
        Self {
            http_addr: args.http_addr,
            robots: args.robots.clone(),
            topics,
            command_timeout: Duration::from_millis(args.command_timeout_ms.max(1)),
            api_token: args.api_token.clone().filter(|t| !t.is_empty()),
            rate_limit: args.rate_limit,
            rate_burst: args.rate_burst,
            probe_interval: (args.probe_interval_s > 0)
                .then(|| Duration::from_secs(args.probe_interval_s)),
            probe_timeout: Duration::from_millis(args.probe_timeout_ms.max(1)),
            credentials: args.mqtt_username.clone().zip(args.mqtt_password.clone()),
            ..Self::new(broker_host, broker_port)
        }
    }

    pub fn new(broker_host: impl Into<String>, broker_port: u16) -> Self {
        Self {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            broker_host: broker_host.into(),
            broker_port,
            topics: Topics::default(),
            robots: Vec::new(),
            client_id: format!("fleet-gateway-{:08x}", rand::random::<u32>()),
            command_timeout: Duration::from_secs(2),
            api_token: None,
            rate_limit: 50.0,
            rate_burst: 100,
            probe_interval: Some(Duration::from_secs(15)),
            probe_timeout: Duration::from_secs(2),
            credentials: None,
            tls: None,
        }
    }
}

/// Shared by every request handler.
#[derive(Clone)]
pub struct AppState {
    pub fleet: Arc<Fleet>,
    pub metrics: Arc<Metrics>,
    pub mqtt: AsyncClient,
    /// Where robots send results for this gateway's commands (MQTT 5 response topic).
    pub reply_topic: String,
    pub pending: Arc<Pending>,
    pub command_timeout: Duration,
    pub probe_timeout: Duration,
    pub api_token: Option<Arc<str>>,
    pub limiter: Arc<RateLimiter>,
    /// Set when the server shuts down: live streams end so that the shutdown can finish
    /// (browsers reconnect to the next instance).
    pub closing: Arc<tokio::sync::watch::Sender<bool>>,
    /// Refused requests log a few lines per window, then only counts.
    pub log_limit: Arc<LogLimiter>,
}

/// Creates the gateway's state and starts its MQTT link in the background.
pub fn connect(config: &GatewayConfig) -> AppState {
    let fleet = Arc::new(Fleet::new(config.topics.clone(), &config.robots));
    let metrics = Arc::new(Metrics::default());
    let reply_topic = config.topics.gateway_replies(&config.client_id);
    let mut options = fleet::mqtt_options(
        &config.client_id,
        &config.broker_host,
        config.broker_port,
        config.tls.as_ref(),
    );
    if let Some((username, password)) = &config.credentials {
        options.set_credentials(username.clone(), password.clone());
    }
    let (mqtt, eventloop) = AsyncClient::new(options, 1024);
    let pending = Arc::new(Pending::default());
    tokio::spawn(fleet::drive_link(
        eventloop,
        mqtt.clone(),
        fleet.clone(),
        pending.clone(),
        reply_topic.clone(),
        metrics.clone(),
    ));
    let state = AppState {
        fleet,
        metrics,
        mqtt,
        reply_topic,
        pending,
        command_timeout: config.command_timeout,
        probe_timeout: config.probe_timeout,
        api_token: config.api_token.as_deref().map(Arc::from),
        limiter: Arc::new(RateLimiter::new(config.rate_limit, config.rate_burst)),
        closing: Arc::new(tokio::sync::watch::Sender::new(false)),
        log_limit: Arc::new(LogLimiter::default()),
    };
    let (log_limit, mut closing) = (state.log_limit.clone(), state.closing.subscribe());
    tokio::spawn(async move {
        tokio::select! {
            () = report_held_back(&log_limit) => {}
            _ = closing.wait_for(|closed| *closed) => {}
        }
    });
    if let Some(interval) = config.probe_interval {
        probe::spawn(state.clone(), interval);
    }
    state
}

/// Serves the app on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let closing = state.closing.clone();
    let shutdown = async move {
        shutdown.await;
        // Live streams never end by themselves; a graceful shutdown waits for them.
        closing.send_replace(true);
    };
    // The client address feeds the per-client rate limit.
    axum::serve(
        listener,
        app(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// Binds `config.http_addr`, connects to the broker and serves until `shutdown`.
pub async fn run(
    config: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.http_addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for HTTP on {}: {e}", config.http_addr))?;
    let state = connect(&config);
    tracing::info!(addr = %listener.local_addr()?, "gateway listening");
    serve(listener, state, shutdown).await?;
    Ok(())
}
