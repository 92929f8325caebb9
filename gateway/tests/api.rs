//! Every endpoint and original route over a real socket, with the real broker and
//! simulated robots: what each publishes, `?wait=true`, the prober, the token and the
//! rate limit.

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::StatusCode;
use fleet_gateway::{AppState, GatewayConfig};
use fleet_protocol::RobotId;
use fleet_testkit::{WAIT, Watcher, start_broker};
use robot_node::{BrokerAddress, NodeConfig, NodeHandle, RobotConfig, SimulatedDriver};
use serde_json::Value;

struct TestFleet {
    base: String,
    http: reqwest::Client,
    /// Sees every command the gateway publishes (MQTT 5: with properties).
    commands: Watcher,
    _broker: fleet_broker::RunningBroker,
    _robots: Vec<NodeHandle>,
}

/// linus and torvalds running; `ghost` known to the gateway but never started.
async fn start(configure: impl FnOnce(&mut GatewayConfig)) -> TestFleet {
    let broker = start_broker().await;
    let addr = broker.mqtt_addr();
    let commands = Watcher::v5(addr, "commands", "fleet/+/cmd/#").await;
    let status = Watcher::v311(addr, "status", "fleet/+/status").await;
    let robots = [RobotConfig::linus(), RobotConfig::torvalds()]
        .into_iter()
        .map(|robot| {
            let address = BrokerAddress {
                host: addr.ip().to_string(),
                port: addr.port(),
            };
            let driver = Box::new(SimulatedDriver::new(robot.id.to_string()));
            robot_node::spawn(NodeConfig::new(robot, address), driver, Default::default())
        })
        .collect();
    for robot in ["linus", "torvalds"] {
        let topic = format!("fleet/{robot}/status");
        status
            .wait_for("online", |m| m.topic == topic && m.text() == "online")
            .await;
    }
    let mut config = GatewayConfig::new(addr.ip().to_string(), addr.port());
    config.robots = ["linus", "torvalds", "ghost"]
        .map(|r| RobotId::new(r).unwrap())
        .to_vec();
    config.probe_interval = None;
    config.command_timeout = Duration::from_millis(500);
    config.probe_timeout = Duration::from_millis(300);
    configure(&mut config);
    let state = fleet_gateway::connect(&config);
    let base = serve(state.clone()).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !state.fleet.is_connected() {
        assert!(tokio::time::Instant::now() < deadline, "gateway connects");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    TestFleet {
        base,
        http: reqwest::Client::new(),
        commands,
        _broker: broker,
        _robots: robots,
    }
}

async fn serve(state: AppState) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(fleet_gateway::serve(
        listener,
        state,
        std::future::pending(),
    ));
    format!("http://{addr}")
}

