//! Replicated state: hybrid logical clocks and last-writer-wins namespaces
//! that converge whatever the order, drops and duplicates of delivery, and
//! catch up by version vector (only what a peer lacks). Sans IO: the
//! runtime stores the changes and carries them between nodes.

pub mod hlc;
pub mod replica;
pub mod store;
pub mod wire;

pub use hlc::{DEFAULT_MAX_SKEW, FromTheFuture, Hlc, HlcClock};
pub use replica::{
    Applied, Change, Delta, MAX_KEY_LEN, MAX_VALUE_LEN, Refusal, Replica, ReplicaLimits,
    VersionVector,
};
pub use wire::{SYNC, SyncFrame, SyncFrameError};

#[cfg(test)]
mod tests;
