//! Control messages and stream metadata (PROTOCOL.md section 5), encoded with
//! postcard.
//!
//! The types borrow their strings from the buffer they were decoded from, so
//! decoding allocates nothing and works without `alloc`. Secrets (tokens) are
//! wrapped in [`Secret`], whose `Debug` never shows them.

use core::fmt;

use serde::{Deserialize, Serialize};

use crate::frame::ErrorCode;

/// A secret string (a token) whose `Debug` output is redacted.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret<'a>(#[serde(borrow)] pub &'a str);

impl fmt::Debug for Secret<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// How the edge publishes an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndpointKind {
    /// One public TCP port per endpoint.
    Tcp,
    /// A shared TLS port, routed by SNI; the edge terminates TLS.
    Tls,
    /// The shared TLS port, routed by SNI without terminating: the edge
    /// forwards the raw bytes, ClientHello included, and the device's own
    /// service terminates TLS.
    TlsPassthrough,
}

/// A control message (PROTOCOL.md section 5.3). Variant order is the wire
/// index: only ever append.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control<'a> {
    /// Agent → edge, the first frame of a session.
    Hello {
        /// Highest protocol version the agent speaks.
        version: u16,
        /// Lowest protocol version the agent speaks.
        min_version: u16,
        /// The agent's credential.
        #[serde(borrow)]
        token: Secret<'a>,
        /// Agent name and version.
        agent: &'a str,
        /// Target architecture.
        arch: &'a str,
    },
    /// Edge → agent: the session is up.
    Welcome {
        /// Agreed protocol version.
        version: u16,
        /// Session number, for logs.
        session: u64,
        /// Edge name and version.
        edge: &'a str,
    },
    /// Edge → agent: the session is refused or ends; a `GOAWAY` follows.
    Error {
        /// Error code (PROTOCOL.md section 6).
        code: u32,
        /// How long to wait before dialing again; 0 = own backoff.
        retry_after_ms: u32,
        /// Human-readable reason.
        message: &'a str,
    },
    /// Agent → edge: publish an endpoint.
    Bind {
        /// Endpoint name.
        endpoint: &'a str,
        /// How to publish it.
        kind: EndpointKind,
        /// Requested public URL; empty lets the edge choose.
        url: &'a str,
        /// Upstream address, for display.
        upstream: &'a str,
        /// Declared policy (TOML); empty for none.
        policy: &'a str,
    },
    /// Edge → agent: the endpoint is published.
    BindOk {
        /// Endpoint name.
        endpoint: &'a str,
        /// Public address.
        url: &'a str,
    },
    /// Edge → agent: the endpoint is refused.
    BindErr {
        /// Endpoint name.
        endpoint: &'a str,
        /// Error code.
        code: u32,
        /// The rule that refused it.
        rule: &'a str,
        /// Human-readable reason.
        message: &'a str,
    },
    /// Edge → agent: store this new credential.
    RotateOffer {
        /// Public id of the new token.
        token_id: &'a str,
        /// The new secret.
        #[serde(borrow)]
        token: Secret<'a>,
    },
    /// Agent → edge: the new credential is durably stored.
    RotateStored {
        /// Public id of the new token.
        token_id: &'a str,
    },
    /// Edge → agent: the old credential is retired.
    RotateConfirmed {
        /// Public id of the new token.
        token_id: &'a str,
    },
    /// Agent → edge: stop publishing an endpoint this session bound (its
    /// config was reloaded without it). No answer; streams already open on
    /// it go on until they end.
    Unbind {
        /// Endpoint name.
        endpoint: &'a str,
    },
}

impl Control<'_> {
    /// The error code of an `Error` message.
    pub fn error_code(&self) -> Option<ErrorCode> {
        match self {
            Control::Error { code, .. } => Some(ErrorCode(*code)),
            _ => None,
        }
    }
}

/// The public client's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerAddr {
    /// IPv4 address and port.
    V4([u8; 4], u16),
    /// IPv6 address and port.
    V6([u8; 16], u16),
    /// Not known (e.g. a stream opened by the agent).
    Unknown,
}

/// What an `OPEN` carries (PROTOCOL.md section 5.2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamMeta<'a> {
    /// The bound endpoint's name.
    pub endpoint: &'a str,
    /// The public client's address.
    pub peer: PeerAddr,
    /// TLS server name the client asked for.
    pub sni: Option<&'a str>,
    /// The verified client certificate, when the endpoint asked for one and
    /// the client presented it.
    pub client: Option<ClientCert<'a>>,
}

/// Who a verified client certificate names (its leaf), as `OPEN` carries it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientCert<'a> {
    /// The subject, as an RFC 4514 string (`CN=cam-7,O=Acme`).
    pub subject: &'a str,
    /// The subject's common name (empty when it has none).
    pub common_name: &'a str,
    /// The DNS and URI subject alternative names, `DNS:a,URI:b` (may be cut
    /// short to fit `MAX_META`).
    pub names: &'a str,
    /// SHA-256 of the leaf certificate's DER.
    pub sha256: [u8; 32],
}

/// Why a control message or stream metadata could not be encoded or decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodecError {
    /// The bytes are not a valid message (bad variant, truncated, bad UTF-8).
    Malformed,
    /// The message decoded but bytes were left over.
    TrailingBytes,
    /// The encoded message does not fit the buffer or the protocol limit.
    TooLarge,
}

