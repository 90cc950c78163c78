//! The runtime of replicated state: drives the sans-IO [`Replica`]s of a
//! node's namespaces over the sync protocol ([`SYNC`]) with the members of
//! its mesh, and keeps them in storage.
//!
//! ```text
//!  Replicated::put/delete ─┐
//!  sync readers (frames) ──┼─▶ actor (owns replicas, HLC) ──submit──▶ storage writer (group commit)
//!  anti-entropy timer ─────┘        ▲                                    │
//!                                   └──── committed ◀── commit waiter ◀──┘
//!                                   │ (then: reply to the writer, push to members,
//!                                   ▼  tell subscribers)
//!                             per-member links (bounded queues, dial pinned to the node id)
//! ```
//!
//! A local write is stamped and applied in memory, its change and the
//! namespace's version vector go to storage in one batch, and only once
//! that batch is durable does the caller get its answer and do members
//! get the change (so no member ever holds a change its origin could lose
//! in a crash and then reuse the sequence number of). Changes from
//! members are stored the same way before subscribers hear of them.
//!
//! Changes are pushed by their origin to every reachable member as they
//! commit; anything a member missed (it was down, a queue was full) is
//! found by anti-entropy: every [`SyncSettings::interval`] the node sends
//! its version vectors to one member in turn, at start to every member,
//! and when a member joins or comes back; the member answers with what the
//! vectors lack, and with its own vectors when it lacks something itself.
//!
//! What a member can make this node hold is bounded: namespaces
//! ([`SyncSettings::max_namespaces`]), and per namespace keys, value size,
//! origins and out-of-order gaps ([`ReplicaLimits`]); frames are bounded in
//! size and count, and rate-limited per connection. A push may carry only
//! its sender's own changes; a change stamped more than the allowed skew
//! ahead of this node's clock is refused (it is offered again later, when
//! it is no longer in the future).
//!
//! Trust: changes are not signed by their origin. A member is a node let
//! in with a join token and authenticated on every connection; a member
//! that turns hostile can forge changes in a delta, and is answered with
//! the blocklist (a blocked node's connections are refused).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::commit::{Committer, Outcome};
use super::mesh::MeshRt;
use super::outlink::{Incoming, LinkTiming, MemberService, MembersOnly, OutLink};
use super::protocols::ProtocolHandler;
use super::{Core, NodeError, lock};
use crate::clock::Timestamp;
use crate::events::{Received, kinds};
use crate::identity::NodeId;
use crate::limits::Rate;
use crate::storage::{Storage, StorageError, Table, Write};
use crate::sync::store::{self as sync_store, valid_namespace};
use crate::sync::wire::MAX_FRAME_CHANGES;
use crate::sync::{
    Change, DEFAULT_MAX_SKEW, Hlc, HlcClock, Refusal, Replica, ReplicaLimits, SYNC, SyncFrame,
    VersionVector,
};
use crate::transport::{Connection, PeerAddr};

/// The namespace of the configuration ([`Node::config_set`](super::Node::config_set)):
/// JSON values.
pub const CONFIG_NAMESPACE: &str = "config";
/// The prefix of the namespaces of app tables ([`Node::table_insert`](super::Node::table_insert)).
pub const TABLE_PREFIX: &str = "table.";

/// How a node replicates state with the members of its mesh
/// ([`MeshSettings::sync`](super::MeshSettings::sync)).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SyncSettings {
    /// Every `interval` the node sends its version vectors to one member
    /// in turn (anti-entropy). Default 1 s.
    pub interval: Duration,
    /// Bounds of each namespace.
    pub limits: ReplicaLimits,
    /// Namespaces held at most (created by this node or by members).
    /// Default 64.
    pub max_namespaces: usize,
    /// How far ahead of this node's clock a change's stamp may be.
    /// Default 60 s.
    pub max_skew: Duration,
    /// Frames queued to one member before new ones are dropped (repaired
    /// by anti-entropy). Default 1,024.
    pub peer_queue: usize,
    /// Frames taken from one connection. Default 200/s, burst 400.
    pub frame_rate: Rate,
    /// Tombstones are collected this often. Default 60 s.
    pub collect_every: Duration,
}

impl Default for SyncSettings {
    fn default() -> Self {
        SyncSettings {
            interval: Duration::from_secs(1),
            limits: ReplicaLimits::default(),
            max_namespaces: 64,
            max_skew: DEFAULT_MAX_SKEW,
            peer_queue: 1024,
            frame_rate: Rate::per_second(200.0, 400),
            collect_every: Duration::from_secs(60),
        }
    }
}

impl SyncSettings {
    /// With anti-entropy every `interval`.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(Duration::from_millis(10));
        self
    }

    /// With these bounds per namespace.
    pub fn limits(mut self, limits: ReplicaLimits) -> Self {
        self.limits = limits;
        self
    }

    /// With at most `n` namespaces.
    pub fn max_namespaces(mut self, n: usize) -> Self {
        self.max_namespaces = n.max(1);
        self
    }

    /// With this allowed clock skew.
    pub fn max_skew(mut self, skew: Duration) -> Self {
        self.max_skew = skew;
        self
    }
}

/// Kinds of replicated-state failures ([`NodeError::Sync`]); the codes
/// are what the CLI prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SyncErrorKind {
    /// The node's sync runtime is not running (every node runs one; kept
    /// for nodes built without it in the future).
    Disabled,
    /// A bad namespace, key or value.
    InvalidArgument,
    /// A value over the size limit.
    ValueTooLarge,
    /// No such key (or row).
    NotFound,
    /// A row inserted that exists.
    Exists,
    /// A namespace, or the number of namespaces, at its limit.
    Full,
    /// The store failed, or the node is stopping.
    Unavailable,
}

impl SyncErrorKind {
    /// The stable code.
    pub fn code(self) -> &'static str {
        match self {
            SyncErrorKind::Disabled => "sync_disabled",
            SyncErrorKind::InvalidArgument => "invalid_argument",
            SyncErrorKind::ValueTooLarge => "value_too_large",
            SyncErrorKind::NotFound => "not_found",
            SyncErrorKind::Exists => "exists",
            SyncErrorKind::Full => "full",
            SyncErrorKind::Unavailable => "unavailable",
        }
    }
}

impl std::fmt::Display for SyncErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

fn fail(kind: SyncErrorKind, message: impl Into<String>) -> NodeError {
    NodeError::Sync {
        kind,
        message: message.into(),
    }
}

fn refusal_error(r: Refusal) -> NodeError {
    let kind = match &r {
        Refusal::ValueTooLarge { .. } => SyncErrorKind::ValueTooLarge,
        Refusal::Full { .. } => SyncErrorKind::Full,
        _ => SyncErrorKind::InvalidArgument,
    };
    fail(kind, r.to_string())
}

/// A value and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplicatedEntry {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// The stamp of the write that stands (its node is the writer).
    pub version: Hlc,
}

/// A change that now stands, as subscribers hear of it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplicatedChange {
    /// Its namespace.
    pub namespace: String,
    /// The key.
    pub key: String,
    /// The new value; none if the key was deleted.
    pub value: Option<Vec<u8>>,
    /// Its stamp.
    pub version: Hlc,
    /// Whether this node made it.
    pub local: bool,
}

/// Changes of one namespace as they commit ([`Replicated::subscribe`]).
#[derive(Debug)]
pub struct ChangeSubscription {
    rx: mpsc::Receiver<ReplicatedChange>,
    dropped: Arc<AtomicU64>,
}

impl ChangeSubscription {
    /// The next change; none once the node stopped.
    pub async fn recv(&mut self) -> Option<ReplicatedChange> {
        self.rx.recv().await
    }

