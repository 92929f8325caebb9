//! The gateway over a real socket with the real broker and two simulated robots, plus
//! router-level tests with `oneshot`.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use fleet_gateway::{AppState, GatewayConfig};
use fleet_protocol::RobotId;
use fleet_testkit::{WAIT, Watcher, start_broker};
use robot_node::{BrokerAddress, NodeConfig, NodeHandle, RobotConfig, SimulatedDriver};
use serde_json::{Value, json};
use tower::ServiceExt;

fn config_for(broker: SocketAddr) -> GatewayConfig {
    let mut config = GatewayConfig::new(broker.ip().to_string(), broker.port());
    config.robots = vec![
        RobotId::new("linus").unwrap(),
        RobotId::new("torvalds").unwrap(),
    ];
    config
}

fn spawn_robot(broker: SocketAddr, robot: RobotConfig) -> NodeHandle {
    let address = BrokerAddress {
        host: broker.ip().to_string(),
        port: broker.port(),
    };
    let driver = Box::new(SimulatedDriver::new(robot.id.to_string()));
    robot_node::spawn(NodeConfig::new(robot, address), driver, Default::default())
}

/// Serves the gateway on a free port; returns its base URL.
async fn serve(state: AppState) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(fleet_gateway::serve(
        listener,
        state,
        std::future::pending(),
    ));
    format!("http://{addr}")
}

