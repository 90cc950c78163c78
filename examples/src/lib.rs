//! Shared parts of the reference binaries (`primary`, `worker`, `meshctl`,
//! `demo`): the admin socket, machine metrics, and assembling a node from a
//! data directory. Everything here wires the SDK's own API together; no
//! protocol logic lives in the binaries.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod metrics;
pub mod setup;
