//! The guards' rules, table by table.

use super::*;

fn policy(loopback: bool, hosts: &[&str], origins: &[&str]) -> Policy {
    Policy {
        loopback,
        allowed_hosts: hosts.iter().map(|h| h.parse().unwrap()).collect(),
        allowed_origins: origins.iter().map(|o| o.parse().unwrap()).collect(),
    }
}

#[test]
fn loopback_gateways_answer_loopback_names_and_allowed_hosts() {
    let p = policy(true, &["fleet.lan", "pi.local:8080"], &[]);
    for good in [
        "localhost",
        "LOCALHOST:8080",
        "localhost.",
        "127.0.0.1",
        "127.8.9.10:1",
        "[::1]:8080",
        "[::ffff:127.0.0.1]",
        "fleet.lan",
        "fleet.lan:9999",
        "pi.local:8080",
    ] {
        assert!(p.host_allowed(good), "{good}");
    }
    for bad in [
        "evil.example",
        "evil.example:8080",
        "pi.local:8081",
        "pi.local",
        "0.0.0.0:8080",
        "192.168.1.2",
        "localhost.evil.example",
        "127.0.0.1.evil.example",
        "[::1",
        "::1",
        "localhost:80:80",
        "localhost:x",
        "",
        "a b",
        "<not ASCII>",
    ] {
        assert!(!p.host_allowed(bad), "{bad}");
    }
}

#[test]
fn beyond_loopback_the_host_list_applies_only_when_given() {
    assert!(policy(false, &[], &[]).host_allowed("fleet-gateway:8080"));
    let p = policy(false, &["fleet.example.com"], &[]);
    assert!(p.host_allowed("fleet.example.com"));
    assert!(p.host_allowed("localhost:8080"), "kubectl port-forward");
    assert!(!p.host_allowed("evil.example"));
}

#[test]
fn requests_from_other_sites_are_recognised() {
    let p = policy(true, &[], &["https://ops.example.com/"]);
    let headers = |pairs: &[(&'static str, &'static str)]| {
        let mut map = HeaderMap::new();
        map.insert(header::HOST, "127.0.0.1:8080".parse().unwrap());
        for (k, v) in pairs {
            map.insert(*k, v.parse().unwrap());
        }
        map
    };
    let post = Method::POST;
    let get = Method::GET;
    // curl, scripts, the page itself, a typed address.
    assert_eq!(p.foreign(&post, &headers(&[])), None);
    let own = [
        ("origin", "http://127.0.0.1:8080"),
        ("sec-fetch-site", "same-origin"),
    ];
    assert_eq!(p.foreign(&post, &headers(&own)), None);
    assert_eq!(
        p.foreign(&post, &headers(&[("origin", "https://127.0.0.1:8080")])),
        None,
        "behind a TLS proxy"
    );
    assert_eq!(
        p.foreign(&get, &headers(&[("sec-fetch-site", "none")])),
        None
    );
    assert_eq!(
        p.foreign(&post, &headers(&[("origin", "https://OPS.example.com")])),
        None
    );
    assert_eq!(
        p.foreign(&get, &headers(&[("referer", "http://127.0.0.1:8080/?x")])),
        None
    );
    // Other sites.
    for bad in [
        vec![("origin", "http://evil.example")],
        vec![("origin", "null")],
        vec![("origin", "http://127.0.0.1:8081")],
        vec![("sec-fetch-site", "cross-site")],
        vec![("sec-fetch-site", "same-site")],
        vec![
            ("origin", "http://127.0.0.1:8080"),
            ("sec-fetch-site", "cross-site"),
        ],
    ] {
        assert!(p.foreign(&post, &headers(&bad)).is_some(), "{bad:?}");
    }
    let from_evil = headers(&[("referer", "http://evil.example/page")]);
    assert!(p.foreign(&get, &from_evil).is_some());
    assert_eq!(
        p.foreign(&post, &from_evil),
        None,
        "POST is judged by Origin"
    );
    let evil_host = headers(&[("referer", "http://127.0.0.1:8080.evil.example/")]);
    assert!(p.foreign(&get, &evil_host).is_some());
}

#[test]
fn flag_values_are_checked() {
    for good in [
        "fleet.example.com",
        "10.0.0.5:8080",
        "[fd00::1]",
        "[fd00::1]:80",
    ] {
        let pattern: HostPattern = good.parse().unwrap();
        assert_eq!(pattern.to_string(), good);
    }
    for bad in ["", "a/b", "host:", "host:99999", "http://host", "[nope]"] {
        assert!(bad.parse::<HostPattern>().is_err(), "{bad:?}");
    }
    assert_eq!(
        "HTTPS://Fleet.Example.com/"
            .parse::<AllowedOrigin>()
            .unwrap()
            .to_string(),
        "https://fleet.example.com"
    );
    for bad in ["fleet.example.com", "ftp://x", "https://", "https://x/path"] {
        assert!(bad.parse::<AllowedOrigin>().is_err(), "{bad:?}");
    }
}

#[test]
fn buckets_refill_at_the_rate() {
    let limiter = RateLimiter::new(1000.0, 3);
    let client = IpAddr::V4(Ipv4Addr::LOCALHOST);
    assert!((0..3).all(|_| limiter.allow(client)));
    assert!(!limiter.allow(client), "burst used up");
    std::thread::sleep(std::time::Duration::from_millis(5));
    assert!(limiter.allow(client), "refilled");
    assert!(
        limiter.allow(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))),
        "other clients unaffected"
    );
}

#[test]
fn tokens_compare_whole() {
    assert!(same_secret("s3cret", "s3cret"));
    assert!(!same_secret("s3cre", "s3cret"));
    assert!(!same_secret("s3creT", "s3cret"));
}
