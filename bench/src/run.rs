//! One benchmark run: P publishers and S subscribers, each its own MQTT 5 connection
//! (rumqttc) in this process, every subscriber subscribed to what every publisher sends.
//!
//! 1. The subscribers connect and subscribe, then the publishers connect (logins are not
//!    part of what is measured).
//! 2. The broker's CPU time is read, and every publisher sends its messages, paced to the
//!    offered rate or as fast as its connection takes them.
//! 3. The run ends when every message has been delivered to every subscriber (and, at
//!    QoS 1, acknowledged to its publisher), or when nothing has moved for the drain time.
//!    The broker's CPU time is read again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet, PubAckReason, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::stats::{self, Tracker};

/// Username and password templates; `{i}` becomes the client's index (1-based).
#[derive(Debug, Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub host: String,
    pub port: u16,
    pub qos: QoS,
    pub publishers: usize,
    pub subscribers: usize,
    /// Messages each publisher sends.
    pub per_publisher: u64,
    /// Offered rate over all publishers, messages per second; `None`: as fast as possible.
    pub rate: Option<f64>,
    /// Topic template for publisher `{i}`.
    pub pub_topic: String,
    /// Filter template for subscriber `{i}`.
    pub sub_filter: String,
    pub pub_credentials: Option<Credentials>,
    pub sub_credentials: Option<Credentials>,
    /// Client id templates (`{i}`); `None`: a tag of this run and the client's index.
    pub pub_client_id: Option<String>,
    pub sub_client_id: Option<String>,
    pub payload_len: usize,
    /// Publishers' outgoing in-flight window and subscribers' receive maximum.
    pub inflight: u16,
    pub drain: Duration,
    pub connect_timeout: Duration,
    pub broker_pid: Option<u32>,
}

/// What a run measured.
#[derive(Debug, Default)]
pub struct Outcome {
    pub sent: u64,
    /// QoS 1: publishes the broker acknowledged with success (or "no matching
    /// subscribers").
    pub acked: u64,
    /// QoS 1: publishes the broker answered with an error reason code.
    pub refused: u64,
    /// Deliveries expected: every message sent, to every subscriber.
    pub expected: u64,
    /// Every delivery, duplicates included.
    pub received: u64,
    /// Distinct (subscriber, publisher, sequence) deliveries.
    pub unique: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub malformed: u64,
    /// Subscribers that missed at least one message, and the most one of them missed.
    pub subscribers_with_loss: usize,
    pub max_lost_by_one_subscriber: u64,
    /// Connections that dropped and came back during the run.
    pub reconnects: u64,
    /// From the first publish to the last publish handed to the client.
    pub publish_s: f64,
    /// From the first publish to the last delivery.
    pub duration_s: f64,
    /// Publish-to-deliver latency of the first arrival of each message, sorted, in ns.
    pub latencies_ns: Vec<u64>,
    pub broker_cpu_ms: Option<f64>,
    /// Receive maximum the broker announced in CONNACK (its in-flight limit per client
    /// for what clients send it), when it announced one.
    pub broker_receive_max: Option<u16>,
    /// Whether the run ended on the drain timeout rather than with everything accounted
    /// for.
    pub timed_out: bool,
    pub errors: Vec<String>,
}

/// Per connection: what its event loop saw besides messages.
#[derive(Debug, Default)]
struct LinkReport {
    connects: u64,
    errors: Vec<String>,
}

impl LinkReport {
    fn error(&mut self, error: String) {
        if self.errors.len() < 5 {
            self.errors.push(error);
        }
    }
}

/// Counters a publisher's event loop updates while its sender runs.
#[derive(Debug, Default)]
struct Acks {
    acked: AtomicU64,
    refused: AtomicU64,
}

#[derive(Debug, Default)]
struct Deliveries {
    received: AtomicU64,
    last_ns: AtomicU64,
}

fn fill(template: &str, i: usize) -> String {
    template.replace("{i}", &i.to_string())
}

fn nanos_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

fn options(
    plan: &Plan,
    client_id: String,
    credentials: Option<&Credentials>,
    i: usize,
) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, plan.host.clone(), plan.port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_start(true);
    if let Some(c) = credentials {
        options.set_credentials(fill(&c.username, i), fill(&c.password, i));
    }
    let mut network = options.network_options();
    // As the fleet's own clients do: small packets leave at once.
    network.set_tcp_nodelay(true);
    options.set_network_options(network);
    options
}

