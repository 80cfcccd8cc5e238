//! DNS for outbound delivery: where does mail for a domain go (RFC 5321 §5.1), plus the TXT and PTR
//! lookups that SPF, DKIM, DMARC and connection checks will need.
//!
//! Built on `hickory-resolver`, but with hickory's own result type reduced to what a mail queue must
//! decide: deliver to these hosts, bounce now (`DnsError::is_permanent`), or try again later.
//!
//! Caching is off (see [`Resolver::new`]): a queue that retries for days must see DNS changes — a
//! moved MX, a removed null MX — on its next attempt, and a local caching resolver (the usual setup
//! for a mail server) already honours TTLs for us.

mod names;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError as HickoryDnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::TokioResolver;
use rand::seq::SliceRandom;
use tokio::task::JoinSet;

pub use names::{display_name, parse_name};

/// Why a lookup gave no usable answer. [`DnsError::is_permanent`] tells the queue whether to bounce.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// The domain publishes a null MX (RFC 7505): it accepts no mail, so delivery must fail at once.
    #[error("the domain does not accept mail (null MX, RFC 7505)")]
    NullMx,
    /// NXDOMAIN, or (for `mx_plan`) a domain with neither MX nor address records, which RFC 5321
    /// §5.1 says is not a mail domain. Permanent.
    #[error("no such domain")]
    NoSuchDomain,
    /// SERVFAIL, REFUSED, timeouts, network errors: the answer may be different later.
    #[error("temporary DNS failure: {0}")]
    Temporary(String),
    /// The name (or the resolver configuration) cannot be used at all; retrying will not help.
    #[error("invalid: {0}")]
    Invalid(String),
}

impl DnsError {
    /// True when retrying the same lookup later cannot succeed (the message should bounce).
    pub fn is_permanent(&self) -> bool {
        !matches!(self, DnsError::Temporary(_))
    }
}

/// One entry of a delivery plan: an MX host, its preference and its addresses (IPv4 first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxHost {
    /// Lower case, no trailing dot.
    pub name: String,
    pub preference: u16,
    /// Empty when the host has no A/AAAA records: the caller skips it (and logs), as RFC 5321 §5.1
    /// asks to try the remaining hosts.
    pub addresses: Vec<IpAddr>,
}

/// A stub resolver for the mail server. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct Resolver {
    inner: TokioResolver,
    timeout: Duration,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

/// What one record-type lookup found: records, or an existing name without that type (NODATA).
type Found = Vec<RData>;

impl Resolver {
    /// The per-question time limit this resolver was built with.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `nameservers`: empty = the system configuration (/etc/resolv.conf); else these servers over
    /// UDP with TCP fallback, on any port (e.g. 127.0.0.1:5353 in tests).
    ///
    /// `timeout` bounds each DNS question: one call to [`addresses`](Self::addresses), [`txt`](Self::txt)
    /// or [`ptr`](Self::ptr), and each of the (at most three) rounds of [`mx_plan`](Self::mx_plan).
    /// Within it hickory gets two tries of `timeout / 2` each, so one lost UDP datagram does not fail
    /// the question.
    ///
    /// Choices, for a mail queue rather than a browser:
    /// - no answer cache (size 0 and every TTL clamped to 0): a retried message must see the current
    ///   DNS, e.g. a fail-over MX; caching by TTL belongs to the recursive resolver in front of us;
    /// - `/etc/hosts` is not consulted: MX targets are public DNS data (and tests stay hermetic);
    /// - every name is looked up as absolute, so `search`/`ndots` from resolv.conf never turn
    ///   `example.com` into `example.com.corp.local`.
    pub fn new(nameservers: &[SocketAddr], timeout: Duration) -> Result<Resolver, DnsError> {
        let timeout = timeout.max(Duration::from_millis(2));
        Ok(Resolver { inner: hickory_resolver(nameservers, timeout)?, timeout })
    }

