//! The robot-node binary's exit status tells a supervisor whether to start it again: a
//! decommissioned node exits with its own status, which the systemd unit
//! (`deploy/robot-node.service`) names in `RestartPreventExitStatus`, so the robot stays
//! out instead of reappearing 2 s later.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleet_testkit::{Watcher, start_broker};

struct NodeProcess(Child);

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_node(broker: std::net::SocketAddr) -> NodeProcess {
    let child = Command::new(env!("CARGO_BIN_EXE_robot-node"))
        .args(["--robot", "linus", "--driver", "simulated"])
        .args(["--broker", &broker.to_string(), "--metrics-addr", "off"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("robot-node starts");
    NodeProcess(child)
}

/// Waits up to 10 s for the process to end; its exit code. (Sleeps on the runtime: the
/// watcher's client must keep running meanwhile.)
async fn exit_code(node: &mut NodeProcess) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(status) = node.0.try_wait().expect("wait for robot-node") {
            return status.code();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("robot-node did not exit");
}

#[tokio::test]
async fn a_decommissioned_node_exits_with_the_status_its_unit_does_not_restart() {
    let unit = include_str!("../../deploy/robot-node.service");
    let code = robot_node::DECOMMISSIONED_EXIT_CODE;
    assert!(
        unit.lines()
            .any(|l| l.trim() == format!("RestartPreventExitStatus={code}")),
        "the systemd unit names exit status {code}"
    );

    let broker = start_broker().await;
    let watcher = Watcher::v311(broker.mqtt_addr(), "watcher", "fleet/linus/#").await;
    let online =
        |m: &fleet_testkit::Message| m.topic == "fleet/linus/status" && m.text() == "online";

    let mut node = start_node(broker.mqtt_addr());
    watcher.wait_for("online", online).await;
    watcher.publish("fleet/linus/cmd/decommission", "").await;
    assert_eq!(exit_code(&mut node).await, Some(i32::from(code)));

    // A clean stop (SIGTERM, as `systemctl stop` sends) is status 0.
    watcher.clear();
    let mut node = start_node(broker.mqtt_addr());
    watcher.wait_for("online again", online).await;
    let pid = node.0.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status();
    assert!(killed.is_ok_and(|s| s.success()), "SIGTERM sent");
    assert_eq!(exit_code(&mut node).await, Some(0));
}
