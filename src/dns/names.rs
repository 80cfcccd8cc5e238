//! Turning user- and DNS-supplied domain names into lookup keys and back.

use hickory_resolver::proto::rr::Name;

use super::DnsError;

/// Parses a domain or host name for lookup: surrounding whitespace and one trailing dot are removed,
/// case is folded (DNS names are case-insensitive, RFC 4343), internationalized names become their
/// A-label (punycode) form, and the result is absolute so no resolv.conf search suffix applies.
///
/// Rejects what can never be a mail domain rather than asking the network: empty names, empty
/// labels, labels over 63 or names over 253 octets (RFC 1035 §2.3.4), address literals, and ASCII
/// punctuation other than `-` and `_` (underscore appears in DKIM/DMARC names).
pub fn parse_name(input: &str) -> Result<Name, DnsError> {
    let trimmed = input.trim();
    let bare = trimmed.strip_suffix('.').unwrap_or(trimmed);
    let invalid = |why: &str| Err(DnsError::Invalid(format!("{why}: {input:?}")));
    if bare.is_empty() {
        return invalid("empty domain name");
    }
    if bare.parse::<std::net::IpAddr>().is_ok() {
        return invalid("an address literal is not a domain name");
    }
    if bare.split('.').any(str::is_empty) {
        return invalid("empty label in domain name");
    }
    if let Some(c) = bare.chars().find(|c| c.is_ascii() && !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return invalid(&format!("character {c:?} not allowed in a domain name"));
    }
    let mut name =
        Name::from_utf8(bare).map_err(|e| DnsError::Invalid(format!("bad domain name {input:?}: {e}")))?.to_lowercase();
    name.set_fqdn(true);
    let ascii = name.to_ascii();
    if ascii.len() > 254 || name.iter().any(|label| label.len() > 63) {
        return invalid("domain name too long");
    }
    Ok(name)
}

/// The presentation form used in `MxHost::name` and PTR results: A-labels, lower case, no trailing
/// dot (the root itself stays ".").
pub fn display_name(name: &Name) -> String {
    let ascii = name.to_lowercase().to_ascii();
    match ascii.strip_suffix('.') {
        Some("") | None => ascii,
        Some(s) => s.to_string(),
    }
}
