//! `tether-edge`: parse the arguments ([`cli`], clap), start logging, then
//! run the server (the config loaded first: exit 64 with file, line and
//! field on error; SIGTERM/SIGINT wired to a graceful shutdown), provision
//! ([`provision`]), or an operator command on the API or the store
//! ([`cli::backend`]).
//!
//! The help text is the reference for commands, flags, stdout lines,
//! signals, exit codes and environment (`scripts/man` turns it into
//! tether-edge(8) and a page per command); keep it true to the code.

mod cli;
mod provision;

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _};
use futures_lite::StreamExt;
use tether_edge::client::{ApiKey, ApiUrl, Client};
use tether_edge::events::EventKind;
use tether_edge::listing::{
    apikey_table, endpoint_table, event_table, format_time, session_table, token_table,
};
use tether_edge::scope::{parse_sources, Rules, Scope};
use tether_edge::store::{ApiKeyId, Role, SqliteStore, TokenId, TokenUpdate};
use tether_edge::{wire, Config};

use cli::backend::{Api, Backend, EventFilter, Failed, Offline};
use cli::{ApiKeyCmd, Cli, Command, EndpointCmd, EventCmd, Global, Output, SessionCmd, TokenCmd};

/// EX_USAGE / EX_CONFIG-style exit code for bad arguments or config.
const EXIT_USAGE: u8 = 64;

/// A usage or configuration error (exit 64).
struct Usage(String);

/// The build line: printed first on stderr by `serve`, and by `--version`.
fn build_line() -> String {
    format!(
        "tether-edge {} ({})",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH
    )
}

fn main() -> ExitCode {
    // clap prints "NAME VERSION": the version is the rest of the build line.
    let version: &'static str = Box::leak(
        format!("{} ({})", env!("CARGO_PKG_VERSION"), std::env::consts::ARCH).into_boxed_str(),
    );
    let matches = match Cli::command().version(version).try_get_matches() {
        Ok(m) => m,
        Err(e) => return clap_exit(&e),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => return clap_exit(&e),
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(Usage(e)) => {
            eprintln!("error: {e}\n(tether-edge --help, or COMMAND --help, for more)");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// `--help` and `--version` exit 0 on stdout; every parse error 64.
fn clap_exit(e: &clap::Error) -> ExitCode {
    let _ = e.print();
    if e.use_stderr() {
        ExitCode::from(EXIT_USAGE)
    } else {
        ExitCode::SUCCESS
    }
}

fn load(g: &Global, what: &str) -> Result<Config, Usage> {
    let path = g
        .config
        .as_ref()
        .ok_or_else(|| Usage(format!("{what} needs --config FILE")))?;
    Config::load(path).map_err(|e| Usage(e.to_string()))
}

fn run(cli: Cli) -> Result<ExitCode, Usage> {
    let g = &cli.global;
    let command = match cli.command {
        None | Some(Command::Serve) => {
            eprintln!("{}", build_line());
            return Ok(serve(load(g, "serve")?));
        }
        Some(Command::Provision(opts)) => {
            let cfg = load(g, "provision")?;
            return Ok(match provision::run(*opts, &cfg.state_dir) {
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
            });
        }
        Some(c) => c,
    };
    let op = Op::parse(command)?;
    let mut backend: Box<dyn Backend> = if g.offline {
        let cfg = load(g, "--offline")?;
        let store = SqliteStore::open(&cfg.state_dir).map_err(|e| {
            Usage(format!(
                "--offline: the store in {}: {e}",
                cfg.state_dir.display()
            ))
        })?;
        Box::new(Offline(store))
    } else {
        Box::new(Api(client(g, !matches!(op, Op::Status))?))
    };
    Ok(match op.run(backend.as_mut(), g.output) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failed(e)) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    })
}

/// The API client that `g` describes; `need_key`: the command needs a key.
fn client(g: &Global, need_key: bool) -> Result<Client, Usage> {
    let (url, ca) = match (&g.api, &g.config) {
        (Some(u), _) => (
            ApiUrl::parse(u).map_err(|e| Usage(format!("--api {e}")))?,
            g.api_ca.clone(),
        ),
        (None, Some(_)) => {
            let cfg = load(g, "the API's address")?;
            let Some(api) = cfg.api else {
                return Err(Usage(format!(
                    "{} has no [api]: give the API's address with --api URL (or TETHER_API_URL), or work on the store with --offline",
                    g.config.as_ref().map_or(String::new(), |p| p.display().to_string())
                )));
            };
            (
                ApiUrl::of_listener(&api.listen, api.cert.is_some()),
                g.api_ca.clone().or(api.cert),
            )
        }
        (None, None) => {
            return Err(Usage(
                "no API address: give --api URL (or TETHER_API_URL), or --config FILE of an edge with [api]; or --offline --config FILE to work on the store".into(),
            ))
        }
    };
    let key = match (&g.api_key_file, std::env::var("TETHER_API_KEY")) {
        (Some(f), _) => {
            let from = f.display().to_string();
            let text = std::fs::read_to_string(f)
                .map_err(|e| Usage(format!("--api-key-file {from}: {e}")))?;
            if let Ok(m) = std::fs::metadata(f) {
                let mode = m.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    eprintln!(
                        "warning: {from} is readable by others (mode {mode:04o}); chmod 600 it"
                    );
                }
            }
            Some(ApiKey::parse(&text, &from).map_err(Usage)?)
        }
        (None, Ok(k)) => Some(ApiKey::parse(&k, "TETHER_API_KEY").map_err(Usage)?),
        (None, Err(_)) => None,
    };
    if need_key && key.is_none() {
        return Err(Usage(
            "no API key: give --api-key-file FILE, or set TETHER_API_KEY_FILE or TETHER_API_KEY (the first admin key comes from apikey create --role admin --offline)".into(),
        ));
    }
    Ok(Client::new(url, key, ca))
}

