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

use std::sync::Arc;

use tether_proto::control::Secret;
use tether_proto::{Control, ErrorCode};

use crate::events::{EventKind, NewEvent};
use crate::registry::Tunnel;
use crate::state::{for_log, State};
use crate::store::{Retired, Successor, MAX_PENDING_SUCCESSORS};

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
