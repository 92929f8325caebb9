//! Real parts for tests: the fleet broker on 127.0.0.1 port 0, and MQTT clients (3.1.1 or
//! 5) that record every message they receive so a test can wait for what it expects.
//! Panicking is how a test helper reports failure, so `expect` is fine here.

pub mod raw;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_broker::{BrokerConfig, RunningBroker};
use rumqttc::v5;
use tokio::sync::{Notify, mpsc};
use tokio::time::{Instant, timeout};

/// How long a test waits for something that should happen at once.
pub const WAIT: Duration = Duration::from_secs(5);

/// A TCP port on 127.0.0.1 that was free a moment ago (for binaries started by tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port on 127.0.0.1")
}

/// Starts the real broker on a free loopback port.
pub async fn start_broker() -> RunningBroker {
    fleet_broker::start(BrokerConfig {
        mqtt_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..BrokerConfig::default()
    })
    .await
    .expect("the broker starts on port 0")
}

/// Starts the real broker on free loopback ports (MQTT and metrics) with logins on and
/// no anonymous access, for `users`: (username, role) pairs whose password is
/// `<username>-pw`. The rest of the settings come from `config`.
pub async fn start_secured_broker(users: &[(&str, &str)], config: BrokerConfig) -> RunningBroker {
    let file: String = users
        .iter()
        .map(|(name, role)| {
            let hash = fleet_broker::auth::hash_password(&format!("{name}-pw")).expect("hashed");
            format!(
                "[[user]]\nusername = \"{name}\"\npassword_hash = \"{hash}\"\nrole = \"{role}\"\n"
            )
        })
        .collect();
    let users = fleet_broker::auth::Users::parse(&file).expect("a valid users file");
    fleet_broker::start(BrokerConfig {
        mqtt_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        http_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        users: Some(Arc::new(users)),
        allow_anonymous: false,
        anonymous_role: fleet_broker::acl::Role::Reader,
        ..config
    })
    .await
    .expect("the broker starts on port 0")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    /// MQTT 5 user properties (empty for 3.1.1).
    pub user_properties: Vec<(String, String)>,
    pub correlation_data: Option<Vec<u8>>,
    /// MQTT 5 response topic (`None` for 3.1.1).
    pub response_topic: Option<String>,
    /// MQTT 5 message expiry interval as delivered (seconds left).
    pub message_expiry: Option<u32>,
}

impl Message {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    /// The payload as JSON, or `Null` when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or(serde_json::Value::Null)
    }
}

#[derive(Default)]
struct Inbox {
    messages: Mutex<Vec<Message>>,
    errors: Mutex<Vec<String>>,
    changed: Notify,
}

/// An MQTT client that subscribes to one filter and records everything it receives.
pub struct Watcher {
    inbox: Arc<Inbox>,
    v311: Option<rumqttc::AsyncClient>,
    v5: Option<v5::AsyncClient>,
}

