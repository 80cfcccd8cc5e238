//! The cluster configuration: one TOML file shared by every node.
//!
//! `model` holds the typed, validated result; `load` turns a file into it and collects *every*
//! problem with file, line and key, so an operator fixes a bad file in one pass; `dev` builds the
//! embedded development node used when no config file exists.

mod acme;
mod aliases;
mod cluster;
mod describe;
mod dev;
mod dkim;
mod dns;
mod inbound;
mod load;
mod model;
mod nodes;
mod outbound;
mod srs;
mod sync;
mod values;

pub use describe::describe;
pub use dev::{dev_config, DevSetup, DEV_USER};
pub use inbound::{InboundAction, InboundSettings};
pub use load::{load_file, load_str, ConfigError, ConfigErrors};
pub use model::*;
pub use values::{format_duration, format_size, parse_duration, parse_size};
