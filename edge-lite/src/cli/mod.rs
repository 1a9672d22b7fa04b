//! The command line: what clap parses ([`Cli`]), the reference text that
//! `--help` ends with ([`REFERENCE`]), and where the operator commands go
//! ([`backend`]): to the running edge's admin API (the default), or, with
//! `--offline`, straight to the store named by the config.
//!
//! The API key is never a flag: a process's arguments are visible to every
//! user through `ps` and /proc. It comes from a file (`--api-key-file`,
//! `TETHER_API_KEY_FILE`) or from `TETHER_API_KEY`.

pub(crate) mod backend;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// `--help`'s first paragraph.
const ABOUT: &str = "\
tether's edge server. Devices (tetherd) dial its agent port over TLS 1.3 and
present a token; the edge publishes the endpoints each device binds, on a
public TCP port per tcp endpoint and on one shared SNI-routed TLS port for
tls endpoints, and carries every public connection to its device as a stream.

`serve` runs it. The operator commands (token, apikey, endpoint, session,
event, status) are clients of the running edge's admin API: the address
comes from --api, TETHER_API_URL or the [api] section of --config, the key
from --api-key-file, TETHER_API_KEY or TETHER_API_KEY_FILE, and every change
is recorded with the key's id; each request has 30 s. With --offline
--config FILE they work on the token store directly instead (no key; how the
first API key is made, and for recovery when the edge is down); a running
edge applies what they change within 1 s. session and status need the
running edge. provision always works on the store. Each command has its own
--help.";

/// The end of `--help`, in help2man's layout: subsections (`Output:`,
/// `Signals:`, `Exit status:`), then the sections help2man knows
/// (`Files:`, `Environment:`), each entry a tag and its text.
pub(crate) const REFERENCE: &str = "\
Output:
  Tables (--output table, the default) or JSON (--output json: the API's
  documents, a list as one array) on stdout; notes and errors on stderr. A
  created token or API key is printed once, on stdout: alone with --output
  table, in the \"secret\" field with --output json. serve prints only these
  lines on stdout, for scripts and tests; its logs go to stderr, the first
  the build line that --version prints.

  LISTEN agent <ip:port>, LISTEN tls <ip:port>
                        once listening (with port 0 in the config: the port
                        the OS chose)
  LISTEN api <url>      with [api]: http://<ip:port>, https://<ip:port> or
                        unix:<path>
  BOUND <endpoint> <url>
                        a bind changed who serves an endpoint; <url> is
                        tcp://<ip>:<port> or tls://<name>.<domain>:<port>
  UNBOUND <endpoint>    the session that served it ended
  PROVISIONED <serial> <token id>
                        provision: the device's bundle is complete and the
                        manifest records it
  REISSUED <serial> <token id> <old token id>
                        provision --reissue: new bundle recorded, old token
                        revoked
  SUMMARY provisioned=N reissued=N skipped=N orphans_revoked=N
                        provision: the last line

Signals:
  SIGTERM, SIGINT       serve stops gracefully: the listeners close, every
                        session gets GOAWAY(NO_ERROR), open streams have
                        session.shutdown_grace_ms (default 10 s) to finish,
                        exit 0
  other signals         not handled: SIGHUP, for one, keeps its default
                        action (the process ends at once) and reloads nothing

