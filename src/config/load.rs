//! Turns the TOML text into a [`Config`], or into every problem the file has.
//!
//! The document is walked by hand rather than through serde: serde stops at the first error and
//! loses positions, while an operator editing a cluster file wants the whole list at once, each
//! with the line to fix. Values that fail are left out and the walk goes on; a `Config` is only
//! built when nothing was reported.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml_edit::{ImDocument, Item, Key, TableLike, Value};

use super::aliases::read_aliases;
use super::cluster::read_cluster;
use super::model::*;
use super::nodes::read_nodes;
use super::values::{check_password_hash, normalize_domain, parse_duration, parse_size, valid_labels, Scope};

/// One problem in the config file, positioned so an editor can jump to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    /// Dotted TOML path of the offending key (`nodes.mail.listen.smtp[1]`); empty when the problem
    /// is not about one key (a syntax error, an unreadable file).
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in one pass, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    match std::fs::read_to_string(path) {
        Ok(text) => load_str(&text, path),
        Err(e) => Err(ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            line: None,
            key: String::new(),
            message: format!("cannot read the config file: {e}"),
        }])),
    }
}

/// `path` names the file in messages and anchors relative paths; it is not read.
pub fn load_str(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
    let mut cx = Ctx::new(text, path);
    let config = match ImDocument::parse(text) {
        Ok(doc) => read_config(&mut cx, doc.as_table(), path),
        Err(e) => {
            // toml_edit's message is several lines ("invalid string\nexpected `"`"); one line per
            // error keeps `ConfigErrors` one error per line.
            let message = e.message().trim().lines().map(str::trim).collect::<Vec<_>>().join(": ");
            cx.error("", e.span().as_ref(), format!("TOML syntax error: {message}"));
            None
        }
    };
    match config {
        Some(config) if cx.errors.is_empty() => Ok(config),
        _ => {
            debug_assert!(!cx.errors.is_empty(), "a config part was refused without an error");
            let mut errors = cx.errors;
            // Cross-checks run after the walk; sorting puts their errors back in file order.
            errors.sort_by_key(|e| e.line);
            Err(ConfigErrors(errors))
        }
    }
}

/// Error collection and position bookkeeping for one load.
pub(super) struct Ctx<'a> {
    file: &'a Path,
    base_dir: PathBuf,
    line_starts: Vec<usize>,
    errors: Vec<ConfigError>,
}

impl<'a> Ctx<'a> {
    fn new(text: &str, file: &'a Path) -> Self {
        let dir = file.parent().unwrap_or(Path::new(""));
        let base_dir = if dir.as_os_str().is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf())
        };
        let line_starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        Ctx { file, base_dir, line_starts, errors: Vec::new() }
    }

    pub(super) fn error(&mut self, key: &str, span: Option<&Range<usize>>, message: impl Into<String>) {
        let line = span.map(|s| self.line_starts.partition_point(|&start| start <= s.start));
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line,
            key: key.to_string(),
            message: message.into(),
        });
    }

    /// A problem with the value (points at the value's line).
    pub(super) fn at(&mut self, e: &Entry<'_>, message: impl Into<String>) {
        self.error(&e.path, e.span.as_ref(), message);
    }

    /// A problem with the key itself (points at the key's line).
    pub(super) fn at_key(&mut self, e: &Entry<'_>, message: impl Into<String>) {
        self.error(&e.path, e.key_span.as_ref(), message);
    }

    pub(super) fn wrong_type(&mut self, e: &Entry<'_>, expected: &str) {
        let message = format!("expected {expected}, found {}", e.raw.describe());
        self.at(e, message);
    }

    pub(super) fn table<'d>(&mut self, e: &Entry<'d>) -> Option<Fields<'d>> {
        match e.raw.table_like() {
            Some(table) => Some(Fields { path: e.path.clone(), span: e.span.clone(), table, allowed: &[] }),
            None => {
                self.wrong_type(e, "a table");
                None
            }
        }
    }

    /// Also remembers `allowed` in `f`, for `require`.
    pub(super) fn check_keys(&mut self, f: &mut Fields<'_>, allowed: &'static [&'static str]) {
        f.allowed = allowed;
        for e in f.entries() {
            if !allowed.contains(&e.name) {
                let message = match closest(e.name, allowed) {
                    Some(near) => format!("unknown key; did you mean `{near}`?"),
                    None => format!("unknown key; expected one of: {}", allowed.join(", ")),
                };
                self.at_key(&e, message);
            }
        }
    }

    /// A missing key is not reported when an unknown key in the same table is a near miss of it:
    /// "did you mean" on the typo already says everything.
    pub(super) fn require<'d>(&mut self, f: &Fields<'d>, key: &str) -> Option<Entry<'d>> {
        let found = f.get(key);
        let typo = || f.entries().iter().any(|e| !f.allowed.contains(&e.name) && edit_distance(e.name, key) <= 2);
        if found.is_none() && !typo() {
            self.error(&join_key(&f.path, key), f.span.as_ref(), "required key is missing");
        }
        found
    }

    pub(super) fn string<'d>(&mut self, e: &Entry<'d>) -> Option<&'d str> {
        let found = e.raw.value().and_then(Value::as_str);
        if found.is_none() {
            self.wrong_type(e, "a string");
        }
        found
    }

    /// A single string is taken as a one-element list, since that is what people write for one
    /// listener or one alias target.
    pub(super) fn one_or_many<'d>(&mut self, e: &Entry<'d>) -> Vec<Entry<'d>> {
        match e.raw.value() {
            Some(Value::Array(array)) => array
                .iter()
                .enumerate()
                .map(|(i, v)| Entry {
                    name: "",
                    path: format!("{}[{i}]", e.path),
                    key_span: v.span().or_else(|| e.span.clone()),
                    span: v.span().or_else(|| e.span.clone()),
                    raw: Raw::Value(v),
                })
                .collect(),
            _ => vec![e.clone()],
        }
    }

    /// The entry's table without reporting anything when it is not one (it was reported already).
    pub(super) fn fields_of<'d>(&self, e: &Entry<'d>) -> Option<Fields<'d>> {
        let table = e.raw.table_like()?;
        Some(Fields { path: e.path.clone(), span: e.span.clone(), table, allowed: &[] })
    }

    pub(super) fn path(&mut self, e: &Entry<'_>) -> Option<PathBuf> {
        let text = self.string(e)?;
        if text.is_empty() {
            self.at(e, "expected a path, found an empty string");
            return None;
        }
        // `absolute` also drops `.` components, so `data_dir = "."` is stored as the directory.
        let joined = self.base_dir.join(text);
        Some(std::path::absolute(&joined).unwrap_or(joined))
    }

    pub(super) fn count(&mut self, e: &Entry<'_>, min: usize) -> Option<usize> {
        let Some(n) = e.raw.value().and_then(Value::as_integer) else {
            self.wrong_type(e, "an integer");
            return None;
        };
        match usize::try_from(n) {
            Ok(n) if n >= min => Some(n),
            _ => {
                self.at(e, format!("must be at least {min}, found {n}"));
                None
            }
        }
    }

    pub(super) fn size(&mut self, e: &Entry<'_>) -> Option<u64> {
        let n = match e.raw.value() {
            Some(Value::String(s)) => match parse_size(s.value()) {
                Ok(n) => n,
                Err(message) => {
                    self.at(e, message);
                    return None;
                }
            },
            Some(Value::Integer(n)) => u64::try_from(*n.value()).unwrap_or(0),
            _ => {
                self.wrong_type(e, "a size like \"50MB\" or a number of bytes");
                return None;
            }
        };
        if n == 0 {
            self.at(e, "must be more than 0 bytes");
            return None;
        }
        Some(n)
    }

    pub(super) fn duration(&mut self, e: &Entry<'_>, min: Duration, why: &str) -> Option<Duration> {
        let d = match e.raw.value() {
            Some(Value::String(s)) => parse_duration(s.value()),
            Some(Value::Integer(n)) => parse_duration(&n.value().to_string()),
            _ => {
                self.wrong_type(e, "a duration like \"5m\"");
                return None;
            }
        };
        match d {
            Ok(d) if d >= min => Some(d),
            Ok(_) => {
                self.at(e, format!("must be at least {}{why}", super::values::format_duration(min)));
                None
            }
            Err(message) => {
                self.at(e, message);
                None
            }
        }
    }
}

