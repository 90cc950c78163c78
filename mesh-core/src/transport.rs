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
//! * Beside messages, a connection may carry multiplexed byte streams (each
//!   with a [`Priority`], its own flow control, and reset/stop codes) and
//!   unreliable datagrams; [`Capabilities`] says which. Files and media use
//!   them; the device session uses messages.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;

use crate::identity::NodeId;

/// The protocol a connection carries: its ALPN identifier. An open set:
/// the SDK's own are [`Protocol::PAIRING`] and [`Protocol::MESH`] (the device
/// session); an app or a later SDK layer (membership, files, media) names
/// its own with [`Protocol::new`] and registers a handler for it on the node
/// (`NodeBuilder::protocol`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Protocol(&'static str);

impl Protocol {
    /// Pairing: open to keys that are not paired yet.
    pub const PAIRING: Protocol = Protocol("mesh-sdk/pairing/1");
    /// The device session between a primary and its paired devices.
    pub const MESH: Protocol = Protocol("mesh-sdk/mesh/1");

    /// A protocol named by `alpn`: 1 to 255 bytes of printable ASCII, by
    /// convention `owner/name/version` (`"acme/sync/1"`). Checked at compile
    /// time when used in a `const`.
    pub const fn new(alpn: &'static str) -> Protocol {
        let b = alpn.as_bytes();
        assert!(!b.is_empty() && b.len() <= 255, "an ALPN is 1 to 255 bytes");
        let mut i = 0;
        while i < b.len() {
            assert!(
                b[i] > b' ' && b[i] < 0x7f,
                "an ALPN here is printable ASCII without spaces"
            );
            i += 1;
        }
        Protocol(alpn)
    }

    /// The ALPN identifier.
    pub fn alpn(self) -> &'static [u8] {
        self.0.as_bytes()
    }

    /// The ALPN identifier as text.
    pub fn name(self) -> &'static str {
        self.0
    }

    /// Whether connections of this protocol carry streams and datagrams:
    /// those a node registers (files, media, an app's own), whose handlers
    /// read them. Pairing and the device session carry messages only, so
    /// no peer can make a node buffer stream data that nothing reads.
    pub fn carries_streams(self) -> bool {
        self != Protocol::PAIRING
            && self != Protocol::MESH
            && self != crate::mesh::MEMBERSHIP
            && self != crate::mesh::JOIN
    }

    /// The one of `known` whose ALPN is `alpn`.
    pub fn find(known: &[Protocol], alpn: &[u8]) -> Option<Protocol> {
        known.iter().copied().find(|p| p.alpn() == alpn)
    }
}

impl fmt::Debug for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Protocol({})", self.0)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// Where a node can be reached.
///
/// An IPv6 link-local address keeps its scope (the interface index), which
/// it cannot be dialled without; stored records keep it too (see the serde
/// impls below).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PeerAddr {
    /// An IP address and port (QUIC).
    Socket(SocketAddr),
    /// A name on an in-memory network (tests, simulation).
    Memory(String),
}

/// How a [`PeerAddr`] is stored. The first two variants are what the derived
/// encoding always wrote (serde's `SocketAddr` drops an IPv6 scope id), so
/// every stored record still reads; an address with a scope is written as
/// the third, which older builds never wrote.
#[derive(serde::Serialize, serde::Deserialize)]
enum PeerAddrRepr {
    Socket(SocketAddr),
    Memory(String),
    ScopedV6 {
        ip: std::net::Ipv6Addr,
        port: u16,
        scope_id: u32,
    },
}

impl serde::Serialize for PeerAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PeerAddr::Socket(SocketAddr::V6(v6)) if v6.scope_id() != 0 => PeerAddrRepr::ScopedV6 {
                ip: *v6.ip(),
                port: v6.port(),
                scope_id: v6.scope_id(),
            },
            PeerAddr::Socket(a) => PeerAddrRepr::Socket(*a),
            PeerAddr::Memory(name) => PeerAddrRepr::Memory(name.clone()),
        }
        .serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for PeerAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match PeerAddrRepr::deserialize(d)? {
            PeerAddrRepr::Socket(a) => PeerAddr::Socket(a),
            PeerAddrRepr::Memory(name) => PeerAddr::Memory(name),
            PeerAddrRepr::ScopedV6 { ip, port, scope_id } => PeerAddr::Socket(SocketAddr::V6(
                std::net::SocketAddrV6::new(ip, port, 0, scope_id),
            )),
        })
    }
}

