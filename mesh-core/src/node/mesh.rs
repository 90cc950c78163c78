//! The runtime of the mesh of nodes: drives the sans-IO [`Mesh`] over the
//! node's transports, serves the membership and join protocols, keeps the
//! member table, the blocklist and the tokens in storage, and records
//! blocks and joins in the ledger.
//!
//! ```text
//!  callers (Node::mesh_*) ─┐
//!  membership readers ─────┼─▶ actor (owns Mesh, timers) ──▶ per-peer writers ──▶ QUIC
//!  join handler ───────────┘        │                       (bounded queues, dial
//!                                   ├─▶ event bus (peer.*)    pinned to the node id,
//!                                   ├─▶ topic subscribers     Hello first)
//!                                   └─▶ store writer thread (member table, blocklist,
//!                                        ledger records: one batch each, in order)
//! ```
//!
//! Every queue is bounded: the actor's inbox (frames over it wait, so a
//! peer is slowed by its own connection's flow control), each writer's
//! queue (frames over it are dropped, as SWIM expects of a lossy network),
//! each subscriber's queue (deliveries over it are dropped and counted).
//! A membership connection must show a certificate within
//! [`MeshSettings::hello_timeout`]; at most [`MeshSettings::max_unverified`]
//! connections of nodes not in the member table wait for theirs at once
//! (members skip the cap, so strangers cannot crowd them out), joins are
//! rate-limited per source address and in all, and a node blocked or
//! refused for its score is refused during the handshake.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::outlink::{FirstFrame, LinkTiming, OutLink};
use super::protocols::ProtocolHandler;
use super::{Core, NodeError, lock};
use crate::clock::Timestamp;
use crate::events::kinds;
use crate::identity::NodeId;
use crate::ledger::{Entry, record_types};
use crate::limits::{KeyedLimiter, Rate, TokenBucket};
use crate::mesh::gossip::MessageKey;
use crate::mesh::member::{MemberCert, MemberId};
use crate::mesh::token::{self, JoinRefusal, JoinSecret, JoinToken};
use crate::mesh::wire::{JoinAnswer, JoinRequest, MeshFrame};
use crate::mesh::{
    Delivery, JOIN, JoinGrant, MEMBERSHIP, Mesh, MeshConfig, MeshError, MeshEvent, MeshOutput,
    MeshStore, MeshTimer,
};
use crate::storage::records::{
    BlockRecord, JoinTokenRecord, MeshSelfRecord, PeerRecord, PeerStatus,
};
use crate::storage::{Record, StorageExt, Write};
use crate::transport::{Connection, PeerAddr, Protocol, TransportError};

/// Ledger record types of the mesh beyond [`record_types`].
pub mod mesh_records {
    /// A join token was issued.
    pub const TOKEN_ISSUED: &str = "mesh.token_issued";
    /// A join token was revoked.
    pub const TOKEN_REVOKED: &str = "mesh.token_revoked";
    /// A node was unblocked.
    pub const PEER_UNBLOCKED: &str = "peer.unblocked";
}

/// How a node takes part in the mesh ([`NodeBuilder::mesh`](super::NodeBuilder::mesh)).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MeshSettings {
    /// The protocol's settings (fanout, rates, SWIM, horizons).
    pub config: MeshConfig,
    /// Where other members reach this node (at most 4; the socket
    /// addresses among them go into its join tokens).
    pub addresses: Vec<PeerAddr>,
    /// How long a dialer has to show its certificate. Default 2 s.
    pub hello_timeout: Duration,
    /// Membership connections waiting for their certificate at once.
    /// Default 64.
    pub max_unverified: usize,
    /// Membership connections kept from one member at once. Default 2.
    pub connections_per_member: usize,
    /// How long dialling a member may take. Default 3 s.
    pub dial_timeout: Duration,
    /// After a failed dial, frames to that member are dropped for this
    /// long before the next attempt. Default 1 s.
    pub redial_after: Duration,
    /// A connection to a member with nothing to send for this long is
    /// closed. Default 60 s.
    pub idle_close: Duration,
    /// How long a join may take, dial to grant. Default 10 s.
    pub join_timeout: Duration,
    /// Join attempts this node answers (as issuer), from everyone.
    /// Default 10/s, burst 20.
    pub join_rate: Rate,
    /// Join attempts answered from one source address (checked first, so
    /// one address cannot spend everyone's). Default 1/s, burst 5.
    pub join_rate_per_address: Rate,
    /// Frames queued to one member before new ones are dropped. Default 256.
    pub peer_queue: usize,
    /// How replicated state is synced with the members.
    pub sync: super::sync::SyncSettings,
    /// How messages are delivered to members, and held for them.
    pub delivery: super::delivery::DeliverySettings,
}

impl MeshSettings {
    /// The timings of the links to members.
    pub(crate) fn link_timing(&self) -> LinkTiming {
        LinkTiming {
            dial_timeout: self.dial_timeout,
            redial_after: self.redial_after,
            idle_close: self.idle_close,
        }
    }

    /// Defaults, with this node reachable at `addresses`.
    pub fn new(addresses: Vec<PeerAddr>) -> Self {
        MeshSettings {
            config: MeshConfig::default(),
            addresses,
            hello_timeout: Duration::from_secs(2),
            max_unverified: 64,
            connections_per_member: 2,
            dial_timeout: Duration::from_secs(3),
            redial_after: Duration::from_secs(1),
            idle_close: Duration::from_secs(60),
            join_timeout: Duration::from_secs(10),
            join_rate: Rate::per_second(10.0, 20),
            join_rate_per_address: Rate::per_second(1.0, 5),
            peer_queue: 256,
            sync: super::sync::SyncSettings::default(),
            delivery: super::delivery::DeliverySettings::default(),
        }
    }

    /// Defaults for a node whose transport is bound to `bound`, reachable
    /// at `advertise` if given (at most 4 are kept), else at `bound` itself
    /// (loopback when bound to every interface: a node meant to be reached
    /// from the LAN names its addresses).
    pub fn reachable_at(bound: SocketAddr, advertise: &[SocketAddr]) -> Self {
        if !advertise.is_empty() {
            return MeshSettings::new(
                advertise
                    .iter()
                    .take(4)
                    .map(|a| PeerAddr::Socket(*a))
                    .collect(),
            );
        }
        let ip = match bound.ip() {
            std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
            ip => ip,
        };
        MeshSettings::new(vec![PeerAddr::Socket(SocketAddr::new(ip, bound.port()))])
    }

