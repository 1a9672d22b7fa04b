//! `tether-edge provision`: factory provisioning. From a CSV of device
//! serials it mints one token per device in the edge's token store, each
//! allowed to bind exactly that device's endpoints, and writes each device's
//! bundle — `credential`, `ca.crt`, `tetherd.toml` — either into a directory
//! per device (`--out DIR`: `DIR/SERIAL/`) or into an image root tree
//! (`--root DIR`: `DIR/etc/tether/`, the paths tetherd's unit expects). A
//! manifest (`serial,token_id,created_unix`, never a secret) records what
//! was provisioned. It works on the store offline, like `token create`; a
//! running edge sees the new tokens and the revocations within 1 s.
//!
//! What it does not do: talk to the admin API (it mints secrets into files
//! on this host, so it runs where the store is), flash images, or choose
//! upstreams itself.
//!
//! # Order of work, and why each step is where it is
//!
//! 1. **Validate everything, touch nothing.** The flags, the edge address,
//!    the CA file (PEM certificates only: a private key in it is refused),
//!    the endpoint templates, every CSV row, the manifest, the `--reissue`
//!    serials, and endpoint names already allowed to another active token
//!    in the store. Every error names the file, line and field
//!    (`devices.csv:3: serial: ...`); with any error the run exits 64 and
//!    nothing is minted, revoked or written.
//! 2. **Recover from an interrupted run.** Every token it mints has the
//!    description `provision:<serial>`. An active token with that marker for
//!    a serial of this run (CSV, `--serial`) or of the manifest, whose id is
//!    not the manifest's for that serial, was minted by a run that stopped
//!    before recording it (or is the old token of an interrupted
//!    `--reissue`): it is revoked, and stderr names it by id. Leftover
//!    temporary files and directories (`.tmp-*`, `.old-*`) are removed.
//! 3. **Mint and write, a batch at a time.** Tokens are created
//!    [`CHUNK`] at a time in one SQLite transaction; then each device's
//!    bundle is written atomically (into `DIR/.tmp-SERIAL/`, every file
//!    fsynced, the directory renamed to `DIR/SERIAL`; with `--root`, each
//!    file through a temporary name, fsync and rename), the parent
//!    directories fsynced, and only then the batch's manifest lines appended
//!    and fsynced (rewritten through a temporary file when the batch holds a
//!    `--reissue`). `PROVISIONED` lines are printed once the manifest holds
//!    them. A crash anywhere leaves every minted token either recorded with
//!    a complete bundle, or unrecorded — and revoked by step 2 of the next
//!    run.
//!
//! A re-run skips serials already in the manifest and says how many.
//! `--reissue SERIAL` mints a new token, rewrites the bundle, records the new
//! id in the manifest, and then revokes the old token. One manifest per set
//! of serials: two manifests sharing serials would treat each other's tokens
//! as orphans.
//!
//! # Endpoints
//!
//! `--endpoint NAME=UPSTREAM[,KIND]` (repeatable) is a template that every
//! device gets; in NAME, `{serial}` is the serial as written and `{label}`
//! the serial as a DNS label (lowercase, `.` and `_` as `-`). KIND is `tcp`
//! (default), `tls` or `tls-passthrough`. A row's optional `endpoints`
//! column replaces the templates for that device: entries separated by `;`
//! or spaces, each either a whole `NAME=UPSTREAM[,KIND]` or a bare NAME that
//! takes the upstream and kind of the `--endpoint` at the same position.
//! Each name must be a valid endpoint name (1-63 of `a-z`, `0-9`, inner
//! `-`), unique across the batch, and not allowed to an active token of
//! another serial.
//!
//! # Secrets
//!
//! A credential is written to its bundle's `credential` file (mode 0600) and
//! nowhere else: never to stdout, stderr, the log or the manifest.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tether_conf::HostPort;

use rustls::pki_types::pem::{PemObject, SectionKind};
use tether_edge::config::valid_endpoint_name;
use tether_edge::scope::{BindRule, Rules, Scope};
use tether_edge::store::{token_id_of, unix_now, SqliteStore, Store, TokenId, TokenInfo};

/// The description prefix of every token `provision` mints:
/// `provision:<serial>`.
pub const MARKER: &str = "provision:";
/// Tokens minted per SQLite transaction and manifest flush.
pub const CHUNK: usize = 100;
/// The longest serial accepted.
pub const SERIAL_MAX: usize = 64;
/// The manifest's header line.
pub const MANIFEST_HEADER: &str = "serial,token_id,created_unix";
/// Test-only hook: with `N`, the run stops (exit [`EXIT_ABORTED`]) right
/// after writing the bundle of the `N+1`th device it mints, before that
/// device's manifest line, as a crash there would.
pub const ABORT_ENV: &str = "TETHER_PROVISION_ABORT_AFTER";
/// The exit code of the [`ABORT_ENV`] hook.
pub const EXIT_ABORTED: i32 = 99;
/// The files of a bundle.
const BUNDLE_FILES: [&str; 3] = ["credential", "ca.crt", "tetherd.toml"];
/// At most this many input errors are listed.
const MAX_ERRORS: usize = 20;

