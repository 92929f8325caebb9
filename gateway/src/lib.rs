//! fleet-gateway: the web UI and HTTP API. Turns clicks into MQTT 5 commands that carry
//! W3C trace context as user properties, and shows the fleet's live state.

pub mod api;
pub mod fleet;
pub mod metrics;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use fleet_protocol::{RobotId, Topics};
use rumqttc::v5::AsyncClient;
use tokio::net::TcpListener;

pub use api::app;
pub use fleet::{Fleet, RobotView};
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
}

/// Creates the gateway's state and starts its MQTT link in the background.
pub fn connect(config: &GatewayConfig) -> AppState {
    let fleet = Arc::new(Fleet::new(config.topics.clone(), &config.robots));
    let metrics = Arc::new(Metrics::default());
    let reply_topic = config.topics.gateway_replies(&config.client_id);
    let options = fleet::mqtt_options(&config.client_id, &config.broker_host, config.broker_port);
    let (mqtt, eventloop) = AsyncClient::new(options, 1024);
    tokio::spawn(fleet::drive_link(
        eventloop,
        mqtt.clone(),
        fleet.clone(),
        reply_topic.clone(),
        metrics.clone(),
    ));
    AppState {
        fleet,
        metrics,
        mqtt,
        reply_topic,
    }
}

/// Serves the app on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(state))
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
