//! SMTP command lines → `Command`, with the reply each syntax error deserves (RFC 5321 §4.2.4:
//! 500 unrecognised command, 501 bad arguments, 555 unsupported MAIL/RCPT parameter).

use super::address::{parse_path, Address, AddressError};
use super::reply::Reply;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyType {
    SevenBit,
    EightBitMime,
}

/// A parsed command. `Auth` carries its arguments (mechanism and optional initial response),
/// which `sasl` parses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    Mail { from: Option<Address>, size: Option<u64>, body: BodyType, smtputf8: bool },
    Rcpt { to: Address },
    Data,
    Bdat { size: u64, last: bool },
    Rset,
    Noop,
    Quit,
    Help,
    Vrfy,
    Expn,
    StartTls,
    Auth(String),
}

/// Parses one command line (without CRLF).
pub fn parse(line: &[u8]) -> Result<Command, Reply> {
    let line = std::str::from_utf8(line).map_err(|_| Reply::new(500, "5.5.2", "Syntax error: line is not UTF-8"))?;
    if line.contains('\0') {
        return Err(Reply::new(500, "5.5.2", "Syntax error: NUL in command"));
    }
    let (verb, args) = match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    };
    let no_args = |cmd: Command| {
        if args.trim().is_empty() {
            Ok(cmd)
        } else {
            Err(Reply::new(501, "5.5.4", "Syntax error: no arguments allowed"))
        }
    };
    match verb.to_ascii_uppercase().as_str() {
        "EHLO" | "HELO" => {
            let host = args.trim();
            if host.is_empty() || host.contains(' ') {
                return Err(Reply::new(501, "5.5.4", "Syntax: EHLO hostname"));
            }
            Ok(if verb.eq_ignore_ascii_case("EHLO") { Command::Ehlo(host.into()) } else { Command::Helo(host.into()) })
        }
        "MAIL" => parse_mail(args),
        "RCPT" => parse_rcpt(args),
        "DATA" => no_args(Command::Data),
        "BDAT" => parse_bdat(args),
        "RSET" => no_args(Command::Rset),
        "NOOP" => Ok(Command::Noop), // RFC 5321 §4.1.1.9: an argument is allowed and ignored.
        "QUIT" => no_args(Command::Quit),
        "HELP" => Ok(Command::Help),
        "VRFY" => Ok(Command::Vrfy),
        "EXPN" => Ok(Command::Expn),
        "STARTTLS" => no_args(Command::StartTls),
        "AUTH" => Ok(Command::Auth(args.trim().to_string())),
        _ => Err(Reply::new(500, "5.5.1", "Command unrecognized")),
    }
}

/// `FROM:` / `TO:`, tolerating a space after the colon as many clients send one.
fn strip_keyword<'a>(args: &'a str, keyword: &str) -> Option<&'a str> {
    if args.len() < keyword.len() || !args[..keyword.len()].eq_ignore_ascii_case(keyword) {
        return None;
    }
    Some(args[keyword.len()..].trim_start())
}

fn address_error(e: AddressError) -> Reply {
    match e {
        AddressError::Syntax => Reply::new(501, "5.1.3", "Bad address syntax"),
        AddressError::Literal => Reply::new(550, "5.7.1", "Address literals are not accepted here"),
    }
}

fn params(rest: &str) -> impl Iterator<Item = (String, Option<&str>)> {
    rest.split(' ').filter(|p| !p.is_empty()).map(|p| match p.split_once('=') {
        Some((k, v)) => (k.to_ascii_uppercase(), Some(v)),
        None => (p.to_ascii_uppercase(), None),
    })
}

fn parse_mail(args: &str) -> Result<Command, Reply> {
    let path = strip_keyword(args, "FROM:").ok_or_else(|| Reply::new(501, "5.5.4", "Syntax: MAIL FROM:<address>"))?;
    let (from, rest) = parse_path(path).map_err(address_error)?;
    let (mut size, mut body, mut smtputf8) = (None, BodyType::SevenBit, false);
    for (key, value) in params(rest) {
        match (key.as_str(), value) {
            ("SIZE", Some(v)) => {
                size = Some(v.parse().map_err(|_| Reply::new(501, "5.5.4", "Syntax: SIZE=<number>"))?);
            }
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => body = BodyType::SevenBit,
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => body = BodyType::EightBitMime,
            ("SMTPUTF8", None) => smtputf8 = true,
            // RFC 4954 §5: AUTH= on MAIL is allowed from any client; we do not trust it on port 25.
            ("AUTH", Some(_)) => {}
            _ => return Err(Reply::new(555, "5.5.4", "MAIL FROM parameter not recognized or not implemented")),
        }
    }
    Ok(Command::Mail { from, size, body, smtputf8 })
}

