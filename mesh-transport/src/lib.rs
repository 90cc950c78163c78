//! Transports and discovery for the mesh SDK.
//!
//! **Status: not implemented yet.** This crate will hold the implementations of
//! mesh-core's `Transport` and `Discovery` traits: QUIC (quinn, mutually
//! authenticated by node keys), an in-memory transport with fault injection,
//! mDNS and static peers (issue 6), then BLE and a WebSocket gateway behind the
//! `ble` and `ws` features. Until then it exports nothing.

#![forbid(unsafe_code)]
#![warn(missing_docs)]
