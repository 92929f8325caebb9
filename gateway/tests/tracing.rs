//! One trace per click: the gateway's HTTP span, its MQTT producer span, the robot's
//! consumer span and the driver span, parent to child, exported over OTLP/HTTP to a real
//! receiver. Its own test binary: the tracing subscriber is global to the process.

use std::time::Duration;

use fleet_gateway::GatewayConfig;
use fleet_protocol::RobotId;
use fleet_runtime::telemetry::{self, TelemetryConfig};
use fleet_testkit::{OtlpReceiver, ReceivedSpan, Watcher, start_broker};
use robot_node::{BrokerAddress, NodeConfig, RobotConfig, SimulatedDriver};

// Multi-threaded: flushing blocks a thread while the receiver (on this runtime) answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_click_is_one_trace_from_http_to_the_driver() {
    let receiver = OtlpReceiver::start().await;
    let telemetry = telemetry::init_with(TelemetryConfig {
        service_name: "fleet-test".into(),
        otlp_traces_endpoint: Some(receiver.traces_url().to_owned()),
        export_interval: Duration::from_millis(100),
    });
    assert!(telemetry.exporting());

    let broker = start_broker().await;
    let watcher = Watcher::v5(broker.mqtt_addr(), "watcher", "fleet/#").await;
    let address = BrokerAddress {
        host: "127.0.0.1".into(),
        port: broker.mqtt_addr().port(),
    };
    let _linus = robot_node::spawn(
        NodeConfig::new(RobotConfig::linus(), address),
        Box::new(SimulatedDriver::new("linus")),
        Default::default(),
    );
    watcher
        .wait_for("linus online", |m| {
            m.topic == "fleet/linus/status" && m.text() == "online"
        })
        .await;
    let mut config = GatewayConfig::new("127.0.0.1", broker.mqtt_addr().port());
    config.robots = vec![RobotId::new("linus").unwrap()];
    let state = fleet_gateway::connect(&config);
    while !state.fleet.is_connected() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(fleet_gateway::serve(
        listener,
        state,
        std::future::pending(),
    ));

    let browser_trace = "5b8efff798038103d269b633813fc60c";
    let browser_span = "eee19b7ec3c1b174";
    let response = reqwest::Client::new()
        .post(format!("{base}/api/robots/linus/commands/drive"))
        .header(
            "traceparent",
            format!("00-{browser_trace}-{browser_span}-01"),
        )
        .body("forward")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let result = watcher
        .wait_for("the result", |m| {
            m.topic.ends_with("/result") && m.json()["command"] == "drive"
        })
        .await;
    assert_eq!(result.json()["status"], "ok");
    telemetry.flush();

    let in_trace = |s: &ReceivedSpan| s.trace_id == browser_trace;
    let http = receiver
        .wait_for("http server", |s| {
            in_trace(s) && s.kind == ReceivedSpan::SERVER
        })
        .await;
    assert_eq!(
        http.parent_span_id, browser_span,
        "continues the browser's span"
    );
    assert_eq!(http.name, "POST /api/robots/{robot}/commands/{command}");
    let producer = receiver
        .wait_for("producer", |s| {
            in_trace(s) && s.kind == ReceivedSpan::PRODUCER
        })
        .await;
    assert_eq!(producer.parent_span_id, http.span_id);
    assert_eq!(producer.name, "send fleet/+/cmd/drive");
    assert_eq!(producer.attribute("messaging.system"), Some("mqtt"));
    assert_eq!(
        producer.attribute("messaging.destination.name"),
        Some("fleet/linus/cmd/drive")
    );
    let consumer = receiver
        .wait_for("consumer", |s| {
            in_trace(s) && s.kind == ReceivedSpan::CONSUMER
        })
        .await;
    assert_eq!(
        consumer.parent_span_id, producer.span_id,
        "the robot continues the gateway's span"
    );
    assert_eq!(consumer.name, "process fleet/+/cmd/drive");
    assert_eq!(
        consumer.attribute("messaging.message.id"),
        producer.attribute("messaging.message.id")
    );
    let driver = receiver
        .wait_for("driver", |s| in_trace(s) && s.name == "driver")
        .await;
    assert_eq!(driver.parent_span_id, consumer.span_id);
    assert_eq!(driver.service, "fleet-test");

    // An MQTT 3.1.1 sender puts traceparent in the JSON payload instead.
    let v311 = Watcher::v311(broker.mqtt_addr(), "v311", "fleet/linus/result").await;
    let trace = "0af7651916cd43dd8448eb211c80319c";
    v311.publish(
        "fleet/linus/cmd/eyes",
        format!(r#"{{"state":"blink","traceparent":"00-{trace}-b7ad6b7169203331-01"}}"#),
    )
    .await;
    v311.wait_for("the eyes result", |m| m.json()["command"] == "eyes")
        .await;
    telemetry.flush();
    let consumer = receiver
        .wait_for("3.1.1 consumer", |s| {
            s.trace_id == trace && s.kind == ReceivedSpan::CONSUMER
        })
        .await;
    assert_eq!(consumer.parent_span_id, "b7ad6b7169203331");
}
