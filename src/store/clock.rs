//! Hybrid logical clock for change ids: milliseconds in the high 48 bits, a counter in the low 16.
//! It never goes backwards, even when the wall clock does, so change ids from one node are
//! strictly increasing, and the node id makes them unique across the cluster.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub struct Hlc {
    last: AtomicU64,
}

impl Hlc {
    /// Starts above `floor` (the last value persisted before a restart).
    pub fn new(floor: u64) -> Self {
        Hlc { last: AtomicU64::new(floor) }
    }

    fn physical() -> u64 {
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        ms << 16
    }

    /// The next value: the wall clock when it is ahead, else one more than the last value.
    pub fn tick(&self) -> u64 {
        let now = Self::physical();
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = if now > last { now } else { last + 1 };
            match self.last.compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    /// Moves the clock past a value seen from elsewhere (a peer's change), as an HLC must.
    #[allow(dead_code)] // replication (a later release) calls this
    pub fn observe(&self, seen: u64) {
        self.last.fetch_max(seen, Ordering::AcqRel);
    }

    pub fn current(&self) -> u64 {
        self.last.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strictly_increasing_even_with_a_floor_in_the_future() {
        let future = Hlc::physical() + (1 << 40);
        let c = Hlc::new(future);
        let a = c.tick();
        let b = c.tick();
        assert!(a > future && b > a);
        c.observe(b + 100);
        assert!(c.tick() > b + 100);
    }
}
