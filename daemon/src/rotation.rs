//! Remote rotation, the device's half (DESIGN.md invariant 5, PROTOCOL.md
//! section 5.3): which credential to present, and storing the one the edge
//! offers.
//!
//! Two credentials may exist. The factory one stays where it was
//! provisioned (`credential`, or systemd's `LoadCredential=`), read-only:
//! tetherd never writes it, so a read-only root file system works. A
//! rotated one lives in the state directory (`state_directory`, or
//! `$STATE_DIRECTORY`) as [`ROTATED`]; it wins while the edge accepts it.
//! When the edge refuses the one presented (unknown or revoked: say its
//! database was restored from an older backup), the next dial presents the
//! other, and says why.
//!
//! An offer is stored atomically: [`TEMP`] written with mode 0600 and
//! fsynced, renamed over [`ROTATED`], the directory fsynced, then the file
//! read back; only then does the session answer `RotateStored` and the
//! credential become the one presented. A crash before the rename leaves
//! the old file (and a temporary that the next start removes); after it,
//! the new one. Either is valid at the edge until the device has
//! authenticated with the new one.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use log::{info, warn};

use crate::config::Credential;

/// The rotated credential's file name in the state directory.
pub const ROTATED: &str = "credential";
/// Where an offer is written before it is renamed over [`ROTATED`].
pub const TEMP: &str = "credential.tmp";

/// The credentials this run may present; see the module docs.
pub(crate) struct Credentials {
    factory: Credential,
    rotated: Option<Credential>,
    use_rotated: bool,
    /// The last dial presented the other credential after a refusal.
    switched: bool,
    dir: Option<PathBuf>,
}

/// Why an offered credential was not stored.
#[derive(Debug)]
pub(crate) enum StoreError {
    /// No state directory is configured.
    NoDirectory,
    /// The offer is not a credential, or not the token it names.
    Malformed(&'static str),
    /// Writing, syncing, renaming or reading back failed.
    Io(&'static str, PathBuf, std::io::Error),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::NoDirectory => write!(
                f,
                "no state directory (set state_directory in the config, or run under systemd with StateDirectory=)"
            ),
            StoreError::Malformed(why) => write!(f, "the offered credential is malformed: {why}"),
            StoreError::Io(what, p, e) => write!(f, "cannot {what} {}: {e}", p.display()),
        }
    }
}

impl Credentials {
    /// The factory credential, and the rotated one from `dir` when it holds
    /// a readable one (an unreadable or malformed one is named and
    /// ignored). A temporary left by a crash is removed.
    pub(crate) fn load(factory: Credential, dir: Option<PathBuf>) -> Credentials {
        let mut rotated = None;
        if let Some(d) = &dir {
            if d.is_dir() {
                info!("state directory {}", d.display());
            } else {
                warn!(
                    "state directory {}: not a directory; rotation offers will fail",
                    d.display()
                );
            }
            let temp = d.join(TEMP);
            match fs::remove_file(&temp) {
                Ok(()) => info!(
                    "removed {}: an unfinished rotation (the edge offers it again)",
                    temp.display()
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => warn!("cannot remove {}: {e}", temp.display()),
            }
            let path = d.join(ROTATED);
            if path.exists() {
                match Credential::load(&path) {
                    Ok(c) => {
                        info!(
                            "rotated credential {} from {} (factory credential {})",
                            c.id(),
                            path.display(),
                            factory.id()
                        );
                        rotated = Some(c);
                    }
                    Err(e) => warn!("{e}; presenting the factory credential"),
                }
            }
        }
        Credentials {
            use_rotated: rotated.is_some(),
            switched: false,
            factory,
            rotated,
            dir,
        }
    }

    /// The credential to present now.
    pub(crate) fn current(&self) -> &Credential {
        match &self.rotated {
            Some(r) if self.use_rotated => r,
            _ => &self.factory,
        }
    }

    /// The edge welcomed the current credential.
    pub(crate) fn accepted(&mut self) {
        self.switched = false;
    }

    /// The edge refused the current credential (`why`) before `Welcome`:
    /// the next dial presents the other one, if there is another. True
    /// when that one is worth a dial without the edge's wait (it was not
    /// refused just before).
    pub(crate) fn refused(&mut self, why: &str) -> bool {
        let Some(rotated) = &self.rotated else {
            return false;
        };
        if rotated.secret() == self.factory.secret() {
            return false;
        }
        if self.use_rotated {
            warn!(
                "the edge refused the rotated credential {} ({why}); falling back to the factory credential {}",
                rotated.id(),
                self.factory.id()
            );
        } else {
            warn!(
                "the edge refused the factory credential {} ({why}); trying the rotated credential {} again",
                self.factory.id(),
                rotated.id()
            );
        }
        self.use_rotated = !self.use_rotated;
        // Both refused in a row: the edge's wait applies.
        self.switched = !self.switched;
        self.switched
    }

    /// Stores the offered credential (`token_id`, `token`) as described in
    /// the module docs; it is the one presented from now on.
    pub(crate) fn store(&mut self, token_id: &str, token: &str) -> Result<(), StoreError> {
        let dir = self.dir.clone().ok_or(StoreError::NoDirectory)?;
        let offered = Credential::parse(token).map_err(StoreError::Malformed)?;
        if offered.id() != token_id {
            return Err(StoreError::Malformed("it is not the token the offer names"));
        }
        let temp = dir.join(TEMP);
        let path = dir.join(ROTATED);
        let io = |what, p: &Path| {
            let p = p.to_owned();
            move |e| StoreError::Io(what, p, e)
        };
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)
            .map_err(io("create", &temp))?;
        f.write_all(format!("{}\n", offered.secret()).as_bytes())
            .map_err(io("write", &temp))?;
        f.sync_all().map_err(io("fsync", &temp))?;
        drop(f);
        test_pause("temp_written");
        fs::rename(&temp, &path).map_err(io("rename into", &path))?;
        test_pause("renamed");
        fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync the directory", &dir))?;
        let back = Credential::load(&path).map_err(|e| {
            StoreError::Io(
                "read back",
                path.clone(),
                std::io::Error::other(e.to_string()),
            )
        })?;
        if back.secret() != offered.secret() {
            return Err(StoreError::Malformed("the file read back differs"));
        }
        info!(
            "stored the rotated credential {} in {} (replacing {})",
            back.id(),
            path.display(),
            self.current().id()
        );
        self.rotated = Some(back);
        self.use_rotated = true;
        test_pause("stored");
        Ok(())
    }
}

