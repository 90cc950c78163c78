//! The media wire format.
//!
//! A media stream opens with a [`MediaOpen`] control message (stream id,
//! kind, codec label). Each group then travels on a QUIC uni stream of its
//! own: a [`GroupHeader`] (2-byte length, then postcard: stream id, group
//! number, the deadline of its frames relative to each one's timestamp),
//! followed by frames, each a [`FrameRecord`]: 4-byte big-endian length of
//! what follows, 8-byte sequence number, 8-byte timestamp (µs of the
//! sender's media clock), 1 flag byte (bit 0: key frame), the payload.
//! Nothing in a frame is trusted beyond its bounds.

use serde::{Deserialize, Serialize};

/// The largest frame payload (1 MiB: a video key frame fits).
pub const MAX_FRAME_LEN: usize = 1 << 20;
/// The largest group header, in bytes.
pub const MAX_HEADER_LEN: usize = 256;
/// The longest codec label.
pub const MAX_CODEC_LEN: usize = 64;
/// Bytes of a frame record before its payload (length, seq, timestamp,
/// flags).
pub const FRAME_PREFIX_LEN: usize = 4 + 8 + 8 + 1;

/// Names a media stream between two nodes (chosen by the sender).
pub type StreamId = u32;

/// What a stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MediaKind {
    /// Audio: small frames, the highest priority.
    Audio,
    /// Video: groups start at key frames.
    Video,
    /// Anything else an app streams.
    Data,
}

impl MediaKind {
    /// `audio`, `video` or `data`.
    pub fn as_str(self) -> &'static str {
        match self {
            MediaKind::Audio => "audio",
            MediaKind::Video => "video",
            MediaKind::Data => "data",
        }
    }
}

impl std::str::FromStr for MediaKind {
    type Err = MediaWireError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "audio" => Ok(MediaKind::Audio),
            "video" => Ok(MediaKind::Video),
            "data" => Ok(MediaKind::Data),
            other => Err(MediaWireError::Invalid(format!(
                "{other:?} is not audio, video or data"
            ))),
        }
    }
}

/// Opens a media stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaOpen {
    /// The stream.
    pub stream_id: StreamId,
    /// What it carries.
    pub kind: MediaKind,
    /// The codec label (`opus`, `h264`, …), for the app; 1 to 64 printable
    /// ASCII bytes.
    pub codec: String,
}

/// Why media bytes are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MediaWireError {
    /// Over a bound.
    #[error("media message too large: {0} bytes")]
    TooLarge(usize),
    /// Not a message.
    #[error("not a media message: {0}")]
    Malformed(String),
    /// A field out of bounds.
    #[error("invalid media message: {0}")]
    Invalid(String),
}

fn take<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, MediaWireError> {
    match postcard::take_from_bytes(bytes) {
        Ok((v, [])) => Ok(v),
        Ok((_, rest)) => Err(MediaWireError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        ))),
        Err(e) => Err(MediaWireError::Malformed(e.to_string())),
    }
}

impl MediaOpen {
    /// The message's bytes.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// A message from `bytes`, checked.
    pub fn decode(bytes: &[u8]) -> Result<Self, MediaWireError> {
        if bytes.len() > MAX_HEADER_LEN {
            return Err(MediaWireError::TooLarge(bytes.len()));
        }
        let open: MediaOpen = take(bytes)?;
        if open.codec.is_empty()
            || open.codec.len() > MAX_CODEC_LEN
            || !open.codec.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(MediaWireError::Invalid(
                "a codec label is 1 to 64 printable ASCII bytes".into(),
            ));
        }
        Ok(open)
    }
}

/// The start of a group's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupHeader {
    /// The media stream.
    pub stream_id: StreamId,
    /// The group's number (increasing).
    pub group: u64,
    /// Milliseconds after each frame's timestamp past which it may not be
    /// delivered (the sender resets the group's stream once its newest
    /// frame is that old).
    pub deadline_ms: u32,
}

impl GroupHeader {
    /// The header as written: 2-byte length, then postcard.
    pub fn encode(&self) -> Vec<u8> {
        crate::files::wire::prefixed(self)
    }

    /// The body's length from its 2-byte prefix.
    pub fn body_len(prefix: [u8; 2]) -> Result<usize, MediaWireError> {
        crate::files::wire::prefixed_len(prefix, MAX_HEADER_LEN).map_err(MediaWireError::TooLarge)
    }

