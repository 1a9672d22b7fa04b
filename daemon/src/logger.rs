//! tetherd's log output: a `log::Log` on stderr, filtered by `RUST_LOG`.
//!
//! It takes env_logger's place (which cost 10.5 KiB of armv7 .text with
//! env_filter, 4 % of the size budget's margin) and keeps its line format and
//! the part of its filter syntax a device needs:
//!
//! - `RUST_LOG=LEVEL` (`error`, `warn`, `info`, `debug`, `trace`, `off`);
//! - `RUST_LOG=TARGET=LEVEL,...`: a level per module path prefix (the
//!   longest matching prefix wins, at `::` boundaries), with a bare LEVEL
//!   in the list as the default. Unset or empty: `info`.
//!
//! A directive that does not parse is reported once on stderr and skipped,
//! as env_logger does. Lines are `[LEVEL target] message`, or, when stderr
//! is the journal, `<N>target: message` with the syslog priority.

use std::io::Write;

use log::{LevelFilter, Log, Metadata, Record};

/// The parsed `RUST_LOG`.
#[derive(Debug, PartialEq, Eq)]
pub struct Filter {
    default: LevelFilter,
    /// (module path prefix, level), longest prefix first.
    targets: Vec<(String, LevelFilter)>,
}

impl Filter {
    /// Parses a `RUST_LOG` value; returns the filter and the directives
    /// that were skipped.
    pub fn parse(spec: &str) -> (Filter, Vec<String>) {
        let mut f = Filter {
            default: LevelFilter::Info,
            targets: Vec::new(),
        };
        let mut bad = Vec::new();
        let mut default_set = false;
        for d in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            match d.split_once('=') {
                None => match d.parse::<LevelFilter>() {
                    Ok(l) => {
                        f.default = l;
                        default_set = true;
                    }
                    // A bare module path: everything from it.
                    Err(_) if valid_target(d) => f.targets.push((d.to_owned(), LevelFilter::Trace)),
                    Err(_) => bad.push(d.to_owned()),
                },
                Some((t, l)) => match (valid_target(t), l.trim().parse::<LevelFilter>()) {
                    (true, Ok(l)) => f.targets.push((t.trim().to_owned(), l)),
                    _ => bad.push(d.to_owned()),
                },
            }
        }
        if !default_set && !f.targets.is_empty() {
            // Only module directives: other modules log errors only (where
            // env_logger turns them off: an error from rustls still matters
            // on a device).
            f.default = LevelFilter::Error;
        }
        f.targets.sort_by_key(|t| std::cmp::Reverse(t.0.len()));
        (f, bad)
    }

    /// The level allowed for `target`.
    pub fn level_for(&self, target: &str) -> LevelFilter {
        for (prefix, level) in &self.targets {
            if let Some(rest) = target.strip_prefix(prefix.as_str()) {
                if rest.is_empty() || rest.starts_with("::") {
                    return *level;
                }
            }
        }
        self.default
    }

    /// The most verbose level anything may log at (for `log::set_max_level`).
    pub fn max(&self) -> LevelFilter {
        self.targets
            .iter()
            .map(|t| t.1)
            .fold(self.default, |a, b| a.max(b))
    }
}

fn valid_target(t: &str) -> bool {
    let t = t.trim();
    !t.is_empty()
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

struct Logger {
    filter: Filter,
    journal: bool,
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= self.filter.level_for(m.target())
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let mut err = std::io::stderr().lock();
        // A full or closed stderr must not take the daemon down.
        let _ = if self.journal {
            let prio = tether_notify::journal_priority(r.level() as usize);
            writeln!(err, "<{prio}>{}: {}", r.target(), r.args())
        } else {
            writeln!(err, "[{:<5} {}] {}", r.level(), r.target(), r.args())
        };
    }

    fn flush(&self) {}
}

/// Installs the logger: `RUST_LOG` (default `info`), journal priorities when
/// `journal`.
pub fn init(journal: bool) {
    let spec = std::env::var("RUST_LOG").unwrap_or_default();
    let (filter, bad) = Filter::parse(&spec);
    for d in bad {
        eprintln!("warning: RUST_LOG: ignoring `{d}` (not LEVEL, TARGET or TARGET=LEVEL)");
    }
    let max = filter.max();
    // Installed once, for the life of the process.
    let logger: &'static Logger = Box::leak(Box::new(Logger { filter, journal }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_reads_as_env_loggers_common_forms() {
        let (f, bad) = Filter::parse("");
        assert!(bad.is_empty());
        assert_eq!(f.level_for("tetherd"), LevelFilter::Info);
        assert_eq!(f.level_for("rustls::client"), LevelFilter::Info);

        let (f, _) = Filter::parse("debug");
        assert_eq!(f.level_for("tetherd::tunnel"), LevelFilter::Debug);
        assert_eq!(f.max(), LevelFilter::Debug);

        let (f, bad) = Filter::parse("warn, tetherd=debug ,tetherd::proxy=trace");
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(f.level_for("tetherd"), LevelFilter::Debug);
        assert_eq!(f.level_for("tetherd::tunnel"), LevelFilter::Debug);
        assert_eq!(f.level_for("tetherd::proxy"), LevelFilter::Trace);
        // A prefix matches at `::` boundaries only.
        assert_eq!(f.level_for("tetherdx"), LevelFilter::Warn);
        assert_eq!(f.level_for("rustls"), LevelFilter::Warn);
        assert_eq!(f.max(), LevelFilter::Trace);

        // Only module directives: the rest logs errors only.
        let (f, _) = Filter::parse("tetherd=debug");
        assert_eq!(f.level_for("tetherd::dial"), LevelFilter::Debug);
        assert_eq!(f.level_for("rustls"), LevelFilter::Error);

        // A bare module path: all of it.
        let (f, _) = Filter::parse("info,tetherd::proxy");
        assert_eq!(f.level_for("tetherd::proxy"), LevelFilter::Trace);
        assert_eq!(f.level_for("tetherd"), LevelFilter::Info);

        let (f, _) = Filter::parse("off");
        assert_eq!(f.max(), LevelFilter::Off);
    }

    #[test]
    fn a_bad_directive_is_skipped_and_named() {
        let (f, bad) = Filter::parse("tetherd=loud,debug,a b,=info");
        assert_eq!(bad, ["tetherd=loud", "a b", "=info"]);
        assert_eq!(f.level_for("tetherd"), LevelFilter::Debug);
    }
}
