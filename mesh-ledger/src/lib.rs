//! The signed, Merkle-verified audit ledger of the mesh SDK.
//!
//! **Status: not implemented yet.** This crate will hold the append-only,
//! hash-chained record log with signed checkpoints, inclusion and consistency
//! proofs, SQLite persistence and replication (issue 7). Until then it exports
//! nothing.

#![forbid(unsafe_code)]
#![warn(missing_docs)]
