//! The transport abstraction: authenticated, message-oriented connections
//! between nodes (R-TRAN1). Implementations live in `mesh-transport` (QUIC,
//! in-memory); the runtime only sees these traits.
//!
//! * Connecting to a [`NodeId`] proves you reached that node: an
//!   implementation must fail with [`TransportError::PeerMismatch`] rather
//!   than return a connection to anyone else, and the accepting side learns
//!   the remote node id from the handshake.
//! * Every connection carries one [`Protocol`] (QUIC's ALPN). The acceptor's
//!   [`Admission`] decides which keys may use which protocol, so a key that is
//!   not paired can reach pairing and nothing else.
//! * Messages are whole wire frames (see [`crate::wire`]); a frame over the
//!   transport's limit is refused with [`TransportError::TooLarge`].
//! * [`TransportError::AddressNotSupported`] lets a combined transport try the
//!   next one.

use std::fmt;
use std::net::SocketAddr;

use async_trait::async_trait;

use crate::identity::NodeId;

/// The protocol a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Pairing: open to keys that are not paired yet.
    Pairing,
    /// Mesh traffic between paired nodes.
    Mesh,
}

impl Protocol {
    /// The ALPN identifier.
    pub fn alpn(self) -> &'static [u8] {
        match self {
            Protocol::Pairing => b"mesh-sdk/pairing/1",
            Protocol::Mesh => b"mesh-sdk/mesh/1",
        }
    }
}

/// Where a node can be reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum PeerAddr {
    /// An IP address and port (QUIC).
    Socket(SocketAddr),
    /// A name on an in-memory network (tests, simulation).
    Memory(String),
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAddr::Socket(a) => write!(f, "{a}"),
            PeerAddr::Memory(name) => write!(f, "mem:{name}"),
        }
    }
}

/// Which remote keys may use which protocol; consulted by the accepting side.
pub trait Admission: Send + Sync + fmt::Debug + 'static {
    /// Whether `peer` may open a connection for `protocol`.
    fn admit(&self, peer: &NodeId, protocol: Protocol) -> bool;
}

/// Admits every key to every protocol (tests; a node with no registry yet).
#[derive(Debug, Clone, Copy, Default)]
pub struct AdmitAll;

impl Admission for AdmitAll {
    fn admit(&self, _: &NodeId, _: Protocol) -> bool {
        true
    }
}

/// Transport errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// This transport cannot reach that kind of address; try another.
    #[error("address {0} is not supported by this transport")]
    AddressNotSupported(PeerAddr),
    /// Nobody answers at that address (down, partitioned, wrong address).
    #[error("{addr} is unreachable")]
    Unreachable {
        /// The address tried.
        addr: PeerAddr,
    },
    /// The node at the address is not the one expected.
    #[error("expected node {expected} at the address but reached {actual}")]
    PeerMismatch {
        /// The node id asked for.
        expected: NodeId,
        /// The node id that answered.
        actual: NodeId,
    },
    /// The remote side refused this key for this protocol.
    #[error("refused by the remote node: {0}")]
    Refused(String),
    /// The connection is closed.
    #[error("connection closed")]
    Closed,
    /// A message over the transport's frame limit.
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Message length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Another I/O failure.
    #[error("transport I/O: {0}")]
    Io(String),
}

/// An endpoint that connects out and accepts in.
#[async_trait]
pub trait Transport: Send + Sync + fmt::Debug + 'static {
    /// This endpoint's node id.
    fn local_node(&self) -> NodeId;

    /// Connects to `peer` at `addr` for `protocol`. Succeeds only if the node
    /// reached proves it is `peer` and admits this node for `protocol`.
    async fn connect(
        &self,
        peer: NodeId,
        addr: &PeerAddr,
        protocol: Protocol,
    ) -> Result<Box<dyn Connection>, TransportError>;

    /// The next incoming connection (already authenticated and admitted).
    async fn accept(&self) -> Result<Box<dyn Connection>, TransportError>;

    /// Tells the transport whether this device now runs on battery, so it
    /// can spend less radio time (QUIC turns its keep-alive off for new
    /// connections). The node runtime calls it when its own metrics change.
    fn set_on_battery(&self, on_battery: bool) -> Result<(), TransportError> {
        let _ = on_battery;
        Ok(())
    }
}

/// An authenticated connection carrying whole messages, in order.
#[async_trait]
pub trait Connection: Send + Sync + fmt::Debug {
    /// The authenticated remote node.
    fn remote_node(&self) -> NodeId;

    /// The protocol this connection carries.
    fn protocol(&self) -> Protocol;

    /// Where the peer connects from, if the transport knows (for limits per
    /// source address; never for authentication).
    fn remote_addr(&self) -> Option<PeerAddr> {
        None
    }

    /// Sends one message. Waits while the peer's buffer is full (backpressure).
    async fn send(&self, message: Vec<u8>) -> Result<(), TransportError>;

    /// Receives the next message; [`TransportError::Closed`] once the peer is gone.
    async fn recv(&self) -> Result<Vec<u8>, TransportError>;

    /// Closes the connection; the peer's `recv` then returns `Closed`.
    fn close(&self);
}
