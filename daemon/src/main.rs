//! `tetherd --config FILE [--allow-root]`: parse the arguments, start
//! logging, print the build line, load the config, refuse root, wire
//! SIGTERM/SIGINT to a graceful stop and call [`tetherd::run`].
//!
//! Exit codes: 0 after a graceful stop, 64 for a usage or configuration
//! error (with `error: <file>:<line>: <field>: <reason>` for the config), 71
//! when the signal handlers cannot be installed.

use std::path::PathBuf;
use std::process::ExitCode;

use futures_lite::StreamExt;

const USAGE: &str = "usage: tetherd --config FILE [--allow-root]";

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
                println!("{USAGE}");
                std::process::exit(0);
            }
            Short('V') | Long("version") => {
                println!("tetherd {}", env!("CARGO_PKG_VERSION"));
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
        Err(e) => return fail(tetherd::EXIT_CONFIG, format_args!("{e}\n{USAGE}")),
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    eprintln!(
        "tetherd {} ({})",
        env!("CARGO_PKG_VERSION"),
        tetherd::arch()
    );

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
    let signals =
        match async_signal::Signals::new([async_signal::Signal::Term, async_signal::Signal::Int]) {
            Ok(s) => s,
            Err(e) => return fail(71, format_args!("cannot install signal handlers: {e}")),
        };
    let shutdown = async move {
        let mut signals = signals;
        if let Some(Ok(sig)) = signals.next().await {
            log::info!("received {sig:?}");
        }
    };
    match tetherd::run(config, shutdown) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e.exit_code(), e),
    }
}
