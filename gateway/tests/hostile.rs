//! The gateway against hostile clients, over real sockets with the real broker: web pages
//! in the operator's browser (cross-site requests, DNS rebinding), a client far over its
//! rate limit that needs an e-stop, slow and idle HTTP clients, floods of connections
//! and event streams, robots forging other robots' results, and a gateway started
//! beyond loopback without a token. Each test is one attack from the security issue;
//! the floods print the test process's resident memory before and after.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fleet_gateway::GatewayConfig;
use fleet_protocol::RobotId;
use fleet_testkit::{TcpProxy, WAIT, Watcher, start_broker};
use robot_node::{BrokerAddress, NodeConfig, NodeHandle, RobotConfig, SimulatedDriver};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The limits the tests turn down, so that they run in seconds.
#[derive(Default)]
struct Limits {
    header_timeout: Option<Duration>,
    max_connections: Option<usize>,
    max_event_streams: Option<usize>,
    max_robots: Option<usize>,
    allowed_hosts: &'static [&'static str],
    allowed_origins: &'static [&'static str],
}

/// Every setting these tests need that the gateway gained for them.
fn harden(config: &mut GatewayConfig, limits: Limits) {
    if let Some(timeout) = limits.header_timeout {
        config.http.header_timeout = timeout;
    }
    if let Some(max) = limits.max_connections {
        config.http.max_connections = max;
    }
    if let Some(max) = limits.max_event_streams {
        config.max_event_streams = max;
    }
    if let Some(max) = limits.max_robots {
        config.max_robots = max;
    }
    config.allowed_hosts = limits
        .allowed_hosts
        .iter()
        .map(|h| h.parse().unwrap())
        .collect();
    config.allowed_origins = limits
        .allowed_origins
        .iter()
        .map(|o| o.parse().unwrap())
        .collect();
}

struct Gateway {
    addr: SocketAddr,
    base: String,
    http: reqwest::Client,
    client_id: String,
    /// Sees every command the gateway publishes.
    commands: Watcher,
    broker: fleet_broker::RunningBroker,
    _robots: Vec<NodeHandle>,
}

/// The real broker, the gateway (knowing linus, torvalds and victim) on 127.0.0.1:0, and
/// with `robots` the simulated linus and torvalds.
async fn start(
    robots: bool,
    limits: Limits,
    configure: impl FnOnce(&mut GatewayConfig),
) -> Gateway {
    let broker = start_broker().await;
    let mqtt = broker.mqtt_addr();
    launch(broker, mqtt, robots, limits, configure).await
}

