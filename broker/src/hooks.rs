//! The fleet's rules in rmqtt's hooks: who may connect (credentials, client id, will),
//! what they may publish and subscribe to (the ACL, topic limits, retained quotas), and
//! the counts behind the metrics. Every refusal gets a precise MQTT reason code, a
//! counter and a (rate-limited) log line.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rmqtt::codec::v3::ConnectAckReason as V3Ack;
use rmqtt::codec::v5::{ConnectAckReason as V5Ack, SubscribeAckReason};
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType};
use rmqtt::types::{AuthResult, ConnectInfo, LastWill, PublishAclResult, SubscribeAclResult};

use crate::acl::{AclTopics, Role};
use crate::auth::Users;
use crate::clients::{Connecting, check_client_id};
use crate::gate::Refusals;
use crate::limits::TopicLimits;
use crate::logins::{LoginOutcome, Logins};
use crate::metrics::BrokerMetrics;
use crate::retained::RetainedLedger;
use fleet_runtime::log_limit::{Admission, LogLimiter};

/// Why a CONNECT was refused, for its CONNACK code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    BadCredentials,
    NotAuthorized,
    /// Failed too often, or too many checks in flight, from this address.
    Throttled,
    /// Every password check is taken.
    Busy,
    ClientId,
    TopicInvalid,
    Quota,
}

impl Refusal {
    pub(crate) fn v5(self) -> V5Ack {
        match self {
            Refusal::BadCredentials => V5Ack::BadUserNameOrPassword,
            Refusal::NotAuthorized => V5Ack::NotAuthorized,
            Refusal::Throttled => V5Ack::ConnectionRateExceeded,
            Refusal::Busy => V5Ack::ServerBusy,
            Refusal::ClientId => V5Ack::ClientIdentifierNotValid,
            Refusal::TopicInvalid => V5Ack::TopicNameInvalid,
            Refusal::Quota => V5Ack::QuotaExceeded,
        }
    }

    pub(crate) fn v3(self) -> V3Ack {
        match self {
            Refusal::BadCredentials => V3Ack::BadUserNameOrPassword,
            Refusal::NotAuthorized | Refusal::TopicInvalid | Refusal::Quota => V3Ack::NotAuthorized,
            Refusal::Throttled | Refusal::Busy => V3Ack::ServiceUnavailable,
            Refusal::ClientId => V3Ack::IdentifierRejected,
        }
    }

    /// What rmqtt is told (it only knows these two); the gate then writes the precise code
    /// into the CONNACK.
    fn auth_result(self) -> AuthResult {
        match self {
            Refusal::BadCredentials => AuthResult::BadUsernameOrPassword,
            _ => AuthResult::NotAuthorized,
        }
    }
}

#[derive(Clone)]
pub(crate) struct FleetHooks {
    pub scx: ServerContext,
    pub topics: AclTopics,
    pub limits: TopicLimits,
    pub users: Option<Arc<Users>>,
    pub logins: Option<Arc<Logins>>,
    pub allow_anonymous: bool,
    pub anonymous_role: Role,
    pub metrics: Arc<BrokerMetrics>,
    pub log_limit: Arc<LogLimiter>,
    pub retained: Arc<Mutex<RetainedLedger>>,
    /// CONNECTs refused at the login hook, waiting for their CONNACK to be written.
    pub refusals: Arc<Refusals>,
}

fn username(session: &rmqtt::session::Session) -> Option<&str> {
    session.id.username.as_deref()
}

/// The will's topic, whether it is retained, and its payload size.
fn will_of(info: &ConnectInfo) -> Option<(String, bool, usize)> {
    info.last_will().map(|will| match will {
        LastWill::V3(w) => (w.topic.to_string(), w.retain, w.message.len()),
        LastWill::V5(w) => (w.topic.to_string(), w.retain, w.message.len()),
    })
}

impl FleetHooks {
    /// Whether to write a log line of `kind` now: `Some(lines held back before it)`.
    fn log_line(&self, kind: &'static str) -> Option<u64> {
        match self.log_limit.admit(kind, std::time::Instant::now()) {
            Admission::Log { held_back } => Some(held_back),
            Admission::HoldBack => None,
        }
    }

    /// The role of a connected client (it passed authentication already).
    fn role_of(&self, username: Option<&str>) -> Option<Role> {
        match (&self.users, username) {
            (Some(users), Some(name)) => users.role_of(name),
            _ => self.allow_anonymous.then_some(self.anonymous_role),
        }
    }

