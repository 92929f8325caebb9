//! Retained messages by owner, with quotas. A retained message stays in the broker's
//! memory until someone replaces or clears it, so without a bound one logged-in client
//! can fill the broker with them. Every retained publish (and retained will) that the
//! ACL let through is booked here first: its owner is the user who published it.

use std::collections::HashMap;
use std::fmt;

/// How much retained data one user (and everybody together) may leave in the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetainedQuota {
    /// Retained topics per user. A robot needs 3 (state, status, discovery).
    pub messages_per_user: usize,
    /// Retained payload bytes per user.
    pub bytes_per_user: usize,
    /// Retained topics in the whole broker.
    pub messages_total: usize,
}

impl Default for RetainedQuota {
    fn default() -> Self {
        Self {
            messages_per_user: 64,
            bytes_per_user: 1024 * 1024,
            messages_total: 200_000,
        }
    }
}

/// Why a retained message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaExceeded {
    Messages { max: usize },
    Bytes { max: usize },
    Total { max: usize },
}

impl fmt::Display for QuotaExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuotaExceeded::Messages { max } => {
                write!(
                    f,
                    "this user already has {max} retained messages (the quota)"
                )
            }
            QuotaExceeded::Bytes { max } => {
                write!(
                    f,
                    "this user's retained messages would exceed {max} bytes (the quota)"
                )
            }
            QuotaExceeded::Total { max } => {
                write!(f, "the broker holds {max} retained messages, its limit")
            }
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    messages: usize,
    bytes: usize,
}

/// Who owns which retained topic. Bounded by the quotas it enforces.
#[derive(Debug, Default)]
pub struct RetainedLedger {
    quota: RetainedQuota,
    topics: HashMap<String, (String, usize)>,
    owners: HashMap<String, Usage>,
}

impl RetainedLedger {
    pub fn new(quota: RetainedQuota) -> Self {
        Self {
            quota,
            ..Self::default()
        }
    }

    /// Retained topics held now.
    pub fn len(&self) -> usize {
        self.topics.len()
    }

    pub fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }

    /// Books a retained message of `bytes` on `topic` by `owner` (the username, `""` for
    /// anonymous clients); an empty payload clears the topic. `limited` is false for
    /// admins, who are held only to the broker-wide total.
    pub fn book(
        &mut self,
        owner: &str,
        limited: bool,
        topic: &str,
        bytes: usize,
    ) -> Result<(), QuotaExceeded> {
        if bytes == 0 {
            self.release(topic);
            return Ok(());
        }
        let previous = self.topics.get(topic);
        let replaced_own = previous.filter(|(o, _)| o == owner).map_or(0, |(_, b)| *b);
        if previous.is_none() && self.topics.len() >= self.quota.messages_total {
            return Err(QuotaExceeded::Total {
                max: self.quota.messages_total,
            });
        }
        if limited {
            let usage = self.owners.get(owner).copied().unwrap_or_default();
            let new_topic = previous.is_none_or(|(o, _)| o != owner);
            if new_topic && usage.messages >= self.quota.messages_per_user {
                return Err(QuotaExceeded::Messages {
                    max: self.quota.messages_per_user,
                });
            }
            if usage.bytes - replaced_own + bytes > self.quota.bytes_per_user {
                return Err(QuotaExceeded::Bytes {
                    max: self.quota.bytes_per_user,
                });
            }
        }
        self.release(topic);
        self.topics
            .insert(topic.to_owned(), (owner.to_owned(), bytes));
        let usage = self.owners.entry(owner.to_owned()).or_default();
        usage.messages += 1;
        usage.bytes += bytes;
        Ok(())
    }

    fn release(&mut self, topic: &str) {
        let Some((owner, bytes)) = self.topics.remove(topic) else {
            return;
        };
        if let Some(usage) = self.owners.get_mut(&owner) {
            usage.messages = usage.messages.saturating_sub(1);
            usage.bytes = usage.bytes.saturating_sub(bytes);
            if usage.messages == 0 {
                self.owners.remove(&owner);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger() -> RetainedLedger {
        RetainedLedger::new(RetainedQuota {
            messages_per_user: 2,
            bytes_per_user: 100,
            messages_total: 3,
        })
    }

    #[test]
    fn quotas_per_user_and_in_total() {
        let mut ledger = ledger();
        assert_eq!(ledger.book("linus", true, "a", 10), Ok(()));
        assert_eq!(
            ledger.book("linus", true, "a", 20),
            Ok(()),
            "replacing is free"
        );
        assert_eq!(ledger.book("linus", true, "b", 10), Ok(()));
        assert_eq!(
            ledger.book("linus", true, "c", 10),
            Err(QuotaExceeded::Messages { max: 2 })
        );
        assert_eq!(
            ledger.book("linus", true, "b", 81),
            Err(QuotaExceeded::Bytes { max: 100 })
        );
        assert_eq!(ledger.book("linus", true, "b", 80), Ok(()), "20 + 80");
        assert_eq!(ledger.book("linus", true, "a", 0), Ok(()), "cleared");
        assert_eq!(ledger.book("linus", true, "c", 10), Ok(()));
        assert_eq!(
            ledger.book("root", false, "d", 1_000),
            Ok(()),
            "admins: no quota"
        );
        assert_eq!(
            ledger.book("root", false, "e", 1),
            Err(QuotaExceeded::Total { max: 3 })
        );
        assert_eq!(ledger.len(), 3);
    }

    #[test]
    fn taking_over_a_topic_moves_it_to_the_new_owner() {
        let mut ledger = ledger();
        assert_eq!(ledger.book("torvalds", true, "t", 50), Ok(()));
        assert_eq!(ledger.book("root", false, "t", 5), Ok(()));
        assert_eq!(
            ledger.book("torvalds", true, "x", 100),
            Ok(()),
            "quota freed"
        );
        assert_eq!(ledger.len(), 2);
    }
}