/// As `start`, with the gateway connecting to the broker at `gateway_broker` (a proxy).
async fn launch(
    broker: fleet_broker::RunningBroker,
    gateway_broker: SocketAddr,
    robots: bool,
    limits: Limits,
    configure: impl FnOnce(&mut GatewayConfig),
) -> Gateway {
    let mqtt = broker.mqtt_addr();
    let commands = Watcher::v5(mqtt, "commands", "fleet/+/cmd/#").await;
    let mut nodes = Vec::new();
    if robots {
        let status = Watcher::v311(mqtt, "status", "fleet/+/status").await;
        for robot in [RobotConfig::linus(), RobotConfig::torvalds()] {
            let address = BrokerAddress {
                host: mqtt.ip().to_string(),
                port: mqtt.port(),
            };
            let driver = Box::new(SimulatedDriver::new(robot.id.to_string()));
            nodes.push(robot_node::spawn(
                NodeConfig::new(robot, address),
                driver,
                Default::default(),
            ));
        }
        for robot in ["linus", "torvalds"] {
            let topic = format!("fleet/{robot}/status");
            status
                .wait_for("online", |m| m.topic == topic && m.text() == "online")
                .await;
        }
    }
    let mut config = GatewayConfig::new(gateway_broker.ip().to_string(), gateway_broker.port());
    config.robots = ["linus", "torvalds", "victim"]
        .map(|r| RobotId::new(r).unwrap())
        .to_vec();
    config.probe_interval = None;
    config.command_timeout = Duration::from_millis(1500);
    harden(&mut config, limits);
    configure(&mut config);
    let client_id = config.client_id.clone();
    let state = fleet_gateway::connect(&config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(fleet_gateway::serve(
        listener,
        state.clone(),
        std::future::pending(),
    ));
    let deadline = tokio::time::Instant::now() + WAIT;
    while !state.fleet.is_connected() {
        assert!(tokio::time::Instant::now() < deadline, "gateway connects");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Gateway {
        addr,
        base: format!("http://{addr}"),
        http: reqwest::Client::new(),
        client_id,
        commands,
        broker,
        _robots: nodes,
    }
}

impl Gateway {
    async fn send(&self, request: reqwest::RequestBuilder) -> (u16, Value) {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.get(format!("{}{path}", self.base))
    }

    fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> reqwest::RequestBuilder {
        self.http.post(format!("{}{path}", self.base)).body(body)
    }

    async fn metrics(&self) -> String {
        let (_, metrics) = self.send(self.get("/metrics")).await;
        metrics.as_str().unwrap_or_default().to_owned()
    }

    /// Sends a harmless command the ordinary way and waits until it is on the bus: every
    /// command the gateway published before it has arrived by then.
    async fn mark(&self) -> usize {
        let marker = format!("{:016x}", rand::random::<u64>());
        let body = json!({"state": "off", "id": marker}).to_string();
        let (status, _) = self
            .send(self.post("/api/robots/torvalds/commands/eyes", body))
            .await;
        assert_eq!(status, 202, "the marker command goes out");
        self.commands
            .wait_for("the marker command", |m| m.json()["id"] == marker.as_str())
            .await;
        self.commands.messages().len()
    }

    /// Commands on the bus other than the markers (eyes to torvalds).
    fn published(&self) -> Vec<(String, Value)> {
        self.commands
            .messages()
            .into_iter()
            .filter(|m| m.topic != "fleet/torvalds/cmd/eyes")
            .map(|m| (m.topic.clone(), m.json()))
            .collect()
    }

    /// Asserts that /metrics has each of `samples` (whole lines).
    async fn expect_samples(&self, samples: &[&str]) {
        let metrics = self.metrics().await;
        for sample in samples {
            assert!(has_sample(&metrics, sample), "{sample}\n{metrics}");
        }
    }

    async fn robots(&self) -> Vec<Value> {
        let (_, body) = self.send(self.get("/api/robots")).await;
        body["robots"].as_array().cloned().unwrap_or_default()
    }
}

fn has_sample(metrics: &str, sample: &str) -> bool {
    metrics.lines().any(|line| line == sample)
}

/// The value of one series (0 when absent).
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Resident memory of this test process (broker, gateway and clients), in MiB.
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Reads until the server closes the connection; `None` if it is still open after
/// `limit`. Returns when it closed and what it sent first.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<(Duration, String)> {
    let started = Instant::now();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let left = limit.checked_sub(started.elapsed())?;
        match tokio::time::timeout(left, stream.read(&mut buffer)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Some((
                    started.elapsed(),
                    String::from_utf8_lossy(&received).into_owned(),
                ));
            }
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
        }
    }
}

/// Reads a response head (through the blank line) from a raw connection.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(WAIT, stream.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

#[tokio::test]
async fn cross_site_requests_are_refused_and_publish_nothing() {
    let gw = start(false, Limits::default(), |_| {}).await;
    let evil = "http://evil.example";
    let attacks = [
        (
            "<img src=.../forward> in a browser that sends Fetch Metadata",
            gw.get("/forward")
                .header("sec-fetch-site", "cross-site")
                .header("sec-fetch-mode", "no-cors")
                .header("sec-fetch-dest", "image")
                .header("referer", format!("{evil}/")),
        ),
        (
            "... and in one that does not (only the Referer tells)",
            gw.get("/left").header("referer", format!("{evil}/page")),
        ),
        (
            "a cross-site form POST (<form action=... method=post>)",
            gw.post("/servoarm", "degree=90&degree2=-90")
                .header("content-type", "application/x-www-form-urlencoded")
                .header("origin", evil)
                .header("sec-fetch-site", "cross-site"),
        ),
        (
            "fetch(url, {method: 'POST', mode: 'no-cors', body: 'forward'}), no preflight",
            gw.post("/api/robots/linus/commands/drive", "forward")
                .header("content-type", "text/plain;charset=UTF-8")
                .header("origin", evil),
        ),
        (
            "a sibling site is another site too",
            gw.post("/api/robots/linus/commands/drive", "forward")
                .header("sec-fetch-site", "same-site"),
        ),
        (
            "an opaque origin (a sandboxed frame)",
            gw.get("/api/probe").header("origin", "null"),
        ),
    ];
    for (attack, request) in attacks {
        let (status, error) = gw.send(request).await;
        assert_eq!(
            (status, error["code"].as_str()),
            (403, Some("forbidden_origin")),
            "{attack}"
        );
    }

    gw.mark().await;
    assert_eq!(gw.published(), vec![], "nothing was published");
    gw.expect_samples(&["fleet_gateway_requests_refused_total{reason=\"forbidden_origin\"} 6"])
        .await;
}

