//! What control requests (anything that moves a robot) must pass: the bearer token when
//! one is configured, and a per-client rate limit. Read-only routes and the page are open.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::AppState;
use crate::api::ApiError;
use fleet_runtime::log_limit::Admission;

/// Clients tracked by the rate limiter; idle ones are dropped first.
const MAX_CLIENTS: usize = 10_000;

/// A token bucket per client address.
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(per_second: f64, burst: u32) -> Self {
        Self {
            per_second,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `client`; false when it has none left.
    pub fn allow(&self, client: IpAddr) -> bool {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_CLIENTS && !buckets.contains_key(&client) {
            // Full buckets belong to clients that have been quiet: forget them.
            let (per_second, burst) = (self.per_second, self.burst);
            buckets.retain(|_, (tokens, at)| {
                *tokens + at.elapsed().as_secs_f64() * per_second < burst
            });
            if buckets.len() >= MAX_CLIENTS {
                return false;
            }
        }
        let (tokens, at) = buckets.entry(client).or_insert((self.burst, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Compares in time independent of where the strings differ.
fn same_secret(given: &str, expected: &str) -> bool {
    given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

fn client_ip(request: &Request) -> IpAddr {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// Middleware for control routes.
pub async fn control(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(expected) = state.api_token.as_deref()
        && !bearer(request.headers()).is_some_and(|given| same_secret(given, expected))
    {
        state.metrics.record_refusal("unauthorized");
        if let Admission::Log { held_back } = state.log_limit.admit("unauthorized", Instant::now())
        {
            tracing::warn!(client = %client_ip(&request), path = %request.uri().path(), held_back, "control request refused: missing or wrong bearer token");
        }
        let mut response = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this gateway needs a bearer token for control requests (Authorization: Bearer <token>)",
        )
        .into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return response;
    }
    let client = client_ip(&request);
    if !state.limiter.allow(client) {
        state.metrics.record_refusal("rate_limited");
        if let Admission::Log { held_back } = state.log_limit.admit("rate_limited", Instant::now())
        {
            tracing::warn!(%client, path = %request.uri().path(), held_back, "control request refused: over the rate limit");
        }
        let mut response = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many control requests from this client; slow down",
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return response;
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
