//! Remote rotation, the edge's half (DESIGN.md invariant 5, PROTOCOL.md
//! section 5.3): offering a successor to a session of a token an operator
//! asked to rotate ([`offer`]), draining that session once the device says
//! the successor is on its disk ([`stored`]), and retiring the predecessor
//! when the device authenticates with the successor ([`complete`], at that
//! `Hello`, before `Welcome`).
//!
//! The order is what keeps a device from being locked out: the successor
//! is in the store before its secret leaves the edge; the predecessor stays
//! valid until a `Hello` proves the device reads the successor from its
//! disk. A crash of either side at any step leaves the device holding a
//! credential the store accepts: it reconnects with the old token (and is
//! offered a new successor) or with the new one (and the rotation
//! completes). The secret of a successor is never stored: a session is
//! offered at most once ([`Offer`]), and each new session of the old token
//! gets a successor of its own, at most [`MAX_PENDING_SUCCESSORS`]
//! (`registry::Offer` is a session's).
//!
//! With `[rotation] max_token_age_secs`, [`rotate_aged`] also asks for the
//! rotation of every connected token older than that, the same way an
//! operator would.

use std::sync::Arc;
use std::time::Duration;

use tether_proto::control::Secret;
use tether_proto::{Control, ErrorCode};

use crate::events::{EventKind, NewEvent};
use crate::registry::Tunnel;
use crate::state::{for_log, State};
use crate::store::{
    Retired, RotationRequest, Successor, TokenId, TokenInfo, MAX_PENDING_SUCCESSORS,
};

/// Offers `tunnel` a successor of its token, unless it was offered one
/// already or it is no longer live. The successor is minted (and committed)
/// first, then sent.
pub(crate) async fn offer(state: &Arc<State>, tunnel: &Arc<Tunnel>) {
    if !tunnel.offer.claim() || !state.registry().is_live(tunnel.no) {
        return;
    }
    let id = tunnel.token.clone();
    let minted = state.store_call(move |s| s.mint_successor(&id)).await;
    let new = match minted {
        Ok(Successor::Minted(new)) => new,
        Ok(Successor::NotRequested) => return,
        Ok(Successor::Stalled) => {
            log::warn!(
                "rotation of token {} stalled: {MAX_PENDING_SUCCESSORS} successors were offered and the device authenticated with none (does tetherd have a writable state directory?); not offering more",
                tunnel.token
            );
            return;
        }
        Err(e) => {
            log::error!(
                "session {}: cannot mint a successor of token {}: {e}",
                tunnel.no,
                tunnel.token
            );
            return;
        }
    };
    tunnel.offer.set_successor(new.id.clone());
    let token_id = new.id.to_string();
    let sent = tunnel
        .session
        .send_control(&Control::RotateOffer {
            token_id: &token_id,
            token: Secret(new.token.expose()),
        })
        .await;
    match sent {
        Ok(()) => {
            log::info!(
                "session {}: offered token {} its successor {token_id}",
                tunnel.no,
                tunnel.token
            );
            crate::lines::test_pause("offered");
        }
        Err(e) => log::info!(
            "session {}: the offer of {token_id} was not sent ({e}); the next session gets another",
            tunnel.no
        ),
    }
}

/// The device says `token_id` is durably stored: the session is drained,
/// so that the device dials again and authenticates with it.
pub(crate) fn stored(tunnel: &Tunnel, token_id: &str) {
    match tunnel.offer.successor() {
        Some(s) if s.to_string() == token_id => {
            log::info!(
                "session {}: the device stored {token_id}; draining the session so that it authenticates with it",
                tunnel.no
            );
            crate::lines::test_pause("stored_received");
            tunnel.session.goaway(ErrorCode::NO_ERROR);
        }
        _ => log::warn!(
            "session {}: RotateStored for {:?}, which was not offered to it; ignored",
            tunnel.no,
            for_log(token_id)
        ),
    }
}

/// At `Hello` with a successor whose predecessor is active (`predecessor`
/// is the proof from the store): retires the predecessor. `None` when
/// there was nothing to do, or the store failed (the predecessor then stays
/// valid, and the next `Hello` tries again).
pub(crate) async fn complete(state: &Arc<State>, tunnel: &Tunnel) -> Option<Retired> {
    let id = tunnel.token.clone();
    let done = state
        .store_call(move |s| {
            let r = s.complete_rotation(&id)?;
            let owners = match r {
                Some(_) => Some(s.endpoint_owners()?),
                None => None,
            };
            Ok::<_, crate::store::StoreError>(r.zip(owners))
        })
        .await;
    let retired = match done {
        Ok(Some((r, owners))) => {
            // This process wrote them: the watcher's `data_version` would
            // not notice.
            state.registry().set_owners(owners);
            r
        }
        Ok(None) => return None,
        Err(e) => {
            log::error!(
                "session {}: cannot complete the rotation to {}: {e}",
                tunnel.no,
                tunnel.token
            );
            return None;
        }
    };
    let took = crate::store::unix_now_ms() - retired.requested_ms;
    log::info!(
        "token {} retired: the device authenticated with its successor {} (session {}, {took} ms after the request)",
        retired.old,
        retired.new,
        tunnel.no
    );
    for t in &retired.abandoned {
        log::info!("token {t}: an unused successor of {} revoked", retired.old);
    }
    state.event(
        NewEvent::new(EventKind::TokenRotated)
            .token(&retired.old)
            .by(retired.requested_by.as_ref())
            .session(tunnel.no, tunnel.peer)
            .detail(format!("retired; replaced by {}", retired.new)),
    );
    Some(retired)
}