Exit status:
  0    serve stopped by SIGTERM or SIGINT; a command done (revoking a token
       already revoked included); --help, --version
  1    serve could not start (a listener cannot be bound, a certificate or
       key is unusable, the token store cannot be opened, the signal
       handlers cannot be installed); a command failed: the API cannot be
       reached or refused it (no such token, a read key asked to change
       something, a conflict: the message is the API's), or offline the
       store cannot be opened or written; provision could not write a
       bundle or the manifest, or --root names a serial already provisioned
       whose bundle the root does not hold (--reissue it)
  64   a usage or configuration error: an unknown command or flag, a bad
       value (a rule, a CIDR, a URL), no API address or key, a config file
       that cannot be read or is invalid; provision: a bad flag, CSV row
       (\"error: FILE:LINE: FIELD: REASON\"), CA file or manifest, or an
       endpoint name another token may bind (nothing was minted or written)
  99   provision stopped by TETHER_PROVISION_ABORT_AFTER (tests only)

Files:
  FILE (--config)       state_dir, [agent] (the port devices dial, its
                        certificate and key), [api], the optional [tcp] and
                        [tls] public listeners, [session], [limits], [events]
                        and the traffic policies; the certificates and keys
                        it names are read with it. An error in it is
                        reported as
                        \"error: FILE:LINE: FIELD: REASON\"
                        (without LINE for a field left out), and a file that
                        cannot be read as
                        \"error: FILE: cannot read the config file: REASON\".
  <state_dir>/tokens.db
                        the token store (SQLite): token ids, hashes and
                        endpoint owners, API keys' hashes, events; never a
                        token or key itself. serve, --offline commands and
                        provision share it; serve notices a change within
                        1 s.
  <DIR>/<SERIAL>/, <ROOT>/etc/tether/
                        provision's bundles. Each is complete or absent: it
                        is written under a temporary name (.tmp-*), every
                        file and directory fsynced, then renamed into place,
                        before the manifest records it.

Environment:
  TETHER_API_URL        the API's address, as --api takes it
  TETHER_API_KEY        the API key itself (ak_<id>.<secret>), when neither
                        --api-key-file nor TETHER_API_KEY_FILE is given
  TETHER_API_KEY_FILE   a file holding the API key, as --api-key-file
  TETHER_API_CA         the CA file for an https:// API, as --api-ca
  RUST_LOG              the log filter for stderr (env_logger syntax),
                        default info; e.g. RUST_LOG=tether_edge=debug
  TETHER_PROVISION_ABORT_AFTER
                        tests only: provision=N stops (exit 99) after writing
                        the bundle of the N+1th device it mints, before the
                        manifest records it, as a crash would";

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    /// Tables for people.
    Table,
    /// The API's JSON, for programs.
    Json,
}

/// `tether-edge`'s arguments.
#[derive(Parser, Debug)]
#[command(
    name = "tether-edge",
    about = "tether's edge server and its operator commands",
    long_about = ABOUT,
    after_long_help = REFERENCE,
    disable_help_subcommand = true,
    propagate_version = true,
    max_term_width = 80,
    term_width = 80
)]
pub(crate) struct Cli {
    /// The operator commands' connection and output.
    #[command(flatten)]
    pub(crate) global: Global,
    /// What to do (default: serve).
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
}

/// The options every command takes.
#[derive(Args, Debug)]
pub(crate) struct Global {
    /// The config file.
    #[arg(
        short,
        long,
        global = true,
        help_heading = "Global options",
        value_name = "FILE",
        long_help = "the config file (TOML), required by serve, provision and --offline (there is no default path); for the other commands, where the API is when --api is not given"
    )]
    pub(crate) config: Option<PathBuf>,
    /// Work on the store, not through the API.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        long_help = "work on the store of --config directly, without the API: for the first API key, and for recovery when the edge is down. A running edge applies the changes within 1 s. Events record them as offline, with no key"
    )]
    pub(crate) offline: bool,
    /// The API's address.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        value_name = "URL",
        env = "TETHER_API_URL",
        hide_env_values = true,
        long_help = "the admin API: http://HOST:PORT (loopback), https://HOST:PORT or unix:/PATH. Default: what [api] listen of --config says (a wildcard address as loopback; https when [api] has a certificate)"
    )]
    pub(crate) api: Option<String>,
    /// A file holding the API key.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        value_name = "FILE",
        env = "TETHER_API_KEY_FILE",
        hide_env_values = true,
        long_help = "a file holding the API key (ak_<id>.<secret>, as apikey create printed it; surrounding whitespace is ignored). Else TETHER_API_KEY holds the key itself. There is no flag for the key: arguments are visible in ps"
    )]
    pub(crate) api_key_file: Option<PathBuf>,
    /// The CA for an https:// API.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        value_name = "PEM",
        env = "TETHER_API_CA",
        hide_env_values = true,
        long_help = "the PEM certificates that the API's certificate is verified against, for https://. Default with --config: [api] cert, which holds the API's own certificate chain"
    )]
    pub(crate) api_ca: Option<PathBuf>,
    /// table or json.
    #[arg(
        short,
        long,
        global = true,
        help_heading = "Global options",
        value_enum,
        default_value_t = Output::Table,
        value_name = "FORMAT",
        long_help = "table (for people) or json (the API's JSON documents, a list as one array)"
    )]
    pub(crate) output: Output,
}

