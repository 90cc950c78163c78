//! What nodes send each other on the files protocol ([`FILES`]).
//!
//! A files connection carries two things:
//!
//! - **Control messages** ([`FileFrame`], postcard, at most
//!   [`MAX_FILE_FRAME_LEN`] bytes each) on the connection's message
//!   channel: a sender offers a file ([`FileFrame::Offer`]: id, BLAKE3
//!   root hash, size, suggested name, whether it would compress), the
//!   receiver accepts or refuses it, reports progress, and says when it
//!   holds and has verified all of it; either side may cancel.
//! - **Data**, on one bidirectional QUIC stream per request, opened by the
//!   receiver: it writes a [`RangeRequest`] (length-prefixed), the chunk
//!   groups it still lacks, and the sender answers on the same stream with
//!   raw BLAKE3-verified-streaming bytes (bao-tree, 16 KiB chunk groups:
//!   the hash pairs the receiver needs to check each group against the
//!   root, interleaved with the groups' bytes), zstd-compressed if the
//!   request asked for it. No envelope per chunk, no base64.
//!
//! Whoever dialled, the side that holds the file serves streams and the
//! side that receives opens them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::transport::Protocol;

/// The files protocol's ALPN.
pub const FILES: Protocol = Protocol::new("mesh-sdk/files/1");
/// The largest control message, in bytes.
pub const MAX_FILE_FRAME_LEN: usize = 4096;
/// The largest range request, in bytes (its length prefix is 2 bytes).
pub const MAX_REQUEST_LEN: usize = 8192;
/// The most ranges one request names.
pub const MAX_REQUEST_RANGES: usize = 256;
/// The longest reason or message in a frame.
pub const MAX_REASON_LEN: usize = 512;
/// Bytes of a chunk group: the unit a receiver verifies and resumes by.
pub const GROUP_LEN: u64 = 16 * 1024;

/// Names one transfer; chosen at random by the sender.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TransferId(pub [u8; 16]);

impl TransferId {
    /// A fresh random id.
    pub fn random() -> Self {
        TransferId(rand::random())
    }
}

impl fmt::Display for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TransferId({self})")
    }
}

impl FromStr for TransferId {
    type Err = FileFrameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || FileFrameError::Malformed(format!("{s:?} is not a transfer id"));
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(TransferId(out))
    }
}

/// A BLAKE3 root hash, shown as hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FileHash(pub [u8; 32]);

impl fmt::Display for FileHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for FileHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FileHash({self})")
    }
}

/// A file offered to the receiver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// The transfer.
    pub id: TransferId,
    /// The file's BLAKE3 root hash: everything received is checked
    /// against it.
    pub hash: FileHash,
    /// Its size in bytes (checked too: the last group proves it).
    pub size: u64,
    /// The name the sender suggests (the receiver checks it:
    /// [`check_name`](super::check_name)).
    pub name: String,
    /// Whether the sender would compress (zstd) and expects it to pay
    /// (a sample of the file compressed well).
    pub zstd: bool,
}

/// Why a receiver refuses a file (stable codes).
pub mod refusals {
    /// The name is not a plain, portable file name.
    pub const BAD_NAME: &str = "bad_name";
    /// Larger than the receiver's policy allows.
    pub const TOO_LARGE: &str = "too_large";
    /// The sender may not send files here (scope or policy).
    pub const FORBIDDEN: &str = "forbidden";
    /// The receiver takes no more transfers now.
    pub const BUSY: &str = "busy";
    /// Not enough room on the receiver's disk.
    pub const NO_SPACE: &str = "no_space";
}

/// One control message of a files connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileFrame {
    /// Sender → receiver: a file to take.
    Offer(Offer),
    /// Receiver → sender: it will pull the file (from `received` bytes
    /// already verified, when resuming).
    Accept {
        /// The transfer.
        id: TransferId,
        /// Bytes it already holds verified.
        received: u64,
    },
    /// Receiver → sender: it will not take the file.
    Refuse {
        /// The transfer.
        id: TransferId,
        /// A stable code ([`refusals`]).
        code: String,
        /// What was wrong.
        message: String,
    },
    /// Receiver → sender: bytes verified so far.
    Progress {
        /// The transfer.
        id: TransferId,
        /// Bytes verified.
        received: u64,
    },
    /// Receiver → sender: every byte is there and verified.
    Done {
        /// The transfer.
        id: TransferId,
    },
    /// Either way: the transfer is stopped.
    Cancel {
        /// The transfer.
        id: TransferId,
        /// Why.
        reason: String,
    },
    /// A media stream starts (its groups then come on uni streams).
    MediaOpen(crate::media::MediaOpen),
    /// A media stream ends (after its last group).
    MediaClose {
        /// The stream.
        stream_id: crate::media::StreamId,
    },
    /// The receiver refuses a media stream.
    MediaRefuse {
        /// The stream.
        stream_id: crate::media::StreamId,
        /// Why.
        message: String,
    },
}

