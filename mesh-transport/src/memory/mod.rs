//! An in-memory network: a real [`Transport`] for tests and simulation, with
//! fault injection (latency, loss, partition and heal, node crash).
//!
//! Endpoints register under a name on a shared [`MemoryNetwork`] with their
//! node id; connecting to a name reaches that endpoint only if its node id is
//! the one expected (the in-memory stand-in for QUIC's key pinning), and only
//! if its [`Admission`] lets the caller use the protocol.
//!
//! Latency uses tokio's clock: under `tokio::time::pause()` tests move time
//! without sleeping. Loss draws from a seeded generator, so runs repeat.
//! A partition silently drops messages between the two sides (as a real
//! partition does) and refuses new connections; a crash removes the endpoint
//! and breaks its connections (the peers' `recv` returns `Closed`).
//!
//! Connections also carry streams and datagrams (see [`streams`]):
//! [`MemoryNetwork::set_bandwidth`] constrains the link so stream
//! priorities show in the order streams finish, and
//! [`MemoryNetwork::set_stream_faults`] delays stream bytes as a lossy,
//! jittery QUIC path would (streams overtake one another; a lost packet
//! holds up its own stream until it is sent again).

pub mod streams;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use mesh_core::identity::NodeId;
use mesh_core::transport::{
    Admission, Capabilities, Connection, IncomingStream, PeerAddr, Priority, Protocol, RecvStream,
    SendStream, Transport, TransportError,
};
use mesh_core::wire::{DEFAULT_MAX_FRAME_LEN, FRAME_HEADER_LEN};
use tokio::sync::{Mutex as AsyncMutex, mpsc, watch};
use tokio::time::Instant;

/// Messages buffered per direction of a connection before `send` waits.
const QUEUE: usize = 256;

#[derive(Default)]
struct Net {
    endpoints: HashMap<String, Endpoint>,
    partitions: HashSet<(NodeId, NodeId)>,
    latency: Duration,
    loss: f64,
    /// Stream bytes per second per direction of a connection; `None`: as
    /// fast as the reader takes them.
    bandwidth: Option<u64>,
    stream_faults: Option<StreamFaults>,
    rng: u64,
    next_id: u64,
}

struct Endpoint {
    /// Unique per registration, so a stale handle never removes a restarted endpoint.
    id: u64,
    node: NodeId,
    admission: Arc<dyn Admission>,
    /// What it accepts (see `Transport::serve`).
    protocols: Vec<Protocol>,
    incoming: mpsc::Sender<MemoryConnection>,
    links: Vec<Arc<Link>>,
}

fn pair(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    if a <= b { (a, b) } else { (b, a) }
}

impl Net {
    /// splitmix64: deterministic loss.
    fn unit(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What a lossy, jittery path does to stream bytes, modelled on QUIC: the
/// bytes of a stream go in packets of [`streams::CHUNK`] bytes; each
/// arrives `delay` plus a random share of `jitter` after it was written;
/// a lost packet (probability `loss`) arrives `retransmit` later still,
/// as QUIC sends it again. A stream's bytes arrive in order, so a late
/// packet holds up the bytes after it on its stream, and only there:
/// other streams overtake it. Streams stay reliable — loss shows as delay
/// (and a stream reset by its writer meanwhile never completes).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StreamFaults {
    /// The path's one-way delay.
    pub delay: Duration,
    /// Up to this much more, drawn per packet.
    pub jitter: Duration,
    /// The chance a packet is lost (0.0–1.0) and has to be sent again.
    pub loss: f64,
    /// How much later a lost packet arrives (about a round trip plus the
    /// loss detection's wait).
    pub retransmit: Duration,
}

/// The shared switchboard. Clones refer to the same network.
#[derive(Clone, Default)]
pub struct MemoryNetwork {
    net: Arc<Mutex<Net>>,
}

impl fmt::Debug for MemoryNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryNetwork")
            .field("endpoints", &self.lock().endpoints.len())
            .finish_non_exhaustive()
    }
}