/// The `provision` flags, as clap parsed them (`cli`).
#[derive(Debug, Default, clap::Args)]
pub struct Options {
    /// `--devices FILE`: the CSV (`serial[,endpoints]`).
    #[arg(
        long,
        value_name = "CSV",
        long_help = "the devices, a CSV with the header serial[,endpoints] ('#' starts a comment line). A serial is 1-64 of A-Z a-z 0-9 . _ -, not starting with '.' or '-'. The endpoints cell, when not empty, replaces the --endpoint templates for that row: entries separated by ';' or spaces, each a SPEC or a bare NAME that takes the upstream and kind of the --endpoint at the same position"
    )]
    pub devices: Option<PathBuf>,
    /// `--serial S` (repeatable): only these serials (without `--devices`:
    /// these serials, with the templates).
    #[arg(
        long = "serial",
        value_name = "SERIAL",
        long_help = "only this device (repeatable); without --devices, these serials with the templates"
    )]
    pub serials: Vec<String>,
    /// `--edge HOST:PORT`.
    #[arg(
        long,
        value_name = "HOST:PORT",
        long_help = "the edge's agent address for tetherd.toml"
    )]
    pub edge: Option<String>,
    /// `--ca FILE`.
    #[arg(
        long,
        value_name = "PEM",
        long_help = "the CA that signed the edge's agent certificate, copied to every bundle as ca.crt (certificates only; a private key is refused)"
    )]
    pub ca: Option<PathBuf>,
    /// `--server-name NAME`.
    #[arg(
        long,
        value_name = "NAME",
        long_help = "server_name in tetherd.toml (default: the host of --edge)"
    )]
    pub server_name: Option<String>,
    /// `--endpoint NAME=UPSTREAM[,KIND]` (repeatable).
    #[arg(
        long = "endpoint",
        value_name = "SPEC",
        long_help = "NAME=UPSTREAM[,KIND], an endpoint every device gets (repeatable); KIND is tcp (default), tls or tls-passthrough; in NAME, {serial} is the serial and {label} the serial as a DNS label (lowercase, '.' and '_' as '-'), e.g. 'ssh-{label}=127.0.0.1:22'"
    )]
    pub endpoints: Vec<String>,
    /// `--out DIR`.
    #[arg(
        long,
        value_name = "DIR",
        long_help = "write each device's credential, ca.crt and tetherd.toml into DIR/SERIAL/; DIR is made 0700"
    )]
    pub out: Option<PathBuf>,
    /// `--root DIR`.
    #[arg(
        long,
        value_name = "DIR",
        long_help = "one device (pick it with --serial or a one-row CSV) into an image root, in DIR/etc/tether (mode 0755): credential (0600, owner --uid:--gid), ca.crt and tetherd.toml (0644, owner 0:0)"
    )]
    pub root: Option<PathBuf>,
    /// `--uid N`.
    #[arg(
        long,
        value_name = "N",
        long_help = "with --root: the numeric owner of the credential, the image's tetherd user (not the host's)"
    )]
    pub uid: Option<u32>,
    /// `--gid N`.
    #[arg(
        long,
        value_name = "N",
        long_help = "with --root: the numeric group of the credential, the image's tetherd group"
    )]
    pub gid: Option<u32>,
    /// `--manifest FILE`.
    #[arg(
        long,
        value_name = "FILE",
        long_help = "serial,token_id,created_unix, one line per device (never a secret); default DIR/manifest.csv with --out, required with --root"
    )]
    pub manifest: Option<PathBuf>,
    /// `--reissue SERIAL` (repeatable).
    #[arg(
        long,
        value_name = "SERIAL",
        long_help = "mint a new token for a serial in the manifest, rewrite its bundle, record it, then revoke the old token (repeatable)"
    )]
    pub reissue: Vec<String>,
}

/// Why a run failed.
#[derive(Debug)]
pub enum Error {
    /// Bad flags or input (each message names where): nothing was minted,
    /// revoked or written. Exit 64.
    Input(Vec<String>),
    /// The store or the file system failed while working. Exit 1; what was
    /// done before is recorded, and the next run revokes any token minted
    /// but not recorded.
    Failed(String),
}

impl Error {
    fn input(msg: impl Into<String>) -> Error {
        Error::Input(vec![msg.into()])
    }
}

/// What a finished run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// New devices.
    pub provisioned: usize,
    /// Devices given a new token by `--reissue`.
    pub reissued: usize,
    /// Serials skipped: already in the manifest.
    pub skipped: usize,
    /// Tokens of interrupted runs revoked.
    pub orphans: usize,
}

/// How the edge publishes an endpoint (`kind` in tetherd.toml).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Tcp,
    Tls,
    TlsPassthrough,
}

impl Kind {
    fn parse(s: &str) -> Option<Kind> {
        match s {
            "tcp" => Some(Kind::Tcp),
            "tls" => Some(Kind::Tls),
            "tls-passthrough" => Some(Kind::TlsPassthrough),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Kind::Tcp => "tcp",
            Kind::Tls => "tls",
            Kind::TlsPassthrough => "tls-passthrough",
        }
    }
}

/// An endpoint spec, its name still a template.
#[derive(Clone, Debug)]
struct Spec {
    name: String,
    upstream: String,
    kind: Kind,
}

/// One device's endpoint, name expanded.
#[derive(Clone, Debug)]
struct Endpoint {
    name: String,
    upstream: String,
    kind: Kind,
}

/// One device to provision.
#[derive(Debug)]
struct Device {
    serial: String,
    /// Where it came from, for messages: `devices.csv:3` or `--serial`.
    origin: String,
    endpoints: Vec<Endpoint>,
}

/// Where the bundles go.
#[derive(Debug)]
enum Target {
    /// `DIR/SERIAL/`.
    Out(PathBuf),
    /// `ROOT/etc/tether/`, the credential owned by uid:gid.
    Root { root: PathBuf, uid: u32, gid: u32 },
}

impl Target {
    /// The directory that holds `serial`'s bundle files.
    fn bundle_dir(&self, serial: &str) -> PathBuf {
        match self {
            Target::Out(dir) => dir.join(serial),
            Target::Root { root, .. } => root.join("etc/tether"),
        }
    }
}

/// A serial: 1 to [`SERIAL_MAX`] of `A-Z a-z 0-9 . _ -`, not starting with
/// `.` or `-` (it names a directory and goes into endpoint names).
pub fn valid_serial(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= SERIAL_MAX
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !s.starts_with(['.', '-'])
}

const SERIAL_RULE: &str = "1-64 of A-Z, a-z, 0-9, '.', '_' and '-', not starting with '.' or '-'";
const NAME_RULE: &str = "1-63 of a-z, 0-9 and '-', not starting or ending with '-'";

