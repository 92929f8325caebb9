//! fleet-gateway: the web UI and HTTP API. Turns clicks into MQTT 5 commands that carry
//! W3C trace context as user properties, and shows the fleet's live state.

pub mod aliases;
pub mod api;
pub mod commands;
pub mod fleet;
pub mod guard;
pub mod home_assistant;
pub mod latch;
pub mod metrics;
pub mod operators;
pub mod probe;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fleet_protocol::{RobotId, Topics};
use fleet_runtime::http::HttpLimits;
use fleet_runtime::log_limit::{LogLimiter, report_held_back};
use rumqttc::v5::AsyncClient;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub use api::app;
use commands::Pending;
pub use fleet::{Fleet, RobotView};
use guard::{AllowedOrigin, HostPattern, Policy, RateLimiter};
pub use home_assistant::HomeAssistantSettings;
pub use metrics::Metrics;
pub use operators::{Operator, OperatorRole, Operators, OperatorsError};

/// Default of `--max-event-streams`: far more browsers than a fleet has operators, few
/// enough that a flood of streams stays within a few MiB.
pub const DEFAULT_MAX_EVENT_STREAMS: usize = 256;

/// The gateway's own command-line flags, shared by `fleet-gateway` and the all-in-one.
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// Where to serve the web UI and HTTP API
    #[arg(long, env = "FLEET_HTTP_ADDR", value_parser = fleet_runtime::listen_addr, default_value = "127.0.0.1:8080")]
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
    /// How often the prober pings every robot, in seconds (0 = off). The first probe runs
    /// once the broker link is up and the known robots are online, or 5 s after the link
    /// came up
    #[arg(long, env = "FLEET_PROBE_INTERVAL_S", default_value_t = 15)]
    pub probe_interval_s: u64,
    /// How long a probe waits for a robot's answer before counting it down, in ms
    #[arg(long, env = "FLEET_PROBE_TIMEOUT_MS", default_value_t = 2000)]
    pub probe_timeout_ms: u64,
    /// Start without --api-token although --http-addr is not a loopback address (anyone
    /// who can reach the port can then drive the robots); logged as a warning
    #[arg(long, env = "FLEET_ALLOW_NO_TOKEN")]
    pub allow_no_token: bool,
    /// Host names the gateway answers to besides loopback names (localhost, 127.0.0.0/8,
    /// [::1]), comma-separated, each with or without :port. On a loopback --http-addr any
    /// other Host is refused (421, DNS rebinding); beyond loopback the list is enforced
    /// only when given. Health and metrics routes answer any Host
    #[arg(long, env = "FLEET_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<HostPattern>,
    /// Web origins (http[s]://host[:port], comma-separated) whose pages may send control
    /// requests besides the gateway's own page; requests from other sites are refused
    /// (403). Stops are never refused
    #[arg(long, env = "FLEET_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<AllowedOrigin>,
    /// Seconds a connection has to send a complete request head (from its connect or
    /// the end of its previous response: idle keep-alive connections are closed after
    /// it) and then its body
    #[arg(long, env = "FLEET_HTTP_HEADER_TIMEOUT_S", default_value_t = 15)]
    pub http_header_timeout_s: u64,
    /// HTTP connections served at once; beyond it new connections are closed at once
    #[arg(long, env = "FLEET_HTTP_MAX_CONNECTIONS", default_value_t = fleet_runtime::http::DEFAULT_MAX_CONNECTIONS)]
    pub http_max_connections: usize,
    /// Live event streams (GET /api/events) open at once; beyond it 503 too_many_streams
    #[arg(long, env = "FLEET_MAX_EVENT_STREAMS", default_value_t = DEFAULT_MAX_EVENT_STREAMS)]
    pub max_event_streams: usize,
    /// Robots the gateway keeps track of (those in --robots count); further robots seen
    /// on state and status topics are ignored, counted and logged
    #[arg(long, env = "FLEET_MAX_ROBOTS", default_value_t = fleet::DEFAULT_MAX_ROBOTS)]
    pub max_robots: usize,
    /// Publish no Home Assistant discovery (the fleet's device with the e-stop; the
    /// all-in-one's robots neither)
    #[arg(long, env = "FLEET_NO_DISCOVERY")]
    pub no_discovery: bool,
    /// Home Assistant's discovery prefix
    #[arg(long, env = "FLEET_DISCOVERY_PREFIX", default_value = "homeassistant")]
    pub discovery_prefix: fleet_protocol::DiscoveryPrefix,
    /// Operators with names, roles (viewer, operator, admin) and tokens (TOML, see
    /// docs/operations.md): control requests then need `Authorization: Bearer
    /// <name>:<token>` (or --api-token), and every command carries its operator's name
    #[arg(long, env = "FLEET_OPERATORS_FILE")]
    pub operators_file: Option<std::path::PathBuf>,
    /// The web UI's address as other machines reach it (e.g. http://fleet.local:8080/, or
    /// the Ingress URL): the Home Assistant devices' "Visit" link. Default: this host's
    /// name and the --http-addr port when listening on every address, the --http-addr
    /// itself otherwise
    #[arg(long, env = "FLEET_PUBLIC_URL")]
    pub public_url: Option<String>,
}

