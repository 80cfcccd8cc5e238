//! The Sender Rewriting Scheme for forwarded mail, in the SRS0/SRS1 format of libsrs2 and
//! postsrsd 1.x (byte-identical output for the same secret, day and address).
//!
//! - SRS0 (a plain sender `user@orig`): `SRS0=HHHH=TT=orig=user@srsdomain`.
//! - SRS1 (the sender is already `SRS0<sep>rest@fwd1`): `SRS1=GGGG=fwd1==rest@srsdomain`; an SRS1
//!   sender keeps its first forwarder and opaque rest, and gets a new hash and domain.
//! - `HHHH`: the first 4 characters of the standard base64 of HMAC-SHA1(secret, the fields
//!   lowercased and concatenated without delimiters); `TT`: days since the epoch mod 1024 in two
//!   base32 characters.
//! - Reverse: the hash compares case-insensitively (and accepts postsrsd 2's base64url `-`/`_`),
//!   against every secret (the first signs, all verify); the timestamp is valid for `max_age`
//!   days. SRS1 reverses to the SRS0 address at the first forwarder.

use std::collections::BTreeSet;

use crate::config::Config;

/// libsrs2, postsrsd, Mail::SRS and pysrs all accept a timestamp this many days old.
pub const DEFAULT_MAX_AGE_DAYS: u64 = 21;
const HASH_LEN: usize = 4;
const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const TIME_SLOTS: u64 = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SrsError {
    #[error("not an SRS address")]
    NotSrs,
    #[error("no domain in the sender")]
    NoDomain,
    #[error("no hash in the SRS address")]
    NoHash,
    #[error("no timestamp in the SRS address")]
    NoTimestamp,
    #[error("no host in the SRS address")]
    NoHost,
    #[error("no user in the SRS address")]
    NoUser,
    #[error("bad timestamp in the SRS address")]
    BadTimestamp,
    #[error("the SRS address has expired")]
    Expired,
    #[error("the SRS address has an invalid hash")]
    BadHash,
}

/// Days since the Unix epoch, now.
pub fn today() -> u64 {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    secs / 86400
}

/// The two base32 characters of a day's timestamp (days mod 1024).
pub fn timestamp(day: u64) -> String {
    let slot = day % TIME_SLOTS;
    [BASE32[((slot >> 5) & 31) as usize] as char, BASE32[(slot & 31) as usize] as char].iter().collect()
}

/// The 4-character hash over `fields`, each lowercased (ASCII), concatenated.
pub fn hash(secret: &[u8], fields: &[&str]) -> String {
    use base64::Engine as _;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    for f in fields {
        ctx.update(f.to_ascii_lowercase().as_bytes());
    }
    let mac = ctx.sign();
    let mut b64 = base64::engine::general_purpose::STANDARD.encode(mac.as_ref());
    b64.truncate(HASH_LEN);
    b64
}

/// `SRS0`/`SRS1` (any case) followed by one of the separators `=`, `+`, `-`: the tag's digit.
fn srs_tag(local: &str) -> Option<u8> {
    let b = local.as_bytes();
    if b.len() >= 5 && b[..3].eq_ignore_ascii_case(b"SRS") && matches!(b[4], b'=' | b'+' | b'-') {
        match b[3] {
            b'0' => Some(0),
            b'1' => Some(1),
            _ => None,
        }
    } else {
        None
    }
}

/// Whether a local part has the form of an SRS0 or SRS1 address.
pub fn is_srs_local(local: &str) -> bool {
    srs_tag(local).is_some()
}

/// The rewrite of `sender` into `domain` on `day`, signed with `secret`, as libsrs2's
/// `srs_forward` does it: a sender already in `domain` is returned unchanged.
pub fn forward_at(secret: &[u8], domain: &str, sender: &str, day: u64) -> Result<String, SrsError> {
    let (user, host) = sender.rsplit_once('@').ok_or(SrsError::NoDomain)?;
    if host.is_empty() {
        return Err(SrsError::NoDomain);
    }
    if host.eq_ignore_ascii_case(domain) {
        return Ok(sender.to_string());
    }
    match srs_tag(user) {
        Some(1) => {
            // SRS1<sep>hash=fwd1=rest: keep fwd1 and rest, re-sign.
            let rest = &user[5..];
            let (_, after_hash) = rest.split_once('=').ok_or(SrsError::NoHost)?;
            let (fwd1, opaque) = after_hash.split_once('=').ok_or(SrsError::NoUser)?;
            let h = hash(secret, &[fwd1, opaque]);
            Ok(format!("SRS1={h}={fwd1}={opaque}@{domain}"))
        }
        Some(_) => {
            // SRS0<sep>rest@fwd1: the rest keeps its separator, hence the "==".
            let opaque = &user[4..];
            let h = hash(secret, &[host, opaque]);
            Ok(format!("SRS1={h}={host}={opaque}@{domain}"))
        }
        None => {
            let tt = timestamp(day);
            let h = hash(secret, &[&tt, host, user]);
            Ok(format!("SRS0={h}={tt}={host}={user}@{domain}"))
        }
    }
}