/// Whether `t` is due for an automatic rotation at `now` (Unix seconds)
/// under `[rotation] max_token_age_secs = max_age`: active, no rotation
/// under way (neither asked for nor a pending successor), and at least
/// `max_age` old.
pub(crate) fn due(t: &TokenInfo, now: i64, max_age: u64) -> bool {
    let age = now.saturating_sub(t.created_at);
    t.revoked_at.is_none()
        && t.rotation_requested_at.is_none()
        && !t.pending
        && u64::try_from(age).is_ok_and(|a| a >= max_age)
}

/// How often [`rotate_aged`] looks: a quarter of the age, between the
/// store poll and a minute.
pub(crate) fn age_check_every(max_age: u64) -> Duration {
    (Duration::from_secs(max_age) / 4)
        .clamp(crate::server::REVOCATION_POLL, Duration::from_secs(60))
}

/// `[rotation] max_token_age_secs`: every [`age_check_every`], asks for the
/// rotation of every token that is [`due`] and has a live session, as
/// `POST /tokens/{id}/rotate` would (with no key; the event says why). The
/// store watcher then offers the successors like any other rotation. A
/// device that is offline is rotated at the first check after it connects.
pub(crate) async fn rotate_aged(state: Arc<State>, max_age: u64) {
    let every = age_check_every(max_age);
    loop {
        smol::Timer::after(every).await;
        let mut live: Vec<TokenId> = state
            .registry()
            .live_sessions()
            .into_iter()
            .map(|(t, _)| t.token.clone())
            .collect();
        live.sort();
        live.dedup();
        if live.is_empty() {
            continue;
        }
        let asked = state
            .store_call(move |s| {
                let now = crate::store::unix_now();
                let mut asked = Vec::new();
                for id in live {
                    match s.get(id.as_str())? {
                        Some(t) if due(&t, now, max_age) => {}
                        _ => continue,
                    }
                    if let RotationRequest::Requested(t) = s.request_rotation(id.as_str(), None)? {
                        s.record(&NewEvent::new(EventKind::TokenRotated).token(&t.id).detail(
                            format!(
                                "requested: older than rotation.max_token_age_secs ({max_age} s)"
                            ),
                        ))?;
                        asked.push(t.id.clone());
                    }
                }
                Ok::<_, crate::store::StoreError>(asked)
            })
            .await;
        match asked {
            Ok(ids) => {
                for id in ids {
                    log::info!("token {id} is older than {max_age} s: its rotation is requested");
                }
            }
            Err(e) => log::error!("the check for tokens due for rotation failed: {e}"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::scope::{Rules, Scope};

    fn token(created_at: i64) -> TokenInfo {
        TokenInfo {
            id: TokenId::parse("0123456789ab").unwrap(),
            description: String::new(),
            scope: Scope {
                rules: Rules::parse(&["web".to_owned()]).unwrap(),
                sources: Vec::new(),
            },
            created_at,
            updated_at: None,
            last_seen_at: None,
            revoked_at: None,
            rotation_requested_at: None,
            rotated_from: None,
            pending: false,
            replaced_by: None,
        }
    }

    #[test]
    fn a_token_is_due_once_old_enough_and_only_when_no_rotation_is_under_way() {
        let t = token(1_000);
        assert!(!due(&t, 1_099, 100), "99 s old");
        assert!(due(&t, 1_100, 100), "100 s old");
        assert!(!due(&t, 900, 100), "a clock behind the creation");
        let asked = TokenInfo {
            rotation_requested_at: Some(1_050),
            ..token(1_000)
        };
        assert!(!due(&asked, 5_000, 100), "already asked for");
        let pending = TokenInfo {
            pending: true,
            ..token(1_000)
        };
        assert!(!due(&pending, 5_000, 100), "a successor not yet used");
        let revoked = TokenInfo {
            revoked_at: Some(1_001),
            ..token(1_000)
        };
        assert!(!due(&revoked, 5_000, 100), "revoked");
    }

    #[test]
    fn the_age_check_runs_at_a_quarter_of_the_age_and_at_least_once_a_minute() {
        assert_eq!(age_check_every(1), Duration::from_millis(250));
        assert_eq!(age_check_every(8), Duration::from_secs(2));
        assert_eq!(age_check_every(90 * 86_400), Duration::from_secs(60));
    }
}
