//! AUTH X-POSTERN-CLUSTER on port 25: another node of the cluster (a backup MX handing over
//! what it queued) proves itself with the cluster secret bound to this TLS session
//! (`crate::cluster`). Nothing else about the session changes: the same recipients are
//! accepted; only the border checks are skipped, since the node ran them.

use super::{sasl, Flow, Session};
use crate::net::Conn;
use crate::smtp::reply::Reply;

impl Session {
    pub(super) async fn cluster_auth(&mut self, args: &str, conn: &mut Conn) -> Flow {
        let r = self.check_cluster_auth(args, conn).await;
        self.reply(conn, r);
        Flow::Continue
    }

    async fn check_cluster_auth(&mut self, args: &str, conn: &mut Conn) -> Reply {
        let Some(peers) = self.ctx.cluster.as_ref() else {
            return Reply::new(502, "5.5.1", "AUTH not available on this port; use submission");
        };
        if self.helo.is_none() || !self.esmtp {
            return Reply::new(503, "5.5.1", "Send EHLO first");
        }
        let Some(binding) = conn.cluster_binding() else {
            return Reply::new(530, "5.7.0", "Must issue a STARTTLS command first");
        };
        if self.peer_node.is_some() {
            return Reply::new(503, "5.5.1", "Already authenticated");
        }
        if self.tx.is_some() {
            return Reply::new(503, "5.5.1", "AUTH not allowed during a mail transaction");
        }
        let mut words = args.split_ascii_whitespace();
        let (Some(mechanism), initial, None) = (words.next(), words.next(), words.next()) else {
            return Reply::new(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]");
        };
        if !mechanism.eq_ignore_ascii_case(crate::cluster::MECHANISM) {
            return Reply::new(504, "5.5.4", "Unrecognized authentication type");
        }
        let ip = self.peer.ip();
        let limiter = self.ctx.submission.auth_limiter.clone();
        if limiter.blocked(ip, None) {
            tracing::warn!("{} smtp cluster-auth address={ip} result=blocked", self.sid);
            return Reply::new(454, "4.7.0", "Too many failed authentication attempts, try again later");
        }
        // The response is one line and carries the node name: an initial response is required
        // (RFC 4954 §4 lets a mechanism define that).
        let Some(data) = initial.and_then(|i| sasl::decode_response(i).ok()) else {
            return Reply::new(501, "5.5.2", "Cluster authentication needs a valid base64 initial response");
        };
        let known = |n: &str| peers.nodes.iter().any(|p| p == n);
        match crate::cluster::verify(&peers.secret, &data, &binding, known) {
            Some(node) => {
                tracing::info!("{} smtp cluster-auth node={node} address={ip} result=ok", self.sid);
                let proof = crate::cluster::server_proof(&peers.secret, &node, &binding);
                self.peer_node = Some(node.clone());
                Reply::new(235, "2.7.0", format!("Authenticated as cluster node {node} {proof}"))
            }
            None => {
                limiter.record_failure(ip, None);
                tracing::warn!("{} smtp cluster-auth address={ip} result=failed", self.sid);
                Reply::new(535, "5.7.8", "Authentication credentials invalid")
            }
        }
    }
}
