//! `tether-edge`: parse the arguments, start logging, load the config (exit
//! 64 with file, line and field on error), then either run the server with
//! SIGTERM/SIGINT wired to a graceful shutdown, or run a `token`,
//! `endpoint` or `provision` command ([`provision`]).
//!
//! [`HELP`] is the reference for commands, flags, stdout lines, signals, exit
//! codes and environment (`scripts/man` turns it into tether-edge(8)); keep
//! it true to the code.

mod provision;

use std::path::PathBuf;
use std::process::ExitCode;

use futures_lite::StreamExt;
use tether_edge::events::{EventKind, NewEvent};
use tether_edge::listing::{apikey_table, endpoint_table, token_table};
use tether_edge::scope::{parse_sources, Rules, Scope};
use tether_edge::store::{
    ApiKeyId, Revoked, Role, RotationRequest, SqliteStore, Store, TokenUpdate, Updated,
};
use tether_edge::Config;

const USAGE: &str = "\
Usage: tether-edge --config FILE [serve]
  or:  tether-edge --config FILE token create [--description TEXT] --allow RULE...
         [--source CIDR...]
  or:  tether-edge --config FILE token update ID [--description TEXT]
         [--allow RULE...] [--source CIDR... | --any-source]
  or:  tether-edge --config FILE token list
  or:  tether-edge --config FILE token revoke ID
  or:  tether-edge --config FILE token rotate ID
  or:  tether-edge --config FILE apikey create --role (read|admin) [--description TEXT]
  or:  tether-edge --config FILE apikey list
  or:  tether-edge --config FILE apikey revoke ID
  or:  tether-edge --config FILE endpoint list
  or:  tether-edge --config FILE endpoint release NAME
  or:  tether-edge --config FILE provision (--devices CSV | --serial SERIAL...)
         --edge HOST:PORT --ca PEM [--server-name NAME] [--endpoint SPEC...]
         (--out DIR | --root DIR --uid N --gid N --manifest FILE)
         [--manifest FILE] [--reissue SERIAL...]
  or:  tether-edge --help | --version";

/// `--help` after [`USAGE`], in help2man's layout: a description and its
/// subsections (`Commands:`, `Output:`, `Signals:`, `Exit status:`), then
/// the sections help2man knows (`Options:`, `Files:`, `Environment:`), each
/// entry a tag and its text (option tags start with `  -x, --xxx`).
const HELP: &str = "\
tether's edge server. Devices (tetherd) dial its agent port over TLS 1.3 and
present a token; the edge publishes the endpoints each device binds, on a
public TCP port per tcp endpoint and on one shared SNI-routed TLS port for
tls endpoints, and carries every public connection to its device as a stream.

Commands:
  serve                 run the edge (the default)
  token create          create a token; prints it once on stdout (its id on
                        stderr). --allow RULE is required and may repeat:
                        an endpoint name, '*.SUFFIX' (every endpoint whose
                        name ends in .SUFFIX), or '*' (every endpoint, only
                        when asked for explicitly). --source CIDR (may
                        repeat) limits the addresses the device may connect
                        from
  token update ID       change a token's description, rules (--allow, all
                        of them, replacing the old) or sources (--source,
                        replacing the old; --any-source removes them).
                        Running servers apply it to live sessions within
                        1 s: endpoints the new rules do not allow are
                        unbound (the device gets BindErr naming the rule),
                        sessions from addresses the new sources refuse are
                        closed
  token list            list tokens (never secrets)
  token revoke ID       revoke a token; running servers close its sessions
                        within 1 s
  token rotate ID       rotate a token without touching the device: the
                        running edge offers a successor (same rules) through
                        the device's tunnel within 1 s, or when it next
                        connects; tetherd stores it in its state directory
                        and reconnects with it, and only then is ID retired.
                        Until then both are valid
  apikey create         create an admin API key (offline, on the store: how
                        the first key is made); --role read (every GET) or
                        --role admin (everything) is required. Prints the
                        key (ak_<id>.<secret>) once on stdout, its id on
                        stderr
  apikey list           list API keys (never secrets)
  apikey revoke ID      revoke an API key; the API refuses it from the next
                        request
  endpoint list         list endpoints and the token that owns each (the
                        first token to bind an endpoint owns it; others get
                        ENDPOINT_TAKEN)
  endpoint release NAME
                        forget an endpoint's owner, so that the next token
                        allowed to bind it owns it (to move an endpoint to a
                        new device)
  provision             factory provisioning, on the store offline: one
                        token per device, allowed exactly that device's
                        endpoints (description provision:SERIAL), and a
                        bundle per device (credential 0600, ca.crt,
                        tetherd.toml with edge, server_name, ca_file =
                        \"ca.crt\" and an [[endpoint]] per endpoint, no
                        credential key: the unit passes it with
                        LoadCredential=) in DIR/SERIAL/ (--out) or in
                        ROOT/etc/tether/ (--root), plus a manifest. Every
                        row, flag, the CA and the manifest are checked before
                        anything is minted: on any error nothing is minted,
                        revoked or written (exit 64). Serials already in the
                        manifest are skipped. A token marked for a serial of
                        the run or the manifest but not recorded in the
                        manifest (an interrupted run) is revoked and named on
                        stderr. Secrets are written only to the bundles