    /// RFC 5321 §5.1 delivery plan for `domain`, best first.
    ///
    /// - MX hosts sorted by preference; equal preferences shuffled, which §5.1 requires so that load
    ///   spreads over equal hosts. A host listed twice keeps its best preference.
    /// - No MX records (NODATA) → the domain itself as an implicit MX of preference 0, if it has an
    ///   A or AAAA record; with neither it "is not a mail domain" → [`DnsError::NoSuchDomain`].
    /// - Only MX records whose exchange is "." → [`DnsError::NullMx`]. RFC 7505 defines the null MX
    ///   as a single such record of preference 0; we also treat a lone "." of another preference
    ///   the same way, since there is nowhere to deliver. A "." mixed with real hosts (forbidden by
    ///   RFC 7505 §3) is dropped and the real hosts are used.
    /// - NXDOMAIN → [`DnsError::NoSuchDomain`]; SERVFAIL or timeout on the MX query → `Temporary`.
    /// - An MX host without addresses (NXDOMAIN or NODATA) is kept with an empty list. If no host
    ///   has addresses and at least one address lookup failed temporarily, the plan as a whole is
    ///   `Temporary`, so the queue retries rather than acting on a partial picture.
    pub async fn mx_plan(&self, domain: &str) -> Result<Vec<MxHost>, DnsError> {
        let name = parse_name(domain)?;
        let records = self.query(&name, RecordType::MX).await?;
        let mut mxs: Vec<(u16, Name)> = records
            .into_iter()
            .filter_map(|r| match r {
                RData::MX(mx) => Some((mx.preference, mx.exchange.to_lowercase())),
                _ => None,
            })
            .collect();

        if mxs.is_empty() {
            // RFC 5321 §5.1: no MX → the domain is its own MX with preference 0, if it has an address.
            let addresses = match self.ips(&name).await {
                Err(DnsError::NoSuchDomain) => return Err(DnsError::NoSuchDomain),
                other => other?,
            };
            if addresses.is_empty() {
                return Err(DnsError::NoSuchDomain);
            }
            return Ok(vec![MxHost { name: display_name(&name), preference: 0, addresses }]);
        }
        if mxs.iter().all(|(_, host)| host.is_root()) {
            return Err(DnsError::NullMx);
        }
        mxs.retain(|(_, host)| !host.is_root());
        let hosts = order_mx(mxs, &mut rand::thread_rng());

        // Resolve all hosts at once, so a plan costs about one timeout however many MX there are.
        let mut tasks = JoinSet::new();
        for (i, (_, host)) in hosts.iter().enumerate() {
            let me = self.clone();
            let host = host.clone();
            tasks.spawn(async move { (i, me.ips(&host).await) });
        }
        let mut results: Vec<Option<Result<Vec<IpAddr>, DnsError>>> = vec![None; hosts.len()];
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((i, r)) => results[i] = Some(r),
                Err(e) => return Err(DnsError::Temporary(format!("address lookup task failed: {e}"))),
            }
        }

        let mut temporary = None;
        let mut plan = Vec::with_capacity(hosts.len());
        for ((preference, host), result) in hosts.into_iter().zip(results) {
            let addresses = match result {
                Some(Ok(a)) => a,
                Some(Err(e @ DnsError::Temporary(_))) => {
                    temporary.get_or_insert(e);
                    Vec::new()
                }
                _ => Vec::new(),
            };
            plan.push(MxHost { name: display_name(&host), preference, addresses });
        }
        match temporary {
            Some(e) if plan.iter().all(|h| h.addresses.is_empty()) => Err(e),
            _ => Ok(plan),
        }
    }

    /// A and AAAA addresses of `host` (IPv4 first). An IP literal is returned as is. A name that
    /// exists without addresses gives an empty list; NXDOMAIN gives [`DnsError::NoSuchDomain`].
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
        if let Ok(ip) = host.trim().parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        self.ips(&parse_name(host)?).await
    }

    /// TXT records of `name`, each record's character-strings joined into one string (RFC 7208 §3.3
    /// for SPF, RFC 6376 §3.6.2.2 for DKIM keys: long values are split into 255-byte pieces). Bytes
    /// that are not UTF-8 are replaced. NODATA → empty list; NXDOMAIN → `NoSuchDomain`, because SPF
    /// and DMARC distinguish the two.
    pub async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError> {
        let found = self.query(&parse_name(name)?, RecordType::TXT).await?;
        Ok(found
            .into_iter()
            .filter_map(|r| match r {
                RData::TXT(txt) => Some(String::from_utf8_lossy(&txt.txt_data.concat()).into_owned()),
                _ => None,
            })
            .collect())
    }

    /// Reverse names of `ip` (PTR under in-addr.arpa / ip6.arpa), lower case without trailing dot.
    pub async fn ptr(&self, ip: IpAddr) -> Result<Vec<String>, DnsError> {
        let found = self.query(&Name::from(ip), RecordType::PTR).await?;
        Ok(found
            .into_iter()
            .filter_map(|r| match r {
                RData::PTR(ptr) => Some(display_name(&ptr.0)),
                _ => None,
            })
            .collect())
    }

    /// A and AAAA of an already parsed name, queried in parallel.
    async fn ips(&self, name: &Name) -> Result<Vec<IpAddr>, DnsError> {
        let (v4, v6) = tokio::join!(self.query(name, RecordType::A), self.query(name, RecordType::AAAA));
        let mut out = Vec::new();
        let mut err = None;
        for result in [v4, v6] {
            match result {
                Ok(records) => out.extend(records.into_iter().filter_map(|r| match r {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                    _ => None,
                })),
                // A temporary failure outweighs NXDOMAIN from the other query.
                Err(e) if err.is_none() || matches!(e, DnsError::Temporary(_)) => err = Some(e),
                Err(_) => {}
            }
        }
        // One family answering is enough to deliver; with no address at all the failure decides.
        match err {
            Some(e) if out.is_empty() => Err(e),
            _ => Ok(out),
        }
    }

    /// One question, bounded by the timeout, with hickory's outcome mapped to ours. Only records of
    /// the asked type are returned (CNAME intermediates are dropped; hickory follows them).
    async fn query(&self, name: &Name, rtype: RecordType) -> Result<Found, DnsError> {
        let lookup = match tokio::time::timeout(self.timeout, self.inner.lookup(name.clone(), rtype)).await {
            Err(_) => return Err(DnsError::Temporary(format!("{rtype} {}: timed out", display_name(name)))),
            Ok(r) => r,
        };
        match lookup {
            Ok(l) => Ok(l.answers().iter().filter(|r| r.record_type() == rtype).map(|r| r.data.clone()).collect()),
            Err(e) => classify(e, name, rtype),
        }
    }
}