    /// Sets the protocol's settings.
    pub fn config(mut self, config: MeshConfig) -> Self {
        self.config = config;
        self
    }
}

/// Why a mesh operation failed: a stable kind and a sentence. The kinds are
/// the CLI's (`meshctl mesh …`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MeshErrorKind {
    /// The token is past its expiry.
    TokenExpired,
    /// The token was used by another node.
    TokenUsed,
    /// The token is malformed, tampered with, or not the issuer's.
    TokenInvalid,
    /// The issuer revoked the token.
    TokenRevoked,
    /// The issuer could not be reached at any of the token's addresses.
    IssuerUnreachable,
    /// The issuer let nobody in: this node is blocked there, or its table
    /// is full.
    JoinRefused,
    /// No such token or member.
    NotFound,
    /// A bad argument (name, topic, reason, body).
    InvalidArgument,
    /// This node left the mesh.
    Left,
    /// The node was built without the mesh.
    Disabled,
}

impl MeshErrorKind {
    /// The kind's text.
    pub fn code(self) -> &'static str {
        match self {
            MeshErrorKind::TokenExpired => "token_expired",
            MeshErrorKind::TokenUsed => "token_used",
            MeshErrorKind::TokenInvalid => "token_invalid",
            MeshErrorKind::TokenRevoked => "token_revoked",
            MeshErrorKind::IssuerUnreachable => "issuer_unreachable",
            MeshErrorKind::JoinRefused => "join_refused",
            MeshErrorKind::NotFound => "not_found",
            MeshErrorKind::InvalidArgument => "invalid_argument",
            MeshErrorKind::Left => "left",
            MeshErrorKind::Disabled => "mesh_disabled",
        }
    }

    fn from_refusal(r: JoinRefusal) -> Self {
        match r {
            JoinRefusal::Expired => MeshErrorKind::TokenExpired,
            JoinRefusal::Used => MeshErrorKind::TokenUsed,
            JoinRefusal::Revoked => MeshErrorKind::TokenRevoked,
            _ => MeshErrorKind::TokenInvalid,
        }
    }
}

impl std::fmt::Display for MeshErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

fn fail(kind: MeshErrorKind, message: impl Into<String>) -> NodeError {
    NodeError::Mesh {
        kind,
        message: message.into(),
    }
}

fn mesh_error(e: MeshError) -> NodeError {
    let kind = match e {
        MeshError::Left => MeshErrorKind::Left,
        MeshError::NotBlocked(_) => MeshErrorKind::NotFound,
        MeshError::Blocked | MeshError::Full => MeshErrorKind::JoinRefused,
        _ => MeshErrorKind::InvalidArgument,
    };
    fail(kind, e.to_string())
}

/// A join token just issued: its text (holding the secret: show it to the
/// person who passes it on, log it nowhere) and its record.
#[derive(Clone)]
pub struct IssuedToken {
    /// The token's text.
    pub token: zeroize::Zeroizing<String>,
    /// Its id (what `tokens` lists and `revoke` takes).
    pub id: String,
    /// This node.
    pub issuer: NodeId,
    /// When it expires.
    pub expires_at: Timestamp,
}

impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedToken")
            .field("id", &self.id)
            .field("issuer", &self.issuer)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// What became of an issued token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenStatus {
    /// Unused and unexpired.
    Active,
    /// Used by a node.
    Used,
    /// Past its expiry, unused.
    Expired,
    /// Revoked.
    Revoked,
}

impl TokenStatus {
    /// `active`, `used`, `expired` or `revoked`.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenStatus::Active => "active",
            TokenStatus::Used => "used",
            TokenStatus::Expired => "expired",
            TokenStatus::Revoked => "revoked",
        }
    }

    /// The status of `record` at `now`.
    pub fn of(record: &JoinTokenRecord, now: Timestamp) -> Self {
        if record.revoked_at.is_some() {
            TokenStatus::Revoked
        } else if record.used_by.is_some() {
            TokenStatus::Used
        } else if now >= record.expires_at {
            TokenStatus::Expired
        } else {
            TokenStatus::Active
        }
    }
}

/// This node and the members it knows.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct MeshView {
    /// This node.
    pub node: NodeId,
    /// Its name in the mesh.
    pub name: String,
    /// Whether it left.
    pub left: bool,
    /// The members it knows, by node id.
    pub peers: Vec<PeerRecord>,
    /// The blocklist.
    pub blocked: Vec<BlockRecord>,
}

/// Broadcasts on matching topics, as they arrive ([`Node::mesh_subscribe`](super::Node::mesh_subscribe)).
#[derive(Debug)]
pub struct TopicSubscription {
    rx: mpsc::Receiver<Delivery>,
    dropped: Arc<AtomicU64>,
}

impl TopicSubscription {
    /// The next broadcast; `None` once the node stopped.
    pub async fn recv(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }

    /// The next broadcast if one is waiting.
    pub fn try_recv(&mut self) -> Option<Delivery> {
        self.rx.try_recv().ok()
    }

    /// Broadcasts dropped because this subscription's queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Topic patterns: `*` (everything), `PREFIX*`, or one topic.
fn topic_matches(pattern: &str, topic: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => topic.starts_with(prefix),
        None => pattern == topic,
    }
}

struct TopicSub {
    pattern: String,
    tx: mpsc::Sender<Delivery>,
    dropped: Arc<AtomicU64>,
}

/// The most topic subscriptions at once.
const MAX_SUBSCRIPTIONS: usize = 256;
/// The actor's inbox.
const INBOX: usize = 4096;
/// Store jobs waiting for the writer thread.
const STORE_QUEUE: usize = 4096;
/// The largest join answer (the transport's message limit, with room).
const MAX_GRANT_LEN: usize = 900 * 1024;

enum Cmd {
    Frame {
        from: NodeId,
        bytes: Vec<u8>,
    },
    Hello {
        from: NodeId,
        cert: MemberCert,
        reply: oneshot::Sender<bool>,
    },
    Broadcast {
        topic: String,
        body: Vec<u8>,
        reply: oneshot::Sender<Result<MessageKey, MeshError>>,
    },
    Block {
        target: NodeId,
        reason: String,
        reply: oneshot::Sender<Result<(), MeshError>>,
    },
    Unblock {
        target: NodeId,
        reply: oneshot::Sender<Result<(), MeshError>>,
    },
    Rename {
        name: String,
        reply: oneshot::Sender<Result<(), MeshError>>,
    },
    Leave {
        reply: oneshot::Sender<Result<(), MeshError>>,
    },
    Me {
        reply: oneshot::Sender<MemberId>,
    },
    AdmitJoiner {
        member: MemberId,
        reply: oneshot::Sender<Result<JoinGrant, MeshError>>,
    },
    ApplyGrant {
        sponsor: NodeId,
        grant: JoinGrant,
        reply: oneshot::Sender<Result<usize, MeshError>>,
    },
    View {
        reply: oneshot::Sender<MeshView>,
    },
}