impl CodecError {
    /// The wire code a receiver answers with.
    pub const fn code(self) -> ErrorCode {
        match self {
            CodecError::TooLarge => ErrorCode::FRAME_SIZE,
            _ => ErrorCode::PROTOCOL,
        }
    }
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CodecError::Malformed => "malformed postcard message",
            CodecError::TrailingBytes => "trailing bytes after the message",
            CodecError::TooLarge => "message larger than the buffer or the protocol limit",
        })
    }
}

fn encode_into<'b, T: Serialize>(v: &T, out: &'b mut [u8]) -> Result<&'b mut [u8], CodecError> {
    postcard::to_slice(v, out).map_err(|_| CodecError::TooLarge)
}

fn decode_exact<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, CodecError> {
    let (v, rest) = postcard::take_from_bytes(bytes).map_err(|_| CodecError::Malformed)?;
    if rest.is_empty() {
        Ok(v)
    } else {
        Err(CodecError::TrailingBytes)
    }
}

impl<'a> Control<'a> {
    /// Encodes into `out`, returning the used prefix.
    pub fn encode<'b>(&self, out: &'b mut [u8]) -> Result<&'b mut [u8], CodecError> {
        let n = encode_into(self, out)?.len();
        if n > crate::MAX_CONTROL {
            return Err(CodecError::TooLarge);
        }
        Ok(&mut out[..n])
    }
    /// Decodes a whole `CONTROL` payload.
    pub fn decode(bytes: &'a [u8]) -> Result<Control<'a>, CodecError> {
        decode_exact(bytes)
    }
}

impl<'a> StreamMeta<'a> {
    /// Encodes into `out`, returning the used prefix.
    pub fn encode<'b>(&self, out: &'b mut [u8]) -> Result<&'b mut [u8], CodecError> {
        let n = encode_into(self, out)?.len();
        if n > crate::MAX_META {
            return Err(CodecError::TooLarge);
        }
        Ok(&mut out[..n])
    }
    /// Decodes a whole `OPEN` payload.
    pub fn decode(bytes: &'a [u8]) -> Result<StreamMeta<'a>, CodecError> {
        decode_exact(bytes)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn control_round_trips_every_variant() {
        let msgs = [
            Control::Hello {
                version: 1,
                min_version: 1,
                token: Secret("tok_abc.secret"),
                agent: "tetherd/0.1.0",
                arch: "aarch64",
            },
            Control::Welcome {
                version: 1,
                session: 42,
                edge: "tether-edge/0.1.0",
            },
            Control::Error {
                code: 101,
                retry_after_ms: 60_000,
                message: "revoked",
            },
            Control::Bind {
                endpoint: "web",
                kind: EndpointKind::Tls,
                url: "",
                upstream: "127.0.0.1:8080",
                policy: "",
            },
            Control::BindOk {
                endpoint: "web",
                url: "tls://web.example.com:443",
            },
            Control::BindErr {
                endpoint: "web",
                code: 103,
                rule: "acl[0]",
                message: "no",
            },
            Control::RotateOffer {
                token_id: "tok_x",
                token: Secret("s"),
            },
            Control::RotateStored { token_id: "tok_x" },
            Control::RotateConfirmed { token_id: "tok_x" },
            Control::Unbind { endpoint: "cam" },
        ];
        let mut buf = [0u8; 256];
        for (i, m) in msgs.iter().enumerate() {
            let bytes = m.encode(&mut buf).unwrap();
            assert_eq!(bytes[0] as usize, i, "variant index on the wire");
            let owned: std::vec::Vec<u8> = bytes.to_vec();
            assert_eq!(&Control::decode(&owned).unwrap(), m);
        }
    }

    #[test]
    fn hello_encoding_is_the_documented_layout() {
        let m = Control::Hello {
            version: 1,
            min_version: 1,
            token: Secret("t"),
            agent: "a",
            arch: "x",
        };
        let mut buf = [0u8; 64];
        assert_eq!(
            m.encode(&mut buf).unwrap(),
            &[0, 1, 1, 1, b't', 1, b'a', 1, b'x']
        );
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let m = Control::RotateOffer {
            token_id: "tok_x",
            token: Secret("hunter2"),
        };
        let s = std::format!("{m:?}");
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("tok_x"));
    }

    #[test]
    fn malformed_and_trailing_bytes_are_refused() {
        assert_eq!(Control::decode(&[99]), Err(CodecError::Malformed));
        assert_eq!(Control::decode(&[7]), Err(CodecError::Malformed));
        assert_eq!(Control::decode(&[]), Err(CodecError::Malformed));
        assert_eq!(
            Control::decode(&[7, 1, b'a', 0]),
            Err(CodecError::TrailingBytes)
        );
        assert_eq!(Control::decode(&[7, 1, 0xff]), Err(CodecError::Malformed));
    }

    #[test]
    fn stream_meta_round_trips_and_is_bounded() {
        let m = StreamMeta {
            endpoint: "web",
            peer: PeerAddr::V6([1; 16], 443),
            sni: Some("web.example.com"),
            client: Some(ClientCert {
                subject: "CN=cam-7,O=Acme",
                common_name: "cam-7",
                names: "DNS:cam-7.example.com",
                sha256: [7; 32],
            }),
        };
        let mut buf = [0u8; crate::MAX_META];
        let bytes = m.encode(&mut buf).unwrap().to_vec();
        assert_eq!(StreamMeta::decode(&bytes).unwrap(), m);
        let long = "x".repeat(600);
        let big = StreamMeta {
            endpoint: &long,
            peer: PeerAddr::Unknown,
            sni: None,
            client: None,
        };
        let mut buf = [0u8; 1024];
        assert_eq!(big.encode(&mut buf), Err(CodecError::TooLarge));
    }
}
