//! The syntax of single config values: durations, sizes, host names, addresses, password hashes.
//!
//! Timeouts and limits are written with units so a reader never has to guess whether `300` meant
//! seconds or milliseconds; that is also why bare numbers are refused for durations. The
//! `format_*` functions produce the shortest form that parses back to the same value, so messages
//! and `check-config` output can be pasted into a config file. [`Scope`] holds what addresses are
//! checked against, so users and aliases apply the same rules.

use std::net::IpAddr;
use std::time::Duration;

use argon2::password_hash::PasswordHash;

const DURATION_FORMS: &str =
    "expected a whole number followed by a unit (ms, s, m, h, d, w), or several in decreasing order, \
     e.g. \"500ms\", \"90s\", \"10m\", \"1h30m\", \"2d\", \"4w\"";

/// Duration units, largest first, in milliseconds; the order is what "decreasing order" means.
const DURATION_UNITS: [(&str, u64); 6] = [
    ("w", 7 * 24 * 3600 * 1000),
    ("d", 24 * 3600 * 1000),
    ("h", 3600 * 1000),
    ("m", 60 * 1000),
    ("s", 1000),
    ("ms", 1),
];

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    let fail = |why: &str| Err(format!("invalid duration {s:?}{why}: {DURATION_FORMS}"));
    if text.is_empty() {
        return fail("");
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return fail(" (a bare number has no unit)");
    }
    let mut rest = text;
    let mut total: u64 = 0;
    // Index into DURATION_UNITS of the last unit used; later components must use a smaller one,
    // which rules out ambiguous spellings like "1m1m" or "30m1h".
    let mut last_unit: Option<usize> = None;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return fail("");
        }
        let Ok(number) = rest[..digits].parse::<u64>() else {
            return fail(" (number too large)");
        };
        rest = &rest[digits..];
        let letters = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..letters];
        rest = &rest[letters..];
        let Some(index) = DURATION_UNITS.iter().position(|(name, _)| *name == unit) else {
            return if unit.is_empty() {
                fail(" (a number has no unit)")
            } else {
                fail(&format!(" (unknown unit {unit:?})"))
            };
        };
        if last_unit.is_some_and(|last| index <= last) {
            return fail(" (units out of order)");
        }
        last_unit = Some(index);
        let Some(sum) = number.checked_mul(DURATION_UNITS[index].1).and_then(|ms| total.checked_add(ms)) else {
            return fail(" (too large)");
        };
        total = sum;
    }
    Ok(Duration::from_millis(total))
}

/// Sub-millisecond parts are dropped: no config value is that fine-grained.
pub fn format_duration(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    for (name, size) in DURATION_UNITS {
        let size = u128::from(size);
        if ms >= size {
            out.push_str(&format!("{}{name}", ms / size));
            ms %= size;
        }
    }
    out
}

const SIZE_FORMS: &str = "expected a whole number of bytes, optionally followed by a unit \
     (B, KB, MB, GB, TB = powers of 1000; KiB, MiB, GiB, TiB = powers of 1024), e.g. \"50MB\", \"64MiB\", \"1000\"";

/// Size units, largest first, so `format_size` picks the biggest exact one.
const SIZE_UNITS: [(&str, u64); 8] = [
    ("TiB", 1 << 40),
    ("TB", 1_000_000_000_000),
    ("GiB", 1 << 30),
    ("GB", 1_000_000_000),
    ("MiB", 1 << 20),
    ("MB", 1_000_000),
    ("KiB", 1 << 10),
    ("KB", 1_000),
];

pub fn parse_size(s: &str) -> Result<u64, String> {
    let text = s.trim();
    let fail = |why: &str| Err(format!("invalid size {s:?}{why}: {SIZE_FORMS}"));
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return fail("");
    }
    let Ok(number) = text[..digits].parse::<u64>() else {
        return fail(" (number too large)");
    };
    let unit = text[digits..].trim_start();
    let multiplier = if unit.is_empty() || unit.eq_ignore_ascii_case("b") {
        1
    } else {
        match SIZE_UNITS.iter().find(|(name, _)| name.eq_ignore_ascii_case(unit)) {
            Some((_, m)) => *m,
            None => return fail(&format!(" (unknown unit {unit:?})")),
        }
    };
    number.checked_mul(multiplier).map_or_else(|| fail(" (too large)"), Ok)
}

