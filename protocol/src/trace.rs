//! W3C trace context (`traceparent`, `tracestate`) carried as MQTT 5 user properties,
//! or as JSON fields for MQTT 3.1.1 senders.
//!
//! This crate does no I/O and draws no random numbers: callers supply fresh ids.

use std::fmt;
use std::str::FromStr;

/// User property names (the W3C header names, lower case).
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceContextError {
    #[error("traceparent must be 00-<32 hex trace id>-<16 hex span id>-<2 hex flags>")]
    Malformed,
    #[error("traceparent trace id and span id must not be all zeros")]
    ZeroId,
}

/// A parsed `traceparent` (version 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// Flag bit 0: the caller recorded (sampled) this trace.
    pub const SAMPLED: u8 = 0x01;

    /// Starts a new trace. Returns `None` when an id is all zeros (invalid by the spec).
    pub fn new_root(trace_id: [u8; 16], span_id: [u8; 8]) -> Option<Self> {
        let valid = trace_id != [0; 16] && span_id != [0; 8];
        valid.then_some(Self {
            trace_id,
            parent_id: span_id,
            flags: Self::SAMPLED,
        })
    }

    /// The context to send onwards from a new span `span_id` in the same trace.
    pub fn child(&self, span_id: [u8; 8]) -> Option<Self> {
        (span_id != [0; 8]).then_some(Self {
            parent_id: span_id,
            ..*self
        })
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    pub fn parent_id_hex(&self) -> String {
        hex(&self.parent_id)
    }

    /// Finds `traceparent` among MQTT 5 user properties (first valid one wins).
    pub fn from_properties<'a>(
        properties: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Option<Self> {
        properties
            .into_iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(TRACEPARENT))
            .find_map(|(_, v)| v.parse().ok())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    // Lower-case only, as the spec requires.
    if text.len() != N * 2
        || !text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

impl FromStr for TraceParent {
    type Err = TraceContextError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.trim().split('-');
        let (Some("00"), Some(trace), Some(parent), Some(flags), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TraceContextError::Malformed);
        };
        let trace_id = unhex::<16>(trace).ok_or(TraceContextError::Malformed)?;
        let parent_id = unhex::<8>(parent).ok_or(TraceContextError::Malformed)?;
        let [flags] = unhex::<1>(flags).ok_or(TraceContextError::Malformed)?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return Err(TraceContextError::ZeroId);
        }
        Ok(Self {
            trace_id,
            parent_id,
            flags,
        })
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.parent_id),
            self.flags
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn round_trips_the_spec_example() {
        let tp: TraceParent = SAMPLE.parse().unwrap();
        assert_eq!(tp.to_string(), SAMPLE);
        assert_eq!(tp.trace_id_hex(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(tp.flags, TraceParent::SAMPLED);
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in [
            "",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333g-01",
        ] {
            assert!(bad.parse::<TraceParent>().is_err(), "{bad}");
        }
    }

    #[test]
    fn children_keep_the_trace_id() {
        let root = TraceParent::new_root([7; 16], [1; 8]).unwrap();
        let child = root.child([2; 8]).unwrap();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.parent_id, root.parent_id);
        assert!(TraceParent::new_root([0; 16], [1; 8]).is_none());
    }

    #[test]
    fn found_among_user_properties() {
        let props = [
            ("command-id", "x"),
            ("traceparent", "junk"),
            ("Traceparent", SAMPLE),
        ];
        let found = TraceParent::from_properties(props.iter().map(|(k, v)| (*k, *v)));
        assert_eq!(found.map(|t| t.to_string()).as_deref(), Some(SAMPLE));
    }
}