/// A value in the document: a table entry, or an array element (which has no `Item` of its own).
#[derive(Clone, Copy)]
pub(super) enum Raw<'d> {
    Item(&'d Item),
    Value(&'d Value),
}

impl<'d> Raw<'d> {
    pub(super) fn value(self) -> Option<&'d Value> {
        match self {
            Raw::Item(item) => item.as_value(),
            Raw::Value(value) => Some(value),
        }
    }

    fn table_like(self) -> Option<&'d dyn TableLike> {
        match self {
            Raw::Item(item) => item.as_table_like(),
            Raw::Value(value) => value.as_inline_table().map(|t| t as &dyn TableLike),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Raw::Item(Item::Table(_)) => "a table",
            Raw::Item(Item::ArrayOfTables(_)) => "an array of tables",
            Raw::Item(Item::None) => "nothing",
            Raw::Item(Item::Value(v)) | Raw::Value(v) => match v {
                Value::String(_) => "a string",
                Value::Integer(_) => "an integer",
                Value::Float(_) => "a float",
                Value::Boolean(_) => "a boolean",
                Value::Datetime(_) => "a date-time",
                Value::Array(_) => "an array",
                Value::InlineTable(_) => "a table",
            },
        }
    }
}

/// A value with its dotted path and where it is written.
#[derive(Clone)]
pub(super) struct Entry<'d> {
    /// The key as written (empty for array elements).
    pub(super) name: &'d str,
    pub(super) path: String,
    pub(super) key_span: Option<Range<usize>>,
    /// The value's span, or the key's where the value has none (implicit and dotted tables).
    pub(super) span: Option<Range<usize>>,
    pub(super) raw: Raw<'d>,
}

/// A table of any spelling (header, dotted keys, inline) with its path.
pub(super) struct Fields<'d> {
    path: String,
    span: Option<Range<usize>>,
    table: &'d dyn TableLike,
    allowed: &'static [&'static str],
}

impl<'d> Fields<'d> {
    pub(super) fn get(&self, key: &str) -> Option<Entry<'d>> {
        let table: &'d dyn TableLike = self.table;
        let (k, item) = table.get_key_value(key)?;
        (!item.is_none()).then(|| entry_of(&self.path, k, item))
    }

    /// In file order, which is also the order errors about them should come in.
    pub(super) fn entries(&self) -> Vec<Entry<'d>> {
        let table: &'d dyn TableLike = self.table;
        table
            .iter()
            .filter_map(|(name, _)| table.get_key_value(name))
            .map(|(k, item)| entry_of(&self.path, k, item))
            .collect()
    }
}

fn entry_of<'d>(parent: &str, key: &'d Key, item: &'d Item) -> Entry<'d> {
    Entry {
        name: key.get(),
        path: join_key(parent, key.get()),
        key_span: key.span(),
        span: item.span().or_else(|| key.span()),
        raw: Raw::Item(item),
    }
}

/// Quotes a segment the way TOML would need it, so the path can be searched for in the file.
pub(super) fn join_key(parent: &str, key: &str) -> String {
    let bare = !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let segment = if bare { key.to_string() } else { format!("{key:?}") };
    if parent.is_empty() {
        segment
    } else {
        format!("{parent}.{segment}")
    }
}

fn closest<'k>(word: &str, candidates: &[&'k str]) -> Option<&'k str> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut row = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != *cb);
            row.push(substitute.min(prev[j + 1] + 1).min(row[j] + 1));
        }
        prev = row;
    }
    prev[b.len()]
}

const TOP_KEYS: &[&str] = &[
    "cluster",
    "nodes",
    "tls",
    "smtp",
    "imap",
    "store",
    "users",
    "aliases",
    "acme",
    "dns",
    "outbound",
    "submission",
    "inbound",
    "srs",
    "dkim",
    "sync",
];

