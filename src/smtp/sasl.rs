//! SASL for SMTP AUTH (RFC 4954): the PLAIN (RFC 4616) and LOGIN mechanisms, as pure parsing of
//! the command arguments and the base64 client responses. Protocol-neutral enough for IMAP's
//! AUTHENTICATE, which uses the same encoding.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslError {
    /// The client answered `*` (RFC 4954 §4).
    Cancelled,
    /// Not valid base64.
    BadBase64,
    /// Decoded, but not the mechanism's message format (or not UTF-8).
    Malformed,
    /// A mechanism we do not offer.
    UnknownMechanism,
    /// `AUTH` without a mechanism, or too many arguments.
    Syntax,
}

/// `AUTH mechanism [initial-response]` arguments → the mechanism and the raw initial response.
pub fn parse_auth_args(args: &str) -> Result<(Mechanism, Option<&str>), SaslError> {
    let mut parts = args.split(' ').filter(|p| !p.is_empty());
    let mech = parts.next().ok_or(SaslError::Syntax)?;
    let initial = parts.next();
    if parts.next().is_some() {
        return Err(SaslError::Syntax);
    }
    let mech = match mech.to_ascii_uppercase().as_str() {
        "PLAIN" => Mechanism::Plain,
        "LOGIN" => Mechanism::Login,
        _ => return Err(SaslError::UnknownMechanism),
    };
    Ok((mech, initial))
}

/// One client response: `*` cancels, `=` is an empty initial response (RFC 4954 §4), otherwise
/// base64.
pub fn decode_response(line: &str) -> Result<Vec<u8>, SaslError> {
    let line = line.trim();
    if line == "*" {
        return Err(SaslError::Cancelled);
    }
    if line == "=" {
        return Ok(Vec::new());
    }
    STANDARD.decode(line).map_err(|_| SaslError::BadBase64)
}

/// What a client claimed to be.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The identity to act as, when given and different from `user` (we refuse proxy auth).
    pub authzid: Option<String>,
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    // Never print the password, even in a test failure.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("authzid", &self.authzid).field("user", &self.user).finish()
    }
}

/// RFC 4616: `[authzid] NUL authcid NUL passwd`.
pub fn decode_plain(data: &[u8]) -> Result<Credentials, SaslError> {
    let mut parts = data.split(|&b| b == 0);
    let (Some(authz), Some(user), Some(pass), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(SaslError::Malformed);
    };
    let authz = text(authz)?;
    let user = text(user)?;
    if user.is_empty() {
        return Err(SaslError::Malformed);
    }
    Ok(Credentials { authzid: if authz.is_empty() { None } else { Some(authz) }, user, password: text(pass)? })
}

/// A LOGIN response (user name or password): UTF-8 text without NUL.
pub fn text(data: &[u8]) -> Result<String, SaslError> {
    if data.contains(&0) {
        return Err(SaslError::Malformed);
    }
    String::from_utf8(data.to_vec()).map_err(|_| SaslError::Malformed)
}

/// The LOGIN mechanism's prompts, base64 of "Username:" and "Password:".
pub const LOGIN_USERNAME: &str = "VXNlcm5hbWU6";
pub const LOGIN_PASSWORD: &str = "UGFzc3dvcmQ6";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_arguments() {
        assert_eq!(parse_auth_args("PLAIN").unwrap(), (Mechanism::Plain, None));
        assert_eq!(parse_auth_args("plain AGEAYg==").unwrap(), (Mechanism::Plain, Some("AGEAYg==")));
        assert_eq!(parse_auth_args("Login").unwrap(), (Mechanism::Login, None));
        assert_eq!(parse_auth_args("CRAM-MD5"), Err(SaslError::UnknownMechanism));
        assert_eq!(parse_auth_args(""), Err(SaslError::Syntax));
        assert_eq!(parse_auth_args("PLAIN a b"), Err(SaslError::Syntax));
    }

    #[test]
    fn responses() {
        assert_eq!(decode_response("*"), Err(SaslError::Cancelled));
        assert_eq!(decode_response("="), Ok(Vec::new()));
        assert_eq!(decode_response("YWxpY2U="), Ok(b"alice".to_vec()));
        assert_eq!(decode_response("not base64!"), Err(SaslError::BadBase64));
        assert_eq!(decode_response(LOGIN_USERNAME).unwrap(), b"Username:");
        assert_eq!(decode_response(LOGIN_PASSWORD).unwrap(), b"Password:");
    }

    #[test]
    fn plain() {
        let c = decode_plain(b"\0alice@example.org\0secret").unwrap();
        assert_eq!((c.authzid, c.user.as_str(), c.password.as_str()), (None, "alice@example.org", "secret"));
        let c = decode_plain(b"bob\0alice\0pw").unwrap();
        assert_eq!(c.authzid.as_deref(), Some("bob"));
        assert_eq!(decode_plain(b"alice\0secret"), Err(SaslError::Malformed));
        assert_eq!(decode_plain(b"\0\0secret"), Err(SaslError::Malformed));
        assert_eq!(decode_plain(b"\0a\0b\0c"), Err(SaslError::Malformed));
        assert_eq!(decode_plain(b"\0a\0\xff"), Err(SaslError::Malformed));
        assert!(!format!("{:?}", decode_plain(b"\0a\0hunter2").unwrap()).contains("hunter2"));
    }

    #[test]
    fn login_text() {
        assert_eq!(text(b"alice").unwrap(), "alice");
        assert_eq!(text(b"a\0b"), Err(SaslError::Malformed));
    }
}