fn parse_rcpt(args: &str) -> Result<Command, Reply> {
    let path = strip_keyword(args, "TO:").ok_or_else(|| Reply::new(501, "5.5.4", "Syntax: RCPT TO:<address>"))?;
    let (to, rest) = parse_path(path).map_err(address_error)?;
    let to = to.ok_or_else(|| Reply::new(501, "5.1.3", "Null recipient not allowed"))?;
    if params(rest).next().is_some() {
        return Err(Reply::new(555, "5.5.4", "RCPT TO parameter not recognized or not implemented"));
    }
    Ok(Command::Rcpt { to })
}

fn parse_bdat(args: &str) -> Result<Command, Reply> {
    let mut parts = args.split(' ').filter(|p| !p.is_empty());
    let size = parts
        .next()
        .and_then(|s| if s.bytes().all(|b| b.is_ascii_digit()) { s.parse().ok() } else { None })
        .ok_or_else(|| Reply::new(501, "5.5.4", "Syntax: BDAT <size> [LAST]"))?;
    let last = match parts.next() {
        None => false,
        Some(l) if l.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(Reply::new(501, "5.5.4", "Syntax: BDAT <size> [LAST]")),
    };
    if parts.next().is_some() {
        return Err(Reply::new(501, "5.5.4", "Syntax: BDAT <size> [LAST]"));
    }
    Ok(Command::Bdat { size, last })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(line: &str) -> u16 {
        parse(line.as_bytes()).unwrap_err().code
    }

    #[test]
    fn commands() {
        assert_eq!(parse(b"ehlo client.example").unwrap(), Command::Ehlo("client.example".into()));
        assert_eq!(
            parse(b"MAIL FROM:<a@b.org> SIZE=1000 BODY=8BITMIME SMTPUTF8").unwrap(),
            Command::Mail {
                from: Some(Address::new("a", "b.org")),
                size: Some(1000),
                body: BodyType::EightBitMime,
                smtputf8: true
            }
        );
        assert_eq!(
            parse(b"MAIL FROM: <>").unwrap(),
            Command::Mail { from: None, size: None, body: BodyType::SevenBit, smtputf8: false }
        );
        assert_eq!(parse(b"RCPT TO:<x@y.org>").unwrap(), Command::Rcpt { to: Address::new("x", "y.org") });
        assert_eq!(parse(b"BDAT 100 LAST").unwrap(), Command::Bdat { size: 100, last: true });
        assert_eq!(parse(b"NOOP anything").unwrap(), Command::Noop);
        assert_eq!(parse(b"auth PLAIN AGEAYg==").unwrap(), Command::Auth("PLAIN AGEAYg==".into()));
    }

    #[test]
    fn errors_get_their_codes() {
        assert_eq!(code("FOO"), 500);
        assert_eq!(code("EHLO"), 501);
        assert_eq!(code("MAIL TO:<a@b.org>"), 501);
        assert_eq!(code("MAIL FROM:<a@b.org> SIZE=abc"), 501);
        assert_eq!(code("MAIL FROM:<a@b.org> RET=FULL"), 555);
        assert_eq!(code("RCPT TO:<>"), 501);
        assert_eq!(code("RCPT TO:<a@b.org> NOTIFY=NEVER"), 555);
        assert_eq!(code("RCPT TO:<user@other@example.org>"), 501);
        assert_eq!(code("RCPT TO:<user@[10.0.0.1]>"), 550);
        assert_eq!(code("DATA now"), 501);
        assert_eq!(code("BDAT -1"), 501);
        assert_eq!(code("BDAT 10 FIRST"), 501);
        assert_eq!(parse(b"QUIT\xff").unwrap_err().code, 500);
    }
}
