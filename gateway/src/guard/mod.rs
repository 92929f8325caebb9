//! What requests must pass before they reach a handler.
//!
//! - Every route but health and metrics: the `Host` header must name this gateway
//!   ([`host`]): on a loopback address only loopback names and `--allowed-hosts`, so that
//!   a web page whose DNS name is switched to 127.0.0.1 (DNS rebinding) is refused.
//! - Control routes (anything that moves a robot, [`control`]): no request from another
//!   web site (`Origin`, `Sec-Fetch-Site`, and for GET the `Referer`), the bearer token
//!   or an operator's `<name>:<token>` when configured (a viewer is refused), and a
//!   per-client rate limit. The operator is known to the handlers below
//!   ([`current_operator`]), so that every command carries the name.
//! - Stops ([`stop`]) pass without any of that: a stop is never refused (anyone who can
//!   reach the gateway can stop the robots, like pressing a physical e-stop button, and a
//!   hostile page can only make them stop), but each is counted and logged with the
//!   client address.
//!
//! Read-only routes and the page need no token.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::AppState;
use crate::api::ApiError;
use crate::operators::{Operator, OperatorRole};
use fleet_runtime::log_limit::{Admission, quoted};

/// `Sec-Fetch-Site`: where the browser says the request comes from (`same-origin`,
/// `same-site`, `cross-site`, or `none` for an address typed or bookmarked).
const SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");

/// The longest header value quoted in a log line.
const MAX_LOGGED: usize = 100;

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
pub(crate) fn same_secret(given: &str, expected: &str) -> bool {
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

/// Which `Host` values and web origins this gateway answers control requests from.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// The gateway listens on a loopback address: only loopback names and
    /// `allowed_hosts` may appear in `Host`.
    pub loopback: bool,
    /// `--allowed-hosts`. Beyond loopback they are enforced only when there are some: the
    /// gateway cannot know every name it is reached by (Service names, an Ingress host,
    /// node addresses), and there the bearer token, required beyond loopback, is what
    /// keeps strangers out.
    pub allowed_hosts: Vec<HostPattern>,
    /// `--allowed-origins`: pages besides the gateway's own that may send control
    /// requests.
    pub allowed_origins: Vec<AllowedOrigin>,
}

impl Policy {
    /// The same policy for a gateway serving on `addr`.
    pub fn for_listener(&self, addr: SocketAddr) -> Self {
        Self {
            loopback: addr.ip().is_loopback(),
            ..self.clone()
        }
    }

    /// Whether a `Host` header value (or a request target's authority) names this
    /// gateway. Loopback names are always fine: a page can only make a browser send them
    /// from the operator's own machine, never through DNS.
    pub fn host_allowed(&self, host: &str) -> bool {
        let Some((name, port)) = split_host(host) else {
            return false;
        };
        is_loopback_name(&name)
            || self.allowed_hosts.iter().any(|p| p.matches(&name, port))
            || (!self.loopback && self.allowed_hosts.is_empty())
    }

    /// Whether `origin` (`scheme://host[:port]`) is the gateway's own (the request's
    /// `Host`, over http or https: behind a TLS proxy the page is https) or allowed.
    fn own_origin(&self, origin: &str, host: Option<&str>) -> bool {
        let origin = origin.trim().to_ascii_lowercase();
        if self.allowed_origins.iter().any(|o| o.0 == origin) {
            return true;
        }
        let Some(host) = host else {
            return false;
        };
        let host = host.trim().to_ascii_lowercase();
        ["http://", "https://"]
            .iter()
            .any(|scheme| origin.strip_prefix(scheme) == Some(host.as_str()))
    }

    /// What makes `headers` look like a request another web site made the browser send,
    /// if anything. Requests without `Origin` and `Sec-Fetch-*` (curl, scripts) pass.
    fn foreign(&self, method: &Method, headers: &HeaderMap) -> Option<String> {
        let text = |name: HeaderName| {
            headers
                .get(name)
                .map(|v| v.to_str().unwrap_or("<not ASCII>").to_owned())
        };
        let host = text(header::HOST);
        if let Some(origin) = text(header::ORIGIN)
            && !self.own_origin(&origin, host.as_deref())
        {
            return Some(format!("Origin: {origin}"));
        }
        match text(SEC_FETCH_SITE) {
            Some(site) if matches!(site.as_str(), "cross-site" | "same-site") => {
                Some(format!("Sec-Fetch-Site: {site}"))
            }
            Some(_) => None,
            // A browser without Fetch Metadata (older Safari): a link or an <img> on
            // another page still names that page in Referer (unless it hides it).
            None if method == Method::GET || method == Method::HEAD => {
                let referer = text(header::REFERER)?;
                let own = origin_of_url(&referer)
                    .is_some_and(|origin| self.own_origin(origin, host.as_deref()));
                (!own).then(|| format!("Referer: {referer}"))
            }
            None => None,
        }
    }
}