/// An incoming membership connection and its number.
type Incoming = (u64, Arc<dyn Connection>);

/// One batch for the store writer: writes, with a ledger record if any.
struct StoreJob {
    writes: Vec<Write>,
    entry: Option<Entry>,
    at: Timestamp,
}

/// The mesh side of a running node.
pub(crate) struct MeshRt {
    core: Arc<Core>,
    settings: MeshSettings,
    inbox: mpsc::Sender<Cmd>,
    /// Nodes refused during the handshake (blocked, or under the score line).
    refused: RwLock<HashSet<NodeId>>,
    /// The certificate dialers show (changes when this node joins).
    cert: Mutex<MemberCert>,
    /// Incoming membership connections, by member.
    incoming: Mutex<HashMap<NodeId, Vec<Incoming>>>,
    next_conn: AtomicU64,
    unverified: Arc<Semaphore>,
    /// Members in the table: their connections skip the cap on
    /// connections waiting for a certificate (strangers cannot fill it
    /// for them; QUIC authenticated the node id).
    known: RwLock<HashSet<NodeId>>,
    /// Members not inactive, with their addresses (whom sync talks to).
    reachable: RwLock<BTreeMap<NodeId, Vec<PeerAddr>>>,
    joins: Arc<Semaphore>,
    join_rate: Mutex<TokenBucket>,
    join_rate_per_address: Mutex<KeyedLimiter<std::net::IpAddr>>,
    /// Token redemptions one at a time (a token is single-use).
    redeeming: tokio::sync::Mutex<()>,
    subscribers: Mutex<Vec<TopicSub>>,
    frames_dropped: AtomicU64,
}

impl std::fmt::Debug for MeshRt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshRt")
            .field("node", &self.core.key.node_id())
            .finish_non_exhaustive()
    }
}

/// Builds the mesh runtime from what is stored: this node's standing, the
/// member table and the blocklist (a restarted member rejoins from them).
pub(super) fn build(core: &Arc<Core>, settings: MeshSettings) -> Result<Arc<MeshRt>, NodeError> {
    let store = core.store.clone();
    let now = core.now();
    let stored: Option<MeshSelfRecord> = store.load(MeshSelfRecord::KEY)?;
    let peers: Vec<PeerRecord> = store.load_all()?;
    let blocks: Vec<BlockRecord> = store.load_all()?;
    // A new identity epoch at every start: higher than any this node used,
    // so every member takes the restarted node's identity over its old one.
    let epoch = now
        .as_millis()
        .max(stored.as_ref().map_or(0, |s| s.epoch.saturating_add(1)));
    let name = match &stored {
        Some(s) => s.name.clone(),
        None => mesh_name(&core.config.name),
    };
    let addrs: Vec<PeerAddr> = settings.addresses.iter().take(4).cloned().collect();
    let mut mesh = Mesh::new(
        core.key.clone(),
        settings.config.clone(),
        &name,
        addrs,
        epoch,
        stored.map(|s| s.cert),
        rand::random(),
        now,
    )
    .map_err(|e| NodeError::Unavailable(format!("mesh identity: {e}")))?;
    if !peers.is_empty() || !blocks.is_empty() {
        mesh.restore(peers, blocks, now);
    }
    let (inbox, rx) = mpsc::channel(INBOX);
    let rt = Arc::new(MeshRt {
        core: core.clone(),
        cert: Mutex::new(mesh.cert().clone()),
        refused: RwLock::new(mesh.blocked().map(|b| b.node).collect()),
        incoming: Mutex::new(HashMap::new()),
        next_conn: AtomicU64::new(1),
        unverified: Arc::new(Semaphore::new(settings.max_unverified.max(1))),
        joins: Arc::new(Semaphore::new(16)),
        join_rate: Mutex::new(TokenBucket::new(settings.join_rate, now)),
        join_rate_per_address: Mutex::new(KeyedLimiter::evicting(
            settings.join_rate_per_address,
            1024,
        )),
        known: RwLock::new(mesh.members().map(|m| m.node).collect()),
        reachable: RwLock::new(
            mesh.members()
                .filter(|m| m.status != PeerStatus::Inactive)
                .map(|m| (m.node, m.addresses.clone()))
                .collect(),
        ),
        redeeming: tokio::sync::Mutex::new(()),
        subscribers: Mutex::new(Vec::new()),
        frames_dropped: AtomicU64::new(0),
        inbox,
        settings,
    });
    let (store_tx, store_rx) = mpsc::channel(STORE_QUEUE);
    start_store_writer(core, store_rx)?;
    let actor = Actor {
        rt: Arc::downgrade(&rt),
        core: core.clone(),
        mesh,
        timers: BinaryHeap::new(),
        timer_seq: 0,
        links: BTreeMap::new(),
        store: store_tx,
        granted: Vec::new(),
    };
    core.spawn(actor.run(rx));
    Ok(rt)
}

/// The node's display name as a member name (at most 64 bytes, no control
/// characters).
fn mesh_name(name: &str) -> String {
    let mut out: String = name.chars().filter(|c| !c.is_control()).collect();
    while out.len() > crate::mesh::member::MAX_NAME_LEN {
        out.pop();
    }
    if out.is_empty() { "node".into() } else { out }
}

/// The membership and join protocols, as handlers.
pub(super) fn protocols(rt: &Arc<MeshRt>) -> Vec<(Protocol, Arc<dyn ProtocolHandler>)> {
    [MEMBERSHIP, JOIN]
        .into_iter()
        .map(|protocol| {
            let service = MeshService {
                rt: Arc::downgrade(rt),
                protocol,
            };
            (protocol, Arc::new(service) as Arc<dyn ProtocolHandler>)
        })
        .collect()
}

