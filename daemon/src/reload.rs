//! SIGHUP: read `tetherd.toml` again and apply its endpoints to the running
//! daemon without dropping the session. New endpoints are bound on the live
//! session, removed ones unbound (`Unbind`), changed ones unbound and bound
//! again when what the edge sees (kind, policy, upstream) changed, and
//! updated in place when only local settings did (timeouts, PROXY
//! protocol). Without a live session the next one binds the new list.
//!
//! A file that does not parse is logged with file:line:field, and the
//! running configuration is kept as it was. Settings that only a restart can
//! change (edge, TLS, credential, session, reconnect) are named in a warning
//! and otherwise left alone.

use std::rc::Rc;

use log::{error, info, warn};
use tether_proto::{Control, MAX_CONTROL};

use crate::config::{Config, Endpoint};
use crate::tunnel::Runtime;

/// The `Bind` an endpoint sends, encoded: two endpoints whose `Bind`s are
/// equal look the same to the edge.
fn bind_bytes(ep: &Endpoint) -> Vec<u8> {
    let upstream = ep.upstream.to_string();
    let mut buf = vec![0u8; MAX_CONTROL];
    // Fits one control message: checked when the file was loaded.
    let len = ep.bind(&upstream).encode(&mut buf).map_or(0, |b| b.len());
    buf.truncate(len);
    buf
}

/// The settings of `new` that differ from `old` and need a restart.
fn restart_only(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.edge.to_string() != new.edge.to_string() {
        changed.push("edge");
    }
    if old.tls_name().ok() != new.tls_name().ok() {
        changed.push("server_name");
    }
    if old.ca_file != new.ca_file {
        changed.push("ca_file");
    }
    if old.credential != new.credential {
        changed.push("credential");
    }
    if format!("{:?}", old.session.mux_config()) != format!("{:?}", new.session.mux_config()) {
        changed.push("session");
    }
    if format!("{:?}", old.reconnect) != format!("{:?}", new.reconnect) {
        changed.push("reconnect");
    }
    changed
}

/// Reads `running.path` again and applies it; `running` becomes what is
/// now in effect (its endpoints replaced on success).
pub(crate) async fn reload(running: &mut Config, rt: &Rc<Runtime>) {
    rt.service.reloading();
    info!("SIGHUP: reloading {}", running.path.display());
    match Config::load(&running.path) {
        Err(e) => error!("reload failed: {e}; the running configuration is kept"),
        Ok(new) => {
            let later = restart_only(running, &new);
            if !later.is_empty() {
                warn!(
                    "reload: {} changed; that takes a restart (systemctl restart tetherd): kept as running",
                    later.join(", ")
                );
            }
            apply(rt, new.endpoints.clone()).await;
            running.endpoints = new.endpoints;
        }
    }
    let status = if rt.live.borrow().is_some() {
        crate::service::connected(
            &rt.edge,
            rt.bound.borrow().len(),
            rt.endpoints.borrow().len(),
        )
    } else {
        format!("reloaded; connecting to {}", rt.edge)
    };
    rt.service.ready(&status);
}

/// Replaces the endpoint list and tells the live session what changed.
async fn apply(rt: &Rc<Runtime>, new: Vec<Endpoint>) {
    let old = rt.endpoints();
    let mut unbind: Vec<String> = Vec::new();
    let mut bind: Vec<usize> = Vec::new();
    for o in old.iter() {
        match new.iter().find(|n| n.name() == o.name()) {
            None => unbind.push(o.name().to_owned()),
            Some(n) if bind_bytes(n) != bind_bytes(o) => unbind.push(o.name().to_owned()),
            Some(_) => {}
        }
    }
    for (i, n) in new.iter().enumerate() {
        match old.iter().find(|o| o.name() == n.name()) {
            None => bind.push(i),
            Some(o) if bind_bytes(n) != bind_bytes(o) => bind.push(i),
            Some(_) => {}
        }
    }
    let kept = new.len() - bind.len();
    info!(
        "reload: {} endpoint(s) to bind, {} to unbind, {kept} kept",
        bind.len(),
        unbind.len()
    );
    let new = Rc::new(new);
    // From now on streams are served by the new list: one for an endpoint
    // being unbound is refused.
    *rt.endpoints.borrow_mut() = new.clone();
    let Some(sess) = rt.live.borrow().clone() else {
        return;
    };
    for name in &unbind {
        rt.bound.borrow_mut().remove(name);
        if let Err(e) = sess.send_control(&Control::Unbind { endpoint: name }).await {
            warn!("reload: cannot send Unbind for {name}: {e}");
            return;
        }
        info!("reload: endpoint {name} unbound");
        crate::tunnel::stdout_line(format_args!("UNBOUND {name}"));
    }
    for &i in &bind {
        let ep = &new[i];
        let upstream = ep.upstream.to_string();
        if let Err(e) = sess.send_control(&ep.bind(&upstream)).await {
            warn!("reload: cannot send Bind for {}: {e}", ep.name());
            return;
        }
    }
}
