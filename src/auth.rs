//! Passwords: argon2id hashes in the config, verified off the async runtime because a hash
//! takes tens of milliseconds of CPU by design.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// An argon2id PHC string with the crate's default (OWASP-recommended) parameters.
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default().hash_password(password.as_bytes(), &salt).expect("argon2 with default parameters").to_string()
}

/// Constant-time verification of a password against a PHC string.
pub fn verify_password(hash: &str, password: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok(),
        Err(_) => false,
    }
}

/// `verify_password` on the blocking pool, a few at a time: each argon2id check takes 19 MiB
/// for its run (the default m=19456 KiB) and a core, so 32 clients logging in at once would
/// otherwise take 600 MiB and leave it fragmented in the allocator. Beyond one per core the
/// checks only queue on the CPU anyway.
pub async fn verify_password_async(hash: String, password: String) -> bool {
    static SLOTS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    let slots = SLOTS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        tokio::sync::Semaphore::new(cores.clamp(1, 8))
    });
    let Ok(_permit) = slots.acquire().await else { return false };
    tokio::task::spawn_blocking(move || verify_password(&hash, &password)).await.unwrap_or(false)
}

/// A random password for generated accounts: 20 characters from an unambiguous alphabet.
pub fn generate_password() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::thread_rng();
    (0..20).map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char).collect()
}

/// Failed-authentication accounting, per client address and per user name, for any protocol
/// (SMTP submission now, IMAP later). Each key counts failures in a fixed window that starts at
/// its first failure; once a key reaches its limit, attempts are refused without checking the
/// password until the window ends. Memory is bounded: expired entries are dropped and each map
/// holds at most `MAX_ENTRIES` keys (the oldest window is evicted first).
pub struct AuthLimiter {
    per_ip: usize,
    per_user: usize,
    window: std::time::Duration,
    state: std::sync::Mutex<LimiterState>,
}

#[derive(Default)]
struct LimiterState {
    ips: std::collections::HashMap<std::net::IpAddr, Failures>,
    users: std::collections::HashMap<String, Failures>,
}

#[derive(Clone, Copy)]
struct Failures {
    count: usize,
    since: std::time::Instant,
}

/// Keys per map (addresses, user names); a few hundred kilobytes at most.
pub const MAX_ENTRIES: usize = 10_000;

/// IPv6 clients usually own a whole /64: count it as one address.
fn ip_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            std::net::IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        std::net::IpAddr::V6(v6) => std::net::IpAddr::V4(v6.to_ipv4_mapped().expect("checked")),
        v4 => v4,
    }
}

fn over<K: std::hash::Hash + Eq>(
    map: &std::collections::HashMap<K, Failures>,
    key: &K,
    limit: usize,
    window: std::time::Duration,
    now: std::time::Instant,
) -> bool {
    map.get(key).is_some_and(|f| now.duration_since(f.since) < window && f.count >= limit)
}

fn bump<K: std::hash::Hash + Eq + Clone>(
    map: &mut std::collections::HashMap<K, Failures>,
    key: K,
    window: std::time::Duration,
    now: std::time::Instant,
    cap: usize,
) {
    if !map.contains_key(&key) && map.len() >= cap {
        map.retain(|_, f| now.duration_since(f.since) < window);
        if map.len() >= cap {
            if let Some(oldest) = map.iter().min_by_key(|(_, f)| f.since).map(|(k, _)| k.clone()) {
                map.remove(&oldest);
            }
        }
    }
    let f = map.entry(key).or_insert(Failures { count: 0, since: now });
    if now.duration_since(f.since) >= window {
        *f = Failures { count: 0, since: now };
    }
    f.count += 1;
}

impl AuthLimiter {
    pub fn new(per_ip: usize, per_user: usize, window: std::time::Duration) -> Self {
        AuthLimiter { per_ip, per_user, window, state: Default::default() }
    }

    /// True when this address, or this user name (case-insensitive) when given, has used up
    /// its failed attempts: refuse without checking the password.
    pub fn blocked(&self, ip: std::net::IpAddr, user: Option<&str>) -> bool {
        let now = std::time::Instant::now();
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        over(&state.ips, &ip_key(ip), self.per_ip, self.window, now)
            || user.is_some_and(|u| over(&state.users, &u.to_lowercase(), self.per_user, self.window, now))
    }

    /// Counts one failed attempt against the address and the user name.
    pub fn record_failure(&self, ip: std::net::IpAddr, user: Option<&str>) {
        self.record_failure_at(ip, user, std::time::Instant::now(), MAX_ENTRIES);
    }

    fn record_failure_at(&self, ip: std::net::IpAddr, user: Option<&str>, now: std::time::Instant, cap: usize) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        bump(&mut state.ips, ip_key(ip), self.window, now, cap);
        if let Some(u) = user {
            bump(&mut state.users, u.to_lowercase(), self.window, now, cap);
        }
    }

    /// Keys currently held (addresses, user names).
    pub fn entries(&self) -> (usize, usize) {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (state.ips.len(), state.users.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let h = hash_password("correct horse");
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password(&h, "correct horse"));
        assert!(!verify_password(&h, "wrong"));
        assert!(!verify_password("plaintext", "plaintext"));
    }
    #[test]
    fn limiter_counts_per_ip_and_user() {
        let l = AuthLimiter::new(3, 2, std::time::Duration::from_secs(60));
        let ip: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let other: std::net::IpAddr = "192.0.2.2".parse().unwrap();
        assert!(!l.blocked(ip, Some("alice@example.org")));
        l.record_failure(ip, Some("alice@example.org"));
        assert!(!l.blocked(ip, Some("alice@example.org")));
        l.record_failure(other, Some("ALICE@example.org"));
        // The user is over its limit from any address; the addresses are not yet.
        assert!(l.blocked(ip, Some("alice@example.org")));
        assert!(l.blocked("198.51.100.1".parse().unwrap(), Some("Alice@Example.org")));
        assert!(!l.blocked(ip, Some("bob@example.org")));
        l.record_failure(ip, Some("carol@example.org"));
        l.record_failure(ip, None);
        assert!(l.blocked(ip, Some("bob@example.org")));
        assert!(l.blocked(ip, None));
        assert!(!l.blocked(other, None));
    }

    #[test]
    fn limiter_window_and_ipv6_prefix() {
        let l = AuthLimiter::new(1, 10, std::time::Duration::from_millis(50));
        let a: std::net::IpAddr = "2001:db8::1".parse().unwrap();
        let b: std::net::IpAddr = "2001:db8::2".parse().unwrap();
        l.record_failure(a, None);
        assert!(l.blocked(b, None), "same /64");
        assert!(!l.blocked("2001:db8:0:1::1".parse().unwrap(), None));
        std::thread::sleep(std::time::Duration::from_millis(80));
        assert!(!l.blocked(a, None), "window over");
    }

    #[test]
    fn limiter_memory_is_bounded() {
        let l = AuthLimiter::new(5, 5, std::time::Duration::from_secs(60));
        let now = std::time::Instant::now();
        for i in 0..100u32 {
            let ip = std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            l.record_failure_at(
                ip,
                Some(&format!("u{i}@example.org")),
                now + std::time::Duration::from_millis(i as u64),
                10,
            );
        }
        assert_eq!(l.entries(), (10, 10));
    }
}
