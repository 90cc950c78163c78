//! The decentralised mesh of nodes (issue 15): join tokens, membership
//! with failure detection, gossip broadcast, peer scores and rate limits,
//! the blocklist and renames. All of it sans-IO; the node runtime drives it
//! (`node::mesh`).
//!
//! * [`token`]: join tokens (R-MESH1): their text, the issuer's record of
//!   each (the secret's digest only), and the issuer's decision on a
//!   presented secret ([`token::redeem`]).
//! * [`member`]: a member's signed identity (what SWIM knows it by) and the
//!   certificate that let it in.
//! * [`wire`]: the frames members exchange and foca's codec.
//! * [`gossip`]: signed broadcasts and the bounded caches behind them.
//! * [`score`]: per-peer scores, their inputs and weights.
//! * [`machine`]: [`Mesh`], one member's view, as a state machine.

pub mod gossip;
pub mod machine;
pub mod member;
pub mod score;
pub mod token;
pub mod wire;

pub use machine::{
    Delivery, JoinGrant, LeaveReason, Mesh, MeshConfig, MeshError, MeshEvent, MeshOutput,
    MeshStore, MeshTimer,
};

use crate::transport::Protocol;

/// Membership, gossip and peer exchange between members.
pub const MEMBERSHIP: Protocol = Protocol::new("mesh-sdk/members/1");
/// Joining through a token.
pub const JOIN: Protocol = Protocol::new("mesh-sdk/join/1");
pub mod sim;
#[cfg(test)]
mod sim_tests;