Output:
  serve prints only these lines on stdout, for scripts and tests; token
  create prints the token, token list and endpoint list a table. Logs go to
  stderr, the first of serve's the build line that --version prints.

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
       handlers cannot be installed); a token or endpoint command failed
       (the store cannot be opened or written, no token with that id, an
       endpoint without an owner); provision could not write a bundle or the
       manifest, or --root names a serial already provisioned whose bundle
       the root does not hold (--reissue it)
  64   a usage or configuration error: an unknown command or flag, a missing
       --config or --allow, a config file that cannot be read or is invalid;
       provision: a bad flag, CSV row (\"error: FILE:LINE: FIELD: REASON\"),
       CA file or manifest, or an endpoint name another token may bind
       (nothing was minted or written)
  99   provision stopped by TETHER_PROVISION_ABORT_AFTER (tests only)

Options:
  -c, --config FILE     the config file (TOML), required by every command:
                        there is no default path
      --description TEXT
                        token create: a note stored with the token
      --allow RULE      token create, token update: an endpoint the token
                        may bind (repeat for more): NAME, '*.SUFFIX' or '*'
      --source CIDR     token create, token update: an address range the
                        device may connect from (repeat for more; a bare
                        address is its /32 or /128). None: anywhere
      --any-source      token update: remove the token's sources
      --devices CSV     provision: the devices, a CSV with the header
                        serial[,endpoints] ('#' starts a comment line). A
                        serial is 1-64 of A-Z a-z 0-9 . _ -, not starting
                        with '.' or '-'. The endpoints cell, when not empty,
                        replaces the --endpoint templates for that row:
                        entries separated by ';' or spaces, each a SPEC or a
                        bare NAME that takes the upstream and kind of the
                        --endpoint at the same position
      --serial SERIAL   provision: only this device (repeatable); without
                        --devices, these serials with the templates
      --edge HOST:PORT  provision: the edge's agent address for tetherd.toml
      --ca PEM          provision: the CA that signed the edge's agent
                        certificate, copied to every bundle as ca.crt
                        (certificates only; a private key is refused)
      --server-name NAME
                        provision: server_name in tetherd.toml (default: the
                        host of --edge)
      --endpoint SPEC   provision: NAME=UPSTREAM[,KIND], an endpoint every
                        device gets (repeatable); KIND is tcp (default), tls
                        or tls-passthrough; in NAME, {serial} is the serial
                        and {label} the serial as a DNS label (lowercase, '.'
                        and '_' as '-'), e.g. 'ssh-{label}=127.0.0.1:22'
      --out DIR         provision: write each device's credential, ca.crt
                        and tetherd.toml into DIR/SERIAL/; DIR is made 0700
      --root DIR        provision: one device (pick it with --serial or a
                        one-row CSV) into an image root, in
                        DIR/etc/tether (mode 0755): credential (0600, owner
                        --uid:--gid), ca.crt and tetherd.toml (0644, owner
                        0:0)
      --uid N, --gid N  provision --root: the numeric owner of the
                        credential, the image's tetherd user and group (not
                        the host's)
      --manifest FILE   provision: serial,token_id,created_unix, one line
                        per device (never a secret); default DIR/manifest.csv
                        with --out, required with --root
      --reissue SERIAL  provision: mint a new token for a serial in the
                        manifest, rewrite its bundle, record it, then revoke
                        the old token (repeatable)
  -h, --help            print this text and exit 0
  -V, --version         print the build line (name, version, architecture)
                        and exit 0

Files:
  FILE (--config)       state_dir, [agent] (the port devices dial, its
                        certificate and key), the optional [tcp] and [tls]
                        public listeners, [session], [limits] and the traffic
                        policies; the certificates and keys it names are read
                        with it. An error in it is reported as
                        \"error: FILE:LINE: FIELD: REASON\" (without LINE for
                        a field left out), and a file that cannot be read as
                        \"error: FILE: cannot read the config file: REASON\".
  <state_dir>/tokens.db
                        the token store (SQLite): token ids, hashes and
                        endpoint owners, never a token itself. serve and the
                        commands share it; serve notices a revocation within
                        1 s.
  <DIR>/<SERIAL>/, <ROOT>/etc/tether/
                        provision's bundles. Each is complete or absent: it
                        is written under a temporary name (.tmp-*), every
                        file and directory fsynced, then renamed into place,
                        before the manifest records it.