fn read_config(cx: &mut Ctx<'_>, root: &toml_edit::Table, path: &Path) -> Option<Config> {
    let mut root = Fields { path: String::new(), span: None, table: root, allowed: &[] };
    cx.check_keys(&mut root, TOP_KEYS);

    let (cluster, scope) = match root.get("cluster") {
        Some(e) => read_cluster(cx, &e),
        None => {
            cx.error("cluster", None, "required table `[cluster]` is missing");
            (None, Scope::unknown())
        }
    };
    let nodes = read_nodes(cx, root.get("nodes"));
    let srs_domains = cluster.as_ref().map(|c| c.domains.as_slice());
    let srs = root.get("srs").map_or(Some(None), |e| super::srs::read_srs(cx, &e, srs_domains).map(Some));
    let tls = root.get("tls").map_or(Some(None), |e| read_tls(cx, &e).map(Some));
    let smtp = root.get("smtp").map_or_else(|| Some(SmtpSettings::default()), |e| read_smtp(cx, &e));
    let imap = root.get("imap").map_or_else(|| Some(ImapSettings::default()), |e| read_imap(cx, &e));
    let store = root.get("store").map_or_else(|| Some(StoreSettings::default()), |e| read_store(cx, &e));
    let acme = root.get("acme").map_or(Some(None), |e| super::acme::read_acme(cx, &e).map(Some));
    let dns = root.get("dns").map_or_else(|| Some(Default::default()), |e| super::dns::read_dns(cx, &e));
    let outbound =
        root.get("outbound").map_or_else(|| Some(Default::default()), |e| super::outbound::read_outbound(cx, &e));
    let submission =
        root.get("submission").map_or_else(|| Some(Default::default()), |e| super::outbound::read_submission(cx, &e));
    let inbound =
        root.get("inbound").map_or_else(|| Some(Default::default()), |e| super::inbound::read_inbound(cx, &e));
    if let (Some(cluster), Some(nodes)) = (&cluster, &nodes) {
        if cluster.secret.is_none() {
            if let Some(backup) = nodes.values().find(|n| n.role == Role::Backup) {
                cx.error(
                    "cluster.secret_file",
                    root.get("cluster").and_then(|c| c.span.clone()).as_ref(),
                    format!(
                        "required when the cluster has a backup node (`{}`): it authenticates the \
                         backup's relay hop to the primaries",
                        backup.name
                    ),
                );
            }
        }
    }
    if let (Some(Some(acme)), Some(nodes)) = (&acme, &nodes) {
        super::acme::check_nodes(cx, root.get("acme").as_ref(), acme, nodes);
    }
    let sync = root.get("sync").map_or(Some(None), |e| {
        let (nodes_entry, cluster_entry) = (root.get("nodes"), root.get("cluster"));
        let nodes = nodes.as_ref();
        super::sync::read_sync(cx, &e, nodes, nodes_entry.as_ref(), cluster.as_ref(), cluster_entry.as_ref()).map(Some)
    });
    let dkim = root.get("dkim").map_or(Some(Vec::new()), |e| super::dkim::read_dkim(cx, &e));
    let (users, user_addresses) = read_users(cx, root.get("users"), &scope);
    let aliases = read_aliases(cx, root.get("aliases"), &scope, &user_addresses);

    Some(Config {
        path: path.to_path_buf(),
        cluster: cluster?,
        nodes: nodes?,
        tls: tls?,
        srs: srs?,
        smtp: smtp?,
        imap: imap?,
        store: store?,
        acme: acme?,
        dns: dns?,
        outbound: outbound?,
        submission: submission?,
        inbound: inbound?,
        users,
        aliases,
        dkim: dkim?,
        sync: sync?,
    })
}

/// The tables of `[[name]]` sections (or an array of inline tables), each with the path
/// `name[i]`; reported and `None` for anything else.
pub(super) fn array_of_tables<'d>(cx: &mut Ctx<'_>, e: &Entry<'d>) -> Option<Vec<Fields<'d>>> {
    let fields = |i: usize, span: Option<Range<usize>>, table: &'d dyn TableLike| Fields {
        path: format!("{}[{i}]", e.path),
        span: span.or_else(|| e.span.clone()),
        table,
        allowed: &[],
    };
    match e.raw {
        Raw::Item(Item::ArrayOfTables(a)) => {
            Some(a.iter().enumerate().map(|(i, t)| fields(i, t.span(), t as &dyn TableLike)).collect())
        }
        Raw::Item(Item::Value(Value::Array(a))) if a.iter().all(|v| v.is_inline_table()) => Some(
            a.iter()
                .enumerate()
                .filter_map(|(i, v)| v.as_inline_table().map(|t| fields(i, v.span(), t as &dyn TableLike)))
                .collect(),
        ),
        _ => {
            check_array_of_tables(cx, e);
            None
        }
    }
}

fn check_array_of_tables(cx: &mut Ctx<'_>, e: &Entry<'_>) {
    let ok = match e.raw {
        Raw::Item(Item::ArrayOfTables(_)) => true,
        Raw::Item(Item::Value(Value::Array(a))) => a.iter().all(|v| v.is_inline_table()),
        _ => false,
    };
    if !ok {
        let message = format!("expected an array of tables (`[[{}]]` sections), found {}", e.name, e.raw.describe());
        cx.at(e, message);
    }
}

/// `host:port` as other nodes will dial it. The host may be a name, so this is no `SocketAddr`,
/// and a short name is allowed because private networks often resolve those.
pub(super) fn read_host_port(cx: &mut Ctx<'_>, e: &Entry<'_>) -> Option<String> {
    let text = cx.string(e)?;
    let valid = text.parse::<SocketAddr>().is_ok()
        || text.rsplit_once(':').is_some_and(|(host, port)| {
            port.parse::<u16>().is_ok_and(|p| p != 0) && valid_labels(&host.to_ascii_lowercase())
        });
    if !valid {
        cx.at(e, format!("`{text}` is not a host:port address, e.g. \"10.0.0.5:7890\" or \"mail2.example.org:7890\""));
        return None;
    }
    Some(text.to_string())
}

/// Certificate files are checked now, so a typo is found by `check-config` and not by the first
/// TLS handshake after a restart.
pub(super) fn read_tls(cx: &mut Ctx<'_>, e: &Entry<'_>) -> Option<TlsFiles> {
    let mut f = cx.table(e)?;
    cx.check_keys(&mut f, &["cert", "key"]);
    let mut file = |key: &str, what: &str| {
        let entry = cx.require(&f, key)?;
        let path = cx.path(&entry)?;
        let problem = if !path.exists() {
            Some(format!("{what} file {} does not exist", path.display()))
        } else if path.is_dir() {
            Some(format!("{what} file {} is a directory", path.display()))
        } else {
            std::fs::File::open(&path).err().map(|err| format!("cannot read {what} file {}: {err}", path.display()))
        };
        match problem {
            Some(message) => {
                cx.at(&entry, message);
                None
            }
            None => Some(path),
        }
    };
    let cert = file("cert", "certificate");
    let key = file("key", "private key");
    Some(TlsFiles { cert: cert?, key: key? })
}

const SMTP_KEYS: &[&str] = &[
    "max_message_size",
    "max_recipients",
    "max_connections",
    "max_connections_per_ip",
    "command_timeout",
    "data_timeout",
    "max_errors",
];

