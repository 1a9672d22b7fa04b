//! `tether-edge`: parse the arguments, start logging, load the config (exit
//! 64 with file, line and field on error), then either run the server with
//! SIGTERM/SIGINT wired to a graceful shutdown, or run a `token` command.
//!
//! [`HELP`] is the reference for commands, flags, stdout lines, signals, exit
//! codes and environment (`scripts/man` turns it into tether-edge(8)); keep
//! it true to the code.

use std::path::PathBuf;
use std::process::ExitCode;

use futures_lite::StreamExt;
use tether_edge::listing::{endpoint_table, token_table};
use tether_edge::store::{Allow, Revoked, Store};
use tether_edge::Config;

const USAGE: &str = "\
Usage: tether-edge --config FILE [serve]
  or:  tether-edge --config FILE token create [--description TEXT] --allow NAME...
  or:  tether-edge --config FILE token list
  or:  tether-edge --config FILE token revoke ID
  or:  tether-edge --config FILE endpoint list
  or:  tether-edge --config FILE endpoint release NAME
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
                        stderr). --allow NAME is required and may repeat;
                        '*' allows every endpoint, and must be asked for
                        explicitly
  token list            list tokens (never secrets)
  token revoke ID       revoke a token; running servers close its sessions
                        within 1 s
  endpoint list         list endpoints and the token that owns each (the
                        first token to bind an endpoint owns it; others get
                        ENDPOINT_TAKEN)
  endpoint release NAME
                        forget an endpoint's owner, so that the next token
                        allowed to bind it owns it (to move an endpoint to a
                        new device)

Output:
  serve prints only these lines on stdout, for scripts and tests; token
  create prints the token, token list and endpoint list a table. Logs go to
  stderr, the first of serve's the build line that --version prints.

  LISTEN agent <ip:port>, LISTEN tls <ip:port>
                        once listening (with port 0 in the config: the port
                        the OS chose)
  BOUND <endpoint> <url>
                        a bind changed who serves an endpoint; <url> is
                        tcp://<ip>:<port> or tls://<name>.<domain>:<port>
  UNBOUND <endpoint>    the session that served it ended

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
       endpoint without an owner)
  64   a usage or configuration error: an unknown command or flag, a missing
       --config or --allow, a config file that cannot be read or is invalid

Options:
  -c, --config FILE     the config file (TOML), required by every command:
                        there is no default path
      --description TEXT
                        token create: a note stored with the token
      --allow NAME      token create: an endpoint the token may bind (repeat
                        for more), or '*' for every endpoint
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

Environment:
  RUST_LOG              the log filter for stderr (env_logger syntax),
                        default info; e.g. RUST_LOG=tether_edge=debug";

/// EX_USAGE / EX_CONFIG-style exit code for bad arguments or config.
const EXIT_USAGE: u8 = 64;

enum Command {
    Serve,
    Create {
        description: String,
        allow: Vec<String>,
    },
    List,
    Revoke(String),
    Endpoints,
    Release(String),
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
    let mut allow = Vec::new();
    let mut words = Vec::new();
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
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
            Long("allow") => allow.push(
                p.value()
                    .map_err(|e| e.to_string())?
                    .string()
                    .map_err(|e| e.to_string())?,
            ),
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
                    "token create needs --allow NAME (repeatable), or --allow '*' to allow every endpoint"
                        .into(),
                );
            }
            if let Some(bad) = allow
                .iter()
                .find(|a| *a != "*" && !tether_edge::config::valid_endpoint_name(a))
            {
                return Err(format!(
                    "--allow {bad:?}: not an endpoint name (lowercase letters, digits, inner '-') or '*'"
                ));
            }
            Command::Create {
                description: description.take().unwrap_or_default(),
                allow: std::mem::take(&mut allow),
            }
        }
        ["token", "list"] => Command::List,
        ["token", "revoke", id] => Command::Revoke((*id).to_owned()),
        ["endpoint", "list"] => Command::Endpoints,
        ["endpoint", "release", name] => Command::Release((*name).to_owned()),
        _ => return Err(format!("unknown command: {}", words.join(" "))),
    };
    if description.is_some() || !allow.is_empty() {
        return Err("--description and --allow go with `token create`".into());
    }
    let config = config.ok_or("--config FILE is required")?;
    Ok(Parsed::Run(Args { config, command }))
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
        Command::Create { description, allow } => with_store(&cfg, |s| {
            let allow = Allow::from_names(allow);
            let t = s.create(&description, &allow)?;
            println!("{}", t.token.expose());
            eprintln!("created token {} (allow={allow})", t.id);
            Ok(ExitCode::SUCCESS)
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
        Command::Revoke(id) => with_store(&cfg, |s| {
            Ok(match s.revoke(&id)? {
                Revoked::Now => {
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
    f: impl FnOnce(&Store) -> Result<ExitCode, tether_edge::store::StoreError>,
) -> ExitCode {
    match Store::open(&cfg.state_dir).and_then(|s| f(&s)) {
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
