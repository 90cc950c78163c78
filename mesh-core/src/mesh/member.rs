//! Who a member is: its signed identity, as membership (SWIM) carries it,
//! and the certificate a sponsor gives a node it let in.
//!
//! A [`MemberId`] is what `foca` knows a member by: node id, epoch, name and
//! addresses, signed by the member's own key. Anyone relaying it can only
//! pass it on or drop it; nobody can claim another node's id, addresses or
//! name, and nobody can push a member's epoch past what the member itself
//! signed (so a forged "newer identity" cannot lock a member out).
//!
//! * The **epoch** orders a member's identities: a restart takes the
//!   current wall-clock milliseconds (or one more than the stored epoch,
//!   whichever is larger), a rename or a renewal after being declared down
//!   takes one more. Of two identities of one node the higher epoch wins.
//! * foca's own **incarnation** (inside each update) refutes suspicion.
//!
//! A [`MemberCert`] is what makes a node a member in other members' eyes:
//! signed by the member that redeemed its join token. A member accepts a
//! membership connection from a node it already knows, or from one whose
//! certificate was signed by a member it knows.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::identity::{NodeId, NodeKey};
use crate::transport::PeerAddr;

/// The longest member name, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// The most addresses a member advertises.
pub const MAX_ADDRESSES: usize = 4;
/// The longest in-memory address name, in bytes.
const MAX_MEMORY_ADDR_LEN: usize = 64;

const IDENTITY_TAG: &[u8] = b"mesh-sdk/member-id/v1";
const CERT_TAG: &[u8] = b"mesh-sdk/member-cert/v1";

/// A member's identity, signed by its own key.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MemberId {
    node: NodeId,
    epoch: u64,
    name: String,
    addrs: Vec<PeerAddr>,
    #[serde(with = "serde_bytes")]
    sig: [u8; 64],
}

/// Why an identity or certificate is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MemberError {
    /// The name is empty, too long or has control characters.
    #[error("a member name is 1 to {MAX_NAME_LEN} bytes without control characters")]
    BadName,
    /// Too many addresses, or one that cannot be an address.
    #[error(
        "a member has at most {MAX_ADDRESSES} addresses, each a socket address or a short memory name"
    )]
    BadAddresses,
    /// The signature is not the claimed node's.
    #[error("the signature does not verify under the claimed node id")]
    BadSignature,
}

/// Whether `name` may be a member's name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME_LEN && !name.chars().any(char::is_control)
}

fn valid_addrs(addrs: &[PeerAddr]) -> bool {
    addrs.len() <= MAX_ADDRESSES
        && addrs.iter().all(|a| match a {
            PeerAddr::Socket(s) => s.port() != 0,
            PeerAddr::Memory(m) => !m.is_empty() && m.len() <= MAX_MEMORY_ADDR_LEN,
        })
}

impl MemberId {
    /// `key`'s identity at `epoch`, named `name`, reachable at `addrs`.
    pub fn new(
        key: &NodeKey,
        epoch: u64,
        name: &str,
        addrs: Vec<PeerAddr>,
    ) -> Result<Self, MemberError> {
        if !valid_name(name) {
            return Err(MemberError::BadName);
        }
        if !valid_addrs(&addrs) {
            return Err(MemberError::BadAddresses);
        }
        let node = key.node_id();
        let sig = key.sign(&Self::signed_bytes(&node, epoch, name, &addrs));
        Ok(MemberId {
            node,
            epoch,
            name: name.to_owned(),
            addrs,
            sig,
        })
    }

    fn signed_bytes(node: &NodeId, epoch: u64, name: &str, addrs: &[PeerAddr]) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(IDENTITY_TAG);
        out.extend_from_slice(node.as_bytes());
        out.extend_from_slice(&epoch.to_be_bytes());
        // postcard of plain data cannot fail; an empty body would only make
        // the signature not verify.
        out.extend_from_slice(&postcard::to_allocvec(&(name, addrs)).unwrap_or_default());
        out
    }

    /// Checks the shape and the signature.
    pub fn verify(&self) -> Result<(), MemberError> {
        if !valid_name(&self.name) {
            return Err(MemberError::BadName);
        }
        if !valid_addrs(&self.addrs) {
            return Err(MemberError::BadAddresses);
        }
        self.node
            .verify(
                &Self::signed_bytes(&self.node, self.epoch, &self.name, &self.addrs),
                &self.sig,
            )
            .map_err(|_| MemberError::BadSignature)
    }

    /// The member's node id.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// This identity's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The member's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the member says it can be reached.
    pub fn addrs(&self) -> &[PeerAddr] {
        &self.addrs
    }

    /// A short digest of the whole identity (the verification cache's key).
    pub(crate) fn digest(&self) -> [u8; 32] {
        let mut bytes = Self::signed_bytes(&self.node, self.epoch, &self.name, &self.addrs);
        bytes.extend_from_slice(&self.sig);
        crate::crypto::tagged_sha256(IDENTITY_TAG, &bytes)
    }
}

