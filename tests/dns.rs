//! The DNS layer against an in-process authoritative server (`common::dns::TestDns`).

mod common;

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::dns::{silent_server, TestDns};
use postern::dns::{DnsError, MxHost, Resolver};

const ZONE: &str = r#"
# MX ordering
example.test MX 20 mx2.example.test
example.test MX 10 mx1.example.test
example.test MX 30 MX3.Example.Test.
mx1.example.test A 127.0.0.11
mx1.example.test AAAA ::1
mx2.example.test A 127.0.0.12
mx3.example.test A 127.0.0.13

# equal preferences
equal.test MX 10 a.equal.test
equal.test MX 10 b.equal.test
a.equal.test A 127.0.1.1
b.equal.test A 127.0.1.2

# implicit MX
implicit.test A 127.0.2.1
implicit.test AAAA ::2
nomail.test TXT "nothing here"

# null MX (RFC 7505)
null.test MX 0 .

# MX host without addresses, next to a good one
partial.test MX 10 gone.partial.test
partial.test MX 20 ok.partial.test
ok.partial.test A 127.0.3.1
lonely.test MX 10 gone.lonely.test

# failures
broken.test SERVFAIL
badmx.test MX 10 mx.broken.test
mx.broken.test SERVFAIL

# TXT and PTR
example.test TXT "v=spf1 -all"
multi.test TXT "v=spf1 " "ip4:192.0.2.1" " -all"
11.2.0.192.in-addr.arpa PTR mx1.example.test.
1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa PTR V6.example.test

# CNAME to an MX host
cname.test MX 10 alias.cname.test
alias.cname.test CNAME mx1.example.test
"#;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn resolver(dns: &TestDns) -> Resolver {
    Resolver::new(&[dns.addr()], Duration::from_secs(2)).expect("resolver")
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn names(plan: &[MxHost]) -> Vec<(&str, u16)> {
    plan.iter().map(|h| (h.name.as_str(), h.preference)).collect()
}

#[test]
fn mx_sorted_by_preference_with_addresses() {
    let dns = TestDns::start(ZONE);
    rt().block_on(async {
        let r = resolver(&dns);
        let plan = r.mx_plan("example.test").await.unwrap();
        assert_eq!(names(&plan), [("mx1.example.test", 10), ("mx2.example.test", 20), ("mx3.example.test", 30)]);
        assert_eq!(plan[0].addresses, [ip("127.0.0.11"), ip("::1")], "IPv4 first");
        assert_eq!(plan[1].addresses, [ip("127.0.0.12")]);
        assert_eq!(plan[2].addresses, [ip("127.0.0.13")]);
        // Case and trailing dot do not matter.
        assert_eq!(r.mx_plan("EXAMPLE.Test.").await.unwrap().len(), 3);
    });
}

#[test]
fn equal_preferences_both_present_in_random_order() {
    let dns = TestDns::start(ZONE);
    rt().block_on(async {
        let r = resolver(&dns);
        let mut firsts = HashSet::new();
        for _ in 0..40 {
            let plan = r.mx_plan("equal.test").await.unwrap();
            let mut got: Vec<_> = plan.iter().map(|h| h.name.clone()).collect();
            firsts.insert(got[0].clone());
            got.sort();
            assert_eq!(got, ["a.equal.test", "b.equal.test"]);
            assert!(plan.iter().all(|h| h.preference == 10 && h.addresses.len() == 1));
            if firsts.len() == 2 {
                break;
            }
        }
        assert_eq!(firsts.len(), 2, "equal preferences should be shuffled");
    });
}

#[test]
fn implicit_mx_from_address_records() {
    let dns = TestDns::start(ZONE);
    rt().block_on(async {
        let r = resolver(&dns);
        let plan = r.mx_plan("implicit.test").await.unwrap();
        assert_eq!(
            plan,
            [MxHost { name: "implicit.test".into(), preference: 0, addresses: vec![ip("127.0.2.1"), ip("::2")] }]
        );
        // Neither MX nor address: not a mail domain.
        assert_eq!(r.mx_plan("nomail.test").await, Err(DnsError::NoSuchDomain));
    });
}