/// An entry of `--allowed-hosts`: a host name or address, with or without a port
/// (`fleet.example.com`, `192.168.1.20:8080`, `[fd00::1]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    name: String,
    port: Option<u16>,
}

impl HostPattern {
    fn matches(&self, name: &str, port: Option<u16>) -> bool {
        self.name == name && (self.port.is_none() || self.port == port)
    }
}

impl FromStr for HostPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, port) = split_host(s)
            .ok_or_else(|| format!("{s:?} is not a host name or address, with or without :port"))?;
        Ok(Self { name, port })
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = if self.name.contains(':') {
            format!("[{}]", self.name)
        } else {
            self.name.clone()
        };
        match self.port {
            Some(port) => write!(f, "{name}:{port}"),
            None => f.write_str(&name),
        }
    }
}

/// An entry of `--allowed-origins`: `http://host[:port]` or `https://host[:port]`, as a
/// browser sends it in `Origin` (no path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedOrigin(String);

impl FromStr for AllowedOrigin {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let origin = s.trim().trim_end_matches('/').to_ascii_lowercase();
        let valid = ["http://", "https://"]
            .iter()
            .find_map(|scheme| origin.strip_prefix(scheme))
            .is_some_and(|authority| split_host(authority).is_some());
        if valid {
            Ok(Self(origin))
        } else {
            Err(format!(
                "{s:?} is not an origin (http://host[:port] or https://host[:port])"
            ))
        }
    }
}

impl fmt::Display for AllowedOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Splits `host[:port]` / `[v6][:port]` into a lower-case name (no brackets, no final
/// dot) and the port. `None` for anything else.
fn split_host(value: &str) -> Option<(String, Option<u16>)> {
    let value = value.trim();
    let (name, port) = match value.strip_prefix('[') {
        Some(rest) => {
            let (inside, after) = rest.split_once(']')?;
            inside.parse::<std::net::Ipv6Addr>().ok()?;
            (inside, after)
        }
        None => value.find(':').map_or((value, ""), |i| value.split_at(i)),
    };
    let port = match port {
        "" => None,
        port => Some(port.strip_prefix(':')?.parse::<u16>().ok()?),
    };
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':');
    (!name.is_empty() && name.chars().all(valid)).then_some((name, port))
}

