//! What quickstart checks from the machine before it writes anything: the host name, the
//! addresses of this machine and of the host name in DNS (forward and reverse), NAT, and whether
//! outbound port 25 is open. Each check has a time limit and none is fatal: each finding says what
//! is fine or what to fix.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::dns::{DnsError, Resolver};

/// How long the outbound port 25 probe may take (connect plus greeting).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whose MX the outbound port 25 probe connects to when no `--smtp-probe` is given: a large
/// provider whose MX hosts always answer.
pub const PROBE_DOMAIN: &str = "gmail.com";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warning,
}

/// One finding: what was seen, and for a warning what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    pub text: String,
    pub fix: Option<String>,
}

impl Finding {
    pub fn ok(text: impl Into<String>) -> Finding {
        Finding { level: Level::Ok, text: text.into(), fix: None }
    }

    pub fn warn(text: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding { level: Level::Warning, text: text.into(), fix: Some(fix.into()) }
    }

    /// Zone-file comment lines: `; ok: ...` or `; WARNING: ...` and `;   fix: ...`.
    pub fn render(&self) -> String {
        let mut out = match self.level {
            Level::Ok => format!("; ok: {}\n", self.text),
            Level::Warning => format!("; WARNING: {}\n", self.text),
        };
        if let Some(fix) = &self.fix {
            out.push_str(&format!(";   fix: {fix}\n"));
        }
        out
    }
}

/// Where an address is reachable from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Loopback,
    LinkLocal,
    /// RFC 1918, shared address space (RFC 6598, carrier NAT), unique local IPv6 (fc00::/7).
    Private,
    Public,
}

pub fn classify(ip: IpAddr) -> Class {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => classify_v4(v4),
            None if v6.is_loopback() || v6.is_unspecified() => Class::Loopback,
            None if v6.segments()[0] & 0xffc0 == 0xfe80 => Class::LinkLocal,
            None if v6.segments()[0] & 0xfe00 == 0xfc00 => Class::Private,
            None => Class::Public,
        },
    }
}

fn classify_v4(ip: Ipv4Addr) -> Class {
    let o = ip.octets();
    if ip.is_loopback() || ip.is_unspecified() {
        Class::Loopback
    } else if ip.is_link_local() {
        Class::LinkLocal
    } else if ip.is_private() || (o[0] == 100 && (o[1] & 0xc0) == 64) {
        Class::Private
    } else {
        Class::Public
    }
}

/// The addresses of this machine's network interfaces (without link-local ones), sorted.
pub fn interface_addresses() -> Vec<IpAddr> {
    let mut out = crate::net::interface_addresses();
    out.retain(|ip| classify(*ip) != Class::LinkLocal);
    out.sort();
    out.dedup();
    out
}

/// Whether `name` is a fully qualified host name that can be a node's `hostname`.
pub fn fqdn_check(name: &str, guessed: bool) -> Finding {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    let valid = name.contains('.') && name.len() <= 253 && name.split('.').all(label_ok);
    match (valid, guessed) {
        (true, false) => Finding::ok(format!("{name} is a fully qualified host name")),
        (true, true) => Finding::warn(
            format!("this machine's name is not fully qualified; the node's name was guessed as {name}"),
            "if that is not the name the node will have in DNS, start over with `--hostname mail.example.org`",
        ),
        (false, _) => Finding::warn(
            format!("{name:?} is not a fully qualified host name"),
            "pass the node's public name: `--hostname mail.example.org`",
        ),
    }
}

/// The A/AAAA addresses of `hostname` in DNS, with a finding about them.
pub async fn forward_check(resolver: &Resolver, hostname: &str) -> (Vec<IpAddr>, Finding) {
    match resolver.addresses(hostname).await {
        Ok(ips) if !ips.is_empty() => {
            let f = Finding::ok(format!("{hostname} resolves to {}", join(&ips)));
            (ips, f)
        }
        Ok(_) | Err(DnsError::NoSuchDomain) => (
            Vec::new(),
            Finding::warn(
                format!("{hostname} has no A or AAAA record in DNS"),
                format!("publish the A/AAAA records printed below for {hostname}"),
            ),
        ),
        Err(e) => (
            Vec::new(),
            Finding::warn(
                format!("could not look up {hostname}: {e}"),
                "check the name servers (`--nameserver IP:PORT` picks others), then run `postern dns-check`",
            ),
        ),
    }
}

