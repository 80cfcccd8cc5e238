//! One ACME order: account, authorizations, challenge, CSR, certificate (RFC 8555 §7.4).

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, ExternalAccountKey, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use serde::{Deserialize, Serialize};

use super::Challenges;
use crate::config::{AcmeChallenge, AcmeSettings};

#[derive(Serialize, Deserialize)]
struct StoredAccount {
    directory: String,
    credentials: AccountCredentials,
}

/// The account for this directory: the stored one, or a new one (saved 0600).
async fn account(settings: &AcmeSettings, dir: &Path) -> Result<Account> {
    let builder = || match &settings.ca_file {
        Some(ca) => Account::builder_with_root(ca).context("ACME CA file"),
        None => Account::builder().context("ACME HTTP client"),
    };
    let path = dir.join("account.json");
    if let Ok(bytes) = std::fs::read(&path) {
        match serde_json::from_slice::<StoredAccount>(&bytes) {
            Ok(stored) if stored.directory == settings.directory => {
                return builder()?.from_credentials(stored.credentials).await.context("restoring the ACME account");
            }
            Ok(_) => tracing::info!("acme directory changed: registering a new account"),
            Err(e) => tracing::warn!("acme account file unreadable ({e}): registering a new account"),
        }
    }
    let contact: Vec<&str> = settings.contact.iter().map(String::as_str).collect();
    let eab = match &settings.eab {
        Some((kid, key)) => {
            let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(key.trim_end_matches('='))
                .context("eab_hmac_key is not base64url")?;
            Some(ExternalAccountKey::new(kid.clone(), &key))
        }
        None => None,
    };
    let new = NewAccount { contact: &contact, terms_of_service_agreed: true, only_return_existing: false };
    let (account, credentials) = builder()?
        .create(&new, settings.directory.clone(), eab.as_ref())
        .await
        .context("registering an ACME account")?;
    std::fs::create_dir_all(dir)?;
    let stored = StoredAccount { directory: settings.directory.clone(), credentials };
    crate::tls::write_private(&path, &serde_json::to_vec_pretty(&stored)?)?;
    tracing::info!("acme account registered id={}", account.id());
    Ok(account)
}

/// Removes the challenge answers of an order however it ends.
struct Cleanup<'a> {
    challenges: &'a Challenges,
    tokens: Vec<String>,
    alpn_names: Vec<String>,
    webroot_files: Vec<std::path::PathBuf>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for t in &self.tokens {
            self.challenges.set_http_token(t, None);
        }
        for n in &self.alpn_names {
            self.challenges.certs.set_alpn_challenge(n, None);
        }
        for f in &self.webroot_files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// RFC 8737 §3: a self-signed certificate for `name` carrying the acmeIdentifier extension.
fn alpn_certificate(name: &str, digest: &[u8]) -> Result<std::sync::Arc<rustls::sign::CertifiedKey>> {
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])?;
    params.custom_extensions.push(rcgen::CustomExtension::new_acme_identifier(digest));
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    // Not through `tls::certified_key`: its consistency check parses the certificate with
    // webpki, which refuses the critical acmeIdentifier extension this certificate must carry.
    let signing = rustls::crypto::ring::sign::any_supported_type(&der)?;
    Ok(std::sync::Arc::new(rustls::sign::CertifiedKey::new(vec![cert.der().clone()], signing)))
}

/// Orders a certificate for `names`; returns (chain PEM, key PEM).
pub(super) async fn obtain(
    settings: &AcmeSettings,
    names: &[String],
    dir: &Path,
    challenges: &Challenges,
) -> Result<(String, String)> {
    let account = account(settings, dir).await?;
    let identifiers: Vec<Identifier> = names.iter().map(|n| Identifier::Dns(n.clone())).collect();
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await.context("creating the order")?;
    let mut cleanup = Cleanup { challenges, tokens: Vec::new(), alpn_names: Vec::new(), webroot_files: Vec::new() };
    let kind = match settings.challenge {
        AcmeChallenge::Http01 => ChallengeType::Http01,
        AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
    };
    {
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.context("fetching an authorization")?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => bail!("authorization is {other:?}"),
            }
            let mut challenge = authz
                .challenge(kind.clone())
                .ok_or_else(|| anyhow!("the CA offers no {} challenge", settings.challenge.as_str()))?;
            let name = challenge.identifier().to_string();
            let key_auth = challenge.key_authorization();
            match settings.challenge {
                AcmeChallenge::Http01 => {
                    let token = challenge.token.clone();
                    challenges.set_http_token(&token, Some(key_auth.as_str().to_string()));
                    cleanup.tokens.push(token.clone());
                    if let Some(root) = &settings.webroot {
                        let d = root.join(".well-known/acme-challenge");
                        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
                        let file = d.join(&token);
                        std::fs::write(&file, key_auth.as_str())
                            .with_context(|| format!("writing {}", file.display()))?;
                        cleanup.webroot_files.push(file);
                    }
                }
                AcmeChallenge::TlsAlpn01 => {
                    let cert = alpn_certificate(&name, key_auth.digest().as_ref())?;
                    challenges.certs.set_alpn_challenge(&name, Some(cert));
                    cleanup.alpn_names.push(name.clone());
                }
            }
            tracing::info!("acme challenge ready type={} name={name}", settings.challenge.as_str());
            challenge.set_ready().await.context("telling the CA the challenge is ready")?;
        }
    }
    let retry = RetryPolicy::new().initial_delay(Duration::from_millis(250)).timeout(Duration::from_secs(90));
    let status = order.poll_ready(&retry).await.context("waiting for validation")?;
    if status != OrderStatus::Ready {
        bail!("validation failed: order is {status:?}{}", problem_detail(&mut order).await);
    }
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key)?;
    order.finalize_csr(csr.der()).await.context("finalizing the order")?;
    let chain = order.poll_certificate(&retry).await.context("downloading the certificate")?;
    drop(cleanup);
    Ok((chain, key.serialize_pem()))
}

/// The CA's explanation of a failed validation, from the authorizations' challenges.
async fn problem_detail(order: &mut instant_acme::Order) -> String {
    let mut out = String::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(authz)) = authorizations.next().await {
        for c in &authz.challenges {
            if let Some(e) = &c.error {
                out.push_str(&format!(": {} {}", authz.identifier(), e.detail.as_deref().unwrap_or("(no detail)")));
            }
        }
    }
    out
}
