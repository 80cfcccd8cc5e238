//! Node-to-node authentication with the cluster secret (`cluster.secret_file`).
//!
//! A backup MX relaying to a primary proves it is a node of the cluster with an SMTP AUTH
//! mechanism of our own, `X-POSTERN-CLUSTER` (RFC 4954 allows private `X-` mechanisms). The
//! response is `NODE SP HEX(HMAC-SHA256(secret, label NUL NODE NUL exporter))`, where the
//! exporter is keying material of the TLS session itself (RFC 8446 §7.5, RFC 5705). Binding
//! the proof to the session means a recorded response is useless on any other connection, and
//! a man in the middle, who holds two different TLS sessions, cannot pass it on. The secret
//! itself never crosses the wire. The server answers 235 with a proof of its own (the same MAC
//! under another label), so the client knows it reached a cluster node and not an impostor
//! with a valid certificate for the name: the TLS certificate may even be self-signed.

use ring::hmac;

use crate::config::Secret;

/// The SASL mechanism name advertised on port 25 once TLS is up.
pub const MECHANISM: &str = "X-POSTERN-CLUSTER";

/// TLS exporter label (RFC 5705 §4: labels beginning with "EXPORTER" are for applications).
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-postern-cluster-auth";

/// Keying material of one TLS session, the same on both ends.
pub type Binding = [u8; 32];

/// The session's exporter value, from either end of the connection.
pub fn binding<D>(conn: &rustls::ConnectionCommon<D>) -> Option<Binding> {
    conn.export_keying_material([0u8; 32], EXPORTER_LABEL, None).ok()
}

const CLIENT_LABEL: &[u8] = b"postern cluster client v1";
const SERVER_LABEL: &[u8] = b"postern cluster server v1";

fn message(label: &[u8], node: &str, binding: &Binding) -> Vec<u8> {
    let mut msg = Vec::with_capacity(label.len() + node.len() + 34);
    msg.extend_from_slice(label);
    msg.push(0);
    msg.extend_from_slice(node.as_bytes());
    msg.push(0);
    msg.extend_from_slice(binding);
    msg
}

fn key(secret: &Secret) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, secret.0.as_bytes())
}

fn mac(secret: &Secret, label: &[u8], node: &str, binding: &Binding) -> String {
    hex(hmac::sign(&key(secret), &message(label, node, binding)).as_ref())
}

fn check(secret: &Secret, label: &[u8], node: &str, binding: &Binding, tag_hex: &str) -> bool {
    unhex(tag_hex).is_some_and(|tag| hmac::verify(&key(secret), &message(label, node, binding), &tag).is_ok())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

/// The SASL response (before base64) that node `node` sends on the session `binding`.
pub fn response(secret: &Secret, node: &str, binding: &Binding) -> String {
    format!("{node} {}", mac(secret, CLIENT_LABEL, node, binding))
}

/// What the server puts in its 235 reply for `node` on this session.
pub fn server_proof(secret: &Secret, node: &str, binding: &Binding) -> String {
    mac(secret, SERVER_LABEL, node, binding)
}

/// Whether the server's 235 text carries the right proof.
pub fn check_server_proof(secret: &Secret, node: &str, binding: &Binding, reply_text: &str) -> bool {
    reply_text.split_whitespace().any(|w| check(secret, SERVER_LABEL, node, binding, w))
}

/// The node name a response proves, if it is right for this session and names a node that
/// `known` accepts. The comparison is constant-time (ring's `verify`).
pub fn verify(secret: &Secret, response: &[u8], binding: &Binding, known: impl Fn(&str) -> bool) -> Option<String> {
    let text = std::str::from_utf8(response).ok()?;
    let (node, tag) = text.split_once(' ')?;
    (known(node) && check(secret, CLIENT_LABEL, node, binding, tag)).then(|| node.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret {
        Secret(s.to_string())
    }

    #[test]
    fn a_response_verifies_only_for_its_session_node_and_secret() {
        let s = secret("0123456789abcdef0123");
        let b = [7u8; 32];
        let r = response(&s, "mx2", &b);
        let any = |_: &str| true;
        assert_eq!(verify(&s, r.as_bytes(), &b, any).as_deref(), Some("mx2"));
        // Another session, another secret, another claimed node, an unknown node: refused.
        assert_eq!(verify(&s, r.as_bytes(), &[8u8; 32], any), None);
        assert_eq!(verify(&secret("another secret of 20"), r.as_bytes(), &b, any), None);
        let renamed = r.replacen("mx2", "mail", 1);
        assert_eq!(verify(&s, renamed.as_bytes(), &b, any), None);
        assert_eq!(verify(&s, r.as_bytes(), &b, |n| n == "mail"), None);
        // The server's proof is not the client's response, and the other way round.
        let proof = server_proof(&s, "mx2", &b);
        assert!(check_server_proof(&s, "mx2", &b, &format!("2.7.0 Authenticated {proof}")));
        assert!(!check_server_proof(&s, "mx2", &b, r.split_once(' ').unwrap().1));
        assert!(!check_server_proof(&s, "mx2", &[1u8; 32], &proof));
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        let s = secret("0123456789abcdef0123");
        let b = [0u8; 32];
        for junk in [&b""[..], b"mx2", b"mx2 ", b"mx2 zz", b"mx2 abc", b"\xff\xfe 00", b" 00"] {
            assert_eq!(verify(&s, junk, &b, |_| true), None);
        }
    }
}
