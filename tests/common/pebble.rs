//! Test harness: a real Pebble ACME test CA (Debian package `pebble`, 2.4.0 on Debian 12) plus
//! `pebble-challtestsrv` as its DNS, on loopback with fresh ports, for the ACME tests.
//!
//! Quirks found with Debian's pebble 2.4.0 (`pebble -h`, `strings /usr/bin/pebble`, its README):
//! - Flags are only `-config`, `-dnsserver`, `-strict`; `-strict=false` must be written with `=`.
//! - Debian strips pebble's test certificates: we make our own CA + `localhost`/`127.0.0.1` leaf
//!   with rcgen for pebble's HTTPS listeners (ACME API and management); trust [`Pebble::ca_file`].
//! - The config keys are matched case-insensitively (Go struct without JSON tags). Validity of
//!   issued certificates is the config key `certificateValidityPeriod` (seconds, pebble's default is
//!   about 5 years); there is no environment variable for it. See `PebbleOptions::cert_validity_secs`.
//! - Issuing root and intermediate: management `GET /roots/0`, `/intermediates/0` (PEM); both are
//!   regenerated at every pebble start. `PEBBLE_CHAIN_LENGTH` adds intermediates, `PEBBLE_ALTERNATE_ROOTS`
//!   adds alternate chains (`/roots/1`...).
//! - Environment set here: `PEBBLE_VA_NOSLEEP=1` (no 0-15 s sleeps between validation attempts)
//!   and `PEBBLE_AUTHZREUSE=0` (every order is validated afresh). Nonce rejection stays at the
//!   default 5% `badNonce`, so clients must retry; `PEBBLE_WFE_NONCEREJECT=0` turns it off and
//!   `PEBBLE_VA_ALWAYS_VALID=1` skips validation: pass them in `PebbleOptions::env` if needed.
//! - The validator checks each challenge several times, possibly concurrently, from 127.0.0.1,
//!   dialing `httpPort` (HTTP-01) / `tlsPort` (TLS-ALPN-01): every name resolves to 127.0.0.1
//!   through challtestsrv (`-defaultIPv4 127.0.0.1 -defaultIPv6 ""`, so no AAAA answers).
//! - challtestsrv's management API (`challtestsrv_url()`) takes JSON POSTs such as `/set-txt`
//!   `{"host":"_acme-challenge.x.test.","value":"..."}` for DNS-01, or `/add-a` to change answers.
//! - Ports come from [`free_port`] (bind 0, close): a tiny race with other processes is possible.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);
const PROXY_VARS: [&str; 6] = ["http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"];

/// A free TCP port on 127.0.0.1 (bind port 0, read it, close), for choosing ports before a server starts.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// `PebbleOptions::new(http, tls)`, or a literal with `..Default::default()` (the ports must be set).
#[derive(Debug, Clone, Default)]
pub struct PebbleOptions {
    /// Port pebble's validator dials on 127.0.0.1 for HTTP-01.
    pub http_port: u16,
    /// Port pebble's validator dials on 127.0.0.1 for TLS-ALPN-01.
    pub tls_port: u16,
    /// `certificateValidityPeriod` of issued certificates in seconds; `None`: pebble's default.
    pub cert_validity_secs: Option<u64>,
    /// Extra environment for pebble (applied after the defaults, so it can override them).
    pub env: Vec<(String, String)>,
    /// Require External Account Binding with this (key id, base64url HMAC key).
    pub eab: Option<(String, String)>,
}

impl PebbleOptions {
    pub fn new(http_port: u16, tls_port: u16) -> PebbleOptions {
        PebbleOptions { http_port, tls_port, cert_validity_secs: None, env: Vec::new(), eab: None }
    }
}

pub struct Pebble {
    dir: tempfile::TempDir,
    config: PathBuf,
    ca_file: PathBuf,
    log_path: PathBuf,
    acme_port: u16,
    mgmt_port: u16,
    dns_port: u16,
    challtest_port: u16,
    env: Vec<(String, String)>,
    pebble: Option<Child>,
    challtestsrv: Option<Child>,
}