/// Whether a hash from an address (any case, either base64 alphabet) matches one of the
/// secrets' hashes for `fields`. Only the first 4 characters count, as in libsrs2.
fn hash_ok(secrets: &[Vec<u8>], given: &str, fields: &[&str]) -> bool {
    if given.len() < HASH_LEN || !given.is_ascii() {
        return false;
    }
    let norm = |c: u8| match c {
        b'-' => b'+',
        b'_' => b'/',
        c => c.to_ascii_lowercase(),
    };
    let given = &given.as_bytes()[..HASH_LEN];
    secrets.iter().any(|s| {
        let want = hash(s, fields);
        // No early exit: the comparison takes the same time wherever the first difference is.
        want.bytes().zip(given).fold(0u8, |acc, (w, g)| acc | (norm(w) ^ norm(*g))) == 0
    })
}

fn timestamp_ok(stamp: &str, day: u64, max_age: u64) -> Result<(), SrsError> {
    let b = stamp.as_bytes();
    if b.len() != 2 {
        return Err(SrsError::BadTimestamp);
    }
    let mut then = 0u64;
    for c in b {
        let v = BASE32.iter().position(|x| *x == c.to_ascii_uppercase()).ok_or(SrsError::BadTimestamp)?;
        then = (then << 5) | v as u64;
    }
    let mut now = day % TIME_SLOTS;
    while now < then {
        now += TIME_SLOTS;
    }
    if now <= then + max_age {
        Ok(())
    } else {
        Err(SrsError::Expired)
    }
}

/// The address an SRS address stands for, checked against `secrets` on `day`: the original
/// sender for SRS0, the SRS0 address at the first forwarder for SRS1. The domain of `address`
/// is not looked at (the caller knows which domain is ours).
pub fn reverse_at(secrets: &[Vec<u8>], address: &str, day: u64, max_age: u64) -> Result<String, SrsError> {
    let local = address.rsplit_once('@').map_or(address, |(l, _)| l);
    match srs_tag(local) {
        Some(1) => {
            let rest = &local[5..];
            let (h, after_hash) = rest.split_once('=').ok_or(SrsError::NoHost)?;
            let (fwd1, opaque) = after_hash.split_once('=').ok_or(SrsError::NoUser)?;
            if fwd1.is_empty() {
                return Err(SrsError::NoHost);
            }
            if !hash_ok(secrets, h, &[fwd1, opaque]) {
                return Err(SrsError::BadHash);
            }
            Ok(format!("SRS0{opaque}@{fwd1}"))
        }
        Some(_) => {
            let rest = &local[5..];
            if rest.is_empty() || rest.starts_with('=') {
                return Err(SrsError::NoHash);
            }
            let (h, after_hash) = rest.split_once('=').ok_or(SrsError::NoTimestamp)?;
            let (stamp, after_stamp) = after_hash.split_once('=').ok_or(SrsError::NoHost)?;
            let (host, user) = after_stamp.split_once('=').ok_or(SrsError::NoUser)?;
            if host.is_empty() {
                return Err(SrsError::NoHost);
            }
            if user.is_empty() {
                return Err(SrsError::NoUser);
            }
            timestamp_ok(stamp, day, max_age)?;
            if !hash_ok(secrets, h, &[stamp, host, user]) {
                return Err(SrsError::BadHash);
            }
            Ok(format!("{user}@{host}"))
        }
        None => Err(SrsError::NotSrs),
    }
}

/// The cluster's SRS setup: the domain SRS addresses live in, the secrets, and the domains
/// whose senders are never rewritten.
pub struct Srs {
    domain: String,
    secrets: Vec<Vec<u8>>,
    max_age: u64,
    local_domains: BTreeSet<String>,
}

impl Srs {
    /// `secrets` must not be empty; the first signs.
    pub fn new(domain: &str, secrets: Vec<Vec<u8>>, max_age_days: u64, local_domains: &[String]) -> Srs {
        assert!(!secrets.is_empty(), "SRS needs at least one secret");
        Srs {
            domain: domain.to_ascii_lowercase(),
            secrets,
            max_age: max_age_days,
            local_domains: local_domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
        }
    }

