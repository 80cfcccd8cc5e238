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

/// The labels that keep one use of the secret apart from another: a proof made for the SMTP
/// relay hop is worthless on a replication link, and a client's proof is never a server's.
#[derive(Debug, Clone, Copy)]
pub struct Labels {
    /// TLS exporter label (RFC 5705 §4: labels beginning with "EXPORTER" are for applications).
    pub exporter: &'static [u8],
    pub client: &'static [u8],
    pub server: &'static [u8],
}

/// The backup → primary SMTP hop (AUTH X-POSTERN-CLUSTER).
pub const SMTP: Labels = Labels {
    exporter: b"EXPORTER-postern-cluster-auth",
    client: b"postern cluster client v1",
    server: b"postern cluster server v1",
};

/// Replication links between primaries (`listen.sync`, `crate::sync`).
pub const SYNC: Labels =
    Labels { exporter: b"EXPORTER-postern-sync", client: b"postern sync client v1", server: b"postern sync server v1" };

/// TLS exporter label of the SMTP hop.
pub const EXPORTER_LABEL: &[u8] = SMTP.exporter;

/// Keying material of one TLS session, the same on both ends.
pub type Binding = [u8; 32];

/// A MAC as it travels in a binary protocol.
pub type Tag = [u8; 32];

impl Labels {
    /// The session's exporter value under these labels, from either end of the connection.
    pub fn binding<D>(&self, conn: &rustls::ConnectionCommon<D>) -> Option<Binding> {
        conn.export_keying_material([0u8; 32], self.exporter, None).ok()
    }

    /// The proof node `node` sends on the session `binding`.
    pub fn client_tag(&self, secret: &Secret, node: &str, binding: &Binding) -> Tag {
        tag(secret, self.client, node, binding)
    }

    /// The server's answer to a verified `node` on this session.
    pub fn server_tag(&self, secret: &Secret, node: &str, binding: &Binding) -> Tag {
        tag(secret, self.server, node, binding)
    }

    /// Constant-time (ring's `verify`); a tag of the wrong length is simply wrong.
    pub fn check_client(&self, secret: &Secret, node: &str, binding: &Binding, tag: &[u8]) -> bool {
        check(secret, self.client, node, binding, tag)
    }

    pub fn check_server(&self, secret: &Secret, node: &str, binding: &Binding, tag: &[u8]) -> bool {
        check(secret, self.server, node, binding, tag)
    }
}

/// The SMTP hop's session binding.
pub fn binding<D>(conn: &rustls::ConnectionCommon<D>) -> Option<Binding> {
    SMTP.binding(conn)
}

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

fn tag(secret: &Secret, label: &[u8], node: &str, binding: &Binding) -> Tag {
    let mut out = [0u8; 32];
    out.copy_from_slice(hmac::sign(&key(secret), &message(label, node, binding)).as_ref());
    out
}

fn check(secret: &Secret, label: &[u8], node: &str, binding: &Binding, tag: &[u8]) -> bool {
    hmac::verify(&key(secret), &message(label, node, binding), tag).is_ok()
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
    format!("{node} {}", hex(&SMTP.client_tag(secret, node, binding)))
}

/// What the server puts in its 235 reply for `node` on this session.
pub fn server_proof(secret: &Secret, node: &str, binding: &Binding) -> String {
    hex(&SMTP.server_tag(secret, node, binding))
}

/// Whether the server's 235 text carries the right proof.
pub fn check_server_proof(secret: &Secret, node: &str, binding: &Binding, reply_text: &str) -> bool {
    reply_text.split_whitespace().any(|w| unhex(w).is_some_and(|t| SMTP.check_server(secret, node, binding, &t)))
}

/// The node name a response proves, if it is right for this session and names a node that
/// `known` accepts. The comparison is constant-time (ring's `verify`).
pub fn verify(secret: &Secret, response: &[u8], binding: &Binding, known: impl Fn(&str) -> bool) -> Option<String> {
    let text = std::str::from_utf8(response).ok()?;
    let (node, tag) = text.split_once(' ')?;
    let tag = unhex(tag)?;
    (known(node) && SMTP.check_client(secret, node, binding, &tag)).then(|| node.to_string())
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
    fn sync_labels_make_other_proofs() {
        let s = secret("0123456789abcdef0123");
        let b = [7u8; 32];
        let sync = SYNC.client_tag(&s, "mail2", &b);
        assert!(SYNC.check_client(&s, "mail2", &b, &sync));
        // Not the SMTP hop's proof, not the server's, not for another node, session or secret.
        assert_ne!(sync, SMTP.client_tag(&s, "mail2", &b));
        assert!(!SYNC.check_server(&s, "mail2", &b, &sync));
        assert!(!SYNC.check_client(&s, "mail3", &b, &sync));
        assert!(!SYNC.check_client(&s, "mail2", &[8u8; 32], &sync));
        assert!(!SYNC.check_client(&secret("another secret of 20"), "mail2", &b, &sync));
        assert!(!SYNC.check_client(&s, "mail2", &b, &sync[..31]));
        assert!(SYNC.check_server(&s, "mail2", &b, &SYNC.server_tag(&s, "mail2", &b)));
        // The SMTP hop's wire form is unchanged: hex of the same MAC.
        let r = response(&s, "mail2", &b);
        assert_eq!(r, format!("mail2 {}", hex(&SMTP.client_tag(&s, "mail2", &b))));
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