fn is_loopback_name(name: &str) -> bool {
    name == "localhost"
        || name
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// `scheme://authority` of an absolute URL.
fn origin_of_url(url: &str) -> Option<&str> {
    let after_scheme = url.find("://")? + 3;
    let end = url[after_scheme..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| after_scheme + i);
    Some(&url[..end])
}

/// Counts, logs (a few per window) and answers a refused request.
fn refuse(
    state: &AppState,
    request: &Request,
    status: StatusCode,
    code: &'static str,
    message: &'static str,
    detail: Option<&str>,
) -> Response {
    state.metrics.record_refusal(code);
    if let Admission::Log { held_back } = state.log_limit.admit(code, Instant::now()) {
        let detail = detail.map(|d| quoted(d, MAX_LOGGED)).unwrap_or_default();
        tracing::warn!(client = %client_ip(request), path = %request.uri().path(), %detail, held_back, "request refused: {message}");
    }
    ApiError::new(status, code, message).into_response()
}

/// Middleware for every route but health and metrics (which probes and scrapers reach
/// by address, and which carry no control and no robot state): the `Host` must name
/// this gateway.
pub async fn host(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let headers = request.headers().get_all(header::HOST);
    let mut names = headers
        .iter()
        .map(|v| v.to_str().unwrap_or("<not ASCII>").to_owned())
        .chain(request.uri().authority().map(ToString::to_string));
    let several = headers.iter().nth(1).is_some();
    // No Host at all is no browser (every browser sends one): curl -0, raw sockets.
    if let Some(bad) = names.find(|name| several || !state.guard.host_allowed(name)) {
        return refuse(
            &state,
            &request,
            StatusCode::MISDIRECTED_REQUEST,
            "forbidden_host",
            "this gateway does not answer to that Host name (see --allowed-hosts)",
            Some(&bad),
        );
    }
    next.run(request).await
}

/// Middleware for control routes: no other web site, the token, the rate limit.
pub async fn control(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(foreign) = state.guard.foreign(request.method(), request.headers()) {
        return refuse(
            &state,
            &request,
            StatusCode::FORBIDDEN,
            "forbidden_origin",
            "control requests from other web sites are refused (see --allowed-origins)",
            Some(&foreign),
        );
    }
    // Owned: the request's body is not `Sync`, so no reference to it crosses an await.
    let given = bearer(request.headers()).map(str::to_owned);
    match identify(&state, given.as_deref(), client_ip(&request)).await {
        Identity::Operator(operator) if operator.role < OperatorRole::Operator => {
            return refuse(
                &state,
                &request,
                StatusCode::FORBIDDEN,
                "forbidden_role",
                "this operator's role (viewer) may not send control requests",
                Some(&operator.name),
            );
        }
        Identity::Operator(operator) => return run_as(Some(operator), &state, request, next).await,
        Identity::TokenHolder | Identity::Open => {}
        Identity::Throttled => {
            return rate_limited(
                &state,
                &request,
                "too many failed logins from this client; wait a minute",
                "60",
            );
        }
        Identity::Nobody => {
            let mut response = refuse(
                &state,
                &request,
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this gateway needs a bearer token for control requests (Authorization: Bearer <token>, or <name>:<token> for an operator)",
                None,
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return response;
        }
    }
    run_as(None, &state, request, next).await
}

tokio::task_local! {
    /// The operator the request being handled comes from (set by the guards), so that
    /// every command sent on its behalf carries the name, whatever route sent it.
    static OPERATOR: Option<Operator>;
}

/// The operator of the request being handled, if a guard identified one.
pub fn current_operator() -> Option<Operator> {
    OPERATOR.try_with(Clone::clone).ok().flatten()
}

/// The rest of a control request, on behalf of `operator` (still rate-limited).
async fn run_as(
    operator: Option<Operator>,
    state: &AppState,
    request: Request,
    next: Next,
) -> Response {
    if !state.limiter.allow(client_ip(&request)) {
        return rate_limited(
            state,
            &request,
            "too many control requests from this client; slow down",
            "1",
        );
    }
    OPERATOR.scope(operator, next.run(request)).await
}

/// `429 rate_limited` with the seconds to wait in `Retry-After`.
fn rate_limited(
    state: &AppState,
    request: &Request,
    message: &'static str,
    retry_after: &'static str,
) -> Response {
    let mut response = refuse(
        state,
        request,
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        message,
        None,
    );
    response.headers_mut().insert(
        header::RETRY_AFTER,
        header::HeaderValue::from_static(retry_after),
    );
    response
}

/// Middleware for stops: nothing is checked (no Host, origin, token or rate limit: a
/// stop is never refused), every one is counted and logged with who sent it.
pub async fn stop(State(state): State<AppState>, request: Request, next: Next) -> Response {
    // Who sent it, if the credential was checked before: a stop never waits for argon2.
    let operator = match (&state.operators, bearer(request.headers())) {
        (Some(operators), Some(given)) => operators.cached(given),
        _ => None,
    };
    let authenticated = operator.is_some()
        || state.api_token.as_deref().is_some_and(|expected| {
            bearer(request.headers()).is_some_and(|given| same_secret(given, expected))
        });
    state.metrics.record_estop(authenticated);
    if let Admission::Log { held_back } = state.log_limit.admit("estop", Instant::now()) {
        tracing::info!(client = %client_ip(&request), path = %request.uri().path(), authenticated, held_back, "e-stop requested");
    }
    OPERATOR.scope(operator, next.run(request)).await
}

/// Who a control request comes from.
enum Identity {
    /// A named operator whose token checked out.
    Operator(Operator),
    /// The holder of `--api-token` (a shared secret: treated as an admin).
    TokenHolder,
    /// Neither a token nor operators are configured: anyone may.
    Open,
    /// Credentials missing or wrong.
    Nobody,
    /// Too many failed operator logins from this address lately.
    Throttled,
}

async fn identify(state: &AppState, given: Option<&str>, client: IpAddr) -> Identity {
    if let (Some(expected), Some(given)) = (state.api_token.as_deref(), given)
        && same_secret(given, expected)
    {
        return Identity::TokenHolder;
    }
    let Some(operators) = &state.operators else {
        return if state.api_token.is_some() {
            Identity::Nobody
        } else {
            Identity::Open
        };
    };
    let Some(given) = given else {
        return Identity::Nobody;
    };
    if let Some(operator) = operators.cached(given) {
        return Identity::Operator(operator);
    }
    // A token not seen before costs an argon2 check: only so many failures per address.
    if state.login_failures.blocked(client, Instant::now()) {
        return Identity::Throttled;
    }
    match operators.authenticate(given).await {
        Some(operator) => Identity::Operator(operator),
        None => {
            state.login_failures.record(client, Instant::now());
            Identity::Nobody
        }
    }
}

/// Refuses what only an admin may do (releasing the latched e-stop, decommissioning a
/// robot) to operators of a lower role. The `--api-token` holder and an open gateway may.
pub fn require_admin(operator: Option<&Operator>, what: &str) -> Result<(), ApiError> {
    match operator {
        Some(operator) if operator.role < OperatorRole::Admin => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden_role",
            format!(
                "{what} needs an admin; {} is {}",
                operator.name, operator.role
            ),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests;