fn start_store_writer(core: &Arc<Core>, mut rx: mpsc::Receiver<StoreJob>) -> Result<(), NodeError> {
    let store = core.store.clone();
    let ledger = core.ledger.clone();
    let events = core.events.clone();
    std::thread::Builder::new()
        .name("mesh-store".into())
        .spawn(move || {
            while let Some(job) = rx.blocking_recv() {
                let outcome = match (&ledger, job.entry) {
                    (Some(ledger), Some(entry)) => ledger
                        .append(vec![entry], job.writes, job.at)
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    _ => store.apply(&job.writes).map_err(|e| e.to_string()),
                };
                if let Err(e) = outcome {
                    events.publish("mesh.store_failed", job.at, json!({ "error": e }));
                }
            }
        })
        .map_err(|e| NodeError::Unavailable(format!("cannot start the mesh store writer: {e}")))?;
    Ok(())
}

struct Actor {
    rt: Weak<MeshRt>,
    core: Arc<Core>,
    mesh: Mesh,
    timers: BinaryHeap<Reverse<(Timestamp, u64, TimerSlot)>>,
    timer_seq: u64,
    links: BTreeMap<NodeId, OutLink>,
    store: mpsc::Sender<StoreJob>,
    /// A joiner's grant, answered once the machine's outputs are applied:
    /// by then the member table admits it, so the connections it opens
    /// the moment it holds the grant are not refused.
    granted: Vec<(oneshot::Sender<GrantResult>, GrantResult)>,
}

/// What a joiner's admission answers.
type GrantResult = Result<JoinGrant, MeshError>;

/// A timer in the heap (ordered by time and sequence only).
struct TimerSlot(MeshTimer);

impl PartialEq for TimerSlot {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for TimerSlot {}
impl PartialOrd for TimerSlot {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for TimerSlot {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        self.drain().await;
        loop {
            let next = self.timers.peek().map(|Reverse((at, _, _))| *at);
            let wait = next.map(|at| at.saturating_duration_since(self.core.now()));
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => return,
                },
                () = sleep_or_forever(wait) => {
                    let now = self.core.now();
                    while let Some(Reverse((at, _, _))) = self.timers.peek() {
                        if *at > now {
                            break;
                        }
                        if let Some(Reverse((_, _, TimerSlot(t)))) = self.timers.pop() {
                            let tick = t == MeshTimer::Tick;
                            self.mesh.handle_timer(t, now);
                            if tick {
                                self.sync_refused();
                            }
                        }
                    }
                }
            }
            self.drain().await;
            for (reply, grant) in self.granted.drain(..) {
                let _ = reply.send(grant);
            }
        }
    }

    fn command(&mut self, cmd: Cmd) {
        let now = self.core.now();
        match cmd {
            Cmd::Frame { from, bytes } => {
                let _ = self.mesh.handle_frame(from, &bytes, now);
            }
            Cmd::Hello { from, cert, reply } => {
                let _ = reply.send(self.mesh.admit_hello(from, &cert, now));
            }
            Cmd::Broadcast { topic, body, reply } => {
                let _ = reply.send(self.mesh.broadcast(&topic, body, now));
            }
            Cmd::Block {
                target,
                reason,
                reply,
            } => {
                let _ = reply.send(self.mesh.block(target, &reason, now));
            }
            Cmd::Unblock { target, reply } => {
                let _ = reply.send(self.mesh.unblock(target, now));
            }
            Cmd::Rename { name, reply } => {
                let _ = reply.send(self.mesh.rename(&name, now));
            }
            Cmd::Leave { reply } => {
                let _ = reply.send(self.mesh.leave(now));
            }
            Cmd::Me { reply } => {
                let _ = reply.send(self.mesh.me().clone());
            }
            Cmd::AdmitJoiner { member, reply } => {
                let grant = self.mesh.admit_joiner(&member, now);
                self.granted.push((reply, grant));
            }
            Cmd::ApplyGrant {
                sponsor,
                grant,
                reply,
            } => {
                let _ = reply.send(self.mesh.apply_grant(sponsor, grant, now));
            }
            Cmd::View { reply } => {
                let _ = reply.send(MeshView {
                    node: self.mesh.me().node(),
                    name: self.mesh.me().name().to_owned(),
                    left: self.mesh.has_left(),
                    peers: self.mesh.members().cloned().collect(),
                    blocked: self.mesh.blocked().cloned().collect(),
                });
            }
        }
    }

    /// Carries out everything the mesh asked for.
    async fn drain(&mut self) {
        let Some(rt) = self.rt.upgrade() else { return };
        while let Some(out) = self.mesh.poll_output() {
            match out {
                MeshOutput::Send { to, addrs, frame } => self.send(&rt, to, addrs, frame),
                MeshOutput::Timer { at, timer } => {
                    self.timer_seq += 1;
                    self.timers
                        .push(Reverse((at, self.timer_seq, TimerSlot(timer))));
                }
                MeshOutput::Event(e) => self.event(&rt, e).await,
                MeshOutput::Deliver(d) => rt.deliver(d),
                MeshOutput::Disconnect(node) => {
                    self.links.remove(&node);
                    rt.close_incoming(&node);
                    self.refresh_refused(&rt, node);
                }
                MeshOutput::Store(s) => self.store(&rt, s).await,
            }
        }
    }

    fn send(&mut self, rt: &Arc<MeshRt>, to: NodeId, addrs: Vec<PeerAddr>, frame: Vec<u8>) {
        if to == self.mesh.me().node() {
            return;
        }
        if !self.links.contains_key(&to) && self.links.len() >= rt.settings.config.max_members {
            rt.frames_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let link = self.links.entry(to).or_insert_with(|| {
            // Its first frame on each new connection is `Hello` with this
            // node's certificate (as it is then).
            let weak = Arc::downgrade(rt);
            let hello: FirstFrame = Box::new(move || {
                let rt = weak.upgrade()?;
                let cert = lock(&rt.cert).clone();
                Some(MeshFrame::Hello { cert }.encode())
            });
            OutLink::start(
                &self.core,
                to,
                MEMBERSHIP,
                addrs.clone(),
                rt.settings.link_timing(),
                Some(hello),
                rt.settings.peer_queue,
            )
        });
        link.set_addrs(addrs);
        if !link.send(frame) {
            rt.frames_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn event(&mut self, rt: &Arc<MeshRt>, e: MeshEvent) {
        let now = self.core.now();
        let (kind, data) = match &e {
            MeshEvent::Joined {
                node,
                name,
                rejoined,
            } => (
                kinds::PEER_JOINED,
                json!({ "node": node.to_string(), "name": name, "rejoined": rejoined }),
            ),
            MeshEvent::Left { node, name, reason } => {
                // Its queue goes; a new one is made if it comes back.
                self.links.remove(node);
                (
                    kinds::PEER_LEFT,
                    json!({ "node": node.to_string(), "name": name, "reason": reason }),
                )
            }
            MeshEvent::Suspect { node, name } => (
                kinds::PEER_SUSPECT,
                json!({ "node": node.to_string(), "name": name }),
            ),
            MeshEvent::Alive { node, name } => (
                kinds::PEER_ALIVE,
                json!({ "node": node.to_string(), "name": name }),
            ),
            MeshEvent::Renamed { node, old, new } => (
                kinds::PEER_RENAMED,
                json!({ "node": node.to_string(), "old": old, "new": new }),
            ),
            MeshEvent::Blocklisted { node, by, reason } => {
                self.links.remove(node);
                rt.close_incoming(node);
                self.refresh_refused(rt, *node);
                (
                    kinds::PEER_BLOCKLISTED,
                    json!({ "node": node.to_string(), "by": by.to_string(), "reason": reason }),
                )
            }
            MeshEvent::Unblocked { node, by } => {
                self.refresh_refused(rt, *node);
                (
                    kinds::PEER_UNBLOCKED,
                    json!({ "node": node.to_string(), "by": by.to_string() }),
                )
            }
            MeshEvent::Disconnected { node, score } => (
                kinds::PEER_DISCONNECTED,
                json!({ "node": node.to_string(), "score": score }),
            ),
        };
        let mut data = data;
        data["scope"] = json!("mesh");
        self.core.events.publish(kind, now, data);
    }

    /// Rebuilds the set the handshake reads from the mesh (on each tick:
    /// a score that decayed back above the line is let in again).
    fn sync_refused(&self) {
        if let Some(rt) = self.rt.upgrade() {
            let now: HashSet<NodeId> = self.mesh.refused().collect();
            *rt.refused.write().unwrap_or_else(|e| e.into_inner()) = now;
        }
    }

    fn refresh_refused(&self, rt: &Arc<MeshRt>, node: NodeId) {
        let refuses = self.mesh.refuses(&node);
        let mut set = rt.refused.write().unwrap_or_else(|e| e.into_inner());
        if refuses {
            set.insert(node);
        } else {
            set.remove(&node);
        }
    }

    async fn store(&mut self, rt: &Arc<MeshRt>, s: MeshStore) {
        let now = self.core.now();
        let job = match s {
            MeshStore::Member(r) => {
                rt.known
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(r.node);
                {
                    let mut reachable = rt.reachable.write().unwrap_or_else(|e| e.into_inner());
                    if r.status == PeerStatus::Inactive {
                        reachable.remove(&r.node);
                    } else {
                        reachable.insert(r.node, r.addresses.clone());
                    }
                }
                r.put().ok().map(|w| StoreJob {
                    writes: vec![w],
                    entry: None,
                    at: now,
                })
            }
            MeshStore::Forget(node) => {
                self.links.remove(&node);
                rt.known
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&node);
                rt.reachable
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&node);
                Some(StoreJob {
                    writes: vec![PeerRecord::delete(&node.to_string())],
                    entry: None,
                    at: now,
                })
            }
            MeshStore::Block(b) => {
                let body = json!({
                    "node": b.node.to_string(),
                    "by": b.by.to_string(),
                    "reason": b.reason,
                    "at_ms": b.at.as_millis(),
                });
                let entry = Entry::json(record_types::PEER_BLOCKLISTED, b.by, &body);
                b.put().ok().map(|w| StoreJob {
                    writes: vec![w],
                    entry: Some(entry),
                    at: now,
                })
            }
            MeshStore::Unblock { node, by } => {
                let body = json!({ "node": node.to_string(), "by": by.to_string() });
                Some(StoreJob {
                    writes: vec![BlockRecord::delete(&node.to_string())],
                    entry: Some(Entry::json(mesh_records::PEER_UNBLOCKED, by, &body)),
                    at: now,
                })
            }
            MeshStore::Myself(me) => {
                *lock(&rt.cert) = me.cert.clone();
                me.put().ok().map(|w| StoreJob {
                    writes: vec![w],
                    entry: None,
                    at: now,
                })
            }
        };
        if let Some(job) = job {
            let _ = self.store.send(job).await;
        }
    }
}