/// The serial as a DNS label: lowercase, `.` and `_` become `-`.
fn label(serial: &str) -> String {
    serial
        .chars()
        .map(|c| match c {
            '.' | '_' => '-',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

/// Checks a name template's placeholders (`{serial}`, `{label}`).
fn check_template(name: &str) -> Result<(), String> {
    let mut rest = name;
    while let Some(i) = rest.find(['{', '}']) {
        let tail = &rest[i..];
        let ph = ["{serial}", "{label}"]
            .into_iter()
            .find(|p| tail.starts_with(p));
        match ph {
            Some(p) => rest = &tail[p.len()..],
            None => {
                return Err(format!(
                    "`{name}`: unknown placeholder at `{tail}` (only {{serial}} and {{label}})"
                ))
            }
        }
    }
    Ok(())
}

fn expand(name: &str, serial: &str) -> String {
    name.replace("{serial}", serial)
        .replace("{label}", &label(serial))
}

/// Checks `host:port` with tetherd's own parser ([`HostPort`]), and that
/// it holds no quote, backslash or comma (it is written into a TOML string
/// and a CSV manifest as is), returning it as given.
fn check_host_port(s: &str) -> Result<String, String> {
    let hp = HostPort::parse(s)?;
    if hp.host.bytes().any(|b| matches!(b, b'"' | b'\\' | b',')) {
        return Err(format!("`{s}`: empty or invalid host"));
    }
    Ok(s.to_owned())
}

/// Parses `NAME=UPSTREAM[,KIND]`.
fn parse_spec(s: &str) -> Result<Spec, String> {
    let (name, rest) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not NAME=UPSTREAM[,KIND]"))?;
    let (upstream, kind) = match rest.split_once(',') {
        Some((u, k)) => (
            u,
            Kind::parse(k).ok_or_else(|| {
                format!("`{s}`: `{k}` is not an endpoint kind (tcp, tls or tls-passthrough)")
            })?,
        ),
        None => (rest, Kind::Tcp),
    };
    if name.is_empty() {
        return Err(format!("`{s}`: the name is empty"));
    }
    check_template(name)?;
    let upstream = check_host_port(upstream).map_err(|e| format!("upstream {e}"))?;
    Ok(Spec {
        name: name.to_owned(),
        upstream,
        kind,
    })
}

/// The CA file's certificates, re-encoded as PEM (nothing else of the file
/// goes to a device).
fn load_ca(path: &Path) -> Result<String, String> {
    let p = path.display();
    let bytes = fs::read(path).map_err(|e| format!("{p}: cannot read the CA file: {e}"))?;
    if bytes.windows(11).any(|w| w == b"PRIVATE KEY") {
        return Err(format!(
            "{p}: holds a private key; the CA file goes to every device and must hold certificates only"
        ));
    }
    let mut pem = String::new();
    let mut n = 0;
    for (i, section) in <(SectionKind, Vec<u8>)>::pem_slice_iter(&bytes).enumerate() {
        let (kind, der) = section.map_err(|e| format!("{p}: not a PEM file: {e}"))?;
        if kind != SectionKind::Certificate {
            return Err(format!(
                "{p}: PEM section {} is a {kind:?}, not a CERTIFICATE",
                i + 1
            ));
        }
        if let Err(e) = x509_parser::parse_x509_certificate(&der) {
            return Err(format!("{p}: certificate {} does not parse: {e}", i + 1));
        }
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            // base64 is ASCII.
            pem.push_str(std::str::from_utf8(line).unwrap_or_default());
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
        n += 1;
    }
    if n == 0 {
        return Err(format!("{p}: no PEM certificate in it"));
    }
    Ok(pem)
}

/// A TOML basic string (the values were checked to hold no control
/// characters).
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// What every bundle shares.
struct Common {
    edge: String,
    server_name: Option<String>,
    ca_pem: String,
}

fn tetherd_toml(common: &Common, d: &Device) -> String {
    let mut t = format!(
        "# tetherd.toml of device {serial}, written by `tether-edge provision`.\n\
         # No `credential` key: the unit passes /etc/tether/credential with\n\
         # LoadCredential=credential:/etc/tether/credential, and tetherd reads\n\
         # $CREDENTIALS_DIRECTORY/credential. ca_file is relative to this file.\n\
         edge = {edge}\n",
        serial = d.serial,
        edge = toml_str(&common.edge),
    );
    if let Some(n) = &common.server_name {
        let _ = writeln!(t, "server_name = {}", toml_str(n));
    }
    t.push_str("ca_file = \"ca.crt\"\n");
    for e in &d.endpoints {
        let _ = write!(
            t,
            "\n[[endpoint]]\nname = {}\nkind = {}\nupstream = {}\n",
            toml_str(&e.name),
            toml_str(e.kind.as_str()),
            toml_str(&e.upstream)
        );
    }
    t
}

/// Collects input errors, up to [`MAX_ERRORS`].
#[derive(Default)]
struct Errors(Vec<String>);

impl Errors {
    fn push(&mut self, msg: String) {
        self.0.push(msg);
    }

    fn full(&self) -> bool {
        self.0.len() >= MAX_ERRORS
    }

    fn check(self) -> Result<(), Error> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Error::Input(self.0))
        }
    }
}

/// One device's endpoints from its `endpoints` cell (or the templates).
fn row_endpoints(
    cell: &str,
    serial: &str,
    templates: &[Spec],
) -> Result<Vec<Endpoint>, (&'static str, String)> {
    let entries: Vec<&str> = cell
        .split(|c: char| c == ';' || c.is_whitespace())
        .filter(|e| !e.is_empty())
        .collect();
    let (field, specs): (&str, Vec<Spec>) = if entries.is_empty() {
        if templates.is_empty() {
            return Err((
                "endpoints",
                "no endpoints: give --endpoint NAME=UPSTREAM[,KIND], or list them in the endpoints column".into(),
            ));
        }
        ("serial", templates.to_vec())
    } else {
        let mut specs = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            if e.contains('=') {
                specs.push(parse_spec(e).map_err(|m| ("endpoints", m))?);
            } else {
                check_template(e).map_err(|m| ("endpoints", m))?;
                let t = templates.get(i).ok_or_else(|| {
                    (
                        "endpoints",
                        format!(
                            "`{e}` has no upstream: write NAME=UPSTREAM[,KIND], or give a {}. --endpoint for it to take the upstream and kind of",
                            i + 1
                        ),
                    )
                })?;
                specs.push(Spec {
                    name: (*e).to_owned(),
                    ..t.clone()
                });
            }
        }
        ("endpoints", specs)
    };
    let mut out: Vec<Endpoint> = Vec::with_capacity(specs.len());
    for s in specs {
        let name = expand(&s.name, serial);
        if !valid_endpoint_name(&name) {
            let hint = if s.name.contains("{serial}") {
                " (use {label} for the serial as a DNS label)"
            } else {
                ""
            };
            return Err((
                field,
                format!(
                    "endpoint name `{name}` (from `{}`) is not valid: {NAME_RULE}{hint}",
                    s.name
                ),
            ));
        }
        if out.iter().any(|o| o.name == name) {
            return Err((field, format!("endpoint `{name}` is listed twice")));
        }
        out.push(Endpoint {
            name,
            upstream: s.upstream,
            kind: s.kind,
        });
    }
    Ok(out)
}

