//! Postern: a single-binary mail server. The module tree follows the path of a message:
//! listeners (`server`) → sessions (`smtp`) → routing → `queue` → delivery (local store |
//! `delivery::remote`) → store → `imap`.

pub mod acme;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod control;
pub mod delivery;
pub mod dkim;
pub mod dns;
pub mod dsn;
pub mod imap;
pub mod metrics;
pub mod net;
pub mod queue;
pub mod quickstart;
pub mod routing;
pub mod server;
pub mod smtp;
pub mod store;
pub mod sync;
pub mod tls;
pub mod verdict;