fn read_smtp(cx: &mut Ctx<'_>, e: &Entry<'_>) -> Option<SmtpSettings> {
    let mut f = cx.table(e)?;
    cx.check_keys(&mut f, SMTP_KEYS);
    let mut smtp = SmtpSettings::default();
    let mut ok = true;
    apply(f.get("max_message_size").map(|v| cx.size(&v)), &mut smtp.max_message_size, &mut ok);
    apply(f.get("max_recipients").map(|v| cx.count(&v, 1)), &mut smtp.max_recipients, &mut ok);
    apply(f.get("max_connections").map(|v| cx.count(&v, 1)), &mut smtp.max_connections, &mut ok);
    apply(f.get("max_connections_per_ip").map(|v| cx.count(&v, 1)), &mut smtp.max_connections_per_ip, &mut ok);
    apply(f.get("max_errors").map(|v| cx.count(&v, 1)), &mut smtp.max_errors, &mut ok);
    let why = " (RFC 5321 section 4.5.3.2.7 asks for 5m)";
    let command_timeout = f.get("command_timeout").map(|v| cx.duration(&v, Duration::from_secs(1), why));
    apply(command_timeout, &mut smtp.command_timeout, &mut ok);
    let why = " (RFC 5321 section 4.5.3.2.6 asks for 3m or more)";
    let data_timeout = f.get("data_timeout").map(|v| cx.duration(&v, Duration::from_millis(1), why));
    apply(data_timeout, &mut smtp.data_timeout, &mut ok);
    ok.then_some(smtp)
}

fn read_imap(cx: &mut Ctx<'_>, e: &Entry<'_>) -> Option<ImapSettings> {
    let mut f = cx.table(e)?;
    cx.check_keys(&mut f, &["idle_timeout", "max_connections_per_ip", "plaintext_on_loopback"]);
    let mut imap = ImapSettings::default();
    let mut ok = true;
    let why = " (RFC 9051 section 5.4 asks for 30m or more)";
    let idle_timeout = f.get("idle_timeout").map(|v| cx.duration(&v, Duration::from_secs(1), why));
    apply(idle_timeout, &mut imap.idle_timeout, &mut ok);
    apply(f.get("max_connections_per_ip").map(|v| cx.count(&v, 1)), &mut imap.max_connections_per_ip, &mut ok);
    let plaintext = f.get("plaintext_on_loopback").map(|v| super::outbound::boolean(cx, &v));
    apply(plaintext, &mut imap.plaintext_on_loopback, &mut ok);
    ok.then_some(imap)
}

/// Overrides a default with a value that was present; a present but refused one clears `ok`.
pub(super) fn apply<T>(found: Option<Option<T>>, slot: &mut T, ok: &mut bool) {
    match found {
        Some(Some(value)) => *slot = value,
        Some(None) => *ok = false,
        None => {}
    }
}

fn read_store(cx: &mut Ctx<'_>, e: &Entry<'_>) -> Option<StoreSettings> {
    let mut f = cx.table(e)?;
    cx.check_keys(&mut f, &["cache_size"]);
    let mut store = StoreSettings::default();
    if let Some(v) = f.get("cache_size") {
        store.cache_size = cx.size(&v)?;
    }
    Some(store)
}

const USER_KEYS: &[&str] = &["password", "send_as", "max_messages_per_hour", "max_recipients", "save_sent", "quota"];

/// Returns the users that loaded and, separately, every well-formed user address, including those
/// whose password was refused: alias checks should not report those users as missing too.
fn read_users(cx: &mut Ctx<'_>, e: Option<Entry<'_>>, scope: &Scope) -> (BTreeMap<String, User>, BTreeSet<String>) {
    let mut users = BTreeMap::new();
    let mut addresses = BTreeSet::new();
    let Some(f) = e.and_then(|e| cx.table(&e)) else {
        return (users, addresses);
    };
    let mut first: HashMap<String, String> = HashMap::new();
    for entry in f.entries() {
        let address = match scope.address(entry.name) {
            Ok(address) => address,
            Err(message) => {
                cx.at_key(&entry, message);
                continue;
            }
        };
        if let Some(other) = first.insert(address.clone(), entry.name.to_string()) {
            cx.at_key(&entry, format!("same user as `{other}` (addresses are case-insensitive)"));
            continue;
        }
        addresses.insert(address.clone());
        let Some(mut user) = cx.table(&entry) else {
            continue;
        };
        cx.check_keys(&mut user, USER_KEYS);
        let mut ok = true;
        let mut send_as = Vec::new();
        if let Some(list) = user.get("send_as") {
            for item in cx.one_or_many(&list) {
                let Some(text) = cx.string(&item) else {
                    ok = false;
                    continue;
                };
                let parsed = match text.strip_prefix('@') {
                    Some(domain) => normalize_domain(domain).map(|d| format!("@{d}")),
                    None => scope.normalize_address(text),
                };
                match parsed {
                    Ok(a) => send_as.push(a),
                    Err(message) => {
                        cx.at(&item, message);
                        ok = false;
                    }
                }
            }
        }
        let mut limit = |key: &str| match user.get(key) {
            Some(v) => match cx.count(&v, 1) {
                Some(n) => Some(n),
                None => {
                    ok = false;
                    None
                }
            },
            None => None,
        };
        let (max_messages_per_hour, max_recipients) = (limit("max_messages_per_hour"), limit("max_recipients"));
        let save_sent = user.get("save_sent").and_then(|v| {
            let b = super::outbound::boolean(cx, &v);
            ok &= b.is_some();
            b
        });
        let quota = user.get("quota").and_then(|v| {
            let q = cx.size(&v);
            ok &= q.is_some();
            q
        });
        let Some(password) = cx.require(&user, "password") else {
            continue;
        };
        let Some(hash) = cx.string(&password) else {
            continue;
        };
        match check_password_hash(hash) {
            Ok(()) if ok => {
                let password_hash = hash.to_string();
                let user = User {
                    address: address.clone(),
                    password_hash,
                    send_as,
                    max_messages_per_hour,
                    max_recipients,
                    save_sent,
                    quota,
                };
                users.insert(address, user);
            }
            Ok(()) => {}
            Err(message) => cx.at(&password, message),
        }
    }
    (users, addresses)
}

/// Shared by the tests of `load` and `aliases`.
#[cfg(test)]
pub(super) mod testing {
    use std::path::Path;

    use super::{load_str, ConfigError, ConfigErrors};
    use crate::config::Config;

    pub(in crate::config) const HASH: &str =
        "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG";
    pub(in crate::config) const FILE: &str = "/etc/postern/postern.toml";

    /// Lines 1-6; whatever is appended starts on line 7.
    pub(in crate::config) fn base(extra: &str) -> String {
        format!(
            "[cluster]\ndomains = [\"example.org\", \"example.net\"]\n[nodes.mail]\nhostname = \"mail.example.org\"\n\
             [users.\"alice@example.org\"]\npassword = \"{HASH}\"\n{extra}"
        )
    }

    pub(in crate::config) fn load(text: &str) -> Result<Config, ConfigErrors> {
        load_str(text, Path::new(FILE))
    }

    pub(in crate::config) fn errors(text: &str) -> Vec<ConfigError> {
        match load(text) {
            Ok(_) => panic!("expected errors, the file loaded:\n{text}"),
            Err(errors) => errors.0,
        }
    }

