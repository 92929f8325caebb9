//! Process metrics every fleet binary exports (`process_*`, as the Prometheus client
//! libraries name them), read from `/proc/self` at scrape time.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// Linux reports CPU time in clock ticks; USER_HZ is 100 on every architecture the fleet
/// runs on (x86_64, arm64, armv7).
const TICKS_PER_SECOND: f64 = 100.0;

/// Adds the process collector to `registry`.
pub fn register(registry: &mut Registry) {
    registry.register_collector(Box::new(ProcessCollector));
}

#[derive(Debug)]
struct ProcessCollector;

/// The container's resources, for "CPU vs limit" and "RAM vs request and limit" panels
/// that work without kube-state-metrics. Requests are only known from the environment
/// (the Helm chart sets these from the downward API); limits fall back to the cgroup.
#[derive(Debug, Default, PartialEq)]
struct Resources {
    cpu_request_cores: Option<f64>,
    cpu_limit_cores: Option<f64>,
    memory_request_bytes: Option<f64>,
    memory_limit_bytes: Option<f64>,
}

fn env_number(name: &str) -> Option<f64> {
    std::env::var(name)
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|v: &f64| *v > 0.0)
}

fn resources() -> Resources {
    let cgroup = |file: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/{file}")).ok();
    // cgroup v2 cpu.max is "<quota> <period>" or "max <period>".
    let cgroup_cpu = cgroup("cpu.max").and_then(|text| {
        let mut parts = text.split_whitespace();
        let quota: f64 = parts.next()?.parse().ok()?;
        let period: f64 = parts.next()?.parse().ok()?;
        (period > 0.0).then(|| quota / period)
    });
    let cgroup_memory = cgroup("memory.max").and_then(|text| text.trim().parse::<f64>().ok());
    Resources {
        cpu_request_cores: env_number("FLEET_CPU_REQUEST_MILLICORES").map(|m| m / 1000.0),
        cpu_limit_cores: env_number("FLEET_CPU_LIMIT_MILLICORES")
            .map(|m| m / 1000.0)
            .or(cgroup_cpu),
        memory_request_bytes: env_number("FLEET_MEMORY_REQUEST_BYTES"),
        memory_limit_bytes: env_number("FLEET_MEMORY_LIMIT_BYTES").or(cgroup_memory),
    }
}

#[derive(Debug, Default, PartialEq)]
struct Sample {
    cpu_seconds: f64,
    resident_bytes: f64,
    virtual_bytes: f64,
    start_time_seconds: f64,
    open_fds: f64,
    threads: f64,
}

fn sample() -> Option<Sample> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let boot = std::fs::read_to_string("/proc/stat").ok()?;
    let mut sample = parse(&stat, &status, &boot)?;
    sample.open_fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as f64)
        .unwrap_or(0.0);
    Some(sample)
}

/// Parses `/proc/self/stat`, `/proc/self/status` and `/proc/stat`.
fn parse(stat: &str, status: &str, proc_stat: &str) -> Option<Sample> {
    // The command name (field 2) may contain spaces; the fields after it are plain.
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Field n of the man page is fields[n - 3] here.
    let ticks = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|v| v * 1024.0)
    };
    let boot_time = proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse::<f64>().ok())?;
    Some(Sample {
        cpu_seconds: (ticks(14)? + ticks(15)?) / TICKS_PER_SECOND,
        start_time_seconds: boot_time + ticks(22)? / TICKS_PER_SECOND,
        threads: ticks(20)?,
        resident_bytes: kib("VmRSS:").unwrap_or(0.0),
        virtual_bytes: kib("VmSize:").unwrap_or(0.0),
        open_fds: 0.0,
    })
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        ConstCounter::new(crate::telemetry::dropped_log_lines()).encode(
            encoder.encode_descriptor(
                "fleet_log_lines_dropped",
                "Log lines dropped because the log output (stderr) did not keep up",
                None,
                MetricType::Counter,
            )?,
        )?;
        let Some(s) = sample() else {
            return Ok(());
        };
        let counter = ConstCounter::new(s.cpu_seconds);
        counter.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            MetricType::Counter,
        )?)?;
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                s.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                s.virtual_bytes,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                s.start_time_seconds,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                s.open_fds,
            ),
            (
                "process_threads",
                "Number of OS threads in the process",
                s.threads,
            ),
        ];
        for (name, help, value) in gauges {
            ConstGauge::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)?;
        }
        let r = resources();
        let resources = [
            (
                "fleet_process_cpu_request_cores",
                "CPU request of the container, in cores",
                r.cpu_request_cores,
            ),
            (
                "fleet_process_cpu_limit_cores",
                "CPU limit of the container, in cores",
                r.cpu_limit_cores,
            ),
            (
                "fleet_process_memory_request_bytes",
                "Memory request of the container, in bytes",
                r.memory_request_bytes,
            ),
            (
                "fleet_process_memory_limit_bytes",
                "Memory limit of the container, in bytes",
                r.memory_limit_bytes,
            ),
        ];
        for (name, help, value) in resources {
            if let Some(value) = value {
                let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
                ConstGauge::new(value).encode(metric)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat =
            "42 (robot node) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1000 8000000 500";
        let status = "Name:\trobot-node\nVmSize:\t   7812 kB\nVmRSS:\t    4096 kB\n";
        let proc_stat = "cpu  1 2 3\nbtime 1700000000\n";
        let s = parse(stat, status, proc_stat).unwrap();
        assert_eq!(s.cpu_seconds, 3.0);
        assert_eq!(s.threads, 3.0);
        assert_eq!(s.start_time_seconds, 1_700_000_010.0);
        assert_eq!(s.resident_bytes, 4096.0 * 1024.0);
        assert_eq!(s.virtual_bytes, 7812.0 * 1024.0);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let s = sample().unwrap();
        assert!(s.resident_bytes > 0.0 && s.open_fds > 0.0 && s.start_time_seconds > 1.0e9);
        let mut registry = Registry::default();
        register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("process_cpu_seconds_total "), "{text}");
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
    }
}