Environment:
  RUST_LOG              the log filter for stderr (env_logger syntax),
                        default info; e.g. RUST_LOG=tether_edge=debug
  TETHER_PROVISION_ABORT_AFTER
                        tests only: provision=N stops (exit 99) after writing
                        the bundle of the N+1th device it mints, before the
                        manifest records it, as a crash would";

/// EX_USAGE / EX_CONFIG-style exit code for bad arguments or config.
const EXIT_USAGE: u8 = 64;

enum Command {
    Serve,
    Create { description: String, scope: Scope },
    Update { id: String, change: TokenUpdate },
    List,
    Revoke(String),
    Rotate(String),
    Endpoints,
    Release(String),
    Provision(Box<provision::Options>),
    KeyCreate { role: Role, description: String },
    KeyList,
    KeyRevoke(String),
}

struct Args {
    config: PathBuf,
    command: Command,
}

/// What the command line asks for.
enum Parsed {
    /// Run a command.
    Run(Args),
    /// `--help`.
    Help,
    /// `--version`.
    Version,
}

/// The build line: printed first on stderr by `serve`, and by `--version`.
fn build_line() -> String {
    format!(
        "tether-edge {} ({})",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH
    )
}

fn parse_args() -> Result<Parsed, String> {
    use lexopt::prelude::*;
    let mut p = lexopt::Parser::from_env();
    let mut config = None;
    let mut description = None;
    let mut role: Option<String> = None;
    let mut allow = Vec::new();
    let mut sources = Vec::new();
    let mut any_source = false;
    let mut words = Vec::new();
    let mut prov = provision::Options::default();
    let mut prov_flag: Option<&'static str> = None;
    fn string(p: &mut lexopt::Parser) -> Result<String, String> {
        p.value()
            .map_err(|e| e.to_string())?
            .string()
            .map_err(|e| e.to_string())
    }
    fn number(p: &mut lexopt::Parser, flag: &str) -> Result<u32, String> {
        let v = string(p)?;
        v.parse().map_err(|_| {
            format!("{flag} {v:?}: not a number (a numeric id of the image's user or group)")
        })
    }
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        if let Long(
            f @ ("devices" | "serial" | "edge" | "ca" | "server-name" | "endpoint" | "out" | "root"
            | "uid" | "gid" | "manifest" | "reissue"),
        ) = arg
        {
            let flag: &'static str = match f {
                "devices" => "--devices",
                "serial" => "--serial",
                "edge" => "--edge",
                "ca" => "--ca",
                "server-name" => "--server-name",
                "endpoint" => "--endpoint",
                "out" => "--out",
                "root" => "--root",
                "uid" => "--uid",
                "gid" => "--gid",
                "manifest" => "--manifest",
                _ => "--reissue",
            };
            prov_flag = Some(flag);
            match flag {
                "--devices" => prov.devices = Some(string(&mut p)?.into()),
                "--serial" => prov.serials.push(string(&mut p)?),
                "--edge" => prov.edge = Some(string(&mut p)?),
                "--ca" => prov.ca = Some(string(&mut p)?.into()),
                "--server-name" => prov.server_name = Some(string(&mut p)?),
                "--endpoint" => prov.endpoints.push(string(&mut p)?),
                "--out" => prov.out = Some(string(&mut p)?.into()),
                "--root" => prov.root = Some(string(&mut p)?.into()),
                "--uid" => prov.uid = Some(number(&mut p, flag)?),
                "--gid" => prov.gid = Some(number(&mut p, flag)?),
                "--manifest" => prov.manifest = Some(string(&mut p)?.into()),
                _ => prov.reissue.push(string(&mut p)?),
            }
            continue;
        }
        match arg {
            Short('c') | Long("config") => {
                config = Some(PathBuf::from(p.value().map_err(|e| e.to_string())?))
            }
            Long("description") => {
                description = Some(
                    p.value()
                        .map_err(|e| e.to_string())?
                        .string()
                        .map_err(|e| e.to_string())?,
                )
            }
            Long("allow") => allow.push(string(&mut p)?),
            Long("source") => sources.push(string(&mut p)?),
            Long("any-source") => any_source = true,
            Long("role") => role = Some(string(&mut p)?),
            Short('h') | Long("help") => return Ok(Parsed::Help),
            Short('V') | Long("version") => return Ok(Parsed::Version),
            Value(v) => words.push(v.string().map_err(|e| e.to_string())?),
            other => return Err(other.unexpected().to_string()),
        }
    }
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let command = match words.as_slice() {
        [] | ["serve"] => Command::Serve,
        ["token", "create"] => {
            if allow.is_empty() {
                // Fail closed: a forgotten flag must not mint a credential
                // that may claim any device's endpoint.
                return Err(
                    "token create needs --allow RULE (repeatable), or --allow '*' to allow every endpoint"
                        .into(),
                );
            }
            if any_source {
                return Err("--any-source goes with `token update` (token create without --source allows any)".into());
            }
            Command::Create {
                description: description.take().unwrap_or_default(),
                scope: Scope {
                    rules: rules_arg(&std::mem::take(&mut allow))?,
                    sources: sources_arg(&std::mem::take(&mut sources))?,
                },
            }
        }
        ["token", "update", id] => {
            if any_source && !sources.is_empty() {
                return Err("--any-source and --source contradict each other".into());
            }
            let change = TokenUpdate {
                description: description.take(),
                rules: if allow.is_empty() {
                    None
                } else {
                    Some(rules_arg(&std::mem::take(&mut allow))?)
                },
                sources: if any_source {
                    Some(Vec::new())
                } else if sources.is_empty() {
                    None
                } else {
                    Some(sources_arg(&std::mem::take(&mut sources))?)
                },
            };
            any_source = false;
            if change.description.is_none() && change.rules.is_none() && change.sources.is_none() {
                return Err(
                    "token update needs --description, --allow, --source or --any-source".into(),
                );
            }
            Command::Update {
                id: (*id).to_owned(),
                change,
            }
        }
        ["token", "list"] => Command::List,
        ["token", "revoke", id] => Command::Revoke((*id).to_owned()),
        ["token", "rotate", id] => Command::Rotate((*id).to_owned()),
        ["apikey", "create"] => {
            let r = role
                .take()
                .ok_or("apikey create needs --role read or --role admin")?;
            Command::KeyCreate {
                role: Role::parse(&r).ok_or_else(|| format!("--role {r:?}: need read or admin"))?,
                description: description.take().unwrap_or_default(),
            }
        }
        ["apikey", "list"] => Command::KeyList,
        ["apikey", "revoke", id] => Command::KeyRevoke((*id).to_owned()),
        ["endpoint", "list"] => Command::Endpoints,
        ["endpoint", "release", name] => Command::Release((*name).to_owned()),
        ["provision"] => {
            prov_flag = None;
            Command::Provision(Box::new(std::mem::take(&mut prov)))
        }
        _ => return Err(format!("unknown command: {}", words.join(" "))),
    };
    if let Some(flag) = prov_flag {
        return Err(format!("{flag} goes with `provision`"));
    }
    if role.is_some() {
        return Err("--role goes with `apikey create`".into());
    }
    if description.is_some() || !allow.is_empty() || !sources.is_empty() || any_source {
        return Err(
            "--description, --allow, --source and --any-source go with `token create` or `token update` (--description also with `apikey create`)"
                .into(),
        );
    }
    let config = config.ok_or("--config FILE is required")?;
    Ok(Parsed::Run(Args { config, command }))
}

