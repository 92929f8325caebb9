//! The node's log output stalls: its stderr is a pipe that nobody reads, as when a
//! container runtime's log driver or journald stops reading. The node must keep serving
//! commands and its dead-man must still stop the motors; the lines that did not fit are
//! dropped, and counted in `fleet_log_lines_dropped_total`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleet_testkit::{Watcher, free_port, start_broker};

/// Kills the node when the test ends, whichever way it ends.
struct NodeProcess(Child);

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn scrape(port: u16) -> String {
    reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("metrics endpoint")
        .text()
        .await
        .expect("metrics text")
}

fn metric(exposition: &str, name: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn a_stalled_log_output_stalls_neither_commands_nor_the_dead_man() {
    let broker = start_broker().await;
    let watcher = Watcher::v311(broker.mqtt_addr(), "watcher", "fleet/linus/#").await;
    let metrics_port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_robot-node"))
        .args([
            "--robot",
            "linus",
            "--driver",
            "simulated",
            "--no-discovery",
        ])
        .args(["--broker", &broker.mqtt_addr().to_string()])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .args(["--hold-ms", "300"])
        // Every pin change is a line: the pipe (64 KiB) is full after a few hundred,
        // and the writer's buffer (8,192 lines) soon after.
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("robot-node starts");
    // Holds the pipe's read end open, unread, until the test ends.
    let _node = NodeProcess(child);
    watcher
        .wait_for("online", |m| {
            m.topic == "fleet/linus/status" && m.text() == "online"
        })
        .await;

    const COMMANDS: usize = 4_000;
    for i in 0..COMMANDS {
        let payload = if i % 2 == 0 { "on" } else { "off" };
        watcher.publish("fleet/linus/cmd/eyes", payload).await;
    }
    let results = || {
        watcher
            .messages()
            .iter()
            .filter(|m| m.topic == "fleet/linus/result" && m.json()["command"] == "eyes")
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while results() < COMMANDS && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(results(), COMMANDS, "every command answered");

    // Driving, then no refresh: the dead-man stops the motors.
    watcher.publish("fleet/linus/cmd/drive", "forward").await;
    watcher
        .wait_for_json("fleet/linus/state", |s| s["motion"] == "forward")
        .await;
    let driving = Instant::now();
    watcher
        .wait_for_json("fleet/linus/state", |s| {
            s["motion"] == "stop" && s["last_command"]["command"] == "drive"
        })
        .await;
    assert!(driving.elapsed() < Duration::from_secs(2));

    let exposition = scrape(metrics_port).await;
    let dropped = metric(&exposition, "fleet_log_lines_dropped_total");
    assert!(
        dropped.is_some_and(|n| n > 0.0),
        "dropped lines counted: {dropped:?}"
    );
}