/// What a receiver asks for on a data stream: groups `[start, end)` of
/// the file with root `hash`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRequest {
    /// The transfer.
    pub id: TransferId,
    /// The file's root hash.
    pub hash: FileHash,
    /// Chunk-group ranges, sorted, disjoint, not touching, not empty.
    pub groups: Vec<(u64, u64)>,
    /// Whether to compress the answer with zstd.
    pub zstd: bool,
}

/// Why a frame or request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FileFrameError {
    /// Too many bytes.
    #[error("a files message of {0} bytes is too large")]
    TooLarge(usize),
    /// Not a message.
    #[error("not a files message: {0}")]
    Malformed(String),
    /// A field out of bounds.
    #[error("invalid files message: {0}")]
    Invalid(String),
}

impl FileFrame {
    /// The frame's bytes.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing these types into a Vec cannot fail.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// A frame from `bytes`, checked.
    pub fn decode(bytes: &[u8]) -> Result<Self, FileFrameError> {
        if bytes.len() > MAX_FILE_FRAME_LEN {
            return Err(FileFrameError::TooLarge(bytes.len()));
        }
        let frame: FileFrame = match postcard::take_from_bytes(bytes) {
            Ok((f, [])) => f,
            Ok((_, rest)) => {
                return Err(FileFrameError::Malformed(format!(
                    "{} trailing bytes",
                    rest.len()
                )));
            }
            Err(e) => return Err(FileFrameError::Malformed(e.to_string())),
        };
        match &frame {
            FileFrame::Offer(o) if o.name.len() > super::MAX_NAME_LEN * 4 => Err(
                FileFrameError::Invalid("the offered name is too long".into()),
            ),
            FileFrame::Refuse { code, message, .. }
                if code.len() > 64 || message.len() > MAX_REASON_LEN =>
            {
                Err(FileFrameError::Invalid("a refusal too long".into()))
            }
            FileFrame::Cancel { reason, .. }
            | FileFrame::MediaRefuse {
                message: reason, ..
            } if reason.len() > MAX_REASON_LEN => {
                Err(FileFrameError::Invalid("a reason too long".into()))
            }
            FileFrame::MediaOpen(open) => crate::media::MediaOpen::decode(&open.encode())
                .map(|_| frame.clone())
                .map_err(|e| FileFrameError::Invalid(e.to_string())),
            _ => Ok(frame),
        }
    }
}

impl RangeRequest {
    /// The request as written on a data stream: a 2-byte big-endian length,
    /// then postcard.
    pub fn encode(&self) -> Vec<u8> {
        prefixed(self)
    }

    /// The body's length from a stream's first two bytes.
    pub fn body_len(prefix: [u8; 2]) -> Result<usize, FileFrameError> {
        prefixed_len(prefix, MAX_REQUEST_LEN).map_err(FileFrameError::TooLarge)
    }

    /// A request from its body (after the length prefix), checked against
    /// a file of `groups_total` chunk groups when known.
    pub fn decode(body: &[u8]) -> Result<Self, FileFrameError> {
        if body.len() > MAX_REQUEST_LEN {
            return Err(FileFrameError::TooLarge(body.len()));
        }
        let req: RangeRequest = match postcard::take_from_bytes(body) {
            Ok((r, [])) => r,
            Ok((_, rest)) => {
                return Err(FileFrameError::Malformed(format!(
                    "{} trailing bytes",
                    rest.len()
                )));
            }
            Err(e) => return Err(FileFrameError::Malformed(e.to_string())),
        };
        if req.groups.is_empty() || req.groups.len() > MAX_REQUEST_RANGES {
            return Err(FileFrameError::Invalid(format!(
                "{} ranges (1 to {MAX_REQUEST_RANGES})",
                req.groups.len()
            )));
        }
        let mut last_end: Option<u64> = None;
        for &(start, end) in &req.groups {
            if start >= end || last_end.is_some_and(|e| start <= e) {
                return Err(FileFrameError::Invalid(
                    "ranges must be sorted, disjoint, apart and not empty".into(),
                ));
            }
            last_end = Some(end);
        }
        Ok(req)
    }

    /// Checks the ranges against a file of `size` bytes.
    pub fn check_size(&self, size: u64) -> Result<(), FileFrameError> {
        let total = groups_of(size);
        match self.groups.last() {
            Some(&(_, end)) if end > total => Err(FileFrameError::Invalid(format!(
                "group {end} past the file's {total}"
            ))),
            _ => Ok(()),
        }
    }
}