fn on_path(name: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|d| d.join(name).is_file())
}

/// GET `url` over HTTPS trusting only `ca`, with curl (no new crates needed); body or error text.
fn https_get(url: &str, ca: &Path) -> Result<String, String> {
    let out = Command::new("curl")
        .args(["-sS", "-f", "--noproxy", "*", "--max-time", "5", "--cacert"])
        .arg(ca)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running curl: {e}"))?;
    if out.status.success() {
        String::from_utf8(out.stdout).map_err(|e| format!("{url}: body not UTF-8: {e}"))
    } else {
        Err(format!("{url}: curl {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Writes a fresh CA and a `localhost` + `127.0.0.1` server certificate signed by it.
fn write_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.distinguished_name.push(DnType::CommonName, "Postern test Pebble HTTPS CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key).expect("self-sign CA");

    let leaf_key = KeyPair::generate().expect("leaf key");
    let mut leaf_params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("leaf params");
    leaf_params.distinguished_name.push(DnType::CommonName, "localhost");
    leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).expect("sign leaf");

    let (ca_file, cert, key) = (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(&cert, leaf.pem()).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    (ca_file, cert, key)
}

fn json_str(p: &Path) -> String {
    let s = p.to_str().expect("UTF-8 temp path");
    assert!(!s.contains(['"', '\\']), "unexpected character in {s}");
    format!("\"{s}\"")
}

impl Pebble {
    /// Installs nothing: assumes `pebble` and `pebble-challtestsrv` are on PATH (the test command
    /// installs Debian's `pebble` package); panics with a clear message otherwise.
    pub fn start(opts: PebbleOptions) -> Pebble {
        for bin in ["pebble", "pebble-challtestsrv"] {
            assert!(on_path(bin), "`{bin}` is not on PATH: install Debian's package with `apt-get install -y pebble`");
        }
        assert!(on_path("curl"), "`curl` is not on PATH (the Pebble harness uses it for HTTPS GETs)");
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca_file, cert, key) = write_certs(dir.path());
        let (acme_port, mgmt_port, dns_port, challtest_port) = (free_port(), free_port(), free_port(), free_port());
        let validity = match opts.cert_validity_secs {
            Some(s) => format!(",\n    \"certificateValidityPeriod\": {s}"),
            None => String::new(),
        };
        let eab = match &opts.eab {
            Some((kid, key)) => format!("true,\n    \"externalAccountMACKeys\": {{ \"{kid}\": \"{key}\" }}"),
            None => "false".to_string(),
        };
        let text = format!(
            "{{\n  \"pebble\": {{\n    \"listenAddress\": \"127.0.0.1:{acme_port}\",\n    \
             \"managementListenAddress\": \"127.0.0.1:{mgmt_port}\",\n    \"certificate\": {},\n    \
             \"privateKey\": {},\n    \"httpPort\": {},\n    \"tlsPort\": {},\n    \"ocspResponderURL\": \"\",\n    \
             \"externalAccountBindingRequired\": {eab}{validity}\n  }}\n}}\n",
            json_str(&cert),
            json_str(&key),
            opts.http_port,
            opts.tls_port
        );
        let config = dir.path().join("pebble-config.json");
        std::fs::write(&config, text).unwrap();
        let log_path = dir.path().join("pebble.log");
        let mut pebble = Pebble {
            config,
            ca_file,
            log_path,
            acme_port,
            mgmt_port,
            dns_port,
            challtest_port,
            env: opts.env,
            pebble: None,
            challtestsrv: None,
            dir,
        };
        pebble.start_challtestsrv();
        pebble.launch();
        pebble
    }

    pub fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.acme_port)
    }

    /// PEM of the CA that signed pebble's own HTTPS certificate (for the ACME client's trust).
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// Base URL of pebble-challtestsrv's management API (plain HTTP), e.g. for `/set-txt`.
    pub fn challtestsrv_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.challtest_port)
    }

    /// The fake DNS server pebble uses (challtestsrv's `-dns01` listener, UDP and TCP).
    pub fn dns_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.dns_port))
    }

    /// The root that issued certificates chain to (management `/roots/0`); new at every pebble start.
    pub fn root_pem(&self) -> String {
        self.management_pem("roots/0")
    }

    /// The intermediate that signs issued certificates (management `/intermediates/0`).
    pub fn intermediate_pem(&self) -> String {
        self.management_pem("intermediates/0")
    }

    fn management_pem(&self, path: &str) -> String {
        let url = format!("https://127.0.0.1:{}/{path}", self.mgmt_port);
        match https_get(&url, &self.ca_file) {
            Ok(pem) if pem.contains("-----BEGIN CERTIFICATE-----") => pem,
            Ok(other) => panic!("{url}: not a PEM certificate: {other:?}\npebble log:\n{}", self.log()),
            Err(e) => panic!("{e}\npebble log:\n{}", self.log()),
        }
    }

    /// Pebble's stdout+stderr so far (all runs, separated by `=== starting pebble ===` lines).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    fn challtestsrv_log(&self) -> String {
        let bytes = std::fs::read(self.dir.path().join("challtestsrv.log")).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Kills pebble (challtestsrv keeps running); a no-op if it is not running.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.pebble.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops pebble if it runs, then starts it again with the same ports and config (new root).
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    fn start_challtestsrv(&mut self) {
        let log = File::create(self.dir.path().join("challtestsrv.log")).unwrap();
        let child = Command::new("pebble-challtestsrv")
            .arg("-management")
            .arg(format!("127.0.0.1:{}", self.challtest_port))
            .arg("-dns01")
            .arg(format!("127.0.0.1:{}", self.dns_port))
            .args(["-http01", "", "-https01", "", "-tlsalpn01", "", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn pebble-challtestsrv");
        self.challtestsrv = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.challtest_port));
        self.wait_for("pebble-challtestsrv", true, || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
        });
    }

    fn launch(&mut self) {
        let mut log = OpenOptions::new().create(true).append(true).open(&self.log_path).unwrap();
        writeln!(log, "=== starting pebble ===").unwrap();
        let mut cmd = Command::new("pebble");
        cmd.arg("-config")
            .arg(&self.config)
            .arg("-strict=false")
            .arg("-dnsserver")
            .arg(format!("127.0.0.1:{}", self.dns_port))
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for var in PROXY_VARS {
            cmd.env_remove(var);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        self.pebble = Some(cmd.spawn().expect("spawn pebble"));
        let (dir_url, ca) = (self.directory_url(), self.ca_file.clone());
        self.wait_for("pebble directory", false, || https_get(&dir_url, &ca).is_ok_and(|b| b.contains("newOrder")));
        let roots = format!("https://127.0.0.1:{}/roots/0", self.mgmt_port);
        self.wait_for("pebble management /roots/0", false, || https_get(&roots, &ca).is_ok());
    }

    /// Polls `ready` for up to `WAIT`; panics with the logs if it never holds or the child exits.
    fn wait_for(&mut self, what: &str, challtestsrv: bool, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            if ready() {
                return;
            }
            let child = if challtestsrv { self.challtestsrv.as_mut() } else { self.pebble.as_mut() };
            let exited = child.and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() >= deadline {
                let why = exited.map_or(format!("not ready after {WAIT:?}"), |s| format!("exited: {s}"));
                panic!(
                    "{what} {why}\n--- pebble log:\n{}\n--- pebble-challtestsrv log:\n{}",
                    self.log(),
                    self.challtestsrv_log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
        if let Some(mut child) = self.challtestsrv.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
