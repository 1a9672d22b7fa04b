//! What the `token`, `apikey` and `endpoint` subcommands print: their
//! tables and their timestamps
//! (UTC, ISO 8601). Never a secret: [`TokenInfo`] has none.

use std::fmt::Write as _;

use crate::store::{ApiKeyInfo, EndpointInfo, TokenInfo};

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

fn opt_time(t: Option<i64>) -> String {
    t.map_or_else(|| "-".to_owned(), format_time)
}

/// The `token list` table: id, description, bind rules, sources, created,
/// last seen, revoked.
pub fn token_table(tokens: &[TokenInfo]) -> String {
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
                t.id.to_string(),
                if t.description.is_empty() {
                    "-".to_owned()
                } else {
                    t.description.escape_debug().to_string()
                },
                if t.scope.rules.is_empty() {
                    "-".to_owned()
                } else {
                    t.scope.rules.to_string()
                },
                if t.scope.sources.is_empty() {
                    "any".to_owned()
                } else {
                    t.scope.sources_text()
                },
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
fn rotation(t: &TokenInfo) -> String {
    match (&t.replaced_by, &t.rotated_from) {
        (Some(by), _) => format!("replaced by {by}"),
        (None, Some(from)) if t.pending => format!("pending successor of {from}"),
        _ if t.rotation_requested_at.is_some() => "requested".to_owned(),
        (None, Some(from)) => format!("successor of {from}"),
        (None, None) => "-".to_owned(),
    }
}

/// The `endpoint list` table: name, kind, owner token, since.
pub fn endpoint_table(endpoints: &[EndpointInfo]) -> String {
    let header = ["ENDPOINT", "KIND", "OWNER", "SINCE"].map(str::to_owned);
    let rows: Vec<[String; 4]> = endpoints
        .iter()
        .map(|e| {
            [
                e.name.clone(),
                if e.kind.is_empty() {
                    "-".to_owned()
                } else {
                    e.kind.clone()
                },
                e.owner.to_string(),
                format_time(e.claimed_at),
            ]
        })
        .collect();
    table(&header, &rows)
}

/// The `apikey list` table: id, role, description, created (and by whom),
/// last used, revoked.
pub fn apikey_table(keys: &[ApiKeyInfo]) -> String {
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
                k.id.to_string(),
                k.role.as_str().to_owned(),
                if k.description.is_empty() {
                    "-".to_owned()
                } else {
                    k.description.escape_debug().to_string()
                },
                format_time(k.created_at),
                k.created_by
                    .as_ref()
                    .map_or_else(|| "offline".to_owned(), |b| b.to_string()),
                opt_time(k.last_used_at),
                opt_time(k.revoked_at),
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
    }
}
