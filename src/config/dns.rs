//! The `[dns]` table: which name servers the node asks (default: the system's).

use std::net::SocketAddr;
use std::time::Duration;

use super::load::{Ctx, Entry};
use super::model::DnsSettings;

pub(super) fn read_dns(cx: &mut Ctx<'_>, e: &Entry<'_>) -> Option<DnsSettings> {
    let mut f = cx.table(e)?;
    cx.check_keys(&mut f, &["nameservers", "timeout"]);
    let mut dns = DnsSettings::default();
    let mut ok = true;
    if let Some(n) = f.get("nameservers") {
        for item in cx.one_or_many(&n) {
            match cx.string(&item).map(|s| s.parse::<SocketAddr>()) {
                Some(Ok(addr)) => dns.nameservers.push(addr),
                Some(Err(_)) => {
                    cx.at(&item, "expected IP:port, such as \"127.0.0.1:53\" or \"[::1]:53\"");
                    ok = false;
                }
                None => ok = false,
            }
        }
    }
    if let Some(t) = f.get("timeout") {
        match cx.duration(&t, Duration::from_millis(100), "") {
            Some(d) => dns.timeout = d,
            None => ok = false,
        }
    }
    ok.then_some(dns)
}

#[cfg(test)]
mod tests {
    use crate::config::load::testing::{base, load, only_error};

    #[test]
    fn dns_section() {
        let c = load(&base("[dns]\nnameservers = [\"127.0.0.1:5353\", \"[::1]:53\"]\ntimeout = \"2s\"\n")).unwrap();
        assert_eq!(c.dns.nameservers.len(), 2);
        assert_eq!(c.dns.timeout.as_secs(), 2);
        assert!(load(&base("")).unwrap().dns.nameservers.is_empty());
        only_error(&base("[dns]\nnameservers = [\"localhost\"]\n"), 8, "dns.nameservers[0]", "IP:port");
    }
}