async fn wait_until_connected(state: &AppState) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !state.fleet.is_connected() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gateway connects to the broker"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `GET /api/robots/{robot}` until `accept` holds; returns that view.
async fn wait_for_view(
    http: &reqwest::Client,
    base: &str,
    robot: &str,
    accept: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let response = http
            .get(format!("{base}/api/robots/{robot}"))
            .send()
            .await
            .unwrap();
        let view: Value = response.json().await.unwrap();
        if accept(&view) {
            return view;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{robot}: gave up waiting, last view {view}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_until_online(http: &reqwest::Client, base: &str, robot: &str) {
    wait_for_view(http, base, robot, |v| {
        v["online"] == true && v["state"].is_object()
    })
    .await;
}

#[tokio::test]
async fn an_http_command_moves_the_robot_with_trace_context_on_the_bus() {
    let broker = start_broker().await;
    // A 3.1.1 subscriber on fleet/# must survive the gateway's MQTT 5 commands.
    let v311 = Watcher::v311(broker.mqtt_addr(), "mosquitto-sub", "fleet/#").await;
    let v5 = Watcher::v5(broker.mqtt_addr(), "mosquitto-sub-v5", "fleet/+/cmd/#").await;
    let _linus = spawn_robot(broker.mqtt_addr(), RobotConfig::linus());
    let _torvalds = spawn_robot(broker.mqtt_addr(), RobotConfig::torvalds());
    let state = fleet_gateway::connect(&config_for(broker.mqtt_addr()));
    wait_until_connected(&state).await;
    let base = serve(state).await;
    let http = reqwest::Client::new();
    wait_until_online(&http, &base, "linus").await;
    wait_until_online(&http, &base, "torvalds").await;

    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let response = http
        .post(format!("{base}/api/robots/linus/commands/drive"))
        .header("traceparent", traceparent)
        .body(r#"{"direction":"forward","hold_ms":3000}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let accepted: Value = response.json().await.unwrap();
    let id = accepted["id"].as_str().unwrap().to_owned();

    let state = v311
        .wait_for_json("fleet/linus/state", |s| s["motion"] == "forward")
        .await;
    assert_eq!(state["last_command"]["id"], id);
    let command = v5
        .wait_for("the command", |m| m.topic == "fleet/linus/cmd/drive")
        .await;
    let property = |name: &str| {
        command
            .user_properties
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let sent_tp = property("traceparent").expect("traceparent user property");
    assert!(
        sent_tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "same trace: {sent_tp}"
    );
    assert_ne!(sent_tp, traceparent, "a new span id for the gateway's hop");
    assert_eq!(property("command-id").as_deref(), Some(id.as_str()));
    assert_eq!(command.json()["direction"], "forward");

    // Plain text bodies work too (torvalds' compass names included).
    let response = http
        .post(format!("{base}/api/robots/torvalds/commands/drive"))
        .body("west")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    v311.wait_for_json("fleet/torvalds/state", |s| s["motion"] == "left")
        .await;

    // The result came back to the gateway and is in its view.
    let view = wait_for_view(&http, &base, "linus", |v| {
        v["last_result"]["id"] == id.as_str()
    })
    .await;
    assert_eq!(view["last_result"]["status"], "ok");

    // The fleet-wide stop reaches both robots.
    let response = http
        .post(format!("{base}/api/fleet/stop"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    v311.wait_for_json("fleet/linus/state", |s| s["motion"] == "stop")
        .await;
    v311.wait_for_json("fleet/torvalds/state", |s| s["motion"] == "stop")
        .await;

    assert!(
        v311.errors().is_empty(),
        "3.1.1 subscriber kept its connection: {:?}",
        v311.errors()
    );
    let robots: Value = http
        .get(format!("{base}/api/robots"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = robots["robots"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["id"].as_str())
        .collect();
    assert_eq!(names, ["linus", "torvalds"]);

    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("fleet_gateway_commands_published_total{command=\"drive\",topic=\"fleet/+/cmd/drive\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("http_requests_total{method=\"POST\",route=\"/api/robots/{robot}/commands/{command}\",status=\"202\"} 2"), "{metrics}");
}

#[tokio::test]
async fn bad_requests_get_json_errors() {
    let broker = start_broker().await;
    let state = fleet_gateway::connect(&config_for(broker.mqtt_addr()));
    wait_until_connected(&state).await;
    let base = serve(state).await;
    let http = reqwest::Client::new();

    let cases = [
        (
            "/api/robots/linus/commands/drive",
            "sideways",
            400,
            "bad_payload",
        ),
        (
            "/api/robots/linus/commands/drive",
            "{\"direction\":",
            400,
            "bad_payload",
        ),
        (
            "/api/robots/linus/commands/servo",
            "{\"servo1\": 300}",
            400,
            "out_of_range",
        ),
        ("/api/robots/linus/commands/drive", "", 400, "bad_payload"),
        (
            "/api/robots/nobody/commands/drive",
            "forward",
            404,
            "unknown_robot",
        ),
        (
            "/api/robots/linus/commands/dance",
            "now",
            404,
            "unknown_command",
        ),
        ("/api/nothing-here", "", 404, "not_found"),
    ];
    for (path, body, status, code) in cases {
        let response = http
            .post(format!("{base}{path}"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{path} {body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["code"], code, "{path} {body}: {error}");
        assert!(error["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let huge = "x".repeat(1024 * 1024);
    let response = http
        .post(format!("{base}/api/robots/linus/commands/drive"))
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["code"], "bad_body");
    let response = http
        .get(format!("{base}/api/robots/nobody"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn router_answers_health_and_refuses_commands_without_a_broker() {
    // Nothing listens on this port: the gateway stays disconnected.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let state = fleet_gateway::connect(&config_for(closed));
    let app = fleet_gateway::app(state);

    let response = app
        .clone()
        .oneshot(Request::get("/health").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = axum::body::to_bytes(response.into_body(), 1 << 16)
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap(),
        json!({"health":"ok"})
    );

    let request = Request::post("/api/robots/linus/commands/stop")
        .body(Body::empty())
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = axum::body::to_bytes(response.into_body(), 1 << 16)
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["code"],
        "broker_unavailable"
    );

    let response = app
        .oneshot(Request::get("/").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let page = String::from_utf8_lossy(&body);
    assert!(page.contains("data-direction=\"forward\"") && page.contains("/api/events"));
}