impl MemoryNetwork {
    /// An empty network with no faults; `seed` drives loss decisions.
    pub fn new(seed: u64) -> Self {
        let net = Net {
            rng: seed,
            ..Net::default()
        };
        MemoryNetwork {
            net: Arc::new(Mutex::new(net)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Net> {
        self.net.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers an endpoint for `node` under `name`. A name that is a
    /// socket address's text (`127.0.0.1:7001`) also answers connects to
    /// that socket address (in memory: nothing is sent anywhere).
    pub fn endpoint(
        &self,
        node: NodeId,
        name: &str,
        admission: Arc<dyn Admission>,
    ) -> Result<MemoryTransport, TransportError> {
        let mut net = self.lock();
        if net.endpoints.contains_key(name) {
            return Err(TransportError::Io(format!("address mem:{name} is in use")));
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        net.next_id += 1;
        let id = net.next_id;
        net.endpoints.insert(
            name.to_owned(),
            Endpoint {
                id,
                node,
                admission,
                protocols: vec![Protocol::PAIRING, Protocol::MESH],
                incoming: tx,
                links: Vec::new(),
            },
        );
        Ok(MemoryTransport {
            id,
            node,
            name: name.to_owned(),
            network: self.clone(),
            incoming: AsyncMutex::new(rx),
        })
    }

    /// Delays every message by `latency` from now on.
    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// Limits every connection's streams to `bytes_per_second` in each
    /// direction from now on (`None`: no limit). Under a limit the
    /// highest-priority stream with data queued is sent first.
    pub fn set_bandwidth(&self, bytes_per_second: Option<u64>) {
        self.lock().bandwidth = bytes_per_second.map(|b| b.max(1));
    }

    fn bandwidth(&self) -> Option<u64> {
        self.lock().bandwidth
    }

    /// Delays the bytes of every stream as `faults` says from now on
    /// (`None`: they arrive as soon as they are written). Applies to
    /// bytes written after the call.
    pub fn set_stream_faults(&self, faults: Option<StreamFaults>) {
        self.lock().stream_faults = faults.map(|f| StreamFaults {
            loss: f.loss.clamp(0.0, 1.0),
            ..f
        });
    }

    /// Whether stream bytes are delayed.
    fn stream_faults(&self) -> bool {
        self.lock().stream_faults.is_some()
    }

    /// When a packet of stream bytes written now arrives (`None`: at once).
    fn packet_due(&self) -> Option<Instant> {
        let mut net = self.lock();
        let f = net.stream_faults?;
        let mut wait = f.delay + f.jitter.mul_f64(net.unit());
        if f.loss > 0.0 && net.unit() < f.loss {
            wait += f.retransmit;
        }
        Some(Instant::now() + wait)
    }

    /// Drops each message with probability `loss` (0.0–1.0) from now on.
    pub fn set_loss(&self, loss: f64) {
        self.lock().loss = loss.clamp(0.0, 1.0);
    }

    /// Cuts `a` off from `b`: messages between them vanish, connects fail.
    pub fn partition(&self, a: NodeId, b: NodeId) {
        self.lock().partitions.insert(pair(a, b));
    }

    /// Ends a partition.
    pub fn heal(&self, a: NodeId, b: NodeId) {
        self.lock().partitions.remove(&pair(a, b));
    }

    /// Crashes the endpoint `name`: it disappears and its connections break.
    pub fn crash(&self, name: &str) {
        let removed = self.lock().endpoints.remove(name);
        if let Some(e) = removed {
            for link in e.links {
                link.set(LinkState::Broken);
            }
        }
    }

    /// What happens to one message from `from` to `to`: `None` = lost,
    /// `Some(when)` = delivered then.
    fn route(&self, from: NodeId, to: NodeId) -> Option<Instant> {
        let mut net = self.lock();
        if net.partitions.contains(&pair(from, to)) {
            return None;
        }
        if net.loss > 0.0 && net.unit() < net.loss {
            return None;
        }
        Some(Instant::now() + net.latency)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum LinkState {
    Open = 0,
    /// Closed by one side: buffered messages are still delivered.
    Closed = 1,
    /// Broken by a crash: nothing more is delivered.
    Broken = 2,
}

/// State shared by both halves of a connection.
struct Link {
    state: AtomicU8,
    changed: watch::Sender<()>,
}

impl Link {
    fn state(&self) -> LinkState {
        match self.state.load(Ordering::Acquire) {
            0 => LinkState::Open,
            1 => LinkState::Closed,
            _ => LinkState::Broken,
        }
    }

    fn set(&self, s: LinkState) {
        // Never go back to a milder state.
        self.state.fetch_max(s as u8, Ordering::AcqRel);
        self.changed.send_replace(());
    }
}

type Queue = (Instant, Vec<u8>);

/// One side of an in-memory connection.
pub struct MemoryConnection {
    local: NodeId,
    remote: NodeId,
    protocol: Protocol,
    tx: mpsc::Sender<Queue>,
    rx: AsyncMutex<mpsc::Receiver<Queue>>,
    link: Arc<Link>,
    network: MemoryNetwork,
    /// Stream bytes from this side to the peer, and back.
    out: Arc<streams::Pipe>,
    back: Arc<streams::Pipe>,
    /// Streams this side opens reach the peer's `accept_stream` here.
    streams_tx: mpsc::Sender<IncomingStream>,
    streams_rx: AsyncMutex<mpsc::Receiver<IncomingStream>>,
    datagrams_tx: mpsc::Sender<Queue>,
    datagrams_rx: AsyncMutex<mpsc::Receiver<Queue>>,
}

impl MemoryConnection {
    /// Waits for the next item of `rx` or for the link to break or close.
    async fn next_or_closed<T>(
        &self,
        rx: &AsyncMutex<mpsc::Receiver<T>>,
    ) -> Result<T, TransportError> {
        let mut rx = rx.lock().await;
        let mut changed = self.link.changed.subscribe();
        loop {
            if self.link.state() != LinkState::Open {
                return Err(TransportError::Closed);
            }
            match rx.try_recv() {
                Ok(item) => return Ok(item),
                Err(mpsc::error::TryRecvError::Disconnected) => return Err(TransportError::Closed),
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            tokio::select! {
                item = rx.recv() => return item.ok_or(TransportError::Closed),
                _ = changed.changed() => {}
            }
        }
    }

    /// Pairing and the device session carry messages only (as over QUIC).
    fn streams_allowed(&self) -> Result<(), TransportError> {
        if self.protocol.carries_streams() {
            Ok(())
        } else {
            Err(TransportError::Unsupported(
                "streams and datagrams on pairing or device-session connections",
            ))
        }
    }

    async fn announce(&self, stream: IncomingStream) -> Result<(), TransportError> {
        if self.link.state() != LinkState::Open {
            return Err(TransportError::Closed);
        }
        self.streams_tx
            .send(stream)
            .await
            .map_err(|_| TransportError::Closed)
    }
}

impl fmt::Debug for MemoryConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryConnection")
            .field("local", &self.local)
            .field("remote", &self.remote)
            .field("protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

/// The largest message: a frame at the default limit.
pub const MAX_MESSAGE: usize = FRAME_HEADER_LEN + DEFAULT_MAX_FRAME_LEN;

#[async_trait]
impl Connection for MemoryConnection {
    fn remote_node(&self) -> NodeId {
        self.remote
    }

    fn protocol(&self) -> Protocol {
        self.protocol
    }

    async fn send(&self, message: Vec<u8>) -> Result<(), TransportError> {
        if self.link.state() != LinkState::Open {
            return Err(TransportError::Closed);
        }
        if message.len() > MAX_MESSAGE {
            return Err(TransportError::TooLarge {
                len: message.len(),
                max: MAX_MESSAGE,
            });
        }
        match self.network.route(self.local, self.remote) {
            None => Ok(()), // lost in the network, as on a real one
            Some(at) => self
                .tx
                .send((at, message))
                .await
                .map_err(|_| TransportError::Closed),
        }
    }

    async fn recv(&self) -> Result<Vec<u8>, TransportError> {
        let mut rx = self.rx.lock().await;
        // Subscribe before looking at the state, so no change is missed.
        let mut changed = self.link.changed.subscribe();
        loop {
            let next = match self.link.state() {
                LinkState::Broken => return Err(TransportError::Closed),
                state => match rx.try_recv() {
                    Ok(m) => Some(m),
                    // Closed gracefully and drained, or the other half is gone.
                    Err(mpsc::error::TryRecvError::Empty) if state == LinkState::Closed => {
                        return Err(TransportError::Closed);
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        return Err(TransportError::Closed);
                    }
                    Err(mpsc::error::TryRecvError::Empty) => None,
                },
            };
            let (at, msg) = match next {
                Some(m) => m,
                None => tokio::select! {
                    biased;
                    m = rx.recv() => match m {
                        Some(m) => m,
                        None => return Err(TransportError::Closed),
                    },
                    r = changed.changed() => {
                        if r.is_err() {
                            return Err(TransportError::Closed);
                        }
                        continue;
                    }
                },
            };
            tokio::time::sleep_until(at).await;
            if self.link.state() == LinkState::Broken {
                return Err(TransportError::Closed);
            }
            return Ok(msg);
        }
    }

    fn close(&self) {
        self.link.set(LinkState::Closed);
    }

    fn capabilities(&self) -> Capabilities {
        if self.protocol.carries_streams() {
            Capabilities::ALL
        } else {
            Capabilities::MESSAGES_ONLY
        }
    }

    async fn open_bi(
        &self,
        priority: Priority,
    ) -> Result<(Box<dyn SendStream>, Box<dyn RecvStream>), TransportError> {
        self.streams_allowed()?;
        let (send, peer_recv) = streams::flow(&self.out, priority);
        let (peer_send, recv) = streams::flow(&self.back, 0);
        self.announce(IncomingStream::Bi(Box::new(peer_send), Box::new(peer_recv)))
            .await?;
        Ok((Box::new(send), Box::new(recv)))
    }

    async fn open_uni(&self, priority: Priority) -> Result<Box<dyn SendStream>, TransportError> {
        self.streams_allowed()?;
        let (send, peer_recv) = streams::flow(&self.out, priority);
        self.announce(IncomingStream::Uni(Box::new(peer_recv)))
            .await?;
        Ok(Box::new(send))
    }

    async fn accept_stream(&self) -> Result<IncomingStream, TransportError> {
        self.streams_allowed()?;
        self.next_or_closed(&self.streams_rx).await
    }

    fn max_datagram_size(&self) -> Option<usize> {
        (self.protocol.carries_streams() && self.link.state() == LinkState::Open)
            .then_some(streams::MAX_DATAGRAM)
    }

    fn send_datagram(&self, datagram: Vec<u8>) -> Result<(), TransportError> {
        self.streams_allowed()?;
        if self.link.state() != LinkState::Open {
            return Err(TransportError::Closed);
        }
        if datagram.len() > streams::MAX_DATAGRAM {
            return Err(TransportError::TooLarge {
                len: datagram.len(),
                max: streams::MAX_DATAGRAM,
            });
        }
        if let Some(at) = self.network.route(self.local, self.remote) {
            // A full receive queue drops the datagram, as a busy host would.
            let _ = self.datagrams_tx.try_send((at, datagram));
        }
        Ok(())
    }

    async fn recv_datagram(&self) -> Result<Vec<u8>, TransportError> {
        self.streams_allowed()?;
        let (at, datagram) = self.next_or_closed(&self.datagrams_rx).await?;
        tokio::time::sleep_until(at).await;
        Ok(datagram)
    }
}

impl Drop for MemoryConnection {
    fn drop(&mut self) {
        self.link.set(LinkState::Closed);
    }
}

/// An endpoint on a [`MemoryNetwork`].
pub struct MemoryTransport {
    id: u64,
    node: NodeId,
    name: String,
    network: MemoryNetwork,
    incoming: AsyncMutex<mpsc::Receiver<MemoryConnection>>,
}

impl fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryTransport")
            .field("node", &self.node)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl MemoryTransport {
    /// This endpoint's address.
    pub fn addr(&self) -> PeerAddr {
        PeerAddr::Memory(self.name.clone())
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    fn local_node(&self) -> NodeId {
        self.node
    }

    async fn connect(
        &self,
        peer: NodeId,
        addr: &PeerAddr,
        protocol: Protocol,
    ) -> Result<Box<dyn Connection>, TransportError> {
        let (mine, theirs, incoming) = {
            let mut net = self.network.lock();
            // A socket address names the endpoint registered under its text
            // form, if there is one (code that speaks only socket
            // addresses, such as join tokens, runs in memory too).
            let name = match addr {
                PeerAddr::Memory(name) => name.clone(),
                PeerAddr::Socket(sa) if net.endpoints.contains_key(&sa.to_string()) => {
                    sa.to_string()
                }
                _ => return Err(TransportError::AddressNotSupported(addr.clone())),
            };
            let name = &name;
            let unreachable = || TransportError::Unreachable { addr: addr.clone() };
            let remote = net.endpoints.get(name).ok_or_else(unreachable)?;
            let remote_node = remote.node;
            if net.partitions.contains(&pair(self.node, remote_node)) {
                return Err(unreachable());
            }
            if remote_node != peer {
                return Err(TransportError::PeerMismatch {
                    expected: peer,
                    actual: remote_node,
                });
            }
            if !remote.protocols.contains(&protocol) {
                return Err(TransportError::Refused(format!(
                    "{remote_node} does not serve {protocol}"
                )));
            }
            if !remote.admission.admit(&self.node, protocol) {
                return Err(TransportError::Refused(format!(
                    "{} does not admit {} for {protocol:?}",
                    remote_node, self.node
                )));
            }
            let (changed, _) = watch::channel(());
            let link = Arc::new(Link {
                state: AtomicU8::new(LinkState::Open as u8),
                changed,
            });
            let (to_remote, from_me) = mpsc::channel(QUEUE);
            let (to_me, from_remote) = mpsc::channel(QUEUE);
            let (streams_to_remote, streams_from_me) = mpsc::channel(streams::ACCEPT_QUEUE);
            let (streams_to_me, streams_from_remote) = mpsc::channel(streams::ACCEPT_QUEUE);
            let (dgrams_to_remote, dgrams_from_me) = mpsc::channel(streams::DATAGRAM_QUEUE);
            let (dgrams_to_me, dgrams_from_remote) = mpsc::channel(streams::DATAGRAM_QUEUE);
            let up = streams::Pipe::new(link.clone(), self.network.clone());
            let down = streams::Pipe::new(link.clone(), self.network.clone());
            let mine = MemoryConnection {
                local: self.node,
                remote: remote_node,
                protocol,
                tx: to_remote,
                rx: AsyncMutex::new(from_remote),
                link: link.clone(),
                network: self.network.clone(),
                out: up.clone(),
                back: down.clone(),
                streams_tx: streams_to_remote,
                streams_rx: AsyncMutex::new(streams_from_remote),
                datagrams_tx: dgrams_to_remote,
                datagrams_rx: AsyncMutex::new(dgrams_from_remote),
            };
            let theirs = MemoryConnection {
                local: remote_node,
                remote: self.node,
                protocol,
                tx: to_me,
                rx: AsyncMutex::new(from_me),
                link: link.clone(),
                network: self.network.clone(),
                out: down,
                back: up,
                streams_tx: streams_to_me,
                streams_rx: AsyncMutex::new(streams_from_me),
                datagrams_tx: dgrams_to_me,
                datagrams_rx: AsyncMutex::new(dgrams_from_me),
            };
            let incoming = remote.incoming.clone();
            if let Some(e) = net.endpoints.get_mut(name) {
                e.links.push(link.clone());
            }
            if let Some(own) = net
                .endpoints
                .get_mut(&self.name)
                .filter(|e| e.id == self.id)
            {
                own.links.push(link);
            }
            (mine, theirs, incoming)
        };
        incoming
            .send(theirs)
            .await
            .map_err(|_| TransportError::Unreachable { addr: addr.clone() })?;
        Ok(Box::new(mine))
    }

    async fn accept(&self) -> Result<Box<dyn Connection>, TransportError> {
        match self.incoming.lock().await.recv().await {
            Some(c) => Ok(Box::new(c)),
            None => Err(TransportError::Closed),
        }
    }

    fn serve(
        &self,
        protocols: &[Protocol],
        admission: Arc<dyn Admission>,
    ) -> Result<(), TransportError> {
        let mut net = self.network.lock();
        match net
            .endpoints
            .get_mut(&self.name)
            .filter(|e| e.id == self.id)
        {
            Some(e) => {
                e.protocols = protocols.to_vec();
                e.admission = admission;
                Ok(())
            }
            None => Err(TransportError::Closed),
        }
    }
}

impl Drop for MemoryTransport {
    fn drop(&mut self) {
        let mut net = self.network.lock();
        if net
            .endpoints
            .get(&self.name)
            .is_some_and(|e| e.id == self.id)
        {
            net.endpoints.remove(&self.name);
        }
    }
}
