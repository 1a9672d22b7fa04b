//! The store's schema migrations, on a database that the edge made before
//! schema versions existed (`tests/data/tokens-v0.db`, made by tether-edge
//! at 6af0cc5 with `token create` and `token revoke`; the tokens it printed
//! are in `tokens-v0.txt`).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use tether_edge::store::{schema_version, AuthError, SqliteStore, Store, StoreError, DB_FILE};

fn fixture() -> (tempdir::Dir, Vec<(String, String)>) {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let dir = tempdir::Dir::new("store-v0");
    std::fs::copy(data.join("tokens-v0.db"), dir.0.join(DB_FILE)).unwrap();
    let tokens = std::fs::read_to_string(data.join("tokens-v0.txt"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect();
    (dir, tokens)
}

fn token<'a>(tokens: &'a [(String, String)], key: &str) -> &'a str {
    &tokens.iter().find(|(k, _)| k == key).unwrap().1
}

mod tempdir {
    use std::path::PathBuf;

    /// A directory removed on drop.
    pub struct Dir(pub PathBuf);

    impl Dir {
        pub fn new(tag: &str) -> Dir {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let p =
                std::env::temp_dir().join(format!("tether-{tag}-{}-{nanos}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn user_version(dir: &Path) -> i64 {
    let c = rusqlite::Connection::open(dir.join(DB_FILE)).unwrap();
    c.query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn a_database_from_before_schema_versions_migrates_in_place() {
    let (dir, tokens) = fixture();
    assert_eq!(user_version(&dir.0), 0, "the fixture predates versions");
    let s = SqliteStore::open(&dir.0).unwrap();
    assert_eq!(s.user_version().unwrap(), schema_version());

    // The allow lists mean what they meant, as bind rules.
    let list = s.list().unwrap();
    assert_eq!(list.len(), 3);
    let rules: Vec<(String, String, bool)> = list
        .iter()
        .map(|t| {
            (
                t.description.clone(),
                t.scope.rules.to_string(),
                t.revoked_at.is_some(),
            )
        })
        .collect();
    assert!(
        rules.contains(&("any".into(), "*".into(), false)),
        "{rules:?}"
    );
    assert!(
        rules.contains(&("web and ssh".into(), "web,ssh".into(), false)),
        "{rules:?}"
    );
    assert!(
        rules.contains(&("gone".into(), "cam".into(), true)),
        "{rules:?}"
    );
    assert!(list.iter().all(|t| t.scope.sources.is_empty()));

    // The credentials the old edge printed still authenticate (or are still revoked).
    let any = s.verify(token(&tokens, "any")).unwrap();
    assert!(any.scope().rules.permitting("anything.at.all").is_some());
    let web = s.verify(token(&tokens, "webssh")).unwrap();
    assert!(web.scope().rules.permitting("web").is_some());
    assert!(web.scope().rules.permitting("ssh").is_some());
    assert!(web.scope().rules.permitting("db").is_none());
    assert!(matches!(
        s.verify(token(&tokens, "gone")),
        Err(AuthError::Revoked(_))
    ));
    drop(s);

    // Opening again migrates nothing and changes nothing.
    let s = SqliteStore::open(&dir.0).unwrap();
    assert_eq!(s.list().unwrap().len(), 3);
    assert_eq!(s.user_version().unwrap(), schema_version());
}

#[test]
fn a_migration_that_fails_leaves_the_database_as_it_was() {
    let (dir, tokens) = fixture();
    {
        let c = rusqlite::Connection::open(dir.0.join(DB_FILE)).unwrap();
        c.execute(
            "UPDATE tokens SET allow = 'Not A Name' WHERE description = 'any'",
            [],
        )
        .unwrap();
    }
    let e = SqliteStore::open(&dir.0).unwrap_err();
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("Not A Name") && text.contains("does not migrate"),
        "{text}"
    );
    assert_eq!(user_version(&dir.0), 0, "nothing migrated");
    let c = rusqlite::Connection::open(dir.0.join(DB_FILE)).unwrap();
    let allow: String = c
        .query_row(
            "SELECT allow FROM tokens WHERE description = 'web and ssh'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(allow, "web,ssh", "the old column is still there, unchanged");
    // Fixed by hand, it migrates.
    c.execute(
        "UPDATE tokens SET allow = '*' WHERE description = 'any'",
        [],
    )
    .unwrap();
    drop(c);
    let s = SqliteStore::open(&dir.0).unwrap();
    assert!(s.verify(token(&tokens, "any")).is_ok());
}

#[test]
fn a_fresh_database_and_a_migrated_one_have_the_same_schema() {
    let (old, _) = fixture();
    drop(SqliteStore::open(&old.0).unwrap());
    let fresh = tempdir::Dir::new("store-fresh");
    drop(SqliteStore::open(&fresh.0).unwrap());
    let schema = |dir: &PathBuf| -> Vec<(String, String)> {
        let c = rusqlite::Connection::open(dir.join(DB_FILE)).unwrap();
        let mut st = c
            .prepare("SELECT name, type FROM sqlite_master ORDER BY name")
            .unwrap();
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let mut cols = Vec::new();
        for (name, kind) in rows {
            if kind == "table" {
                let mut st = c.prepare(&format!("PRAGMA table_info({name})")).unwrap();
                let names: Vec<String> = st
                    .query_map([], |r| r.get::<_, String>(1))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap();
                let mut names = names;
                names.sort();
                cols.push((name, names.join(",")));
            } else {
                cols.push((name, kind));
            }
        }
        cols
    };
    assert_eq!(schema(&old.0), schema(&fresh.0));
}
