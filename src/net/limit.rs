use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Counts open connections per client address and in total; a guard gives its slot back on drop.
#[derive(Clone)]
pub struct ConnLimiter {
    inner: Arc<Mutex<Counts>>,
    per_ip: usize,
    total: usize,
}

#[derive(Default)]
struct Counts {
    by_ip: HashMap<IpAddr, usize>,
    total: usize,
}

pub struct ConnGuard {
    inner: Arc<Mutex<Counts>>,
    ip: IpAddr,
}

impl ConnLimiter {
    pub fn new(per_ip: usize, total: usize) -> Self {
        ConnLimiter { inner: Arc::default(), per_ip, total }
    }

    /// A slot for `ip`, or `None` when it (or the server) is at its limit.
    pub fn acquire(&self, ip: IpAddr) -> Option<ConnGuard> {
        let mut c = self.inner.lock().expect("limiter lock");
        let n = c.by_ip.get(&ip).copied().unwrap_or(0);
        if n >= self.per_ip || c.total >= self.total {
            return None;
        }
        c.by_ip.insert(ip, n + 1);
        c.total += 1;
        Some(ConnGuard { inner: self.inner.clone(), ip })
    }

    pub fn current(&self) -> usize {
        self.inner.lock().expect("limiter lock").total
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut c = self.inner.lock().expect("limiter lock");
        c.total -= 1;
        if let Some(n) = c.by_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.by_ip.remove(&self.ip);
            }
        }
    }
}