/// Reads and checks the devices CSV.
fn read_devices(path: &Path, templates: &[Spec], errors: &mut Errors) -> Vec<Device> {
    let p = path.display().to_string();
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) => {
            errors.push(format!("{p}: cannot read the devices file: {e}"));
            return Vec::new();
        }
    };
    // Flexible: a row may leave out trailing empty cells (`GW-0001` under
    // `serial,endpoints`); more cells than the header has is an error below.
    let mut rdr = csv::ReaderBuilder::new()
        .flexible(true)
        .comment(Some(b'#'))
        .trim(csv::Trim::All)
        .from_reader(io::BufReader::new(file));
    let line_of = |pos: Option<&csv::Position>| pos.map_or(1, |p| p.line());
    let headers = match rdr.headers() {
        Ok(h) => h.clone(),
        Err(e) => {
            errors.push(format!("{p}:{}: -: {e}", line_of(e.position())));
            return Vec::new();
        }
    };
    let hline = line_of(headers.position());
    let mut serial_col = None;
    let mut endpoints_col = None;
    for (i, h) in headers.iter().enumerate() {
        let slot = match h {
            "serial" => &mut serial_col,
            "endpoints" => &mut endpoints_col,
            other => {
                errors.push(format!(
                    "{p}:{hline}: header: unknown column `{other}` (the columns are serial and, optionally, endpoints)"
                ));
                continue;
            }
        };
        if slot.replace(i).is_some() {
            errors.push(format!("{p}:{hline}: header: column `{h}` appears twice"));
        }
    }
    let Some(serial_col) = serial_col else {
        errors.push(format!(
            "{p}:{hline}: header: no `serial` column (the header is serial[,endpoints])"
        ));
        return Vec::new();
    };
    let mut devices: Vec<Device> = Vec::new();
    let mut serials: HashMap<String, u64> = HashMap::new();
    let mut names: HashMap<String, (String, u64)> = HashMap::new();
    for rec in rdr.records() {
        if errors.full() {
            break;
        }
        let rec = match rec {
            Ok(r) => r,
            Err(e) => {
                errors.push(format!("{p}:{}: -: {e}", line_of(e.position())));
                continue;
            }
        };
        let line = line_of(rec.position());
        if rec.len() > headers.len() {
            errors.push(format!(
                "{p}:{line}: -: {} cells, but the header has {} ({})",
                rec.len(),
                headers.len(),
                headers.iter().collect::<Vec<_>>().join(",")
            ));
            continue;
        }
        let serial = rec.get(serial_col).unwrap_or_default();
        if !valid_serial(serial) {
            errors.push(format!(
                "{p}:{line}: serial: `{serial}` is not a valid serial ({SERIAL_RULE})"
            ));
            continue;
        }
        if let Some(first) = serials.get(serial) {
            errors.push(format!(
                "{p}:{line}: serial: `{serial}` is already on line {first}"
            ));
            continue;
        }
        serials.insert(serial.to_owned(), line);
        let cell = endpoints_col.and_then(|c| rec.get(c)).unwrap_or_default();
        let endpoints = match row_endpoints(cell, serial, templates) {
            Ok(e) => e,
            Err((field, msg)) => {
                errors.push(format!("{p}:{line}: {field}: {msg}"));
                continue;
            }
        };
        let mut clash = false;
        for e in &endpoints {
            if let Some((other, l)) = names.get(&e.name) {
                errors.push(format!(
                    "{p}:{line}: endpoints: endpoint `{}` is already device {other}'s (line {l})",
                    e.name
                ));
                clash = true;
            }
        }
        if clash {
            continue;
        }
        for e in &endpoints {
            names.insert(e.name.clone(), (serial.to_owned(), line));
        }
        devices.push(Device {
            serial: serial.to_owned(),
            origin: format!("{p}:{line}"),
            endpoints,
        });
    }
    devices
}

/// One manifest line.
#[derive(Clone, Debug)]
struct Row {
    serial: String,
    id: TokenId,
    created: i64,
}

/// The manifest: what was provisioned, in order.
struct Manifest {
    path: PathBuf,
    rows: Vec<Row>,
    index: HashMap<String, usize>,
    exists: bool,
}

