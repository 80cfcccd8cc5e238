//! Recipient routing: which mailboxes an address delivers to, from the cluster config's users
//! and aliases. Pure lookups over tables built once from the config; no I/O.
//!
//! Precedence for `local+tag@domain`: an alias for the exact address, a user with that exact
//! address, the same two for the address without `+tag`, then the domain's alias (`@domain` →
//! `@other`, same local part) or catch-all (`@domain` → an address).
//!
//! With `[srs]`, an `SRS0=`/`SRS1=` local part in the SRS domain (that is not itself a user or
//! alias) is a bounce to forwarded mail: verified and routed back to the original sender as a
//! `Forward`, or refused (`UnknownUser`; `srs_refusal` says why).

pub mod srs;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::config::{AliasTarget, Config};
use crate::smtp::address::Address;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Destination {
    /// A user's mailbox (lowercase address).
    Mailbox(String),
    /// Accepted and dropped (`/dev/null` alias).
    Discard,
    /// An alias target outside the cluster: forwarded through the outbound queue. The address
    /// is as the alias names it (lowercase).
    Forward(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteError {
    /// Not one of the cluster's domains: we would be relaying.
    ForeignDomain,
    /// A cluster domain, but no such user or alias.
    UnknownUser,
}

pub struct Router {
    domains: BTreeSet<String>,
    users: BTreeSet<String>,
    aliases: BTreeMap<String, Vec<AliasTarget>>,
    separator: Option<char>,
    srs: Option<Arc<srs::Srs>>,
}

/// Aliases may chain; the config is checked loop-free, and this bounds any surprise. Far above
/// any chain a person writes, so a valid config never hits it.
const MAX_DEPTH: usize = 64;

impl Router {
    pub fn new(config: &Config) -> Self {
        Router {
            domains: config.cluster.domains.iter().cloned().collect(),
            users: config.users.keys().cloned().collect(),
            aliases: config.aliases.clone(),
            separator: config.cluster.subaddress_separator,
            srs: None,
        }
    }

    /// Reverses bounces to this SRS domain's `SRS0=`/`SRS1=` addresses.
    pub fn with_srs(mut self, srs: Option<Arc<srs::Srs>>) -> Self {
        self.srs = srs;
        self
    }

    /// Why `address` is refused as an SRS address of ours (forged, expired, malformed); `None`
    /// when it is not one, or verifies.
    pub fn srs_refusal(&self, address: &Address) -> Option<srs::SrsError> {
        self.srs_reverse(address)?.err()
    }

    /// For one of our SRS addresses (not shadowed by a user or alias): where it goes back to.
    fn srs_reverse(&self, address: &Address) -> Option<Result<String, srs::SrsError>> {
        let srs = self.srs.as_ref()?;
        if !srs.is_ours(&address.local, &address.domain) {
            return None;
        }
        let full = format!("{}@{}", address.local.to_lowercase(), address.domain.to_ascii_lowercase());
        if self.users.contains(&full) || self.aliases.contains_key(&full) {
            return None;
        }
        Some(srs.reverse(&format!("{}@{}", address.local, address.domain)))
    }

    pub fn is_local_domain(&self, domain: &str) -> bool {
        self.domains.contains(&domain.to_ascii_lowercase())
    }

    pub fn is_user(&self, address: &str) -> bool {
        self.users.contains(address)
    }

    /// Every destination of an address, deduplicated and sorted.
    pub fn resolve(&self, address: &Address) -> Result<Vec<Destination>, RouteError> {
        if !self.is_local_domain(&address.domain) {
            return Err(RouteError::ForeignDomain);
        }
        match self.srs_reverse(address) {
            Some(Ok(original)) => {
                // The local part keeps its case (it is the original sender's); domains do not matter.
                let original = match original.rsplit_once('@') {
                    Some((l, d)) => format!("{l}@{}", d.to_ascii_lowercase()),
                    None => original,
                };
                return Ok(vec![Destination::Forward(original)]);
            }
            Some(Err(_)) => return Err(RouteError::UnknownUser),
            None => {}
        }
        let mut out = BTreeSet::new();
        self.expand(&address.local.to_lowercase(), &address.domain, 0, &mut out)?;
        Ok(out.into_iter().collect())
    }

    fn expand(
        &self,
        local: &str,
        domain: &str,
        depth: usize,
        out: &mut BTreeSet<Destination>,
    ) -> Result<(), RouteError> {
        if depth > MAX_DEPTH {
            return Err(RouteError::UnknownUser);
        }
        if !self.domains.contains(domain) {
            if depth == 0 {
                return Err(RouteError::ForeignDomain);
            }
            // Only an alias leads here: its target lives outside the cluster.
            out.insert(Destination::Forward(format!("{local}@{domain}")));
            return Ok(());
        }
        let full = format!("{local}@{domain}");
        if self.expand_exact(&full, depth, out)? {
            return Ok(());
        }
        if let Some(sep) = self.separator {
            if let Some((base, _tag)) = local.split_once(sep) {
                if !base.is_empty() && self.expand_exact(&format!("{base}@{domain}"), depth, out)? {
                    return Ok(());
                }
            }
        }
        match self.aliases.get(&format!("@{domain}")) {
            Some(targets) => {
                for t in targets {
                    match t {
                        AliasTarget::Domain(other) => self.expand(local, other, depth + 1, out)?,
                        AliasTarget::Address(a) => self.expand_address(a, depth + 1, out)?,
                        AliasTarget::Discard => {
                            out.insert(Destination::Discard);
                        }
                    }
                }
                Ok(())
            }
            None => Err(RouteError::UnknownUser),
        }
    }

    /// An alias or user with exactly this address; false when neither exists.
    fn expand_exact(&self, full: &str, depth: usize, out: &mut BTreeSet<Destination>) -> Result<bool, RouteError> {
        if let Some(targets) = self.aliases.get(full) {
            for t in targets {
                match t {
                    // An alias that names itself while a user has that address keeps a copy there.
                    AliasTarget::Address(a) if a == full && self.users.contains(full) => {
                        out.insert(Destination::Mailbox(full.to_string()));
                    }
                    AliasTarget::Address(a) => self.expand_address(a, depth + 1, out)?,
                    AliasTarget::Discard => {
                        out.insert(Destination::Discard);
                    }
                    AliasTarget::Domain(_) => return Err(RouteError::UnknownUser),
                }
            }
            return Ok(true);
        }
        if self.users.contains(full) {
            out.insert(Destination::Mailbox(full.to_string()));
            return Ok(true);
        }
        Ok(false)
    }

    fn expand_address(&self, address: &str, depth: usize, out: &mut BTreeSet<Destination>) -> Result<(), RouteError> {
        let (local, domain) = address.rsplit_once('@').ok_or(RouteError::UnknownUser)?;
        self.expand(local, domain, depth, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        let mut aliases = BTreeMap::new();
        let addr = |s: &str| AliasTarget::Address(s.to_string());
        aliases.insert("postmaster@example.org".into(), vec![addr("alice@example.org")]);
        aliases.insert("noc@example.org".into(), vec![addr("alice@example.org"), addr("bob@example.org")]);
        aliases.insert("noreply@example.org".into(), vec![AliasTarget::Discard]);
        aliases.insert("bob@example.org".into(), vec![addr("bob@example.org"), addr("alice@example.org")]);
        aliases.insert("@example.net".into(), vec![AliasTarget::Domain("example.org".into())]);
        aliases.insert("@example.org".into(), vec![addr("alice@example.org")]);
        aliases.insert("fwd@example.com".into(), vec![addr("carol@example.com"), addr("carol@gmail.example")]);
        Router {
            domains: ["example.org", "example.net", "example.com"].iter().map(|s| s.to_string()).collect(),
            users: ["alice@example.org", "bob@example.org", "carol@example.com"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            aliases,
            separator: Some('+'),
            srs: None,
        }
    }

    fn r(s: &str) -> Result<Vec<Destination>, RouteError> {
        let (local, domain) = s.rsplit_once('@').unwrap();
        router().resolve(&Address::new(local, domain))
    }

    fn mb(s: &[&str]) -> Result<Vec<Destination>, RouteError> {
        Ok(s.iter().map(|a| Destination::Mailbox(a.to_string())).collect())
    }

    #[test]
    fn resolution_order() {
        assert_eq!(r("alice@example.org"), mb(&["alice@example.org"]));
        assert_eq!(r("ALICE@Example.ORG"), mb(&["alice@example.org"]));
        assert_eq!(r("alice+lists@example.org"), mb(&["alice@example.org"]));
        assert_eq!(r("postmaster@example.org"), mb(&["alice@example.org"]));
        assert_eq!(r("noc@example.org"), mb(&["alice@example.org", "bob@example.org"]));
        assert_eq!(r("bob@example.org"), mb(&["alice@example.org", "bob@example.org"]));
        assert_eq!(r("noreply@example.org"), Ok(vec![Destination::Discard]));
        // Domain alias keeps the local part; unknown local parts fall to the catch-all.
        assert_eq!(r("bob+x@example.net"), mb(&["alice@example.org", "bob@example.org"]));
        assert_eq!(r("nobody@example.net"), mb(&["alice@example.org"]));
        assert_eq!(r("user%other@example.org"), mb(&["alice@example.org"]));
        // No catch-all for example.com.
        assert_eq!(r("nobody@example.com"), Err(RouteError::UnknownUser));
        assert_eq!(r("carol@example.com"), mb(&["carol@example.com"]));
        assert_eq!(r("alice@elsewhere.example"), Err(RouteError::ForeignDomain));
        assert_eq!(
            r("fwd@example.com"),
            Ok(vec![
                Destination::Mailbox("carol@example.com".into()),
                Destination::Forward("carol@gmail.example".into())
            ])
        );
    }

    #[test]
    fn srs_bounces() {
        let srs = srs::Srs::new("example.com", vec![b"k".to_vec()], 21, &["example.com".into()]);
        let fwd = srs.forward("Dave@Elsewhere.Example");
        let srs1 = srs.forward("SRS0=abcd=2W=orig.example=u@fwd.example");
        let router = router().with_srs(Some(Arc::new(srs)));
        let r = |s: &str| {
            let (local, domain) = s.rsplit_once('@').unwrap();
            router.resolve(&Address::new(local, domain))
        };
        assert_eq!(r(&fwd), Ok(vec![Destination::Forward("Dave@elsewhere.example".into())]));
        assert_eq!(r(&fwd.to_uppercase()), Ok(vec![Destination::Forward("DAVE@elsewhere.example".into())]));
        assert_eq!(r(&srs1), Ok(vec![Destination::Forward("SRS0=abcd=2W=orig.example=u@fwd.example".into())]));
        let forged = fwd.replacen("SRS0=", "SRS0=x", 1);
        assert_eq!(r(&forged), Err(RouteError::UnknownUser));
        let (local, domain) = forged.rsplit_once('@').unwrap();
        assert_eq!(router.srs_refusal(&Address::new(local, domain)), Some(srs::SrsError::BadHash));
        // Only the SRS domain's SRS addresses are reversed.
        let other = fwd.replace("@example.com", "@example.org");
        assert_eq!(r(&other), Ok(vec![Destination::Mailbox("alice@example.org".into())]));
        assert_eq!(r("carol@example.com"), Ok(vec![Destination::Mailbox("carol@example.com".into())]));
    }
}
