//! Transports for the mesh SDK: implementations of mesh-core's
//! [`Transport`](mesh_core::transport::Transport) trait.
//!
//! * [`quic`] (feature `quic`, default): QUIC over quinn and rustls (ring),
//!   both ends authenticated by their node keys as raw public keys.
//! * [`memory`]: an in-memory network with fault injection (latency, loss,
//!   partition, crash) for tests and simulation.
//! * [`mdns`] (feature `mdns`, default) and [`static_peers`]: discovery into
//!   mesh-core's [`DiscoveryBook`](mesh_core::discovery::DiscoveryBook).
//! * `conformance` (feature `test-utils`): the checks every transport passes.
//!
//! * [`gateway`] (feature `gateway`): the primary's WebSocket gateway
//!   (JSON-RPC 2.0) and web dashboard, for web remotes and the user.
//!
//! BLE comes in a later issue.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use mesh_core::identity::NodeKey;
//! use mesh_core::transport::{AdmitAll, Protocol, Transport};
//! use mesh_transport::memory::MemoryNetwork;
//!
//! let net = MemoryNetwork::new(7);
//! let (a, b) = (NodeKey::generate(), NodeKey::generate());
//! let ta = net.endpoint(a.node_id(), "a", Arc::new(AdmitAll))?;
//! let tb = net.endpoint(b.node_id(), "b", Arc::new(AdmitAll))?;
//! let conn = ta.connect(b.node_id(), &tb.addr(), Protocol::MESH).await?;
//! let incoming = tb.accept().await?;
//! conn.send(b"hello".to_vec()).await?;
//! assert_eq!(incoming.recv().await?, b"hello");
//! assert_eq!(incoming.remote_node(), a.node_id());
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "gateway")]
pub mod gateway;
#[cfg(feature = "mdns")]
pub mod mdns;
pub mod memory;
#[cfg(feature = "quic")]
pub mod quic;
pub mod static_peers;

/// The transport conformance suite (feature `test-utils`).
#[cfg(any(test, feature = "test-utils"))]
pub mod conformance;

#[cfg(test)]
mod tests;