/// Runs the plan; `Err` only when the clients could not get going (refused login or
/// subscription, no broker). Losses and errors during the run are in the outcome.
pub async fn run(plan: &Plan) -> anyhow::Result<Outcome> {
    let epoch = Instant::now();
    // Tells this run's messages from anything else on the broker.
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
        .unwrap_or(0)
        ^ std::process::id();
    let tag = format!("fb{}-{:x}", std::process::id(), run_id & 0xffff);
    let (stop_tx, stop_rx) = watch::channel(false);
    let deliveries = Arc::new(Deliveries::default());

    // Subscribers first.
    let mut subscribers = Vec::with_capacity(plan.subscribers);
    let mut ready = Vec::new();
    for i in 1..=plan.subscribers {
        let mut opts = options(
            plan,
            plan.sub_client_id
                .as_deref()
                .map_or_else(|| format!("{tag}-s{i}"), |t| fill(t, i)),
            plan.sub_credentials.as_ref(),
            i,
        );
        opts.set_receive_maximum(Some(plan.inflight));
        // Subscribers publish nothing: a small window (rumqttc preallocates it).
        opts.set_outgoing_inflight_upper_limit(16);
        let (client, eventloop) = AsyncClient::new(opts, 16);
        let (tx, rx) = oneshot::channel();
        ready.push(rx);
        let tracker = Tracker::new(run_id, plan.publishers, plan.per_publisher);
        subscribers.push(tokio::spawn(subscriber(
            eventloop,
            client,
            fill(&plan.sub_filter, i),
            plan.qos,
            tx,
            stop_rx.clone(),
            tracker,
            deliveries.clone(),
            epoch,
        )));
    }
    let mut outcome = Outcome::default();
    wait_ready(ready, plan.connect_timeout, "subscriber", &mut outcome).await?;

    let mut publishers = Vec::with_capacity(plan.publishers);
    let mut clients = Vec::with_capacity(plan.publishers);
    let mut acks = Vec::with_capacity(plan.publishers);
    let mut ready = Vec::new();
    for i in 1..=plan.publishers {
        let mut opts = options(
            plan,
            plan.pub_client_id
                .as_deref()
                .map_or_else(|| format!("{tag}-p{i}"), |t| fill(t, i)),
            plan.pub_credentials.as_ref(),
            i,
        );
        opts.set_outgoing_inflight_upper_limit(plan.inflight);
        let (client, eventloop) = AsyncClient::new(opts, 1024);
        let (tx, rx) = oneshot::channel();
        ready.push(rx);
        let counters = Arc::new(Acks::default());
        publishers.push(tokio::spawn(publisher_events(
            eventloop,
            tx,
            stop_rx.clone(),
            counters.clone(),
        )));
        clients.push(client);
        acks.push(counters);
    }
    wait_ready(ready, plan.connect_timeout, "publisher", &mut outcome).await?;

    // The measured part.
    let cpu_before = plan.broker_pid.and_then(stats::cpu_ticks);
    let start = Instant::now();
    let start_ns = nanos_since(epoch);
    let rate_each = plan.rate.map(|r| r / plan.publishers as f64);
    let senders: Vec<JoinHandle<(u64, Option<String>)>> = clients
        .iter()
        .enumerate()
        .map(|(p, client)| {
            let client = client.clone();
            let topic = fill(&plan.pub_topic, p + 1);
            let (n, qos, len) = (plan.per_publisher, plan.qos, plan.payload_len);
            tokio::spawn(async move {
                let publisher = u32::try_from(p).unwrap_or(u32::MAX);
                for seq in 0..n {
                    if let Some(rate) = rate_each {
                        let due = start + Duration::from_secs_f64(seq as f64 / rate);
                        if Instant::now() < due {
                            tokio::time::sleep_until(due.into()).await;
                        }
                    }
                    let payload = stats::encode(len, run_id, publisher, seq, nanos_since(epoch));
                    if let Err(error) = client.publish(topic.clone(), qos, false, payload).await {
                        return (seq, Some(format!("publisher {}: {error}", p + 1)));
                    }
                }
                (n, None)
            })
        })
        .collect();
    let mut sent_each = Vec::with_capacity(senders.len());
    for sender in senders {
        match sender.await {
            Ok((sent, error)) => {
                sent_each.push(sent);
                outcome.errors.extend(error);
            }
            Err(error) => {
                sent_each.push(0);
                outcome
                    .errors
                    .push(format!("a publisher task failed: {error}"));
            }
        }
    }
    outcome.publish_s = start.elapsed().as_secs_f64();
    outcome.sent = sent_each.iter().sum();
    let subscribers_n = plan.subscribers as u64;
    outcome.expected = outcome.sent * subscribers_n;

    // Wait for everything to be delivered (and acknowledged), or for nothing to move.
    let acked = |acks: &[Arc<Acks>]| -> (u64, u64) {
        acks.iter().fold((0, 0), |(a, r), c| {
            (
                a + c.acked.load(Ordering::Relaxed),
                r + c.refused.load(Ordering::Relaxed),
            )
        })
    };
    let mut last_progress = (u64::MAX, Instant::now());
    loop {
        let received = deliveries.received.load(Ordering::Relaxed);
        let (a, r) = acked(&acks);
        let acks_done = plan.qos == QoS::AtMostOnce || a + r >= outcome.sent;
        if received >= outcome.expected && acks_done {
            break;
        }
        let progress = received + a + r;
        if progress != last_progress.0 {
            last_progress = (progress, Instant::now());
        } else if last_progress.1.elapsed() >= plan.drain {
            outcome.timed_out = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cpu_after = plan.broker_pid.and_then(stats::cpu_ticks);
    outcome.broker_cpu_ms = match (cpu_before, cpu_after) {
        (Some(before), Some(after)) => {
            Some(after.saturating_sub(before) as f64 * 1000.0 / stats::ticks_per_second() as f64)
        }
        _ => None,
    };
    let last_ns = deliveries.last_ns.load(Ordering::Relaxed);
    outcome.duration_s = if last_ns > start_ns {
        (last_ns - start_ns) as f64 / 1e9
    } else {
        start.elapsed().as_secs_f64()
    };
    (outcome.acked, outcome.refused) = acked(&acks);

    // Stop every connection and collect what the subscribers counted.
    let _ = stop_tx.send(true);
    for client in &clients {
        let _ = client.try_disconnect();
    }
    for publisher in publishers {
        if let Ok(report) = publisher.await {
            absorb(&mut outcome, report, "publisher");
        }
    }
    let mut latencies = Vec::new();
    for (s, subscriber) in subscribers.into_iter().enumerate() {
        let (tracker, report) = match subscriber.await {
            Ok(done) => done,
            Err(error) => {
                outcome
                    .errors
                    .push(format!("subscriber {} task failed: {error}", s + 1));
                continue;
            }
        };
        absorb(&mut outcome, report, "subscriber");
        let unique = tracker.unique_of(&sent_each);
        let lost = outcome.sent.saturating_sub(unique);
        if lost > 0 {
            outcome.subscribers_with_loss += 1;
            outcome.max_lost_by_one_subscriber = outcome.max_lost_by_one_subscriber.max(lost);
        }
        outcome.unique += unique;
        outcome.received += tracker.received;
        outcome.duplicates += tracker.duplicates;
        outcome.reordered += tracker.reordered;
        outcome.malformed += tracker.malformed;
        latencies.extend_from_slice(&tracker.latencies_ns);
    }
    outcome.lost = outcome.expected.saturating_sub(outcome.unique);
    latencies.sort_unstable();
    outcome.latencies_ns = latencies;
    Ok(outcome)
}

fn absorb(outcome: &mut Outcome, report: LinkReport, what: &str) {
    outcome.reconnects += report.connects.saturating_sub(1);
    for error in report.errors {
        if outcome.errors.len() < 20 {
            outcome.errors.push(format!("{what}: {error}"));
        }
    }
}

/// Waits until every client said it is ready (connected, and subscribed for
/// subscribers); fails on the first refusal or at the timeout.
async fn wait_ready(
    ready: Vec<oneshot::Receiver<Result<Option<u16>, String>>>,
    timeout: Duration,
    what: &str,
    outcome: &mut Outcome,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    for (i, rx) in ready.into_iter().enumerate() {
        let answer = tokio::time::timeout_at(deadline, rx)
            .await
            .with_context(|| format!("{what} {} not ready within {timeout:?}", i + 1))?;
        match answer {
            Ok(Ok(receive_max)) => {
                if outcome.broker_receive_max.is_none() {
                    outcome.broker_receive_max = receive_max;
                }
            }
            Ok(Err(error)) => bail!("{what} {}: {error}", i + 1),
            Err(_) => bail!("{what} {} stopped before it was ready", i + 1),
        }
    }
    Ok(())
}

fn refused_at_connect(error: &ConnectionError) -> Option<ConnectReturnCode> {
    match error {
        ConnectionError::ConnectionRefused(code) => Some(*code),
        _ => None,
    }
}

type Ready = oneshot::Sender<Result<Option<u16>, String>>;

/// Waits for the next event, or `None` once the run is over.
async fn next_event(
    eventloop: &mut EventLoop,
    stop: &mut watch::Receiver<bool>,
) -> Option<Result<Event, ConnectionError>> {
    if *stop.borrow() {
        return None;
    }
    tokio::select! {
        biased;
        _ = stop.changed() => None,
        event = eventloop.poll() => Some(event),
    }
}

/// A connection error: report it, give up before the first connect after a few tries,
/// otherwise pause (rumqttc reconnects on the next poll).
async fn on_error(
    error: ConnectionError,
    report: &mut LinkReport,
    ready: &mut Option<Ready>,
    failures: &mut u32,
) -> bool {
    *failures += 1;
    if ready.is_some() && (refused_at_connect(&error).is_some() || *failures >= 20) {
        if let Some(tx) = ready.take() {
            let _ = tx.send(Err(format!("cannot connect: {error}")));
        }
        return false;
    }
    report.error(error.to_string());
    tokio::time::sleep(Duration::from_millis(100)).await;
    true
}

#[allow(clippy::too_many_arguments)]
async fn subscriber(
    mut eventloop: EventLoop,
    client: AsyncClient,
    filter: String,
    qos: QoS,
    ready: Ready,
    mut stop: watch::Receiver<bool>,
    mut tracker: Tracker,
    deliveries: Arc<Deliveries>,
    epoch: Instant,
) -> (Tracker, LinkReport) {
    let mut ready = Some(ready);
    let mut report = LinkReport::default();
    let mut receive_max = None;
    let mut failures = 0;
    while let Some(event) = next_event(&mut eventloop, &mut stop).await {
        match event {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let now = nanos_since(epoch);
                tracker.record(&publish.payload, now);
                deliveries.received.fetch_add(1, Ordering::Relaxed);
                deliveries.last_ns.fetch_max(now, Ordering::Relaxed);
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                report.connects += 1;
                if report.connects > 1 {
                    report.error("reconnected (subscribing again)".to_owned());
                }
                receive_max = ack.properties.and_then(|p| p.receive_max);
                // Clean start: every connection subscribes afresh.
                if let Err(error) = client.try_subscribe(filter.clone(), qos) {
                    report.error(format!("cannot subscribe: {error}"));
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let ok = ack
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_)));
                if !ok {
                    let error = format!("subscription to {filter} refused: {:?}", ack.return_codes);
                    match ready.take() {
                        Some(tx) => {
                            let _ = tx.send(Err(error));
                            break;
                        }
                        None => report.error(error),
                    }
                } else if let Some(tx) = ready.take() {
                    let _ = tx.send(Ok(receive_max));
                }
            }
            Ok(Event::Incoming(Packet::Disconnect(d))) => {
                report.error(format!("the broker disconnected: {:?}", d.reason_code));
            }
            Ok(_) => {}
            Err(error) => {
                if !on_error(error, &mut report, &mut ready, &mut failures).await {
                    break;
                }
            }
        }
    }
    (tracker, report)
}