/// An operator command, its arguments checked (a bad one is a usage
/// error, on either backend, before anything is sent or written).
enum Op {
    CreateToken(String, Scope),
    UpdateToken(TokenId, TokenUpdate),
    GetToken(TokenId),
    ListTokens,
    RevokeToken(TokenId),
    RotateToken(TokenId),
    CreateKey(Role, String),
    ListKeys,
    RevokeKey(ApiKeyId),
    ListEndpoints,
    Release(String),
    ListSessions(Option<TokenId>),
    ListEvents(EventFilter),
    Status,
}

fn token_id(id: &str) -> Result<TokenId, Usage> {
    TokenId::parse(id.strip_prefix("tk_").unwrap_or(id))
        .ok_or_else(|| Usage(format!("{id:?} is not a token id (tk_ and 12 hex digits)")))
}

/// `--allow` values as rules; a bad one is a usage error naming it.
fn rules_arg(allow: &[String]) -> Result<Rules, Usage> {
    Rules::parse(allow).map_err(|e| Usage(format!("--allow {e}")))
}

/// `--source` values as networks; a bad one is a usage error naming it.
fn sources_arg(sources: &[String]) -> Result<Vec<ipnet::IpNet>, Usage> {
    parse_sources(sources).map_err(|e| Usage(format!("--source {e}")))
}

impl Op {
    fn parse(c: Command) -> Result<Op, Usage> {
        Ok(match c {
            Command::Token(TokenCmd::Create(a)) => {
                if a.allow.is_empty() {
                    // Fail closed: a forgotten flag must not mint a
                    // credential that may claim any device's endpoint.
                    return Err(Usage(
                        "token create needs --allow RULE (repeatable), or --allow '*' to allow every endpoint".into(),
                    ));
                }
                let scope = Scope {
                    rules: rules_arg(&a.allow)?,
                    sources: sources_arg(&a.sources)?,
                };
                Op::CreateToken(a.description.unwrap_or_default(), scope)
            }
            Command::Token(TokenCmd::Update {
                id,
                scope: a,
                any_source,
            }) => {
                let change = TokenUpdate {
                    description: a.description,
                    rules: if a.allow.is_empty() {
                        None
                    } else {
                        Some(rules_arg(&a.allow)?)
                    },
                    sources: if any_source {
                        Some(Vec::new())
                    } else if a.sources.is_empty() {
                        None
                    } else {
                        Some(sources_arg(&a.sources)?)
                    },
                };
                if change.description.is_none()
                    && change.rules.is_none()
                    && change.sources.is_none()
                {
                    return Err(Usage(
                        "token update needs --description, --allow, --source or --any-source"
                            .into(),
                    ));
                }
                Op::UpdateToken(token_id(&id)?, change)
            }
            Command::Token(TokenCmd::Get { id }) => Op::GetToken(token_id(&id)?),
            Command::Token(TokenCmd::List) => Op::ListTokens,
            Command::Token(TokenCmd::Revoke { id }) => Op::RevokeToken(token_id(&id)?),
            Command::Token(TokenCmd::Rotate { id }) => Op::RotateToken(token_id(&id)?),
            Command::Apikey(ApiKeyCmd::Create { role, description }) => Op::CreateKey(
                Role::parse(&role)
                    .ok_or_else(|| Usage(format!("--role {role:?}: need read or admin")))?,
                description.unwrap_or_default(),
            ),
            Command::Apikey(ApiKeyCmd::List) => Op::ListKeys,
            Command::Apikey(ApiKeyCmd::Revoke { id }) => {
                Op::RevokeKey(ApiKeyId::parse(&id).ok_or_else(|| {
                    Usage(format!(
                        "{id:?} is not an API key id (ak_ and 12 hex digits)"
                    ))
                })?)
            }
            Command::Endpoint(EndpointCmd::List) => Op::ListEndpoints,
            Command::Endpoint(EndpointCmd::Release { name }) => {
                if !tether_proto::valid_endpoint_name(&name) {
                    return Err(Usage(format!(
                        "{name:?} is not an endpoint name (DNS labels of lowercase letters, digits and inner '-')"
                    )));
                }
                Op::Release(name)
            }
            Command::Session(SessionCmd::List { token }) => {
                Op::ListSessions(token.as_deref().map(token_id).transpose()?)
            }
            Command::Event(EventCmd::List {
                kind,
                token,
                since,
                limit,
            }) => Op::ListEvents(EventFilter {
                kind: kind
                    .map(|k| {
                        EventKind::parse(&k).ok_or_else(|| {
                            let all: Vec<&str> =
                                EventKind::ALL.iter().map(|k| k.as_str()).collect();
                            Usage(format!("--kind {k:?} is not one of {}", all.join(", ")))
                        })
                    })
                    .transpose()?,
                token: token.as_deref().map(token_id).transpose()?,
                since_ms: match since {
                    Some(s) if s < 0 => {
                        return Err(Usage(format!("--since {s}: need Unix milliseconds")))
                    }
                    s => s,
                },
                limit: usize::from(limit),
            }),
            Command::Status => Op::Status,
            Command::Serve | Command::Provision(_) => {
                return Err(Usage("not an operator command".into()))
            }
        })
    }

