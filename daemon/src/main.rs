//! `tetherd --config FILE [--allow-root]`: parse the arguments, start
//! logging (with `<N>` priorities when stderr is the journal), print the
//! build line, load the config, refuse root, wire SIGTERM/SIGINT to a
//! graceful stop and SIGHUP to a reload, and call [`tetherd::run_with`].
//!
//! [`HELP`] is the reference for flags, files, stdout lines, signals, exit
//! codes and environment (`scripts/man` turns it into tetherd(8)); keep it
//! true to the code below and to [`tetherd::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use futures_lite::StreamExt;

const USAGE: &str = "Usage: tetherd --config FILE [--allow-root]";

/// `--help`, in help2man's layout: `Usage:` lines, a description and its
/// subsections (`Output:`, `Signals:`, `Exit status:`), then the sections
/// help2man knows (`Options:`, `Files:`, `Environment:`), each entry a tag
/// and its text (option tags start with `  -x, --xxx`).
const HELP: &str = "\
Usage: tetherd --config FILE [--allow-root]
  or:  tetherd --help | --version

tether's device daemon. It dials the edge (tether-edge) over TLS 1.3,
presents the device's credential, publishes the endpoints of its config and
connects every stream the edge opens to that endpoint's local upstream. It
redials forever, with exponential backoff and full jitter: a failed dial or
a refusal by the edge is logged, never fatal.

Output:
  stdout carries only these lines, for scripts and tests. Logs go to stderr,
  the first of them the build line that --version prints.

  CONNECTED <edge ip:port> session=<n>
                     the edge accepted the credential (Welcome); once per
                     session, n counting the sessions of this process
  BOUND <endpoint> <url>
                     the edge accepted an endpoint; <url> is tcp://<ip>:<port>
                     or tls://<name>.<domain>:<port>

  UNBOUND <endpoint>  a reload (SIGHUP) unbound an endpoint

Signals:
  SIGTERM, SIGINT    graceful stop: no new streams, GOAWAY(NO_ERROR) on every
                     session, up to 5 s for open streams to finish (then they
                     are cut), exit 0
  SIGHUP             reload FILE's endpoints without dropping the session:
                     new ones are bound, removed ones unbound, changed ones
                     bound again. A file that does not parse is logged
                     (file:line:field) and the running config is kept; a
                     change to edge, server_name, ca_file, credential,
                     [session] or [reconnect] takes a restart (a warning
                     says so)