async fn publisher_events(
    mut eventloop: EventLoop,
    ready: Ready,
    mut stop: watch::Receiver<bool>,
    acks: Arc<Acks>,
) -> LinkReport {
    let mut ready = Some(ready);
    let mut report = LinkReport::default();
    let mut failures = 0;
    while let Some(event) = next_event(&mut eventloop, &mut stop).await {
        match event {
            Ok(Event::Incoming(Packet::PubAck(ack))) => match ack.reason {
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers => {
                    acks.acked.fetch_add(1, Ordering::Relaxed);
                }
                reason => {
                    if acks.refused.fetch_add(1, Ordering::Relaxed) == 0 {
                        report.error(format!("publish refused: {reason:?}"));
                    }
                }
            },
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                report.connects += 1;
                if report.connects > 1 {
                    report.error("reconnected".to_owned());
                }
                if let Some(tx) = ready.take() {
                    let _ = tx.send(Ok(ack.properties.and_then(|p| p.receive_max)));
                }
            }
            Ok(Event::Incoming(Packet::Disconnect(d))) => {
                report.error(format!("the broker disconnected: {:?}", d.reason_code));
            }
            Ok(_) => {}
            Err(error) => {
                if !on_error(error, &mut report, &mut ready, &mut failures).await {
                    break;
                }
            }
        }
    }
    report
}
