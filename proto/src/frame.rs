//! The frame codec: the 8-byte header, frame kinds, flags, stream ids and error
//! codes (PROTOCOL.md sections 2, 3.1 and 6).
//!
//! This module only turns bytes into checked headers and back. It knows which
//! header combinations are legal on their own (kind, flags, stream 0 or not,
//! length against the per-kind limit); what a frame means for a stream's state
//! is the multiplexer's business.

use core::fmt;

use crate::{HEADER_LEN, MAX_META, MAX_PAYLOAD};

/// A stream id: non-zero, at most 2^31 - 1. Odd ids belong to the client role
/// (the agent), even ids to the server role (the edge).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(u32);

impl StreamId {
    /// Largest stream id.
    pub const MAX: u32 = (1 << 31) - 1;

    /// A stream id from its wire value; `None` for 0 or above [`StreamId::MAX`].
    pub const fn new(raw: u32) -> Option<StreamId> {
        if raw == 0 || raw > Self::MAX {
            None
        } else {
            Some(StreamId(raw))
        }
    }
    /// The wire value.
    pub const fn get(self) -> u32 {
        self.0
    }
    /// Whether the client role (odd ids) opened this stream.
    pub const fn is_client(self) -> bool {
        self.0 % 2 == 1
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stream {}", self.0)
    }
}

/// A wire error code (PROTOCOL.md section 6). Unknown values are kept as they
/// are and shown as their number.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    /// Graceful.
    pub const NO_ERROR: ErrorCode = ErrorCode(0);
    /// The peer broke the specification.
    pub const PROTOCOL: ErrorCode = ErrorCode(1);
    /// Local failure.
    pub const INTERNAL: ErrorCode = ErrorCode(2);
    /// Data past the granted window, or credit overflow.
    pub const FLOW_CONTROL: ErrorCode = ErrorCode(3);
    /// Data on a closed stream or after FIN.
    pub const STREAM_CLOSED: ErrorCode = ErrorCode(4);
    /// A length over a limit or wrong for the frame kind.
    pub const FRAME_SIZE: ErrorCode = ErrorCode(5);
    /// The stream was not processed; safe to retry.
    pub const REFUSED_STREAM: ErrorCode = ErrorCode(6);
    /// The application dropped the stream.
    pub const CANCEL: ErrorCode = ErrorCode(7);
    /// The heartbeat deadline passed.
    pub const TIMEOUT: ErrorCode = ErrorCode(8);
    /// The agent could not reach its upstream.
    pub const CONNECT_FAILED: ErrorCode = ErrorCode(9);
    /// Unknown or malformed token.
    pub const AUTH_FAILED: ErrorCode = ErrorCode(100);
    /// The token was revoked.
    pub const TOKEN_REVOKED: ErrorCode = ErrorCode(101);
    /// No common protocol version.
    pub const VERSION_UNSUPPORTED: ErrorCode = ErrorCode(102);
    /// An ACL or policy refused the endpoint.
    pub const BIND_REFUSED: ErrorCode = ErrorCode(103);
    /// Another session holds the endpoint.
    pub const ENDPOINT_TAKEN: ErrorCode = ErrorCode(104);
    /// Try again after the retry hint.
    pub const SERVER_BUSY: ErrorCode = ErrorCode(105);

    /// The code's name in PROTOCOL.md, if it has one.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0 => "NO_ERROR",
            1 => "PROTOCOL",
            2 => "INTERNAL",
            3 => "FLOW_CONTROL",
            4 => "STREAM_CLOSED",
            5 => "FRAME_SIZE",
            6 => "REFUSED_STREAM",
            7 => "CANCEL",
            8 => "TIMEOUT",
            9 => "CONNECT_FAILED",
            100 => "AUTH_FAILED",
            101 => "TOKEN_REVOKED",
            102 => "VERSION_UNSUPPORTED",
            103 => "BIND_REFUSED",
            104 => "ENDPOINT_TAKEN",
            105 => "SERVER_BUSY",
            _ => return None,
        })
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "error code {}", self.0),
        }
    }
}

/// The kind of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Stream bytes, `FIN` ends the direction.
    Data = 0x00,
    /// Opens a stream, carries its metadata.
    Open = 0x01,
    /// Grants send credit.
    Window = 0x02,
    /// Ends a stream abruptly with a code.
    Reset = 0x03,
    /// Heartbeat; `ACK` answers.
    Ping = 0x04,
    /// A control message.
    Control = 0x05,
    /// Drain or close the session.
    GoAway = 0x06,
}