#[test]
fn null_mx_is_permanent() {
    let dns = TestDns::start(ZONE);
    rt().block_on(async {
        let err = resolver(&dns).mx_plan("null.test").await.unwrap_err();
        assert_eq!(err, DnsError::NullMx);
        assert!(err.is_permanent());
    });
}

#[test]
fn nxdomain_is_permanent() {
    let dns = TestDns::start(ZONE);
    rt().block_on(async {
        let r = resolver(&dns);
        let err = r.mx_plan("nowhere.test").await.unwrap_err();
        assert_eq!(err, DnsError::NoSuchDomain);
        assert!(err.is_permanent());
        assert_eq!(r.addresses("nowhere.test").await, Err(DnsError::NoSuchDomain));
        assert_eq!(r.txt("nowhere.test").await, Err(DnsError::NoSuchDomain));
    });
}

#[test]
fn servfail_is_temporary() {
    let dns = TestDns::start(ZONE);
    rt().block_on(async {
        let r = resolver(&dns);
        let err = r.mx_plan("broken.test").await.unwrap_err();
        assert!(matches!(err, DnsError::Temporary(_)), "{err:?}");
        assert!(!err.is_permanent());
        // The only MX host fails temporarily: the whole plan is temporary.
        assert!(matches!(r.mx_plan("badmx.test").await, Err(DnsError::Temporary(_))));
        assert!(matches!(r.txt("broken.test").await, Err(DnsError::Temporary(_))));
    });
}

#[test]
fn mx_host_without_address_kept_empty() {
    let dns = TestDns::start(ZONE);
    rt().block_on(async {
        let r = resolver(&dns);
        let plan = r.mx_plan("partial.test").await.unwrap();
        assert_eq!(names(&plan), [("gone.partial.test", 10), ("ok.partial.test", 20)]);
        assert!(plan[0].addresses.is_empty());
        assert_eq!(plan[1].addresses, [ip("127.0.3.1")]);
        let plan = r.mx_plan("lonely.test").await.unwrap();
        assert_eq!(names(&plan), [("gone.lonely.test", 10)]);
        assert!(plan[0].addresses.is_empty());
    });
}

#[test]
fn mx_through_cname() {
    let dns = TestDns::start(ZONE);
    rt().block_on(async {
        let plan = resolver(&dns).mx_plan("cname.test").await.unwrap();
        assert_eq!(names(&plan), [("alias.cname.test", 10)]);
        assert_eq!(plan[0].addresses, [ip("127.0.0.11"), ip("::1")]);
    });
}

#[test]
fn txt_records_joined() {
    let key = "k".repeat(700);
    let big = "b".repeat(1500);
    let zone = format!("{ZONE}\nsel._domainkey.example.test TXT \"v=DKIM1; k=rsa; p={key}\"\nbig.test TXT \"{big}\"\n");
    let dns = TestDns::start(&zone);
    rt().block_on(async {
        let r = resolver(&dns);
        assert_eq!(r.txt("example.test").await.unwrap(), ["v=spf1 -all"]);
        assert_eq!(r.txt("multi.test").await.unwrap(), ["v=spf1 ip4:192.0.2.1 -all"]);
        // 720 bytes: three character-strings on the wire.
        assert_eq!(r.txt("sel._domainkey.example.test").await.unwrap(), [format!("v=DKIM1; k=rsa; p={key}")]);
        // Larger than the EDNS UDP size: the server truncates, the resolver retries over TCP.
        assert_eq!(r.txt("big.test").await.unwrap(), [big]);
        // NODATA: the name exists without TXT.
        assert_eq!(r.txt("mx1.example.test").await.unwrap(), Vec::<String>::new());
    });
}

