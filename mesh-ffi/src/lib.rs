//! UniFFI bindings of the mesh SDK for Swift, Kotlin and Python.
//!
//! A thin wrapper over the node runtime (`mesh_core::node`): [`MeshNode`]
//! is a primary or a worker started from a data directory (identity and
//! SQLite), listening on QUIC, optionally discovering over mDNS, with the
//! signed ledger and mesh-policy on a primary, and a member of the mesh of
//! nodes (join tokens, members, broadcasts: `mesh.rs`). Conversions, one flat error
//! enum ([`MeshError`]), a tokio runtime per node and the bridges for
//! foreign command handlers and event listeners are all that live here.
//!
//! Generate the bindings with `mesh-ffi/bindgen.sh` (Kotlin, Python, Swift).
// No `forbid(unsafe_code)` here: UniFFI's generated scaffolding needs `unsafe`.
#![warn(missing_docs)]

mod error;
mod files;
mod media;
mod mesh;
mod node;
mod sync;
mod types;

pub use error::MeshError;
pub use media::{
    MediaFrame, MediaInbox, MediaItem, MediaReceiver, MediaSendCounts, MediaSender,
    MediaStreamStats, MediaType,
};
pub use mesh::{MeshMessage, MeshPeer, MeshPeers, MeshToken, MeshTokenInfo, TopicListener};
pub use node::{
    CommandHandler, EventListener, EventSubscription, MeshNode, PairingTicket, default_options,
};
pub use sync::{
    ConfigEntry, ReplicaChange, ReplicaListener, ReplicaVersion, ReplicatedValue, SyncPeer,
};
pub use types::{
    Action, Device, DevicePlatform, DiscoveredNode, MeshEvent, Metrics, NodeOptions, NodeRole,
    NodeStatus, PairingRequest, PolicyDecision, ThermalState,
};

uniffi::setup_scaffolding!();