/// Reverse DNS of each address: its PTR record must name `hostname` (forward-confirmed
/// reverse DNS, which many receivers require).
pub async fn reverse_check(resolver: &Resolver, hostname: &str, ips: &[IpAddr]) -> Vec<Finding> {
    let mut out = Vec::new();
    for ip in ips {
        let fix = format!(
            "ask the provider of {ip} (hosting panel, or your internet provider) to set its reverse DNS \
             to {hostname} (`{}. {} IN PTR {hostname}.`)",
            super::zone::reverse_name(*ip),
            super::zone::TTL
        );
        match resolver.ptr(*ip).await {
            Ok(names) if names.iter().any(|n| n == hostname) => {
                out.push(Finding::ok(format!("reverse DNS of {ip} is {hostname}")))
            }
            Ok(names) if !names.is_empty() => {
                out.push(Finding::warn(format!("reverse DNS of {ip} is {}, not {hostname}", names.join(", ")), fix))
            }
            Ok(_) | Err(DnsError::NoSuchDomain) => {
                out.push(Finding::warn(format!("{ip} has no reverse DNS (PTR) record"), fix))
            }
            Err(e) => out.push(Finding::warn(format!("could not look up the reverse DNS of {ip}: {e}"), fix)),
        }
    }
    out
}

/// Loopback addresses among those `hostname` resolves to that are not the ones to publish.
pub fn loopback_check(hostname: &str, resolved: &[IpAddr], published: &[IpAddr]) -> Option<Finding> {
    let bad: Vec<IpAddr> =
        resolved.iter().copied().filter(|ip| classify(*ip) == Class::Loopback && !published.contains(ip)).collect();
    (!bad.is_empty()).then(|| {
        Finding::warn(
            format!("{hostname} resolves to {}, a loopback address", join(&bad)),
            format!("publish the node's public address as the A/AAAA record of {hostname}"),
        )
    })
}

/// NAT: the addresses the node is published at (or resolves to) compared with the addresses of
/// this machine's interfaces.
pub fn nat_check(hostname: &str, interfaces: &[IpAddr], published: &[IpAddr]) -> Finding {
    let public_here: Vec<IpAddr> = interfaces.iter().copied().filter(|ip| classify(*ip) == Class::Public).collect();
    let forward = "forward TCP ports 25, 465, 587, 993 (and 80 for ACME) from the router's public address to \
                   this machine, and publish the public address in DNS";
    if published.is_empty() {
        return if public_here.is_empty() {
            Finding::warn(
                format!(
                    "this machine has no public address ({}): it is probably behind NAT",
                    if interfaces.is_empty() { "no interfaces found".to_string() } else { join(interfaces) }
                ),
                forward,
            )
        } else {
            Finding::ok(format!("this machine has public addresses: {}", join(&public_here)))
        };
    }
    let elsewhere: Vec<IpAddr> = published.iter().copied().filter(|ip| !interfaces.contains(ip)).collect();
    if elsewhere.is_empty() {
        return Finding::ok(format!("{} {} on this machine: no NAT in the way", join(published), verb(published)));
    }
    if public_here.is_empty() {
        Finding::warn(
            format!(
                "{hostname} is at {} but this machine only has {}: it is behind NAT",
                join(&elsewhere),
                if interfaces.is_empty() { "no addresses".to_string() } else { join(interfaces) }
            ),
            forward,
        )
    } else {
        Finding::warn(
            format!(
                "{} {} not an address of this machine (it has {})",
                join(&elsewhere),
                verb(&elsewhere),
                join(interfaces)
            ),
            format!("point the A/AAAA records of {hostname} at this machine ({})", join(&public_here)),
        )
    }
}

fn verb(ips: &[IpAddr]) -> &'static str {
    if ips.len() == 1 {
        "is"
    } else {
        "are"
    }
}

fn join(ips: &[IpAddr]) -> String {
    ips.iter().map(IpAddr::to_string).collect::<Vec<_>>().join(", ")
}

