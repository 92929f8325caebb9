//! Limits on topic names and filters. rmqtt stores retained messages and subscriptions
//! in tries that it walks recursively: one topic of 8,000 levels overflowed the stack and
//! took the whole broker down. Every name and filter a client hands over (publish, will,
//! subscribe) is measured here first.

use std::fmt;

/// How long and how deep a topic name or filter may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicLimits {
    /// Levels (`a/b/c` has 3). The fleet's own topics have at most the prefix's levels + 4.
    pub max_levels: usize,
    /// Bytes of UTF-8.
    pub max_bytes: usize,
}

impl Default for TopicLimits {
    fn default() -> Self {
        Self {
            max_levels: 32,
            max_bytes: 1024,
        }
    }
}

/// Why a topic name or filter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicProblem {
    Empty,
    /// `+` or `#` in a topic name (only filters may have them).
    Wildcard,
    Nul,
    TooLong {
        bytes: usize,
        max: usize,
    },
    TooManyLevels {
        levels: usize,
        max: usize,
    },
}

impl TopicProblem {
    /// The metric label.
    pub fn reason(self) -> &'static str {
        match self {
            TopicProblem::Empty | TopicProblem::Wildcard | TopicProblem::Nul => "invalid_topic",
            TopicProblem::TooLong { .. } => "topic_too_long",
            TopicProblem::TooManyLevels { .. } => "too_many_levels",
        }
    }
}

impl fmt::Display for TopicProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopicProblem::Empty => f.write_str("the topic is empty"),
            TopicProblem::Wildcard => f.write_str("topic names must not contain '+' or '#'"),
            TopicProblem::Nul => f.write_str("topics must not contain NUL"),
            TopicProblem::TooLong { bytes, max } => {
                write!(f, "the topic is {bytes} bytes; at most {max} are allowed")
            }
            TopicProblem::TooManyLevels { levels, max } => {
                write!(
                    f,
                    "the topic has {levels} levels; at most {max} are allowed"
                )
            }
        }
    }
}

impl TopicLimits {
    fn measure(&self, topic: &str) -> Result<(), TopicProblem> {
        if topic.is_empty() {
            return Err(TopicProblem::Empty);
        }
        if topic.contains('\0') {
            return Err(TopicProblem::Nul);
        }
        if topic.len() > self.max_bytes {
            return Err(TopicProblem::TooLong {
                bytes: topic.len(),
                max: self.max_bytes,
            });
        }
        let levels = topic.bytes().filter(|&b| b == b'/').count() + 1;
        if levels > self.max_levels {
            return Err(TopicProblem::TooManyLevels {
                levels,
                max: self.max_levels,
            });
        }
        Ok(())
    }

    /// A topic name: what a PUBLISH or a will is sent to.
    pub fn check_name(&self, topic: &str) -> Result<(), TopicProblem> {
        self.measure(topic)?;
        if topic.contains(['+', '#']) {
            return Err(TopicProblem::Wildcard);
        }
        Ok(())
    }

    /// A subscription filter, shared (`$share/<group>/…`) or not; the group counts too.
    pub fn check_filter(&self, filter: &str) -> Result<(), TopicProblem> {
        self.measure(filter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_filters_are_measured() {
        let limits = TopicLimits {
            max_levels: 4,
            max_bytes: 20,
        };
        assert_eq!(limits.check_name("fleet/linus/state"), Ok(()));
        assert_eq!(limits.check_name("a/b/c/d"), Ok(()));
        assert_eq!(
            limits.check_name("a/b/c/d/e"),
            Err(TopicProblem::TooManyLevels { levels: 5, max: 4 })
        );
        assert_eq!(
            limits.check_name("fleet/a-very-long-robot"),
            Err(TopicProblem::TooLong { bytes: 23, max: 20 })
        );
        assert_eq!(limits.check_name(""), Err(TopicProblem::Empty));
        assert_eq!(limits.check_name("a/+"), Err(TopicProblem::Wildcard));
        assert_eq!(limits.check_name("a/#"), Err(TopicProblem::Wildcard));
        assert_eq!(limits.check_name("a\0b"), Err(TopicProblem::Nul));
        assert_eq!(limits.check_filter("fleet/+/cmd/#"), Ok(()));
        assert_eq!(
            limits
                .check_filter("+/+/+/+/#")
                .map_err(TopicProblem::reason),
            Err("too_many_levels")
        );
        // An empty level still counts: `/` alone is two levels.
        assert_eq!(
            TopicLimits::default().check_filter(&"/".repeat(6_000)),
            Err(TopicProblem::TooLong {
                bytes: 6_000,
                max: 1024
            })
        );
        assert_eq!(
            TopicLimits::default()
                .check_filter(&"a/".repeat(40))
                .map_err(TopicProblem::reason),
            Err("too_many_levels")
        );
    }
}
