//! RFC 5321 §4.1.2 paths, parsed strictly. Everything that could smuggle a second destination
//! (source routes, `%` hacks, `!` paths, several `@`) either parses to one plain mailbox or fails:
//! routing then only ever sees `local@domain`.

/// A mailbox: the local part exactly as sent (unquoted) and the domain lowercased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub local: String,
    pub domain: String,
}

impl Address {
    pub fn new(local: &str, domain: &str) -> Self {
        Address { local: local.to_string(), domain: domain.to_ascii_lowercase() }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if is_dot_string(&self.local) {
            write!(f, "{}@{}", self.local, self.domain)
        } else {
            let escaped = self.local.replace('\\', "\\\\").replace('"', "\\\"");
            write!(f, "\"{escaped}\"@{}", self.domain)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressError {
    /// Not `<...>` or bad mailbox syntax.
    Syntax,
    /// The domain is an address literal (`[192.0.2.1]`): we are MX for names only.
    Literal,
}

fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

fn is_dot_string(s: &str) -> bool {
    !s.is_empty() && s.split('.').all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

/// RFC 5321 `Domain` (with RFC 6531 U-labels): dot-separated labels of letters, digits, hyphens.
pub fn valid_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 255
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii())
        })
}

/// Parses a mailbox (`local@domain`, no angle brackets).
pub fn parse_mailbox(s: &str) -> Result<Address, AddressError> {
    let (local, rest) = if let Some(quoted) = s.strip_prefix('"') {
        // Quoted-string: qtextSMTP or a backslash pair (RFC 5321 §4.1.2).
        let mut local = String::new();
        let mut chars = quoted.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, e)) if (' '..='~').contains(&e) => local.push(e),
                    _ => return Err(AddressError::Syntax),
                },
                '"' => {
                    end = Some(i + 1);
                    break;
                }
                c if c == ' ' || (c.is_ascii_graphic() && c != '"' && c != '\\') || !c.is_ascii() => local.push(c),
                _ => return Err(AddressError::Syntax),
            }
        }
        let end = end.ok_or(AddressError::Syntax)?;
        let rest = quoted[end..].strip_prefix('@').ok_or(AddressError::Syntax)?;
        (local, rest)
    } else {
        let at = s.rfind('@').ok_or(AddressError::Syntax)?;
        let local = &s[..at];
        if !is_dot_string(local) {
            return Err(AddressError::Syntax);
        }
        (local.to_string(), &s[at + 1..])
    };
    if local.is_empty() || local.len() > 64 {
        return Err(AddressError::Syntax);
    }
    if rest.starts_with('[') {
        return Err(AddressError::Literal);
    }
    if !valid_domain(rest) {
        return Err(AddressError::Syntax);
    }
    Ok(Address::new(&local, rest))
}

/// Parses `<path>` as sent after `MAIL FROM:` / `RCPT TO:`, returning the mailbox and the rest of
/// the line (parameters). `<>` gives `None` (the null reverse-path). A source route
/// (`<@a,@b:user@c>`) is accepted and ignored, as RFC 5321 §4.1.1.3 and appendix C require:
/// the mailbox after it is what counts.
pub fn parse_path(s: &str) -> Result<(Option<Address>, &str), AddressError> {
    let s = s.trim_start();
    let inner_start = s.strip_prefix('<').ok_or(AddressError::Syntax)?;
    let close = find_close(inner_start).ok_or(AddressError::Syntax)?;
    let inner = &inner_start[..close];
    let rest = &inner_start[close + 1..];
    if !rest.is_empty() && !rest.starts_with(' ') {
        return Err(AddressError::Syntax);
    }
    if inner.is_empty() {
        return Ok((None, rest));
    }
    let mailbox = if inner.starts_with('@') {
        let colon = inner.find(':').ok_or(AddressError::Syntax)?;
        let route = &inner[..colon];
        if !route.split(',').all(|hop| hop.strip_prefix('@').is_some_and(valid_domain)) {
            return Err(AddressError::Syntax);
        }
        &inner[colon + 1..]
    } else {
        inner
    };
    Ok((Some(parse_mailbox(mailbox)?), rest))
}

/// The `>` that closes the path, skipping any inside a quoted local part.
fn find_close(s: &str) -> Option<usize> {
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            '>' if !in_quotes => return Some(i),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mb(s: &str) -> Result<Address, AddressError> {
        parse_path(s).map(|(a, _)| a.expect("not null"))
    }

    #[test]
    fn plain_and_params() {
        let (a, rest) = parse_path("<Alice@Example.ORG> SIZE=100").unwrap();
        assert_eq!(a.unwrap(), Address { local: "Alice".into(), domain: "example.org".into() });
        assert_eq!(rest, " SIZE=100");
        assert_eq!(parse_path("<>").unwrap().0, None);
    }

    #[test]
    fn relay_tricks_parse_to_one_mailbox_or_fail() {
        // Percent hack: the whole thing is a local part at our domain, never a route to "other".
        assert_eq!(mb("<user%other@example.org>").unwrap(), Address::new("user%other", "example.org"));
        // Source route: ignored, the final mailbox is foreign and routing refuses it.
        assert_eq!(mb("<@a.example,@b.example:user@other.example>").unwrap(), Address::new("user", "other.example"));
        // Quoted local part with an @ inside: still a local part at our domain.
        assert_eq!(mb("<\"user@other\"@example.org>").unwrap(), Address::new("user@other", "example.org"));
        // Two @ unquoted: syntax error.
        assert_eq!(mb("<user@other@example.org>"), Err(AddressError::Syntax));
        // Bang path is just a local part.
        assert_eq!(mb("<other!user@example.org>").unwrap(), Address::new("other!user", "example.org"));
        assert_eq!(mb("<user@[127.0.0.1]>"), Err(AddressError::Literal));
        for bad in [
            "user@example.org",
            "<user@>",
            "<@example.org>",
            "<a..b@example.org>",
            "<user@exa mple.org>",
            "<user@-bad.org>",
            "<\"unterminated@example.org>",
            "<a@b>x",
            "<@a:b@c",
            "<@,@a:b@c.org>",
        ] {
            assert!(mb(bad).is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn display_quotes_when_needed() {
        assert_eq!(Address::new("a b", "x.org").to_string(), "\"a b\"@x.org");
        assert_eq!(Address::new("a.b", "x.org").to_string(), "a.b@x.org");
        assert_eq!(mb("<\"a\\\"b\"@x.org>").unwrap().to_string(), "\"a\\\"b\"@x.org");
    }
}
