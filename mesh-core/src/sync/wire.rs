//! What nodes send each other on the sync protocol ([`SYNC`]).
//!
//! Every message of a sync connection is one postcard-encoded
//! [`SyncFrame`] of at most [`MAX_SYNC_FRAME_LEN`] bytes. Connections are
//! one-way: each node dials the peers it sends to, pinned to their node
//! id, so the sender of a frame is always the connection's authenticated
//! peer.
//!
//! - [`SyncFrame::Push`]: changes the sender just made (its own, never
//!   relayed: a push whose changes name another origin is refused).
//! - [`SyncFrame::Digest`]: the sender's version vector per namespace
//!   (split over frames when large; the last says `all`). The receiver
//!   answers with a [`SyncFrame::Delta`] for every namespace in which it
//!   holds what the vector lacks (and, after the last frame, for those the
//!   sender did not name), and (when `reply` is set and the vector holds
//!   what the receiver lacks) with its own digest.
//! - [`SyncFrame::Delta`]: the changes a digest showed missing, with the
//!   vector they let the receiver claim; `more` asks for another round.

use serde::{Deserialize, Serialize};

use super::replica::{Change, Delta, VersionVector};
use super::store::valid_namespace;
use crate::transport::Protocol;

/// The sync protocol's ALPN.
pub const SYNC: Protocol = Protocol::new("mesh-sdk/sync/1");
/// The largest sync frame, in bytes (a delta's budget with room).
pub const MAX_SYNC_FRAME_LEN: usize = 960 * 1024;
/// The most namespaces one digest names.
pub const MAX_DIGEST_NAMESPACES: usize = 256;
/// The most origins one version vector names.
pub const MAX_VECTOR_ORIGINS: usize = 4096;
/// The most changes in one push or delta.
pub const MAX_FRAME_CHANGES: usize = 16 * 1024;

/// One message of a sync connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncFrame {
    /// Changes the sender made, as it made them.
    Push {
        /// Their namespace.
        namespace: String,
        /// The changes, each of origin the sender.
        changes: Vec<Change>,
    },
    /// What the sender's replicas account for.
    Digest {
        /// Per namespace, its version vector.
        vectors: Vec<(String, VersionVector)>,
        /// Whether the receiver should answer with its own digest when
        /// this one shows that the sender holds changes the receiver
        /// lacks (so both catch up in one exchange).
        reply: bool,
        /// Whether these are all the sender's namespaces (the last frame
        /// of a digest split over several): namespaces it does not name,
        /// it holds nothing of.
        all: bool,
    },
    /// What a digest showed the receiver lacks.
    Delta {
        /// The namespace.
        namespace: String,
        /// The changes and what they cover.
        delta: Delta,
    },
}

/// Why a sync frame is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SyncFrameError {
    /// Longer than [`MAX_SYNC_FRAME_LEN`].
    #[error("a sync frame of {0} bytes exceeds {MAX_SYNC_FRAME_LEN}")]
    TooLarge(usize),
    /// Not a frame.
    #[error("not a sync frame: {0}")]
    Malformed(String),
    /// A namespace name that is not one.
    #[error("not a namespace name")]
    BadNamespace,
    /// Over one of the counts above.
    #[error("too many {0} in one sync frame")]
    TooMany(&'static str),
}

impl SyncFrame {
    /// The frame's bytes.
    pub fn encode(&self) -> Vec<u8> {
        // Encoding plain data into a Vec cannot fail.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Parses one frame, refusing oversized ones, trailing bytes, bad
    /// namespace names and counts over the limits.
    pub fn decode(bytes: &[u8]) -> Result<Self, SyncFrameError> {
        if bytes.len() > MAX_SYNC_FRAME_LEN {
            return Err(SyncFrameError::TooLarge(bytes.len()));
        }
        let (frame, rest): (SyncFrame, _) = postcard::take_from_bytes(bytes)
            .map_err(|e| SyncFrameError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(SyncFrameError::Malformed("trailing bytes".into()));
        }
        frame.check()?;
        Ok(frame)
    }

    fn check(&self) -> Result<(), SyncFrameError> {
        let vector = |v: &VersionVector| {
            if v.len() > MAX_VECTOR_ORIGINS {
                Err(SyncFrameError::TooMany("origins"))
            } else {
                Ok(())
            }
        };
        let name = |ns: &str| {
            if valid_namespace(ns) {
                Ok(())
            } else {
                Err(SyncFrameError::BadNamespace)
            }
        };
        match self {
            SyncFrame::Push { namespace, changes } => {
                name(namespace)?;
                if changes.len() > MAX_FRAME_CHANGES {
                    return Err(SyncFrameError::TooMany("changes"));
                }
            }
            SyncFrame::Digest { vectors, .. } => {
                if vectors.len() > MAX_DIGEST_NAMESPACES {
                    return Err(SyncFrameError::TooMany("namespaces"));
                }
                for (ns, v) in vectors {
                    name(ns)?;
                    vector(v)?;
                }
            }
            SyncFrame::Delta { namespace, delta } => {
                name(namespace)?;
                vector(&delta.covers)?;
                if delta.changes.len() > MAX_FRAME_CHANGES {
                    return Err(SyncFrameError::TooMany("changes"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::NodeKey;
    use crate::sync::Hlc;

    fn change(key: &str) -> Change {
        Change {
            key: key.into(),
            value: Some(b"v".to_vec()),
            hlc: Hlc {
                ms: 1,
                counter: 0,
                node: NodeKey::from_secret_bytes(&[1; 32]).node_id(),
            },
            seq: 1,
        }
    }

    #[test]
    fn frames_round_trip() {
        let node = NodeKey::from_secret_bytes(&[1; 32]).node_id();
        for f in [
            SyncFrame::Push {
                namespace: "config".into(),
                changes: vec![change("a")],
            },
            SyncFrame::Digest {
                vectors: vec![("config".into(), [(node, 3)].into_iter().collect())],
                reply: true,
                all: true,
            },
            SyncFrame::Delta {
                namespace: "config".into(),
                delta: Delta {
                    changes: vec![change("b")],
                    covers: [(node, 1)].into_iter().collect(),
                    more: false,
                },
            },
        ] {
            assert_eq!(SyncFrame::decode(&f.encode()).unwrap(), f);
        }
    }

    #[test]
    fn bad_frames_are_refused_with_their_reason() {
        let good = SyncFrame::Push {
            namespace: "config".into(),
            changes: vec![change("a")],
        }
        .encode();
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(matches!(
            SyncFrame::decode(&trailing),
            Err(SyncFrameError::Malformed(_))
        ));
        assert!(matches!(
            SyncFrame::decode(&good[..good.len() - 1]),
            Err(SyncFrameError::Malformed(_))
        ));
        assert!(matches!(
            SyncFrame::decode(&vec![0; MAX_SYNC_FRAME_LEN + 1]),
            Err(SyncFrameError::TooLarge(_))
        ));
        let bad_ns = SyncFrame::Push {
            namespace: "Not:A:Name".into(),
            changes: vec![],
        }
        .encode();
        assert_eq!(
            SyncFrame::decode(&bad_ns),
            Err(SyncFrameError::BadNamespace)
        );
        let many = SyncFrame::Digest {
            vectors: (0..=MAX_DIGEST_NAMESPACES)
                .map(|i| (format!("n{i}"), VersionVector::new()))
                .collect(),
            reply: false,
            all: true,
        }
        .encode();
        assert_eq!(
            SyncFrame::decode(&many),
            Err(SyncFrameError::TooMany("namespaces"))
        );
    }
}