impl Manifest {
    fn load(path: &Path) -> Result<Manifest, Error> {
        let p = path.display();
        let mut m = Manifest {
            path: path.to_owned(),
            rows: Vec::new(),
            index: HashMap::new(),
            exists: false,
        };
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(m),
            Err(e) => return Err(Error::input(format!("{p}: cannot read the manifest: {e}"))),
        };
        if text.is_empty() {
            // Created, but the run stopped before its header: rewritten whole.
            return Ok(m);
        }
        m.exists = true;
        let mut errors = Errors::default();
        let mut lines = text.lines().enumerate();
        if lines.next().map(|(_, h)| h) != Some(MANIFEST_HEADER) {
            errors.push(format!(
                "{p}:1: header: not a provision manifest (its first line must be {MANIFEST_HEADER})"
            ));
        }
        for (i, line) in lines {
            let n = i + 1;
            if errors.full() {
                break;
            }
            let f: Vec<&str> = line.split(',').collect();
            let [serial, id, created] = f[..] else {
                errors.push(format!("{p}:{n}: -: expected 3 fields ({MANIFEST_HEADER})"));
                continue;
            };
            if !valid_serial(serial) {
                errors.push(format!("{p}:{n}: serial: `{serial}` is not a valid serial"));
                continue;
            }
            let Some(tid) = id.strip_prefix("tk_").and_then(TokenId::parse) else {
                errors.push(format!(
                    "{p}:{n}: token_id: `{id}` is not a token id (tk_ and 12 hex digits)"
                ));
                continue;
            };
            let Ok(created) = created.parse::<i64>() else {
                errors.push(format!(
                    "{p}:{n}: created_unix: `{created}` is not a number"
                ));
                continue;
            };
            if let Some(&j) = m.index.get(serial) {
                errors.push(format!(
                    "{p}:{n}: serial: `{serial}` is already on line {}",
                    j + 2
                ));
                continue;
            }
            m.index.insert(serial.to_owned(), m.rows.len());
            m.rows.push(Row {
                serial: serial.to_owned(),
                id: tid,
                created,
            });
        }
        errors.check()?;
        Ok(m)
    }

    fn get(&self, serial: &str) -> Option<&Row> {
        self.index.get(serial).map(|&i| &self.rows[i])
    }

    fn line(r: &Row) -> String {
        format!("{},{},{}\n", r.serial, r.id, r.created)
    }

    /// Records `rows`: new serials appended, known ones replaced; the file
    /// is appended to and fsynced, or rewritten atomically when a serial was
    /// replaced.
    fn record(&mut self, rows: Vec<Row>) -> io::Result<()> {
        let mut replaced = false;
        let mut appended = String::new();
        for r in rows {
            if let Some(&i) = self.index.get(&r.serial) {
                self.rows[i] = r;
                replaced = true;
            } else {
                appended.push_str(&Manifest::line(&r));
                self.index.insert(r.serial.clone(), self.rows.len());
                self.rows.push(r);
            }
        }
        if replaced || !self.exists {
            let mut text = format!("{MANIFEST_HEADER}\n");
            for r in &self.rows {
                text.push_str(&Manifest::line(r));
            }
            write_atomic(&self.path, text.as_bytes(), 0o644, None)?;
            sync_dir(parent(&self.path))?;
            self.exists = true;
        } else if !appended.is_empty() {
            let mut f = OpenOptions::new().append(true).open(&self.path)?;
            f.write_all(appended.as_bytes())?;
            f.sync_all()?;
        }
        Ok(())
    }
}

fn parent(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes a new file at `path` (which must not exist) with `mode`, owned by
/// `owner` when given, and fsyncs it.
fn write_new(path: &Path, data: &[u8], mode: u32, owner: Option<(u32, u32)>) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    if let Some((uid, gid)) = owner {
        use std::os::unix::fs::MetadataExt;
        let m = f.metadata()?;
        if (m.uid(), m.gid()) != (uid, gid) {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
        }
    }
    // The umask may have narrowed `mode`; set it exactly (after fchown,
    // which may clear set-id bits).
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.write_all(data)?;
    f.sync_all()
}

/// Replaces `path` atomically: a temporary `.tmp-NAME` beside it, fsynced,
/// renamed over it. The caller fsyncs the directory.
fn write_atomic(path: &Path, data: &[u8], mode: u32, owner: Option<(u32, u32)>) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let tmp = parent(path).join(format!(".tmp-{}", name.to_string_lossy()));
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    write_new(&tmp, data, mode, owner)?;
    fs::rename(&tmp, path)
}

/// Creates `dir` and its missing parents with `mode`.
fn make_dirs(dir: &Path, mode: u32) -> io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(mode).create(dir)
}

/// Removes the `.tmp-*` and `.old-*` entries that an interrupted run left
/// in `dir`; with `only`, just `.tmp-NAME` for those names (a directory
/// that is not provision's own).
fn remove_leftovers(dir: &Path, only: Option<&[&str]>) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for e in entries {
        let e = e?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        let ours = match only {
            Some(names) => names.iter().any(|n| name == format!(".tmp-{n}")),
            None => name.starts_with(".tmp-") || name.starts_with(".old-"),
        };
        if ours {
            let p = e.path();
            if e.file_type()?.is_dir() {
                fs::remove_dir_all(&p)?;
            } else {
                fs::remove_file(&p)?;
            }
        }
    }
    Ok(())
}

/// Writes one device's bundle (see the module docs for the order).
fn write_bundle(target: &Target, common: &Common, d: &Device, token: &str) -> io::Result<()> {
    let credential = format!("{token}\n");
    let toml = tetherd_toml(common, d);
    match target {
        Target::Out(dir) => {
            let tmp = dir.join(format!(".tmp-{}", d.serial));
            match fs::remove_dir_all(&tmp) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            fs::DirBuilder::new().mode(0o755).create(&tmp)?;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
            write_new(&tmp.join("credential"), credential.as_bytes(), 0o600, None)?;
            write_new(&tmp.join("ca.crt"), common.ca_pem.as_bytes(), 0o644, None)?;
            write_new(&tmp.join("tetherd.toml"), toml.as_bytes(), 0o644, None)?;
            sync_dir(&tmp)?;
            let fin = dir.join(&d.serial);
            if fs::symlink_metadata(&fin).is_ok() {
                let old = dir.join(format!(".old-{}", d.serial));
                fs::rename(&fin, &old)?;
                fs::rename(&tmp, &fin)?;
                fs::remove_dir_all(&old)?;
            } else {
                fs::rename(&tmp, &fin)?;
            }
            // The parent directory is fsynced once per batch, before the
            // manifest records it.
            Ok(())
        }
        Target::Root { uid, gid, .. } => {
            let etc = target.bundle_dir(&d.serial);
            let root_owned = Some((0, 0));
            write_atomic(
                &etc.join("ca.crt"),
                common.ca_pem.as_bytes(),
                0o644,
                root_owned,
            )?;
            write_atomic(
                &etc.join("tetherd.toml"),
                toml.as_bytes(),
                0o644,
                root_owned,
            )?;
            write_atomic(
                &etc.join("credential"),
                credential.as_bytes(),
                0o600,
                Some((*uid, *gid)),
            )?;
            sync_dir(&etc)
        }
    }
}

/// The token id in a bundle's `credential` file, if it has one.
fn bundle_token(dir: &Path) -> Option<TokenId> {
    let text = fs::read_to_string(dir.join("credential")).ok()?;
    token_id_of(text.lines().next()?.trim())
}