impl fmt::Debug for MemberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemberId")
            .field("node", &self.node)
            .field("epoch", &self.epoch)
            .field("name", &self.name)
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

impl foca::Identity for MemberId {
    type Addr = NodeId;

    /// Renewing needs the member's key, which foca does not hold: the mesh
    /// renews by hand when foca reports the identity down.
    fn renew(&self) -> Option<Self> {
        None
    }

    fn addr(&self) -> NodeId {
        self.node
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.epoch > adversary.epoch
    }
}

/// A sponsor's word that `member` was let into the mesh.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberCert {
    /// The node let in.
    pub member: NodeId,
    /// The member that let it in (redeemed its token); equal to `member`
    /// for the node that started the mesh.
    pub sponsor: NodeId,
    /// When.
    pub issued_at: Timestamp,
    #[serde(with = "serde_bytes")]
    sig: [u8; 64],
}

impl MemberCert {
    /// `sponsor_key`'s certificate for `member`, issued at `now`.
    pub fn issue(sponsor_key: &NodeKey, member: NodeId, now: Timestamp) -> Self {
        let sponsor = sponsor_key.node_id();
        let sig = sponsor_key.sign(&Self::signed_bytes(&member, &sponsor, now));
        MemberCert {
            member,
            sponsor,
            issued_at: now,
            sig,
        }
    }

    fn signed_bytes(member: &NodeId, sponsor: &NodeId, at: Timestamp) -> Vec<u8> {
        let mut out = Vec::with_capacity(CERT_TAG.len() + 72);
        out.extend_from_slice(CERT_TAG);
        out.extend_from_slice(member.as_bytes());
        out.extend_from_slice(sponsor.as_bytes());
        out.extend_from_slice(&at.as_millis().to_be_bytes());
        out
    }

    /// Checks the sponsor's signature.
    pub fn verify(&self) -> Result<(), MemberError> {
        self.sponsor
            .verify(
                &Self::signed_bytes(&self.member, &self.sponsor, self.issued_at),
                &self.sig,
            )
            .map_err(|_| MemberError::BadSignature)
    }
}

impl fmt::Debug for MemberCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemberCert")
            .field("member", &self.member)
            .field("sponsor", &self.sponsor)
            .field("issued_at", &self.issued_at)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_verify_and_any_change_breaks_them() {
        let key = NodeKey::generate();
        let id = MemberId::new(&key, 7, "desk", vec![PeerAddr::Memory("a".into())]).unwrap();
        id.verify().unwrap();
        let mut renamed = id.clone();
        renamed.name = "evil".into();
        assert_eq!(renamed.verify(), Err(MemberError::BadSignature));
        let mut bumped = id.clone();
        bumped.epoch = u64::MAX;
        assert_eq!(bumped.verify(), Err(MemberError::BadSignature));
        let mut moved = id.clone();
        moved.addrs = vec![PeerAddr::Memory("b".into())];
        assert_eq!(moved.verify(), Err(MemberError::BadSignature));
        let mut stolen = id.clone();
        stolen.node = NodeKey::generate().node_id();
        assert_eq!(stolen.verify(), Err(MemberError::BadSignature));
        assert_eq!(
            MemberId::new(&key, 1, "", vec![]).unwrap_err(),
            MemberError::BadName
        );
        assert_eq!(
            MemberId::new(&key, 1, "x", vec![PeerAddr::Memory("m".into()); 5]).unwrap_err(),
            MemberError::BadAddresses
        );
    }

    #[test]
    fn certificates_verify_under_their_sponsor_only() {
        let sponsor = NodeKey::generate();
        let member = NodeKey::generate().node_id();
        let cert = MemberCert::issue(&sponsor, member, Timestamp::from_millis(5));
        cert.verify().unwrap();
        let mut forged = cert.clone();
        forged.member = NodeKey::generate().node_id();
        assert_eq!(forged.verify(), Err(MemberError::BadSignature));
        let mut resigned = cert;
        resigned.sponsor = NodeKey::generate().node_id();
        assert_eq!(resigned.verify(), Err(MemberError::BadSignature));
    }
}