/// The commands.
#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Run the edge (the default).
    Serve,
    /// Device tokens and their bind rules.
    #[command(subcommand)]
    Token(TokenCmd),
    /// API keys.
    #[command(subcommand)]
    Apikey(ApiKeyCmd),
    /// Endpoints and who owns them.
    #[command(subcommand)]
    Endpoint(EndpointCmd),
    /// Live agent sessions (the running edge only).
    #[command(subcommand)]
    Session(SessionCmd),
    /// The event log.
    #[command(subcommand)]
    Event(EventCmd),
    /// The running edge's health (GET /healthz; no key needed).
    Status,
    /// Factory provisioning, on the store.
    #[command(long_about = PROVISION_ABOUT)]
    Provision(Box<crate::provision::Options>),
}

const PROVISION_ABOUT: &str = "\
Factory provisioning, on the store (--config; never through the API: it
writes secrets into files on this host). One token per device, allowed
exactly that device's endpoints (description provision:SERIAL), and a bundle
per device (credential 0600, ca.crt, tetherd.toml with edge, server_name,
ca_file = \"ca.crt\" and an [[endpoint]] per endpoint, no credential key: the
unit passes it with LoadCredential=) in DIR/SERIAL/ (--out) or in
ROOT/etc/tether/ (--root), plus a manifest. Every row, flag, the CA and the
manifest are checked before anything is minted: on any error nothing is
minted, revoked or written (exit 64). Serials already in the manifest are
skipped. A token marked for a serial of the run or the manifest but not
recorded in the manifest (an interrupted run) is revoked and named on
stderr. Secrets are written only to the bundles.

Usage: tether-edge --config FILE provision (--devices CSV | --serial SERIAL...)
  --edge HOST:PORT --ca PEM [--server-name NAME] [--endpoint SPEC...]
  (--out DIR | --root DIR --uid N --gid N --manifest FILE)
  [--manifest FILE] [--reissue SERIAL...]";

/// A token's scope as flags.
#[derive(Args, Debug)]
pub(crate) struct ScopeArgs {
    /// A bind rule (repeatable).
    #[arg(
        long = "allow",
        value_name = "RULE",
        long_help = "an endpoint the token may bind (repeat for more): NAME, '*.SUFFIX' (every endpoint whose name ends in .SUFFIX), or '*' (every endpoint, only when asked for explicitly)"
    )]
    pub(crate) allow: Vec<String>,
    /// A source range (repeatable).
    #[arg(
        long = "source",
        value_name = "CIDR",
        long_help = "an address range the device may connect from (repeat for more; a bare address is its /32 or /128). None: anywhere"
    )]
    pub(crate) sources: Vec<String>,
    /// A note stored with the token.
    #[arg(long, value_name = "TEXT")]
    pub(crate) description: Option<String>,
}