    /// The fleet's rules for a topic name, before the ACL: limits, and no retained
    /// commands (an empty retained payload, which clears, is allowed).
    fn topic_rule(&self, topic: &str, retain: bool, empty: bool) -> Option<(&'static str, String)> {
        if let Err(problem) = self.limits.check_name(topic) {
            return Some((problem.reason(), problem.to_string()));
        }
        if retain && !empty && self.topics.fleet.is_command_topic(topic) {
            return Some((
                "retained_command",
                "commands must not be retained: a retained command re-fires on every reconnect"
                    .to_owned(),
            ));
        }
        None
    }

    /// Checks credentials: the role, or why not.
    async fn login(&self, info: &ConnectInfo) -> Result<Role, Refusal> {
        let Some(users) = &self.users else {
            return self
                .allow_anonymous
                .then_some(self.anonymous_role)
                .ok_or(Refusal::NotAuthorized);
        };
        let Some(name) = info.username() else {
            if self.allow_anonymous {
                return Ok(self.anonymous_role);
            }
            self.metrics.record_auth_failure("anonymous");
            if let Some(held_back) = self.log_line("anonymous_refused") {
                tracing::warn!(
                    held_back,
                    "refused a client without credentials (anonymous access is off)"
                );
            }
            return Err(Refusal::NotAuthorized);
        };
        let address = info
            .id()
            .remote_addr
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
        let password = info.password().map(|p| p.as_ref()).unwrap_or_default();
        let outcome = match &self.logins {
            Some(logins) => logins.check(address, name, password).await,
            // Only without a users file, handled above.
            None => match users.cached(name, password) {
                Some(role) => LoginOutcome::Allowed(role),
                None => LoginOutcome::BadCredentials,
            },
        };
        let (reason, refusal, text) = match outcome {
            LoginOutcome::Allowed(role) => return Ok(role),
            LoginOutcome::BadCredentials => (
                "bad_credentials",
                Refusal::BadCredentials,
                "refused a client: bad username or password",
            ),
            LoginOutcome::Throttled => (
                "throttled",
                Refusal::Throttled,
                "refused a client without checking its password: its address failed too often and must wait",
            ),
            LoginOutcome::Busy => (
                "busy",
                Refusal::Busy,
                "refused a client: every password check is taken (a flood of logins?)",
            ),
        };
        self.metrics.record_auth_failure(reason);
        if let Some(held_back) = self.log_line(reason) {
            tracing::warn!(username = %name.escape_debug(), %address, held_back, "{text}");
        }
        Err(refusal)
    }

    /// What a logged-in client may connect as: its client id and its will.
    async fn connect_rules(&self, info: &ConnectInfo, role: Role) -> Result<(), Refusal> {
        let user = info.username().map(|u| u.as_ref());
        let client_id = info.id().client_id.as_ref();
        let holder = self
            .scx
            .extends
            .shared()
            .await
            .entry(info.id().clone())
            .session()
            .map(|session| session.id.username.as_ref().map(|u| u.to_string()));
        let who = Connecting {
            username: user,
            role,
        };
        if let Err(refusal) = check_client_id(who, client_id, holder.as_ref().map(|h| h.as_deref()))
        {
            return Err(self.refuse_connect(
                info,
                refusal.reason(),
                &refusal.to_string(),
                Refusal::ClientId,
            ));
        }
        let Some((topic, retain, size)) = will_of(info) else {
            return Ok(());
        };
        if let Some((reason, text)) = self.topic_rule(&topic, retain, size == 0) {
            let refusal = if reason == "retained_command" {
                Refusal::NotAuthorized
            } else {
                Refusal::TopicInvalid
            };
            let reason = match reason {
                "retained_command" => "will_retained_command",
                "topic_too_long" => "will_topic_too_long",
                "too_many_levels" => "will_too_many_levels",
                _ => "will_invalid_topic",
            };
            return Err(self.refuse_connect(info, reason, &format!("will: {text}"), refusal));
        }
        if !self
            .topics
            .may_publish(role, user.unwrap_or_default(), &topic)
        {
            return Err(self.refuse_connect(
                info,
                "will_not_allowed",
                "will: not allowed to publish to this topic",
                Refusal::NotAuthorized,
            ));
        }
        if retain {
            let booked = self.retained_lock().book(
                user.unwrap_or_default(),
                role != Role::Admin,
                &topic,
                size,
            );
            self.metrics.retained.set(self.retained_count());
            if let Err(exceeded) = booked {
                return Err(self.refuse_connect(
                    info,
                    "will_retained_quota",
                    &format!("will: {exceeded}"),
                    Refusal::Quota,
                ));
            }
        }
        Ok(())
    }