/// Whether this machine can open SMTP connections to the internet: connects to `probe`
/// (`HOST:PORT`), else to the first MX host of [`PROBE_DOMAIN`] on port 25, and waits for its
/// 220 greeting. The flag says whether it tried and failed (port 25 looks blocked), as opposed
/// to not being able to try.
pub async fn outbound_check(resolver: &Resolver, probe: Option<&str>) -> (Finding, bool) {
    let relay_fix = "many providers block outbound port 25: ask yours to open it, or send through a smarthost \
                     (the commented `[outbound] relay` in the config)";
    let target: Vec<SocketAddr> = match probe {
        Some(p) => match tokio::net::lookup_host(p).await {
            Ok(addrs) => addrs.collect(),
            Err(e) => {
                return (Finding::warn(format!("cannot use the SMTP probe {p:?}: {e}"), "give it as HOST:PORT"), false)
            }
        },
        None => match resolver.mx_plan(PROBE_DOMAIN).await {
            Ok(plan) => {
                plan.iter().flat_map(|h| h.addresses.iter().map(|ip| SocketAddr::new(*ip, 25))).take(2).collect()
            }
            Err(e) => {
                let f = Finding::warn(
                    format!("could not check outbound port 25: no MX of {PROBE_DOMAIN} ({e})"),
                    "check that this machine can resolve names and reach the internet",
                );
                return (f, false);
            }
        },
    };
    let Some(addr) = target.first().copied() else {
        return (Finding::warn("could not check outbound port 25: nothing to connect to", relay_fix), false);
    };
    let attempt = async {
        use tokio::io::AsyncReadExt;
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let mut buf = [0u8; 512];
        let n = stream.read(&mut buf).await?;
        Ok::<String, std::io::Error>(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    let finding = match tokio::time::timeout(PROBE_TIMEOUT, attempt).await {
        Ok(Ok(greeting)) if greeting.starts_with("220") => {
            Finding::ok(format!("outbound SMTP works: {addr} greeted with 220"))
        }
        Ok(Ok(greeting)) => Finding::warn(
            format!("outbound SMTP to {addr} connected but got no 220 greeting ({:?})", greeting.trim()),
            relay_fix,
        ),
        Ok(Err(e)) => Finding::warn(format!("outbound SMTP to {addr} failed: {e}"), relay_fix),
        Err(_) => {
            Finding::warn(format!("outbound SMTP to {addr} timed out after {}s", PROBE_TIMEOUT.as_secs()), relay_fix)
        }
    };
    let blocked = finding.level == Level::Warning;
    (finding, blocked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classes() {
        assert_eq!(classify(ip("127.0.1.1")), Class::Loopback);
        assert_eq!(classify(ip("10.1.2.3")), Class::Private);
        assert_eq!(classify(ip("172.20.0.1")), Class::Private);
        assert_eq!(classify(ip("192.168.1.5")), Class::Private);
        assert_eq!(classify(ip("100.72.0.1")), Class::Private);
        assert_eq!(classify(ip("169.254.0.1")), Class::LinkLocal);
        assert_eq!(classify(ip("fe80::1")), Class::LinkLocal);
        assert_eq!(classify(ip("fd00::1")), Class::Private);
        assert_eq!(classify(ip("::1")), Class::Loopback);
        assert_eq!(classify(ip("203.0.113.9")), Class::Public);
        assert_eq!(classify(ip("2001:db8::1")), Class::Public);
    }

    #[test]
    fn fqdn() {
        assert_eq!(fqdn_check("mail.example.org", false).level, Level::Ok);
        assert_eq!(fqdn_check("mail", false).level, Level::Warning);
        assert_eq!(fqdn_check("-x.example.org", false).level, Level::Warning);
        assert_eq!(fqdn_check("mail.example.org", true).level, Level::Warning);
    }

    #[test]
    fn nat() {
        let public = ip("203.0.113.9");
        let private = ip("192.168.1.5");
        let lo = ip("127.0.0.1");
        let f = nat_check("m.example.org", &[lo, private], &[public]);
        assert!(f.level == Level::Warning && f.text.contains("behind NAT"), "{f:?}");
        assert_eq!(nat_check("m.example.org", &[lo, public], &[public]).level, Level::Ok);
        let f = nat_check("m.example.org", &[lo, ip("198.51.100.1")], &[public]);
        assert!(f.text.contains("not an address of this machine"), "{f:?}");
        assert!(nat_check("m.example.org", &[lo, private], &[]).text.contains("probably behind NAT"));
        assert!(interface_addresses().iter().any(|a| a.is_loopback()));
    }
}
