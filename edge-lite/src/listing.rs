//! What the CLI's `list` commands print: tables of the API's JSON types
//! ([`crate::wire`]), whether they came from the API or, offline, from the
//! store, and their timestamps (UTC, ISO 8601). Never a secret: none of
//! these types has one.

use std::fmt::Write as _;

use crate::wire::{ApiKey, Endpoint, Event, Session, Token};

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
pub fn format_time(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Unix milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC).
pub fn format_time_ms(unix_ms: i64) -> String {
    let t = format_time(unix_ms.div_euclid(1000));
    format!("{}.{:03}Z", &t[..t.len() - 1], unix_ms.rem_euclid(1000))
}

fn opt_time(t: Option<i64>) -> String {
    t.map_or_else(|| "-".to_owned(), format_time)
}

fn opt<T: ToString>(v: Option<&T>) -> String {
    v.map_or_else(|| "-".to_owned(), T::to_string)
}

/// A free-text cell: `-` when empty, control characters escaped (a
/// description must not rewrite the terminal).
fn text(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.escape_debug().to_string()
    }
}

/// A list cell: comma-separated, or `empty` when there is nothing.
fn list(v: &[String], empty: &str) -> String {
    if v.is_empty() {
        empty.to_owned()
    } else {
        v.join(",")
    }
}

/// The `token list` table: id, description, bind rules, sources, created,
/// last seen, revoked, rotation.
pub fn token_table(tokens: &[Token]) -> String {
    let header = [
        "ID",
        "DESCRIPTION",
        "BIND",
        "SOURCES",
        "CREATED",
        "LAST SEEN",
        "REVOKED",
        "ROTATION",
    ]
    .map(str::to_owned);
    let rows: Vec<[String; 8]> = tokens
        .iter()
        .map(|t| {
            [
                t.id.clone(),
                text(&t.description),
                list(&t.allow, "-"),
                list(&t.sources, "any"),
                format_time(t.created_at),
                opt_time(t.last_seen_at),
                opt_time(t.revoked_at),
                rotation(t),
            ]
        })
        .collect();
    table(&header, &rows)
}

/// A token's part in a rotation, for the table.
fn rotation(t: &Token) -> String {
    match (&t.replaced_by, &t.rotated_from) {
        (Some(by), _) => format!("replaced by {by}"),
        (None, Some(from)) if t.pending => format!("pending successor of {from}"),
        _ if t.rotation_requested_at.is_some() => "requested".to_owned(),
        (None, Some(from)) => format!("successor of {from}"),
        (None, None) => "-".to_owned(),
    }
}

/// The `endpoint list` table: name, kind, owner token, since (claimed),
/// and, from a running edge, the URL and the session serving it.
pub fn endpoint_table(endpoints: &[Endpoint]) -> String {
    let header = ["ENDPOINT", "KIND", "OWNER", "SINCE", "URL", "SESSION"].map(str::to_owned);
    let rows: Vec<[String; 6]> = endpoints
        .iter()
        .map(|e| {
            [
                e.name.clone(),
                opt(e.kind.as_ref()),
                opt(e.owner_token_id.as_ref()),
                opt_time(e.claimed_at),
                opt(e.url.as_ref()),
                opt(e.session_id.as_ref()),
            ]
        })
        .collect();
    table(&header, &rows)
}

/// The `apikey list` table: id, role, description, created (and by whom),
/// last used, revoked.
pub fn apikey_table(keys: &[ApiKey]) -> String {
    let header = [
        "ID",
        "ROLE",
        "DESCRIPTION",
        "CREATED",
        "BY",
        "LAST USED",
        "REVOKED",
    ]
    .map(str::to_owned);
    let rows: Vec<[String; 7]> = keys
        .iter()
        .map(|k| {
            [
                k.id.clone(),
                k.role.clone(),
                text(&k.description),
                format_time(k.created_at),
                k.created_by.clone().unwrap_or_else(|| "offline".to_owned()),
                opt_time(k.last_used_at),
                opt_time(k.revoked_at),
            ]
        })
        .collect();
    table(&header, &rows)
}

/// The `session list` table: id, token, remote address, agent and arch,
/// connected since, endpoints, open streams, bytes each way.
pub fn session_table(sessions: &[Session]) -> String {
    let header = [
        "ID",
        "TOKEN",
        "REMOTE",
        "AGENT",
        "ARCH",
        "SINCE",
        "ENDPOINTS",
        "STREAMS",
        "BYTES UP",
        "BYTES DOWN",
    ]
    .map(str::to_owned);
    let rows: Vec<[String; 10]> = sessions
        .iter()
        .map(|s| {
            [
                s.id.to_string(),
                s.token_id.clone(),
                s.remote.clone(),
                text(&s.agent),
                text(&s.arch),
                format_time(s.connected_at),
                list(&s.endpoints, "-"),
                s.open_streams.to_string(),
                s.bytes_up.to_string(),
                s.bytes_down.to_string(),
            ]
        })
        .collect();
    table(&header, &rows)
}

/// The `event list` table: seq, time, kind, token, session, remote,
/// endpoint, API key, detail.
pub fn event_table(events: &[Event]) -> String {
    let header = [
        "SEQ", "TIME", "KIND", "TOKEN", "SESSION", "REMOTE", "ENDPOINT", "KEY", "DETAIL",
    ]
    .map(str::to_owned);
    let rows: Vec<[String; 9]> = events
        .iter()
        .map(|e| {
            [
                e.seq.to_string(),
                format_time_ms(e.at_ms),
                e.kind.clone(),
                opt(e.token_id.as_ref()),
                opt(e.session_id.as_ref()),
                opt(e.remote.as_ref()),
                opt(e.endpoint.as_ref()),
                opt(e.api_key_id.as_ref()),
                text(&e.detail),
            ]
        })
        .collect();
    table(&header, &rows)
}

/// Columns padded to their widest cell, two spaces apart.
fn table<const N: usize>(header: &[String; N], rows: &[[String; N]]) -> String {
    let mut width = [0usize; N];
    for r in std::iter::once(header).chain(rows) {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(header).chain(rows) {
        let mut line = String::new();
        for (i, (w, c)) in width.iter().zip(r).enumerate() {
            if i + 1 == N {
                line.push_str(c);
            } else {
                let _ = write!(line, "{c:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_iso8601() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_time(1_795_603_718), "2026-11-25T10:48:38Z");
        assert_eq!(
            format_time_ms(1_795_603_718_042),
            "2026-11-25T10:48:38.042Z"
        );
        assert_eq!(format_time_ms(-1), "1969-12-31T23:59:59.999Z");
    }
}