/// A pause point for the rotation crash tests, in debug builds only (the
/// release build has none): with `TETHER_TEST_PAUSE=<step>:<gate file>`,
/// reaching `step` prints `PAUSED <step>` and blocks the daemon while the
/// gate file exists, so that a test can kill it with SIGKILL exactly there,
/// or let it go on by removing the file.
pub(crate) fn test_pause(step: &str) {
    #[cfg(debug_assertions)]
    if let Some(spec) = std::env::var_os("TETHER_TEST_PAUSE") {
        let spec = spec.to_string_lossy();
        if let Some((at, gate)) = spec.split_once(':') {
            if at == step {
                crate::tunnel::stdout_line(format_args!("PAUSED {step}"));
                while Path::new(gate).exists() {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = step;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    const FACTORY: &str = "tk_000000000001.factory-secret";
    const NEXT: &str = "tk_000000000002.next-secret";

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "tetherd-rotation-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn factory() -> Credential {
        Credential::parse(FACTORY).unwrap()
    }

    #[test]
    fn an_offer_is_stored_private_and_presented_from_then_on_and_after_a_restart() {
        let d = dir();
        let mut c = Credentials::load(factory(), Some(d.clone()));
        assert_eq!(c.current().id(), "tk_000000000001");
        c.store("tk_000000000002", NEXT).unwrap();
        assert_eq!(c.current().secret(), NEXT);
        let path = d.join(ROTATED);
        assert_eq!(fs::read_to_string(&path).unwrap(), format!("{NEXT}\n"));
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!d.join(TEMP).exists());
        // A restart presents the stored one; the factory one is untouched.
        let again = Credentials::load(factory(), Some(d.clone()));
        assert_eq!(again.current().secret(), NEXT);
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_crash_before_the_rename_leaves_the_old_credential_and_the_temporary_goes() {
        let d = dir();
        fs::write(d.join(TEMP), format!("{NEXT}\n")).unwrap();
        let c = Credentials::load(factory(), Some(d.clone()));
        assert_eq!(c.current().secret(), FACTORY);
        assert!(!d.join(TEMP).exists());
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_refused_rotated_credential_falls_back_to_the_factory_one_and_back() {
        let d = dir();
        let mut c = Credentials::load(factory(), Some(d.clone()));
        assert!(!c.refused("unknown"), "nothing to fall back to");
        assert_eq!(c.current().secret(), FACTORY);
        c.store("tk_000000000002", NEXT).unwrap();
        assert!(
            c.refused("unknown token"),
            "the factory one is worth a dial now"
        );
        assert_eq!(c.current().secret(), FACTORY);
        // Both refused in a row: back to the rotated one, after the edge's wait.
        assert!(!c.refused("token revoked"));
        assert_eq!(c.current().secret(), NEXT);
        c.accepted();
        assert!(c.refused("unknown token"));
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn offers_that_cannot_be_stored_change_nothing() {
        let mut none = Credentials::load(factory(), None);
        assert!(matches!(
            none.store("tk_000000000002", NEXT),
            Err(StoreError::NoDirectory)
        ));
        let d = dir();
        let mut c = Credentials::load(factory(), Some(d.clone()));
        assert!(matches!(
            c.store("tk_000000000003", NEXT),
            Err(StoreError::Malformed(_))
        ));
        assert!(matches!(
            c.store("tk_000000000002", "tk_000000000002.bad\nsecret"),
            Err(StoreError::Malformed(_))
        ));
        assert_eq!(c.current().secret(), FACTORY);
        assert!(!d.join(ROTATED).exists());
        fs::remove_dir_all(&d).unwrap();
        // A state directory that is gone: an error naming it.
        let mut gone = Credentials::load(factory(), Some(d.clone()));
        let e = gone.store("tk_000000000002", NEXT).unwrap_err();
        assert!(e.to_string().contains(&d.display().to_string()), "{e}");
        assert_eq!(gone.current().secret(), FACTORY);
    }
}
