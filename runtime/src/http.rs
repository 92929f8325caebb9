//! Serving an axum router over HTTP/1.1 with the limits `axum::serve` lacks.
//!
//! `axum::serve` keeps a connection open for as long as the client likes: a client that
//! connects and sends nothing, sends half a request, or leaves a keep-alive connection
//! idle holds a socket and a task forever, and there is no cap on how many it may hold.
//! [`serve`] closes a connection that has not sent a complete request head within
//! [`HttpLimits::header_timeout`] (counted from the connect, or from the end of the
//! previous response: hyper's header read timeout, which in hyper 1.x starts as soon as
//! the connection waits for a request head, so idle keep-alive connections are covered
//! too), gives a request body the same time after its head, and accepts at most
//! [`HttpLimits::max_connections`] connections at once (beyond that a new connection is
//! closed at once, counted and logged). It keeps what `axum::serve` gave: the client
//! address as `ConnectInfo<SocketAddr>`, TCP_NODELAY, and a graceful shutdown that stops
//! accepting, lets requests in flight finish and closes idle connections.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tower_service::Service;

use crate::log_limit::{Admission, LogLimiter, report_held_back};

/// Default of [`HttpLimits::header_timeout`]: long enough for a person typing a request
/// by hand over telnet, short enough that idle sockets do not pile up.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(15);
/// Default of [`HttpLimits::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// What one HTTP server allows its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// A connection must send a complete request head within this, counted from its
    /// connect or from the end of its previous response (so an idle keep-alive
    /// connection is closed after it too); a request body must arrive within this after
    /// its head.
    pub header_timeout: Duration,
    /// Connections served at once; a connection beyond this is closed as soon as it is
    /// accepted.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    /// `head` (no complete request head in time: idle or partial) or `body`.
    phase: &'static str,
}

/// What [`serve`] counts. Cheap to clone (the counters are shared).
#[derive(Clone, Debug, Default)]
pub struct HttpMetrics {
    open: Gauge,
    refused: Counter,
    timed_out: Family<PhaseLabels, Counter>,
}

impl HttpMetrics {
    /// Adds `fleet_http_connections`, `fleet_http_connections_refused_total` and
    /// `fleet_http_connections_timed_out_total{phase}` to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "fleet_http_connections",
            "HTTP connections open now",
            self.open.clone(),
        );
        registry.register(
            "fleet_http_connections_refused",
            "HTTP connections closed at once because the connection limit was reached",
            self.refused.clone(),
        );
        // Both series from the start, so that rate() sees the first timeout.
        for phase in ["head", "body"] {
            self.timed_out
                .get_or_create(&PhaseLabels { phase })
                .inc_by(0);
        }
        registry.register(
            "fleet_http_connections_timed_out",
            "HTTP connections closed because a request head (phase=head: idle or partial) or body (phase=body) did not arrive in time",
            self.timed_out.clone(),
        );
    }

    pub fn open(&self) -> i64 {
        self.open.get()
    }

    pub fn refused(&self) -> u64 {
        self.refused.get()
    }

    fn timed_out(&self, phase: &'static str) {
        self.timed_out.get_or_create(&PhaseLabels { phase }).inc();
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown` completes, then stops
/// accepting, closes idle connections and waits for requests in flight. Whatever must
/// end for that to finish (server-sent event streams) is the router's business.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    metrics: HttpMetrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (closing, closed) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let log_limit = Arc::new(LogLimiter::default());
    let mut connections = JoinSet::new();
    {
        let (log_limit, mut closed) = (log_limit.clone(), closed.clone());
        connections.spawn(async move {
            tokio::select! {
                () = report_held_back(&log_limit) => {}
                _ = closed.wait_for(|c| *c) => {}
            }
        });
    }
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        // Finished connections leave their result here until taken.
        while connections.try_join_next().is_some() {}
        let (stream, client) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: wait a little rather than spin,
                // as axum::serve does. Errors of one connection are not errors of the
                // listener and end up here too; they need no pause.
                if !is_connection_error(&error) {
                    tracing::error!(%error, "cannot accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.refused.inc();
            if let Admission::Log { held_back } =
                log_limit.admit("http_connection_refused", Instant::now())
            {
                tracing::warn!(%client, max_connections = limits.max_connections, held_back, "HTTP connection refused: too many connections");
            }
            drop(stream);
            continue;
        };
        // Small answers must leave at once (Nagle plus delayed ACKs adds up to 40 ms).
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        let (router, metrics, closed) = (router.clone(), metrics.clone(), closed.clone());
        connections.spawn(async move {
            metrics.open.inc();
            connection(stream, client, router, limits, &metrics, closed).await;
            metrics.open.dec();
            drop(slot);
        });
    }
    drop(listener);
    closing.send_replace(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Accept errors that concern one connection only.
fn is_connection_error(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        error.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

async fn connection(
    stream: TcpStream,
    client: SocketAddr,
    router: Router,
    limits: HttpLimits,
    metrics: &HttpMetrics,
    mut closed: watch::Receiver<bool>,
) {
    let body_metrics = metrics.clone();
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        // The per-client rate limit and the logs want the client address.
        request.extensions_mut().insert(ConnectInfo(client));
        let request = request
            .map(|body| DeadlineBody::new(body, limits.header_timeout, body_metrics.clone()));
        let mut router = router.clone();
        async move {
            let response: Result<_, Infallible> = router.call(request).await;
            response
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let served = builder.serve_connection(TokioIo::new(stream), service);
    let mut served = std::pin::pin!(served);
    let finished = tokio::select! {
        outcome = served.as_mut() => Some(outcome),
        _ = closed.wait_for(|c| *c) => None,
    };
    let outcome = match finished {
        Some(outcome) => outcome,
        None => {
            // Finishes the request in flight, if any, then closes; closes an idle one now.
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if let Err(error) = outcome {
        if error.is_timeout() {
            metrics.timed_out("head");
        }
        // Clients hang up all the time; nothing for the operator.
        tracing::debug!(%client, %error, "HTTP connection ended with an error");
    }
}

/// A request body that fails once its deadline has passed (a client sending its body a
/// byte at a time would otherwise hold the connection and the handler forever).
struct DeadlineBody {
    inner: Incoming,
    deadline: tokio::time::Instant,
    /// Armed on the first wait, so that bodies that are already complete cost no timer.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    metrics: HttpMetrics,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
struct BodyTimeout;

impl DeadlineBody {
    fn new(inner: Incoming, timeout: Duration, metrics: HttpMetrics) -> Self {
        Self {
            inner,
            deadline: tokio::time::Instant::now() + timeout,
            sleep: None,
            metrics,
        }
    }
}

impl Body for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        // Every field is Unpin (hyper's Incoming is, the timer is boxed).
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        ready!(sleep.as_mut().poll(cx));
        this.metrics.timed_out("body");
        Poll::Ready(Some(Err(Box::new(BodyTimeout))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