    /// `extra` goes first, so its first line is line 1 and bare keys land in the root table.
    pub(in crate::config) fn top(extra: &str) -> String {
        format!("{extra}{}", base(""))
    }

    /// Exactly one error, at `line` (0: none), about `key` (may be empty), mentioning `needle`:
    /// cascades would show up as extra errors and fail here.
    #[track_caller]
    pub(in crate::config) fn only_error(text: &str, line: usize, key: &str, needle: &str) -> ConfigError {
        let found = errors(text);
        assert_eq!(found.len(), 1, "expected one error, got:\n{}", ConfigErrors(found.clone()));
        let error = found.into_iter().next().unwrap();
        let shown = error.to_string();
        let line = if line == 0 { String::new() } else { format!(":{line}") };
        let key = if key.is_empty() { String::new() } else { format!(" {key}:") };
        let prefix = format!("{FILE}{line}:{key} ");
        assert!(shown.starts_with(&prefix), "{shown:?} should start with {prefix:?}");
        assert!(error.message.contains(needle), "{shown:?} should mention {needle:?}");
        error
    }

    /// Aliases on top of alice (a user) and `bob@example.org` (not one).
    pub(in crate::config) fn aliases(lines: &str) -> String {
        base(&format!("[aliases]\n{lines}"))
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    const EXAMPLE: &str = r#"[cluster]
domains = ["example.org", "example.net"]
[nodes.mail]
hostname = "mail.example.org"
role = "primary"
data_dir = "/var/lib/postern"
listen.smtp = ["0.0.0.0:25", "[::]:25"]
listen.imap = ["0.0.0.0:143"]
listen.imaps = ["0.0.0.0:993"]
[users."alice@example.org"]
password = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG"
[users."bob@example.org"]
password = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG"
[aliases]
"postmaster@example.org" = "alice@example.org"
"noc@example.org" = ["alice@example.org", "bob@example.org"]
"noreply@example.org" = "/dev/null"
"@example.net" = "@example.org"
"@example.org" = "alice@example.org"
"#;

    #[test]
    fn example_loads_with_its_values() {
        let config = load(EXAMPLE).unwrap();
        assert_eq!(config.path, Path::new(FILE));
        assert_eq!(config.cluster.domains, ["example.org", "example.net"]);
        assert_eq!(config.cluster.subaddress_separator, Some('+'));
        assert_eq!(config.cluster.secret_file, None);
        let node = &config.nodes["mail"];
        assert_eq!(node.name, "mail");
        assert_eq!(node.hostname, "mail.example.org");
        assert_eq!(node.role, Role::Primary);
        assert_eq!(node.data_dir, Path::new("/var/lib/postern"));
        let addrs = |list: &[&str]| list.iter().map(|a| a.parse::<SocketAddr>().unwrap()).collect::<Vec<_>>();
        assert_eq!(node.listen.smtp, addrs(&["0.0.0.0:25", "[::]:25"]));
        assert_eq!(node.listen.imap, addrs(&["0.0.0.0:143"]));
        assert_eq!(node.listen.imaps, addrs(&["0.0.0.0:993"]));
        assert!(node.listen.submission.is_empty() && node.listen.metrics.is_empty());
        assert!(node.tls.is_none() && config.tls.is_none() && node.control_socket.is_none());
        assert_eq!(config.users.len(), 2);
        assert_eq!(config.users["bob@example.org"].address, "bob@example.org");
        assert_eq!(config.users["alice@example.org"].password_hash, HASH);
        let address = |a: &str| AliasTarget::Address(a.to_string());
        assert_eq!(config.aliases["postmaster@example.org"], [address("alice@example.org")]);
        assert_eq!(config.aliases["noc@example.org"], [address("alice@example.org"), address("bob@example.org")]);
        assert_eq!(config.aliases["noreply@example.org"], [AliasTarget::Discard]);
        assert_eq!(config.aliases["@example.net"], [AliasTarget::Domain("example.org".into())]);
        assert_eq!(config.aliases["@example.org"], [address("alice@example.org")]);
        assert_eq!(config.smtp.max_message_size, DEFAULT_MAX_MESSAGE_SIZE);
        assert_eq!(config.imap.idle_timeout, ImapSettings::default().idle_timeout);
        assert_eq!(config.store.cache_size, StoreSettings::default().cache_size);
    }

    /// The contract's keys, with later-release tables and relative paths, from a real file.
    #[test]
    fn contract_file_loads() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tls")).unwrap();
        for name in ["tls/fullchain.pem", "tls/privkey.pem", "node.crt", "node.key", "relay.pass", "srs.secret"] {
            std::fs::write(dir.path().join(name), "pem").unwrap();
        }
        std::fs::write(dir.path().join("cluster.key"), "  a cluster secret of some length  \nignored\n").unwrap();
        let text = format!(
            r#"[cluster]
domains = ["Example.ORG."]
secret_file = "cluster.key"
subaddress_separator = "-"

[dns]
nameservers = ["127.0.0.1:5353"]

[outbound]
mx_port = 25
relay = "smtps://user@relay.example:465"
relay_password_file = "relay.pass"

[nodes.mail]
hostname = "MAIL.example.org"
role = "primary"
data_dir = "data"
sync_address = "10.0.0.5:7890"
listen.smtp = ["0.0.0.0:25"]
listen.submission = ["0.0.0.0:587"]
listen.submissions = ["0.0.0.0:465"]
listen.imap = "0.0.0.0:143"
listen.imaps = ["0.0.0.0:993"]
listen.http = ["0.0.0.0:80"]
listen.https = ["0.0.0.0:443"]
listen.sync = ["0.0.0.0:7890"]
listen.metrics = ["127.0.0.1:9425"]
control_socket = "/run/postern/control.sock"
tls = {{ cert = "node.crt", key = "node.key" }}

[nodes.second]
hostname = "mx2.example.org"
role = "backup"
queue = {{ retry_initial = "2m", lifetime = "8w", delay_warning = "1d", run_interval = "30s" }}
[nodes.second.listen]
smtp = ["127.0.0.1:0", "127.0.0.2:0"]
http = ["127.0.0.1:0"]
metrics = ["127.0.0.1:0"]

[tls]
cert = "tls/fullchain.pem"
key = "tls/privkey.pem"

[acme]
directory = "https://acme-v02.api.letsencrypt.org/directory"
challenge = "http-01"
names = ["imap.example.org"]

[smtp]
max_message_size = "10MiB"
max_recipients = 5
command_timeout = "1h30m"
data_timeout = "10m"

[imap]
idle_timeout = "31m"

[store]
cache_size = 1000000

[users."Alice@Example.org"]
password = "{HASH}"

[aliases]
"postmaster@example.org" = "alice-lists@example.org"
"alice@example.org" = "alice@example.org"
"team@example.org" = ["alice-team@example.org", "postmaster@example.org"]

[[dkim]]
domain = "example.org"
selector = "2026a"
algorithm = "ed25519"
key = "dkim.key"

[[dkim]]
domain = "*.example.org"
selector = "2026b"
algorithm = "ed25519"
key = "dkim.key"

[srs]
domain = "example.org"
secret_file = "srs.secret"
"#
        );
        let path = dir.path().join("postern.toml");
        std::fs::write(&path, text).unwrap();
        let dkim_pem = crate::dkim::generate(DkimAlgorithm::Ed25519, 0).unwrap().0;
        std::fs::write(dir.path().join("dkim.key"), dkim_pem).unwrap();
        let config = load_file(&path).unwrap_or_else(|e| panic!("{e}"));
        let dir = std::path::absolute(dir.path()).unwrap();
        assert_eq!(config.dkim.len(), 2);
        assert!(!config.dkim[0].wildcard && config.dkim[1].wildcard && config.dkim[1].domain == "example.org");
        assert_eq!(config.cluster.domains, ["example.org"]);
        assert_eq!(config.cluster.secret_file, Some(dir.join("cluster.key")));
        assert_eq!(config.cluster.subaddress_separator, Some('-'));
        let node = &config.nodes["mail"];
        assert_eq!(node.hostname, "mail.example.org");
        assert_eq!(node.role, Role::Primary);
        assert_eq!(node.data_dir, dir.join("data"));
        assert_eq!(node.sync_address.as_deref(), Some("10.0.0.5:7890"));
        assert_eq!(node.listen.imap, ["0.0.0.0:143".parse::<SocketAddr>().unwrap()]);
        assert_eq!(node.listen.metrics, ["127.0.0.1:9425".parse::<SocketAddr>().unwrap()]);
        assert_eq!(node.control_socket.as_deref(), Some(Path::new("/run/postern/control.sock")));
        assert_eq!(node.tls.as_ref().unwrap().cert, dir.join("node.crt"));
        assert_eq!(config.nodes["second"].listen.smtp.len(), 2);
        assert_eq!(config.cluster.secret.as_ref().map(|s| s.0.as_str()), Some("a cluster secret of some length"));
        // The backup's schedule: its role's defaults under its own keys.
        let second = &config.nodes["second"];
        assert_eq!(second.role, Role::Backup);
        let q = config.outbound_for(second);
        assert_eq!((q.retry_initial, q.retry_max), (Duration::from_secs(120), Duration::from_secs(600)));
        assert_eq!(q.lifetime, Duration::from_secs(8 * 7 * 86400));
        assert_eq!(q.delay_warning, Some(Duration::from_secs(86400)));
        assert_eq!(q.run_interval, Some(Duration::from_secs(30)));
        let p = config.outbound_for(node);
        assert_eq!((p.lifetime, p.run_interval), (OutboundSettings::default().lifetime, None));
        assert_eq!(config.tls.as_ref().unwrap().key, dir.join("tls/privkey.pem"));
        assert_eq!(config.tls_for(&config.nodes["second"]).unwrap().cert, dir.join("tls/fullchain.pem"));
        assert_eq!(config.smtp.max_message_size, 10 << 20);
        assert_eq!(config.smtp.max_recipients, 5);
        assert_eq!(config.smtp.command_timeout, Duration::from_secs(5400));
        assert_eq!(config.smtp.max_errors, SmtpSettings::default().max_errors);
        assert_eq!(config.imap.idle_timeout, Duration::from_secs(31 * 60));
        assert_eq!(config.store.cache_size, 1_000_000);
        assert!(config.users.contains_key("alice@example.org"));
        assert_eq!(config.aliases["team@example.org"].len(), 2);
    }

