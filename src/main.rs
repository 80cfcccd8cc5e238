//! The `postern` command line.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use postern::config::{self, Config};

#[derive(Parser)]
#[command(name = "postern", version, about = "An all-in-one mail server for self-hosters")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Target {
    /// The cluster config file [default: $POSTERN_CONFIG, else /etc/postern/postern.toml]
    #[arg(long, short = 'c', env = "POSTERN_CONFIG")]
    config: Option<PathBuf>,
    /// This node's name in the config [default: the node whose hostname is this machine's FQDN, else the only node]
    #[arg(long, short = 'n')]
    node: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run one node of the cluster (with no config file: a development node on 127.0.0.1)
    Serve(Target),
    /// Validate the config file and print this node's effective settings
    CheckConfig(Target),
    /// Read a password (prompt, or stdin when piped) and print its argon2id hash
    HashPassword,
    /// TLS certificates
    #[command(subcommand)]
    Cert(CertCommand),
    /// The outbound queue of a running node (through its control socket)
    #[command(subcommand)]
    Queue(QueueCommand),
    /// A line per second of a running node's counters, like `smtpctl monitor`
    Monitor {
        #[command(flatten)]
        target: Target,
        /// Stop after this many lines [default: run until interrupted]
        #[arg(long)]
        count: Option<u64>,
        /// Seconds between lines
        #[arg(long, default_value_t = 1)]
        interval: u64,
    },
    /// Stop accepting new SMTP sessions (they get 421) without stopping the node
    #[command(subcommand)]
    Pause(ServiceCommand),
    /// Accept SMTP sessions again after `pause smtp`
    #[command(subcommand)]
    Resume(ServiceCommand),
    /// DKIM signing keys
    #[command(subcommand)]
    Dkim(DkimCommand),
    /// Replication between the primaries
    #[command(subcommand)]
    Sync(SyncCommand),
    /// Print every DNS record the cluster needs (MX, SPF, DMARC, DKIM) in zone-file syntax
    DnsRecords(Target),
    /// Set up a node: write a commented config with keys and secrets, check the machine, print the DNS records
    Quickstart(postern::quickstart::QuickstartArgs),
    /// Compare the published DNS records (MX, A/AAAA, PTR, SPF, DKIM, DMARC) with the config
    DnsCheck(postern::quickstart::DnsCheckArgs),
}

