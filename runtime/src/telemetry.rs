//! Logs and traces for every fleet process: `tracing` to stderr, and OpenTelemetry spans
//! over OTLP (HTTP/protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set. Silent otherwise.
//!
//! Log lines are written by a thread of their own, through a bounded buffer: a log
//! reader that stalls (a full pipe to a container runtime or journald) must never stall
//! the runtime that drives the motors and their dead-man. Lines that do not fit are
//! dropped, counted (`fleet_log_lines_dropped_total`) and reported in a later line.
//!
//! Trace context crosses MQTT as W3C `traceparent`; [`set_remote_parent`] continues a
//! received one and [`traceparent_of`] gives the one to send on.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use fleet_protocol::TraceParent;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider,
};
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// rmqtt's plugins log their configuration at info level under hyphenated targets. Its
/// listener (`rmqtt::server`) stays at info: the only trace of a connection that sent
/// something other than an MQTT CONNECT is its `MQTT version detection failed` line
/// (which [`crate::handshake_failures`] also counts, at any level).
const QUIET_DEPENDENCIES: &str = "info,rmqtt=warn,rmqtt::server=info,rmqtt_net=warn,rmqtt-retainer=warn,rmqtt-shared-subscription=warn";

#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// `service.name` of the spans (`OTEL_SERVICE_NAME` wins when set).
    pub service_name: String,
    /// The full OTLP/HTTP traces URL (`…/v1/traces`); `None` reads the standard
    /// `OTEL_EXPORTER_OTLP_*` variables, and exports nothing when they are unset.
    pub otlp_traces_endpoint: Option<String>,
    /// How often batched spans are sent.
    pub export_interval: Duration,
}

impl TelemetryConfig {
    pub fn new(service_name: &str) -> Self {
        Self {
            service_name: std::env::var("OTEL_SERVICE_NAME")
                .unwrap_or_else(|_| service_name.to_owned()),
            otlp_traces_endpoint: None,
            export_interval: Duration::from_secs(2),
        }
    }

    fn exports(&self) -> bool {
        self.otlp_traces_endpoint.is_some()
            || [
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            ]
            .iter()
            .any(|v| std::env::var(v).is_ok_and(|v| !v.is_empty()))
    }
}

/// Log lines the writer thread holds before new ones are dropped: about 8 s of a busy
/// gateway's per-command lines, a few MiB at most (a Pi Zero has 512 MiB in all).
const BUFFERED_LOG_LINES: usize = 8_192;

/// How often a process says that it dropped log lines (when it did).
const DROPPED_LINES_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// The dropped-line count of the writer the process logs through (set once, by the
/// first [`init`]).
static DROPPED_LOG_LINES: OnceLock<ErrorCounter> = OnceLock::new();

/// Log lines dropped so far because the log output did not keep up.
pub fn dropped_log_lines() -> u64 {
    DROPPED_LOG_LINES
        .get()
        .map_or(0, |counter| counter.dropped_lines() as u64)
}

/// Keeps the span exporter and the log writer alive; flushes and stops them when dropped.
#[must_use = "spans are only exported while the Telemetry guard lives"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// Flushes the buffered log lines (waiting at most about a second) when dropped,
    /// after the provider.
    _log_writer: WorkerGuard,
}

impl Telemetry {
    /// Whether spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends every finished span now.
    pub fn flush(&self) {
        if let Some(provider) = self.provider.clone() {
            // The exporter's HTTP client blocks: keep it off the async runtime's threads.
            let _ = std::thread::spawn(move || provider.force_flush()).join();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = std::thread::spawn(move || provider.shutdown()).join();
        }
    }
}

/// Sets up logging (level from `RUST_LOG`, default `info`) and, when configured, OTLP
/// span export. Call once per process.
pub fn init(service_name: &str) -> Telemetry {
    init_with(TelemetryConfig::new(service_name))
}