    /// A change if one is waiting.
    pub fn try_recv(&mut self) -> Option<ReplicatedChange> {
        self.rx.try_recv().ok()
    }

    /// Changes dropped because this subscription's buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// How sync stands with one member ([`Node::sync_status`](super::Node::sync_status)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SyncPeerStatus {
    /// The member.
    pub node: NodeId,
    /// When it last sent this node its vectors or changes.
    pub last_sync: Option<Timestamp>,
    /// Changes this node holds that the member's last vectors lack.
    pub pending: usize,
}

/// The most change subscriptions at once.
const MAX_SUBSCRIPTIONS: usize = 256;
/// The actor's inbox.
const INBOX: usize = 512;
/// Batches submitted to storage and not yet committed, at most.
const MAX_IN_FLIGHT: usize = 1024;
/// Bytes of vectors in one digest frame.
const DIGEST_BYTES: usize = 256 * 1024;
/// A member's addresses: where it was seen last first, while the mesh's
/// table lacks it (it restarted elsewhere and the mesh has not heard yet).
fn seen_first(seen: Option<&PeerAddr>, table: Vec<PeerAddr>) -> Vec<PeerAddr> {
    match seen {
        Some(s) if !table.contains(s) => std::iter::once(s.clone()).chain(table).collect(),
        _ => table,
    }
}

/// Changes cut into frames within the push limits.
fn chunks(changes: Vec<Change>) -> Vec<Vec<Change>> {
    let mut frames = Vec::new();
    let mut batch = Vec::new();
    let mut bytes = 0;
    for c in changes {
        if !batch.is_empty()
            && (bytes + c.wire_len() > PUSH_BYTES || batch.len() >= MAX_FRAME_CHANGES)
        {
            frames.push(std::mem::take(&mut batch));
            bytes = 0;
        }
        bytes += c.wire_len();
        batch.push(c);
    }
    frames.push(batch);
    frames
}

/// A device session's peer is sent this node's vectors at most this often
/// (and when the session opens).
const SESSION_DIGEST_EVERY: Duration = Duration::from_secs(30);
/// Commands taken into one storage batch at most.
const BATCH_COMMANDS: usize = 1024;
/// Bytes of changes in one push frame.
const PUSH_BYTES: usize = 512 * 1024;
/// Sync connections kept from one member at once.
const CONNECTIONS_PER_MEMBER: usize = 2;

struct Sub {
    namespace: String,
    tx: mpsc::Sender<ReplicatedChange>,
    dropped: Arc<AtomicU64>,
}

enum Cmd {
    Write {
        namespace: String,
        key: String,
        value: Option<Vec<u8>>,
        /// `Some(true)`: only if the key is live (update, delete);
        /// `Some(false)`: only if it is not (insert).
        live: Option<bool>,
        reply: oneshot::Sender<Result<Option<Change>, NodeError>>,
    },
    Get {
        namespace: String,
        key: String,
        reply: oneshot::Sender<Option<Change>>,
    },
    Scan {
        namespace: String,
        prefix: String,
        reply: oneshot::Sender<Vec<Change>>,
    },
    Frame {
        from: NodeId,
        /// Where its connection came from (answers go there first: a
        /// member that restarted elsewhere is reached before the mesh
        /// hears of its new address).
        addr: Option<PeerAddr>,
        bytes: Vec<u8>,
    },
    Status {
        reply: oneshot::Sender<Vec<SyncPeerStatus>>,
    },
    Now {
        reply: oneshot::Sender<usize>,
    },
    /// A member joined or came back: catch up with it now.
    Reconnected(NodeId),
    /// A frame over the device session with `from`.
    SessionFrame {
        from: NodeId,
        bytes: Vec<u8>,
    },
    /// A namespace read back from storage after a failed batch.
    Reloaded {
        namespace: String,
        replica: Box<Replica>,
    },
}

/// What to do once a batch committed.
struct Committed {
    namespace: String,
    changes: Vec<Change>,
    local: bool,
    reply: Option<oneshot::Sender<Result<Option<Change>, NodeError>>>,
}

/// Whether a device may sync a namespace.
pub(crate) type DeviceGate = Arc<dyn Fn(&NodeId, &str) -> bool + Send + Sync>;

/// Whom a node syncs with over its device sessions (besides mesh members).
pub(crate) enum SessionSide {
    /// A primary: its paired devices with an open session, each the
    /// namespaces the gate allows it (its `sync:NS` / `sync:*` scopes).
    Devices(DeviceGate),
    /// A worker: its primary, while the session is open.
    Primary,
}

/// The sync side of a running node.
pub(crate) struct SyncRt {
    core: Arc<Core>,
    mesh: Option<Arc<MeshRt>>,
    side: SessionSide,
    /// A worker's changes its primary lacks, and for how long (ms) it has
    /// lacked some: what its heartbeats report.
    gauge_pending: AtomicU64,
    gauge_lag_ms: AtomicU64,
    settings: SyncSettings,
    inbox: mpsc::Sender<Cmd>,
    subscribers: Mutex<Vec<Sub>>,
    /// Incoming sync connections.
    incoming: Incoming,
    frames_dropped: AtomicU64,
}

impl std::fmt::Debug for SyncRt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncRt")
            .field("node", &self.core.key.node_id())
            .finish_non_exhaustive()
    }
}

/// Loads every stored namespace.
fn load_replicas(
    store: &dyn Storage,
    me: NodeId,
    limits: &ReplicaLimits,
    clock: &mut HlcClock,
) -> Result<BTreeMap<String, Replica>, StorageError> {
    let mut names = Vec::new();
    store.scan(Table::ReplicaCoverage, &mut |key, _| {
        names.push(key.to_owned());
        Ok(())
    })?;
    let mut out = BTreeMap::new();
    for ns in names.into_iter().filter(|n| valid_namespace(n)) {
        let (entries, covered) = sync_store::load(store, &ns)?;
        // Stamps stay monotonic across a restart, whatever the clock did.
        for c in entries.iter().filter(|c| c.origin() == me) {
            clock.restore(&c.hlc);
        }
        out.insert(
            ns.clone(),
            Replica::restore(me, limits.clone(), entries, covered),
        );
    }
    Ok(out)
}

/// A namespace's rows of superseded changes are deleted once there are at
/// least this many and a quarter as many as standing keys (so that the
/// deletes share B-tree pages)...
const COMPACT_MIN: usize = 1024;
/// ...or at most this many (bounding what is remembered meanwhile).
const COMPACT_MAX: usize = 65_536;