systemd:
  Run it as Type=notify (systemd/tetherd.service): READY=1 once the config
  and the credential are validated and the first dial starts, STATUS= lines
  for systemctl status (\"connected to edge.example.com:7443, 2 endpoints\",
  \"reconnecting in 8.0 s: connection refused\"), RELOADING=1 and READY=1
  around a reload, STOPPING=1 on stop, and WATCHDOG=1 from the daemon's
  event loop when WatchdogSec= is set.

Exit status:
  0    stopped by SIGTERM or SIGINT; or --help, --version
  64   a usage or configuration error, before any dial: an unknown or
       missing argument; a config file that cannot be read or is invalid;
       running as root without --allow-root; a credential file that is
       missing, unreadable, open to group or others, or without a token on
       its first line; a ca_file that cannot be read or holds no usable CA
       certificate; no usable TLS server name
  71   the signal handlers could not be installed

Options:
  -c, --config FILE  the config file (TOML), read once at start. Required:
                     there is no default path.
      --allow-root   run even when the effective uid is 0 (refused otherwise)
  -h, --help         print this text and exit 0
  -V, --version      print the build line (name, version, architecture) and
                     exit 0

Files:
  FILE (--config)    edge = \"host:port\" (resolved again on every dial),
                     server_name (default: the host part of edge), ca_file,
                     credential (default: $CREDENTIALS_DIRECTORY/credential),
                     state_directory (default: $STATE_DIRECTORY),
                     [reconnect], [session] and the [[endpoint]] tables;
                     relative paths are relative to FILE's directory. An
                     error in it is reported as
                     \"error: FILE:LINE: FIELD: REASON\", and a file that
                     cannot be read as
                     \"error: FILE: cannot read the config file: REASON\".
  credential         the file that credential names: the device's token on
                     its first line. Read at start, after FILE, and refused
                     when group or others may read or write it (its mode must
                     be 0600 or stricter). Never written: a rotation stores
                     the new token in the state directory instead.
  STATE/credential   the rotated credential, written atomically (0600,
                     fsync, rename, fsync of the directory) when the edge
                     offers one; presented instead of the factory one while
                     the edge accepts it, else tetherd falls back to the
                     factory credential and logs why
  ca_file            the CA certificates (PEM) that the edge's certificate
                     must chain to, read at start; without ca_file, the
                     system CA bundle: $SSL_CERT_FILE, else
                     /etc/ssl/certs/ca-certificates.crt (a build with the
                     webpki-roots feature trusts Mozilla's roots instead)

Environment:
  SSL_CERT_FILE      the system CA bundle used when ca_file is not set
  RUST_LOG           the log filter for stderr, default info: a LEVEL (error,
                     warn, info, debug, trace, off), and/or TARGET=LEVEL per
                     module path, comma-separated, e.g. RUST_LOG=debug or
                     RUST_LOG=warn,tetherd::proxy=debug; with only
                     TARGET=LEVEL, other modules log errors only
  BLOCKING_MAX_THREADS
                     set to 2 by tetherd itself (the threads DNS lookups run
                     on); a value from the environment is overridden
  NOTIFY_SOCKET      systemd's notification socket (a path or @name); unset,
                     nothing is sent
  WATCHDOG_USEC      the watchdog period: WATCHDOG=1 is sent every half of it
                     (when WATCHDOG_PID is unset or this process)
  CREDENTIALS_DIRECTORY
                     where systemd's LoadCredential= put the credentials:
                     credential, when the config names none, is
                     $CREDENTIALS_DIRECTORY/credential
  STATE_DIRECTORY    systemd's StateDirectory=: where the rotated credential
                     is kept when the config has no state_directory
  JOURNAL_STREAM     when it names stderr (device:inode), log lines start
                     with a syslog priority <N> (3 error, 4 warning, 6 info,
                     7 debug) and carry no timestamp, so that
                     journalctl -p warning works";

/// The build line: printed first on stderr at start, and by `--version`.
fn build_line() -> String {
    format!(
        "tetherd {} ({})",
        env!("CARGO_PKG_VERSION"),
        tetherd::arch()
    )
}

struct Args {
    config: PathBuf,
    allow_root: bool,
}

fn parse_args() -> Result<Args, lexopt::Error> {
    use lexopt::prelude::*;
    let mut config = None;
    let mut allow_root = false;
    let mut parser = lexopt::Parser::from_env();
    while let Some(arg) = parser.next()? {
        match arg {
            Short('c') | Long("config") => config = Some(PathBuf::from(parser.value()?)),
            Long("allow-root") => allow_root = true,
            Short('h') | Long("help") => {
                println!("{HELP}");
                std::process::exit(0);
            }
            Short('V') | Long("version") => {
                println!("{}", build_line());
                std::process::exit(0);
            }
            _ => return Err(arg.unexpected()),
        }
    }
    let config = config.ok_or(lexopt::Error::MissingValue {
        option: Some("--config".into()),
    })?;
    Ok(Args { config, allow_root })
}

fn fail(code: i32, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(code as u8)
}

fn main() -> ExitCode {
    // DNS lookups run on the `blocking` pool, which otherwise grows to 500
    // threads: two are plenty on a device. Set before anything can use it.
    std::env::set_var("BLOCKING_MAX_THREADS", "2");

    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            return fail(
                tetherd::EXIT_CONFIG,
                format_args!("{e}\n{USAGE}\n(tetherd --help for more)"),
            )
        }
    };
    tetherd::logger::init(tether_notify::stderr_is_journal());
    eprintln!("{}", build_line());

    let config = match tetherd::Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => return fail(tetherd::EXIT_CONFIG, e),
    };
    if rustix::process::geteuid().is_root() && !args.allow_root {
        return fail(
            tetherd::EXIT_CONFIG,
            "refusing to run as root (euid 0): run tetherd as an unprivileged user, or pass --allow-root",
        );
    }
    use async_signal::Signal as Sig;
    let signals = match async_signal::Signals::new([Sig::Term, Sig::Int, Sig::Hup]) {
        Ok(s) => s,
        Err(e) => return fail(71, format_args!("cannot install signal handlers: {e}")),
    };
    let signals = signals.filter_map(|sig| match sig {
        Ok(Sig::Hup) => Some(tetherd::Signal::Reload),
        Ok(sig) => {
            log::info!("received {sig:?}");
            Some(tetherd::Signal::Stop)
        }
        Err(e) => {
            log::warn!("reading signals: {e}");
            None
        }
    });
    match tetherd::run_with(config, signals, Default::default()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e.exit_code(), e),
    }
}