    fn refuse_connect(
        &self,
        info: &ConnectInfo,
        reason: &'static str,
        text: &str,
        refusal: Refusal,
    ) -> Refusal {
        self.metrics.record_connect_refused(reason);
        if let Some(held_back) = self.log_line("connect_refused") {
            let id = info.id();
            tracing::warn!(client = %id.client_id.escape_debug(), user = info.username().map_or("(anonymous)", |u| u.as_ref()), remote = ?id.remote_addr, reason = text, held_back, "CONNECT refused");
        }
        refusal
    }

    fn retained_lock(&self) -> std::sync::MutexGuard<'_, RetainedLedger> {
        self.retained.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn retained_count(&self) -> i64 {
        i64::try_from(self.retained_lock().len()).unwrap_or(i64::MAX)
    }

    async fn on_authenticate(&self, info: &ConnectInfo) -> ReturnType {
        let decision = match self.login(info).await {
            Ok(role) => self.connect_rules(info, role).await,
            Err(refusal) => Err(refusal),
        };
        match decision {
            Ok(()) => (
                false,
                Some(HookResult::AuthResult(AuthResult::Allow(false, None))),
            ),
            Err(refusal) => {
                if let Some(remote) = info.id().remote_addr {
                    self.refusals.remember(remote, refusal);
                }
                (false, Some(HookResult::AuthResult(refusal.auth_result())))
            }
        }
    }

    fn on_subscribe(
        &self,
        session: &rmqtt::session::Session,
        filter: &str,
        acc: Option<HookResult>,
    ) -> ReturnType {
        let user = username(session);
        let (reason, denial) = if let Err(problem) = self.limits.check_filter(filter) {
            self.metrics.record_subscription_refused(problem.reason());
            (problem.to_string(), SubscribeAckReason::TopicFilterInvalid)
        } else if self.role_of(user).is_some_and(|role| {
            self.topics
                .may_subscribe(role, user.unwrap_or_default(), filter)
        }) {
            return (true, acc);
        } else {
            self.metrics.record_acl_denial("subscribe");
            (String::new(), SubscribeAckReason::NotAuthorized)
        };
        if let Some(held_back) = self.log_line("subscription_refused") {
            let filter: String = filter.chars().take(200).collect();
            if denial == SubscribeAckReason::NotAuthorized {
                tracing::warn!(client = %session.id.client_id.escape_debug(), user = user.unwrap_or("(anonymous)"), filter = %filter.escape_debug(), held_back, "subscription refused by the ACL");
            } else {
                tracing::warn!(client = %session.id.client_id.escape_debug(), user = user.unwrap_or("(anonymous)"), filter = %filter.escape_debug(), %reason, held_back, "subscription refused: invalid filter");
            }
        }
        let denied = SubscribeAclResult::new_failure(denial);
        (false, Some(HookResult::SubscribeAclResult(denied)))
    }

    fn on_publish(
        &self,
        session: &rmqtt::session::Session,
        publish: &rmqtt::types::Publish,
        acc: Option<HookResult>,
    ) -> ReturnType {
        let topic: &str = &publish.topic;
        let user = username(session);
        let role = self.role_of(user);
        let empty = publish.payload.is_empty();
        let refusal = self
            .topic_rule(topic, publish.retain, empty)
            .or_else(|| {
                let allowed = role.is_some_and(|role| {
                    self.topics
                        .may_publish(role, user.unwrap_or_default(), topic)
                });
                (!allowed).then(|| ("acl", "not allowed to publish to this topic".to_owned()))
            })
            .or_else(|| {
                if !publish.retain {
                    return None;
                }
                let limited = role != Some(Role::Admin);
                let booked = self.retained_lock().book(
                    user.unwrap_or_default(),
                    limited,
                    topic,
                    publish.payload.len(),
                );
                self.metrics.retained.set(self.retained_count());
                booked
                    .err()
                    .map(|exceeded| ("retained_quota", exceeded.to_string()))
            });
        if let Some((reason, text)) = refusal {
            if reason == "acl" {
                self.metrics.record_acl_denial("publish");
            } else {
                self.metrics.record_refused(reason);
            }
            if let Some(held_back) = self.log_line("publish_refused") {
                tracing::warn!(client = %session.id.client_id.escape_debug(), user = user.unwrap_or("(anonymous)"), topic = %topic.chars().take(200).collect::<String>().escape_debug(), reason = %text, held_back, "publish refused");
            }
            let result = PublishAclResult::rejected(false, Some(text.into()));
            return (false, Some(HookResult::PublishAclResult(result)));
        }
        self.metrics.record_received(topic);
        if self.topics.fleet.is_command_topic(topic) {
            // Follow a click through the broker's log by its trace id.
            let traceparent = publish.properties.as_ref().and_then(|p| {
                p.user_properties
                    .iter()
                    .find(|(k, _)| &**k == "traceparent")
                    .map(|(_, v)| v.to_string())
            });
            tracing::debug!(client = %session.id.client_id, %topic, traceparent = traceparent.as_deref().unwrap_or("-"), "command");
        }
        (true, acc)
    }
}

