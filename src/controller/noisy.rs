//! Log lines that a peer can cause by the thousand (refused connections, failed handshakes): at
//! most one per kind per interval, followed by a count of the ones held back, so a flood of bad
//! connections cannot fill the disk through the log.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often one kind of line may be written.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Throttled warnings, by kind.
#[derive(Default)]
pub struct Noisy {
    kinds: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl Noisy {
    /// Log `line` as a warning unless a line of `kind` was written in the last [`INTERVAL`]; then
    /// it is only counted, and the count is written with the next line of its kind.
    pub fn warn(&self, kind: &'static str, line: &str) {
        if let Some(held) = self.admit(kind, Instant::now()) {
            if held > 0 {
                log::warn!("{line} (and {held} more like it in the last {}s)", INTERVAL.as_secs());
            } else {
                log::warn!("{line}");
            }
        }
    }

    /// Whether a line of `kind` may be written at `now`, with how many were held back before it.
    fn admit(&self, kind: &'static str, now: Instant) -> Option<u64> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        match kinds.get_mut(kind) {
            Some((last, held)) if now.duration_since(*last) < INTERVAL => {
                *held += 1;
                None
            }
            Some((last, held)) => {
                *last = now;
                Some(std::mem::take(held))
            }
            None => {
                kinds.insert(kind, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_then_the_count() {
        let n = Noisy::default();
        let t = Instant::now();
        assert_eq!(n.admit("a", t), Some(0));
        assert_eq!(n.admit("a", t + Duration::from_secs(1)), None);
        assert_eq!(n.admit("a", t + Duration::from_secs(2)), None);
        assert_eq!(n.admit("b", t + Duration::from_secs(2)), Some(0), "kinds are apart");
        assert_eq!(n.admit("a", t + INTERVAL), Some(2));
        assert_eq!(n.admit("a", t + INTERVAL * 2), Some(0));
    }
}