#[cfg(test)]
mod peer_addr_tests {
    use super::*;

    #[test]
    fn stored_addresses_keep_an_ipv6_scope_and_old_encodings_still_read() {
        let scoped = PeerAddr::Socket(SocketAddr::V6(std::net::SocketAddrV6::new(
            "fe80::1".parse().unwrap(),
            4433,
            0,
            7,
        )));
        for addr in [
            scoped.clone(),
            PeerAddr::Socket("127.0.0.1:9".parse().unwrap()),
            PeerAddr::Socket("[2001:db8::1]:9".parse().unwrap()),
            PeerAddr::Memory("m".into()),
        ] {
            let bytes = postcard::to_allocvec(&addr).unwrap();
            assert_eq!(postcard::from_bytes::<PeerAddr>(&bytes).unwrap(), addr);
            let json = serde_json::to_string(&addr).unwrap();
            assert_eq!(serde_json::from_str::<PeerAddr>(&json).unwrap(), addr);
        }
        // What the derived encoding wrote (no scope) reads the same.
        #[derive(serde::Serialize)]
        enum Old {
            Socket(SocketAddr),
            #[allow(dead_code)]
            Memory(String),
        }
        let plain: SocketAddr = "[2001:db8::1]:9".parse().unwrap();
        let old = postcard::to_allocvec(&Old::Socket(plain)).unwrap();
        assert_eq!(
            postcard::to_allocvec(&PeerAddr::Socket(plain)).unwrap(),
            old
        );
        assert_eq!(
            postcard::from_bytes::<PeerAddr>(&old).unwrap(),
            PeerAddr::Socket(plain)
        );
    }
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
    /// The connection cannot do this (see [`Capabilities`]).
    #[error("this connection does not support {0}")]
    Unsupported(&'static str),
    /// Another I/O failure.
    #[error("transport I/O: {0}")]
    Io(String),
}

/// What a connection carries beyond whole messages. A transport that lacks
/// a capability says so here, and its methods for it fail with
/// [`TransportError::Unsupported`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Capabilities {
    /// Multiplexed byte streams ([`Connection::open_bi`],
    /// [`Connection::open_uni`], [`Connection::accept_stream`]).
    pub streams: bool,
    /// Unreliable datagrams ([`Connection::send_datagram`]).
    pub datagrams: bool,
}

impl Capabilities {
    /// Messages only.
    pub const MESSAGES_ONLY: Capabilities = Capabilities {
        streams: false,
        datagrams: false,
    };
    /// Messages, streams and datagrams.
    pub const ALL: Capabilities = Capabilities {
        streams: true,
        datagrams: true,
    };

    /// With or without streams.
    pub const fn with_streams(mut self, on: bool) -> Self {
        self.streams = on;
        self
    }

    /// With or without datagrams.
    pub const fn with_datagrams(mut self, on: bool) -> Self {
        self.datagrams = on;
        self
    }
}

/// A stream's priority: when several streams of a connection have data
/// queued, the highest priority is sent first; equal priorities share the
/// link. The default is 0.
pub type Priority = i32;

/// Why a stream operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The peer abandoned the stream ([`SendStream::reset`]) with this code.
    #[error("the peer reset the stream (code {0})")]
    Reset(u32),
    /// The peer will read no more ([`RecvStream::stop`]) and gave this code.
    #[error("the peer stopped reading the stream (code {0})")]
    Stopped(u32),
    /// This side already finished or reset the stream.
    #[error("the stream is finished")]
    Finished,
    /// The connection is gone.
    #[error("connection closed")]
    Closed,
    /// Another failure.
    #[error("stream I/O: {0}")]
    Io(String),
}

/// The sending half of a stream.
#[async_trait]
pub trait SendStream: Send + Sync + fmt::Debug {
    /// Writes all of `data`; waits while the peer's flow-control window is
    /// full (backpressure).
    async fn write_all(&mut self, data: &[u8]) -> Result<(), StreamError>;
    /// Ends the stream: the peer reads what was written, then the end.
    async fn finish(&mut self) -> Result<(), StreamError>;
    /// Abandons the stream: data not yet delivered may be dropped and the
    /// peer's reads fail with [`StreamError::Reset`]`(code)`.
    fn reset(&mut self, code: u32);
    /// Changes the stream's [`Priority`].
    fn set_priority(&mut self, priority: Priority) -> Result<(), StreamError>;
}