/// Uses the largest unit that divides `n` exactly, so the text parses back to the same number.
pub fn format_size(n: u64) -> String {
    if n == 0 {
        return "0B".to_string();
    }
    for (name, size) in SIZE_UNITS {
        if n.is_multiple_of(size) {
            return format!("{}{name}", n / size);
        }
    }
    format!("{n}B")
}

/// What users and aliases are checked against.
pub(super) struct Scope {
    /// The valid cluster domains; `None` when `domains` itself could not be read, since checking
    /// membership then would only repeat that one mistake many times.
    pub(super) domains: Option<Vec<String>>,
    /// Entries of `domains` that were refused, lowercased: membership in them is unknown.
    pub(super) refused: Vec<String>,
    pub(super) separator: Option<char>,
}

impl Scope {
    pub(super) fn unknown() -> Self {
        Scope { domains: None, refused: Vec::new(), separator: Some('+') }
    }

    pub(super) fn check_domain(&self, domain: &str) -> Result<(), String> {
        match (&self.domains, self.is_local(domain)) {
            (Some(domains), Some(false)) => {
                Err(format!("domain `{domain}` is not one of the cluster's domains ({})", domains.join(", ")))
            }
            _ => Ok(()),
        }
    }

    /// `None` when unknown (see `domains` and `refused`).
    pub(super) fn is_local(&self, domain: &str) -> Option<bool> {
        let domains = self.domains.as_ref()?;
        if domains.iter().any(|d| d == domain) {
            Some(true)
        } else if self.refused.iter().any(|d| d == domain) {
            None
        } else {
            Some(false)
        }
    }

    /// `bob+lists@d` → `bob@d`, the address that receives subaddressed mail.
    pub(super) fn strip_subaddress(&self, address: &str) -> Option<String> {
        let (local, domain) = address.rsplit_once('@')?;
        let cut = local.find(self.separator?)?;
        (cut > 0).then(|| format!("{}@{domain}", &local[..cut]))
    }

    /// A user or alias address: lowercase, domain checked against the cluster.
    pub(super) fn address(&self, text: &str) -> Result<String, String> {
        let address = self.normalize_address(text)?;
        let (_, domain) = address.rsplit_once('@').unwrap_or_default();
        self.check_domain(domain)?;
        Ok(address)
    }

    /// [`normalize_address`], except that a domain already refused in `[cluster]` is let through
    /// (unchecked) so its mistake is not reported again for every address in it.
    pub(super) fn normalize_address(&self, text: &str) -> Result<String, String> {
        match text.rsplit_once('@') {
            Some((_, domain)) if self.was_refused(domain) => Ok(text.to_lowercase()),
            _ => normalize_address(text),
        }
    }

    /// [`normalize_domain`], with the same exception as [`Scope::normalize_address`].
    pub(super) fn normalize_domain(&self, text: &str) -> Result<String, String> {
        if self.was_refused(text) {
            return Ok(text.to_lowercase());
        }
        normalize_domain(text)
    }

    fn was_refused(&self, domain: &str) -> bool {
        let domain = domain.strip_suffix('.').unwrap_or(domain).to_lowercase();
        self.refused.contains(&domain)
    }
}