/// `token …`.
#[derive(Subcommand, Debug)]
pub(crate) enum TokenCmd {
    /// Create a token; prints it once on stdout (its id on stderr).
    #[command(long_about = "\
Create a token; prints it once on stdout (its id on stderr). --allow is
required: a forgotten flag must not mint a credential that may claim any
device's endpoint.")]
    Create(ScopeArgs),
    /// Change a token's description, rules or sources.
    #[command(long_about = "\
Change a token's description, rules (--allow, all of them, replacing the
old) or sources (--source, replacing the old; --any-source removes them).
Running edges apply it to live sessions within 1 s: endpoints the new rules
do not allow are unbound (the device gets BindErr naming the rule), sessions
from addresses the new sources refuse are closed.")]
    Update {
        /// The token's id (tk_...).
        #[arg(value_name = "ID")]
        id: String,
        /// The new scope.
        #[command(flatten)]
        scope: ScopeArgs,
        /// Remove the token's sources.
        #[arg(long, conflicts_with = "sources")]
        any_source: bool,
    },
    /// Show one token.
    Get {
        /// The token's id (tk_...).
        #[arg(value_name = "ID")]
        id: String,
    },
    /// List tokens (never secrets).
    List,
    /// Revoke a token; running edges close its sessions within 1 s.
    Revoke {
        /// The token's id (tk_...).
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Rotate a token without touching the device.
    #[command(long_about = "\
Rotate a token without touching the device: the running edge offers a
successor (same rules) through the device's tunnel within 1 s, or when it
next connects; tetherd stores it in its state directory and reconnects with
it, and only then is ID retired. Until then both are valid.")]
    Rotate {
        /// The token's id (tk_...).
        #[arg(value_name = "ID")]
        id: String,
    },
}

/// `apikey …`.
#[derive(Subcommand, Debug)]
pub(crate) enum ApiKeyCmd {
    /// Create an API key; prints it once on stdout (its id on stderr).
    #[command(long_about = "\
Create an API key; prints it (ak_<id>.<secret>) once on stdout, its id on
stderr. The first admin key is made --offline, on the store; later ones
through the API with an admin key.")]
    Create {
        /// read or admin.
        #[arg(
            long,
            value_name = "ROLE",
            long_help = "read (every GET) or admin (everything)"
        )]
        role: String,
        /// A note stored with the key.
        #[arg(long, value_name = "TEXT")]
        description: Option<String>,
    },
    /// List API keys (never secrets).
    List,
    /// Revoke an API key; the API refuses it from the next request.
    Revoke {
        /// The key's id (ak_...).
        #[arg(value_name = "ID")]
        id: String,
    },
}

/// `endpoint …`.
#[derive(Subcommand, Debug)]
pub(crate) enum EndpointCmd {
    /// List endpoints, the token that owns each and, from the API, who
    /// serves it.
    #[command(long_about = "\
List endpoints and the token that owns each (the first token to bind an
endpoint owns it; others get ENDPOINT_TAKEN); through the API also the
bound ones' URLs and sessions.")]
    List,
    /// Forget an endpoint's owner.
    #[command(long_about = "\
Forget an endpoint's owner, so that the next token allowed to bind it owns
it (to move an endpoint to a new device). A running edge applies it at
once (through the API) or within 1 s (--offline).")]
    Release {
        /// The endpoint's name.
        #[arg(value_name = "NAME")]
        name: String,
    },
}

/// `session …`.
#[derive(Subcommand, Debug)]
pub(crate) enum SessionCmd {
    /// List live agent sessions.
    List {
        /// Only this token's sessions.
        #[arg(long, value_name = "ID")]
        token: Option<String>,
    },
}

/// `event …`.
#[derive(Subcommand, Debug)]
pub(crate) enum EventCmd {
    /// List events, newest first.
    List {
        /// Only this kind (token_created, agent_connected, ...).
        #[arg(long, value_name = "KIND")]
        kind: Option<String>,
        /// Only events of this token.
        #[arg(long, value_name = "ID")]
        token: Option<String>,
        /// Only events at or after this time (Unix milliseconds).
        #[arg(long, value_name = "MS")]
        since: Option<i64>,
        /// At most this many (1-1000).
        #[arg(long, value_name = "N", default_value_t = 100,
              value_parser = clap::value_parser!(u16).range(1..=1000))]
        limit: u16,
    },
}