    /// A header from its body.
    pub fn decode(body: &[u8]) -> Result<Self, MediaWireError> {
        if body.len() > MAX_HEADER_LEN {
            return Err(MediaWireError::TooLarge(body.len()));
        }
        take(body)
    }
}

/// One frame as it travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameRecord {
    /// Its sequence number in the stream (from 0, one per frame).
    pub seq: u64,
    /// Its timestamp, µs of the sender's media clock.
    pub timestamp_us: u64,
    /// Whether it is a key frame (starts a group).
    pub key: bool,
    /// The app's bytes.
    pub payload: Vec<u8>,
}

impl FrameRecord {
    /// Appends the record's bytes to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let len = u32::try_from(self.payload.len() + FRAME_PREFIX_LEN - 4).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.timestamp_us.to_be_bytes());
        out.push(u8::from(self.key));
        out.extend_from_slice(&self.payload);
    }

    /// The bytes still to read for the record whose 4-byte length prefix
    /// is `prefix` (checked against [`MAX_FRAME_LEN`]).
    pub fn rest_len(prefix: [u8; 4]) -> Result<usize, MediaWireError> {
        let n = u32::from_be_bytes(prefix) as usize;
        if n < FRAME_PREFIX_LEN - 4 {
            return Err(MediaWireError::Malformed(format!("a frame of {n} bytes")));
        }
        if n - (FRAME_PREFIX_LEN - 4) > MAX_FRAME_LEN {
            return Err(MediaWireError::TooLarge(n));
        }
        Ok(n)
    }

    /// A record from what follows its length prefix.
    pub fn decode(rest: &[u8]) -> Result<Self, MediaWireError> {
        if rest.len() < FRAME_PREFIX_LEN - 4 {
            return Err(MediaWireError::Malformed("a frame too short".into()));
        }
        if rest.len() - (FRAME_PREFIX_LEN - 4) > MAX_FRAME_LEN {
            return Err(MediaWireError::TooLarge(rest.len()));
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&rest[..8]);
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&rest[8..16]);
        let flags = rest[16];
        if flags > 1 {
            return Err(MediaWireError::Invalid(format!("flags {flags:#04x}")));
        }
        Ok(FrameRecord {
            seq: u64::from_be_bytes(seq),
            timestamp_us: u64::from_be_bytes(ts),
            key: flags == 1,
            payload: rest[17..].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_bad_ones_are_typed() {
        let open = MediaOpen {
            stream_id: 7,
            kind: MediaKind::Video,
            codec: "h264".into(),
        };
        assert_eq!(MediaOpen::decode(&open.encode()), Ok(open.clone()));
        for codec in ["", "a b", &"x".repeat(65), "é"] {
            let bad = MediaOpen {
                codec: codec.into(),
                ..open.clone()
            };
            assert!(MediaOpen::decode(&bad.encode()).is_err(), "{codec:?}");
        }
        let h = GroupHeader {
            stream_id: 7,
            group: 42,
            deadline_ms: 400,
        };
        let wire = h.encode();
        assert_eq!(
            GroupHeader::body_len([wire[0], wire[1]]),
            Ok(wire.len() - 2)
        );
        assert_eq!(GroupHeader::decode(&wire[2..]), Ok(h));
        assert!(GroupHeader::body_len([0, 0]).is_err());
        assert!(GroupHeader::body_len([0xff, 0xff]).is_err());
        let f = FrameRecord {
            seq: 9,
            timestamp_us: 33_333,
            key: true,
            payload: vec![1, 2, 3],
        };
        let mut out = Vec::new();
        f.encode_into(&mut out);
        let n = FrameRecord::rest_len([out[0], out[1], out[2], out[3]]).unwrap();
        assert_eq!(n, out.len() - 4);
        assert_eq!(FrameRecord::decode(&out[4..]), Ok(f));
        assert!(FrameRecord::rest_len(u32::MAX.to_be_bytes()).is_err());
        assert!(FrameRecord::rest_len(3u32.to_be_bytes()).is_err());
        let mut bad_flags = out.clone();
        bad_flags[4 + 16] = 9;
        assert!(FrameRecord::decode(&bad_flags[4..]).is_err());
        assert_eq!("audio".parse::<MediaKind>(), Ok(MediaKind::Audio));
        assert!("smell".parse::<MediaKind>().is_err());
    }
}