impl Watcher {
    /// An MQTT 3.1.1 client, like `mosquitto_sub` or Home Assistant.
    pub async fn v311(addr: SocketAddr, client_id: &str, filter: &str) -> Watcher {
        let mut options = rumqttc::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(5));
        options.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1000);
        let inbox = Arc::new(Inbox::default());
        let (ready_tx, mut ready) = mpsc::unbounded_channel();
        let (recorder, sub_client, filter) = (inbox.clone(), client.clone(), filter.to_owned());
        tokio::spawn(async move {
            use rumqttc::{Event, Packet, QoS};
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = sub_client.subscribe(filter.clone(), QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => recorder.record(Message {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        retain: p.retain,
                        user_properties: Vec::new(),
                        correlation_data: None,
                        response_topic: None,
                        message_expiry: None,
                    }),
                    Ok(_) => {}
                    Err(e) => {
                        recorder.errors.lock().expect("lock").push(e.to_string());
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        timeout(WAIT, ready.recv())
            .await
            .expect("3.1.1 watcher subscribed in time");
        Watcher {
            inbox,
            v311: Some(client),
            v5: None,
        }
    }

    /// An MQTT 5 client (sees user properties and correlation data).
    pub async fn v5(addr: SocketAddr, client_id: &str, filter: &str) -> Watcher {
        let mut options = v5::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = v5::AsyncClient::new(options, 1000);
        let inbox = Arc::new(Inbox::default());
        let (ready_tx, mut ready) = mpsc::unbounded_channel();
        let (recorder, sub_client, filter) = (inbox.clone(), client.clone(), filter.to_owned());
        tokio::spawn(async move {
            use v5::Event;
            use v5::mqttbytes::v5::Packet;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = sub_client
                            .subscribe(filter.clone(), v5::mqttbytes::QoS::AtLeastOnce)
                            .await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let properties = p.properties.clone().unwrap_or_default();
                        recorder.record(Message {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                            user_properties: properties.user_properties,
                            correlation_data: properties.correlation_data.map(|c| c.to_vec()),
                            response_topic: properties.response_topic,
                            message_expiry: properties.message_expiry_interval,
                        })
                    }
                    Ok(_) => {}
                    Err(e) => {
                        recorder.errors.lock().expect("lock").push(e.to_string());
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        timeout(WAIT, ready.recv())
            .await
            .expect("MQTT 5 watcher subscribed in time");
        Watcher {
            inbox,
            v311: None,
            v5: Some(client),
        }
    }

    /// Publishes a QoS 1 message with this client.
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.send(topic, payload.into(), false).await;
    }

    /// Publishes a retained QoS 1 message with this client (an empty payload deletes the
    /// retained message).
    pub async fn publish_retained(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.send(topic, payload.into(), true).await;
    }

    async fn send(&self, topic: &str, payload: Vec<u8>, retain: bool) {
        if let Some(client) = &self.v311 {
            client
                .publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload)
                .await
                .expect("publish queued");
        } else if let Some(client) = &self.v5 {
            client
                .publish(topic, v5::mqttbytes::QoS::AtLeastOnce, retain, payload)
                .await
                .expect("publish queued");
        }
    }

    /// Publishes a QoS 1 MQTT 5 message with properties (MQTT 5 watchers only).
    pub async fn publish_with_properties(
        &self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        properties: v5::mqttbytes::v5::PublishProperties,
    ) {
        let client = self.v5.as_ref().expect("an MQTT 5 watcher");
        client
            .publish_with_properties(
                topic,
                v5::mqttbytes::QoS::AtLeastOnce,
                false,
                payload.into(),
                properties,
            )
            .await
            .expect("publish queued");
    }

    /// Waits until a message matching `accept` has arrived (including earlier ones).
    pub async fn wait_for(&self, what: &str, accept: impl Fn(&Message) -> bool) -> Message {
        let deadline = Instant::now() + WAIT;
        loop {
            let notified = self.inbox.changed.notified();
            if let Some(found) = self.messages().into_iter().find(|m| accept(m)) {
                return found;
            }
            if timeout(deadline.saturating_duration_since(Instant::now()), notified)
                .await
                .is_err()
            {
                panic!(
                    "timed out waiting for {what}; received: {:#?}",
                    self.messages()
                        .iter()
                        .map(|m| (m.topic.clone(), m.text()))
                        .collect::<Vec<_>>()
                );
            }
        }
    }

    /// Waits for a message on `topic` whose JSON payload satisfies `accept`.
    pub async fn wait_for_json(
        &self,
        topic: &str,
        accept: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        self.wait_for(topic, |m| m.topic == topic && accept(&m.json()))
            .await
            .json()
    }

    pub fn messages(&self) -> Vec<Message> {
        self.inbox.messages.lock().expect("lock").clone()
    }

    /// Connection errors seen so far (a healthy watcher has none).
    pub fn errors(&self) -> Vec<String> {
        self.inbox.errors.lock().expect("lock").clone()
    }

    pub fn clear(&self) {
        self.inbox.messages.lock().expect("lock").clear();
    }
}

impl Inbox {
    fn record(&self, message: Message) {
        self.messages.lock().expect("lock").push(message);
        self.changed.notify_waiters();
    }
}

/// What a `TcpProxy` does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProxyMode {
    Forward,
    /// Every connection closed at once, new ones refused: a pulled cable on loopback.
    Cut,
    /// Connections stay open but nothing goes through, new ones hang: a dead route. Only
    /// keep-alives notice it.
    Blackhole,
}

/// A TCP proxy between a client and the broker that a test can cut or blackhole, and
/// restore.
pub struct TcpProxy {
    addr: SocketAddr,
    mode: tokio::sync::watch::Sender<ProxyMode>,
    target: Arc<Mutex<SocketAddr>>,
    /// Bumped to close every proxied connection while the mode stays `Forward`.
    generation: tokio::sync::watch::Sender<u64>,
}

impl TcpProxy {
    pub async fn start(target: SocketAddr) -> TcpProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy binds");
        let addr = listener.local_addr().expect("proxy address");
        let (mode, watch) = tokio::sync::watch::channel(ProxyMode::Forward);
        let target = Arc::new(Mutex::new(target));
        let targets = target.clone();
        let (generation, generations) = tokio::sync::watch::channel(0u64);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut mode = watch.clone();
                let current = *mode.borrow();
                match current {
                    ProxyMode::Cut => continue, // drop the connection at once
                    ProxyMode::Blackhole => {
                        // Hold it without a word until the route is back (then close it).
                        tokio::spawn(async move {
                            let _ = mode.wait_for(|m| *m != ProxyMode::Blackhole).await;
                            drop(inbound);
                        });
                        continue;
                    }
                    ProxyMode::Forward => {}
                }
                let target = *targets.lock().unwrap_or_else(|e| e.into_inner());
                let mut generation = generations.clone();
                let born = *generation.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => return,
                        _ = mode.wait_for(|m| *m != ProxyMode::Forward) => {}
                        _ = generation.wait_for(|g| *g != born) => {}
                    }
                    if *mode.borrow() == ProxyMode::Blackhole {
                        // Both sockets stay open, silent, until the mode changes again.
                        let _ = mode.wait_for(|m| *m != ProxyMode::Blackhole).await;
                    }
                    drop((inbound, outbound));
                });
            }
        });
        TcpProxy {
            addr,
            mode,
            target,
            generation,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every proxied connection now and refuses new ones until `restore`.
    pub fn cut(&self) {
        let _ = self.mode.send(ProxyMode::Cut);
    }

    /// Stops forwarding without closing anything, until `restore` (which then closes the
    /// silent connections, as a router coming back with fresh state would).
    pub fn blackhole(&self) {
        let _ = self.mode.send(ProxyMode::Blackhole);
    }

    pub fn restore(&self) {
        let _ = self.mode.send(ProxyMode::Forward);
    }

    /// Closes every proxied connection and forwards new ones to `target` from now on: a
    /// fail-over to another broker behind the same address.
    pub fn fail_over_to(&self, target: SocketAddr) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = target;
        self.generation.send_modify(|g| *g += 1);
    }
}