    #[test]
    fn inline_tables_and_single_strings_load() {
        let text = format!(
            "cluster = {{ domains = [\"localhost\"], subaddress_separator = \"\" }}\n\
             nodes.dev = {{ hostname = \"localhost\", listen = {{ smtp = \"127.0.0.1:2525\" }} }}\n\
             users = {{ \"a@localhost\" = {{ password = \"{HASH}\" }} }}\n"
        );
        let config = load(&text).unwrap();
        assert_eq!(config.cluster.subaddress_separator, None);
        assert_eq!(config.nodes["dev"].listen.smtp.len(), 1);
        assert!(config.users.contains_key("a@localhost"));
    }

    #[test]
    fn syntax_error_has_its_line() {
        let error = only_error("[cluster]\ndomains = [\"example.org\"]\nbroken = \n", 3, "", "TOML syntax error");
        assert_eq!(error.to_string().lines().count(), 1);
        assert!(error.to_string().starts_with(&format!("{FILE}:3: TOML syntax error")));
    }

    #[test]
    fn unreadable_file_is_one_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.toml");
        let errors = load_file(&path).unwrap_err();
        assert_eq!(errors.0.len(), 1);
        assert!(errors.to_string().starts_with(&format!("{}: cannot read", path.display())));
    }

    #[test]
    fn unknown_keys_suggest_a_near_one() {
        only_error(&base("[smpt]\nmax_errors = 3\n"), 7, "smpt", "did you mean `smtp`?");
        only_error(&base("[nodes.mail.listen]\nsmpt = \"0.0.0.0:25\"\n"), 8, "nodes.mail.listen.smpt", "`smtp`");
        let text = "[cluster]\ndomains = [\"example.org\"]\n[nodes.mail]\nhostnme = \"a.example.org\"\n\
                    hostname = \"m.example.org\"\n";
        only_error(text, 4, "nodes.mail.hostnme", "did you mean `hostname`?");
        let error = only_error(&base("[store]\nwhatever = 1\n"), 8, "store.whatever", "unknown key");
        assert!(!error.message.contains("did you mean"));
        only_error(
            &base("[users.\"bob@example.org\"]\npasword = \"x\"\n"),
            8,
            "users.\"bob@example.org\".pasword",
            "`password`",
        );
    }

    #[test]
    fn wrong_types_are_reported() {
        only_error(
            &base("[smtp]\nmax_recipients = \"ten\"\n"),
            8,
            "smtp.max_recipients",
            "expected an integer, found a string",
        );
        only_error(&top("dkim = 3\n"), 1, "dkim", "expected an array of tables");
        only_error(&top("acme = \"yes\"\n"), 1, "acme", "expected a table, found a string");
        only_error(&base("[dkim]\ndomain = \"example.org\"\n"), 7, "dkim", "expected an array of tables");
        only_error(&base("[smtp]\nmax_errors = 0\n"), 8, "smtp.max_errors", "at least 1");
        let text = "[cluster]\ndomains = \"example.org\"\n[nodes.a]\nhostname = \"a.example.org\"\n";
        only_error(text, 2, "cluster.domains", "expected an array of domain names");
        only_error("nodes = 3\n[cluster]\ndomains = [\"example.org\"]\n", 1, "nodes", "expected a table");
    }

    #[test]
    fn later_feature_tables_load_unchecked() {
        let extra = "[outbound]\n";
        load(&base(extra)).unwrap();
        only_error(
            &top("dkim = [{ domain = \"example.org\", selector = \"s\", algorithm = \"ed25519\" }]\n"),
            1,
            "dkim[0].key",
            "required key is missing",
        );
    }

    #[test]
    fn cluster_problems() {
        only_error("[nodes.a]\nhostname = \"a.example.org\"\n", 0, "cluster", "`[cluster]` is missing");
        let node = "[nodes.a]\nhostname = \"a.example.org\"\n";
        only_error(
            &format!("[cluster]\nsubaddress_separator = \"+\"\n{node}"),
            1,
            "cluster.domains",
            "required key is missing",
        );
        only_error(&format!("[cluster]\ndomains = []\n{node}"), 2, "cluster.domains", "at least one domain");
        only_error(
            &format!("[cluster]\ndomains = [\"ok.org\", \"-bad.org\"]\n{node}"),
            2,
            "cluster.domains[1]",
            "not a valid host name",
        );
        only_error(&format!("[cluster]\ndomains = [\"example\"]\n{node}"), 2, "cluster.domains[0]", "fully qualified");
        only_error(
            &format!("[cluster]\ndomains = [\"a.org\", \"A.org.\"]\n{node}"),
            2,
            "cluster.domains[1]",
            "listed twice",
        );
        let text = format!("[cluster]\ndomains = [\"a.org\"]\nsubaddress_separator = \"++\"\n{node}");
        only_error(&text, 3, "cluster.subaddress_separator", "one punctuation character");
        only_error(
            &format!("[cluster]\ndomains = [\"a.org\"]\nsecret_file = \"\"\n{node}"),
            3,
            "cluster.secret_file",
            "empty",
        );
    }

    #[test]
    fn node_problems() {
        only_error("[cluster]\ndomains = [\"a.org\"]\n", 0, "nodes", "at least one `[nodes.NAME]`");
        only_error("[cluster]\ndomains = [\"a.org\"]\n[nodes]\n", 3, "nodes", "at least one `[nodes.NAME]`");
        only_error(
            "[cluster]\ndomains = [\"a.org\"]\n[nodes.a]\nrole = \"primary\"\n",
            3,
            "nodes.a.hostname",
            "required key is missing",
        );
        only_error(
            &base("[nodes.b]\nhostname = \"MAIL.example.org\"\n"),
            8,
            "nodes.b.hostname",
            "already used by node `mail`",
        );
        only_error(
            &base("[nodes.b]\nhostname = \"b.example.org\"\nrole = \"master\"\n"),
            9,
            "nodes.b.role",
            "\"primary\" or \"backup\"",
        );
        only_error(
            &base("[nodes.b]\nhostname = \"b_1.example.org\"\n"),
            8,
            "nodes.b.hostname",
            "not a valid host name",
        );
        only_error(
            &base("[nodes.b]\nhostname = \"b.example.org\"\nsync_address = \"b.example.org\"\n"),
            9,
            "nodes.b.sync_address",
            "host:port",
        );
        load(&base("[nodes.b]\nhostname = \"b.example.org\"\nsync_address = \"node-b:7890\"\n")).unwrap();
    }

    #[test]
    fn listen_problems() {
        let node = "[nodes.b]\nhostname = \"b.example.org\"\n";
        let text = base(&format!("{node}listen.smtp = [\"0.0.0.0:25\", \"mail:25\"]\n"));
        only_error(&text, 9, "nodes.b.listen.smtp[1]", "not an IP address with a port");
        let text = base(&format!("{node}listen.smtp = [\n  \"0.0.0.0:25\",\n  \"0.0.0.0\",\n]\n"));
        only_error(&text, 11, "nodes.b.listen.smtp[1]", "\"[::]:25\"");
        let text =
            base(&format!("{node}listen.smtp = \"[::]:25\"\nlisten.submission = [\"0.0.0.0:587\", \"[::]:25\"]\n"));
        only_error(&text, 10, "nodes.b.listen.submission[1]", "already used by `nodes.b.listen.smtp`");
        let text = base(&format!("{node}[nodes.b.listen]\nimap = [\"127.0.0.1:143\", \"127.0.0.1:143\"]\n"));
        only_error(&text, 10, "nodes.b.listen.imap[1]", "already used by `nodes.b.listen.imap[0]`");
        only_error(
            &base(&format!("{node}listen.smtp = [25]\n")),
            9,
            "nodes.b.listen.smtp[0]",
            "expected a string, found an integer",
        );
        only_error(&base(&format!("{node}listen = \"0.0.0.0:25\"\n")), 9, "nodes.b.listen", "expected a table");
    }

    #[test]
    fn tls_files_must_be_readable() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cert.pem"), "pem").unwrap();
        let config_path = dir.path().join("postern.toml");
        let load_here = |extra: &str| load_str(&base(extra), &config_path);

        let errors = load_here("[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n").unwrap_err().0;
        assert_eq!(errors.len(), 1, "{}", ConfigErrors(errors.clone()));
        let shown = errors[0].to_string();
        let missing = std::path::absolute(dir.path().join("key.pem")).unwrap();
        assert!(shown.starts_with(&format!("{}:9: tls.key: ", config_path.display())), "{shown}");
        assert!(shown.contains(&missing.display().to_string()) && shown.contains("does not exist"), "{shown}");

        let errors = load_here("[nodes.mail.tls]\ncert = \"cert.pem\"\n").unwrap_err().0;
        assert_eq!(errors.len(), 1);
        assert_eq!((errors[0].line, errors[0].key.as_str()), (Some(7), "nodes.mail.tls.key"));

        let errors = load_here("[tls]\ncert = \"/nonexistent/c.pem\"\nkey = \".\"\n").unwrap_err().0;
        assert_eq!(errors.len(), 2);
        assert!(errors[0].message.contains("/nonexistent/c.pem"));
        assert!(errors[1].message.contains("is a directory"));

        std::fs::write(dir.path().join("key.pem"), "pem").unwrap();
        let config = load_here("[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n").unwrap();
        assert_eq!(config.tls.unwrap().key, missing);
    }

    #[test]
    fn setting_problems() {
        only_error(&base("[smtp]\ncommand_timeout = \"500ms\"\n"), 8, "smtp.command_timeout", "at least 1s");
        only_error(&base("[smtp]\ndata_timeout = 600\n"), 8, "smtp.data_timeout", "no unit");
        only_error(&base("[smtp]\ndata_timeout = \"10 minutes\"\n"), 8, "smtp.data_timeout", "1h30m");
        only_error(&base("[smtp]\nmax_message_size = \"50 XB\"\n"), 8, "smtp.max_message_size", "unknown unit");
        only_error(&base("[smtp]\nmax_message_size = 0\n"), 8, "smtp.max_message_size", "more than 0");
        only_error(&base("[smtp]\nmax_connections = -3\n"), 8, "smtp.max_connections", "at least 1");
        only_error(&base("[imap]\nidle_timeout = \"0s\"\n"), 8, "imap.idle_timeout", "at least 1s");
        only_error(&base("[imap]\nmax_connections_per_ip = 1.5\n"), 8, "imap.max_connections_per_ip", "found a float");
        only_error(&base("[store]\ncache_size = \"lots\"\n"), 8, "store.cache_size", "invalid size");
        let config = load(&base("[smtp]\nmax_message_size = 1000\ndata_timeout = \"3m\"\n")).unwrap();
        assert_eq!((config.smtp.max_message_size, config.smtp.data_timeout), (1000, Duration::from_secs(180)));
    }

    #[test]
    fn user_problems() {
        let user = |addr: &str, password: &str| base(&format!("[users.\"{addr}\"]\npassword = \"{password}\"\n"));
        let error = only_error(
            &user("bob@example.com", HASH),
            7,
            "users.\"bob@example.com\"",
            "not one of the cluster's domains",
        );
        assert!(error.message.contains("example.org, example.net"));
        only_error(&user("bob", HASH), 7, "users.bob", "not an email address");
        only_error(
            &user("bob@example.org", "hunter2"),
            8,
            "users.\"bob@example.org\".password",
            "postern hash-password",
        );
        let pbkdf2 = "$pbkdf2-sha256$i=1000$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG";
        only_error(&user("bob@example.org", pbkdf2), 8, "users.\"bob@example.org\".password", "not supported");
        only_error(
            &user("bob@example.org", "$argon2id$garbage"),
            8,
            "users.\"bob@example.org\".password",
            "postern hash-password",
        );
        only_error(
            &user("ALICE@example.org", HASH),
            7,
            "users.\"ALICE@example.org\"",
            "same user as `alice@example.org`",
        );
        only_error(
            &base("[users.\"bob@example.org\"]\n"),
            7,
            "users.\"bob@example.org\".password",
            "required key is missing",
        );
        only_error(
            &base("[users.\"bob@example.org\"]\npassword = 5\n"),
            8,
            "users.\"bob@example.org\".password",
            "expected a string",
        );
        let config = load(&user("Bob@Example.ORG", HASH)).unwrap();
        assert_eq!(config.users["bob@example.org"].address, "bob@example.org");
    }

    #[test]
    fn every_error_is_reported_in_one_pass() {
        let text = base(concat!(
            "[smtp]\nmax_recipients = 0\n",
            "[nodes.mail.listen]\nsmtp = [\"nope\"]\n",
            "[aliases]\n\"x@example.org\" = \"y@\"\n",
        ));
        let errors = errors(&text);
        let shown = ConfigErrors(errors.clone()).to_string();
        assert_eq!(errors.len(), 3, "{shown}");
        let lines: Vec<_> = errors.iter().map(|e| (e.line.unwrap(), e.key.as_str())).collect();
        assert_eq!(
            lines,
            [(8, "smtp.max_recipients"), (10, "nodes.mail.listen.smtp[0]"), (12, "aliases.\"x@example.org\"")]
        );
        assert_eq!(shown.lines().count(), 3);
        assert!(shown.lines().all(|l| l.starts_with(FILE)));
    }

    #[test]
    fn broken_parts_do_not_cascade() {
        // No cluster: users and aliases are not also reported for their domains.
        let text = format!(
            "[nodes.a]\nhostname = \"a.example.org\"\n[users.\"u@example.org\"]\npassword = \"{HASH}\"\n\
             [aliases]\n\"x@example.org\" = \"u@example.org\"\n"
        );
        only_error(&text, 0, "cluster", "missing");
        // A user with a refused password still counts as a user for aliases.
        only_error(
            &aliases("\"x@example.org\" = \"bob@example.org\"\n[users.\"bob@example.org\"]\npassword = \"pw\"\n"),
            10,
            "users.\"bob@example.org\".password",
            "plaintext",
        );
        // A refused domain: its users are not reported again, other domains still are.
        let text = format!(
            "[cluster]\ndomains = [\"a.org\", \"b_c.org\"]\n[nodes.n]\nhostname = \"n.a.org\"\n\
             [users.\"u@b_c.org\"]\npassword = \"{HASH}\"\n[users.\"u@d.org\"]\npassword = \"{HASH}\"\n"
        );
        let found = errors(&text);
        let keys: Vec<_> = found.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert_eq!(keys, [(Some(2), "cluster.domains[1]"), (Some(7), "users.\"u@d.org\"")]);
        // A node with another problem still takes part in the duplicate-hostname check.
        let found = errors(&base("[nodes.b]\nhostname = \"mail.example.org\"\nrole = \"x\"\n"));
        let keys: Vec<_> = found.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert_eq!(keys, [(Some(8), "nodes.b.hostname"), (Some(9), "nodes.b.role")]);
        // A misspelt required key is reported once, as the typo.
        only_error(
            &base("[tls]\ncert = \"/etc/hostname\"\nkye = \"/etc/hostname\"\n"),
            9,
            "tls.kye",
            "did you mean `key`?",
        );
    }

    /// What `postern serve` writes for the development node, relative paths and all.
    #[test]
    fn development_config_loads() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tls")).unwrap();
        std::fs::write(dir.path().join("tls/self-signed.pem"), "pem").unwrap();
        std::fs::write(dir.path().join("tls/self-signed.key"), "pem").unwrap();
        let text = format!(
            r#"[cluster]
domains = ["localhost"]

[nodes.dev]
hostname = "localhost"
role = "primary"
data_dir = "."
listen.smtp = ["127.0.0.1:2525"]
listen.imap = ["127.0.0.1:1143"]
listen.imaps = ["127.0.0.1:1993"]

[tls]
cert = "tls/self-signed.pem"
key = "tls/self-signed.key"

[users."dev@localhost"]
password = "{HASH}"

[aliases]
"postmaster@localhost" = "dev@localhost"
"#
        );
        let path = dir.path().join("postern.toml");
        std::fs::write(&path, text).unwrap();
        let config = load_file(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.nodes["dev"].data_dir, std::path::absolute(dir.path()).unwrap());
    }
}
