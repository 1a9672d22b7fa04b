//! Fuzzes the frame codec (PROTOCOL.md section 2): `FrameHeader::decode` on
//! arbitrary bytes, the checks a decoded header must satisfy, and the
//! `write_frame` round trip.
//!
//! The input is read as a sequence of frames, as a receiver would: a header,
//! then `len` payload bytes, until the bytes run out, a frame is cut short or
//! a header is refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_proto::frame::{write_frame, FrameHeader, FrameKind, HeaderError, StreamId};
use tether_proto::{ErrorCode, HEADER_LEN, MAX_FRAME, MAX_META, MAX_PAYLOAD};

/// Payload bytes for a frame that is longer than `MAX_PAYLOAD` by one.
static ZEROS: [u8; MAX_PAYLOAD] = [0; MAX_PAYLOAD];

fuzz_target!(|data: &[u8]| {
    let mut out = vec![0u8; MAX_FRAME + 1];
    let mut rest = data;
    while rest.len() >= HEADER_LEN {
        let (raw, after) = rest.split_at(HEADER_LEN);
        let raw: &[u8; HEADER_LEN] = raw.try_into().expect("split_at gave HEADER_LEN bytes");
        match FrameHeader::decode(raw) {
            Ok(h) => {
                check_header(&h, raw);
                let len = usize::from(h.len);
                // A receiver waits for the rest of a truncated frame; so do we.
                let Some(payload) = after.get(..len) else {
                    return;
                };
                check_write_frame(&mut out, h, payload);
                rest = &after[len..];
            }
            Err(e) => {
                check_error(e, raw);
                return;
            }
        }
    }
});

/// A header that decoded obeys every rule of section 2 and encodes back to
/// exactly the bytes it came from.
fn check_header(h: &FrameHeader, raw: &[u8; HEADER_LEN]) {
    assert_eq!(
        &h.encode(),
        raw,
        "decode/encode is not the identity for {h:?}"
    );
    assert_eq!(FrameKind::from_u8(raw[0]), Some(h.kind));
    assert_eq!(
        h.flags & !h.kind.allowed_flags(),
        0,
        "undefined flags accepted: {h:?}"
    );
    assert_eq!(
        h.stream.is_none(),
        h.kind.is_session(),
        "wrong stream class: {h:?}"
    );
    if let Some(id) = h.stream {
        assert!(
            id.get() != 0 && id.get() <= StreamId::MAX,
            "bad stream id: {h:?}"
        );
    }
    let len = h.len as usize;
    assert!(len <= MAX_PAYLOAD, "length over MAX_PAYLOAD: {h:?}");
    match h.kind.fixed_len() {
        Some(n) => assert_eq!(len, n, "fixed-size kind with another length: {h:?}"),
        None => assert!(
            len <= h.kind.max_len(),
            "length over the kind's limit: {h:?}"
        ),
    }
    if h.kind == FrameKind::Open {
        assert!(len <= MAX_META, "OPEN over MAX_META: {h:?}");
    }
}

/// `write_frame` writes header and payload and nothing else, refuses a short
/// buffer or a payload of the wrong length, and what it wrote decodes again.
fn check_write_frame(out: &mut [u8], h: FrameHeader, payload: &[u8]) {
    let total = HEADER_LEN + payload.len();
    out[total] = 0xA5;
    assert_eq!(write_frame(&mut out[..total], h, payload), Some(total));
    assert_eq!(
        write_frame(&mut out[..], h, payload),
        Some(total),
        "a larger buffer is fine"
    );
    assert_eq!(out[total], 0xA5, "write_frame wrote past the frame");
    let hdr: &[u8; HEADER_LEN] = out[..HEADER_LEN].try_into().expect("HEADER_LEN bytes");
    assert_eq!(
        FrameHeader::decode(hdr),
        Ok(h),
        "written header does not decode to itself"
    );
    assert_eq!(&out[HEADER_LEN..total], payload);

    // Too small by one byte: nothing, and nothing written.
    out[..total].fill(0x5A);
    assert_eq!(write_frame(&mut out[..total - 1], h, payload), None);
    assert!(
        out[..total].iter().all(|&b| b == 0x5A),
        "a refused write_frame wrote bytes"
    );
    // A payload whose length is not the header's.
    if !payload.is_empty() {
        assert_eq!(write_frame(out, h, &payload[1..]), None);
    }
    if payload.len() < MAX_PAYLOAD {
        assert_eq!(write_frame(out, h, &ZEROS[..payload.len() + 1]), None);
    }
}

/// A refused header says why in a way that matches the bytes, and carries
/// the `GOAWAY` code of section 2.
fn check_error(e: HeaderError, raw: &[u8; HEADER_LEN]) {
    let kind = FrameKind::from_u8(raw[0]);
    let len = u16::from_be_bytes([raw[2], raw[3]]);
    let stream = u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]);
    match e {
        HeaderError::UnknownKind(k) => {
            assert_eq!(k, raw[0]);
            assert!(kind.is_none());
            assert_eq!(e.code(), ErrorCode::PROTOCOL);
        }
        HeaderError::UndefinedFlags { kind: k, flags } => {
            assert_eq!(Some(k), kind);
            assert_eq!(flags, raw[1]);
            assert_ne!(flags & !k.allowed_flags(), 0);
            assert_eq!(e.code(), ErrorCode::PROTOCOL);
        }
        HeaderError::WrongStream { kind: k, stream: s } => {
            assert_eq!(Some(k), kind);
            assert_eq!(s, stream);
            let ok = if k.is_session() {
                s == 0
            } else {
                s != 0 && s <= StreamId::MAX
            };
            assert!(!ok, "WrongStream for a legal pairing {k:?}/{s}");
            assert_eq!(e.code(), ErrorCode::PROTOCOL);
        }
        HeaderError::BadLength { kind: k, len: l } => {
            assert_eq!(Some(k), kind);
            assert_eq!(l, len);
            let ok = match k.fixed_len() {
                Some(n) => l as usize == n,
                None => l as usize <= k.max_len(),
            };
            assert!(!ok, "BadLength for a legal length {k:?}/{l}");
            assert_eq!(e.code(), ErrorCode::FRAME_SIZE);
        }
    }
    // Display never panics and says something.
    let s = format!("{e}");
    assert!(!s.is_empty());
}
