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
}

#[derive(Subcommand)]
enum CertCommand {
    /// Names, issuer, expiry and next renewal of this node's certificate
    Status(Target),
}

const DEFAULT_CONFIG: &str = "/etc/postern/postern.toml";

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(t) => serve(t),
        Command::CheckConfig(t) => check_config(t),
        Command::HashPassword => hash_password(),
        Command::Cert(CertCommand::Status(t)) => cert_status(t),
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