    pub fn from_config(config: &Config) -> anyhow::Result<Option<Srs>> {
        let Some(s) = &config.srs else { return Ok(None) };
        if s.secrets.is_empty() {
            anyhow::bail!("srs.secret_file holds no secret");
        }
        let secrets = s.secrets.iter().map(|x| x.0.as_bytes().to_vec()).collect();
        let days = (s.max_age.as_secs() / 86400).max(1);
        Ok(Some(Srs::new(&s.domain, secrets, days, &config.cluster.domains)))
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The envelope sender for mail from `sender` forwarded outside the cluster: the null
    /// sender, senders in the cluster's domains and in the SRS domain stay as they are.
    pub fn forward(&self, sender: &str) -> String {
        self.forward_on(sender, today())
    }

    pub fn forward_on(&self, sender: &str, day: u64) -> String {
        let Some((_, host)) = sender.rsplit_once('@') else { return sender.to_string() };
        let host = host.to_ascii_lowercase();
        if host == self.domain || self.local_domains.contains(&host) {
            return sender.to_string();
        }
        forward_at(&self.secrets[0], &self.domain, sender, day).unwrap_or_else(|_| sender.to_string())
    }

    /// Whether `local@domain` is an SRS address of ours (to be reversed, not looked up).
    pub fn is_ours(&self, local: &str, domain: &str) -> bool {
        domain.eq_ignore_ascii_case(&self.domain) && is_srs_local(local)
    }

    /// Where a bounce to one of our SRS addresses goes, or why it is refused.
    pub fn reverse(&self, address: &str) -> Result<String, SrsError> {
        self.reverse_on(address, today())
    }

    pub fn reverse_on(&self, address: &str, day: u64) -> Result<String, SrsError> {
        reverse_at(&self.secrets, address, day, self.max_age)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2020-01-01 00:01:00 UTC (1577836860 s): day 18262, timestamp `2W`.
    const DAY: u64 = 1577836860 / 86400;

    fn s(x: &str) -> Vec<Vec<u8>> {
        vec![x.as_bytes().to_vec()]
    }

    #[test]
    fn hmac_and_timestamp() {
        assert_eq!(DAY, 18262);
        assert_eq!(timestamp(DAY), "2W");
        assert_eq!(timestamp(DAY - 1), "2V");
        assert_eq!(hash(b"tops3cr3t", &["2W", "otherdomain.com", "test"]), "vmyz");
    }

    /// postsrsd's test suite (research doc part C.2, vectors 1-23).
    #[test]
    fn postsrsd_vectors() {
        let k = b"tops3cr3t";
        let f = |a: &str| forward_at(k, "example.com", a, DAY);
        let r = |a: &str| reverse_at(&s("tops3cr3t"), a, DAY, DEFAULT_MAX_AGE_DAYS);
        assert_eq!(f("test@example.com").unwrap(), "test@example.com");
        assert_eq!(f("test@otherdomain.com").unwrap(), "SRS0=vmyz=2W=otherdomain.com=test@example.com");
        assert_eq!(f("foo"), Err(SrsError::NoDomain));
        assert_eq!(f("hash234@somedomain.com").unwrap(), "SRS0=+3/5=2W=somedomain.com=hash234@example.com");
        assert_eq!(
            f("SRS0=opaque+string@otherdomain.com").unwrap(),
            "SRS1=chaI=otherdomain.com==opaque+string@example.com"
        );
        assert_eq!(
            f("SRS1=X=thirddomain.com==opaque+string@otherdomain.com").unwrap(),
            "SRS1=JIBX=thirddomain.com==opaque+string@example.com"
        );
        let same = "SRS0=XjO9=2V=otherdomain.com=test@example.com";
        assert_eq!(f(same).unwrap(), same);
        assert_eq!(r(same).unwrap(), "test@otherdomain.com");
        assert_eq!(
            r("SRS1=JIBX=thirddomain.com==opaque+string@example.com").unwrap(),
            "SRS0=opaque+string@thirddomain.com"
        );
        assert_eq!(r("test@example.com"), Err(SrsError::NotSrs));
        assert_eq!(r("SRS0=te87=T7=otherdomain.com=test@example.com"), Err(SrsError::Expired));
        assert_eq!(r("SRS0=VcIb=7N=otherdomain.com=test@example.com"), Err(SrsError::Expired));
        assert_eq!(r("SRS0=FAKE=2V=otherdomain.com=test@example.com"), Err(SrsError::BadHash));
        assert_eq!(r("SRS0=FAKE=2V=otherdomain.com=test@foreign.example"), Err(SrsError::BadHash));
        assert_eq!(r("srs0=xjo9=2v=otherdomain.com=test@example.com").unwrap(), "test@otherdomain.com");
        assert_eq!(r("SRS0=XJO9=2V=OTHERDOMAIN.COM=TEST@EXAMPLE.COM").unwrap(), "TEST@OTHERDOMAIN.COM");
        assert_eq!(r("SRS0=-3_5=2W=somedomain.com=hash234@example.com").unwrap(), "hash234@somedomain.com");
        assert_eq!(r("SRS0=+3/5=2W=somedomain.com=hash234@example.com").unwrap(), "hash234@somedomain.com");
        assert_eq!(r("SRS0=@example.com"), Err(SrsError::NoHash));
        assert_eq!(r("SRS0=XjO9@example.com"), Err(SrsError::NoTimestamp));
        assert_eq!(r("SRS0=XjO9=2V@example.com"), Err(SrsError::NoHost));
        assert_eq!(r("SRS0=XjO9=2V=otherdomain.com@example.com"), Err(SrsError::NoUser));
        let long = format!("test@{}.net", "a".repeat(503));
        assert_eq!(f(&long).unwrap(), format!("SRS0=G7tR=2W={}.net=test@example.com", "a".repeat(503)));
        let long = format!("SRS0=iCvJ=2W={}.net=test@example.com", "a".repeat(478));
        assert_eq!(r(&long).unwrap(), format!("test@{}.net", "a".repeat(478)));
    }

    /// Mail::SRS / pysrs chains (research doc part C.2, additional vectors).
    #[test]
    fn chains() {
        let a = forward_at(b"secret", "hostb.com", "usera@hosta.com", DAY).unwrap();
        assert_eq!(a, "SRS0=1Yqg=2W=hosta.com=usera@hostb.com");
        let b = forward_at(b"secret", "hostc.com", &a, DAY).unwrap();
        assert_eq!(b, "SRS1=rd0E=hostb.com==1Yqg=2W=hosta.com=usera@hostc.com");
        let back = reverse_at(&s("secret"), &b, DAY, 21).unwrap();
        assert_eq!(back, a);
        assert_eq!(reverse_at(&s("secret"), &back, DAY, 21).unwrap(), "usera@hosta.com");
        // The input separator may be `+` (SRS0+…); output always uses `=`.
        let c = forward_at(b"shhhh!", "third.com", "SRS0+p2Ph=2W=orig.com=mouse@second.com", DAY).unwrap();
        assert_eq!(c, "SRS1=XBrZ=second.com=+p2Ph=2W=orig.com=mouse@third.com");
        assert_eq!(reverse_at(&s("shhhh!"), &c, DAY, 21).unwrap(), "SRS0+p2Ph=2W=orig.com=mouse@second.com");
    }

    #[test]
    fn timestamps_and_rotation() {
        let addr = forward_at(b"new", "srs.example", "x@y.example", DAY).unwrap();
        let keys = vec![b"old".to_vec(), b"new".to_vec()];
        assert_eq!(reverse_at(&keys, &addr, DAY + 21, 21).unwrap(), "x@y.example");
        assert_eq!(reverse_at(&keys, &addr, DAY + 22, 21), Err(SrsError::Expired));
        assert_eq!(reverse_at(&s("old"), &addr, DAY, 21), Err(SrsError::BadHash));
        // Wrap-around of the 1024-day cycle.
        let day = 1024 * 20 + 1023;
        let addr = forward_at(b"k", "srs.example", "x@y.example", day).unwrap();
        assert_eq!(reverse_at(&s("k"), &addr, day + 3, 21).unwrap(), "x@y.example");
        assert_eq!(reverse_at(&s("k"), &addr, day - 1, 21), Err(SrsError::Expired));
    }

    #[test]
    fn cluster_rules() {
        let srs =
            Srs::new("srs.example.org", vec![b"k1".to_vec()], 21, &["example.org".into(), "srs.example.org".into()]);
        assert_eq!(srs.forward(""), "");
        assert_eq!(srs.forward("alice@Example.ORG"), "alice@Example.ORG");
        assert_eq!(srs.forward("x@srs.example.org"), "x@srs.example.org");
        let a = srs.forward_on("bob@elsewhere.example", DAY);
        assert!(a.starts_with("SRS0=") && a.ends_with("=2W=elsewhere.example=bob@srs.example.org"), "{a}");
        assert!(srs.is_ours("srs0=x", "SRS.example.org"));
        assert!(!srs.is_ours("srs0=x", "example.org"));
        assert!(!srs.is_ours("srs2=x", "srs.example.org"));
        assert_eq!(srs.reverse_on(&a, DAY).unwrap(), "bob@elsewhere.example");
    }
}