impl GatewayArgs {
    /// The operators of `--operators-file`, when given.
    pub fn operators(&self) -> Result<Option<Arc<Operators>>, OperatorsError> {
        self.operators_file
            .as_deref()
            .map(|path| Operators::load(path).map(Arc::new))
            .transpose()
    }

    /// What stands in for a token when deciding whether the gateway may listen beyond
    /// loopback: the API token, or an operators file.
    pub fn control_secret(&self) -> Option<&str> {
        match (&self.api_token, &self.operators_file) {
            (Some(token), _) if !token.is_empty() => Some(token),
            (_, Some(_)) => Some("operators"),
            _ => None,
        }
    }

    /// `--public-url`, or what it defaults to for the address actually listened on.
    pub fn public_url_for(&self, http: SocketAddr) -> String {
        self.public_url
            .clone()
            .unwrap_or_else(|| home_assistant::default_public_url(http))
    }
}

/// A configuration the gateway refuses to start with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "--http-addr {0} is not a loopback address and no --api-token is set: anyone who can \
         reach it could drive the robots. Set --api-token (FLEET_API_TOKEN), listen on \
         127.0.0.1, or pass --allow-no-token (FLEET_ALLOW_NO_TOKEN) to accept that"
    )]
    NoToken(SocketAddr),
}

/// Refuses to serve beyond loopback without a token, unless told to (then warns).
pub fn check_exposure(
    http_addr: SocketAddr,
    api_token: Option<&str>,
    allow_no_token: bool,
) -> Result<(), ConfigError> {
    let exposed = !http_addr.ip().is_loopback() && api_token.is_none_or(str::is_empty);
    match (exposed, allow_no_token) {
        (false, _) => Ok(()),
        (true, false) => Err(ConfigError::NoToken(http_addr)),
        (true, true) => {
            tracing::warn!(%http_addr, "serving beyond loopback without --api-token (--allow-no-token): anyone who can reach this address can drive the robots");
            Ok(())
        }
    }
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
    /// Start beyond loopback without `api_token` (see [`check_exposure`]).
    pub allow_no_token: bool,
    /// Host names besides loopback names (see [`guard::Policy`]).
    pub allowed_hosts: Vec<HostPattern>,
    /// Other web origins whose pages may send control requests.
    pub allowed_origins: Vec<AllowedOrigin>,
    /// Timeouts and the connection cap of the HTTP server.
    pub http: HttpLimits,
    pub max_event_streams: usize,
    pub max_robots: usize,
    /// The fleet's Home Assistant device.
    pub home_assistant: HomeAssistantSettings,
    /// Named operators with roles (`--operators-file`); `None`: only `api_token`, if any.
    pub operators: Option<Arc<Operators>>,
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
            // fleet-gateway's own flags (the all-in-one's broker takes no logins).
            credentials: None,
            allow_no_token: args.allow_no_token,
            allowed_hosts: args.allowed_hosts.clone(),
            allowed_origins: args.allowed_origins.clone(),
            http: HttpLimits {
                header_timeout: Duration::from_secs(args.http_header_timeout_s.max(1)),
                max_connections: args.http_max_connections.max(1),
            },
            max_event_streams: args.max_event_streams,
            max_robots: args.max_robots,
            home_assistant: HomeAssistantSettings {
                discovery: (!args.no_discovery).then(|| args.discovery_prefix.clone()),
                public_url: Some(args.public_url_for(args.http_addr)),
            },
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
            allow_no_token: false,
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            http: HttpLimits::default(),
            max_event_streams: DEFAULT_MAX_EVENT_STREAMS,
            max_robots: fleet::DEFAULT_MAX_ROBOTS,
            home_assistant: HomeAssistantSettings::default(),
            operators: None,
        }
    }

    /// Refuses a configuration that would let strangers drive the robots.
    pub fn check(&self) -> Result<(), ConfigError> {
        let secret = match (&self.api_token, &self.operators) {
            (Some(token), _) => Some(token.as_str()),
            (None, Some(_)) => Some("operators"),
            (None, None) => None,
        };
        check_exposure(self.http_addr, secret, self.allow_no_token)
    }
}

