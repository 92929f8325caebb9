//! fleet-healthcheck: `fleet-healthcheck 127.0.0.1:8080/health` exits 0 when the URL
//! answers 200 within two seconds (`--timeout-ms`), 1 otherwise. For container health checks in images that
//! have no shell or curl (distroless).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// Container health check: exits 0 when the URL answers HTTP 200 within the timeout,
/// 1 when it does not (the reason on stderr), 2 on bad arguments. Needs no shell or curl.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// What to ask, as host:port/path (plain HTTP), e.g. 127.0.0.1:8080/health for the
    /// gateway or 127.0.0.1:9100/metrics for a robot node.
    target: String,
    /// How long to wait for the connection and for the answer, in ms.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
}

fn check(target: &str, timeout: Duration) -> Result<(), String> {
    let (authority, path) = match target.split_once('/') {
        Some((authority, path)) => (authority, format!("/{path}")),
        None => (target, "/".to_owned()),
    };
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| format!("{authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority}: no address"))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut head = [0u8; 32];
    let n = stream.read(&mut head).map_err(|e| e.to_string())?;
    let status_line = String::from_utf8_lossy(&head[..n]);
    match status_line.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        other => Err(format!("{target}: status {}", other.unwrap_or("none"))),
    }
}

fn main() -> ExitCode {
    // clap exits 2 on bad arguments and 0 after --help / --version.
    let args = Args::parse();
    match check(&args.target, Duration::from_millis(args.timeout_ms)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("unhealthy: {error}");
            ExitCode::FAILURE
        }
    }
}
