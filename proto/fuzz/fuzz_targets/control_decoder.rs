//! Fuzzes the postcard codecs of PROTOCOL.md section 5: `Control::decode` (the
//! `CONTROL` payload) and `StreamMeta::decode` (the `OPEN` payload).
//!
//! Whatever decodes must encode again within the protocol limit, the encoding
//! must decode to the same value and be a fixed point (encoding is canonical),
//! and it is never longer than the input (canonical varints are the shortest).
//! A token's value never shows in `Debug`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_proto::control::{CodecError, Secret};
use tether_proto::{Control, ErrorCode, StreamMeta, MAX_CONTROL, MAX_META};

fuzz_target!(|data: &[u8]| {
    control(data);
    meta(data);
});

fn control(data: &[u8]) {
    let mut buf = [0u8; MAX_CONTROL];
    match Control::decode(data) {
        Ok(m) => {
            let enc = match m.encode(&mut buf) {
                Ok(b) => b.to_vec(),
                // Only a message longer than the limit may refuse to encode.
                Err(CodecError::TooLarge) if data.len() > MAX_CONTROL => return,
                Err(e) => panic!("{m:?} decoded but does not encode: {e:?}"),
            };
            assert!(
                enc.len() <= data.len(),
                "re-encoding grew: {} > {}",
                enc.len(),
                data.len()
            );
            let back = Control::decode(&enc).expect("an encoding decodes");
            assert_eq!(back, m, "round trip changed the message");
            let mut buf2 = [0u8; MAX_CONTROL];
            assert_eq!(back.encode(&mut buf2).expect("encodes twice"), &enc[..]);
            check_redacted(&m);
            let _ = m.error_code();
        }
        Err(e) => check_codec_error(e),
    }
}

fn meta(data: &[u8]) {
    let mut buf = [0u8; MAX_META];
    match StreamMeta::decode(data) {
        Ok(m) => {
            let enc = match m.encode(&mut buf) {
                Ok(b) => b.to_vec(),
                Err(CodecError::TooLarge) if data.len() > MAX_META => return,
                Err(e) => panic!("{m:?} decoded but does not encode: {e:?}"),
            };
            assert!(
                enc.len() <= data.len(),
                "re-encoding grew: {} > {}",
                enc.len(),
                data.len()
            );
            let back = StreamMeta::decode(&enc).expect("an encoding decodes");
            assert_eq!(back, m, "round trip changed the metadata");
            let mut buf2 = [0u8; MAX_META];
            assert_eq!(back.encode(&mut buf2).expect("encodes twice"), &enc[..]);
        }
        Err(e) => check_codec_error(e),
    }
}

fn check_codec_error(e: CodecError) {
    assert!(
        matches!(e, CodecError::Malformed | CodecError::TrailingBytes),
        "decode can only fail as Malformed or TrailingBytes, not {e:?}"
    );
    assert_eq!(e.code(), ErrorCode::PROTOCOL);
    assert!(!format!("{e}").is_empty());
}

/// `Debug` of a message with a secret does not depend on the secret.
fn check_redacted(m: &Control<'_>) {
    const OTHER: Secret<'static> = Secret("\u{0}other-secret\u{0}");
    let swapped = match m.clone() {
        Control::Hello {
            version,
            min_version,
            token: _,
            agent,
            arch,
        } => Control::Hello {
            version,
            min_version,
            token: OTHER,
            agent,
            arch,
        },
        Control::RotateOffer { token_id, token: _ } => Control::RotateOffer {
            token_id,
            token: OTHER,
        },
        _ => return,
    };
    assert_eq!(
        format!("{m:?}"),
        format!("{swapped:?}"),
        "Debug shows the token"
    );
}
