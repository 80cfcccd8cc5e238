//! The admin control socket (like OpenSMTPD's smtpctl socket): a Unix-domain socket at
//! `control_socket`, by default `DATA_DIR/control.sock`, mode 0600, that only root and the
//! server's own user may use (checked with SO_PEERCRED). `postern queue ...` talks to it.
//!
//! * `protocol`: the JSON lines on the wire;
//! * `server`: binds the socket and answers requests against the node's [`Queue`](crate::queue::Queue);
//! * `client`: what the CLI uses, plus the `queue list`/`queue show` rendering.

pub mod client;
pub mod protocol;
pub mod server;

use std::path::PathBuf;

use crate::config::Node;

pub use server::{snapshot, ControlSocket};

/// The file name of the socket inside the data directory when `control_socket` is not set.
pub const DEFAULT_SOCKET_NAME: &str = "control.sock";

/// Where a node's control socket is.
pub fn socket_path(node: &Node) -> PathBuf {
    node.control_socket.clone().unwrap_or_else(|| node.data_dir.join(DEFAULT_SOCKET_NAME))
}