impl TestFleet {
    async fn call(&self, method: &str, path: &str, body: &str) -> (StatusCode, Value) {
        let url = format!("{}{path}", self.base);
        let request = match method {
            "GET" => self.http.get(url),
            _ => self.http.post(url).body(body.to_owned()),
        };
        let request = if body.contains('=') && !body.starts_with('{') {
            request.header("content-type", "application/x-www-form-urlencoded")
        } else {
            request
        };
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

#[tokio::test]
async fn every_original_route_publishes_its_command() {
    let fleet = start(|_| {}).await;
    let routes: [(&str, &str, &str, &str, Value); 25] = [
        (
            "GET",
            "/forward",
            "",
            "fleet/linus/cmd/drive",
            serde_json::json!({"direction": "forward"}),
        ),
        (
            "POST",
            "/backward",
            "",
            "fleet/linus/cmd/drive",
            serde_json::json!({"direction": "backward"}),
        ),
        (
            "GET",
            "/left",
            "",
            "fleet/linus/cmd/drive",
            serde_json::json!({"direction": "left"}),
        ),
        (
            "GET",
            "/right",
            "",
            "fleet/linus/cmd/drive",
            serde_json::json!({"direction": "right"}),
        ),
        (
            "GET",
            "/stop",
            "",
            "fleet/linus/cmd/drive",
            serde_json::json!({"direction": "stop"}),
        ),
        (
            "GET",
            "/north",
            "",
            "fleet/torvalds/cmd/drive",
            serde_json::json!({"direction": "forward"}),
        ),
        (
            "GET",
            "/south",
            "",
            "fleet/torvalds/cmd/drive",
            serde_json::json!({"direction": "backward"}),
        ),
        (
            "GET",
            "/west",
            "",
            "fleet/torvalds/cmd/drive",
            serde_json::json!({"direction": "left"}),
        ),
        (
            "GET",
            "/east",
            "",
            "fleet/torvalds/cmd/drive",
            serde_json::json!({"direction": "right"}),
        ),
        (
            "GET",
            "/stoptwo",
            "",
            "fleet/torvalds/cmd/drive",
            serde_json::json!({"direction": "stop"}),
        ),
        (
            "GET",
            "/linuson",
            "",
            "fleet/linus/cmd/eyes",
            serde_json::json!({"state": "on"}),
        ),
        (
            "GET",
            "/linusoff",
            "",
            "fleet/linus/cmd/eyes",
            serde_json::json!({"state": "off"}),
        ),
        (
            "GET",
            "/torvaldson",
            "",
            "fleet/torvalds/cmd/eyes",
            serde_json::json!({"state": "on"}),
        ),
        (
            "GET",
            "/torvaldsoff",
            "",
            "fleet/torvalds/cmd/eyes",
            serde_json::json!({"state": "off"}),
        ),
        (
            "GET",
            "/servomin",
            "",
            "fleet/linus/cmd/servo",
            serde_json::json!({"servo1": -90}),
        ),
        (
            "GET",
            "/servomid",
            "",
            "fleet/linus/cmd/servo",
            serde_json::json!({"servo1": 0}),
        ),
        (
            "GET",
            "/servomax",
            "",
            "fleet/linus/cmd/servo",
            serde_json::json!({"servo1": 90}),
        ),
        (
            "GET",
            "/servomin2",
            "",
            "fleet/linus/cmd/servo",
            serde_json::json!({"servo2": -90}),
        ),
        (
            "GET",
            "/servomid2",
            "",
            "fleet/linus/cmd/servo",
            serde_json::json!({"servo2": 0}),
        ),
        (
            "GET",
            "/servomax2",
            "",
            "fleet/linus/cmd/servo",
            serde_json::json!({"servo2": 90}),
        ),
        (
            "GET",
            "/thirty",
            "",
            "fleet/linus/cmd/speed",
            serde_json::json!({"motor1": 3, "motor2": 3}),
        ),
        (
            "GET",
            "/fifty",
            "",
            "fleet/linus/cmd/speed",
            serde_json::json!({"motor1": 5, "motor2": 5}),
        ),
        (
            "GET",
            "/full",
            "",
            "fleet/linus/cmd/speed",
            serde_json::json!({"motor1": 10, "motor2": 10}),
        ),
        (
            "POST",
            "/servoarm",
            "degree=10&degree2=-20",
            "fleet/linus/cmd/servo",
            serde_json::json!({"servo1": 10, "servo2": -20}),
        ),
        (
            "POST",
            "/motorpwm",
            "speed=3&speed2=7",
            "fleet/linus/cmd/speed",
            serde_json::json!({"motor1": 3, "motor2": 7}),
        ),
    ];
    for (method, path, body, topic, expected) in routes {
        let (status, accepted) = fleet.call(method, path, body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{method} {path}: {accepted}");
        let id = accepted["id"].as_str().unwrap().to_owned();
        let published = fleet
            .commands
            .wait_for(path, |m| m.json()["id"] == id.as_str())
            .await;
        assert_eq!(published.topic, topic, "{path}");
        let mut payload = published.json();
        payload.as_object_mut().unwrap().remove("id");
        assert_eq!(payload, expected, "{path}");
    }
    // The aliases answer like the API, including ?wait=true and bad form input.
    let (status, result) = fleet.call("GET", "/linuson?wait=true", "").await;
    assert_eq!(
        (status, result["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let (status, error) = fleet
        .call("POST", "/servoarm", "degree=200&degree2=0")
        .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("out_of_range"))
    );
    let (status, error) = fleet.call("POST", "/motorpwm", "speed=3").await;
    assert_eq!(
        (status, error["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("bad_payload"))
    );
}

#[tokio::test]
async fn wait_true_answers_with_the_result_or_504() {
    let fleet = start(|_| {}).await;
    let (status, result) = fleet
        .call(
            "POST",
            "/api/robots/linus/commands/drive?wait=true",
            "forward",
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{result}");
    assert_eq!(
        (result["status"].as_str(), result["robot"].as_str()),
        (Some("ok"), Some("linus"))
    );

    // The robot's refusal is a result too: 200 with status error.
    let (status, result) = fleet
        .call(
            "POST",
            "/api/robots/torvalds/commands/servo?wait=true",
            "mid",
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (result["status"].as_str(), result["code"].as_str()),
        (Some("error"), Some("not_supported"))
    );

    // Known but not running: no answer within the timeout (500 ms here).
    let started = std::time::Instant::now();
    let (status, error) = fleet
        .call(
            "POST",
            "/api/robots/ghost/commands/drive?wait=true",
            "forward",
        )
        .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (StatusCode::GATEWAY_TIMEOUT, Some("timeout"))
    );
    assert!(started.elapsed() >= Duration::from_millis(450));

    let (status, error) = fleet
        .call(
            "POST",
            "/api/robots/nobody/commands/drive?wait=true",
            "forward",
        )
        .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_robot"))
    );

    let (_, metrics) = fleet.call("GET", "/metrics", "").await;
    let metrics = metrics.as_str().unwrap().to_owned();
    assert!(
        metrics.contains("fleet_gateway_click_to_result_seconds_count{wait=\"true\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fleet_gateway_robot_commands_published_total{robot=\"linus\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn health_readiness_openapi_and_robot_views() {
    let fleet = start(|_| {}).await;
    for (path, key, value) in [
        ("/health", "health", "ok"),
        ("/status", "result", "OK - healthy"),
        ("/healthcheck", "app_status", "ok"),
    ] {
        let (status, body) = fleet.call("GET", path, "").await;
        assert_eq!(
            (status, body[key].as_str()),
            (StatusCode::OK, Some(value)),
            "{path}"
        );
    }
    let (status, ready) = fleet.call("GET", "/readyz", "").await;
    assert_eq!(
        (status, ready["ready"].as_bool()),
        (StatusCode::OK, Some(true))
    );

    let (status, linus) = fleet.call("GET", "/api/robots/linus", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(linus["online"], true);
    assert!(linus["last_seen_ms"].as_u64().is_some() && linus["state"]["motion"] == "stop");

    let (status, doc) = fleet.call("GET", "/api/openapi.json", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    let routes = [
        "/api/robots",
        "/api/robots/{robot}",
        "/api/robots/{robot}/commands/{command}",
        "/api/fleet/stop",
        "/api/fleet/estop",
        "/api/probe",
        "/api/events",
        "/api/openapi.json",
        "/health",
        "/status",
        "/healthcheck",
        "/readyz",
        "/metrics",
    ];
    for path in routes.into_iter().chain(fleet_gateway::aliases::paths()) {
        assert!(paths.contains_key(path), "{path} is documented");
    }
}

#[tokio::test]
async fn the_prober_finds_who_answers() {
    let fleet = start(|_| {}).await;
    let (status, probe) = fleet.call("GET", "/api/probe", "").await;
    assert_eq!(status, StatusCode::OK);
    let by_robot = |name: &str| {
        probe["robots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["robot"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(by_robot("linus")["up"], true);
    assert_eq!(by_robot("torvalds")["up"], true);
    let ghost = by_robot("ghost");
    assert_eq!(ghost["up"], false, "a timeout counts as down");
    assert!(ghost["response_ms"].as_f64().unwrap() >= 300.0);
    assert!(ghost["error"].as_str().is_some());

    let (_, metrics) = fleet.call("GET", "/metrics", "").await;
    let metrics = metrics.as_str().unwrap().to_owned();
    assert!(
        metrics.contains("fleet_robot_up{robot=\"linus\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fleet_robot_up{robot=\"ghost\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fleet_robot_probe_duration_seconds{robot=\"ghost\"} 0.3"),
        "{metrics}"
    );
    // Pings are not what a person did last.
    let (_, linus) = fleet.call("GET", "/api/robots/linus", "").await;
    assert_ne!(linus["last_result"]["command"], "ping");
}

#[tokio::test]
async fn the_background_prober_runs_at_start_up() {
    let fleet = start(|config| config.probe_interval = Some(Duration::from_secs(3600))).await;
    // The ghost never comes online: the first probe waits out the start-up grace (5 s)
    // for it, then counts it down.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5) + WAIT;
    loop {
        let (_, metrics) = fleet.call("GET", "/metrics", "").await;
        if metrics
            .as_str()
            .unwrap()
            .contains("fleet_robot_up{robot=\"ghost\"} 0")
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "first probe at start-up, not after an hour"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_token_guards_control_and_clients_are_rate_limited() {
    let fleet = start(|config| {
        config.api_token = Some("s3cret".into());
        config.rate_limit = 1.0;
        config.rate_burst = 3;
    })
    .await;
    let url = format!("{}/api/robots/linus/commands/eyes", fleet.base);
    let response = fleet.http.post(&url).body("on").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["code"], "unauthorized");
    let wrong = fleet
        .http
        .post(&url)
        .bearer_auth("nope")
        .body("on")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let alias = fleet
        .http
        .get(format!("{}/forward", fleet.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        alias.status(),
        StatusCode::UNAUTHORIZED,
        "aliases are control routes too"
    );
    // Reading stays open.
    let (status, _) = fleet.call("GET", "/api/robots", "").await;
    assert_eq!(status, StatusCode::OK);

    let mut statuses = Vec::new();
    for _ in 0..5 {
        let response = fleet
            .http
            .post(&url)
            .bearer_auth("s3cret")
            .body("on")
            .send()
            .await
            .unwrap();
        statuses.push(response.status());
    }
    assert_eq!(statuses[0], StatusCode::ACCEPTED);
    assert!(
        statuses.contains(&StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    let limited = fleet
        .http
        .post(&url)
        .bearer_auth("s3cret")
        .body("on")
        .send()
        .await
        .unwrap();
    assert_eq!(limited.headers()["retry-after"], "1");
    let error: Value = limited.json().await.unwrap();
    assert_eq!(error["code"], "rate_limited");

    let (_, metrics) = fleet.call("GET", "/metrics", "").await;
    let metrics = metrics.as_str().unwrap().to_owned();
    assert!(
        metrics.contains("fleet_gateway_requests_refused_total{reason=\"unauthorized\"} 3"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_live_stream_sends_a_snapshot_then_every_change() {
    let fleet = start(|_| {}).await;
    let mut stream = fleet
        .http
        .get(format!("{}/api/events", fleet.base))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    let mut received = String::new();
    let mut next_event = async |received: &mut String, kind: &str| -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            // Events are separated by a blank line: "event: <kind>\ndata: <json>\n\n".
            if let Some(end) = received.find("\n\n") {
                let event: String = received.drain(..end + 2).collect();
                let data = event
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .unwrap_or("null");
                if event.lines().any(|l| l == format!("event: {kind}")) {
                    return serde_json::from_str(data).unwrap();
                }
                continue;
            }
            let chunk = tokio::time::timeout_at(deadline, stream.chunk())
                .await
                .expect("an event in time");
            received.push_str(&String::from_utf8_lossy(
                &chunk.unwrap().expect("stream open"),
            ));
        }
    };
    let snapshot = next_event(&mut received, "snapshot").await;
    assert_eq!(snapshot["broker_connected"], true);
    assert_eq!(snapshot["robots"].as_array().unwrap().len(), 3);

    let (status, _) = fleet
        .call("POST", "/api/robots/torvalds/commands/drive", "south")
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    loop {
        let update = next_event(&mut received, "update").await;
        if update["type"] == "state"
            && update["robot"] == "torvalds"
            && update["data"]["motion"] == "backward"
        {
            break;
        }
    }
}

#[tokio::test]
async fn the_latched_e_stop_engages_refuses_motion_and_needs_the_token_to_release() {
    let fleet = start(|config| config.api_token = Some("secret".to_owned())).await;
    let states = Watcher::v311(
        fleet._broker.mqtt_addr(),
        "latch-states",
        "fleet/linus/state",
    )
    .await;
    let (status, latch) = fleet.call("GET", "/api/fleet/estop", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(latch["engaged"], false);

    // Latching needs no token (it is an e-stop), and stops every robot with it.
    let (status, latch) = fleet
        .call("POST", "/api/fleet/estop", r#"{"reason":"drill"}"#)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{latch}");
    assert_eq!(latch["engaged"], true);
    assert_eq!(latch["reason"], "drill");
    assert_eq!(latch["by"], "gateway (127.0.0.1)");
    fleet
        .commands
        .wait_for("the stop that goes with it", |m| {
            m.topic == "fleet/all/cmd/stop"
        })
        .await;
    states
        .wait_for_json("fleet/linus/state", |s| s["estop"] == "engaged")
        .await;
    let (_, latch) = fleet.call("GET", "/api/fleet/estop", "").await;
    assert_eq!(latch["engaged"], true, "the gateway reads it back");

    // Motion is refused at the gateway, with the token or without.
    let drive = fleet
        .http
        .post(format!("{}/api/robots/linus/commands/drive", fleet.base))
        .bearer_auth("secret")
        .body(r#"{"direction":"forward"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(drive.status(), StatusCode::CONFLICT);
    let body: Value = drive.json().await.unwrap();
    assert_eq!(body["code"], "estop_engaged");

    // Releasing is a control request: the token is needed.
    let release = |token: Option<&str>| {
        let request = fleet.http.delete(format!("{}/api/fleet/estop", fleet.base));
        match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
        .send()
    };
    assert_eq!(
        release(None).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        release(Some("secret")).await.unwrap().status(),
        StatusCode::ACCEPTED
    );
    states
        .wait_for_json("fleet/linus/state", |s| s["estop"] == "clear")
        .await;
    let drive = fleet
        .http
        .post(format!("{}/api/robots/linus/commands/drive", fleet.base))
        .bearer_auth("secret")
        .body(r#"{"direction":"forward"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(drive.status(), StatusCode::ACCEPTED);
}

/// An argon2id hash of `token`, as `fleet-broker hash-password` makes them.
fn token_hash(token: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::encode_b64(b"fleet-test-salt!").unwrap();
    argon2::Argon2::default()
        .hash_password(token.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn operators_are_named_on_their_commands_and_held_to_their_roles() {
    let file = [("ada", "admin"), ("olga", "operator"), ("vic", "viewer")]
        .map(|(name, role)| {
            format!(
                "[[operator]]\nname = \"{name}\"\ntoken_hash = \"{}\"\nrole = \"{role}\"\n",
                token_hash(&format!("{name}-secret"))
            )
        })
        .join("\n");
    let operators = std::sync::Arc::new(fleet_gateway::Operators::parse(&file).unwrap());
    let fleet = start(|config| config.operators = Some(operators)).await;
    let call = |method: reqwest::Method, path: &str, bearer: Option<&str>, body: &str| {
        let request = fleet
            .http
            .request(method, format!("{}{path}", fleet.base))
            .body(body.to_owned());
        match bearer {
            Some(bearer) => request.bearer_auth(bearer),
            None => request,
        }
        .send()
    };
    let drive = "/api/robots/linus/commands/drive";
    let status = |response: reqwest::Response| response.status();

    assert_eq!(
        status(
            call(reqwest::Method::POST, drive, None, "stop")
                .await
                .unwrap()
        ),
        StatusCode::UNAUTHORIZED
    );
    let viewer = call(reqwest::Method::POST, drive, Some("vic:vic-secret"), "stop")
        .await
        .unwrap();
    assert_eq!(viewer.status(), StatusCode::FORBIDDEN);
    let body: Value = viewer.json().await.unwrap();
    assert_eq!(body["code"], "forbidden_role");

    // An operator's command carries their name, as a property and in the payload, and a
    // name claimed in the body is not taken.
    fleet.commands.clear();
    let sent = call(
        reqwest::Method::POST,
        drive,
        Some("olga:olga-secret"),
        r#"{"direction":"forward","operator":"mallory","id":"olga-1"}"#,
    )
    .await
    .unwrap();
    assert_eq!(sent.status(), StatusCode::ACCEPTED);
    let published = fleet
        .commands
        .wait_for("olga's drive", |m| m.json()["id"] == "olga-1")
        .await;
    assert_eq!(published.json()["operator"], "olga");
    assert!(
        published
            .user_properties
            .contains(&("fleet-operator".to_owned(), "olga".to_owned())),
        "{:?}",
        published.user_properties
    );

    // Only an admin decommissions (ghost: known, never started).
    let decommission = "/api/robots/ghost/commands/decommission";
    let refused = call(
        reqwest::Method::POST,
        decommission,
        Some("olga:olga-secret"),
        "",
    )
    .await
    .unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let allowed = call(
        reqwest::Method::POST,
        decommission,
        Some("ada:ada-secret"),
        "",
    )
    .await
    .unwrap();
    assert_eq!(allowed.status(), StatusCode::ACCEPTED);

    // Anyone latches the e-stop (named when known); only an admin releases it.
    let latched: Value = call(
        reqwest::Method::POST,
        "/api/fleet/estop",
        Some("olga:olga-secret"),
        "",
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(latched["by"], "olga");
    let release = |bearer| {
        call(
            reqwest::Method::DELETE,
            "/api/fleet/estop",
            Some(bearer),
            "",
        )
    };
    assert_eq!(
        status(release("olga:olga-secret").await.unwrap()),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(release("ada:ada-secret").await.unwrap()),
        StatusCode::ACCEPTED
    );

    // Wrong tokens: five checks per address, then refused without one for a minute.
    for _ in 0..5 {
        let wrong = call(reqwest::Method::POST, drive, Some("ada:guess"), "stop")
            .await
            .unwrap();
        assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    }
    let throttled = call(reqwest::Method::POST, drive, Some("ada:guess"), "stop")
        .await
        .unwrap();
    assert_eq!(throttled.status(), StatusCode::TOO_MANY_REQUESTS);
    // A token checked before still works from that address.
    let known = call(
        reqwest::Method::POST,
        drive,
        Some("olga:olga-secret"),
        "stop",
    )
    .await
    .unwrap();
    assert_eq!(known.status(), StatusCode::ACCEPTED);
}
