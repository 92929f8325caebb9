//! The robot prober (the original URL prober, now for robots): pings every known robot on
//! an interval, first once the gateway is connected and the robots have had a moment to
//! come online, with a timeout that counts as down.

use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use fleet_protocol::{Command, CommandEnvelope, CommandKind, RobotId};
use serde::Serialize;

use crate::AppState;
use crate::commands::{self, Sent, Target};

#[derive(Debug, Clone, Serialize)]
pub struct ProbeResult {
    pub robot: String,
    pub up: bool,
    /// How long the robot took to answer (the timeout when it did not), in ms.
    pub response_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Pings every known robot at once and waits for all answers (or timeouts).
pub async fn probe_all(state: &AppState) -> Vec<ProbeResult> {
    let robots: Vec<String> = state.fleet.robots().into_iter().map(|r| r.id).collect();
    let probes = robots.into_iter().map(|robot| probe_one(state, robot));
    futures_util::future::join_all(probes).await
}

async fn probe_one(state: &AppState, robot: String) -> ProbeResult {
    let started = Instant::now();
    let outcome = match RobotId::new(&robot) {
        Ok(id) => {
            let target = Target {
                topic: state.fleet.topics().command(&id, CommandKind::Ping),
                template: format!("{}/+/cmd/ping", state.fleet.topics().prefix()),
                // The robot answers on its own reply topic, and only its answer counts.
                robot: Some(id),
            };
            let envelope = CommandEnvelope::new(Command::Ping);
            commands::send(
                state,
                target,
                envelope,
                &HeaderMap::new(),
                Some(state.probe_timeout),
            )
            .await
            .map_err(|e| e.message().to_owned())
        }
        Err(e) => Err(e.to_string()),
    };
    let took = started.elapsed();
    let (up, error) = match outcome {
        Ok(Sent::Answered(result)) if result["status"] == "ok" => (true, None),
        Ok(Sent::Answered(result)) => (false, Some(format!("robot answered {result}"))),
        Ok(Sent::Accepted { .. }) => (false, Some("no answer awaited".to_owned())),
        Err(error) => (false, Some(error)),
    };
    let took = if up {
        took
    } else {
        took.max(state.probe_timeout)
    };
    state.metrics.record_probe(&robot, up, took);
    ProbeResult {
        robot,
        up,
        response_ms: took.as_secs_f64() * 1000.0,
        error,
    }
}

/// The longest the first probe waits, once the broker link is up, for the known robots to
/// say they are online.
const START_GRACE: Duration = Duration::from_secs(5);

/// Probes every `interval`, first as soon as the gateway can tell (so the gauges have
/// values from the start): once its broker link is up and every known robot has said it
/// is online, or `START_GRACE` after that. A probe sent before then reported robots down
/// that were only still connecting (the all-in-one starts its robots with the gateway).
pub fn spawn(state: AppState, interval: Duration) {
    tokio::spawn(async move {
        let mut link = state.fleet.link();
        if link.wait_for(|up| *up).await.is_err() {
            return;
        }
        let grace_over = tokio::time::Instant::now() + START_GRACE;
        while tokio::time::Instant::now() < grace_over
            && state
                .fleet
                .robots()
                .iter()
                .any(|robot| robot.online != Some(true))
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let results = probe_all(&state).await;
            let down: Vec<&str> = results
                .iter()
                .filter(|r| !r.up)
                .map(|r| r.robot.as_str())
                .collect();
            if down.is_empty() {
                tracing::debug!(robots = results.len(), "probe: every robot answered");
            } else {
                tracing::info!(?down, "probe: robots not answering");
            }
        }
    });
}
