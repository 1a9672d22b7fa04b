//! `tether-proto`: the wire format of tether and the multiplexer that runs it.
//!
//! This crate owns the bytes on the wire ([`frame`]), the control messages and
//! stream metadata ([`control`]), and the sans-IO stream multiplexer
//! ([`mux::Mux`]). It does no I/O, reads no clock, spawns nothing and never
//! allocates in the multiplexer: bytes and the current time ([`Millis`]) go in,
//! bytes to transmit (into a buffer the caller owns), events and the next
//! deadline come out. Every capacity (streams, window) is fixed when the
//! multiplexer is created, from storage the caller hands over.
//!
//! It does not own TLS, sockets, timers, tokens or policy: the async driver
//! (`tether-driver`), `tetherd` and `tether-edge` build those on top.
//!
//! The protocol is specified in `PROTOCOL.md` beside this crate.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod control;
pub mod frame;
pub mod mux;
mod ring;

pub use control::{ClientCert, Control, EndpointKind, PeerAddr, StreamMeta};
pub use frame::{ErrorCode, FrameHeader, FrameKind, StreamId};
pub use mux::{Config, Event, Mux, Role, Slot};

/// Protocol version this crate speaks (see PROTOCOL.md section 8).
pub const PROTOCOL_VERSION: u16 = 1;
/// Oldest protocol version this crate speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// ALPN protocol id of the tunnel.
pub const ALPN: &[u8] = b"tether/1";

/// Size of a frame header.
pub const HEADER_LEN: usize = 8;
/// Largest frame payload.
pub const MAX_PAYLOAD: usize = 16384;
/// Largest `OPEN` payload (stream metadata).
pub const MAX_META: usize = 512;
/// Largest `CONTROL` payload.
pub const MAX_CONTROL: usize = MAX_PAYLOAD;
/// Credit every stream starts with, in each direction.
pub const INITIAL_WINDOW: u32 = 16384;
/// Largest credit a stream may hold.
pub const MAX_WINDOW: u32 = (1 << 31) - 1;
/// Largest frame on the wire.
pub const MAX_FRAME: usize = HEADER_LEN + MAX_PAYLOAD;

/// Longest endpoint name, in bytes: a published tls endpoint is
/// `<name>.<domain>`, and a DNS name is at most 253 characters.
pub const MAX_ENDPOINT_NAME: usize = 127;

/// Whether `name` can be an endpoint name: one or more DNS labels separated
/// by `.` (`cam`, `cam.site-42`), each 1 to 63 lowercase letters, digits and
/// inner hyphens, at most [`MAX_ENDPOINT_NAME`] bytes in all (the edge
/// publishes a tls endpoint as `<name>.<domain>`). The one rule both
/// programs check.
pub fn valid_endpoint_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_ENDPOINT_NAME && name.split('.').all(valid_label)
}

/// Whether `label` is one DNS label of lowercase letters, digits and inner
/// hyphens, 1 to 63 characters.
pub fn valid_label(label: &str) -> bool {
    let b = label.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A point in time, in milliseconds since an origin the caller chooses.
///
/// The multiplexer never reads a clock: the caller passes `now` in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Millis(pub u64);

impl Millis {
    /// `self + ms`, saturating.
    pub const fn add(self, ms: u64) -> Millis {
        Millis(self.0.saturating_add(ms))
    }
    /// Milliseconds from `earlier` to `self`, 0 if `earlier` is later.
    pub const fn since(self, earlier: Millis) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}