/// Builds the sync runtime from what is stored: with the mesh's members
/// (if the node is in a mesh) and over its device sessions (`side`).
pub(super) fn build(
    core: &Arc<Core>,
    mesh: Option<&Arc<MeshRt>>,
    side: SessionSide,
    settings: SyncSettings,
) -> Result<Arc<SyncRt>, NodeError> {
    let me = core.key.node_id();
    let mut clock = HlcClock::new(me, settings.max_skew);
    let replicas = load_replicas(core.store.as_ref(), me, &settings.limits, &mut clock)?;
    let durable_own = replicas
        .iter()
        .map(|(ns, r)| (ns.clone(), r.last_own_seq()))
        .collect();
    let (inbox, rx) = mpsc::channel(INBOX);
    let rt = Arc::new(SyncRt {
        core: core.clone(),
        mesh: mesh.cloned(),
        side,
        gauge_pending: AtomicU64::new(0),
        gauge_lag_ms: AtomicU64::new(0),
        settings,
        inbox,
        subscribers: Mutex::new(Vec::new()),
        incoming: Incoming::default(),
        frames_dropped: AtomicU64::new(0),
    });
    let (committer, done_rx) = Committer::start("sync-commit")?;
    // Members that join or come back are caught up with at once.
    let mut peer_events = core
        .events
        .subscribe("peer.*", 256)
        .map_err(|e| NodeError::Unavailable(format!("sync: {e}")))?;
    let events_inbox = rt.inbox.clone();
    core.spawn(async move {
        while let Some(r) = peer_events.recv().await {
            let Received::Event(e) = r else { continue };
            if (e.kind != kinds::PEER_JOINED && e.kind != kinds::PEER_ALIVE)
                || e.data["scope"] != "mesh"
            {
                continue;
            }
            if let Some(node) = e.data["node"].as_str().and_then(|n| n.parse().ok())
                && events_inbox.send(Cmd::Reconnected(node)).await.is_err()
            {
                return;
            }
        }
    });
    let actor = Actor {
        rt: Arc::downgrade(&rt),
        core: core.clone(),
        clock,
        replicas,
        peers: BTreeMap::new(),
        next_peer: 0,
        committer,
        in_flight: 0,
        batch: Vec::new(),
        batch_after: Vec::new(),
        last_collect: core.now(),
        outgoing: BTreeMap::new(),
        last_reachable: BTreeMap::new(),
        durable_own,
        forward: BTreeMap::new(),
        last_sessions: std::collections::HashSet::new(),
        session_digested: BTreeMap::new(),
        acks: BTreeMap::new(),
        pending_since: None,
    };
    core.spawn(actor.run(rx, done_rx));
    Ok(rt)
}

/// What this node knows of one member's sync.
/// How frames reach a peer: a link of their own to a mesh member, or the
/// device session (a primary's device, a worker's primary).
enum PeerLink {
    Out(OutLink),
    Session(mpsc::Sender<Vec<u8>>),
}

impl PeerLink {
    fn send(&self, frame: Vec<u8>) -> bool {
        match self {
            PeerLink::Out(l) => l.send(frame),
            PeerLink::Session(tx) => tx.try_send(frame).is_ok(),
        }
    }
}

/// Writes frames to `peer` over its device session while one is open
/// (frames while none is are dropped: anti-entropy repairs them).
fn session_link(core: &Arc<Core>, peer: NodeId, queue: usize) -> mpsc::Sender<Vec<u8>> {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(queue.max(1));
    let weak = Arc::downgrade(core);
    core.spawn(async move {
        while let Some(frame) = rx.recv().await {
            let Some(core) = weak.upgrade() else { return };
            if let Some(session) = core.sessions.get(&peer) {
                let payload = crate::wire::Payload::ReplicaSync(frame);
                let _ = core
                    .link
                    .send(session.conn.as_ref(), peer, payload, core.now())
                    .await;
            }
        }
    });
    tx
}

struct Peer {
    link: PeerLink,
    /// Its vectors, as it last sent them.
    vectors: BTreeMap<String, VersionVector>,
    last_sync: Option<Timestamp>,
    /// Where its last frame came from.
    seen: Option<PeerAddr>,
}

struct Actor {
    rt: Weak<SyncRt>,
    core: Arc<Core>,
    clock: HlcClock,
    replicas: BTreeMap<String, Replica>,
    peers: BTreeMap<NodeId, Peer>,
    /// Round-robin position of anti-entropy.
    next_peer: usize,
    committer: Committer<Vec<Committed>>,
    in_flight: usize,
    /// Writes submitted since the last flush, and what to do once they
    /// are durable.
    batch: Vec<Write>,
    batch_after: Vec<Committed>,
    last_collect: Timestamp,
    /// Local changes committed and not yet pushed, per namespace.
    outgoing: BTreeMap<String, Vec<Change>>,
    /// The reachable members at the last tick.
    last_reachable: BTreeMap<NodeId, Vec<PeerAddr>>,
    /// Per namespace, this node's highest change number on disk: digests
    /// are answered up to it only.
    durable_own: BTreeMap<String, u64>,
    /// Changes of others committed and not yet passed on to devices.
    forward: BTreeMap<String, Vec<Change>>,
    /// Peers with a device session at the last tick.
    last_sessions: std::collections::HashSet<NodeId>,
    /// When each session peer was last sent this node's vectors.
    session_digested: BTreeMap<NodeId, Timestamp>,
    /// Peers whose changes this node took since the last tick, and in
    /// which namespaces (bounded by the peers and namespaces).
    acks: BTreeMap<NodeId, std::collections::BTreeSet<String>>,
    /// Since when a worker's primary has lacked some of its changes.
    pending_since: Option<Timestamp>,
}

