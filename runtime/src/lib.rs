//! What every fleet binary shares: logging, shutdown signals, `host:port` parsing and
//! process metrics.

pub mod config;
pub mod exposition;
pub mod handshake_failures;
pub mod http;
pub mod log_limit;
pub mod mqtt_link;
pub mod mqtt_tls;
pub mod process;
pub mod telemetry;

use std::fmt;
use std::str::FromStr;

use fleet_protocol::{TopicPrefix, Topics};

/// The flag every fleet binary has: where in the topic tree the fleet lives.
#[derive(Debug, Clone, clap::Args)]
pub struct TopicArgs {
    /// First topic level of every fleet topic
    #[arg(long, env = "FLEET_TOPIC_PREFIX", default_value = "fleet")]
    pub topic_prefix: TopicPrefix,
}

impl TopicArgs {
    pub fn topics(&self) -> Topics {
        Topics::new(self.topic_prefix.clone())
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM (what `docker stop` and Kubernetes send).
pub async fn shutdown_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("SIGINT: shutting down"),
        () = terminate => tracing::info!("SIGTERM: shutting down"),
    }
}

/// A `host:port` address where the host may be a name (e.g. `broker:1883` in compose).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl FromStr for HostPort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} is not host:port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{s:?} has no host"));
        }
        let port = port
            .parse()
            .map_err(|_| format!("{s:?} has no valid port"))?;
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The value parser of every flag that says where to listen (`--mqtt-addr`,
/// `--http-addr`, ...): an `IP:port`, or a `host:port` whose name is looked up once, at
/// start-up (`localhost:1883` listens on 127.0.0.1, as Mosquitto's `listener 1883
/// localhost` does; an IPv4 address is preferred where the name has both).
pub fn listen_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let hint = "expected IP:port, e.g. 127.0.0.1:1883 (this machine only) or 0.0.0.0:1883 \
                (every interface)";
    let host_port: HostPort = s.parse().map_err(|error| format!("{error}: {hint}"))?;
    let found: Vec<_> = (host_port.host.as_str(), host_port.port)
        .to_socket_addrs()
        .map_err(|error| format!("cannot look up {:?} ({error}): {hint}", host_port.host))?
        .collect();
    found
        .iter()
        .find(|addr| addr.is_ipv4())
        .or(found.first())
        .copied()
        .ok_or_else(|| format!("{:?} has no address: {hint}", host_port.host))
}

/// A `--...-addr` flag that may also be `off`: `None` for `off`, else as [`listen_addr`].
pub fn listen_addr_or_off(flag: &str, value: &str) -> Result<Option<std::net::SocketAddr>, String> {
    if value == "off" {
        return Ok(None);
    }
    listen_addr(value)
        .map(Some)
        .map_err(|error| format!("{flag} {value:?} is not \"off\" and {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_take_ips_and_names() {
        assert_eq!(
            listen_addr("0.0.0.0:1883").unwrap(),
            "0.0.0.0:1883".parse().unwrap()
        );
        assert_eq!(
            listen_addr("[::1]:8080").unwrap(),
            "[::1]:8080".parse().unwrap()
        );
        assert_eq!(
            listen_addr("localhost:1883").unwrap(),
            "127.0.0.1:1883".parse().unwrap()
        );
        for bad in [
            "1883",
            "localhost",
            "localhost:x",
            "no-such-host.invalid:1883",
        ] {
            let error = listen_addr(bad).unwrap_err();
            assert!(error.contains("expected IP:port"), "{bad}: {error}");
        }
    }

    #[test]
    fn parses_host_port() {
        let hp: HostPort = "broker:1883".parse().unwrap();
        assert_eq!((hp.host.as_str(), hp.port), ("broker", 1883));
        let v6: HostPort = "[::1]:1883".parse().unwrap();
        assert_eq!(v6.host, "::1");
        assert_eq!(v6.to_string(), "[::1]:1883");
        for bad in ["broker", ":1883", "broker:x", "broker:70000"] {
            assert!(bad.parse::<HostPort>().is_err(), "{bad}");
        }
    }
}