#[tokio::test]
async fn a_rebound_dns_name_is_refused_on_loopback() {
    let gw = start(
        false,
        Limits {
            allowed_hosts: &["fleet.lan"],
            ..Limits::default()
        },
        |_| {},
    )
    .await;
    let evil = format!("evil.example:{}", gw.addr.port());
    let same_origin = format!("http://{evil}");
    // After the rebinding, the page at evil.example is same-origin with the gateway.
    let (status, error) = gw
        .send(
            gw.post("/api/robots/linus/commands/drive", "forward")
                .header("host", &evil)
                .header("origin", &same_origin)
                .header("sec-fetch-site", "same-origin"),
        )
        .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (421, Some("forbidden_host"))
    );
    for path in ["/forward", "/api/robots", "/", "/api/events"] {
        let (status, _) = gw.send(gw.get(path).header("host", &evil)).await;
        assert_eq!(status, 421, "GET {path} with Host {evil}");
    }
    gw.mark().await;
    assert_eq!(gw.published(), vec![], "nothing was published");

    // Names of the gateway itself still work, and probes reach health under any Host.
    for host in ["fleet.lan:8080", "localhost", "127.0.0.1:8080", "[::1]:1"] {
        let (status, _) = gw.send(gw.get("/api/robots").header("host", host)).await;
        assert_eq!(status, 200, "Host {host}");
    }
    for path in ["/health", "/readyz", "/metrics"] {
        let (status, _) = gw.send(gw.get(path).header("host", &evil)).await;
        assert_eq!(status, 200, "{path} answers probes under any Host");
    }
    gw.expect_samples(&["fleet_gateway_requests_refused_total{reason=\"forbidden_host\"} 5"])
        .await;
}

