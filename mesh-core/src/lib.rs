//! The core of the mesh SDK: node identity, sealing, the signed wire format and
//! the clock, on which pairing, health, membership and the node runtime build.
//!
//! A mesh is one desktop **primary** and any number of **workers** (desktop,
//! iOS, Android, web). Every node has a long-lived ed25519 key whose public half
//! is its [`NodeId`](identity::NodeId). Messages travel in signed
//! [envelopes](wire::Envelope); payloads meant for one node can be sealed to it
//! so relays cannot read them.
//!
//! # Example
//!
//! ```
//! use mesh_core::clock::{Clock, SystemClock};
//! use mesh_core::identity::NodeKey;
//! use mesh_core::wire::{self, Destination, Envelope, Payload, ReplayConfig, ReplayGuard};
//!
//! // Each node has a key; its public half is its id.
//! let primary = NodeKey::generate();
//! let worker = NodeKey::generate();
//!
//! // The worker sends the primary a heartbeat, sealed so only the primary can read it.
//! let heartbeat = Payload::Heartbeat(wire::Heartbeat { seq: 1, metrics: Default::default() });
//! let now = SystemClock.now();
//! let frame = Envelope::new_sealed(worker.node_id(), primary.node_id(), now, &heartbeat)?
//!     .sign(&worker)?
//!     .to_frame()?;
//!
//! // The primary decodes, verifies the signature, refuses replays, and opens it.
//! let (unverified, _) = wire::decode_frame(&frame, wire::DEFAULT_MAX_FRAME_LEN)?;
//! let envelope = unverified.verify()?;
//! ReplayGuard::new(ReplayConfig::default()).admit(&envelope, now)?;
//! assert_eq!(envelope.envelope().from, worker.node_id());
//! assert_eq!(envelope.envelope().open_sealed(&primary)?, heartbeat);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Concepts
//!
//! * [`identity`]: [`NodeKey`](identity::NodeKey) (secret, zeroized, PKCS#8 file
//!   with mode 0600) and [`NodeId`](identity::NodeId) (base32 text, short
//!   fingerprint).
//! * [`crypto`]: X25519 + HKDF-SHA256 + ChaCha20-Poly1305; one-shot
//!   [`seal`](crypto::seal)/[`open`](crypto::open) and numbered sessions whose
//!   nonces never repeat.
//! * [`wire`]: the envelope, every payload kind, versioned length-prefixed
//!   frames with a size limit, signature verification and the replay guard.
//! * [`clock`]: time is passed into every state machine; tests move a
//!   [`ManualClock`](clock::ManualClock) instead of sleeping.
//! * [`storage`]: the [`Storage`](storage::Storage) trait (atomic batches of
//!   JSON records in tables), [`SqliteStorage`](storage::SqliteStorage) (WAL,
//!   FULL sync, migrations) and [`MemoryStorage`](storage::MemoryStorage),
//!   with a shared conformance suite.
//! * [`registry`]: paired devices, hashed tokens, scopes, trust, and
//!   [`Registry::check`](registry::Registry::check), the one gate every entry
//!   point calls.
//! * [`pairing`]: the 6-digit-code pairing protocol (SPAKE2 bound to both node
//!   ids, key confirmation, 5 attempts, expiry) as sans-IO state machines.
//! * [`health`]: metric checks, the 0–100 score, score hysteresis, a
//!   phi-accrual failure detector, health events and persisted health rows.
//! * [`transport`]: the `Transport` / `Connection` traits (authenticated,
//!   message-oriented, one protocol per connection, admission by key);
//!   implementations live in `mesh-transport`.
//! * [`events`]: the event bus (glob subscriptions, bounded buffers, lag
//!   markers; publishers never block).
//! * [`mesh`]: the decentralised mesh of nodes; so far its join tokens
//!   (text, the issuer's hashed record, the issuer's decision).
//!
//! Design rationale lives in the repository's `ARCHITECTURE.md`.
//!
//! # Feature flags
//!
//! * `sqlite` (default): [`storage::SqliteStorage`], the embedded SQLite store
//!   (rusqlite with bundled SQLite). Without it only
//!   [`storage::MemoryStorage`] is available.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod clock;
pub mod crypto;
pub mod delivery;
pub mod discovery;
pub mod events;
pub mod files;
pub mod health;
pub mod identity;
pub mod ledger;
pub mod limits;
pub mod media;
pub mod mesh;
pub mod node;
pub mod pairing;
pub mod registry;
pub mod session;
pub mod storage;
pub mod sync;
pub mod transport;
pub mod wire;

/// Any error of this crate, for callers that do not need to tell the families apart.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Loading or saving the node key.
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    /// A string or bytes that are not a node id.
    #[error(transparent)]
    NodeId(#[from] identity::NodeIdError),
    /// Sealing or opening.
    #[error(transparent)]
    Crypto(#[from] crypto::CryptoError),
    /// Decoding, verifying or admitting a message.
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    /// Storage.
    #[error(transparent)]
    Storage(#[from] storage::StorageError),
    /// Discovery.
    #[error(transparent)]
    Discovery(#[from] discovery::DiscoveryError),
    /// The audit ledger.
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
}

macro_rules! wire_error_into_error {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Wire(e.into())
            }
        }
    )*};
}
wire_error_into_error!(
    wire::DecodeError,
    wire::VerifyError,
    wire::ReplayError,
    wire::EnvelopeError
);

#[cfg(test)]
mod send_sync {
    fn assert_send_sync<T: Send + Sync + 'static>() {}

    #[test]
    fn public_types_are_send_and_sync() {
        assert_send_sync::<crate::identity::NodeKey>();
        assert_send_sync::<crate::identity::NodeId>();
        assert_send_sync::<crate::crypto::Sealer>();
        assert_send_sync::<crate::crypto::Opener>();
        assert_send_sync::<crate::crypto::DuplexSession>();
        assert_send_sync::<crate::wire::SignedEnvelope>();
        assert_send_sync::<crate::wire::FrameDecoder>();
        assert_send_sync::<crate::wire::ReplayGuard>();
        assert_send_sync::<crate::clock::ManualClock>();
        assert_send_sync::<crate::Error>();
    }
}