impl FrameKind {
    /// The kind for a wire byte.
    pub const fn from_u8(b: u8) -> Option<FrameKind> {
        Some(match b {
            0x00 => FrameKind::Data,
            0x01 => FrameKind::Open,
            0x02 => FrameKind::Window,
            0x03 => FrameKind::Reset,
            0x04 => FrameKind::Ping,
            0x05 => FrameKind::Control,
            0x06 => FrameKind::GoAway,
            _ => return None,
        })
    }
    /// Whether frames of this kind belong to stream 0 (the session).
    pub const fn is_session(self) -> bool {
        matches!(
            self,
            FrameKind::Ping | FrameKind::Control | FrameKind::GoAway
        )
    }
    /// The flag bits defined for this kind.
    pub const fn allowed_flags(self) -> u8 {
        match self {
            FrameKind::Data => FLAG_FIN,
            FrameKind::Ping => FLAG_ACK,
            _ => 0,
        }
    }
    /// The exact payload length of fixed-size kinds.
    pub const fn fixed_len(self) -> Option<usize> {
        match self {
            FrameKind::Window | FrameKind::Reset => Some(4),
            FrameKind::Ping | FrameKind::GoAway => Some(8),
            _ => None,
        }
    }
    /// The largest payload of this kind.
    pub const fn max_len(self) -> usize {
        match self.fixed_len() {
            Some(n) => n,
            None => match self {
                FrameKind::Open => MAX_META,
                _ => MAX_PAYLOAD,
            },
        }
    }
}

/// `DATA` flag: the sender's direction ends after this payload.
pub const FLAG_FIN: u8 = 0x01;
/// `PING` flag: this is the answer.
pub const FLAG_ACK: u8 = 0x01;

/// A header that passed the checks of PROTOCOL.md section 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Frame kind.
    pub kind: FrameKind,
    /// Flag bits, only defined ones.
    pub flags: u8,
    /// Payload length, within the kind's limit.
    pub len: u16,
    /// Stream id; `None` for session frames.
    pub stream: Option<StreamId>,
}

/// Why a header was refused. Every variant is a session error; [`code`] is
/// what the receiver puts in its `GOAWAY`.
///
/// [`code`]: HeaderError::code
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// The kind byte is not in the table.
    UnknownKind(u8),
    /// A flag bit that the kind does not define is set.
    UndefinedFlags {
        /// Frame kind.
        kind: FrameKind,
        /// The flag byte as received.
        flags: u8,
    },
    /// A session frame on a stream, or a stream frame on stream 0 (or an id above 2^31-1).
    WrongStream {
        /// Frame kind.
        kind: FrameKind,
        /// Stream id as received.
        stream: u32,
    },
    /// The length is over the kind's limit or not its fixed size.
    BadLength {
        /// Frame kind.
        kind: FrameKind,
        /// Length as received.
        len: u16,
    },
}

impl HeaderError {
    /// The `GOAWAY` code for this error.
    pub const fn code(self) -> ErrorCode {
        match self {
            HeaderError::BadLength { .. } => ErrorCode::FRAME_SIZE,
            _ => ErrorCode::PROTOCOL,
        }
    }
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            HeaderError::UnknownKind(k) => write!(f, "unknown frame kind 0x{k:02x}"),
            HeaderError::UndefinedFlags { kind, flags } => {
                write!(f, "undefined flags 0x{flags:02x} on {kind:?}")
            }
            HeaderError::WrongStream { kind, stream } => {
                write!(f, "{kind:?} frame on stream {stream}")
            }
            HeaderError::BadLength { kind, len } => {
                write!(
                    f,
                    "{kind:?} frame of {len} bytes (limit {})",
                    kind.max_len()
                )
            }
        }
    }
}

impl FrameHeader {
    /// A header for a stream frame.
    pub const fn stream(kind: FrameKind, flags: u8, len: u16, id: StreamId) -> FrameHeader {
        FrameHeader {
            kind,
            flags,
            len,
            stream: Some(id),
        }
    }
    /// A header for a session frame.
    pub const fn session(kind: FrameKind, flags: u8, len: u16) -> FrameHeader {
        FrameHeader {
            kind,
            flags,
            len,
            stream: None,
        }
    }