#[async_trait]
impl Handler for FleetHooks {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::ClientAuthenticate(info) => self.on_authenticate(info).await,
            Parameter::ClientSubscribeCheckAcl(session, subscribe) => {
                self.on_subscribe(session, &subscribe.topic_filter, acc)
            }
            Parameter::MessagePublishCheckAcl(session, publish) => {
                self.on_publish(session, publish, acc)
            }
            Parameter::MessageDelivered(_, _, publish) => {
                self.metrics.record_delivered(&publish.topic);
                (true, acc)
            }
            Parameter::MessageDropped(to, from, publish, reason) => {
                let kind = drop_reason(reason);
                self.metrics.record_dropped(kind);
                if let Some(held_back) = self.log_line("message_dropped") {
                    tracing::warn!(?to, ?from, topic = %publish.topic, reason = kind, held_back, "message dropped");
                }
                (true, acc)
            }
            Parameter::ClientConnected(_) => {
                self.metrics.connects.inc();
                self.metrics.connections.inc();
                (true, acc)
            }
            Parameter::ClientDisconnected(session, reason) => {
                let kind = disconnect_reason(reason);
                self.metrics.record_disconnect(kind);
                if kind == "protocol_error"
                    && let Some(held_back) = self.log_line("protocol_error")
                {
                    tracing::warn!(client = %session.id.client_id, user = username(session).unwrap_or("(anonymous)"), %reason, held_back, "disconnected a client that broke the protocol");
                }
                self.metrics.connections.dec();
                (true, acc)
            }
            _ => (true, acc),
        }
    }
}

/// A bounded label for why a client went away.
fn disconnect_reason(reason: &rmqtt::types::Reason) -> &'static str {
    use rmqtt::types::Reason;
    match reason {
        Reason::ConnectDisconnect(_) => "client",
        Reason::ConnectRemoteClose
        | Reason::ConnectReadWriteError
        | Reason::ConnectReadWriteTimeout => "connection_closed",
        Reason::ConnectKeepaliveTimeout => "keepalive_timeout",
        Reason::ConnectKicked(_) => "taken_over",
        // Congested and writing nothing while a publisher was held back for it
        // (patches/rmqtt, `Backlog`).
        Reason::MessageQueueFull => "slow_consumer",
        // rmqtt reports what its decoder refused (oversized packets, topics that are not
        // UTF-8, a second CONNECT, unknown packet types) as a plain error text.
        Reason::ProtocolError(_) | Reason::MqttError(_) | Reason::Error(_) => "protocol_error",
        Reason::Reasons(reasons) => reasons.first().map_or("other", disconnect_reason),
        _ => "other",
    }
}

/// A bounded label for why rmqtt dropped a message.
fn drop_reason(reason: &rmqtt::types::Reason) -> &'static str {
    use rmqtt::types::Reason;
    match reason {
        Reason::MessageQueueFull => "queue_full",
        Reason::InflightWindowFull => "inflight_full",
        Reason::MessageExpiration => "expired",
        Reason::SessionExpiration => "session_expired",
        Reason::PublishResult(_) | Reason::DelayedPublishRefused => "refused",
        Reason::Error(text) if &**text == rmqtt::session::TOO_LARGE_FOR_CLIENT => "too_large",
        Reason::ConnectDisconnect(_)
        | Reason::ConnectRemoteClose
        | Reason::ConnectReadWriteError
        | Reason::ConnectReadWriteTimeout
        | Reason::ConnectKeepaliveTimeout
        | Reason::ConnectKicked(_) => "disconnected",
        _ => "other",
    }
}