/// The receiving half of a stream.
#[async_trait]
pub trait RecvStream: Send + Sync + fmt::Debug {
    /// Reads into `buf`; `Ok(None)` at the end of the stream, `Ok(Some(n))`
    /// with `n > 0` otherwise (an empty `buf` reads nothing and returns
    /// `Some(0)`).
    async fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, StreamError>;
    /// Tells the peer to stop sending: its writes fail with
    /// [`StreamError::Stopped`]`(code)`.
    fn stop(&mut self, code: u32);

    /// Reads to the end, refusing more than `limit` bytes (the stream is
    /// then stopped with code 0 and the error is [`StreamError::Io`]).
    async fn read_to_end(&mut self, limit: usize) -> Result<Vec<u8>, StreamError> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        while let Some(n) = self.read(&mut buf).await? {
            if out.len() + n > limit {
                self.stop(0);
                return Err(StreamError::Io(format!(
                    "the stream is longer than {limit} bytes"
                )));
            }
            out.extend_from_slice(&buf[..n]);
        }
        Ok(out)
    }
}

/// A stream the peer opened.
#[derive(Debug)]
pub enum IncomingStream {
    /// Both ways.
    Bi(Box<dyn SendStream>, Box<dyn RecvStream>),
    /// From the peer to this side only.
    Uni(Box<dyn RecvStream>),
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

    /// From now on, accept exactly `protocols` (QUIC advertises their ALPNs)
    /// and ask `admission` which keys may use which. The node calls it at
    /// start with the protocols it has handlers for; until then the
    /// admission given at construction applies (to
    /// [`Protocol::PAIRING`] and [`Protocol::MESH`]).
    fn serve(
        &self,
        protocols: &[Protocol],
        admission: Arc<dyn Admission>,
    ) -> Result<(), TransportError> {
        let _ = (protocols, admission);
        Err(TransportError::Unsupported("serving other protocols"))
    }
}

/// An authenticated connection carrying whole messages, in order — and,
/// where [`Connection::capabilities`] says so, multiplexed byte streams and
/// unreliable datagrams beside them.
///
/// Streams are independent of the message channel and of each other: a
/// stalled stream (its reader not reading) holds up only itself, as each has
/// its own flow-control window. A peer sees a stream once something is
/// written on it (QUIC announces streams with their first bytes).
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
    /// Streams end with it.
    fn close(&self);

    /// What this connection carries beyond messages. The default: nothing.
    fn capabilities(&self) -> Capabilities {
        Capabilities::MESSAGES_ONLY
    }

    /// Opens a bidirectional stream with `priority`. Waits while the peer's
    /// limit of open streams is reached.
    async fn open_bi(
        &self,
        priority: Priority,
    ) -> Result<(Box<dyn SendStream>, Box<dyn RecvStream>), TransportError> {
        let _ = priority;
        Err(TransportError::Unsupported("streams"))
    }

    /// Opens a stream to the peer only, with `priority`.
    async fn open_uni(&self, priority: Priority) -> Result<Box<dyn SendStream>, TransportError> {
        let _ = priority;
        Err(TransportError::Unsupported("streams"))
    }

    /// The next stream the peer opened; [`TransportError::Closed`] once the
    /// connection is gone.
    async fn accept_stream(&self) -> Result<IncomingStream, TransportError> {
        Err(TransportError::Unsupported("streams"))
    }

    /// The largest datagram that can be sent now (it follows the path's
    /// MTU), or `None` if datagrams are not available on this connection.
    fn max_datagram_size(&self) -> Option<usize> {
        None
    }

    /// Sends one unreliable datagram: it may be lost, duplicated or
    /// reordered, and is never retransmitted. Over
    /// [`Connection::max_datagram_size`] it is refused with
    /// [`TransportError::TooLarge`].
    fn send_datagram(&self, datagram: Vec<u8>) -> Result<(), TransportError> {
        let _ = datagram;
        Err(TransportError::Unsupported("datagrams"))
    }

    /// The next datagram from the peer.
    async fn recv_datagram(&self) -> Result<Vec<u8>, TransportError> {
        Err(TransportError::Unsupported("datagrams"))
    }
}