/// `--allow` values as rules; a bad one is a usage error naming it.
fn rules_arg(allow: &[String]) -> Result<Rules, String> {
    Rules::parse(allow).map_err(|e| format!("--allow {e}"))
}

/// `--source` values as networks; a bad one is a usage error naming it.
fn sources_arg(sources: &[String]) -> Result<Vec<ipnet::IpNet>, String> {
    parse_sources(sources).map_err(|e| format!("--source {e}"))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Parsed::Run(a)) => a,
        Ok(Parsed::Help) => {
            println!("{USAGE}\n\n{HELP}");
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Version) => {
            println!("{}", build_line());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}\n{USAGE}\n(tether-edge --help for more)");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    if let Command::Serve = args.command {
        eprintln!("{}", build_line());
    }
    let cfg = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match args.command {
        Command::Serve => serve(cfg),
        Command::Create { description, scope } => with_store(&cfg, |s| {
            let t = s.create(&description, &scope)?;
            s.record(
                &NewEvent::new(EventKind::TokenCreated)
                    .token(&t.id)
                    .detail(format!("{} (offline)", scope.summary())),
            )?;
            println!("{}", t.token.expose());
            eprintln!("created token {} ({})", t.id, scope.summary());
            Ok(ExitCode::SUCCESS)
        }),
        Command::Update { id, change } => with_store(&cfg, |s| {
            Ok(match s.update(&id, &change)? {
                Updated::Now(t) => {
                    s.record(
                        &NewEvent::new(EventKind::TokenUpdated)
                            .token(&t.id)
                            .detail(format!("{} (offline)", t.scope.summary())),
                    )?;
                    eprintln!("updated token {} ({})", t.id, t.scope.summary());
                    ExitCode::SUCCESS
                }
                Updated::Revoked => {
                    eprintln!("error: token {id} is revoked; a revoked token does not change");
                    ExitCode::FAILURE
                }
                Updated::Unknown => {
                    eprintln!("error: no token with id {id:?}");
                    ExitCode::FAILURE
                }
            })
        }),
        Command::List => with_store(&cfg, |s| {
            print!("{}", token_table(&s.list()?));
            Ok(ExitCode::SUCCESS)
        }),
        Command::Endpoints => with_store(&cfg, |s| {
            print!("{}", endpoint_table(&s.list_endpoints()?));
            Ok(ExitCode::SUCCESS)
        }),
        Command::Release(name) => with_store(&cfg, |s| {
            Ok(match s.release_endpoint(&name)? {
                Some(owner) => {
                    eprintln!("released endpoint {name} (was owned by token {owner})");
                    ExitCode::SUCCESS
                }
                None => {
                    eprintln!("error: endpoint {name:?} has no owner");
                    ExitCode::FAILURE
                }
            })
        }),
        Command::Provision(opts) => match provision::run(*opts, &cfg.state_dir) {
            Ok(_) => ExitCode::SUCCESS,
            Err(provision::Error::Input(errors)) => {
                for e in &errors {
                    eprintln!("error: {e}");
                }
                eprintln!("nothing was minted or written");
                ExitCode::from(EXIT_USAGE)
            }
            Err(provision::Error::Failed(e)) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::KeyCreate { role, description } => with_store(&cfg, |s| {
            let k = s.create_api_key(role, &description, None)?;
            s.record(&NewEvent::new(EventKind::ApiKeyCreated).detail(format!(
                "{} role {} (offline)",
                k.id,
                role.as_str()
            )))?;
            println!("{}", k.key.expose());
            eprintln!("created API key {} (role {})", k.id, role.as_str());
            Ok(ExitCode::SUCCESS)
        }),
        Command::KeyList => with_store(&cfg, |s| {
            print!("{}", apikey_table(&s.list_api_keys()?));
            Ok(ExitCode::SUCCESS)
        }),
        Command::KeyRevoke(id) => with_store(&cfg, |s| {
            let Some(key) = ApiKeyId::parse(&id) else {
                eprintln!("error: {id:?} is not an API key id (ak_ and 12 hex digits)");
                return Ok(ExitCode::FAILURE);
            };
            Ok(match s.revoke_api_key(&key)? {
                Revoked::Now => {
                    s.record(
                        &NewEvent::new(EventKind::ApiKeyRevoked).detail(format!("{key} (offline)")),
                    )?;
                    eprintln!("revoked API key {key}");
                    ExitCode::SUCCESS
                }
                Revoked::Already => {
                    eprintln!("API key {key} was already revoked");
                    ExitCode::SUCCESS
                }
                Revoked::Unknown => {
                    eprintln!("error: no API key with id {id:?}");
                    ExitCode::FAILURE
                }
            })
        }),
        Command::Rotate(id) => with_store(&cfg, |s| {
            Ok(match s.request_rotation(&id, None)? {
                RotationRequest::Requested(t) => {
                    s.record(
                        &NewEvent::new(EventKind::TokenRotated)
                            .token(&t.id)
                            .detail("requested (offline)"),
                    )?;
                    eprintln!(
                        "rotation of token {} requested: the edge offers the device a successor when it is connected",
                        t.id
                    );
                    ExitCode::SUCCESS
                }
                RotationRequest::AlreadyPending(t) => {
                    eprintln!("a rotation of token {} is already pending", t.id);
                    ExitCode::SUCCESS
                }
                RotationRequest::Revoked => {
                    eprintln!("error: token {id} is revoked; a revoked token is not rotated");
                    ExitCode::FAILURE
                }
                RotationRequest::PendingSuccessor(from) => {
                    eprintln!("error: token {id} is the pending successor of {from}: its rotation is under way");
                    ExitCode::FAILURE
                }
                RotationRequest::Unknown => {
                    eprintln!("error: no token with id {id:?}");
                    ExitCode::FAILURE
                }
            })
        }),
        Command::Revoke(id) => with_store(&cfg, |s| {
            Ok(match s.revoke(&id)? {
                Revoked::Now => {
                    if let Some(t) = s.get(&id)? {
                        s.record(
                            &NewEvent::new(EventKind::TokenRevoked)
                                .token(&t.id)
                                .detail("offline"),
                        )?;
                    }
                    eprintln!("revoked token {id}");
                    ExitCode::SUCCESS
                }
                Revoked::Already => {
                    eprintln!("token {id} was already revoked");
                    ExitCode::SUCCESS
                }
                Revoked::Unknown => {
                    eprintln!("error: no token with id {id:?}");
                    ExitCode::FAILURE
                }
            })
        }),
    }
}

fn with_store(
    cfg: &Config,
    f: impl FnOnce(&dyn Store) -> Result<ExitCode, tether_edge::store::StoreError>,
) -> ExitCode {
    match SqliteStore::open(&cfg.state_dir).and_then(|s| f(&s)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(cfg: Config) -> ExitCode {
    let result = smol::block_on(async {
        let mut signals = match async_signal::Signals::new([
            async_signal::Signal::Term,
            async_signal::Signal::Int,
        ]) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: cannot install signal handlers: {e}");
                return Err(());
            }
        };
        let shutdown = async move {
            if let Some(Ok(sig)) = signals.next().await {
                log::info!("{sig:?}: shutting down");
            }
        };
        tether_edge::run(cfg, shutdown)
            .await
            .map_err(|e| eprintln!("error: {e}"))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(()) => ExitCode::FAILURE,
    }
}