fn failed(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> Error {
    move |e| Error::Failed(format!("{what}: {e}"))
}

/// Runs `provision` against the store in `state_dir`, printing
/// `PROVISIONED`/`REISSUED` lines and the summary on stdout, and what it
/// skipped, revoked or warns about on stderr.
pub fn run(opts: Options, state_dir: &Path) -> Result<Summary, Error> {
    // 1. Flags.
    let target = match (&opts.out, &opts.root) {
        (Some(_), Some(_)) => return Err(Error::input("--out and --root exclude each other")),
        (None, None) => {
            return Err(Error::input(
                "provision needs --out DIR (a bundle directory per device) or --root DIR (one device, into an image root)",
            ))
        }
        (Some(out), None) => {
            if opts.uid.is_some() || opts.gid.is_some() {
                return Err(Error::input("--uid and --gid go with --root"));
            }
            Target::Out(out.clone())
        }
        (None, Some(root)) => match (opts.uid, opts.gid) {
            (Some(uid), Some(gid)) => {
                if opts.manifest.is_none() {
                    return Err(Error::input(
                        "--root needs --manifest FILE (outside the image: it lists every device provisioned)",
                    ));
                }
                Target::Root {
                    root: root.clone(),
                    uid,
                    gid,
                }
            }
            _ => {
                return Err(Error::input(
                    "--root needs --uid N and --gid N: the numbers of the image's tetherd user and group (not the host's)",
                ))
            }
        },
    };
    let edge = opts
        .edge
        .as_deref()
        .ok_or_else(|| Error::input("provision needs --edge HOST:PORT (the edge's agent port)"))?;
    let mut errors = Errors::default();
    let edge = check_host_port(edge)
        .map_err(|e| errors.push(format!("--edge {e}")))
        .unwrap_or_default();
    if let Some(n) = &opts.server_name {
        if rustls::pki_types::ServerName::try_from(n.as_str()).is_err() {
            errors.push(format!(
                "--server-name `{n}` is not a valid DNS name or IP address"
            ));
        }
    }
    let ca = opts.ca.as_deref().ok_or_else(|| {
        Error::input(
            "provision needs --ca FILE (the PEM CA that signed the edge's agent certificate)",
        )
    })?;
    let ca_pem = load_ca(ca).map_err(|e| errors.push(e)).unwrap_or_default();
    let mut templates = Vec::new();
    for s in &opts.endpoints {
        match parse_spec(s) {
            Ok(t) => {
                let sample = expand(&t.name, "x");
                if valid_endpoint_name(&sample) {
                    templates.push(t);
                } else {
                    errors.push(format!(
                        "--endpoint `{s}`: `{}` does not make a valid endpoint name ({NAME_RULE})",
                        t.name
                    ));
                }
            }
            Err(e) => errors.push(format!("--endpoint {e}")),
        }
    }
    for s in opts.serials.iter().chain(&opts.reissue) {
        if !valid_serial(s) {
            errors.push(format!("`{s}` is not a valid serial ({SERIAL_RULE})"));
        }
    }
    errors.check()?;

    // 2. The devices.
    let mut errors = Errors::default();
    let (all, mut devices): (HashSet<String>, Vec<Device>) = match &opts.devices {
        Some(path) => {
            let d = read_devices(path, &templates, &mut errors);
            (d.iter().map(|d| d.serial.clone()).collect(), d)
        }
        None if opts.serials.is_empty() => {
            return Err(Error::input(
                "provision needs --devices FILE (a CSV: serial[,endpoints]) or --serial SERIAL",
            ))
        }
        None => {
            let mut d = Vec::new();
            let mut names: HashMap<String, String> = HashMap::new();
            for s in &opts.serials {
                if d.iter().any(|x: &Device| &x.serial == s) {
                    continue;
                }
                match row_endpoints("", s, &templates) {
                    Ok(eps) => {
                        for e in &eps {
                            if let Some(o) = names.insert(e.name.clone(), s.clone()) {
                                errors.push(format!(
                                    "--serial {s}: endpoint `{}` is already device {o}'s",
                                    e.name
                                ));
                            }
                        }
                        d.push(Device {
                            serial: s.clone(),
                            origin: "--serial".into(),
                            endpoints: eps,
                        });
                    }
                    Err((_, m)) => errors.push(format!("--serial {s}: {m}")),
                }
            }
            (HashSet::new(), d)
        }
    };
    errors.check()?;
    if opts.devices.is_some() && !opts.serials.is_empty() {
        let mut errors = Errors::default();
        for s in &opts.serials {
            if !all.contains(s) {
                errors.push(format!(
                    "--serial {s}: not in {}",
                    opts.devices.as_deref().unwrap_or(Path::new("-")).display()
                ));
            }
        }
        errors.check()?;
        devices.retain(|d| opts.serials.contains(&d.serial));
    }
    if devices.is_empty() {
        return Err(Error::input("no devices to provision"));
    }
    if let Target::Root { root, .. } = &target {
        if devices.len() != 1 {
            return Err(Error::input(format!(
                "--root lays one device's bundle into {}, but {} devices are selected: pick one with --serial SERIAL",
                root.display(),
                devices.len()
            )));
        }
    }
    let manifest_path = match (&opts.manifest, &target) {
        (Some(m), _) => m.clone(),
        (None, Target::Out(dir)) => dir.join("manifest.csv"),
        (None, Target::Root { .. }) => unreachable!("--root requires --manifest, checked above"),
    };
    if let Target::Out(dir) = &target {
        if parent(&manifest_path) == dir.as_path() {
            if let Some(d) = devices
                .iter()
                .find(|d| manifest_path.file_name() == Some(d.serial.as_ref()))
            {
                return Err(Error::input(format!(
                    "{}: serial: `{}` is the manifest's file name in {}",
                    d.origin,
                    d.serial,
                    dir.display()
                )));
            }
        }
    }
    let mut manifest = Manifest::load(&manifest_path)?;
    let mut errors = Errors::default();
    let reissue: HashSet<&str> = opts.reissue.iter().map(String::as_str).collect();
    for s in &reissue {
        if !devices.iter().any(|d| d.serial == *s) {
            errors.push(format!(
                "--reissue {s}: not among the devices of this run (it needs its row for the endpoints)"
            ));
        } else if manifest.get(s).is_none() {
            errors.push(format!(
                "--reissue {s}: not in {} (nothing to reissue; provision it without --reissue)",
                manifest_path.display()
            ));
        }
    }
    errors.check()?;

    // 3. The store: endpoint names held by other tokens.
    let store = SqliteStore::open(state_dir).map_err(|e| Error::Failed(e.to_string()))?;
    let tokens = store.list().map_err(|e| Error::Failed(e.to_string()))?;
    let active: Vec<&TokenInfo> = tokens.iter().filter(|t| t.revoked_at.is_none()).collect();
    let by_id: HashMap<&TokenId, &TokenInfo> = tokens.iter().map(|t| (&t.id, t)).collect();
    // Exact rules by name, and the `*.suffix` rules; a token with `*` is
    // not counted (it is no device's, and would conflict with every one).
    let mut allowed: HashMap<&str, Vec<&TokenInfo>> = HashMap::new();
    let mut patterns: Vec<(&BindRule, &TokenInfo)> = Vec::new();
    for t in &active {
        for r in t.scope.rules.iter() {
            match r {
                BindRule::Exact(n) => allowed.entry(n.as_str()).or_default().push(t),
                BindRule::Suffix(_) => patterns.push((r, t)),
                BindRule::Any => {}
            }
        }
    }
    let (todo, skipped): (Vec<&Device>, Vec<&Device>) = devices
        .iter()
        .partition(|d| manifest.get(&d.serial).is_none() || reissue.contains(d.serial.as_str()));
    let mut errors = Errors::default();
    for d in &todo {
        let mine = format!("{MARKER}{}", d.serial);
        for e in &d.endpoints {
            let by_pattern = patterns
                .iter()
                .filter(|(r, _)| r.matches(&e.name))
                .map(|(_, t)| t);
            for t in allowed
                .get(e.name.as_str())
                .into_iter()
                .flatten()
                .chain(by_pattern)
            {
                if t.description != mine {
                    errors.push(format!(
                        "{}: endpoints: endpoint `{}` is already allowed to token {} ({:?}): revoke that token first",
                        d.origin, e.name, t.id, t.description
                    ));
                }
            }
        }
        if errors.full() {
            break;
        }
    }
    errors.check()?;
    for d in &skipped {
        let Some(row) = manifest.get(&d.serial) else {
            continue;
        };
        match &target {
            Target::Root { root, .. } => {
                if bundle_token(&target.bundle_dir(&d.serial)).as_ref() != Some(&row.id) {
                    return Err(Error::Failed(format!(
                        "{} is already provisioned ({}, in {}), but {} does not hold its bundle: --reissue {} mints a new credential and writes it there",
                        d.serial,
                        row.id,
                        manifest_path.display(),
                        root.display(),
                        d.serial
                    )));
                }
            }
            Target::Out(_) => {
                let dir = target.bundle_dir(&d.serial);
                if dir.exists() {
                    if let Some(id) = bundle_token(&dir).filter(|id| *id != row.id) {
                        eprintln!(
                            "warning: {}: its bundle {} holds token {id}, not its manifest token {} (an interrupted --reissue?): run with --reissue {}",
                            d.serial,
                            dir.display(),
                            row.id,
                            d.serial
                        );
                    }
                }
            }
        }
        match by_id.get(&row.id) {
            Some(t) if t.revoked_at.is_some() => eprintln!(
                "warning: {}: its token {} is revoked: --reissue {} gives it a new one",
                d.serial, row.id, d.serial
            ),
            None => eprintln!(
                "warning: {}: its token {} is not in the token store",
                d.serial, row.id
            ),
            _ => {}
        }
    }

    // 4. Recovery: tokens minted but never recorded.
    let mut summary = Summary {
        skipped: skipped.len(),
        ..Summary::default()
    };
    let scope: HashSet<&str> = all
        .iter()
        .map(String::as_str)
        .chain(devices.iter().map(|d| d.serial.as_str()))
        .chain(manifest.rows.iter().map(|r| r.serial.as_str()))
        .collect();
    for t in &active {
        let Some(serial) = t.description.strip_prefix(MARKER) else {
            continue;
        };
        if !scope.contains(serial) || manifest.get(serial).map(|r| &r.id) == Some(&t.id) {
            continue;
        }
        store
            .revoke(t.id.as_str())
            .map_err(|e| Error::Failed(e.to_string()))?;
        eprintln!(
            "revoked token {} ({}): minted by an interrupted run and never recorded in {}",
            t.id,
            t.description,
            manifest_path.display()
        );
        summary.orphans += 1;
    }
    match &target {
        Target::Out(dir) => {
            make_dirs(dir, 0o700).map_err(failed(dir.display()))?;
            remove_leftovers(dir, None).map_err(failed(dir.display()))?;
        }
        Target::Root { root, .. } => {
            let etc = root.join("etc/tether");
            make_dirs(&etc, 0o755).map_err(failed(etc.display()))?;
            // Whatever the umask: tetherd must be able to read its config.
            fs::set_permissions(&etc, fs::Permissions::from_mode(0o755))
                .map_err(failed(etc.display()))?;
            remove_leftovers(&etc, Some(&BUNDLE_FILES)).map_err(failed(etc.display()))?;
        }
    }
    let mdir = parent(&manifest_path);
    make_dirs(mdir, 0o755).map_err(failed(mdir.display()))?;
    if let Some(name) = manifest_path.file_name().and_then(|n| n.to_str()) {
        remove_leftovers(mdir, Some(&[name])).map_err(failed(mdir.display()))?;
    }
    if !skipped.is_empty() {
        eprintln!(
            "skipped {} device(s) already in {} (--reissue SERIAL mints a new credential)",
            skipped.len(),
            manifest_path.display()
        );
    }

    // 5. Mint, write, record.
    let common = Common {
        edge,
        server_name: opts.server_name.clone(),
        ca_pem,
    };
    let abort_after: Option<usize> = std::env::var(ABORT_ENV).ok().and_then(|v| v.parse().ok());
    let mut done = 0usize;
    for chunk in todo.chunks(CHUNK) {
        let specs: Vec<(String, Scope)> = chunk
            .iter()
            .map(|d| {
                (
                    format!("{MARKER}{}", d.serial),
                    Scope {
                        rules: Rules::exact(d.endpoints.iter().map(|e| e.name.clone())),
                        sources: Vec::new(),
                    },
                )
            })
            .collect();
        let minted = store
            .create_many(&specs)
            .map_err(|e| Error::Failed(e.to_string()))?;
        let now = unix_now();
        let mut rows = Vec::with_capacity(chunk.len());
        let mut lines = String::new();
        let mut old = Vec::new();
        for (d, t) in chunk.iter().zip(&minted) {
            write_bundle(&target, &common, d, t.token.expose())
                .map_err(failed(format!("{}: writing its bundle", d.serial)))?;
            if abort_after == Some(done) {
                // Test-only: stop as a crash would, this device's token
                // minted and its bundle written but not recorded.
                flush(&target, &mut manifest, rows, &lines)?;
                std::process::exit(EXIT_ABORTED);
            }
            rows.push(Row {
                serial: d.serial.clone(),
                id: t.id.clone(),
                created: now,
            });
            match manifest.get(&d.serial) {
                Some(prev) => {
                    let _ = writeln!(lines, "REISSUED {} {} {}", d.serial, t.id, prev.id);
                    old.push(prev.id.clone());
                    summary.reissued += 1;
                }
                None => {
                    let _ = writeln!(lines, "PROVISIONED {} {}", d.serial, t.id);
                    summary.provisioned += 1;
                }
            }
            done += 1;
        }
        flush(&target, &mut manifest, rows, &lines)?;
        for id in old {
            store
                .revoke(id.as_str())
                .map_err(|e| Error::Failed(e.to_string()))?;
        }
    }
    println!(
        "SUMMARY provisioned={} reissued={} skipped={} orphans_revoked={}",
        summary.provisioned, summary.reissued, summary.skipped, summary.orphans
    );
    Ok(summary)
}

/// Makes a batch's bundles durable, records them in the manifest, then
/// prints their lines.
fn flush(
    target: &Target,
    manifest: &mut Manifest,
    rows: Vec<Row>,
    lines: &str,
) -> Result<(), Error> {
    if rows.is_empty() {
        return Ok(());
    }
    if let Target::Out(dir) = target {
        sync_dir(dir).map_err(failed(dir.display()))?;
    }
    manifest
        .record(rows)
        .map_err(failed(manifest.path.display()))?;
    print!("{lines}");
    let _ = io::stdout().flush();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_safe_names() {
        for ok in ["GW-0001", "a", "sn_1.2", &"x".repeat(64)] {
            assert!(valid_serial(ok), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "a/b",
            "a b",
            "..",
            "é",
            &"x".repeat(65),
        ] {
            assert!(!valid_serial(bad), "{bad}");
        }
    }

    #[test]
    fn templates_expand_serial_and_label() {
        assert_eq!(expand("ssh-{label}", "GW_01.A"), "ssh-gw-01-a");
        assert_eq!(expand("{serial}-web", "gw1"), "gw1-web");
        assert!(check_template("a-{serial}-{label}").is_ok());
        assert!(check_template("a-{serial").is_err());
        assert!(check_template("a-{nope}").is_err());
    }

    #[test]
    fn specs_parse_with_kind_default_tcp() {
        let s = parse_spec("ssh-{label}=127.0.0.1:22").expect("spec");
        assert_eq!((s.upstream.as_str(), s.kind), ("127.0.0.1:22", Kind::Tcp));
        let s = parse_spec("web=[::1]:8080,tls").expect("spec");
        assert_eq!(s.kind, Kind::Tls);
        assert!(parse_spec("web").is_err());
        assert!(parse_spec("web=host").is_err());
        assert!(parse_spec("web=h:0").is_err());
        assert!(parse_spec("web=::1:80").is_err());
        assert!(parse_spec("web=h:80,udp").is_err());
        assert!(parse_spec("=h:80").is_err());
    }

    #[test]
    fn row_endpoints_pair_bare_names_with_templates() {
        let t = vec![parse_spec("ssh-{label}=127.0.0.1:22").expect("spec")];
        let e = row_endpoints("", "GW1", &t).expect("templates");
        assert_eq!(e[0].name, "ssh-gw1");
        let e = row_endpoints("acme-ssh; web-{label}=127.0.0.1:80,tls", "GW1", &t).expect("column");
        assert_eq!(e[0].name, "acme-ssh");
        assert_eq!(e[0].upstream, "127.0.0.1:22");
        assert_eq!((e[1].name.as_str(), e[1].kind), ("web-gw1", Kind::Tls));
        assert!(
            row_endpoints("a b", "GW1", &t).is_err(),
            "b has no template"
        );
        assert!(row_endpoints("a a=h:1", "GW1", &t).is_err(), "twice");
        assert!(row_endpoints("", "GW1", &[]).is_err(), "none at all");
        let err = row_endpoints("", "GW1", &[parse_spec("s-{serial}=h:1").expect("spec")])
            .expect_err("uppercase");
        assert!(err.1.contains("{label}"), "{err:?}");
    }

    #[test]
    fn tetherd_toml_escapes_and_has_no_credential_key() {
        let c = Common {
            edge: "edge.example.com:7443".into(),
            server_name: Some("edge.example.com".into()),
            ca_pem: String::new(),
        };
        let d = Device {
            serial: "GW1".into(),
            origin: "-".into(),
            endpoints: vec![Endpoint {
                name: "ssh-gw1".into(),
                upstream: "127.0.0.1:22".into(),
                kind: Kind::Tcp,
            }],
        };
        let t = tetherd_toml(&c, &d);
        let v: toml::Table = toml::from_str(&t).expect("parses");
        assert_eq!(v["edge"].as_str(), Some("edge.example.com:7443"));
        assert_eq!(v["ca_file"].as_str(), Some("ca.crt"));
        assert!(!v.contains_key("credential"));
        assert_eq!(toml_str("a\"b\\"), "\"a\\\"b\\\\\"");
    }
}