/// Lowercases and checks the shape of `local@domain`; the domain is not checked against the
/// cluster here because alias targets may (one day) lie outside it.
pub(super) fn normalize_address(text: &str) -> Result<String, String> {
    let lower = text.to_lowercase();
    let Some((local, domain)) = lower.rsplit_once('@') else {
        return Err(format!("`{text}` is not an email address (expected local@domain)"));
    };
    let special = |c: char| c.is_whitespace() || c.is_control() || "\"(),:;<>@[\\]".contains(c);
    if local.is_empty() || local.len() > 64 || local.contains(special) {
        return Err(format!("`{text}` has an invalid local part (before the @)"));
    }
    if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
        return Err(format!("`{text}` has an invalid local part: dots may not start, end or repeat"));
    }
    let domain = normalize_domain(domain)?;
    Ok(format!("{local}@{domain}"))
}

/// Lowercase, without the trailing dot, and shaped like a DNS host name. A single label is only
/// accepted as `localhost`, because anything else is almost always a typo for a real domain.
pub(super) fn normalize_domain(text: &str) -> Result<String, String> {
    let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    if name.parse::<IpAddr>().is_ok() {
        return Err(format!("`{text}` is an IP address, not a host name"));
    }
    if !valid_labels(&name) {
        return Err(format!(
            "`{text}` is not a valid host name (labels of a-z, 0-9 and '-', not starting or ending with '-'; \
             write international names in punycode)"
        ));
    }
    if !name.contains('.') && name != "localhost" {
        return Err(format!("`{text}` is not a fully qualified host name (expected something like example.org)"));
    }
    Ok(name)
}

pub(super) fn valid_labels(name: &str) -> bool {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    name.len() <= 253 && name.split('.').all(label_ok)
}