#[test]
fn ptr_lookups() {
    let dns = TestDns::start(ZONE);
    rt().block_on(async {
        let r = resolver(&dns);
        assert_eq!(r.ptr(ip("192.0.2.11")).await.unwrap(), ["mx1.example.test"]);
        assert_eq!(r.ptr(ip("2001:db8::1")).await.unwrap(), ["v6.example.test"]);
        assert_eq!(r.ptr(ip("192.0.2.99")).await, Err(DnsError::NoSuchDomain));
        // hickory answers RFC 6761 special names itself, without asking the server: loopback
        // reverse names are "localhost", and "localhost" is the loopback addresses.
        assert_eq!(r.ptr(ip("127.0.0.11")).await.unwrap(), ["localhost"]);
        assert_eq!(r.addresses("localhost").await.unwrap(), [ip("127.0.0.1"), ip("::1")]);
    });
}

#[test]
fn addresses_and_invalid_input() {
    let dns = TestDns::start(ZONE);
    rt().block_on(async {
        let r = resolver(&dns);
        assert_eq!(r.addresses("Mx1.Example.Test.").await.unwrap(), [ip("127.0.0.11"), ip("::1")]);
        assert_eq!(r.addresses("192.0.2.7").await.unwrap(), [ip("192.0.2.7")]);
        for bad in ["", ".", "a..b", "exa mple.test", "[127.0.0.1]", "x\u{0}y", &"a".repeat(300)] {
            let err = r.mx_plan(bad).await.unwrap_err();
            assert!(matches!(err, DnsError::Invalid(_)), "{bad:?}: {err:?}");
            assert!(err.is_permanent());
        }
    });
}

#[test]
fn live_zone_change_seen_by_next_query() {
    let dns = TestDns::start("fail.test MX 10 primary.fail.test\nprimary.fail.test A 127.0.4.1\n");
    rt().block_on(async {
        let r = resolver(&dns);
        let plan = r.mx_plan("fail.test").await.unwrap();
        assert_eq!(names(&plan), [("primary.fail.test", 10)]);
        dns.set_zone("fail.test MX 10 backup.fail.test\nbackup.fail.test A 127.0.4.2\n");
        let plan = r.mx_plan("fail.test").await.unwrap();
        assert_eq!(names(&plan), [("backup.fail.test", 10)]);
        assert_eq!(plan[0].addresses, [ip("127.0.4.2")]);
        // Negative answers are not cached either.
        assert_eq!(r.mx_plan("new.test").await, Err(DnsError::NoSuchDomain));
        dns.set_zone("new.test A 127.0.4.3\n");
        assert_eq!(r.mx_plan("new.test").await.unwrap()[0].addresses, [ip("127.0.4.3")]);
        dns.set_zone("new.test SERVFAIL\n");
        assert!(matches!(r.mx_plan("new.test").await, Err(DnsError::Temporary(_))));
    });
}

#[test]
fn silent_nameserver_is_temporary_within_timeout() {
    let (_sock, addr) = silent_server();
    rt().block_on(async {
        let r = Resolver::new(&[addr], Duration::from_millis(800)).unwrap();
        let start = Instant::now();
        let err = r.mx_plan("example.test").await.unwrap_err();
        let took = start.elapsed();
        assert!(matches!(err, DnsError::Temporary(_)), "{err:?}");
        assert!(took < Duration::from_millis(1500), "took {took:?}");
        let start = Instant::now();
        assert!(matches!(r.addresses("example.test").await, Err(DnsError::Temporary(_))));
        assert!(start.elapsed() < Duration::from_millis(1500));
    });
}

#[test]
fn system_configuration_builds() {
    // Only construction: the test machine may have no network.
    let _rt = rt();
    let _guard = _rt.enter();
    match Resolver::new(&[], Duration::from_secs(1)) {
        Ok(_) | Err(DnsError::Invalid(_)) => {}
        Err(e) => panic!("{e:?}"),
    }
}
