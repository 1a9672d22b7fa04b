//! `tetherd::run` as a library: it starts, retries, and returns on shutdown.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use tetherd::{Config, RunError};

fn setup(tag: &str, mode: u32) -> (std::path::PathBuf, Config) {
    let dir = std::env::temp_dir().join(format!("tetherd-run-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cred = dir.join("credential");
    std::fs::write(&cred, "tk_0123456789ab.secret\n").expect("write");
    std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(mode)).expect("chmod");
    // Nothing listens on the edge's port: every dial fails and is retried.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let text = format!(
        "edge = \"127.0.0.1:{port}\"\nserver_name = \"edge.test\"\ncredential = \"{}\"\n\
         [reconnect]\ninitial_backoff_ms = 20\nmax_backoff_ms = 50\n\
         [[endpoint]]\nname = \"web\"\nkind = \"tcp\"\nupstream = \"127.0.0.1:1\"\n",
        cred.display()
    );
    let config = Config::parse(Path::new("inline.toml"), &text).expect("config");
    (dir, config)
}

#[test]
fn run_returns_ok_once_shutdown_resolves() {
    let (dir, config) = setup("ok", 0o600);
    let t0 = Instant::now();
    let result = tetherd::run(config, async {
        async_io::Timer::after(Duration::from_millis(300)).await;
    });
    assert!(result.is_ok(), "{result:?}");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "{took:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn run_refuses_to_start_with_an_open_credential_file() {
    let (dir, config) = setup("open", 0o644);
    // A run that starts despite the open file returns Ok at this deadline
    // (and fails below) instead of running forever.
    let shutdown = async_io::Timer::after(Duration::from_secs(5));
    match tetherd::run(config, async move {
        shutdown.await;
    }) {
        Err(e @ RunError::Credential(_)) => {
            assert_eq!(e.exit_code(), 64);
            assert!(e.to_string().contains("mode 0644"), "{e}");
        }
        other => panic!("expected a credential error, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(dir);
}