impl Actor {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Cmd>,
        mut done: mpsc::UnboundedReceiver<Outcome<Vec<Committed>>>,
    ) {
        let Some(interval) = self.rt.upgrade().map(|rt| rt.settings.interval) else {
            return;
        };
        // At start, catch up with every member (this node may have been
        // down while they wrote).
        self.digest_all();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                c = done.recv() => match c {
                    Some(c) => {
                        self.committed(c);
                        // Everything committed with it goes out together.
                        while let Ok(c) = done.try_recv() {
                            self.committed(c);
                        }
                        self.flush_pushes();
                    }
                    None => return,
                },
                cmd = rx.recv(), if self.in_flight < MAX_IN_FLIGHT => match cmd {
                    Some(cmd) => {
                        self.command(cmd);
                        // What queued meanwhile goes into the same batch.
                        for _ in 0..BATCH_COMMANDS {
                            match rx.try_recv() {
                                Ok(cmd) => self.command(cmd),
                                Err(_) => break,
                            }
                        }
                    }
                    None => return,
                },
                _ = tick.tick() => self.tick(),
            }
            self.flush();
        }
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Write {
                namespace,
                key,
                value,
                live,
                reply,
            } => self.write(namespace, key, value, live, reply),
            Cmd::Get {
                namespace,
                key,
                reply,
            } => {
                let found = self
                    .replicas
                    .get(&namespace)
                    .and_then(|r| r.entry(&key))
                    .filter(|c| !c.is_tombstone())
                    .cloned();
                let _ = reply.send(found);
            }
            Cmd::Scan {
                namespace,
                prefix,
                reply,
            } => {
                let found = self
                    .replicas
                    .get(&namespace)
                    .map(|r| r.scan(&prefix).cloned().collect())
                    .unwrap_or_default();
                let _ = reply.send(found);
            }
            Cmd::Frame { from, addr, bytes } => self.frame(from, addr, &bytes, false),
            Cmd::SessionFrame { from, bytes } => self.frame(from, None, &bytes, true),
            Cmd::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Cmd::Now { reply } => {
                let _ = reply.send(self.digest_all());
            }
            Cmd::Reloaded { namespace, replica } => {
                self.durable_own
                    .insert(namespace.clone(), replica.last_own_seq());
                self.replicas.insert(namespace, *replica);
            }
            Cmd::Reconnected(node) => {
                if let Some(addrs) = self.reachable().remove(&node) {
                    self.send_digest(node, addrs, true);
                }
            }
        }
    }

    fn write(
        &mut self,
        namespace: String,
        key: String,
        value: Option<Vec<u8>>,
        live: Option<bool>,
        reply: oneshot::Sender<Result<Option<Change>, NodeError>>,
    ) {
        let now = self.core.now();
        if !self.ensure(&namespace, false) {
            let _ = reply.send(Err(fail(
                SyncErrorKind::Full,
                "this node holds as many namespaces as allowed",
            )));
            return;
        }
        let Some(replica) = self.replicas.get_mut(&namespace) else {
            return;
        };
        let is_live = replica.get(&key).is_some();
        match live {
            Some(true) if !is_live => {
                let _ = reply.send(if value.is_none() {
                    Ok(None)
                } else {
                    Err(fail(SyncErrorKind::NotFound, format!("no key {key:?}")))
                });
                return;
            }
            Some(false) if is_live => {
                let _ = reply.send(Err(fail(SyncErrorKind::Exists, format!("{key:?} exists"))));
                return;
            }
            _ => {}
        }
        let change = match replica.write(&key, value, &mut self.clock, now) {
            Ok(c) => c,
            Err(e) => {
                let _ = reply.send(Err(refusal_error(e)));
                return;
            }
        };
        self.submit(namespace, vec![change], &[], true, Some(reply));
    }

    /// Hands `changes` of `namespace` (and the deletion of the rows of the
    /// changes `dropped`) to storage with the namespace's vector, in one
    /// batch.
    fn submit(
        &mut self,
        namespace: String,
        changes: Vec<Change>,
        dropped: &[(NodeId, u64)],
        local: bool,
        reply: Option<oneshot::Sender<Result<Option<Change>, NodeError>>>,
    ) {
        match sync_store::writes(&namespace, &changes, dropped, None) {
            Ok(w) => self.batch.extend(w),
            Err(e) => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(NodeError::Storage(e)));
                }
                return;
            }
        }
        self.batch_after.push(Committed {
            namespace,
            changes,
            local,
            reply,
        });
    }

    /// Hands everything submitted since the last flush to storage as one
    /// batch, with the vector of each namespace it touches (so many puts
    /// arriving together cost one transaction entry, not one each).
    fn flush(&mut self) {
        if self.batch_after.is_empty() {
            return;
        }
        let mut writes = std::mem::take(&mut self.batch);
        let after = std::mem::take(&mut self.batch_after);
        let touched: std::collections::BTreeSet<&str> =
            after.iter().map(|c| c.namespace.as_str()).collect();
        for ns in touched {
            let Some(r) = self.replicas.get_mut(ns) else {
                continue;
            };
            // Rows of superseded changes go in bulk, once there are enough
            // of them to share pages (see `sync::store`).
            let garbage = r.dropped_len();
            let mut dropped =
                if garbage >= COMPACT_MAX || (garbage >= COMPACT_MIN && garbage >= r.len() / 4) {
                    r.take_dropped()
                } else {
                    Vec::new()
                };
            dropped.sort_unstable();
            if let Ok(w) = sync_store::writes(ns, &[], &dropped, Some(r.covered())) {
                writes.extend(w);
            }
        }
        let pending = self.core.store.submit(writes);
        self.in_flight += 1;
        if !self.committer.wait(pending, after) {
            self.in_flight -= 1;
        }
    }

    /// A batch committed: members get local changes, subscribers every one.
    fn committed(&mut self, (batch, outcome): Outcome<Vec<Committed>>) {
        self.in_flight = self.in_flight.saturating_sub(1);
        for c in batch {
            self.committed_one(c, &outcome);
        }
    }

    fn committed_one(&mut self, c: Committed, outcome: &Result<(), StorageError>) {
        if let Some(reply) = c.reply {
            let answer = match &outcome {
                Ok(()) => Ok(c.changes.first().cloned()),
                Err(e) => Err(NodeError::Storage(e.clone())),
            };
            let _ = reply.send(answer);
        }
        let Some(rt) = self.rt.upgrade() else { return };
        if outcome.is_err() {
            self.core.events.publish(
                kinds::SYNC_STORE_FAILED,
                self.core.now(),
                json!({ "namespace": c.namespace, "changes": c.changes.len() }),
            );
            // What is in memory is no longer what is on disk.
            self.reload(c.namespace);
            return;
        }
        if c.changes.is_empty() {
            return;
        }
        if c.local
            && let Some(top) = c.changes.iter().map(|c| c.seq).max()
        {
            let d = self.durable_own.entry(c.namespace.clone()).or_default();
            *d = (*d).max(top);
        }
        rt.notify(&c.namespace, &c.changes, c.local);
        if c.local {
            self.outgoing
                .entry(c.namespace)
                .or_default()
                .extend(c.changes);
        } else if matches!(rt.side, SessionSide::Devices(_)) {
            // A primary passes members' and devices' changes on to its
            // devices (they hear of them from nobody else).
            self.forward
                .entry(c.namespace)
                .or_default()
                .extend(c.changes);
        }
    }

    /// Reads namespace `ns` back from storage (off the async threads) after
    /// a batch of it failed; the actor takes it in as `Cmd::Reloaded`.
    fn reload(&mut self, ns: String) {
        let Some(rt) = self.rt.upgrade() else { return };
        let store = self.core.store.clone();
        let me = self.core.key.node_id();
        let limits = rt.settings.limits.clone();
        let inbox = rt.inbox.clone();
        self.core.spawn(async move {
            let name = ns.clone();
            let loaded = tokio::task::spawn_blocking(move || {
                sync_store::load(store.as_ref(), &name)
                    .map(|(entries, covered)| Replica::restore(me, limits, entries, covered))
            })
            .await;
            if let Ok(Ok(replica)) = loaded {
                let _ = inbox
                    .send(Cmd::Reloaded {
                        namespace: ns,
                        replica: Box::new(replica),
                    })
                    .await;
            }
        });
    }

    /// Pushes the local changes committed since the last flush to every
    /// reachable member and session peer (devices: the namespaces they may
    /// sync), and passes other changes on to devices, in frames within the
    /// limits.
    fn flush_pushes(&mut self) {
        if self.outgoing.is_empty() && self.forward.is_empty() {
            return;
        }
        let Some(rt) = self.rt.upgrade() else { return };
        let outgoing = std::mem::take(&mut self.outgoing);
        let forward = std::mem::take(&mut self.forward);
        let reachable = self.reachable();
        let sessions: Vec<NodeId> = rt
            .session_peers()
            .into_iter()
            .filter(|n| !reachable.contains_key(n))
            .collect();
        let mut targets: Vec<(NodeId, Vec<PeerAddr>)> = reachable.into_iter().collect();
        targets.extend(sessions.iter().map(|n| (*n, Vec::new())));
        // A device's scopes are read once per namespace, not per frame.
        for (namespace, changes) in outgoing {
            let to: Vec<&(NodeId, Vec<PeerAddr>)> = targets
                .iter()
                .filter(|(node, addrs)| rt.allows(node, &namespace, addrs.is_empty()))
                .collect();
            for changes in chunks(changes) {
                let frame = SyncFrame::Push {
                    namespace: namespace.clone(),
                    changes,
                }
                .encode();
                for (node, addrs) in &to {
                    self.send(*node, addrs.clone(), frame.clone());
                }
            }
        }
        for (namespace, changes) in forward {
            let to: Vec<&NodeId> = sessions
                .iter()
                .filter(|node| rt.allows(node, &namespace, true))
                .collect();
            for changes in chunks(changes) {
                let frame = SyncFrame::Delta {
                    namespace: namespace.clone(),
                    delta: crate::sync::Delta {
                        changes,
                        covers: VersionVector::new(),
                        more: false,
                    },
                }
                .encode();
                for node in &to {
                    self.send(**node, Vec::new(), frame.clone());
                }
            }
        }
    }

    /// A worker's figures for its heartbeats: the changes its primary's
    /// last vectors lack, and since when it has lacked some.
    fn update_gauges(&mut self, sessions: &[NodeId]) {
        let Some(rt) = self.rt.upgrade() else { return };
        if !matches!(rt.side, SessionSide::Primary) {
            return;
        }
        let empty = VersionVector::new();
        let pending: usize = match sessions.first().and_then(|p| self.peers.get(p)) {
            Some(peer) => self
                .replicas
                .iter()
                .map(|(ns, r)| r.pending_for(peer.vectors.get(ns).unwrap_or(&empty)))
                .sum(),
            // No session: everything of its own is pending.
            None => self.replicas.values().map(|r| r.pending_for(&empty)).sum(),
        };
        let now = self.core.now();
        let lag_ms = if pending == 0 {
            self.pending_since = None;
            0
        } else {
            let since = *self.pending_since.get_or_insert(now);
            u64::try_from(now.saturating_duration_since(since).as_millis()).unwrap_or(u64::MAX)
        };
        rt.gauge_pending.store(pending as u64, Ordering::Relaxed);
        rt.gauge_lag_ms.store(lag_ms, Ordering::Relaxed);
    }

    /// Anti-entropy: vectors to the next member in turn; now and then,
    /// tombstones collected.
    fn tick(&mut self) {
        self.send_acks();
        let reachable = self.reachable();
        let sessions: Vec<NodeId> = self
            .rt
            .upgrade()
            .map(|rt| rt.session_peers())
            .unwrap_or_default()
            .into_iter()
            .filter(|n| !reachable.contains_key(n))
            .collect();
        self.peers
            .retain(|node, _| reachable.contains_key(node) || sessions.contains(node));
        // Peers of a device session that just opened are caught up with
        // at once, then in turn with the members.
        let opened: Vec<NodeId> = sessions
            .iter()
            .filter(|n| !self.last_sessions.contains(n))
            .copied()
            .collect();
        self.last_sessions = sessions.iter().copied().collect();
        let now = self.core.now();
        for node in opened {
            self.session_digested.insert(node, now);
            self.send_digest(node, Vec::new(), true);
        }
        self.update_gauges(&sessions);
        // Members new to the table, back from inactive, or at new
        // addresses (restarted elsewhere) are caught up with at once.
        let changed: Vec<(NodeId, Vec<PeerAddr>)> = reachable
            .iter()
            .filter(|(n, a)| self.last_reachable.get(*n) != Some(*a))
            .map(|(n, a)| (*n, a.clone()))
            .collect();
        self.last_reachable.clone_from(&reachable);
        for (node, addrs) in changed {
            self.send_digest(node, addrs, true);
        }
        // Session peers take a turn at most every SESSION_DIGEST_EVERY (a
        // primary may have a thousand devices; pushes carry what changes).
        let now = self.core.now();
        self.session_digested.retain(|n, _| sessions.contains(n));
        let due: Vec<NodeId> = sessions
            .into_iter()
            .filter(|n| {
                self.session_digested
                    .get(n)
                    .is_none_or(|t| now.saturating_duration_since(*t) >= SESSION_DIGEST_EVERY)
            })
            .collect();
        let mut turn: Vec<(NodeId, Vec<PeerAddr>)> = reachable.into_iter().collect();
        turn.extend(due.into_iter().map(|n| (n, Vec::new())));
        if !turn.is_empty() {
            let i = self.next_peer % turn.len();
            self.next_peer = self.next_peer.wrapping_add(1);
            let (node, addrs) = turn.swap_remove(i);
            if addrs.is_empty() {
                self.session_digested.insert(node, now);
            }
            self.send_digest(node, addrs, true);
        }
        let Some(rt) = self.rt.upgrade() else { return };
        let now = self.core.now();
        if now.saturating_duration_since(self.last_collect) >= rt.settings.collect_every {
            self.last_collect = now;
            let mut members = rt.members();
            members.extend(rt.session_peers());
            let names: Vec<String> = self.replicas.keys().cloned().collect();
            for ns in names {
                let Some(r) = self.replicas.get_mut(&ns) else {
                    continue;
                };
                if !r.collect(&members, now).is_empty() {
                    let mut dropped = r.take_dropped();
                    dropped.sort_unstable();
                    self.submit(ns, Vec::new(), &dropped, false, None);
                }
            }
        }
    }

    /// Vectors to every reachable member; how many.
    fn digest_all(&mut self) -> usize {
        let reachable = self.reachable();
        self.last_reachable.clone_from(&reachable);
        let sessions: Vec<NodeId> = self
            .rt
            .upgrade()
            .map(|rt| rt.session_peers())
            .unwrap_or_default()
            .into_iter()
            .filter(|n| !reachable.contains_key(n))
            .collect();
        let n = reachable.len() + sessions.len();
        for (node, addrs) in reachable {
            self.send_digest(node, addrs, true);
        }
        let now = self.core.now();
        for node in sessions {
            self.session_digested.insert(node, now);
            self.send_digest(node, Vec::new(), true);
        }
        n
    }

    /// Sends this node's vectors to `node`, in frames of at most
    /// [`DIGEST_BYTES`] (the last says they were all).
    fn send_digest(&mut self, node: NodeId, addrs: Vec<PeerAddr>, reply: bool) {
        let Some(rt) = self.rt.upgrade() else { return };
        // Holding nothing, a node asks nobody unprompted: peers that hold
        // something send their vectors, and it answers those (reply).
        if self.replicas.is_empty() && reply {
            return;
        }
        let via_session = addrs.is_empty();
        let mut frames = Vec::new();
        let mut vectors = Vec::new();
        let mut bytes = 0;
        for (ns, r) in &self.replicas {
            if !rt.allows(&node, ns, via_session) {
                continue;
            }
            let size = ns.len() + 48 * r.covered().len() + 8;
            if !vectors.is_empty() && bytes + size > DIGEST_BYTES {
                frames.push(std::mem::take(&mut vectors));
                bytes = 0;
            }
            bytes += size;
            vectors.push((ns.clone(), r.covered().clone()));
        }
        frames.push(vectors);
        let last = frames.len() - 1;
        for (i, vectors) in frames.into_iter().enumerate() {
            let frame = SyncFrame::Digest {
                vectors,
                reply,
                all: i == last,
            }
            .encode();
            self.send(node, addrs.clone(), frame);
        }
    }

    /// Members to sync with: in the table, not inactive, not refused.
    fn reachable(&self) -> BTreeMap<NodeId, Vec<PeerAddr>> {
        self.rt
            .upgrade()
            .map(|rt| rt.members_reachable())
            .unwrap_or_default()
    }

    fn send(&mut self, node: NodeId, addrs: Vec<PeerAddr>, frame: Vec<u8>) {
        let Some(rt) = self.rt.upgrade() else { return };
        let Some(peer) = self.peer(node, addrs, None) else {
            return;
        };
        if !peer.link.send(frame) {
            rt.frames_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// What this node keeps of peer `node` (its link made if new): a mesh
    /// member reached at `addrs` (the mesh's table) and where it was last
    /// `seen`, or, with neither, a peer of a device session.
    fn peer(
        &mut self,
        node: NodeId,
        addrs: Vec<PeerAddr>,
        seen: Option<PeerAddr>,
    ) -> Option<&mut Peer> {
        let rt = self.rt.upgrade()?;
        let session = addrs.is_empty() && seen.is_none();
        let stale = self
            .peers
            .get(&node)
            .is_some_and(|p| matches!(p.link, PeerLink::Session(_)) != session);
        if stale {
            self.peers.remove(&node);
        }
        let core = self.core.clone();
        let peer = self.peers.entry(node).or_insert_with(|| Peer {
            link: if session {
                PeerLink::Session(session_link(&core, node, rt.settings.peer_queue))
            } else {
                PeerLink::Out(OutLink::start(
                    &core,
                    node,
                    SYNC,
                    addrs.clone(),
                    rt.link_timing(),
                    None,
                    rt.settings.peer_queue,
                ))
            },
            vectors: BTreeMap::new(),
            last_sync: None,
            seen: None,
        });
        if seen.is_some() {
            peer.seen = seen;
        }
        if let PeerLink::Out(link) = &peer.link {
            // (Ignored when empty; redials only when they changed.)
            link.set_addrs(seen_first(peer.seen.as_ref(), addrs));
        }
        Some(peer)
    }

    /// Whether the replica of `ns` exists, made if new and under the
    /// limit; namespaces members bring (`remote`) may take at most three
    /// quarters of it, so members cannot use up this node's own.
    fn ensure(&mut self, ns: &str, remote: bool) -> bool {
        if self.replicas.contains_key(ns) {
            return true;
        }
        let Some(rt) = self.rt.upgrade() else {
            return false;
        };
        let max = rt.settings.max_namespaces;
        let limit = if remote { max - max / 4 } else { max };
        if !valid_namespace(ns) || self.replicas.len() >= limit {
            return false;
        }
        let me = self.core.key.node_id();
        self.replicas
            .insert(ns.to_owned(), Replica::new(me, rt.settings.limits.clone()));
        true
    }

    fn refused(&self, from: NodeId, reason: &str, count: usize) {
        self.core.events.publish(
            kinds::SYNC_REFUSED,
            self.core.now(),
            json!({ "node": from.to_string(), "reason": reason, "count": count }),
        );
    }

    /// Where to answer `from`, whose frame came from `seen` (remembered
    /// for its link, which tries it first while the mesh's table does not
    /// hold it): the table's addresses, if any.
    fn answer_addrs(&mut self, from: NodeId, seen: Option<PeerAddr>) -> Vec<PeerAddr> {
        let table = self.reachable().remove(&from).unwrap_or_default();
        if let Some(seen) = seen
            && let Some(p) = self.peer(from, table.clone(), Some(seen))
        {
            return seen_first(p.seen.as_ref(), table);
        }
        table
    }

    fn frame(&mut self, from: NodeId, seen: Option<PeerAddr>, bytes: &[u8], via_session: bool) {
        let frame = match SyncFrame::decode(bytes) {
            Ok(f) => f,
            Err(e) => {
                self.refused(from, &e.to_string(), 1);
                return;
            }
        };
        let now = self.core.now();
        let Some(rt) = self.rt.upgrade() else { return };
        // Over a device session, only the namespaces the device may sync.
        let allowed = |ns: &str| rt.allows(&from, ns, via_session);
        match &frame {
            SyncFrame::Push { namespace, .. } | SyncFrame::Delta { namespace, .. }
                if !allowed(namespace) =>
            {
                self.refused(from, &format!("no scope to sync {namespace:?}"), 1);
                return;
            }
            _ => {}
        }
        let answer = |actor: &mut Self| {
            if via_session {
                Vec::new()
            } else {
                actor.answer_addrs(from, seen.clone())
            }
        };
        match frame {
            SyncFrame::Push { namespace, changes } => {
                if changes.iter().any(|c| c.origin() != from) {
                    self.refused(
                        from,
                        "a push may carry only its sender's own changes",
                        changes.len(),
                    );
                    return;
                }
                let top = changes.iter().map(|c| c.seq).max().unwrap_or(0);
                if self.apply(from, namespace.clone(), changes, None) {
                    // A gap before these (a push was lost): ask for it now.
                    let behind = self
                        .replicas
                        .get(&namespace)
                        .is_some_and(|r| r.covered().get(&from).copied().unwrap_or(0) < top);
                    if behind {
                        let addrs = answer(self);
                        self.send_digest(from, addrs, false);
                    }
                }
            }
            SyncFrame::Digest {
                vectors,
                reply,
                all,
            } => {
                let addrs = answer(self);
                if addrs.is_empty() && !via_session {
                    return;
                }
                let mut theirs_ahead = false;
                let mut named = std::collections::BTreeSet::new();
                let mut deltas = Vec::new();
                let mut seen_vectors = Vec::new();
                for (ns, v) in vectors.into_iter().filter(|(ns, _)| allowed(ns)) {
                    named.insert(ns.clone());
                    // A digest makes no namespace here: if the member holds
                    // one this node lacks, this node's own digest (which
                    // then does not name it) brings it as a delta.
                    let upto = self.durable_own.get(&ns).copied().unwrap_or(0);
                    let Some(r) = self.replicas.get_mut(&ns) else {
                        theirs_ahead |= v.values().any(|n| *n > 0);
                        continue;
                    };
                    theirs_ahead |= v
                        .iter()
                        .any(|(o, n)| *n > r.covered().get(o).copied().unwrap_or(0));
                    r.note_peer(from, v.clone());
                    let delta = r.delta_for_upto(&v, upto);
                    if !delta.changes.is_empty() || !delta.covers.is_empty() {
                        deltas.push((ns.clone(), delta));
                    }
                    seen_vectors.push((ns, v));
                }
                // Namespaces a complete digest did not name: the member
                // holds nothing of them.
                if all {
                    for (ns, r) in &self.replicas {
                        if !named.contains(ns) && !r.is_empty() && allowed(ns) {
                            let upto = self.durable_own.get(ns).copied().unwrap_or(0);
                            deltas
                                .push((ns.clone(), r.delta_for_upto(&VersionVector::new(), upto)));
                        }
                    }
                }
                for (namespace, delta) in deltas {
                    let frame = SyncFrame::Delta { namespace, delta }.encode();
                    self.send(from, addrs.clone(), frame);
                }
                if reply && theirs_ahead {
                    self.send_digest(from, addrs.clone(), false);
                }
                if let Some(p) = self.peer(from, addrs, None) {
                    p.vectors.extend(seen_vectors);
                    p.last_sync = Some(now);
                }
            }
            SyncFrame::Delta { namespace, delta } => {
                let addrs = answer(self);
                let more = delta.more;
                let progress =
                    self.apply(from, namespace.clone(), delta.changes, Some(delta.covers));
                if let Some(p) = self.peer(from, addrs.clone(), None) {
                    p.last_sync = Some(now);
                }
                // The rest of this namespace, only if this part moved it
                // (changes refused here would come back the same forever).
                if more
                    && progress
                    && let Some(r) = self.replicas.get(&namespace)
                {
                    let frame = SyncFrame::Digest {
                        vectors: vec![(namespace, r.covered().clone())],
                        reply: false,
                        all: false,
                    }
                    .encode();
                    self.send(from, addrs, frame);
                }
            }
        }
    }

    /// Applies a member's changes and stores what stands; whether
    /// anything moved (a change stands, or the vector advanced).
    fn apply(
        &mut self,
        from: NodeId,
        namespace: String,
        changes: Vec<Change>,
        covers: Option<VersionVector>,
    ) -> bool {
        let now = self.core.now();
        if !self.ensure(&namespace, true) {
            self.refused(from, "too many namespaces", changes.len());
            return false;
        }
        let Some(r) = self.replicas.get_mut(&namespace) else {
            return false;
        };
        let applied = r.apply(changes, covers.as_ref(), &mut self.clock, now);
        if let Some((_, why)) = applied.refused.first() {
            self.refused(from, &why.to_string(), applied.refused.len());
        }
        let progress = !applied.changed.is_empty() || applied.covered_moved;
        if progress {
            // The sender hears what this node now holds on the next tick
            // (its pending count, a device's heartbeat figures).
            self.acks.entry(from).or_default().insert(namespace.clone());
            self.submit(namespace, applied.changed, &[], false, None);
        }
        progress
    }

    /// Tells each peer whose changes this node took since the last tick
    /// its vectors of those namespaces.
    fn send_acks(&mut self) {
        let acks = std::mem::take(&mut self.acks);
        let reachable = self.reachable();
        for (node, namespaces) in acks {
            let vectors: Vec<(String, VersionVector)> = namespaces
                .into_iter()
                .filter_map(|ns| self.replicas.get(&ns).map(|r| (ns, r.covered().clone())))
                .collect();
            if vectors.is_empty() {
                continue;
            }
            let frame = SyncFrame::Digest {
                vectors,
                reply: false,
                all: false,
            }
            .encode();
            let addrs = reachable.get(&node).cloned().unwrap_or_default();
            self.send(node, addrs, frame);
        }
    }

    fn status(&self) -> Vec<SyncPeerStatus> {
        let empty = VersionVector::new();
        let mut nodes: Vec<NodeId> = self.reachable().into_keys().collect();
        if let Some(rt) = self.rt.upgrade() {
            for n in rt.session_peers() {
                if !nodes.contains(&n) {
                    nodes.push(n);
                }
            }
        }
        nodes
            .into_iter()
            .map(|node| {
                let peer = self.peers.get(&node);
                let pending = self
                    .replicas
                    .iter()
                    .map(|(ns, r)| {
                        let theirs = peer.and_then(|p| p.vectors.get(ns)).unwrap_or(&empty);
                        r.pending_for(theirs)
                    })
                    .sum();
                SyncPeerStatus {
                    node,
                    last_sync: peer.and_then(|p| p.last_sync),
                    pending,
                }
            })
            .collect()
    }
}

impl SyncRt {
    fn link_timing(&self) -> LinkTiming {
        self.mesh.as_ref().map_or(
            LinkTiming {
                dial_timeout: Duration::from_secs(3),
                redial_after: Duration::from_secs(1),
                idle_close: Duration::from_secs(60),
            },
            |m| m.link_timing(),
        )
    }

    /// Mesh members to sync with, with their addresses.
    fn members_reachable(&self) -> BTreeMap<NodeId, Vec<PeerAddr>> {
        self.mesh
            .as_ref()
            .map(|m| m.reachable())
            .unwrap_or_default()
    }

    /// Every member in the mesh's table (for collecting tombstones).
    fn members(&self) -> Vec<NodeId> {
        self.mesh
            .as_ref()
            .map(|m| m.members().into_iter().collect())
            .unwrap_or_default()
    }

    /// Peers with an open device session: a primary's devices, a worker's
    /// primary.
    fn session_peers(&self) -> Vec<NodeId> {
        self.core
            .sessions
            .list()
            .into_iter()
            .map(|s| s.peer)
            .collect()
    }

    /// Whether `node` may sync `ns` (over a session: a device only the
    /// namespaces its scopes allow; a worker takes its primary's).
    fn allows(&self, node: &NodeId, ns: &str, via_session: bool) -> bool {
        match (&self.side, via_session) {
            (SessionSide::Devices(gate), true) => gate(node, ns),
            _ => true,
        }
    }

    /// A sync frame that came over the device session with `from` (the
    /// session machine authenticated it and checked the token); dropped if
    /// the actor is busy (anti-entropy repairs it).
    pub(super) fn session_frame(&self, from: NodeId, bytes: Vec<u8>) {
        if self
            .inbox
            .try_send(Cmd::SessionFrame { from, bytes })
            .is_err()
        {
            self.frames_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// What a worker's heartbeat reports: (ms its primary has lacked some
    /// of its changes, how many).
    pub(super) fn gauges(&self) -> (u64, u64) {
        (
            self.gauge_lag_ms.load(Ordering::Relaxed),
            self.gauge_pending.load(Ordering::Relaxed),
        )
    }

    fn notify(&self, namespace: &str, changes: &[Change], local: bool) {
        let mut subs = lock(&self.subscribers);
        subs.retain(|s| !s.tx.is_closed());
        for s in subs.iter().filter(|s| s.namespace == namespace) {
            for c in changes {
                let change = ReplicatedChange {
                    namespace: namespace.to_owned(),
                    key: c.key.clone(),
                    value: c.value.clone(),
                    version: c.hlc,
                    local,
                };
                if s.tx.try_send(change).is_err() {
                    s.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, NodeError> {
        super::commit::ask(&self.inbox, make, || {
            fail(SyncErrorKind::Unavailable, "the node has stopped")
        })
        .await
    }
}

#[async_trait]
impl MembersOnly for SyncRt {
    fn admits(&self, peer: &NodeId) -> bool {
        self.mesh.as_ref().is_some_and(|m| m.is_member(peer))
    }

    /// Serves one sync connection: its frames into the actor, at most the
    /// settings' rate.
    async fn serve_member(self: Arc<Self>, conn: Arc<dyn Connection>) {
        let rt = self.clone();
        self.incoming
            .serve(
                &self.core,
                conn,
                CONNECTIONS_PER_MEMBER,
                self.settings.frame_rate,
                |n| self.admits(n),
                &self.frames_dropped,
                |from, addr, bytes| {
                    let inbox = rt.inbox.clone();
                    async move { inbox.send(Cmd::Frame { from, addr, bytes }).await.is_ok() }
                },
            )
            .await;
    }
}

/// The sync protocol, as a handler (members only).
pub(super) fn protocol(rt: &Arc<SyncRt>) -> (crate::transport::Protocol, Arc<dyn ProtocolHandler>) {
    MemberService::handler(rt, SYNC, "SyncService")
}

/// One replicated namespace of a node ([`Node::replicated`](super::Node::replicated)):
/// a last-writer-wins map shared with every member of the mesh.
#[derive(Clone)]
pub struct Replicated {
    rt: Arc<SyncRt>,
    namespace: String,
}

impl std::fmt::Debug for Replicated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicated")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

fn entry(c: Change) -> Option<ReplicatedEntry> {
    Some(ReplicatedEntry {
        key: c.key,
        value: c.value?,
        version: c.hlc,
    })
}

impl Replicated {
    /// Its name.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    async fn write(
        &self,
        key: &str,
        value: Option<Vec<u8>>,
        live: Option<bool>,
    ) -> Result<Option<Change>, NodeError> {
        if self.namespace == CONFIG_NAMESPACE
            && let Some(v) = &value
            && serde_json::from_slice::<serde_json::Value>(v).is_err()
        {
            return Err(fail(
                SyncErrorKind::InvalidArgument,
                "the config namespace holds JSON values",
            ));
        }
        self.rt
            .ask(|reply| Cmd::Write {
                namespace: self.namespace.clone(),
                key: key.to_owned(),
                value,
                live,
                reply,
            })
            .await?
    }

    /// Sets `key` to `value`; returns its version once the write is
    /// durable here (members get it then, and by anti-entropy if they
    /// miss it).
    pub async fn put(&self, key: &str, value: Vec<u8>) -> Result<Hlc, NodeError> {
        self.set(key, value, None).await
    }

    /// Deletes `key` (a tombstone, replicated like a write); the
    /// tombstone's version, or none if the key was not there.
    pub async fn delete(&self, key: &str) -> Result<Option<Hlc>, NodeError> {
        Ok(self.write(key, None, Some(true)).await?.map(|c| c.hlc))
    }

    /// Sets `key` only if it holds no value; [`SyncErrorKind::Exists`]
    /// otherwise (as seen here: a member may insert it at the same time,
    /// and the later write wins).
    pub async fn insert(&self, key: &str, value: Vec<u8>) -> Result<Hlc, NodeError> {
        self.set(key, value, Some(false)).await
    }

    /// Sets `key` only if it holds a value; [`SyncErrorKind::NotFound`]
    /// otherwise.
    pub async fn update(&self, key: &str, value: Vec<u8>) -> Result<Hlc, NodeError> {
        self.set(key, value, Some(true)).await
    }

    async fn set(&self, key: &str, value: Vec<u8>, live: Option<bool>) -> Result<Hlc, NodeError> {
        let c = self.write(key, Some(value), live).await?;
        c.map(|c| c.hlc)
            .ok_or_else(|| fail(SyncErrorKind::Unavailable, "the write was lost"))
    }

    /// The value of `key` and its version, if it holds one.
    pub async fn get(&self, key: &str) -> Result<Option<ReplicatedEntry>, NodeError> {
        let c = self
            .rt
            .ask(|reply| Cmd::Get {
                namespace: self.namespace.clone(),
                key: key.to_owned(),
                reply,
            })
            .await?;
        Ok(c.and_then(entry))
    }

    /// Every key starting with `prefix` that holds a value, in key order.
    pub async fn scan(&self, prefix: &str) -> Result<Vec<ReplicatedEntry>, NodeError> {
        let found = self
            .rt
            .ask(|reply| Cmd::Scan {
                namespace: self.namespace.clone(),
                prefix: prefix.to_owned(),
                reply,
            })
            .await?;
        Ok(found.into_iter().filter_map(entry).collect())
    }

    /// Changes of this namespace as they commit here, local and from
    /// members; at most `capacity` wait (more are dropped and counted).
    pub fn subscribe(&self, capacity: usize) -> Result<ChangeSubscription, NodeError> {
        if capacity == 0 {
            return Err(fail(
                SyncErrorKind::InvalidArgument,
                "a subscription needs room for at least one change",
            ));
        }
        let mut subs = lock(&self.rt.subscribers);
        subs.retain(|s| !s.tx.is_closed());
        if subs.len() >= MAX_SUBSCRIPTIONS {
            return Err(fail(
                SyncErrorKind::Full,
                format!("at most {MAX_SUBSCRIPTIONS} change subscriptions"),
            ));
        }
        let (tx, rx) = mpsc::channel(capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        subs.push(Sub {
            namespace: self.namespace.clone(),
            tx,
            dropped: dropped.clone(),
        });
        Ok(ChangeSubscription { rx, dropped })
    }
}

/// A configuration entry ([`Node::config_get`](super::Node::config_get)).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ConfigEntry {
    /// The key.
    pub key: String,
    /// The value.
    pub value: serde_json::Value,
    /// Its version.
    pub version: Hlc,
}

fn config_entry(e: ReplicatedEntry) -> Result<ConfigEntry, NodeError> {
    let value = serde_json::from_slice(&e.value).map_err(|err| {
        fail(
            SyncErrorKind::InvalidArgument,
            format!("config key {:?} holds no JSON: {err}", e.key),
        )
    })?;
    Ok(ConfigEntry {
        key: e.key,
        value,
        version: e.version,
    })
}

fn json_bytes(value: &serde_json::Value) -> Vec<u8> {
    // A Value always serializes.
    serde_json::to_vec(value).unwrap_or_default()
}

impl super::Node {
    fn sync_rt(&self) -> Result<&Arc<SyncRt>, NodeError> {
        self.sync.as_ref().ok_or_else(|| {
            fail(
                SyncErrorKind::Disabled,
                "this node's sync runtime is not running",
            )
        })
    }

    /// The replicated namespace `namespace` (1 to 64 of `a-z 0-9 - _ .`),
    /// shared with every member of the mesh.
    pub fn replicated(&self, namespace: &str) -> Result<Replicated, NodeError> {
        let rt = self.sync_rt()?;
        if !valid_namespace(namespace) {
            return Err(fail(
                SyncErrorKind::InvalidArgument,
                format!("{namespace:?} is not a namespace name (1 to 64 of a-z 0-9 - _ .)"),
            ));
        }
        Ok(Replicated {
            rt: rt.clone(),
            namespace: namespace.to_owned(),
        })
    }

    /// Sets configuration key `key` to the JSON `value`, replicated to
    /// every member.
    pub async fn config_set(
        &self,
        key: &str,
        value: serde_json::Value,
    ) -> Result<ConfigEntry, NodeError> {
        let version = self
            .replicated(CONFIG_NAMESPACE)?
            .put(key, json_bytes(&value))
            .await?;
        Ok(ConfigEntry {
            key: key.to_owned(),
            value,
            version,
        })
    }

    /// Configuration key `key`; [`SyncErrorKind::NotFound`] if unset.
    pub async fn config_get(&self, key: &str) -> Result<ConfigEntry, NodeError> {
        match self.replicated(CONFIG_NAMESPACE)?.get(key).await? {
            Some(e) => config_entry(e),
            None => Err(fail(
                SyncErrorKind::NotFound,
                format!("no config key {key:?}"),
            )),
        }
    }

    /// Configuration keys starting with `prefix`, sorted by key.
    pub async fn config_list(&self, prefix: &str) -> Result<Vec<ConfigEntry>, NodeError> {
        self.replicated(CONFIG_NAMESPACE)?
            .scan(prefix)
            .await?
            .into_iter()
            .map(config_entry)
            .collect()
    }

    /// Deletes configuration key `key`; [`SyncErrorKind::NotFound`] if
    /// unset.
    pub async fn config_delete(&self, key: &str) -> Result<Hlc, NodeError> {
        self.replicated(CONFIG_NAMESPACE)?
            .delete(key)
            .await?
            .ok_or_else(|| fail(SyncErrorKind::NotFound, format!("no config key {key:?}")))
    }

    fn table(&self, table: &str) -> Result<Replicated, NodeError> {
        self.replicated(&format!("{TABLE_PREFIX}{table}"))
    }

    /// Inserts row `id` of app table `table` (a JSON object), replicated
    /// to every member; [`SyncErrorKind::Exists`] if it is there.
    pub async fn table_insert(
        &self,
        table: &str,
        id: &str,
        row: serde_json::Value,
    ) -> Result<Hlc, NodeError> {
        let bytes = row_bytes(&row)?;
        self.table(table)?.insert(id, bytes).await
    }

    /// Replaces row `id`; [`SyncErrorKind::NotFound`] if it is not there.
    pub async fn table_update(
        &self,
        table: &str,
        id: &str,
        row: serde_json::Value,
    ) -> Result<Hlc, NodeError> {
        let bytes = row_bytes(&row)?;
        self.table(table)?.update(id, bytes).await
    }

    /// Deletes row `id`; [`SyncErrorKind::NotFound`] if it is not there.
    pub async fn table_delete(&self, table: &str, id: &str) -> Result<Hlc, NodeError> {
        self.table(table)?
            .delete(id)
            .await?
            .ok_or_else(|| fail(SyncErrorKind::NotFound, format!("no row {id:?} in {table}")))
    }

    /// The rows of `table`, by id.
    pub async fn table_rows(
        &self,
        table: &str,
    ) -> Result<Vec<(String, serde_json::Value)>, NodeError> {
        self.table(table)?
            .scan("")
            .await?
            .into_iter()
            .map(|e| {
                let row = serde_json::from_slice(&e.value).map_err(|err| {
                    fail(
                        SyncErrorKind::InvalidArgument,
                        format!("row {:?} holds no JSON: {err}", e.key),
                    )
                })?;
                Ok((e.key, row))
            })
            .collect()
    }

    /// How sync stands with each reachable member.
    pub async fn sync_status(&self) -> Result<Vec<SyncPeerStatus>, NodeError> {
        self.sync_rt()?.ask(|reply| Cmd::Status { reply }).await
    }

    /// Sends this node's vectors to every reachable member and device
    /// session peer now (sync runs by itself; this is for the impatient);
    /// how many peers.
    pub async fn sync_now(&self) -> Result<usize, NodeError> {
        self.sync_rt()?.ask(|reply| Cmd::Now { reply }).await
    }

    /// Sync frames dropped: queues to members full, or over a member's
    /// frame rate.
    pub fn sync_frames_dropped(&self) -> u64 {
        self.sync
            .as_ref()
            .map_or(0, |rt| rt.frames_dropped.load(Ordering::Relaxed))
    }
}

fn row_bytes(row: &serde_json::Value) -> Result<Vec<u8>, NodeError> {
    if !row.is_object() {
        return Err(fail(
            SyncErrorKind::InvalidArgument,
            "a table row is a JSON object",
        ));
    }
    Ok(json_bytes(row))
}