    /// Runs the command on `b` and prints what it gives.
    fn run(self, b: &mut dyn Backend, out: Output) -> Result<(), Failed> {
        match self {
            Op::CreateToken(description, scope) => {
                let t = b.create_token(&description, &scope)?;
                eprintln!("created token {} ({})", t.token.id, summary(&t.token));
                show(out, &t, || format!("{}\n", t.secret))
            }
            Op::UpdateToken(id, change) => {
                let t = b.update_token(&id, &change)?;
                eprintln!("updated token {} ({})", t.id, summary(&t));
                show(out, &t, String::new)
            }
            Op::GetToken(id) => {
                let t = b.get_token(&id)?;
                show(out, &t, || token_table(std::slice::from_ref(&t)))
            }
            Op::ListTokens => {
                let v = b.list_tokens()?;
                show(out, &v, || token_table(&v))
            }
            Op::RevokeToken(id) => {
                let t = b.revoke_token(&id)?;
                eprintln!(
                    "token {} is revoked (since {}); running edges close its sessions within 1 s",
                    t.id,
                    t.revoked_at.map_or_else(|| "-".to_owned(), format_time)
                );
                show(out, &t, String::new)
            }
            Op::RotateToken(id) => {
                let t = b.rotate_token(&id)?;
                eprintln!(
                    "rotation of token {} requested: the edge offers the device a successor when it is connected",
                    t.id
                );
                show(out, &t, String::new)
            }
            Op::CreateKey(role, description) => {
                let k = b.create_api_key(role, &description)?;
                eprintln!("created API key {} (role {})", k.key.id, k.key.role);
                show(out, &k, || format!("{}\n", k.secret))
            }
            Op::ListKeys => {
                let v = b.list_api_keys()?;
                show(out, &v, || apikey_table(&v))
            }
            Op::RevokeKey(id) => {
                let k = b.revoke_api_key(&id)?;
                eprintln!("API key {} is revoked", k.id);
                show(out, &k, String::new)
            }
            Op::ListEndpoints => {
                let v = b.list_endpoints()?;
                show(out, &v, || endpoint_table(&v))
            }
            Op::Release(name) => {
                let r = b.release_endpoint(&name)?;
                eprintln!(
                    "released endpoint {} (was owned by token {})",
                    r.name, r.released_from
                );
                show(out, &r, String::new)
            }
            Op::ListSessions(token) => {
                let v = b.list_sessions(token.as_ref())?;
                show(out, &v, || session_table(&v))
            }
            Op::ListEvents(f) => {
                let v = b.list_events(&f)?;
                show(out, &v, || event_table(&v))
            }
            Op::Status => {
                let h = b.health()?;
                show(out, &h, || {
                    format!(
                        "{}: tether-edge {}, up {} s, {} sessions, {} endpoints bound\n",
                        h.status, h.version, h.uptime_secs, h.sessions, h.endpoints
                    )
                })
            }
        }
    }
}

/// A token's scope in one line, as the store's `Scope::summary` writes it.
fn summary(t: &wire::Token) -> String {
    if t.sources.is_empty() {
        format!("bind={}", t.allow.join(","))
    } else {
        format!("bind={} sources={}", t.allow.join(","), t.sources.join(","))
    }
}

/// Prints `v` as JSON, or `table()` as text, on stdout.
fn show<T: serde::Serialize>(
    out: Output,
    v: &T,
    table: impl FnOnce() -> String,
) -> Result<(), Failed> {
    let text = match out {
        Output::Json => {
            let mut s = serde_json::to_string_pretty(v).map_err(|e| Failed(e.to_string()))?;
            s.push('\n');
            s
        }
        Output::Table => table(),
    };
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| Failed(format!("stdout: {e}")))
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
