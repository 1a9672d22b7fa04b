//! The real `tetherd` binary explains itself: `--version` prints the build
//! line that a run prints first, `--help` names every flag, file, stdout
//! line, signal and exit code, and a file that cannot be read is reported as
//! `error: <path>: <what>: <why>`, without a line or field it does not have.

mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::{daemon_config, output_within, tetherd, TempDir, EXIT_WITHIN};

/// Runs `tetherd args` to its exit: (exit code, stdout, stderr).
fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = output_within(&mut tetherd(args), EXIT_WITHIN);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn utf8(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// What the OS says when `path` is read: the `<why>` of the message.
fn read_error(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("{} is readable", path.display()),
    }
}

/// The `error: ` line of `stderr`, checked to carry no invented location.
fn error_line(stderr: &str) -> &str {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line in:\n{stderr}"));
    assert!(
        !line.contains(":1:") && !line.contains(" -: "),
        "no line number or `-` field for a whole file: {line}"
    );
    line
}

#[test]
fn version_prints_the_build_line_that_a_run_prints_first_and_exits_0() {
    let dir = TempDir::new("cli-version");
    // Any run prints the build line first on stderr, before it reads the config.
    let (_, _, stderr) = run(&["--config", utf8(&dir.path("none.toml"))]);
    let build_line = stderr.lines().next().expect("a first stderr line");
    assert!(
        build_line.starts_with(&format!("tetherd {} (", env!("CARGO_PKG_VERSION"))),
        "the build line names program and crate version: {build_line:?}"
    );
    for flag in ["--version", "-V"] {
        let (code, stdout, stderr) = run(&[flag]);
        assert_eq!(code, Some(0), "{flag}: {stderr}");
        assert_eq!(stdout, format!("{build_line}\n"), "{flag}");
    }
}

#[test]
fn help_names_every_flag_file_stdout_line_signal_and_exit_code() {
    let (code, help, stderr) = run(&["--help"]);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, short, _) = run(&["-h"]);
    assert_eq!((code, short.as_str()), (Some(0), help.as_str()), "-h");
    let exit_config = format!("  {}   ", tetherd::EXIT_CONFIG);
    for want in [
        // help2man's layout (scripts/man): a Usage line, then option lines.
        "Usage: tetherd --config FILE [--allow-root]",
        "\nOptions:\n",
        "  -c, --config FILE ",
        "      --allow-root ",
        "  -h, --help ",
        "  -V, --version ",
        "there is no default path",
        // Files: the config, the credential and the CA file.
        "\nFiles:\n",
        "credential",
        "0600",
        "ca_file",
        "error: FILE:LINE: FIELD: REASON",
        "error: FILE: cannot read the config file: REASON",
        // The stdout lines (README, "Machine-readable output").
        "CONNECTED <edge ip:port> session=<n>",
        "BOUND <endpoint> <url>",
        // Signals: the two it handles and the one people expect.
        "SIGTERM, SIGINT ",
        "GOAWAY(NO_ERROR)",
        "SIGHUP",
        // Every exit code the program uses.
        "\nExit status:\n",
        "  0    ",
        &exit_config,
        "  71   ",
        "--allow-root; a credential file",
        // The environment.
        "\nEnvironment:\n",
        "RUST_LOG",
        "BLOCKING_MAX_THREADS",
    ] {
        assert!(help.contains(want), "--help lacks {want:?}:\n{help}");
    }
    for line in help.lines() {
        assert!(
            line.chars().count() <= 79,
            "a line over 79 columns: {line:?}"
        );
    }
}

#[test]
fn an_unreadable_config_file_is_named_without_a_line_or_field_and_exits_64() {
    let dir = TempDir::new("cli-noconfig");
    // A missing file, and a directory where the file should be.
    for path in [dir.path("nonexistent.toml"), dir.path("")] {
        let (code, _, stderr) = run(&["--config", utf8(&path)]);
        assert_eq!(code, Some(64), "{stderr}");
        assert_eq!(
            error_line(&stderr),
            format!(
                "error: {}: cannot read the config file: {}",
                path.display(),
                read_error(&path)
            )
        );
    }
}

#[test]
fn a_missing_credential_file_is_named_without_a_line_or_field_and_exits_64() {
    let dir = TempDir::new("cli-nocred");
    let nobody: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    // The credential is read before the CA file or any dial.
    let config = daemon_config(&dir, nobody, "", nobody, "");
    let cred = dir.path("credential");
    std::fs::remove_file(&cred).expect("remove the credential");
    let (code, _, stderr) = run(&["--config", utf8(&config), "--allow-root"]);
    assert_eq!(code, Some(64), "{stderr}");
    assert_eq!(
        error_line(&stderr),
        format!(
            "error: {}: cannot read the credential file: {}",
            cred.display(),
            read_error(&cred)
        )
    );
}
