use super::*;
use rand::SeedableRng;

fn n(s: &str) -> Name {
    parse_name(s).unwrap()
}

#[test]
fn parse_name_normalizes() {
    assert_eq!(display_name(&n("Example.TEST")), "example.test");
    assert_eq!(display_name(&n("example.test.")), "example.test");
    assert_eq!(display_name(&n("  mx.example.test \t")), "mx.example.test");
    assert_eq!(n("EXAMPLE.test"), n("example.test."));
    assert!(n("example.test").is_fqdn());
    assert_eq!(display_name(&n("_dmarc.example.test")), "_dmarc.example.test");
    assert_eq!(display_name(&n("bücher.example")), "xn--bcher-kva.example");
    assert_eq!(display_name(&n("localhost")), "localhost");
}

#[test]
fn parse_name_rejects_garbage() {
    let label64 = "a".repeat(64);
    let long = vec!["abcdefghi"; 30].join(".");
    for bad in [
        "",
        " ",
        ".",
        "..",
        "a..b",
        ".a",
        "1.2.3.4",
        "::1",
        "[1.2.3.4]",
        "exa mple.test",
        "user@example.test",
        "example.test/x",
        "a\0b",
        label64.as_str(),
        long.as_str(),
    ] {
        match parse_name(bad) {
            Err(DnsError::Invalid(_)) => {}
            other => panic!("{bad:?} -> {other:?}"),
        }
    }
    assert!(parse_name(&"a".repeat(63)).is_ok());
}

#[test]
fn display_root() {
    assert_eq!(display_name(&Name::root()), ".");
}

#[test]
fn permanence() {
    assert!(DnsError::NullMx.is_permanent());
    assert!(DnsError::NoSuchDomain.is_permanent());
    assert!(DnsError::Invalid("x".into()).is_permanent());
    assert!(!DnsError::Temporary("x".into()).is_permanent());
}

#[test]
fn order_mx_sorts_groups_and_dedups() {
    let input = vec![(20, n("c.test")), (10, n("a.test")), (10, n("b.test")), (30, n("a.test")), (5, n("z.test"))];
    let mut seen_first = std::collections::HashSet::new();
    for seed in 0..64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let out = order_mx(input.clone(), &mut rng);
        let prefs: Vec<u16> = out.iter().map(|(p, _)| *p).collect();
        assert_eq!(prefs, vec![5, 10, 10, 20], "{out:?}");
        assert_eq!(display_name(&out[0].1), "z.test");
        assert_eq!(display_name(&out[3].1), "c.test");
        seen_first.insert(display_name(&out[1].1));
    }
    // Equal preferences come out in both orders.
    assert_eq!(seen_first.len(), 2, "{seen_first:?}");
}

#[test]
fn classify_maps_response_codes() {
    use hickory_resolver::net::NoRecords;
    use hickory_resolver::proto::op::Query;
    let name = n("example.test");
    let q = Query::query(name.clone(), RecordType::MX);
    let nx = NetError::Dns(HickoryDnsError::NoRecordsFound(NoRecords::new(q.clone(), ResponseCode::NXDomain)));
    assert_eq!(classify(nx, &name, RecordType::MX), Err(DnsError::NoSuchDomain));
    let nodata = NetError::Dns(HickoryDnsError::NoRecordsFound(NoRecords::new(q, ResponseCode::NoError)));
    assert_eq!(classify(nodata, &name, RecordType::MX), Ok(Vec::new()));
    let servfail = NetError::Dns(HickoryDnsError::ResponseCode(ResponseCode::ServFail));
    assert!(matches!(classify(servfail, &name, RecordType::MX), Err(DnsError::Temporary(_))));
    assert!(matches!(classify(NetError::Timeout, &name, RecordType::A), Err(DnsError::Temporary(_))));
}

#[test]
fn new_without_runtime() {
    // Construction needs no tokio runtime (lookups do).
    let r = Resolver::new(&["127.0.0.1:5353".parse().unwrap()], Duration::from_secs(1));
    assert!(r.is_ok());
}

proptest::proptest! {
    #[test]
    fn parse_name_never_panics_and_round_trips(s in "\\PC{0,80}|[a-zA-Z0-9._-]{0,300}") {
        if let Ok(name) = parse_name(&s) {
            let shown = display_name(&name);
            proptest::prop_assert_eq!(parse_name(&shown).map(|n| display_name(&n)), Ok(shown.clone()));
            proptest::prop_assert!(!shown.ends_with('.'));
        }
    }
}