#[derive(Subcommand)]
enum DkimCommand {
    /// Write a new private key (PKCS#8 PEM, mode 0600) and print its DNS record and `[[dkim]]` entry
    Keygen {
        /// The signing domain (`d=`), e.g. example.org
        domain: String,
        /// The selector [default: year and month, then `e` for ed25519 or `r` for rsa, e.g. 202607e]
        #[arg(long, short = 's')]
        selector: Option<String>,
        #[arg(long, short = 'a', value_enum, default_value = "ed25519")]
        algorithm: KeyAlgorithm,
        /// RSA key size
        #[arg(long, default_value_t = 2048)]
        bits: usize,
        /// Where to write the key (never overwritten) [default: ./DOMAIN-SELECTOR.key]
        #[arg(long, short = 'o')]
        out: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum KeyAlgorithm {
    Ed25519,
    Rsa,
}

#[derive(Subcommand)]
enum SyncCommand {
    /// Per peer: link state, since when, config fingerprint match; exit 0 only when every peer is connected
    Status(Target),
}

#[derive(Subcommand)]
enum CertCommand {
    /// Names, issuer, expiry and next renewal of this node's certificate
    Status(Target),
}

#[derive(Subcommand)]
enum QueueCommand {
    /// One line per queued message: id, sender, recipients, size, age, attempts, next try, last error
    List(Target),
    /// Every field of one queued message
    Show(QueueId),
    /// Try one message (or, with `all`, every message not held) now
    Retry(QueueId),
    /// Delete a message from the queue
    Remove {
        #[command(flatten)]
        id: QueueId,
        /// Send the sender a bounce saying the message was deleted
        #[arg(long)]
        bounce: bool,
    },
    /// Stop delivery attempts for a message until it is released
    Hold(QueueId),
    /// Release a held message: it is tried now
    Release(QueueId),
    /// Try every message that is not held now (the same as `retry all`)
    Flush(Target),
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// Every SMTP listener (ports 25, 587 and 465)
    Smtp(Target),
}

#[derive(clap::Args)]
struct QueueId {
    /// The queue id as `queue list` prints it (16 hex digits; leading zeros may be left out)
    id: String,
    #[command(flatten)]
    target: Target,
}

const DEFAULT_CONFIG: &str = "/etc/postern/postern.toml";

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(t) => serve(t),
        Command::CheckConfig(t) => check_config(t),
        Command::HashPassword => hash_password(),
        Command::Cert(CertCommand::Status(t)) => cert_status(t),
        Command::Queue(q) => queue_command(q),
        Command::Monitor { target, count, interval } => monitor(target, count, interval),
        Command::Pause(ServiceCommand::Smtp(t)) => pause_smtp(t, true),
        Command::Resume(ServiceCommand::Smtp(t)) => pause_smtp(t, false),
        Command::Dkim(DkimCommand::Keygen { domain, selector, algorithm, bits, out }) => {
            dkim_keygen(&domain, selector, algorithm, bits, out)
        }
        Command::Sync(SyncCommand::Status(t)) => sync_status(t),
        Command::DnsRecords(t) => dns_records(t),
        Command::Quickstart(a) => postern::quickstart::command(a, &fqdn()),
        Command::DnsCheck(a) => postern::quickstart::dnscheck::command(a, DEFAULT_CONFIG),
    }
}