#[tokio::test]
async fn the_page_scripts_and_listed_origins_still_work() {
    let gw = start(
        true,
        Limits {
            allowed_origins: &["https://ops.example.com"],
            ..Limits::default()
        },
        |_| {},
    )
    .await;
    let own = gw.base.clone();
    let listed = "https://ops.example.com";
    let requests = [
        (
            "the page's own fetch (as gateway/src/ui/index.html sends it)",
            gw.post(
                "/api/robots/linus/commands/drive",
                r#"{"direction":"forward","hold_ms":1000}"#,
            )
            .header("content-type", "application/json")
            .header("origin", &own)
            .header("sec-fetch-site", "same-origin")
            .header("referer", format!("{own}/")),
            202,
        ),
        (
            "curl and scripts: no Origin, no Sec-Fetch-*",
            gw.post("/api/robots/linus/commands/drive", "left"),
            202,
        ),
        (
            "an address typed into the browser, under a loopback name",
            gw.get("/right")
                .header("host", format!("localhost:{}", gw.addr.port()))
                .header("sec-fetch-site", "none"),
            202,
        ),
        (
            "an --allowed-origins page",
            gw.post("/api/robots/torvalds/commands/eyes", "on")
                .header("origin", listed),
            202,
        ),
        (
            "... but Sec-Fetch-Site: cross-site is refused even so",
            gw.post("/api/robots/torvalds/commands/eyes", "on")
                .header("origin", listed)
                .header("sec-fetch-site", "cross-site"),
            403,
        ),
    ];
    for (what, request, expected) in requests {
        let (status, body) = gw.send(request).await;
        assert_eq!(status, expected, "{what}: {body}");
    }
    let (status, result) = gw
        .send(gw.post("/api/robots/linus/commands/drive?wait=true", "left"))
        .await;
    assert_eq!(
        (status, result["status"].as_str()),
        (200, Some("ok")),
        "curl with ?wait=true: the answer on linus's reply topic"
    );
    let (status, probe) = gw
        .send(gw.get("/api/probe").header("sec-fetch-site", "same-origin"))
        .await;
    assert_eq!(status, 200);
    let up: Vec<&str> = probe["robots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["up"] == true)
        .filter_map(|r| r["robot"].as_str())
        .collect();
    assert_eq!(
        up,
        ["linus", "torvalds"],
        "pings answered on the per-robot reply topics"
    );
}

#[tokio::test]
async fn stops_from_anywhere_go_out() {
    let gw = start(false, Limits::default(), |_| {}).await;
    let evil = format!("evil.example:{}", gw.addr.port());
    let hostile = |request: reqwest::RequestBuilder| {
        request
            .header("host", &evil)
            .header("origin", "http://evil.example")
            .header("sec-fetch-site", "cross-site")
            .header("referer", "http://evil.example/")
    };
    for (method, path) in [
        ("POST", "/api/fleet/stop"),
        ("POST", "/api/robots/linus/commands/stop"),
        ("GET", "/stop"),
        ("POST", "/stoptwo"),
    ] {
        let request = match method {
            "GET" => gw.get(path),
            _ => gw.post(path, ""),
        };
        let (status, body) = gw.send(hostile(request)).await;
        assert_eq!(status, 202, "{method} {path} from another site: {body}");
    }
    gw.mark().await;
    let topics: Vec<String> = gw.published().into_iter().map(|(t, _)| t).collect();
    assert_eq!(
        topics,
        [
            "fleet/all/cmd/stop",
            "fleet/linus/cmd/stop",
            "fleet/linus/cmd/drive",
            "fleet/torvalds/cmd/drive",
        ]
    );
    assert!(
        gw.published()[2..]
            .iter()
            .all(|(_, payload)| payload["direction"] == "stop")
    );
}

#[tokio::test]
async fn stops_pass_a_client_far_over_its_rate_limit_without_the_token() {
    let gw = start(false, Limits::default(), |config| {
        config.api_token = Some("s3cret".into());
        config.rate_limit = 1.0;
        config.rate_burst = 2;
    })
    .await;
    let mut limited = 0;
    for _ in 0..20 {
        let (status, _) = gw
            .send(
                gw.post("/api/robots/linus/commands/drive", "forward")
                    .bearer_auth("s3cret"),
            )
            .await;
        limited += usize::from(status == 429);
    }
    assert!(
        limited >= 17,
        "the client is far over its limit ({limited} refused)"
    );
    let (status, _) = gw
        .send(
            gw.post("/api/robots/linus/commands/eyes", "on")
                .bearer_auth("s3cret"),
        )
        .await;
    assert_eq!(status, 429, "still over its limit");

    // STOP ALL and a robot stop, without the token, while over the limit.
    let (status, body) = gw.send(gw.post("/api/fleet/stop", "")).await;
    assert_eq!(status, 202, "STOP ALL: {body}");
    let (status, body) = gw
        .send(
            gw.post("/api/robots/linus/commands/stop", "")
                .bearer_auth("s3cret"),
        )
        .await;
    assert_eq!(status, 202, "robot stop: {body}");
    // Whatever the body: bad JSON, an unknown field, too large, not UTF-8.
    let bodies: [Vec<u8>; 4] = [
        b"{\"id\":".to_vec(),
        br#"{"directoin":"stop"}"#.to_vec(),
        vec![b'x'; 5000],
        vec![0xff, 0xfe, 0x00, 0x80],
    ];
    for (body, code) in bodies.into_iter().zip([
        "bad_payload",
        "bad_payload",
        "payload_too_large",
        "bad_payload",
    ]) {
        let (status, answer) = gw
            .send(gw.post("/api/robots/torvalds/commands/stop", body))
            .await;
        assert_eq!(status, 202, "a stop with a bad body still stops: {answer}");
        assert_eq!(
            answer["warning"]["code"], code,
            "the sender is told: {answer}"
        );
    }
    let (status, _) = gw.send(gw.get("/stop")).await;
    assert_eq!(status, 202, "the original /stop");
    let (status, _) = gw.send(gw.post("/stoptwo?wait=maybe", "")).await;
    assert_eq!(
        status, 202,
        "the original /stoptwo, with a query that does not parse"
    );
    let (status, _) = gw
        .send(gw.post("/api/robots/not-known-yet/commands/stop", ""))
        .await;
    assert_eq!(status, 202, "a robot the gateway has not heard of");

    let stops = |topic: &str| {
        gw.commands
            .messages()
            .iter()
            .filter(|m| m.topic == topic)
            .count()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    let expected = [
        ("fleet/all/cmd/stop", 1),
        ("fleet/linus/cmd/stop", 1),
        ("fleet/torvalds/cmd/stop", 4),
        ("fleet/not-known-yet/cmd/stop", 1),
    ];
    while expected.iter().any(|(topic, n)| stops(topic) < *n) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stops reach the bus: {:?}",
            gw.published()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drive_stops = gw
        .published()
        .into_iter()
        .filter(|(topic, payload)| topic.ends_with("/cmd/drive") && payload["direction"] == "stop")
        .count();
    assert_eq!(drive_stops, 2, "/stop and /stoptwo");
    gw.expect_samples(&[
        "fleet_gateway_estops_total{authenticated=\"false\"} 8",
        "fleet_gateway_estops_total{authenticated=\"true\"} 1",
    ])
    .await;
}

#[tokio::test]
async fn a_stop_waits_for_room_in_a_full_mqtt_queue() {
    let broker = start_broker().await;
    let proxy = TcpProxy::start(broker.mqtt_addr()).await;
    let gw = launch(broker, proxy.addr(), false, Limits::default(), |config| {
        config.rate_limit = 1_000_000.0;
        config.rate_burst = 1_000_000;
    })
    .await;
    let (http, base) = (gw.http.clone(), gw.base.clone());
    // A dead route that nobody has noticed yet: the gateway's queue fills up.
    proxy.blackhole();
    let mut overloaded = false;
    for _ in 0..10_000 {
        let response = http
            .post(format!("{base}/api/robots/linus/commands/eyes"))
            .body("on")
            .send()
            .await
            .unwrap();
        if response.status() == 429 {
            overloaded = true;
            break;
        }
    }
    assert!(
        overloaded,
        "the MQTT queue is full: commands answer 429 overloaded"
    );
    let stop = tokio::spawn({
        let (http, base) = (http.clone(), base.clone());
        async move {
            http.post(format!("{base}/api/fleet/stop"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !stop.is_finished(),
        "the stop waits for room instead of a 429"
    );
    // The route comes back with fresh connections: the link drops, and a stop that had
    // no room yet is answered 503 (nothing could be sent; robots stop on link loss).
    proxy.restore();
    let status = tokio::time::timeout(WAIT * 4, stop).await.unwrap().unwrap();
    assert!(matches!(status, 202 | 503), "never 429: {status}");
}

#[tokio::test]
async fn idle_and_partial_connections_are_closed_in_time() {
    let timeout = Duration::from_millis(800);
    let gw = start(
        false,
        Limits {
            header_timeout: Some(timeout),
            ..Limits::default()
        },
        |_| {},
    )
    .await;
    let limit = Duration::from_secs(3);
    let mut idle = TcpStream::connect(gw.addr).await.unwrap();
    let mut partial = TcpStream::connect(gw.addr).await.unwrap();
    partial
        .write_all(b"GET /api/robots HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1")
        .await
        .unwrap();
    let mut kept_alive = TcpStream::connect(gw.addr).await.unwrap();
    kept_alive
        .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut slow_body = TcpStream::connect(gw.addr).await.unwrap();
    slow_body
        .write_all(
            b"POST /api/robots/linus/commands/drive HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{\"dire",
        )
        .await
        .unwrap();
    let (idle, partial, kept_alive, slow_body) = tokio::join!(
        closed_within(&mut idle, limit),
        closed_within(&mut partial, limit),
        closed_within(&mut kept_alive, limit),
        closed_within(&mut slow_body, limit),
    );
    for (what, closed) in [
        ("an idle connection", &idle),
        ("a partial request head", &partial),
        ("an idle keep-alive connection", &kept_alive),
        ("a request body that never ends", &slow_body),
    ] {
        let Some((after, _)) = closed else {
            panic!("{what} is still open after {limit:?}");
        };
        assert!(*after >= timeout / 2, "{what} closed too early ({after:?})");
    }
    let answered = kept_alive.map(|(_, text)| text).unwrap_or_default();
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
    gw.expect_samples(&[
        "fleet_http_connections_timed_out_total{phase=\"head\"} 3",
        "fleet_http_connections_timed_out_total{phase=\"body\"} 1",
    ])
    .await;
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_at_once() {
    let gw = start(
        false,
        Limits {
            max_connections: Some(8),
            ..Limits::default()
        },
        |_| {},
    )
    .await;
    // Eight connections, each served once and then kept alive.
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut stream).await.unwrap_or_default();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        held.push(stream);
    }
    let mut ninth = TcpStream::connect(gw.addr).await.unwrap();
    let _ = ninth
        .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await;
    let closed = closed_within(&mut ninth, Duration::from_secs(1)).await;
    let Some((_, answered)) = closed else {
        panic!("the ninth connection is still open");
    };
    assert_eq!(answered, "", "closed without an answer");

    // A place comes free when a connection goes.
    held.pop();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        let _ = stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await;
        if read_head(&mut stream)
            .await
            .is_some_and(|h| h.starts_with("HTTP/1.1 200"))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a freed place is used"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(held);
    let metrics = gw.metrics().await;
    assert!(
        sample(&metrics, "fleet_http_connections_refused_total") >= 1.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn event_streams_beyond_the_cap_get_503() {
    let gw = start(
        false,
        Limits {
            max_event_streams: Some(4),
            ..Limits::default()
        },
        |_| {},
    )
    .await;
    let open = |gw: &Gateway| gw.get("/api/events").send();
    let mut streams = Vec::new();
    for _ in 0..4 {
        let stream = open(&gw).await.unwrap();
        assert_eq!(stream.status(), 200);
        streams.push(stream);
    }
    let refused = open(&gw).await.unwrap();
    assert_eq!(refused.status(), 503, "the fifth stream");
    assert!(refused.headers().contains_key("retry-after"));
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["code"], "too_many_streams");
    // A closed stream gives its place back.
    drop(streams.pop());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let stream = open(&gw).await.unwrap();
        if stream.status() == 200 {
            streams.push(stream);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a freed place is used"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = gw.metrics().await;
    assert!(
        has_sample(&metrics, "fleet_gateway_event_streams 4"),
        "{metrics}"
    );
    let refused = sample(
        &metrics,
        "fleet_gateway_requests_refused_total{reason=\"too_many_streams\"}",
    );
    assert!(refused >= 1.0, "{metrics}");
}

#[tokio::test]
async fn an_event_stream_flood_is_capped() {
    const FLOOD: usize = 4000;
    // The defaults: 256 streams, 1024 connections.
    let gw = start(false, Limits::default(), |_| {}).await;
    let before = rss_mib();
    let mut held = Vec::with_capacity(FLOOD);
    let (mut streaming, mut refused, mut closed) = (0, 0, 0);
    for _ in 0..FLOOD {
        let Ok(mut stream) = TcpStream::connect(gw.addr).await else {
            closed += 1;
            continue;
        };
        let _ = stream
            .write_all(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await;
        match read_head(&mut stream).await {
            Some(head) if head.starts_with("HTTP/1.1 200") => streaming += 1,
            Some(head) if head.starts_with("HTTP/1.1 503") => refused += 1,
            _ => closed += 1,
        }
        held.push(stream);
    }
    let after = rss_mib();
    eprintln!(
        "event stream flood: {FLOOD} attempts, {streaming} streaming, {refused} answered 503, \
         {closed} closed; RSS {before:.1} MiB before, {after:.1} MiB after (+{:.1})",
        after - before
    );
    assert!(streaming <= 256, "{streaming} streams open at once");
    assert_eq!(streaming, 256, "up to the cap, streams are served");
    drop(held);
}

#[tokio::test]
async fn forged_replies_answer_nothing_and_change_nothing() {
    let gw = start(true, Limits::default(), |_| {}).await;
    // mallory is a robot (its own MQTT client); it sees the command to victim.
    let mallory = Watcher::v5(gw.broker.mqtt_addr(), "robot-mallory", "fleet/+/cmd/#").await;
    let waiting = tokio::spawn({
        let request = gw.post("/api/robots/victim/commands/drive?wait=true", "forward");
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    });
    let command = mallory
        .wait_for("the command to victim", |m| {
            m.topic == "fleet/victim/cmd/drive"
        })
        .await;
    let id = command.json()["id"].as_str().unwrap().to_owned();
    let victims_topic = command.response_topic.unwrap_or_default();
    // mallory's own reply topic (with one reply topic for everyone, the same one).
    let own_topic = victims_topic.replace("/victim/", "/mallory/");
    let forged = |robot: &str, id: &str| {
        json!({"id": id, "robot": robot, "command": "drive", "status": "ok"}).to_string()
    };
    // On victim's reply topic, honest about being mallory.
    mallory
        .publish(&victims_topic, forged("mallory", &id))
        .await;
    // On its own reply topic, pretending to be victim.
    mallory.publish(&own_topic, forged("victim", &id)).await;
    // An id nobody is waiting for, and something that is not a result at all.
    mallory
        .publish(&victims_topic, forged("victim", "0123456789abcdef"))
        .await;
    mallory.publish(&victims_topic, "not json").await;

    let (status, answer) = waiting.await.unwrap();
    assert_eq!(
        status, 504,
        "no forged result answers the command: {answer}"
    );
    let (_, victim) = gw.send(gw.get("/api/robots/victim")).await;
    assert_eq!(victim["last_result"], Value::Null, "{victim}");
    let (status, _) = gw.send(gw.get("/api/robots/mallory")).await;
    assert_eq!(status, 404, "replies never add robots");
    assert_eq!(
        victims_topic,
        format!("fleet/_gateway/{}/victim/result", gw.client_id),
        "the command asked victim to answer on its own reply topic"
    );
    gw.expect_samples(&[
        "fleet_gateway_replies_refused_total{reason=\"robot_mismatch\"} 2",
        "fleet_gateway_replies_refused_total{reason=\"unknown_id\"} 1",
        "fleet_gateway_replies_refused_total{reason=\"not_json\"} 1",
    ])
    .await;
    // The real robots' answers still arrive, on their own reply topics.
    let (status, result) = gw
        .send(gw.post("/api/robots/linus/commands/eyes?wait=true", "on"))
        .await;
    assert_eq!((status, result["robot"].as_str()), (200, Some("linus")));
    // A fleet-wide command carries no response topic: each robot answers on its own.
    let (status, _) = gw.send(gw.post("/api/fleet/stop", "")).await;
    assert_eq!(status, 202);
    let stop = mallory
        .wait_for("the fleet stop", |m| m.topic == "fleet/all/cmd/stop")
        .await;
    assert_eq!(stop.response_topic, None);
}

/// Publishes a marker in linus's state after everything `forger` sent, and waits until
/// the gateway shows it: it has taken in everything before it by then.
async fn settled(gw: &Gateway, forger: &Watcher, n: usize) {
    let marker = json!({"robot": "linus", "marker": n}).to_string();
    forger.publish("fleet/linus/state", marker).await;
    let deadline = tokio::time::Instant::now() + WAIT * 6;
    loop {
        let (_, linus) = gw.send(gw.get("/api/robots/linus")).await;
        if linus["state"]["marker"] == n {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway keeps up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_flood_of_forged_results_and_robots_leaves_the_fleet_table_bounded() {
    const FORGED: usize = 20_000;
    let gw = start(
        false,
        Limits {
            max_robots: Some(50),
            ..Limits::default()
        },
        |_| {},
    )
    .await;
    let before = gw.robots().await.len();
    let rss_before = rss_mib();
    let forger = Watcher::v5(gw.broker.mqtt_addr(), "robot-forger", "nothing/here").await;
    // Results with made-up robot ids on every topic the gateway reads results from: its
    // reply topics (the per-robot ones, and the old single one) and the robots' own.
    let shapes = [
        format!("fleet/_gateway/{}/{{robot}}/result", gw.client_id),
        format!("fleet/_gateway/{}/result", gw.client_id),
        "fleet/{robot}/result".to_owned(),
    ];
    for n in 0..FORGED {
        let robot = format!("forged-{:08x}", rand::random::<u32>());
        let topic = shapes[n % shapes.len()].replace("{robot}", &robot);
        let id = format!("{:016x}", rand::random::<u64>());
        let result = json!({"id": id, "robot": robot, "command": "drive", "status": "ok"});
        forger.publish(&topic, result.to_string()).await;
        if n % 2000 == 1999 {
            settled(&gw, &forger, n).await;
        }
    }
    settled(&gw, &forger, FORGED).await;
    let after_results = gw.robots().await.len();
    let rss_after = rss_mib();
    eprintln!(
        "forged results flood: {FORGED} results with random robot ids; fleet table {before} -> \
         {after_results} robots; RSS {rss_before:.1} MiB before, {rss_after:.1} MiB after (+{:.1})",
        rss_after - rss_before
    );
    assert_eq!(after_results, before, "results never add robots");

    // Made-up robots on the state and status topics (which do add robots) stop at the cap.
    for n in 0..200 {
        let topic = format!("fleet/made-up-{n}/status");
        forger.publish(&topic, "online").await;
    }
    settled(&gw, &forger, FORGED + 1).await;
    let after_states = gw.robots().await.len();
    assert_eq!(after_states, 50, "--max-robots holds");
    let ignored = format!("fleet_gateway_robots_ignored_total {}", 200 - (50 - before));
    gw.expect_samples(&[&ignored]).await;
}

#[tokio::test]
async fn no_token_beyond_loopback_is_refused_at_start() {
    use fleet_gateway::check_exposure;
    let any: SocketAddr = "0.0.0.0:8080".parse().unwrap();
    let error = check_exposure(any, None, false).unwrap_err().to_string();
    assert!(
        error.contains("--api-token") && error.contains("--allow-no-token"),
        "{error}"
    );
    assert!(check_exposure("[::]:8080".parse().unwrap(), Some(""), false).is_err());
    assert!(check_exposure(any, Some("s3cret"), false).is_ok());
    assert!(check_exposure(any, None, true).is_ok());
    assert!(check_exposure("127.0.0.1:8080".parse().unwrap(), None, false).is_ok());
    assert!(check_exposure("[::1]:8080".parse().unwrap(), None, false).is_ok());
}

/// Runs the fleet-gateway binary for at most `limit`; its exit status (None if it was
/// still running, then it is killed) and what it logged.
async fn run_gateway(args: &[&str], limit: Duration) -> (Option<i32>, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fleet-gateway"))
        .args(args)
        .env_remove("FLEET_API_TOKEN")
        .env_remove("FLEET_ALLOW_NO_TOKEN")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if started.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut logged = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        use std::io::Read;
        let _ = stderr.read_to_string(&mut logged);
    }
    (status, logged)
}

#[tokio::test]
async fn the_gateway_binary_refuses_to_serve_beyond_loopback_without_a_token() {
    let common = ["--broker", "127.0.0.1:9", "--probe-interval-s", "0"];
    let args: Vec<&str> = ["--http-addr", "0.0.0.0:0"]
        .iter()
        .chain(&common)
        .copied()
        .collect();
    let (status, logged) = run_gateway(&args, Duration::from_secs(10)).await;
    assert!(
        matches!(status, Some(code) if code != 0),
        "exits with an error ({status:?}): {logged}"
    );
    assert!(logged.contains("--allow-no-token"), "{logged}");
    let args: Vec<&str> = ["--http-addr", "0.0.0.0:0", "--allow-no-token"]
        .iter()
        .chain(&common)
        .copied()
        .collect();
    let (status, logged) = run_gateway(&args, Duration::from_secs(2)).await;
    assert_eq!(status, None, "serves with --allow-no-token: {logged}");
    assert!(
        logged.contains("without --api-token"),
        "and warns: {logged}"
    );
}