pub fn init_with(config: TelemetryConfig) -> Telemetry {
    // Filters per layer rather than for the whole subscriber: the handshake-failure
    // counter must see rmqtt's listener lines whatever `RUST_LOG` prints.
    let filter =
        || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(QUIET_DEPENDENCIES));
    let (writer, log_writer) = NonBlockingBuilder::default()
        .buffered_lines_limit(BUFFERED_LOG_LINES)
        .lossy(true)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(filter());
    let (provider, export_error) = if config.exports() {
        match build_provider(&config) {
            Ok(provider) => (Some(provider), None),
            Err(error) => (None, Some(error)),
        }
    } else {
        (None, None)
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(config.service_name.clone()))
            .with_filter(filter())
    });
    let installed = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .with(crate::handshake_failures::layer())
        .try_init()
        .is_ok();
    // Only the first call in a process installs its writer (later ones, in tests, log
    // through the first).
    if installed && DROPPED_LOG_LINES.set(dropped.clone()).is_ok() {
        report_dropped_lines(dropped);
    }
    match (&provider, export_error) {
        (Some(_), _) => tracing::info!(service = %config.service_name, "exporting spans over OTLP"),
        (None, Some(error)) => {
            tracing::error!(%error, "cannot set up OTLP span export; continuing without it")
        }
        (None, None) => {}
    }
    Telemetry {
        provider,
        _log_writer: log_writer,
    }
}

/// Says, in the log itself, how many lines were dropped since the last report. Such a
/// line may be dropped too while the output is still stuck; it is then counted and the
/// next report covers it.
fn report_dropped_lines(counter: ErrorCounter) {
    let spawned = std::thread::Builder::new()
        .name("log-drops".into())
        .spawn(move || {
            let mut reported = 0;
            loop {
                std::thread::sleep(DROPPED_LINES_REPORT_INTERVAL);
                let dropped = counter.dropped_lines();
                if dropped > reported {
                    tracing::warn!(
                        dropped = dropped - reported,
                        total = dropped,
                        "log lines dropped: the log output (stderr) is not keeping up"
                    );
                    reported = dropped;
                }
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot start the dropped-log-lines reporter");
    }
}

fn build_provider(config: &TelemetryConfig) -> Result<SdkTracerProvider, String> {
    let config = config.clone();
    // The blocking HTTP client of the exporter must be built (and later dropped) on a
    // thread of its own, not on the async runtime.
    std::thread::spawn(move || {
        let mut exporter = SpanExporter::builder().with_http();
        if let Some(endpoint) = &config.otlp_traces_endpoint {
            exporter = exporter.with_endpoint(endpoint.clone());
        }
        let exporter = exporter.build().map_err(|e| e.to_string())?;
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(config.export_interval)
                    .build(),
            )
            .build();
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .build();
        Ok(SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource)
            .build())
    })
    .join()
    .map_err(|_| "the exporter set-up thread panicked".to_owned())?
}

/// Makes `span` a child of a span in another process, identified by `traceparent`.
pub fn set_remote_parent(span: &tracing::Span, parent: &TraceParent, tracestate: Option<&str>) {
    let state = tracestate
        .and_then(|s| TraceState::from_key_value(parse_tracestate(s)).ok())
        .unwrap_or_default();
    let context = SpanContext::new(
        TraceId::from_bytes(parent.trace_id),
        SpanId::from_bytes(parent.parent_id),
        TraceFlags::new(parent.flags),
        true,
        state,
    );
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(context));
}

fn parse_tracestate(text: &str) -> Vec<(String, String)> {
    text.split(',')
        .filter_map(|member| member.trim().split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The `traceparent` that names `span` to the next process, when spans are recorded
/// (OTLP export on). `None` otherwise: the caller makes its own ids.
pub fn traceparent_of(span: &tracing::Span) -> Option<TraceParent> {
    let context = span.context();
    let span_ref = context.span();
    let span_context = span_ref.span_context();
    if !span_context.is_valid() {
        return None;
    }
    Some(TraceParent {
        trace_id: span_context.trace_id().to_bytes(),
        parent_id: span_context.span_id().to_bytes(),
        flags: span_context.trace_flags().to_u8(),
    })
}
