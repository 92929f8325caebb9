//! What arrived: every message is counted by publisher and sequence number, so losses,
//! duplicates and late (reordered) arrivals are exact, and each one's latency comes from
//! the send time written into its payload.

/// Bytes every payload starts with (little endian): run nonce `u32`, publisher index
/// `u32`, sequence number `u64`, send time `u64` (nanoseconds since the run's shared
/// `Instant`; publishers and subscribers are in the same process).
pub const HEADER_LEN: usize = 24;

/// A payload of `len` bytes (at least [`HEADER_LEN`]): the header, then zeros.
pub fn encode(len: usize, run: u32, publisher: u32, seq: u64, sent_ns: u64) -> Vec<u8> {
    let mut payload = Vec::with_capacity(len.max(HEADER_LEN));
    payload.extend_from_slice(&run.to_le_bytes());
    payload.extend_from_slice(&publisher.to_le_bytes());
    payload.extend_from_slice(&seq.to_le_bytes());
    payload.extend_from_slice(&sent_ns.to_le_bytes());
    payload.resize(len.max(HEADER_LEN), 0);
    payload
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub run: u32,
    pub publisher: u32,
    pub seq: u64,
    pub sent_ns: u64,
}

/// The header of a payload, or `None` when it is too short to be one of ours.
pub fn decode(payload: &[u8]) -> Option<Header> {
    let run = u32::from_le_bytes(payload.get(0..4)?.try_into().ok()?);
    let publisher = u32::from_le_bytes(payload.get(4..8)?.try_into().ok()?);
    let seq = u64::from_le_bytes(payload.get(8..16)?.try_into().ok()?);
    let sent_ns = u64::from_le_bytes(payload.get(16..24)?.try_into().ok()?);
    Some(Header {
        run,
        publisher,
        seq,
        sent_ns,
    })
}

/// One subscriber's record of what it received.
#[derive(Debug)]
pub struct Tracker {
    run: u32,
    /// Deliveries per publisher and sequence number (saturating at 255).
    seen: Vec<Vec<u8>>,
    /// Highest sequence number seen per publisher, plus one.
    next: Vec<u64>,
    /// Every delivery, duplicates included.
    pub received: u64,
    pub duplicates: u64,
    /// First arrivals of a sequence number lower than one already seen from the same
    /// publisher.
    pub reordered: u64,
    /// Payloads that are not ours, from another run, or out of range.
    pub malformed: u64,
    /// Publish-to-deliver latency of each first arrival, in nanoseconds.
    pub latencies_ns: Vec<u64>,
}

impl Tracker {
    pub fn new(run: u32, publishers: usize, per_publisher: u64) -> Self {
        let per_publisher = usize::try_from(per_publisher).unwrap_or(usize::MAX);
        Self {
            run,
            seen: (0..publishers).map(|_| vec![0; per_publisher]).collect(),
            next: vec![0; publishers],
            received: 0,
            duplicates: 0,
            reordered: 0,
            malformed: 0,
            latencies_ns: Vec::with_capacity(per_publisher.saturating_mul(publishers)),
        }
    }

    /// Records one delivery that arrived at `now_ns` (same clock as the send time).
    pub fn record(&mut self, payload: &[u8], now_ns: u64) {
        self.received += 1;
        let Some(header) = decode(payload).filter(|h| h.run == self.run) else {
            self.malformed += 1;
            return;
        };
        let publisher = usize::try_from(header.publisher).unwrap_or(usize::MAX);
        let seq = usize::try_from(header.seq).unwrap_or(usize::MAX);
        let Some(count) = self
            .seen
            .get_mut(publisher)
            .and_then(|seen| seen.get_mut(seq))
        else {
            self.malformed += 1;
            return;
        };
        if *count > 0 {
            self.duplicates += 1;
            *count = count.saturating_add(1);
            return;
        }
        *count = 1;
        if let Some(next) = self.next.get_mut(publisher) {
            if header.seq < *next {
                self.reordered += 1;
            } else {
                *next = header.seq + 1;
            }
        }
        self.latencies_ns
            .push(now_ns.saturating_sub(header.sent_ns));
    }

    /// Distinct messages received among the first `sent[p]` of each publisher `p`.
    pub fn unique_of(&self, sent: &[u64]) -> u64 {
        self.seen
            .iter()
            .zip(sent)
            .map(|(seen, &n)| {
                let n = usize::try_from(n).unwrap_or(usize::MAX).min(seen.len());
                seen[..n].iter().filter(|&&c| c > 0).count() as u64
            })
            .sum()
    }
}

/// The `q` quantile (0..=1) of sorted values, nearest rank.
pub fn quantile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.saturating_sub(1).min(sorted.len() - 1))
        .copied()
}

/// CPU time (user + system, all threads, in clock ticks) of a process so far, from
/// `/proc/<pid>/stat`.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces; fields 14 and
    // 15 (utime, stime) are the 12th and 13th after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second, from `getconf CLK_TCK` (100 on every Linux we know of, which is
/// also the fallback when `getconf` is missing).
pub fn ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .filter(|output| output.status.success())
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse::<u64>().ok())
        .filter(|&hz| hz > 0)
        .unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip() {
        let payload = encode(64, 7, 3, 12_345, 987_654_321);
        assert_eq!(payload.len(), 64);
        assert_eq!(
            decode(&payload),
            Some(Header {
                run: 7,
                publisher: 3,
                seq: 12_345,
                sent_ns: 987_654_321
            })
        );
        assert_eq!(encode(8, 1, 2, 3, 4).len(), HEADER_LEN);
        assert_eq!(decode(&payload[..23]), None);
    }

    #[test]
    fn counts_losses_duplicates_and_reordering() {
        let mut t = Tracker::new(1, 2, 4);
        t.record(&encode(24, 1, 0, 0, 100), 150);
        t.record(&encode(24, 1, 0, 2, 100), 300);
        t.record(&encode(24, 1, 0, 1, 100), 400); // late
        t.record(&encode(24, 1, 0, 1, 100), 500); // duplicate
        t.record(&encode(24, 1, 1, 3, 100), 200);
        t.record(&encode(24, 2, 1, 0, 100), 200); // another run
        t.record(&encode(24, 1, 5, 0, 100), 200); // no such publisher
        t.record(&encode(24, 1, 1, 4, 100), 200); // beyond what was planned
        t.record(b"short", 200);
        assert_eq!(t.received, 9);
        assert_eq!(t.unique_of(&[4, 4]), 4);
        assert_eq!(t.unique_of(&[2, 4]), 3);
        assert_eq!(t.duplicates, 1);
        assert_eq!(t.reordered, 1);
        assert_eq!(t.malformed, 4);
        assert_eq!(t.latencies_ns, vec![50, 200, 300, 100]);
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(quantile(&v, 0.5), Some(500));
        assert_eq!(quantile(&v, 0.99), Some(990));
        assert_eq!(quantile(&v, 0.999), Some(999));
        assert_eq!(quantile(&v, 1.0), Some(1000));
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[42], 0.999), Some(42));
    }

    #[test]
    fn reads_our_own_cpu_time() {
        assert!(cpu_ticks(std::process::id()).is_some());
        assert!(ticks_per_second() > 0);
    }
}