/// Shared by every request handler.
#[derive(Clone)]
pub struct AppState {
    pub fleet: Arc<Fleet>,
    pub metrics: Arc<Metrics>,
    pub mqtt: AsyncClient,
    /// This gateway's MQTT client id: it names the reply topics robots answer its
    /// commands on (`<prefix>/_gateway/<instance>/<robot>/result`).
    pub instance: Arc<str>,
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
    /// Which Host names and web origins are this gateway's.
    pub guard: Arc<Policy>,
    /// One permit per live event stream that may be open.
    pub event_streams: Arc<Semaphore>,
    /// The HTTP server's limits (used by [`serve`]).
    pub http: HttpLimits,
    /// Named operators (`--operators-file`): see [`operators`].
    pub operators: Option<Arc<Operators>>,
    /// Operator logins that failed, per client address (argon2 is costly: see `guard`).
    pub login_failures: Arc<operators::LoginFailures>,
    /// More metrics served on `/metrics` after the gateway's own: the all-in-one adds its
    /// broker's and its robots' (one process, one scrape). A family already served is
    /// left out (every registry has the `process_*` ones).
    pub extra_metrics: Vec<MetricsSource>,
}

/// A registry's text exposition, produced at scrape time (see `AppState::extra_metrics`).
pub type MetricsSource = Arc<dyn Fn() -> String + Send + Sync>;

/// Creates the gateway's state and starts its MQTT link in the background.
pub fn connect(config: &GatewayConfig) -> AppState {
    let fleet = Arc::new(Fleet::with_capacity(
        config.topics.clone(),
        &config.robots,
        config.max_robots,
    ));
    let metrics = Arc::new(Metrics::default());
    let mut options = fleet::mqtt_options(
        &config.client_id,
        &config.broker_host,
        config.broker_port,
        config.tls.as_ref(),
    );
    if let Some((username, password)) = &config.credentials {
        options.set_credentials(username.clone(), password.clone());
    }
    home_assistant::BridgeLink::set_last_will(&config.topics, &mut options);
    let (mqtt, eventloop) = AsyncClient::new(options, 1024);
    let bridge = Arc::new(home_assistant::BridgeLink {
        topics: config.topics.clone(),
        settings: config.home_assistant.clone(),
        client: mqtt.clone(),
    });
    home_assistant::spawn_summary(bridge.clone(), fleet.clone());
    let pending = Arc::new(Pending::default());
    let log_limit = Arc::new(LogLimiter::default());
    let bus = fleet::Bus {
        fleet: fleet.clone(),
        pending: pending.clone(),
        metrics: metrics.clone(),
        log_limit: log_limit.clone(),
        instance: config.client_id.clone(),
        reply_prefix: format!("{}/_gateway/{}/", config.topics.prefix(), config.client_id),
        bridge,
    };
    tokio::spawn(fleet::drive_link(eventloop, mqtt.clone(), bus));
    let state = AppState {
        fleet,
        metrics,
        mqtt,
        instance: Arc::from(config.client_id.as_str()),
        pending,
        command_timeout: config.command_timeout,
        probe_timeout: config.probe_timeout,
        api_token: config.api_token.as_deref().map(Arc::from),
        limiter: Arc::new(RateLimiter::new(config.rate_limit, config.rate_burst)),
        closing: Arc::new(tokio::sync::watch::Sender::new(false)),
        log_limit,
        guard: Arc::new(Policy {
            loopback: config.http_addr.ip().is_loopback(),
            allowed_hosts: config.allowed_hosts.clone(),
            allowed_origins: config.allowed_origins.clone(),
        }),
        event_streams: Arc::new(Semaphore::new(config.max_event_streams)),
        http: config.http,
        operators: config.operators.clone(),
        login_failures: Arc::default(),
        extra_metrics: Vec::new(),
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

/// Serves the app on `listener` until `shutdown` completes, within the state's HTTP
/// limits. Whether the Host check allows only loopback names follows the address
/// actually listened on.
pub async fn serve(
    listener: TcpListener,
    mut state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    state.guard = Arc::new(state.guard.for_listener(listener.local_addr()?));
    let closing = state.closing.clone();
    let shutdown = async move {
        shutdown.await;
        // Live streams never end by themselves; a graceful shutdown waits for them.
        closing.send_replace(true);
    };
    let (limits, metrics) = (state.http, state.metrics.http.clone());
    fleet_runtime::http::serve(listener, app(state), limits, metrics, shutdown).await
}

/// Binds `config.http_addr`, connects to the broker and serves until `shutdown`.
pub async fn run(
    config: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.check()?;
    let listener = TcpListener::bind(config.http_addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for HTTP on {}: {e}", config.http_addr))?;
    let state = connect(&config);
    tracing::info!(addr = %listener.local_addr()?, "gateway listening");
    serve(listener, state, shutdown).await?;
    Ok(())
}