    /// Decodes and checks a header.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<FrameHeader, HeaderError> {
        let kind = FrameKind::from_u8(b[0]).ok_or(HeaderError::UnknownKind(b[0]))?;
        let flags = b[1];
        let len = u16::from_be_bytes([b[2], b[3]]);
        let raw = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
        if flags & !kind.allowed_flags() != 0 {
            return Err(HeaderError::UndefinedFlags { kind, flags });
        }
        let stream = match (kind.is_session(), raw) {
            (true, 0) => None,
            (false, _) => match StreamId::new(raw) {
                Some(id) => Some(id),
                None => return Err(HeaderError::WrongStream { kind, stream: raw }),
            },
            (true, _) => return Err(HeaderError::WrongStream { kind, stream: raw }),
        };
        let ok = match kind.fixed_len() {
            Some(n) => len as usize == n,
            None => len as usize <= kind.max_len(),
        };
        if !ok {
            return Err(HeaderError::BadLength { kind, len });
        }
        Ok(FrameHeader {
            kind,
            flags,
            len,
            stream,
        })
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.kind as u8;
        b[1] = self.flags;
        b[2..4].copy_from_slice(&self.len.to_be_bytes());
        let id = self.stream.map_or(0, StreamId::get);
        b[4..8].copy_from_slice(&id.to_be_bytes());
        b
    }
}

/// Writes one whole frame (header and payload) at the start of `out`; returns
/// its length, or `None` if `out` is too small. For tests, tools and fuzzing:
/// the multiplexer encodes its own frames.
pub fn write_frame(out: &mut [u8], header: FrameHeader, payload: &[u8]) -> Option<usize> {
    let total = HEADER_LEN + payload.len();
    if out.len() < total || payload.len() != header.len as usize {
        return None;
    }
    out[..HEADER_LEN].copy_from_slice(&header.encode());
    out[HEADER_LEN..total].copy_from_slice(payload);
    Some(total)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = FrameHeader::stream(FrameKind::Data, FLAG_FIN, 1234, StreamId::new(7).unwrap());
        assert_eq!(FrameHeader::decode(&h.encode()), Ok(h));
        let p = FrameHeader::session(FrameKind::Ping, FLAG_ACK, 8);
        assert_eq!(FrameHeader::decode(&p.encode()), Ok(p));
    }

    #[test]
    fn header_is_big_endian() {
        let h = FrameHeader::stream(FrameKind::Window, 0, 4, StreamId::new(0x0102_0304).unwrap());
        assert_eq!(h.encode(), [2, 0, 0, 4, 1, 2, 3, 4]);
    }

    #[test]
    fn unknown_kind_is_protocol_error() {
        let e = FrameHeader::decode(&[0x7f, 0, 0, 0, 0, 0, 0, 1]).unwrap_err();
        assert_eq!(e, HeaderError::UnknownKind(0x7f));
        assert_eq!(e.code(), ErrorCode::PROTOCOL);
    }

    #[test]
    fn oversized_length_is_frame_size_error() {
        let len = (MAX_PAYLOAD as u16 + 1).to_be_bytes();
        let e = FrameHeader::decode(&[0, 0, len[0], len[1], 0, 0, 0, 1]).unwrap_err();
        assert_eq!(e.code(), ErrorCode::FRAME_SIZE);
        let e = FrameHeader::decode(&[1, 0, 0x02, 0x01, 0, 0, 0, 1]).unwrap_err();
        assert_eq!(
            e,
            HeaderError::BadLength {
                kind: FrameKind::Open,
                len: 513
            }
        );
        let e = FrameHeader::decode(&[2, 0, 0, 5, 0, 0, 0, 1]).unwrap_err();
        assert_eq!(e.code(), ErrorCode::FRAME_SIZE);
    }

    #[test]
    fn wrong_stream_and_flags_are_protocol_errors() {
        assert!(matches!(
            FrameHeader::decode(&[0, 0, 0, 0, 0, 0, 0, 0]),
            Err(HeaderError::WrongStream { .. })
        ));
        assert!(matches!(
            FrameHeader::decode(&[4, 0, 0, 8, 0, 0, 0, 3]),
            Err(HeaderError::WrongStream { .. })
        ));
        assert!(matches!(
            FrameHeader::decode(&[0, 0, 0, 0, 0x80, 0, 0, 1]),
            Err(HeaderError::WrongStream { .. })
        ));
        assert!(matches!(
            FrameHeader::decode(&[0, 0x02, 0, 0, 0, 0, 0, 1]),
            Err(HeaderError::UndefinedFlags { .. })
        ));
    }
}