/// The config is shared by every node and often kept in git, so it must never hold a usable
/// password; argon2 is what the login code verifies.
pub(super) fn check_password_hash(text: &str) -> Result<(), String> {
    const HINT: &str = "generate one with `postern hash-password` and paste its output";
    if !text.starts_with('$') {
        return Err(format!("this looks like a plaintext password; store an argon2 hash instead: {HINT}"));
    }
    let hash = PasswordHash::new(text).map_err(|e| format!("not a valid password hash string ({e}); {HINT}"))?;
    let algorithm = hash.algorithm.as_str();
    if !matches!(algorithm, "argon2id" | "argon2i" | "argon2d") {
        return Err(format!(
            "password hash algorithm `{algorithm}` is not supported (only argon2id, argon2i, argon2d); {HINT}"
        ));
    }
    if hash.salt.is_none() || hash.hash.is_none() {
        return Err(format!("the password hash has no salt or no hash value; {HINT}"));
    }
    argon2::Params::try_from(&hash).map_err(|e| format!("invalid argon2 parameters ({e}); {HINT}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        let cases = [
            ("90s", 90_000),
            ("10m", 600_000),
            ("4w", 4 * 7 * 24 * 3600 * 1000),
            ("1h30m", 5_400_000),
            ("500ms", 500),
            ("2d", 2 * 24 * 3600 * 1000),
            ("1m30s250ms", 90_250),
            (" 5m ", 300_000),
            ("0s", 0),
        ];
        for (text, ms) in cases {
            assert_eq!(parse_duration(text), Ok(Duration::from_millis(ms)), "{text}");
        }
    }

    #[test]
    fn durations_refuse_bad_forms() {
        for text in
            ["", "300", "5", "m", "5x", "1m1m", "30m1h", "1.5h", "-5s", "5 m", "1h 30m", "99999999999999999999s"]
        {
            let err = parse_duration(text).unwrap_err();
            assert!(err.contains("1h30m") && err.contains("ms, s, m, h, d, w"), "{text}: {err}");
        }
        assert!(parse_duration("300").unwrap_err().contains("no unit"));
        assert!(parse_duration(&format!("{}w", u64::MAX / 1000)).unwrap_err().contains("too large"));
    }

    #[test]
    fn durations_format_and_round_trip() {
        for text in ["5m", "1h30m", "90ms", "4w", "2d", "1w2d3h4m5s6ms", "0s", "59s"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
        assert_eq!(format_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(format_duration(Duration::from_secs(14 * 24 * 3600)), "2w");
        assert_eq!(format_duration(Duration::from_micros(1500)), "1ms");
        for ms in [1, 999, 1000, 61_000, 3_600_001, 1_234_567_890] {
            let d = Duration::from_millis(ms);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }

    #[test]
    fn sizes_parse() {
        let cases = [
            ("50MB", 50_000_000),
            ("64MiB", 64 << 20),
            ("10KB", 10_000),
            ("1GB", 1_000_000_000),
            ("1000", 1000),
            ("512B", 512),
            ("64mib", 64 << 20),
            ("10kb", 10_000),
            ("2 GiB", 2 << 30),
            ("1TB", 1_000_000_000_000),
            ("0", 0),
        ];
        for (text, n) in cases {
            assert_eq!(parse_size(text), Ok(n), "{text}");
        }
    }

    #[test]
    fn sizes_refuse_bad_forms() {
        for text in ["", "MB", "5M", "1.5GB", "-1", "10 XB", "99999999999999999999", "20000000TB"] {
            let err = parse_size(text).unwrap_err();
            assert!(err.contains("MiB") && err.contains("50MB"), "{text}: {err}");
        }
    }

    #[test]
    fn sizes_format_and_round_trip() {
        assert_eq!(format_size(50_000_000), "50MB");
        assert_eq!(format_size(64 << 20), "64MiB");
        assert_eq!(format_size(1000), "1KB");
        assert_eq!(format_size(1536), "1536B");
        assert_eq!(format_size(0), "0B");
        for n in [0, 1, 512, 1000, 1024, 1_024_000, 50_000_000, 64 << 20, 3 << 40, u64::MAX] {
            assert_eq!(parse_size(&format_size(n)), Ok(n), "{n}");
        }
        for text in ["50MB", "64MiB", "10KB", "1GB", "512B", "3TiB"] {
            assert_eq!(format_size(parse_size(text).unwrap()), text);
        }
    }

    #[test]
    fn password_hashes() {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let salt = SaltString::from_b64("c29tZXNhbHQ").unwrap();
        for algorithm in [argon2::Algorithm::Argon2id, argon2::Algorithm::Argon2i, argon2::Algorithm::Argon2d] {
            let hasher =
                argon2::Argon2::new(algorithm, argon2::Version::V0x13, argon2::Params::new(64, 1, 1, None).unwrap());
            let hash = hasher.hash_password(b"secret", &salt).unwrap().to_string();
            assert_eq!(check_password_hash(&hash), Ok(()), "{hash}");
        }
        let refused = [
            ("hunter2", "plaintext"),
            ("$argon2id$v=19$m=19456,t=2,p=1", "no salt"),
            ("$argon2id$v=19$m=1,t=2,p=1$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG", "invalid argon2 parameters"),
            ("$6$salt$abcdefgh", "postern hash-password"),
            ("$scrypt$ln=16,r=8,p=1$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG", "not supported"),
        ];
        for (text, needle) in refused {
            let err = check_password_hash(text).unwrap_err();
            assert!(err.contains(needle) && err.contains("postern hash-password"), "{text}: {err}");
        }
    }

    #[test]
    fn names_and_addresses() {
        assert_eq!(normalize_domain("Mail.Example.ORG.").as_deref(), Ok("mail.example.org"));
        assert_eq!(normalize_domain("localhost").as_deref(), Ok("localhost"));
        assert_eq!(normalize_domain("xn--bcher-kva.example").as_deref(), Ok("xn--bcher-kva.example"));
        for bad in ["", "example", "-a.org", "a-.org", "a..org", "a_b.org", "bücher.example", "127.0.0.1", "a.org:25"]
        {
            assert!(normalize_domain(bad).is_err(), "{bad}");
        }
        assert_eq!(normalize_address("Bob.Smith+X@Example.org").as_deref(), Ok("bob.smith+x@example.org"));
        for bad in
            ["bob", "@example.org", "bob@", "a b@example.org", ".bob@example.org", "a..b@example.org", "a@b@c.org"]
        {
            assert!(normalize_address(bad).is_err(), "{bad}");
        }
    }
}
