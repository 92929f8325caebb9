//! Wrong passwords from many addresses at once, against the real broker over TCP. Each
//! check is argon2 (slow, 19 MiB on purpose): a flood used to take the broker from 48 to
//! 560 MiB, keep a reconnecting robot off the bus for 20 s, and tell unknown usernames
//! apart by their answer time. One test in this file, so that the memory it measures is
//! the flood's alone.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fleet_broker::BrokerConfig;
use fleet_testkit::raw::{Connect, read_packet};
use fleet_testkit::{WAIT, metric, rss_mib};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

async fn from_address(ip: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((ip, 0))).unwrap();
    socket.connect(to).await.unwrap()
}

/// The CONNACK code for `connect` sent from `ip`, and how long it took.
async fn attempt(ip: [u8; 4], to: SocketAddr, connect: &Connect<'_>) -> (u8, Duration) {
    let started = Instant::now();
    let mut stream = from_address(ip, to).await;
    stream.write_all(&connect.encode()).await.unwrap();
    let code = match read_packet(&mut stream, Duration::from_secs(30)).await {
        Some((0x20, body)) => body.get(1).copied().unwrap_or(0xff),
        _ => 0xff,
    };
    (code, started.elapsed())
}

fn v5<'a>(client_id: &'a str, login: (&'static str, &'static str)) -> Connect<'a> {
    Connect {
        v5: true,
        client_id,
        login: Some(login),
        ..Connect::default()
    }
}

#[tokio::test]
async fn wrong_password_floods_take_no_memory_and_keep_robots_in() {
    let broker = fleet_testkit::start_secured_broker(
        &[("linus", "robot"), ("torvalds", "robot")],
        BrokerConfig::default(),
    )
    .await;
    let addr = broker.mqtt_addr();
    let http = broker.http_addr().unwrap();

    // linus has logged in before: its password is verified.
    let linus = v5("robot-linus", ("linus", "linus-pw"));
    assert_eq!(attempt([127, 0, 0, 1], addr, &linus).await.0, 0);
    let before = rss_mib();

    // 32 addresses, each with 4 wrong passwords in flight, 5 rounds.
    let flood = tokio::spawn(async move {
        let mut codes = Vec::new();
        for _round in 0..5 {
            let mut attempts = tokio::task::JoinSet::new();
            for host in 1..=32u8 {
                for n in 0..4 {
                    attempts.spawn(async move {
                        let id = format!("mallory-{host}-{n}");
                        attempt([127, 0, 1, host], addr, &v5(&id, ("linus", "guess")))
                            .await
                            .0
                    });
                }
            }
            while let Some(code) = attempts.join_next().await {
                codes.push(code.unwrap());
            }
        }
        codes
    });

    // Meanwhile linus reconnects every 100 ms; torvalds logs in for the first time.
    let mut slowest = Duration::ZERO;
    let mut reconnects = 0;
    let mut torvalds_in = None;
    let started = Instant::now();
    while !flood.is_finished() {
        let (code, took) = attempt([127, 0, 0, 1], addr, &linus).await;
        assert_eq!(code, 0, "linus is refused during the flood");
        slowest = slowest.max(took);
        reconnects += 1;
        if torvalds_in.is_none() {
            let torvalds = v5("robot-torvalds", ("torvalds", "torvalds-pw"));
            if attempt([127, 0, 0, 1], addr, &torvalds).await.0 == 0 {
                torvalds_in = Some(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let codes = flood.await.unwrap();
    let during = rss_mib();
    assert!(codes.iter().all(|&c| c >= 0x80), "a wrong password got in");
    assert_eq!(codes.len(), 640);
    assert!(
        slowest < Duration::from_millis(500),
        "a reconnecting robot waited {slowest:?}"
    );
    let torvalds_in = torvalds_in.expect("a robot's first login got through during the flood");
    let counted = |reason: &'static str| {
        metric(
            http,
            Box::leak(
                format!("fleet_broker_auth_failures_total{{reason=\"{reason}\"}}").into_boxed_str(),
            ),
        )
    };
    let (checked, throttled, busy) = (
        counted("bad_credentials").await,
        counted("throttled").await,
        counted("busy").await,
    );
    eprintln!(
        "login flood: {} wrong passwords from 32 addresses: {checked} checked, {throttled} \
         throttled, {busy} busy; linus reconnected {reconnects} times, slowest {slowest:?}; \
         torvalds' first login after {torvalds_in:?}; RSS {before:.1} -> {during:.1} MiB",
        codes.len()
    );
    assert!(
        during - before < 100.0,
        "the flood took {:.1} MiB",
        during - before
    );
    assert!(throttled > 0.0, "addresses that failed often had to wait");

    // An unknown user is answered as slowly as a known one with a wrong password: the
    // answer time does not tell which usernames exist. One fresh address per attempt.
    let mut unknown = Vec::new();
    let mut known = Vec::new();
    for n in 0..5u8 {
        let (code, took) = attempt([127, 0, 2, n + 1], addr, &v5("who", ("nobody", "x"))).await;
        assert_eq!(code, 0x86);
        unknown.push(took);
        let (code, took) = attempt([127, 0, 2, n + 101], addr, &v5("who", ("linus", "x"))).await;
        assert_eq!(code, 0x86);
        known.push(took);
    }
    unknown.sort();
    known.sort();
    let ratio = unknown[2].as_secs_f64() / known[2].as_secs_f64();
    eprintln!(
        "login timing: unknown user {:?}, known user with a wrong password {:?} (median)",
        unknown[2], known[2]
    );
    assert!(
        (0.5..2.0).contains(&ratio),
        "unknown {:?} vs known {:?}",
        unknown[2],
        known[2]
    );

    // One address that keeps guessing is refused without a check, at once.
    let guesser = [127, 0, 3, 1];
    for _ in 0..5 {
        assert_eq!(
            attempt(guesser, addr, &v5("g", ("linus", "x"))).await.0,
            0x86
        );
    }
    let (code, took) = attempt(guesser, addr, &v5("g", ("linus", "x"))).await;
    assert_eq!(code, 0x9f, "connection rate exceeded");
    assert!(took < WAIT);
}
