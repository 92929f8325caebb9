//! How the `fleet-broker` binary starts without a users file: like Mosquitto 2, in local
//! only mode when every listener is on loopback, and not at all when it could be reached
//! from elsewhere.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use fleet_testkit::free_port;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

/// An MQTT 3.1.1 CONNECT without credentials; the CONNACK's return code.
async fn anonymous_connack(addr: SocketAddr) -> Option<u8> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let client_id = b"local-only";
    let mut connect = vec![0x10, 12 + client_id.len() as u8];
    connect.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0]);
    connect.push(client_id.len() as u8);
    connect.extend_from_slice(client_id);
    stream.write_all(&connect).await.ok()?;
    let mut connack = [0u8; 4];
    tokio::time::timeout(WAIT, stream.read_exact(&mut connack))
        .await
        .ok()?
        .ok()?;
    (connack[0] == 0x20).then_some(connack[3])
}

#[tokio::test]
async fn without_users_on_loopback_clients_of_this_machine_get_in() {
    let mqtt = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut broker = Command::new(env!("CARGO_BIN_EXE_fleet-broker"))
        .args(["--ws-addr", "off", "--metrics-addr", "off", "--mqtt-addr"])
        .arg(mqtt.to_string())
        .env_remove("FLEET_USERS_FILE")
        .env_remove("FLEET_ALLOW_ANONYMOUS")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let code = loop {
        if let Some(code) = anonymous_connack(mqtt).await {
            break code;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the broker starts in local only mode"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    broker.kill().unwrap();
    let output = broker.wait_with_output().unwrap();
    assert_eq!(code, 0, "an anonymous client on this machine is let in");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(log.contains("local only mode"), "the log says so: {log}");
}

#[tokio::test]
async fn without_users_beyond_loopback_the_broker_refuses_to_start() {
    let output = Command::new(env!("CARGO_BIN_EXE_fleet-broker"))
        .args(["--ws-addr", "off", "--metrics-addr", "off", "--mqtt-addr"])
        .arg(format!("0.0.0.0:{}", free_port()))
        .env_remove("FLEET_USERS_FILE")
        .env_remove("FLEET_ALLOW_ANONYMOUS")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(log.contains("nobody could connect"), "{log}");
}
