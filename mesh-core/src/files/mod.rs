//! Files between nodes (R-XFER1, R-XFER3), sans-IO where it can be:
//!
//! - [`wire`]: the files protocol's control messages and range requests;
//! - [`name`]: which names a receiver accepts;
//! - [`groups`]: the chunk groups a receiver holds verified;
//! - [`verify`]: BLAKE3 verified streaming over files on disk (bao-tree,
//!   16 KiB groups; blocking I/O, called off the async threads).
//!
//! The runtime that moves files over connections is `node::files`.

pub mod groups;
pub mod name;
pub mod verify;
pub mod wire;

pub use groups::GroupSet;
pub use name::{FileNameError, MAX_NAME_LEN, check_name, numbered};
pub use wire::{
    FILES, FileFrame, FileFrameError, FileHash, GROUP_LEN, Offer, RangeRequest, TransferId,
    groups_of, refusals,
};