/// A span as an OTLP receiver got it (ids in lower-case hex).
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub service: String,
    pub name: String,
    pub kind: i32,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub attributes: Vec<(String, String)>,
}

impl ReceivedSpan {
    /// OTLP span kinds.
    pub const SERVER: i32 = 2;
    pub const PRODUCER: i32 = 4;
    pub const CONSUMER: i32 = 5;

    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A real OTLP/HTTP traces endpoint (`POST /v1/traces`, protobuf) that keeps every span.
pub struct OtlpReceiver {
    url: String,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

impl OtlpReceiver {
    pub async fn start() -> OtlpReceiver {
        use axum::body::Bytes;
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
        use prost::Message as _;

        let spans = Arc::new(Mutex::new(Vec::new()));
        let store = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: Bytes| {
                let store = store.clone();
                async move {
                    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                        return axum::http::StatusCode::BAD_REQUEST;
                    };
                    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
                    let text =
                        |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
                            .as_ref()
                            .and_then(|v| v.value.as_ref())
                        {
                            Some(AnyValue::StringValue(s)) => s.clone(),
                            Some(AnyValue::IntValue(i)) => i.to_string(),
                            Some(AnyValue::BoolValue(b)) => b.to_string(),
                            other => format!("{other:?}"),
                        };
                    let mut received = store.lock().expect("lock");
                    for resource in request.resource_spans {
                        let service = resource
                            .resource
                            .iter()
                            .flat_map(|r| r.attributes.iter())
                            .find(|a| a.key == "service.name")
                            .map(|a| text(&a.value))
                            .unwrap_or_default();
                        for scope in resource.scope_spans {
                            for span in scope.spans {
                                received.push(ReceivedSpan {
                                    service: service.clone(),
                                    name: span.name.clone(),
                                    kind: span.kind,
                                    trace_id: hex(&span.trace_id),
                                    span_id: hex(&span.span_id),
                                    parent_span_id: hex(&span.parent_span_id),
                                    attributes: span
                                        .attributes
                                        .iter()
                                        .map(|a| (a.key.clone(), text(&a.value)))
                                        .collect(),
                                });
                            }
                        }
                    }
                    axum::http::StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("OTLP receiver binds");
        let url = format!(
            "http://{}/v1/traces",
            listener.local_addr().expect("address")
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        OtlpReceiver { url, spans }
    }

    /// The full traces URL to export to.
    pub fn traces_url(&self) -> &str {
        &self.url
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().expect("lock").clone()
    }

    /// Waits until a span matching `accept` has arrived.
    pub async fn wait_for(
        &self,
        what: &str,
        accept: impl Fn(&ReceivedSpan) -> bool,
    ) -> ReceivedSpan {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(span) = self.spans().into_iter().find(|s| accept(s)) {
                return span;
            }
            if Instant::now() > deadline {
                panic!("no span {what}; received: {:#?}", self.spans());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The `/metrics` text of a process serving Prometheus on `http`.
pub async fn metrics_text(http: SocketAddr) -> String {
    reqwest::get(format!("http://{http}/metrics"))
        .await
        .expect("metrics scraped")
        .text()
        .await
        .expect("metrics text")
}

/// The value of one series (`name{labels}` exactly as exported), 0 when absent.
pub async fn metric(http: SocketAddr, series: &str) -> f64 {
    metrics_text(http)
        .await
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// This process's resident memory in MiB (Linux), for tests that bound what a flood costs.
pub fn rss_mib() -> f64 {
    resident_mib("self")
}

/// Another process's resident memory in MiB (Linux), 0 when it cannot be read.
pub fn process_rss_mib(pid: u32) -> f64 {
    resident_mib(&pid.to_string())
}

fn resident_mib(process: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{process}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}
