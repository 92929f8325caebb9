//! The gateway fails over to a broker that allows fewer messages in flight than the one
//! before (another broker behind the same address, with other settings) and keeps
//! publishing: no command lost, no reconnect loop.

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::time::Duration;

use fleet_broker::BrokerConfig;
use fleet_gateway::GatewayConfig;
use fleet_protocol::RobotId;
use fleet_testkit::{TcpProxy, WAIT, Watcher};

async fn broker_with_window(in_flight: u16) -> fleet_broker::RunningBroker {
    fleet_broker::start(BrokerConfig {
        mqtt_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        max_inflight: NonZeroU16::new(in_flight).unwrap(),
        ..BrokerConfig::default()
    })
    .await
    .unwrap()
}

async fn wait_for_count(watcher: &Watcher, count: usize, what: &str) {
    let deadline = tokio::time::Instant::now() + WAIT * 4;
    while watcher.messages().len() < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {} of {count} commands arrived",
            watcher.messages().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn commands_keep_flowing_after_failing_over_to_a_smaller_window() {
    let first = broker_with_window(1024).await;
    let second = broker_with_window(20).await;
    let proxy = TcpProxy::start(first.mqtt_addr()).await;
    let on_first = Watcher::v5(first.mqtt_addr(), "seen-first", "fleet/ghost/cmd/#").await;
    let on_second = Watcher::v5(second.mqtt_addr(), "seen-second", "fleet/ghost/cmd/#").await;

    let mut config = GatewayConfig::new(proxy.addr().ip().to_string(), proxy.addr().port());
    config.robots = vec![RobotId::new("ghost").unwrap()];
    config.probe_interval = None;
    config.rate_limit = 1_000_000.0;
    config.rate_burst = 1_000_000;
    let state = fleet_gateway::connect(&config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(fleet_gateway::serve(
        listener,
        state.clone(),
        std::future::pending(),
    ));
    let http = reqwest::Client::new();
    let send = |n: usize| {
        let http = http.clone();
        let url = format!("{base}/api/robots/ghost/commands/eyes");
        async move {
            let response = http
                .post(url)
                .header("content-type", "application/json")
                .body(format!(
                    r#"{{"state":"{}"}}"#,
                    if n.is_multiple_of(2) { "on" } else { "off" }
                ))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 202, "command {n}");
        }
    };
    let connected = |expect: bool| {
        let state = state.clone();
        async move {
            let deadline = tokio::time::Instant::now() + WAIT * 2;
            while state.fleet.is_connected() != expect {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "connected: {expect}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    connected(true).await;

    // Packet ids climb to 300 on the first broker.
    const BEFORE: usize = 300;
    for n in 0..BEFORE {
        send(n).await;
    }
    wait_for_count(&on_first, BEFORE, "first broker").await;
    // Let the last acknowledgements come back before the link goes.
    tokio::time::sleep(Duration::from_millis(200)).await;

    proxy.fail_over_to(second.mqtt_addr());
    connected(false).await;
    connected(true).await;

    // More commands than the gateway's own in-flight table (1,024) holds: without fresh
    // packet ids they climb past it and every publish after that breaks the connection.
    const AFTER: usize = 1_500;
    for n in 0..AFTER {
        send(n).await;
    }
    wait_for_count(&on_second, AFTER, "second broker").await;
    assert!(state.fleet.is_connected());
    assert_eq!(on_second.messages().len(), AFTER, "no command twice");
}