fn dkim_keygen(
    domain: &str,
    selector: Option<String>,
    algorithm: KeyAlgorithm,
    bits: usize,
    out: Option<PathBuf>,
) -> ExitCode {
    use postern::config::DkimAlgorithm;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let label_ok =
        |l: &str| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !domain.contains('.') || !domain.split('.').all(label_ok) {
        eprintln!("`{domain}` is not a domain name");
        return ExitCode::FAILURE;
    }
    let (alg, letter, name) = match algorithm {
        KeyAlgorithm::Ed25519 => (DkimAlgorithm::Ed25519, 'e', "ed25519"),
        KeyAlgorithm::Rsa => (DkimAlgorithm::RsaSha256, 'r', "rsa-sha256"),
    };
    let selector = selector.unwrap_or_else(|| format!("{}{letter}", chrono::Utc::now().format("%Y%m")));
    if !selector.split('.').all(label_ok) {
        eprintln!("`{selector}` is not a valid selector (DNS labels: letters, digits, `-`)");
        return ExitCode::FAILURE;
    }
    if matches!(algorithm, KeyAlgorithm::Rsa) && !(2048..=8192).contains(&bits) {
        eprintln!("--bits must be from 2048 to 8192");
        return ExitCode::FAILURE;
    }
    let path = out.unwrap_or_else(|| PathBuf::from(format!("{domain}-{selector}.key")));
    let path = std::path::absolute(&path).unwrap_or(path);
    if path.exists() {
        eprintln!("{} exists: refusing to overwrite a key (choose another --out or --selector)", path.display());
        return ExitCode::FAILURE;
    }
    let (pem, key) = match postern::dkim::generate(alg, bits) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("cannot generate the key: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(pem.as_bytes()).and_then(|()| f.sync_all()));
    if let Err(e) = written {
        eprintln!("cannot write {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    let record = postern::dkim::txt_record(&format!("{selector}._domainkey.{domain}"), &key.txt_value());
    println!("; wrote the private key {} ({name}, mode 0600)", path.display());
    println!("; publish this record in the DNS zone of {domain}:");
    println!("{record}");
    println!();
    println!("# then add this to the config and restart the nodes:");
    println!(
        "[[dkim]]\ndomain = \"{domain}\"\nselector = \"{selector}\"\nalgorithm = \"{name}\"\nkey = {:?}",
        path.display().to_string()
    );
    ExitCode::SUCCESS
}

fn dns_records(t: Target) -> ExitCode {
    let path = t.config.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let cfg = match config::load_file(&path) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{}: {} error(s)", path.display(), errors.0.len());
            return ExitCode::FAILURE;
        }
    };
    match postern::dkim::dns_records(&cfg) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("postern dns-records: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("POSTERN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sled=warn,rustls=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// This machine's fully qualified name, as `hostname -f` finds it: the canonical name of the
/// host name from the resolver (/etc/hosts or DNS), else the plain host name.
fn fqdn() -> String {
    let short = gethostname::gethostname().to_string_lossy().into_owned();
    let Ok(c_name) = std::ffi::CString::new(short.clone()) else { return short };
    // SAFETY: getaddrinfo with a valid C string and zeroed hints; the result list is freed below
    // and ai_canonname is read only while the list is alive.
    unsafe {
        let mut hints: libc::addrinfo = std::mem::zeroed();
        hints.ai_flags = libc::AI_CANONNAME;
        let mut res: *mut libc::addrinfo = std::ptr::null_mut();
        if libc::getaddrinfo(c_name.as_ptr(), std::ptr::null(), &hints, &mut res) != 0 || res.is_null() {
            return short;
        }
        let canon = (*res).ai_canonname;
        let name = if canon.is_null() {
            short.clone()
        } else {
            std::ffi::CStr::from_ptr(canon).to_string_lossy().into_owned()
        };
        libc::freeaddrinfo(res);
        if name.contains('.') {
            name
        } else {
            short
        }
    }
}

/// Loads the config and picks the node, printing every problem found.
fn load(t: &Target, path: &std::path::Path) -> Result<(Config, postern::config::Node), ExitCode> {
    let cfg = match config::load_file(path) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{}: {} error(s)", path.display(), errors.0.len());
            return Err(ExitCode::FAILURE);
        }
    };
    match cfg.select_node(t.node.as_deref(), &fqdn()) {
        Ok(node) => {
            let node = node.clone();
            Ok((cfg, node))
        }
        Err(e) => {
            eprintln!("{e}");
            Err(ExitCode::FAILURE)
        }
    }
}

fn serve(t: Target) -> ExitCode {
    init_logging();
    let path = match &t.config {
        Some(p) => p.clone(),
        None if std::path::Path::new(DEFAULT_CONFIG).exists() => PathBuf::from(DEFAULT_CONFIG),
        None => {
            let dir = PathBuf::from("postern-data");
            match config::dev_config(&dir) {
                Ok(setup) => {
                    println!(
                        "no config file at {DEFAULT_CONFIG}: running a development node from {}",
                        setup.config_path.display()
                    );
                    match setup.new_password {
                        Some(pw) => {
                            println!("user {} password {pw}  (shown once; it is not stored in clear)", setup.user)
                        }
                        None => println!(
                            "user {} (its password was printed at first start; delete {} to start over)",
                            setup.user,
                            dir.display()
                        ),
                    }
                    setup.config_path
                }
                Err(e) => {
                    eprintln!("cannot create the development node: {e:#}");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    if !path.exists() {
        eprintln!("{}: no such config file", path.display());
        return ExitCode::FAILURE;
    }
    let (cfg, node) = match load(&t, &path) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(postern::server::run(cfg, node)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("postern: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a report over the configured node: config from `--config` or the default path.
fn report(t: Target, render: impl FnOnce(&std::path::Path, &Config, &postern::config::Node) -> String) -> ExitCode {
    let path = t.config.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    match load(&t, &path) {
        Ok((cfg, node)) => {
            print!("{}", render(&path, &cfg, &node));
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn check_config(t: Target) -> ExitCode {
    report(t, |path, cfg, node| format!("{}{}: OK\n", postern::config::describe(cfg, node), path.display()))
}

fn cert_status(t: Target) -> ExitCode {
    report(t, |_, cfg, node| postern::acme::describe_status(cfg, node))
}

fn hash_password() -> ExitCode {
    let password = if std::io::stdin().is_terminal() {
        let first = match rpassword::prompt_password("Password: ") {
            Ok(p) => p,
            Err(e) => {
                eprintln!("cannot read the password: {e}");
                return ExitCode::FAILURE;
            }
        };
        match rpassword::prompt_password("Again: ") {
            Ok(again) if again == first => first,
            Ok(_) => {
                eprintln!("the passwords differ");
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("cannot read the password: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        let mut s = String::new();
        if let Err(e) = std::io::stdin().read_to_string(&mut s) {
            eprintln!("cannot read the password: {e}");
            return ExitCode::FAILURE;
        }
        // Only the line ending a pipe adds is dropped; other whitespace is part of the password.
        s.strip_suffix("\r\n").or_else(|| s.strip_suffix('\n')).unwrap_or(&s).to_string()
    };
    if password.is_empty() {
        eprintln!("refusing an empty password");
        return ExitCode::FAILURE;
    }
    println!("{}", postern::auth::hash_password(&password));
    ExitCode::SUCCESS
}

/// The control socket of the node `target` names, or the exit code after saying why not.
fn control_socket(target: &Target) -> Result<(PathBuf, String), ExitCode> {
    let path = target.config.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let (_, node) = load(target, &path)?;
    Ok((postern::control::socket_path(&node), node.name))
}

fn monitor(target: Target, count: Option<u64>, interval: u64) -> ExitCode {
    let (socket, node) = match control_socket(&target) {
        Ok(x) => x,
        Err(code) => return code,
    };
    match postern::control::client::monitor(&socket, &node, count, std::time::Duration::from_secs(interval.max(1))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("postern monitor: {message}");
            ExitCode::FAILURE
        }
    }
}

fn pause_smtp(target: Target, pause: bool) -> ExitCode {
    use postern::control::protocol::Request;
    let (socket, node) = match control_socket(&target) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let service = "smtp".to_string();
    let request = if pause { Request::Pause { service } } else { Request::Resume { service } };
    let verb = if pause { "pause" } else { "resume" };
    match postern::control::client::call(&socket, &node, &request, |_| {}) {
        Ok(answer) if answer.ok => {
            let was = answer.was_paused.unwrap_or(false);
            match (pause, was) {
                (true, false) => println!("smtp paused on node {node}: new sessions get 421"),
                (true, true) => println!("smtp was already paused on node {node}"),
                (false, true) => println!("smtp resumed on node {node}"),
                (false, false) => println!("smtp was not paused on node {node}"),
            }
            ExitCode::SUCCESS
        }
        Ok(answer) => {
            eprintln!("postern {verb} smtp: {}", answer.error.as_deref().unwrap_or("the node refused the request"));
            ExitCode::FAILURE
        }
        Err(message) => {
            eprintln!("postern {verb} smtp: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `postern sync status`: the node's peer table; exit 1 unless every peer is connected (and
/// when replication is off), so scripts and monitoring can use the exit status alone.
fn sync_status(target: Target) -> ExitCode {
    use postern::control::protocol::Request;
    let path = target.config.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let (cfg, node) = match load(&target, &path) {
        Ok(x) => x,
        Err(code) => return code,
    };
    if cfg.sync.is_none() {
        println!("replication is off: {} has no [sync] table", path.display());
        return ExitCode::FAILURE;
    }
    if node.role != postern::config::Role::Primary {
        println!("replication is off on node {}: it is a backup (only primaries replicate)", node.name);
        return ExitCode::FAILURE;
    }
    let socket = postern::control::socket_path(&node);
    let answer = match postern::control::client::call(&socket, &node.name, &Request::SyncStatus, |_| {}) {
        Ok(a) if a.ok => a,
        Ok(a) => {
            eprintln!("postern sync status: {}", a.error.as_deref().unwrap_or("the node refused the request"));
            return ExitCode::FAILURE;
        }
        Err(message) => {
            eprintln!("postern sync status: {message}");
            return ExitCode::FAILURE;
        }
    };
    let Some(view) = answer.sync else {
        println!("replication is off on node {} (the running node has no [sync] table: restart it?)", node.name);
        return ExitCode::FAILURE;
    };
    print!("{}", postern::control::client::sync_status(&view, chrono::Utc::now().timestamp()));
    if postern::control::client::sync_healthy(&view) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `postern queue ...`: one request to the node's control socket, printed.
fn queue_command(cmd: QueueCommand) -> ExitCode {
    use postern::control::client;
    use postern::control::protocol::Request;
    let (target, request) = match cmd {
        QueueCommand::List(t) => (t, Request::QueueList),
        QueueCommand::Show(q) => (q.target, Request::QueueShow { id: q.id }),
        QueueCommand::Retry(q) if q.id.eq_ignore_ascii_case("all") => (q.target, Request::QueueRetry { id: None }),
        QueueCommand::Retry(q) => (q.target, Request::QueueRetry { id: Some(q.id) }),
        QueueCommand::Remove { id, bounce } => (id.target, Request::QueueRemove { id: id.id, bounce }),
        QueueCommand::Hold(q) => (q.target, Request::QueueHold { id: q.id }),
        QueueCommand::Release(q) => (q.target, Request::QueueRelease { id: q.id }),
        QueueCommand::Flush(t) => (t, Request::QueueRetry { id: None }),
    };
    let path = target.config.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let node = match load(&target, &path) {
        Ok((_, node)) => node,
        Err(code) => return code,
    };
    let socket = postern::control::socket_path(&node);
    let now = chrono::Utc::now().timestamp();
    let listing = request == Request::QueueList;
    let mut out = std::io::stdout().lock();
    use std::io::Write;
    if listing {
        let _ = writeln!(out, "{}", client::list_header());
    }
    let answer = client::call(&socket, &node.name, &request, |e| {
        let _ = writeln!(out, "{}", client::list_line(&e, now));
    });
    let answer = match answer {
        Ok(a) => a,
        Err(message) => {
            let _ = out.flush();
            eprintln!("postern queue: {message}");
            return ExitCode::FAILURE;
        }
    };
    if !answer.ok {
        let _ = out.flush();
        eprintln!("postern queue: {}", answer.error.as_deref().unwrap_or("the node refused the request"));
        return ExitCode::FAILURE;
    }
    let id = answer.entry.as_ref().map(|e| e.id.clone()).unwrap_or_default();
    let count = answer.count.unwrap_or(0);
    let plural = |n: u64| if n == 1 { "" } else { "s" };
    let text = match &request {
        Request::QueueList => String::new(),
        Request::QueueShow { .. } => answer.entry.as_ref().map(|e| client::show(e, now)).unwrap_or_default(),
        Request::QueueRetry { id: None } => format!("{count} message{} scheduled for delivery now\n", plural(count)),
        Request::QueueRetry { id: Some(_) } => match &answer.entry {
            Some(e) if e.held => format!("{id} is held: `postern queue release {id}` delivers it\n"),
            _ => format!("{id} scheduled for delivery now\n"),
        },
        Request::QueueRemove { bounce, .. } => match (bounce, answer.bounced) {
            (true, Some(true)) => format!("{id} removed; a bounce is queued for the sender\n"),
            (true, _) => format!("{id} removed; no bounce (the sender is the null sender)\n"),
            (false, _) => format!("{id} removed\n"),
        },
        Request::QueueHold { .. } => format!("{id} held\n"),
        Request::QueueRelease { .. } => format!("{id} released\n"),
        _ => String::new(),
    };
    let _ = out.write_all(text.as_bytes());
    if out.flush().is_err() {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
