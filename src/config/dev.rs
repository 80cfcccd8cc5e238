//! The embedded development node: what `postern serve` runs when no config file exists. It writes
//! a real config file (so the operator can read and edit what runs) into `./postern-data`, with a
//! self-signed certificate and one user whose generated password is printed once.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub struct DevSetup {
    pub config_path: PathBuf,
    pub user: String,
    /// Set only on the start that created the user: the password is shown once.
    pub new_password: Option<String>,
}

pub const DEV_USER: &str = "dev@localhost";

/// Creates (or reuses) the development node under `dir`.
pub fn dev_config(dir: &Path) -> Result<DevSetup> {
    let config_path = dir.join("postern.toml");
    if config_path.exists() {
        return Ok(DevSetup { config_path, user: DEV_USER.to_string(), new_password: None });
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::tls::ensure_self_signed(&dir.join("tls"), &["localhost".to_string(), "127.0.0.1".to_string()])?;
    let password = crate::auth::generate_password();
    let hash = crate::auth::hash_password(&password);
    let text = format!(
        r#"# Development node, written by `postern serve` because no config file was found.
# Edit it freely; see config.example.toml for every key. Paths are relative to this file.

[cluster]
domains = ["localhost"]

[nodes.dev]
hostname = "localhost"
role = "primary"
data_dir = "."
listen.smtp = ["127.0.0.1:2525"]
listen.submission = ["127.0.0.1:2587"]
listen.imap = ["127.0.0.1:1143"]
listen.imaps = ["127.0.0.1:1993"]

[tls]
cert = "tls/self-signed.pem"
key = "tls/self-signed.key"

[users."{DEV_USER}"]
password = "{hash}"

[aliases]
"postmaster@localhost" = "{DEV_USER}"
"#
    );
    crate::tls::write_private(&config_path, text.as_bytes())?;
    Ok(DevSetup { config_path, user: DEV_USER.to_string(), new_password: Some(password) })
}
