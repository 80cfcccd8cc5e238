//! Retry times and give-up times: pure functions of the entry and the settings.

use std::time::Duration;

use crate::config::OutboundSettings;

/// When to try again after `attempts` failed attempts (1 = the first one failed): Postfix's
/// schedule, `retry_initial` doubling up to `retry_max`.
pub fn next_attempt(now: i64, attempts: u32, s: &OutboundSettings) -> i64 {
    let doublings = attempts.saturating_sub(1).min(32);
    let delay = s.retry_initial.saturating_mul(1u32 << doublings.min(31)).min(s.retry_max);
    now + secs(delay)
}

/// The message has been queued for `lifetime`: bounce what is left.
pub fn expired(created: i64, now: i64, s: &OutboundSettings) -> bool {
    now - created >= secs(s.lifetime)
}

/// A delay warning is due (once per message).
pub fn warning_due(created: i64, now: i64, warned: bool, s: &OutboundSettings) -> bool {
    !warned && s.delay_warning.is_some_and(|w| now - created >= secs(w))
}

/// When the queue gives up on a message created at `created`.
pub fn give_up_at(created: i64, s: &OutboundSettings) -> i64 {
    created + secs(s.lifetime)
}

fn secs(d: Duration) -> i64 {
    // Sub-second settings (tests) still move time forward.
    i64::try_from(d.as_secs().max(1)).unwrap_or(i64::MAX / 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postfix_like_defaults() {
        let s = OutboundSettings::default();
        let delays: Vec<i64> = (1..=6).map(|n| next_attempt(0, n, &s)).collect();
        assert_eq!(delays, [300, 600, 1200, 2400, 3600, 3600]);
        assert_eq!(next_attempt(0, 1000, &s), 3600);
        assert!(!expired(0, 5 * 86400 - 1, &s));
        assert!(expired(0, 5 * 86400, &s));
        assert!(!warning_due(0, 4 * 3600 - 1, false, &s));
        assert!(warning_due(0, 4 * 3600, false, &s));
        assert!(!warning_due(0, 4 * 3600, true, &s));
        let off = OutboundSettings { delay_warning: None, ..Default::default() };
        assert!(!warning_due(0, 100 * 86400, false, &off));
    }
}