/// `value` as a data stream starts with it: a 2-byte big-endian length,
/// then postcard.
pub(crate) fn prefixed<T: Serialize>(value: &T) -> Vec<u8> {
    let body = postcard::to_allocvec(value).unwrap_or_default();
    let mut out = Vec::with_capacity(body.len() + 2);
    out.extend_from_slice(&u16::try_from(body.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// The body length a 2-byte `prefix` announces, if 1 to `max` (else the
/// length, as the error).
pub(crate) fn prefixed_len(prefix: [u8; 2], max: usize) -> Result<usize, usize> {
    let n = usize::from(u16::from_be_bytes(prefix));
    if n == 0 || n > max {
        return Err(n);
    }
    Ok(n)
}

/// Chunk groups of a file of `size` bytes (at least one: an empty file is
/// one empty group).
pub fn groups_of(size: u64) -> u64 {
    size.div_ceil(GROUP_LEN).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> TransferId {
        TransferId([7; 16])
    }

    #[test]
    fn frames_round_trip() {
        let frames = vec![
            FileFrame::Offer(Offer {
                id: id(),
                hash: FileHash([1; 32]),
                size: 300_000_000,
                name: "video.mp4".into(),
                zstd: false,
            }),
            FileFrame::Accept {
                id: id(),
                received: 5,
            },
            FileFrame::Refuse {
                id: id(),
                code: refusals::BAD_NAME.into(),
                message: "no".into(),
            },
            FileFrame::Progress {
                id: id(),
                received: 1 << 20,
            },
            FileFrame::Done { id: id() },
            FileFrame::Cancel {
                id: id(),
                reason: "user".into(),
            },
            FileFrame::MediaOpen(crate::media::MediaOpen {
                stream_id: 3,
                kind: crate::media::MediaKind::Audio,
                codec: "opus".into(),
            }),
            FileFrame::MediaClose { stream_id: 3 },
            FileFrame::MediaRefuse {
                stream_id: 3,
                message: "no".into(),
            },
        ];
        for f in frames {
            assert_eq!(FileFrame::decode(&f.encode()), Ok(f));
        }
    }

    #[test]
    fn bad_frames_are_typed_errors() {
        assert!(matches!(
            FileFrame::decode(&[0xff; 10]),
            Err(FileFrameError::Malformed(_))
        ));
        assert!(matches!(
            FileFrame::decode(&vec![0; MAX_FILE_FRAME_LEN + 1]),
            Err(FileFrameError::TooLarge(_))
        ));
        let mut extra = FileFrame::Done { id: id() }.encode();
        extra.push(0);
        assert!(matches!(
            FileFrame::decode(&extra),
            Err(FileFrameError::Malformed(_))
        ));
        let long = FileFrame::Cancel {
            id: id(),
            reason: "x".repeat(MAX_REASON_LEN + 1),
        };
        assert!(matches!(
            FileFrame::decode(&long.encode()),
            Err(FileFrameError::Invalid(_))
        ));
    }

    #[test]
    fn range_requests_are_checked() {
        let ok = RangeRequest {
            id: id(),
            hash: FileHash([2; 32]),
            groups: vec![(0, 4), (6, 9)],
            zstd: true,
        };
        let wire = ok.encode();
        let n = RangeRequest::body_len([wire[0], wire[1]]).unwrap();
        assert_eq!(n, wire.len() - 2);
        let back = RangeRequest::decode(&wire[2..]).unwrap();
        assert_eq!(back, ok);
        assert!(back.check_size(9 * GROUP_LEN).is_ok());
        assert!(back.check_size(8 * GROUP_LEN).is_err());
        for groups in [
            vec![],
            vec![(3, 3)],
            vec![(4, 2)],
            vec![(0, 4), (4, 6)],
            vec![(5, 8), (0, 2)],
            (0..=MAX_REQUEST_RANGES as u64)
                .map(|i| (2 * i, 2 * i + 1))
                .collect(),
        ] {
            let r = RangeRequest {
                groups,
                ..ok.clone()
            };
            let wire = r.encode();
            assert!(RangeRequest::decode(&wire[2..]).is_err(), "{r:?}");
        }
        assert!(RangeRequest::body_len([0, 0]).is_err());
        assert!(RangeRequest::body_len([0xff, 0xff]).is_err());
    }

    #[test]
    fn ids_print_and_parse() {
        let i = TransferId([0xab; 16]);
        assert_eq!(i.to_string(), "ab".repeat(16));
        assert_eq!(i.to_string().parse::<TransferId>().unwrap(), i);
        assert!("xyz".parse::<TransferId>().is_err());
        assert!("zz".repeat(16).parse::<TransferId>().is_err());
        assert_eq!(groups_of(0), 1);
        assert_eq!(groups_of(1), 1);
        assert_eq!(groups_of(GROUP_LEN), 1);
        assert_eq!(groups_of(GROUP_LEN + 1), 2);
    }
}
