//! Click-to-result load: `POST /api/robots/<robot>/commands/<command>?wait=true` at a fixed
//! rate (open loop: each request goes out at its own time in a task of its own, whatever
//! the previous ones did), and the latency percentiles of the answers, from the moment
//! each request was handed to the HTTP client. (Counting from the scheduled time instead
//! would add the timer's own millisecond granularity to every sample.) Used by
//! `bench/click-to-result.sh`.
//!
//! cargo run --release -p fleet-gateway --example click_load -- \
//!     http://127.0.0.1:8080 linus 1000 10

use std::time::Duration;

use tokio::time::Instant;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [base, robot, rate, seconds] = args.as_slice() else {
        return Err(
            "usage: click_load <gateway-url> <robot> <commands-per-second> <seconds>".into(),
        );
    };
    let rate: f64 = rate.parse()?;
    let seconds: f64 = seconds.parse()?;
    let url = format!("{base}/api/robots/{robot}/commands/eyes?wait=true");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(10))
        .build()?;

    // Warm up: open connections, let the robot and the gateway settle.
    for _ in 0..50 {
        let _ = client.post(&url).body("on").send().await;
    }

    let total = (rate * seconds).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now() + Duration::from_millis(100);
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..total {
        let due = start + interval.mul_f64(n as f64);
        tokio::time::sleep_until(due).await;
        let sent = Instant::now();
        let request = client
            .post(&url)
            .body(if n % 2 == 0 { "on" } else { "off" })
            .send();
        tasks.spawn(async move {
            let outcome = match request.await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let body = response.text().await.unwrap_or_default();
                    if status == 200 && body.contains("\"status\":\"ok\"") {
                        Ok(())
                    } else {
                        Err(status)
                    }
                }
                Err(_) => Err(0),
            };
            (sent.elapsed(), outcome)
        });
    }
    let mut latencies = Vec::with_capacity(total as usize);
    let mut failures: std::collections::BTreeMap<u16, u64> = Default::default();
    while let Some(joined) = tasks.join_next().await {
        let (latency, outcome) = joined?;
        match outcome {
            Ok(()) => latencies.push(latency),
            Err(status) => *failures.entry(status).or_default() += 1,
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pick = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    };
    let failures: Vec<String> = failures
        .iter()
        .map(|(status, n)| format!("\"{status}\":{n}"))
        .collect();
    println!(
        "{{\"offered_per_s\":{rate},\"sent\":{total},\"ok\":{},\"failed\":{{{}}},\"achieved_per_s\":{:.0},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"p999_ms\":{:.3},\"max_ms\":{:.3}}}",
        latencies.len(),
        failures.join(","),
        latencies.len() as f64 / elapsed,
        pick(0.5),
        pick(0.99),
        pick(0.999),
        latencies
            .last()
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0),
    );
    Ok(())
}