/// Maps a hickory error: NXDOMAIN is permanent, NODATA is an empty answer, everything else is
/// temporary (RFC 5321 §4.5.4.1: a failing lookup is retried later, not bounced).
fn classify(e: NetError, name: &Name, rtype: RecordType) -> Result<Found, DnsError> {
    match e {
        NetError::Dns(HickoryDnsError::NoRecordsFound(nr)) if nr.response_code == ResponseCode::NXDomain => {
            Err(DnsError::NoSuchDomain)
        }
        NetError::Dns(HickoryDnsError::NoRecordsFound(_)) => Ok(Vec::new()),
        other => Err(DnsError::Temporary(format!("{rtype} {}: {other}", display_name(name)))),
    }
}

/// Sorts MX records by preference, shuffles each group of equal preference (RFC 5321 §5.1: "the
/// sender-SMTP MUST randomize them to spread the load"), and keeps only the first (best) entry of a
/// host listed more than once.
pub(crate) fn order_mx<R: rand::Rng + ?Sized>(mut mxs: Vec<(u16, Name)>, rng: &mut R) -> Vec<(u16, Name)> {
    mxs.shuffle(rng);
    mxs.sort_by_key(|(pref, _)| *pref); // stable: keeps the shuffled order within a preference
    let mut seen = std::collections::HashSet::new();
    mxs.retain(|(_, host)| seen.insert(host.clone()));
    mxs
}

/// A hickory resolver set up the way [`Resolver::new`] explains; also what mail-auth's SPF, DKIM
/// and DMARC lookups use (`verdict`), so every DNS question the node asks behaves the same.
pub fn hickory_resolver(nameservers: &[SocketAddr], timeout: Duration) -> Result<TokioResolver, DnsError> {
    let mut builder = if nameservers.is_empty() {
        TokioResolver::builder_tokio().map_err(|e| DnsError::Invalid(format!("system resolver configuration: {e}")))?
    } else {
        let servers = nameservers
            .iter()
            .map(|sa| {
                let mut udp = ConnectionConfig::udp();
                udp.port = sa.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = sa.port();
                NameServerConfig::new(sa.ip(), true, vec![udp, tcp])
            })
            .collect();
        TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), TokioRuntimeProvider::default())
    };
    let timeout = timeout.max(Duration::from_millis(2));
    let opts = builder.options_mut();
    opts.timeout = timeout / 2;
    opts.attempts = 1; // one retry after the first failure (hickory counts retries)
    opts.cache_size = 0;
    opts.positive_max_ttl = Some(Duration::ZERO);
    opts.negative_max_ttl = Some(Duration::ZERO);
    opts.use_hosts_file = ResolveHosts::Never;
    opts.edns0 = true; // DKIM keys and long SPF records exceed 512 bytes
    opts.ndots = 0;
    opts.preserve_intermediates = true;
    builder.build().map_err(|e| DnsError::Invalid(format!("resolver: {e}")))
}

#[cfg(test)]
mod tests;
