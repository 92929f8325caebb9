//! The fleet's latched e-stop as this node obeys it (`<prefix>/estop`, retained). While it
//! is engaged, or while the node cannot know (not yet subscribed on this connection), the
//! motors stay stopped and motion is refused. What the node last read survives
//! reconnects: only an explicit clear lifts it, not a broker that lost its retained
//! messages.

use std::time::Duration;

use fleet_protocol::{Command, EstopLatch, LatchView};
use tokio::time::Instant;

use super::Node;
use crate::robot::CommandFailure;

/// After the broker grants the latch subscription, how long the node waits before it
/// takes motion: rmqtt sends retained messages from a task of their own, so an engaged
/// latch may arrive just after the SUBACK. The node says `online` only then.
pub(super) const LATCH_SETTLE: Duration = Duration::from_millis(250);

#[derive(Default)]
pub(super) struct Latch {
    /// The last latch document read; `None` before any (not engaged).
    last: Option<EstopLatch>,
    /// Whether the subscription is granted and settled on this connection.
    visible: bool,
}

impl Latch {
    pub(super) fn engaged(&self) -> bool {
        self.last.as_ref().is_some_and(|l| l.engaged)
    }

    pub(super) fn view(&self) -> LatchView {
        match (self.engaged(), self.visible) {
            (true, _) => LatchView::Engaged,
            (false, true) => LatchView::Clear,
            (false, false) => LatchView::Unknown,
        }
    }

    pub(super) fn set_visible(&mut self, visible: bool) {
        self.visible = visible;
    }

    /// Refuses what would move the robot while the latch is engaged or unknown. Stops,
    /// speeds (which move nothing by themselves), eyes and pings pass.
    pub(super) fn check(&self, command: &Command) -> Result<(), CommandFailure> {
        if !command.moves() {
            return Ok(());
        }
        match self.view() {
            LatchView::Clear => Ok(()),
            LatchView::Engaged => {
                let latch = self.last.as_ref();
                let by = latch
                    .and_then(|l| l.by.as_deref())
                    .map(|by| format!(" by {by}"))
                    .unwrap_or_default();
                let reason = latch
                    .and_then(|l| l.reason.as_deref())
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default();
                Err(CommandFailure {
                    code: "estop_engaged",
                    message: format!(
                        "the fleet e-stop is latched{by}{reason}; nothing moves until it is cleared"
                    ),
                })
            }
            LatchView::Unknown => Err(CommandFailure {
                code: "estop_unknown",
                message: "this robot cannot see the fleet e-stop latch yet (subscribing); \
                          nothing moves until it can"
                    .to_owned(),
            }),
        }
    }
}

impl Node {
    /// A message on the latch topic (it comes on the stop channel, ahead of commands).
    pub(super) fn on_latch(&mut self, payload: &[u8]) {
        let (latch, problem) = EstopLatch::read(payload);
        if let Some(problem) = problem {
            self.metrics.latch_unreadable.inc();
            tracing::warn!(robot = %self.robot_name(), %problem, "latch message");
        }
        let was_engaged = self.latch.engaged();
        let engaged = latch.engaged;
        if engaged && !was_engaged {
            self.metrics.robots_latched.inc();
            tracing::warn!(robot = %self.robot_name(), by = ?latch.by, reason = ?latch.reason, "fleet e-stop latched: motors stopped, motion refused until it is cleared");
        } else if !engaged && was_engaged {
            self.metrics.robots_latched.dec();
            tracing::info!(robot = %self.robot_name(), by = ?latch.by, "fleet e-stop cleared");
        }
        self.latch.last = Some(latch);
        if engaged {
            self.stop_motors_now();
        }
        self.publish_state();
    }

    /// The broker answered the latch subscription: granted, motion is taken once the
    /// retained latch has had time to arrive; refused, it never is (and the log says why).
    pub(super) fn on_latch_subscribed(&mut self, granted: bool) {
        if granted {
            self.latch_settled_due = Some(Instant::now() + LATCH_SETTLE);
        } else {
            tracing::error!(robot = %self.robot_name(), topic = %self.config.topics.estop(), "the broker refused the latch subscription: this robot refuses motion (its user needs read access to the latch topic)");
            self.announce();
        }
    }

    pub(super) fn on_latch_settled(&mut self) {
        self.latch_settled_due = None;
        self.latch.set_visible(true);
        self.announce();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_protocol::Direction;

    fn drive() -> Command {
        Command::Drive {
            direction: Direction::Forward,
            speed: None,
            hold_ms: None,
        }
    }

    #[test]
    fn motion_waits_until_the_latch_is_seen_clear() {
        let mut latch = Latch::default();
        assert_eq!(latch.view(), LatchView::Unknown);
        let code = |latch: &Latch, command: &Command| latch.check(command).err().map(|f| f.code);
        assert_eq!(code(&latch, &drive()), Some("estop_unknown"));
        assert_eq!(code(&latch, &Command::Stop), None, "stops always pass");
        latch.set_visible(true);
        assert_eq!(code(&latch, &drive()), None);
        latch.last = Some(EstopLatch::engaged(None, None, 1));
        assert_eq!(code(&latch, &drive()), Some("estop_engaged"));
        // Losing sight of the topic (a reconnect) keeps what was read.
        latch.set_visible(false);
        assert_eq!(latch.view(), LatchView::Engaged);
        let stop_drive = Command::Drive {
            direction: Direction::Stop,
            speed: None,
            hold_ms: None,
        };
        assert_eq!(code(&latch, &stop_drive), None, "a drive to stop is a stop");
    }
}