async fn sleep_or_forever(wait: Option<Duration>) {
    match wait {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

impl MeshRt {
    /// Whether `node` is a member in the table and not refused.
    pub(super) fn is_member(&self, node: &NodeId) -> bool {
        !self.refuses(node)
            && self
                .known
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains(node)
    }

    /// Every member in the table.
    pub(super) fn members(&self) -> HashSet<NodeId> {
        self.known.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Members not inactive and not refused, with their addresses.
    pub(super) fn reachable(&self) -> BTreeMap<NodeId, Vec<PeerAddr>> {
        let refused = self.refused.read().unwrap_or_else(|e| e.into_inner());
        self.reachable
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(n, _)| !refused.contains(*n))
            .map(|(n, a)| (*n, a.clone()))
            .collect()
    }

    /// The timings of links to members.
    pub(super) fn link_timing(&self) -> LinkTiming {
        self.settings.link_timing()
    }

    fn deliver(&self, d: Delivery) {
        let mut subs = lock(&self.subscribers);
        subs.retain(|s| !s.tx.is_closed());
        for s in subs.iter().filter(|s| topic_matches(&s.pattern, &d.topic)) {
            if s.tx.try_send(d.clone()).is_err() {
                s.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn close_incoming(&self, node: &NodeId) {
        if let Some(conns) = lock(&self.incoming).remove(node) {
            for (_, c) in conns {
                c.close();
            }
        }
    }

    fn refuses(&self, node: &NodeId) -> bool {
        self.refused
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(node)
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, NodeError> {
        super::commit::ask(&self.inbox, make, || {
            NodeError::Unavailable("the mesh has stopped".into())
        })
        .await
    }

    /// Serves one membership connection: its certificate first, then its
    /// frames into the actor.
    async fn serve_membership(self: Arc<Self>, conn: Arc<dyn Connection>) {
        let from = conn.remote_node();
        let member = self
            .known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&from);
        let permit = if member {
            None
        } else {
            match self.unverified.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    conn.close();
                    return;
                }
            }
        };
        let first = tokio::time::timeout(self.settings.hello_timeout, conn.recv()).await;
        let cert = match first {
            Ok(Ok(bytes)) => match MeshFrame::decode(&bytes) {
                Ok(MeshFrame::Hello { cert }) => cert,
                _ => {
                    conn.close();
                    return;
                }
            },
            _ => {
                conn.close();
                return;
            }
        };
        let admitted = self
            .ask(|reply| Cmd::Hello { from, cert, reply })
            .await
            .unwrap_or(false);
        drop(permit);
        if !admitted {
            conn.close();
            return;
        }
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        {
            let mut incoming = lock(&self.incoming);
            let list = incoming.entry(from).or_default();
            list.push((id, conn.clone()));
            while list.len() > self.settings.connections_per_member.max(1) {
                let (_, old) = list.remove(0);
                old.close();
            }
        }
        let mut bucket = TokenBucket::new(self.settings.config.frame_rate, self.core.now());
        while let Ok(bytes) = conn.recv().await {
            if !bucket.try_take(self.core.now()) {
                // Over the peer's frame rate: dropped here, before the
                // shared inbox (the actor's own limiter scores the peer).
                self.frames_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if self.inbox.send(Cmd::Frame { from, bytes }).await.is_err() {
                break;
            }
        }
        let mut incoming = lock(&self.incoming);
        if let Some(list) = incoming.get_mut(&from) {
            list.retain(|(i, _)| *i != id);
            if list.is_empty() {
                incoming.remove(&from);
            }
        }
    }

    /// Serves one join connection: the joiner's secret and identity, the
    /// issuer's decision, the grant.
    async fn serve_join(self: Arc<Self>, conn: Arc<dyn Connection>) {
        let joiner = conn.remote_node();
        let Ok(_permit) = self.joins.clone().try_acquire_owned() else {
            conn.close();
            return;
        };
        let now = self.core.now();
        let per_address = match conn.remote_addr() {
            Some(PeerAddr::Socket(a)) => lock(&self.join_rate_per_address).try_take(&a.ip(), now),
            _ => true,
        };
        if !per_address || !lock(&self.join_rate).try_take(now) {
            let _ = conn
                .send(refusal(
                    "join_refused",
                    "too many join attempts; try again later",
                ))
                .await;
            conn.close();
            return;
        }
        let request = match tokio::time::timeout(self.settings.join_timeout, conn.recv()).await {
            Ok(Ok(bytes)) => JoinRequest::decode(&bytes),
            _ => {
                conn.close();
                return;
            }
        };
        let answer = match request {
            Err(e) => refusal("token_invalid", &format!("not a join request: {e}")),
            Ok(req) => self.decide_join(joiner, req).await,
        };
        let _ = conn.send(answer).await;
        // Let the answer reach the joiner before the connection goes.
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.recv()).await;
        conn.close();
    }

    async fn decide_join(&self, joiner: NodeId, req: JoinRequest) -> Vec<u8> {
        if req.member.node() != joiner || req.member.verify().is_err() {
            return refusal(
                "token_invalid",
                "the joiner's identity is not signed by the connection's key",
            );
        }
        if self.refuses(&joiner) {
            return refusal("join_refused", "this node is blocked from the mesh");
        }
        let secret = JoinSecret::from_bytes(req.secret);
        let _one = self.redeeming.lock().await;
        let store = self.core.store.clone();
        let ledger = self.core.ledger.clone();
        let now = self.core.now();
        let name = req.member.name().to_owned();
        let redeemed = tokio::task::spawn_blocking(move || -> Result<(), (String, String)> {
            let id = secret.digest().token_id();
            let record: Option<JoinTokenRecord> = store
                .load(&id)
                .map_err(|e| ("join_refused".to_owned(), e.to_string()))?;
            let decided = token::redeem(record.as_ref(), &secret, joiner, now)
                .map_err(|r| (r.code().to_owned(), r.to_string()))?;
            if record.as_ref() == Some(&decided) {
                // The same joiner again (its first answer was lost).
                return Ok(());
            }
            let write = decided
                .put()
                .map_err(|e| ("join_refused".to_owned(), e.to_string()))?;
            let body = json!({ "node": joiner.to_string(), "name": name, "token": id });
            match &ledger {
                Some(l) => {
                    let entry = Entry::json(record_types::PEER_JOINED, l.author(), &body);
                    l.append(vec![entry], vec![write], now)
                        .map(|_| ())
                        .map_err(|e| ("join_refused".to_owned(), e.to_string()))
                }
                None => store
                    .apply(&[write])
                    .map_err(|e| ("join_refused".to_owned(), e.to_string())),
            }
        })
        .await;
        match redeemed {
            Ok(Ok(())) => {}
            Ok(Err((code, message))) => return refusal(&code, &message),
            Err(_) => return refusal("join_refused", "the issuer failed to decide"),
        }
        let member = req.member.clone();
        match self.ask(|reply| Cmd::AdmitJoiner { member, reply }).await {
            Ok(Ok(mut grant)) => {
                let mut bytes = JoinAnswer::Granted(grant.clone()).encode();
                while bytes.len() > MAX_GRANT_LEN && !grant.members.is_empty() {
                    // The rest are learned by peer exchange.
                    let keep = grant.members.len() * 3 / 4;
                    let sponsor = grant.members.pop();
                    grant.members.truncate(keep);
                    grant.members.extend(sponsor);
                    bytes = JoinAnswer::Granted(grant.clone()).encode();
                }
                bytes
            }
            Ok(Err(e)) => refusal("join_refused", &e.to_string()),
            Err(e) => refusal("join_refused", &e.to_string()),
        }
    }
}

fn refusal(code: &str, message: &str) -> Vec<u8> {
    JoinAnswer::Refused {
        code: code.to_owned(),
        message: message.to_owned(),
    }
    .encode()
}

/// Serves [`MEMBERSHIP`] or [`JOIN`]: both admit any key the mesh does
/// not refuse; what a connection may do is decided when it speaks.
struct MeshService {
    rt: Weak<MeshRt>,
    protocol: Protocol,
}

impl std::fmt::Debug for MeshService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MeshService({})", self.protocol)
    }
}

#[async_trait]
impl ProtocolHandler for MeshService {
    fn admit(&self, peer: &NodeId) -> bool {
        self.rt.upgrade().is_some_and(|rt| !rt.refuses(peer))
    }

    async fn serve(&self, conn: Arc<dyn Connection>) {
        match self.rt.upgrade() {
            Some(rt) if self.protocol == JOIN => rt.serve_join(conn).await,
            Some(rt) => rt.serve_membership(conn).await,
            None => conn.close(),
        }
    }
}

impl super::Node {
    fn mesh_rt(&self) -> Result<&Arc<MeshRt>, NodeError> {
        self.mesh.as_ref().ok_or_else(|| {
            fail(
                MeshErrorKind::Disabled,
                "this node was built without the mesh (NodeBuilder::mesh)",
            )
        })
    }

    /// Whether this node takes part in the mesh.
    pub fn mesh_enabled(&self) -> bool {
        self.mesh.is_some()
    }

    /// Issues a join token valid for `ttl` (default 24 h): its text carries
    /// this node's id, its socket addresses, the expiry and a 128-bit secret
    /// of which only the digest is stored (with a ledger record).
    pub async fn mesh_token(&self, ttl: Option<Duration>) -> Result<IssuedToken, NodeError> {
        let rt = self.mesh_rt()?;
        let ttl = ttl.unwrap_or(token::DEFAULT_TOKEN_TTL);
        if ttl.is_zero() {
            return Err(fail(
                MeshErrorKind::InvalidArgument,
                "a token's lifetime must be more than zero",
            ));
        }
        let addrs: Vec<SocketAddr> = rt
            .settings
            .addresses
            .iter()
            .filter_map(|a| match a {
                PeerAddr::Socket(s) => Some(*s),
                _ => None,
            })
            .collect();
        if addrs.is_empty() {
            return Err(fail(
                MeshErrorKind::InvalidArgument,
                "this node has no socket address to put in a token",
            ));
        }
        let now = self.core.now();
        let token = JoinToken::generate(self.node_id(), &addrs, now, ttl);
        let record = token.record(now);
        let body = json!({ "token": record.id, "expires_at_ms": record.expires_at.as_millis() });
        self.commit(vec![record.put()?], mesh_records::TOKEN_ISSUED, body)
            .await?;
        Ok(IssuedToken {
            token: token.encode(),
            id: record.id,
            issuer: self.node_id(),
            expires_at: record.expires_at,
        })
    }

    /// The tokens this node issued (never their secrets), oldest first.
    pub async fn mesh_tokens(&self) -> Result<Vec<JoinTokenRecord>, NodeError> {
        self.mesh_rt()?;
        let store = self.core.store.clone();
        let mut all: Vec<JoinTokenRecord> = tokio::task::spawn_blocking(move || store.load_all())
            .await
            .map_err(|_| NodeError::Unavailable("the storage task failed".into()))??;
        all.sort_by_key(|t| t.created_at);
        Ok(all)
    }

    /// Revokes the token `id`: it can no longer be used (a ledger record
    /// says who revoked it and when). Revoking twice changes nothing.
    pub async fn revoke_mesh_token(&self, id: &str) -> Result<JoinTokenRecord, NodeError> {
        self.mesh_rt()?;
        let store = self.core.store.clone();
        let key = id.to_owned();
        let found: Option<JoinTokenRecord> = tokio::task::spawn_blocking(move || store.load(&key))
            .await
            .map_err(|_| NodeError::Unavailable("the storage task failed".into()))??;
        let Some(mut record) = found else {
            return Err(fail(MeshErrorKind::NotFound, format!("no token {id:?}")));
        };
        if record.revoked_at.is_some() {
            return Ok(record);
        }
        record.revoked_at = Some(self.core.now());
        let body = json!({ "token": record.id });
        self.commit(vec![record.put()?], mesh_records::TOKEN_REVOKED, body)
            .await?;
        Ok(record)
    }

    /// Commits `writes` with a ledger record (when the node has a ledger)
    /// on a blocking thread.
    async fn commit(
        &self,
        writes: Vec<Write>,
        record_type: &'static str,
        body: serde_json::Value,
    ) -> Result<(), NodeError> {
        let store = self.core.store.clone();
        let ledger = self.core.ledger.clone();
        let now = self.core.now();
        tokio::task::spawn_blocking(move || match ledger {
            Some(l) => {
                let entry = Entry::json(record_type, l.author(), &body);
                l.append(vec![entry], writes, now)
                    .map(|_| ())
                    .map_err(|e| NodeError::Unavailable(format!("audit ledger: {e}")))
            }
            None => store.apply(&writes).map_err(NodeError::from),
        })
        .await
        .map_err(|_| NodeError::Unavailable("the storage task failed".into()))?
    }

    /// Joins the mesh through `token`: connects to its issuer pinned to the
    /// issuer's node id, proves the secret inside the authenticated
    /// channel, and takes the member list it answers with (stored, and
    /// this node announced to every member). Returns how many members this
    /// node now knows. Errors are [`NodeError::Mesh`] with kind
    /// `token_invalid`, `token_expired`, `token_used`, `token_revoked`,
    /// `issuer_unreachable` or `join_refused`.
    pub async fn join_mesh(&self, token_text: &str) -> Result<usize, NodeError> {
        let rt = self.mesh_rt()?;
        let token = JoinToken::parse(token_text.trim())
            .map_err(|e| fail(MeshErrorKind::TokenInvalid, e.to_string()))?;
        if token.issuer == self.node_id() {
            return Err(fail(
                MeshErrorKind::TokenInvalid,
                "this token was issued by this node",
            ));
        }
        if token.is_expired(self.core.now()) {
            return Err(fail(
                MeshErrorKind::TokenExpired,
                "the join token has expired",
            ));
        }
        let me = rt.ask(|reply| Cmd::Me { reply }).await?;
        let request = JoinRequest {
            secret: *token.secret().expose(),
            member: me,
        };
        let deadline = rt.settings.join_timeout;
        let answer = tokio::time::timeout(deadline, async {
            let mut last = String::from("no address");
            for addr in &token.addresses {
                let addr = PeerAddr::Socket(*addr);
                let dial = self.core.connect(token.issuer, &addr, JOIN);
                let conn = match tokio::time::timeout(rt.settings.dial_timeout, dial).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(TransportError::Refused(m))) => {
                        return Err(fail(
                            MeshErrorKind::JoinRefused,
                            format!("the issuer refused this node: {m}"),
                        ));
                    }
                    Ok(Err(e)) => {
                        last = e.to_string();
                        continue;
                    }
                    Err(_) => {
                        last = format!("{addr}: no answer in time");
                        continue;
                    }
                };
                if conn.send(request.encode()).await.is_err() {
                    last = format!("{addr}: the connection closed");
                    continue;
                }
                let bytes = conn.recv().await;
                conn.close();
                match bytes {
                    Ok(b) => {
                        return JoinAnswer::decode(&b).map_err(|e| {
                            fail(
                                MeshErrorKind::JoinRefused,
                                format!("a bad answer from the issuer: {e}"),
                            )
                        });
                    }
                    Err(e) => last = format!("{addr}: {e}"),
                }
            }
            Err(fail(
                MeshErrorKind::IssuerUnreachable,
                format!("cannot reach the issuer {}: {last}", token.issuer),
            ))
        })
        .await
        .map_err(|_| {
            fail(
                MeshErrorKind::IssuerUnreachable,
                format!("the issuer did not answer within {deadline:?}"),
            )
        })??;
        match answer {
            JoinAnswer::Granted(grant) => {
                let sponsor = token.issuer;
                rt.ask(|reply| Cmd::ApplyGrant {
                    sponsor,
                    grant,
                    reply,
                })
                .await?
                .map_err(mesh_error)
            }
            JoinAnswer::Refused { code, message } => {
                let kind = match JoinRefusal::from_code(&code) {
                    Some(r) => MeshErrorKind::from_refusal(r),
                    None => MeshErrorKind::JoinRefused,
                };
                Err(fail(kind, message))
            }
        }
    }

    /// This node and the members it knows.
    pub async fn mesh_peers(&self) -> Result<MeshView, NodeError> {
        self.mesh_rt()?.ask(|reply| Cmd::View { reply }).await
    }

    /// Broadcasts `body` (at most 64 KiB) on `topic` to every member,
    /// signed by this node. Returns the message's key.
    pub async fn mesh_broadcast(
        &self,
        topic: &str,
        body: Vec<u8>,
    ) -> Result<MessageKey, NodeError> {
        let topic = topic.to_owned();
        self.mesh_rt()?
            .ask(|reply| Cmd::Broadcast { topic, body, reply })
            .await?
            .map_err(mesh_error)
    }

    /// Broadcasts on topics matching `pattern` (`*`, `PREFIX*` or one
    /// topic), each once, in a queue of `capacity` (broadcasts over it are
    /// dropped and counted).
    pub fn mesh_subscribe(
        &self,
        pattern: &str,
        capacity: usize,
    ) -> Result<TopicSubscription, NodeError> {
        let rt = self.mesh_rt()?;
        if pattern.is_empty() || pattern.len() > crate::mesh::gossip::MAX_TOPIC_LEN {
            return Err(fail(
                MeshErrorKind::InvalidArgument,
                "a topic pattern is 1 to 128 bytes",
            ));
        }
        let mut subs = lock(&rt.subscribers);
        subs.retain(|s| !s.tx.is_closed());
        if subs.len() >= MAX_SUBSCRIPTIONS {
            return Err(fail(
                MeshErrorKind::InvalidArgument,
                format!("at most {MAX_SUBSCRIPTIONS} topic subscriptions at once"),
            ));
        }
        let (tx, rx) = mpsc::channel(capacity.clamp(1, 65_536));
        let dropped = Arc::new(AtomicU64::new(0));
        subs.push(TopicSub {
            pattern: pattern.to_owned(),
            tx,
            dropped: dropped.clone(),
        });
        Ok(TopicSubscription { rx, dropped })
    }

    /// Takes `name` in the mesh; every member sees `peer.renamed`.
    pub async fn mesh_rename(&self, name: &str) -> Result<(), NodeError> {
        let name = name.to_owned();
        self.mesh_rt()?
            .ask(|reply| Cmd::Rename { name, reply })
            .await?
            .map_err(mesh_error)
    }

    /// Leaves the mesh: every member sees `peer.left` (reason `left`) at once.
    pub async fn mesh_leave(&self) -> Result<(), NodeError> {
        self.mesh_rt()?
            .ask(|reply| Cmd::Leave { reply })
            .await?
            .map_err(mesh_error)
    }

    /// Blocks `node` from the mesh: recorded in the ledger, propagated to
    /// every member, which then refuse its connections and drop its
    /// messages, relayed ones included.
    pub async fn mesh_block(&self, node: NodeId, reason: &str) -> Result<(), NodeError> {
        let reason = reason.to_owned();
        self.mesh_rt()?
            .ask(|reply| Cmd::Block {
                target: node,
                reason,
                reply,
            })
            .await?
            .map_err(mesh_error)
    }

    /// Lifts a block, everywhere.
    pub async fn mesh_unblock(&self, node: NodeId) -> Result<(), NodeError> {
        self.mesh_rt()?
            .ask(|reply| Cmd::Unblock {
                target: node,
                reply,
            })
            .await?
            .map_err(mesh_error)
    }

    /// Frames this node dropped: over a member's queue or rate.
    pub fn mesh_frames_dropped(&self) -> u64 {
        self.mesh
            .as_ref()
            .map_or(0, |rt| rt.frames_dropped.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_patterns() {
        assert!(topic_matches("*", "chat"));
        assert!(topic_matches("chat/*", "chat/general"));
        assert!(!topic_matches("chat/*", "news"));
        assert!(topic_matches("chat", "chat"));
        assert!(!topic_matches("chat", "chat/general"));
    }

    #[test]
    fn addresses_to_advertise() {
        let any: SocketAddr = "0.0.0.0:4433".parse().unwrap();
        assert_eq!(
            MeshSettings::reachable_at(any, &[]).addresses,
            vec![PeerAddr::Socket("127.0.0.1:4433".parse().unwrap())]
        );
        let lan: SocketAddr = "192.168.1.7:4433".parse().unwrap();
        assert_eq!(
            MeshSettings::reachable_at(any, &[lan]).addresses,
            vec![PeerAddr::Socket(lan)]
        );
        let v6: SocketAddr = "[::]:9".parse().unwrap();
        assert_eq!(
            MeshSettings::reachable_at(v6, &[]).addresses,
            vec![PeerAddr::Socket("[::1]:9".parse().unwrap())]
        );
    }

    #[test]
    fn member_names_are_made_valid() {
        assert_eq!(mesh_name("a\nb"), "ab");
        assert_eq!(mesh_name(""), "node");
        assert!(mesh_name(&"é".repeat(100)).len() <= 64);
    }
}
