//! The runtime of reliable delivery: drives the sans-IO [`Outbox`] and
//! [`RelayStore`] over the delivery protocol ([`DELIVER`]) with the members
//! of the mesh, and keeps outbox, inbox, sequence numbers and relayed
//! letters in storage.
//!
//! ```text
//!  Node::send_reliable ─┐                        ┌─▶ storage (group commit) ─▶ committer thread
//!  delivery readers ────┼─▶ actor (outbox, relay, ┘                                  │
//!  retry timer ─────────┘    seen windows, inbox) ◀──── committed: then send, ack, ◀─┘
//!                               │                       hand over, answer
//!                               ▼
//!                 per-member links (bounded queues, dial pinned to the node id)
//! ```
//!
//! Sender: a letter and the next sequence number go to storage in one
//! batch before the letter is sent, so a sender killed at any point sends
//! it again after restart (same id, same number). It is sent with
//! backoff and jitter until the recipient acknowledges it; when the
//! recipient is not reachable, or direct tries went unanswered, relays
//! get it too.
//!
//! Recipient: a letter is opened (seal, signature, id), checked against
//! its sender's seen window, and stored in the inbox with the window in
//! one batch; only then is it acknowledged, and, if it came through a
//! relay, a receipt (a letter of its own) goes back to the sender. The
//! inbox hands each message to the application's [`ReliableInbox`] once
//! and then forgets it.
//!
//! Relay: a letter for another member is stored, then `Stored` is
//! answered; it is offered to its recipient whenever the recipient is
//! reachable, until the recipient acknowledges it or it expires.
//!
//! Bounds: letters from and for members only; the relay store per
//! recipient and in all; the inbox ([`DeliverySettings::inbox_limit`]);
//! seen windows; frames per connection.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::commit::{Committer, Outcome};
use super::mesh::MeshRt;
use super::outlink::{Incoming, MemberService, MembersOnly, OutLink};
use super::protocols::ProtocolHandler;
use super::{Core, NodeError};
use crate::clock::Timestamp;
use crate::delivery::{
    Contents, DELIVER, DeliveryFrame, Letter, LetterId, MAX_PAYLOAD_LEN, Outbox, RelayLimits,
    RelayStore, RetryConfig, Seen, SeenWindow,
};
use crate::identity::NodeId;
use crate::limits::Rate;
use crate::storage::{Record, StorageExt, Table, Write};
use crate::transport::{Connection, PeerAddr};

/// Event kinds of delivery.
pub mod delivery_events {
    /// A letter was refused (`node`, `reason`): malformed, tampered,
    /// forged, over a limit.
    pub const REFUSED: &str = "delivery.refused";
    /// A letter expired in the outbox before it was acknowledged (`id`,
    /// `to`).
    pub const EXPIRED: &str = "delivery.expired";
}

/// How a node delivers letters ([`MeshSettings::delivery`](super::MeshSettings::delivery)).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeliverySettings {
    /// Retries and relays.
    pub retry: RetryConfig,
    /// What this node holds as a relay.
    pub relay: RelayLimits,
    /// How long a letter lives (relays drop it after). Default 24 h.
    pub ttl: Duration,
    /// Messages waiting in the inbox for the application, at most (and an
    /// eighth of it from one sender); letters over it are not acknowledged
    /// (their senders try again). Default 10,000.
    pub inbox_limit: usize,
    /// Bytes of messages waiting in the inbox, at most. Default 64 MiB.
    pub inbox_bytes: usize,
    /// Letters waiting in the outbox, at most. Default 10,000.
    pub outbox_limit: usize,
    /// Frames taken from one connection. Default 200/s, burst 400.
    pub frame_rate: Rate,
    /// Frames queued to one member. Default 1,024.
    pub peer_queue: usize,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            retry: RetryConfig::default(),
            relay: RelayLimits::default(),
            ttl: Duration::from_secs(24 * 3600),
            inbox_limit: 10_000,
            inbox_bytes: 64 << 20,
            outbox_limit: 10_000,
            frame_rate: Rate::per_second(200.0, 400),
            peer_queue: 1024,
        }
    }
}

impl DeliverySettings {
    /// With these retries.
    pub fn retry(mut self, retry: RetryConfig) -> Self {
        self.retry = retry;
        self
    }
}

/// A message as the application receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReliableMessage {
    /// Its id (the sender's `send_reliable` returned the same).
    pub id: LetterId,
    /// Who sent it.
    pub from: NodeId,
    /// The sender's number for it (per recipient, from 1).
    pub seq: u64,
    /// The payload.
    pub payload: Vec<u8>,
    /// When this node took it.
    pub received_at: Timestamp,
}

/// Letters in flight at this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct DeliveryStatus {
    /// Sent and not yet acknowledged.
    pub outbox: usize,
    /// Received and not yet handed to the application.
    pub inbox: usize,
    /// Held for other members as a relay.
    pub relayed: usize,
}

// ---- stored records ----------------------------------------------------

/// A letter in the outbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct OutboxRecord {
    letter: Letter,
    /// Its number for its recipient.
    seq: u64,
    receipt: bool,
}

impl Record for OutboxRecord {
    const TABLE: Table = Table::DeliveryOutbox;
    fn key(&self) -> String {
        self.letter.id.to_hex()
    }
}

/// A message in the inbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct InboxRecord {
    id: LetterId,
    from: NodeId,
    seq: u64,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
    received_at: Timestamp,
}

fn inbox_key(from: &NodeId, seq: u64) -> String {
    format!("{from}:{seq:020}")
}

impl Record for InboxRecord {
    const TABLE: Table = Table::DeliveryInbox;
    fn key(&self) -> String {
        inbox_key(&self.from, self.seq)
    }
}

/// Sequence numbers: the next to send to a node, the seen window of one.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum SeqRecord {
    Next { to: NodeId, next: u64 },
    Seen { from: NodeId, window: SeenWindow },
}

impl Record for SeqRecord {
    const TABLE: Table = Table::DeliverySeq;
    fn key(&self) -> String {
        match self {
            SeqRecord::Next { to, .. } => format!("next:{to}"),
            SeqRecord::Seen { from, .. } => format!("seen:{from}"),
        }
    }
}

/// A letter held as a relay.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RelayRecord {
    letter: Letter,
}

fn relay_key(to: &NodeId, id: &LetterId) -> String {
    format!("{to}:{id}")
}

impl Record for RelayRecord {
    const TABLE: Table = Table::DeliveryRelay;
    fn key(&self) -> String {
        relay_key(&self.letter.to, &self.letter.id)
    }
}

// ---- the actor -----------------------------------------------------------

enum Cmd {
    Post {
        to: NodeId,
        payload: Vec<u8>,
        posted: oneshot::Sender<Result<LetterId, NodeError>>,
        acked: Option<oneshot::Sender<()>>,
    },
    Frame {
        from: NodeId,
        addr: Option<PeerAddr>,
        bytes: Vec<u8>,
    },
    Take {
        max: usize,
        reply: oneshot::Sender<Handover>,
    },
    Status {
        reply: oneshot::Sender<DeliveryStatus>,
    },
}

/// What to do once a batch committed.
enum After {
    /// A letter posted: answer, then send it.
    Posted {
        letter: Letter,
        posted: oneshot::Sender<Result<LetterId, NodeError>>,
        acked: Option<oneshot::Sender<()>>,
    },
    /// A letter taken (or a duplicate): acknowledge it to `forwarder`; a
    /// receipt (already stored) goes back if it came through a relay. If
    /// the batch failed, the sender's seen window goes back to what it was.
    Received {
        forwarder: NodeId,
        id: LetterId,
        message: Option<InboxRecord>,
        receipt: Option<Letter>,
        rollback: (NodeId, SeenWindow),
    },
    /// A letter held as a relay: say so to `forwarder` (or, if the batch
    /// failed, forget it).
    Relayed {
        forwarder: NodeId,
        to: NodeId,
        id: LetterId,
    },
    /// Bookkeeping only.
    Nothing,
}

const INBOX: usize = 512;
const MAX_IN_FLIGHT: usize = 1024;
/// Members whose last address is remembered.
const MAX_SEEN_AT: usize = 4096;
const TICK: Duration = Duration::from_millis(200);
/// A relay offers a held letter to its recipient at most this often.
const OFFER_EVERY: Duration = Duration::from_secs(2);

/// The delivery side of a running node.
pub(crate) struct DeliveryRt {
    core: Arc<Core>,
    mesh: Arc<MeshRt>,
    settings: DeliverySettings,
    inbox: mpsc::Sender<Cmd>,
    frames_dropped: AtomicU64,
    incoming: Incoming,
}

impl std::fmt::Debug for DeliveryRt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryRt")
            .field("node", &self.core.key.node_id())
            .finish_non_exhaustive()
    }
}

/// Messages on their way to a `receive_reliable` call. They stay in the
/// inbox (lent) until the call takes them ([`Handover::accept`]); if it is
/// dropped first (a `select!` that took another branch, a cancelled task),
/// the messages go back to the inbox to be handed over again.
struct Handover {
    messages: Vec<ReliableMessage>,
    keys: Vec<String>,
    settle: Option<mpsc::UnboundedSender<Settle>>,
}

/// What became of a [`Handover`].
enum Settle {
    /// The application has them: they leave the inbox.
    Handed(Vec<String>),
    /// Nobody took them: back into the inbox.
    Returned(Vec<String>),
}

impl Handover {
    fn accept(mut self) -> Vec<ReliableMessage> {
        if let Some(settle) = self.settle.take() {
            let _ = settle.send(Settle::Handed(std::mem::take(&mut self.keys)));
        }
        std::mem::take(&mut self.messages)
    }
}

impl Drop for Handover {
    fn drop(&mut self) {
        if let Some(settle) = self.settle.take() {
            let _ = settle.send(Settle::Returned(std::mem::take(&mut self.keys)));
        }
    }
}

struct Actor {
    rt: Weak<DeliveryRt>,
    core: Arc<Core>,
    outbox: Outbox,
    relay: RelayStore,
    /// When each held letter was last offered to its recipient.
    offered: HashMap<LetterId, Timestamp>,
    next_seq: HashMap<NodeId, u64>,
    seen: HashMap<NodeId, SeenWindow>,
    /// Messages not yet handed to the application, by key.
    pending: BTreeMap<String, InboxRecord>,
    /// Messages sent to a `receive_reliable` call that has not taken them
    /// yet (still stored).
    lent: BTreeMap<String, InboxRecord>,
    /// The application's calls waiting for messages.
    takers: std::collections::VecDeque<(usize, oneshot::Sender<Handover>)>,
    /// Where handovers report back.
    settle: mpsc::UnboundedSender<Settle>,
    waiters: HashMap<LetterId, Vec<oneshot::Sender<()>>>,
    links: BTreeMap<NodeId, OutLink>,
    committer: Committer<After>,
    in_flight: usize,
    /// Letters taken whose batch is not yet durable (not acknowledged
    /// again until it is).
    uncommitted: std::collections::HashSet<LetterId>,
    /// (recipient, number) of each letter in the outbox: the lowest per
    /// recipient is the floor sealed into new letters.
    outstanding: BTreeMap<(NodeId, u64), LetterId>,
    /// Where each member's last frame came from.
    seen_at: HashMap<NodeId, PeerAddr>,
    /// Bytes of the messages waiting in the inbox.
    pending_bytes: usize,
}

/// Builds the delivery runtime from what is stored.
pub(super) fn build(
    core: &Arc<Core>,
    mesh: &Arc<MeshRt>,
    settings: DeliverySettings,
) -> Result<Arc<DeliveryRt>, NodeError> {
    let store = core.store.clone();
    let now = core.now();
    let mut outbox = Outbox::new(settings.retry.clone(), rand::random());
    let mut outstanding = BTreeMap::new();
    for r in store.load_all::<OutboxRecord>()? {
        outstanding.insert((r.letter.to, r.seq), r.letter.id);
        outbox.add(r.letter, r.receipt, now);
    }
    let mut relay = RelayStore::new(settings.relay.clone());
    for r in store.load_all::<RelayRecord>()? {
        let _ = relay.accept(r.letter, now);
    }
    let mut next_seq = HashMap::new();
    let mut seen = HashMap::new();
    for r in store.load_all::<SeqRecord>()? {
        match r {
            SeqRecord::Next { to, next } => {
                next_seq.insert(to, next);
            }
            SeqRecord::Seen { from, window } => {
                seen.insert(from, window);
            }
        }
    }
    let pending: BTreeMap<String, InboxRecord> = store
        .load_all::<InboxRecord>()?
        .into_iter()
        .map(|r| (r.key(), r))
        .collect();
    let pending_bytes = pending.values().map(|r| r.payload.len()).sum();
    let (committer, done) = Committer::start("delivery-commit")?;
    let (inbox, rx) = mpsc::channel(INBOX);
    let (settle, settled) = mpsc::unbounded_channel();
    let rt = Arc::new(DeliveryRt {
        core: core.clone(),
        mesh: mesh.clone(),
        settings,
        inbox,
        frames_dropped: AtomicU64::new(0),
        incoming: Incoming::default(),
    });
    let actor = Actor {
        rt: Arc::downgrade(&rt),
        core: core.clone(),
        outbox,
        relay,
        offered: HashMap::new(),
        next_seq,
        seen,
        pending,
        lent: BTreeMap::new(),
        takers: std::collections::VecDeque::new(),
        settle,
        waiters: HashMap::new(),
        links: BTreeMap::new(),
        committer,
        in_flight: 0,
        uncommitted: std::collections::HashSet::new(),
        outstanding,
        seen_at: HashMap::new(),
        pending_bytes,
    };
    core.spawn(actor.run(rx, done, settled));
    Ok(rt)
}

impl Actor {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Cmd>,
        mut done: mpsc::UnboundedReceiver<Outcome<After>>,
        mut settled: mpsc::UnboundedReceiver<Settle>,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                d = done.recv() => match d {
                    Some(d) => self.committed(d),
                    None => return,
                },
                cmd = rx.recv(), if self.in_flight < MAX_IN_FLIGHT => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => return,
                },
                Some(s) = settled.recv() => self.settled(s),
                _ = tick.tick() => self.tick(),
            }
        }
    }

    /// A handover was taken (its messages leave the inbox) or dropped
    /// (they go back, to be handed over again).
    fn settled(&mut self, settle: Settle) {
        match settle {
            Settle::Handed(keys) => {
                let mut gone = Vec::with_capacity(keys.len());
                for k in keys {
                    if let Some(m) = self.lent.remove(&k) {
                        self.pending_bytes = self.pending_bytes.saturating_sub(m.payload.len());
                        gone.push(InboxRecord::delete(&k));
                    }
                }
                if !gone.is_empty() {
                    self.commit(gone, After::Nothing);
                }
            }
            Settle::Returned(keys) => {
                for k in keys {
                    if let Some(m) = self.lent.remove(&k) {
                        self.pending.insert(k, m);
                    }
                }
                self.hand_over();
            }
        }
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Post {
                to,
                payload,
                posted,
                acked,
            } => self.post(to, payload, posted, acked),
            Cmd::Frame { from, addr, bytes } => self.frame(from, addr, &bytes),
            Cmd::Take { max, reply } => {
                self.takers.push_back((max.max(1), reply));
                self.hand_over();
            }
            Cmd::Status { reply } => {
                let _ = reply.send(DeliveryStatus {
                    outbox: self.outbox.len(),
                    inbox: self.pending.len() + self.lent.len(),
                    relayed: self.relay.len(),
                });
            }
        }
    }

    fn settings(&self) -> Option<(Arc<DeliveryRt>, DeliverySettings)> {
        let rt = self.rt.upgrade()?;
        let s = rt.settings.clone();
        Some((rt, s))
    }

    /// Stores `writes`; `then` once durable.
    fn commit(&mut self, writes: Vec<Write>, then: After) {
        let pending = self.core.store.submit(writes);
        self.in_flight += 1;
        if !self.committer.wait(pending, then) {
            self.in_flight -= 1;
        }
    }

    /// Seals a letter from this node to `to` with the next number; the
    /// writes that store it with the number.
    fn seal(
        &mut self,
        to: NodeId,
        contents: Contents,
        receipt: bool,
    ) -> Result<(Letter, Vec<Write>), NodeError> {
        let ttl = self
            .settings()
            .map_or(Duration::from_secs(86_400), |(_, s)| s.ttl);
        let seq = self.next_seq.get(&to).copied().unwrap_or(1);
        let expires = self.core.now().saturating_add(ttl).as_millis();
        let floor = self
            .outstanding
            .range((to, 0)..=(to, u64::MAX))
            .next()
            .map_or(seq, |((_, s), _)| *s);
        let letter = Letter::seal(&self.core.key, &to, seq, floor, contents, expires)
            .map_err(|e| fail(&e.to_string()))?;
        self.next_seq.insert(to, seq + 1);
        self.outstanding.insert((to, seq), letter.id);
        let writes = vec![
            OutboxRecord {
                letter: letter.clone(),
                seq,
                receipt,
            }
            .put()?,
            SeqRecord::Next { to, next: seq + 1 }.put()?,
        ];
        Ok((letter, writes))
    }

    fn post(
        &mut self,
        to: NodeId,
        payload: Vec<u8>,
        posted: oneshot::Sender<Result<LetterId, NodeError>>,
        acked: Option<oneshot::Sender<()>>,
    ) {
        let Some((rt, settings)) = self.settings() else {
            return;
        };
        if self.outbox.len() >= settings.outbox_limit {
            let _ = posted.send(Err(fail("the outbox is full; try again later")));
            return;
        }
        if to == self.core.key.node_id() || !rt.mesh.members().contains(&to) {
            let _ = posted.send(Err(NodeError::NotConnected(to)));
            return;
        }
        match self.seal(to, Contents::Message(payload), false) {
            Ok((letter, writes)) => self.commit(
                writes,
                After::Posted {
                    letter,
                    posted,
                    acked,
                },
            ),
            Err(e) => {
                let _ = posted.send(Err(e));
            }
        }
    }

    fn committed(&mut self, (after, outcome): Outcome<After>) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Err(e) = outcome {
            match after {
                After::Posted { posted, letter, .. } => {
                    let mut ignored = Vec::new();
                    self.left_outbox(&letter, &mut ignored);
                    let _ = posted.send(Err(NodeError::Storage(e)));
                }
                After::Received {
                    id,
                    rollback: (from, window),
                    receipt,
                    ..
                } => {
                    self.uncommitted.remove(&id);
                    self.seen.insert(from, window);
                    if let Some(r) = receipt {
                        // Its number stays unused: the floor of later
                        // letters moves the recipient past it.
                        let mut ignored = Vec::new();
                        self.left_outbox(&r, &mut ignored);
                    }
                }
                After::Relayed { to, id, .. } => {
                    self.uncommitted.remove(&id);
                    self.relay.remove(&to, &id);
                }
                _ => {}
            }
            return;
        }
        let now = self.core.now();
        match after {
            After::Posted {
                letter,
                posted,
                acked,
            } => {
                let id = letter.id;
                if let Some(acked) = acked {
                    self.waiters.entry(id).or_default().push(acked);
                }
                self.outbox.add(letter, false, now);
                let _ = posted.send(Ok(id));
                self.send_due();
            }
            After::Received {
                forwarder,
                id,
                message,
                receipt,
                ..
            } => {
                self.uncommitted.remove(&id);
                self.send_frame(forwarder, None, DeliveryFrame::Ack(vec![id]));
                if let Some(r) = receipt {
                    self.outbox.add(r, true, now);
                    self.send_due();
                }
                if let Some(m) = message {
                    self.pending_bytes += m.payload.len();
                    self.pending.insert(m.key(), m);
                    self.hand_over();
                }
            }
            After::Relayed { forwarder, id, .. } => {
                self.uncommitted.remove(&id);
                self.send_frame(forwarder, None, DeliveryFrame::Stored(vec![id]));
                // Its recipient may be reachable now.
                self.offer_held(now);
            }
            After::Nothing => {}
        }
    }

    /// Hands waiting messages to the application's waiting calls: each
    /// message leaves the inbox once a call has it (a call that gave up
    /// leaves them waiting).
    fn hand_over(&mut self) {
        while !self.pending.is_empty() {
            let Some((max, reply)) = self.takers.pop_front() else {
                break;
            };
            if reply.is_closed() {
                continue;
            }
            let keys: Vec<String> = self.pending.keys().take(max).cloned().collect();
            let messages: Vec<ReliableMessage> = keys
                .iter()
                .filter_map(|k| self.pending.get(k))
                .map(|m| ReliableMessage {
                    id: m.id,
                    from: m.from,
                    seq: m.seq,
                    payload: m.payload.clone(),
                    received_at: m.received_at,
                })
                .collect();
            let handover = Handover {
                messages,
                keys: keys.clone(),
                settle: Some(self.settle.clone()),
            };
            match reply.send(handover) {
                // Lent until the call takes them (or is dropped).
                Ok(()) => {
                    for k in keys {
                        if let Some(m) = self.pending.remove(&k) {
                            self.lent.insert(k, m);
                        }
                    }
                }
                // The call is gone: they stay pending.
                Err(mut back) => back.settle = None,
            }
        }
        self.takers.retain(|(_, r)| !r.is_closed());
    }

    fn tick(&mut self) {
        let now = self.core.now();
        self.send_due();
        self.offer_held(now);
        self.hand_over();
        let expired = self.relay.expire(now);
        if !expired.is_empty() {
            let writes = expired
                .iter()
                .map(|(to, id)| {
                    self.offered.remove(id);
                    RelayRecord::delete(&relay_key(to, id))
                })
                .collect();
            self.commit(writes, After::Nothing);
        }
    }

    /// Sends what the outbox says is due.
    fn send_due(&mut self) {
        let Some((rt, _)) = self.settings() else {
            return;
        };
        let now = self.core.now();
        if self.outbox.next_due().is_none_or(|t| t > now) {
            return;
        }
        let reachable = rt.mesh.reachable();
        let relays: Vec<NodeId> = reachable.keys().copied().collect();
        let (sends, expired) =
            self.outbox
                .due(now, &|n: &NodeId| reachable.contains_key(n), &relays);
        for s in sends {
            let addrs = reachable.get(&s.to).cloned().unwrap_or_default();
            self.send_frame(s.to, Some(addrs), DeliveryFrame::Deliver(s.letter));
        }
        if !expired.is_empty() {
            let mut writes = Vec::new();
            for e in expired {
                self.waiters.remove(&e.letter.id);
                self.left_outbox(&e.letter, &mut writes);
                self.core.events.publish(
                    delivery_events::EXPIRED,
                    now,
                    json!({ "id": e.letter.id.to_hex(), "to": e.letter.to.to_string() }),
                );
            }
            self.commit(writes, After::Nothing);
        }
    }

    /// As a relay: offers held letters to recipients that are reachable.
    fn offer_held(&mut self, now: Timestamp) {
        if self.relay.is_empty() {
            return;
        }
        let Some((rt, _)) = self.settings() else {
            return;
        };
        let reachable = rt.mesh.reachable();
        for to in self.relay.recipients() {
            let Some(addrs) = reachable.get(&to) else {
                continue;
            };
            for letter in self.relay.for_recipient(&to) {
                let recent = self
                    .offered
                    .get(&letter.id)
                    .is_some_and(|t| now.saturating_duration_since(*t) < OFFER_EVERY);
                if recent {
                    continue;
                }
                self.offered.insert(letter.id, now);
                self.send_frame(to, Some(addrs.clone()), DeliveryFrame::Deliver(letter));
            }
        }
    }

    fn send_frame(&mut self, to: NodeId, addrs: Option<Vec<PeerAddr>>, frame: DeliveryFrame) {
        let Some((rt, settings)) = self.settings() else {
            return;
        };
        let addrs = match addrs {
            Some(a) => a,
            None => rt
                .mesh
                .reachable()
                .remove(&to)
                .filter(|a| !a.is_empty())
                .or_else(|| self.seen_at.get(&to).map(|a| vec![a.clone()]))
                .unwrap_or_default(),
        };
        let link = self.links.entry(to).or_insert_with(|| {
            OutLink::start(
                &self.core,
                to,
                DELIVER,
                addrs.clone(),
                rt.mesh.link_timing(),
                None,
                settings.peer_queue,
            )
        });
        link.set_addrs(addrs);
        if !link.send(frame.encode()) {
            rt.frames_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn refused(&self, from: NodeId, reason: &str) {
        self.core.events.publish(
            delivery_events::REFUSED,
            self.core.now(),
            json!({ "node": from.to_string(), "reason": reason }),
        );
    }

    fn frame(&mut self, from: NodeId, addr: Option<PeerAddr>, bytes: &[u8]) {
        let frame = match DeliveryFrame::decode(bytes) {
            Ok(f) => f,
            Err(e) => return self.refused(from, &e.to_string()),
        };
        // Answers go where the frame came from if the table has nothing
        // (a member that just restarted elsewhere, not yet known there).
        if let Some(a) = addr {
            if self.seen_at.len() >= MAX_SEEN_AT && !self.seen_at.contains_key(&from) {
                self.seen_at.clear();
            }
            self.seen_at.insert(from, a);
        }
        let now = self.core.now();
        match frame {
            DeliveryFrame::Ack(ids) => {
                let mut writes = Vec::new();
                for id in ids {
                    // As a sender: the recipient has it.
                    self.acked(from, id, &mut writes);
                    // As a relay: its recipient has it.
                    if self.relay.remove(&from, &id) {
                        self.offered.remove(&id);
                        writes.push(RelayRecord::delete(&relay_key(&from, &id)));
                    }
                }
                if !writes.is_empty() {
                    self.commit(writes, After::Nothing);
                }
            }
            DeliveryFrame::Stored(ids) => {
                let mut writes = Vec::new();
                for id in ids {
                    if let Some(e) = self.outbox.stored(&id, from, now) {
                        self.left_outbox(&e.letter, &mut writes);
                    }
                }
                if !writes.is_empty() {
                    self.commit(writes, After::Nothing);
                }
            }
            DeliveryFrame::Deliver(letter) => self.deliver(from, letter, now),
        }
    }

    /// The recipient `from` acknowledged letter `id` of this node's
    /// (directly, or by a receipt): it leaves the outbox, and whoever
    /// waits for it hears.
    fn acked(&mut self, from: NodeId, id: LetterId, writes: &mut Vec<Write>) {
        if self.outbox.recipient(&id) != Some(from) {
            return;
        }
        if let Some(e) = self.outbox.acked(&id) {
            self.left_outbox(&e.letter, writes);
        }
        for w in self.waiters.remove(&id).unwrap_or_default() {
            let _ = w.send(());
        }
    }

    /// `letter` left the outbox (acknowledged, held by a relay as a
    /// receipt, or expired).
    fn left_outbox(&mut self, letter: &Letter, writes: &mut Vec<Write>) {
        let key = self
            .outstanding
            .range((letter.to, 0)..=(letter.to, u64::MAX))
            .find(|(_, id)| **id == letter.id)
            .map(|(k, _)| *k);
        if let Some(k) = key {
            self.outstanding.remove(&k);
        }
        writes.push(OutboxRecord::delete(&letter.id.to_hex()));
    }

    fn deliver(&mut self, forwarder: NodeId, letter: Letter, now: Timestamp) {
        let Some((rt, settings)) = self.settings() else {
            return;
        };
        let me = self.core.key.node_id();
        if letter.from != me && !rt.mesh.is_member(&letter.from) {
            return self.refused(forwarder, "a letter from a node not in the mesh");
        }
        if letter.to != me {
            // As a relay: only a sender hands its own letters over, and
            // only for members.
            if letter.from != forwarder {
                return self.refused(forwarder, "a relay takes only its sender's own letters");
            }
            if !rt.mesh.is_member(&letter.to) {
                return self.refused(forwarder, "a letter for a node not in the mesh");
            }
            let (id, to) = (letter.id, letter.to);
            match self.relay.accept(letter.clone(), now) {
                Ok(true) => match (RelayRecord { letter }).put() {
                    Ok(w) => {
                        self.uncommitted.insert(id);
                        self.commit(vec![w], After::Relayed { forwarder, to, id });
                    }
                    Err(e) => {
                        self.relay.remove(&to, &id);
                        self.refused(forwarder, &e.to_string());
                    }
                },
                // Held already: said once it is durable.
                Ok(false) if self.uncommitted.contains(&id) => {}
                Ok(false) => self.send_frame(forwarder, None, DeliveryFrame::Stored(vec![id])),
                Err(e) => self.refused(forwarder, &e.to_string()),
            }
            return;
        }
        let opened = match letter.open(&self.core.key) {
            Ok(o) => o,
            Err(e) => return self.refused(forwarder, &e.to_string()),
        };
        let id = letter.id;
        let from = letter.from;
        let previous = self.seen.get(&from).cloned().unwrap_or_default();
        let mut window = previous.clone();
        // Numbers below the sender's floor were acknowledged or given up.
        window.advance(opened.floor);
        match window.check(opened.seq) {
            Seen::Later => {}
            Seen::Duplicate => {
                // Taken before: acknowledged again once it is durable (it
                // may still be on its way to the disk).
                if !self.uncommitted.contains(&id) {
                    self.send_frame(forwarder, None, DeliveryFrame::Ack(vec![id]));
                    if forwarder != from {
                        self.send_frame(from, None, DeliveryFrame::Ack(vec![id]));
                    }
                }
            }
            Seen::New => {
                let from_sender = self
                    .pending
                    .range(format!("{from}:")..format!("{from};"))
                    .count();
                let size = match &opened.contents {
                    Contents::Message(p) => p.len(),
                    Contents::Receipt(_) => 0,
                };
                if matches!(opened.contents, Contents::Message(_))
                    && (self.pending.len() + self.lent.len() >= settings.inbox_limit
                        || self.pending_bytes + size > settings.inbox_bytes
                        || from_sender >= (settings.inbox_limit / 8).max(16))
                {
                    // Not taken: the sender tries again later.
                    return;
                }
                window.take(opened.seq);
                self.seen.insert(from, window.clone());
                let mut writes = Vec::new();
                match (SeqRecord::Seen { from, window }).put() {
                    Ok(w) => writes.push(w),
                    Err(e) => return self.refused(forwarder, &e.to_string()),
                }
                let mut message = None;
                let mut receipt = None;
                match opened.contents {
                    Contents::Message(payload) => {
                        let record = InboxRecord {
                            id,
                            from,
                            seq: opened.seq,
                            payload,
                            received_at: now,
                        };
                        match record.put() {
                            Ok(w) => writes.push(w),
                            Err(e) => return self.refused(forwarder, &e.to_string()),
                        }
                        message = Some(record);
                        if forwarder != from {
                            // Through a relay: a receipt goes back.
                            match self.seal(from, Contents::Receipt(id), true) {
                                Ok((r, w)) => {
                                    writes.extend(w);
                                    receipt = Some(r);
                                }
                                Err(e) => return self.refused(forwarder, &e.to_string()),
                            }
                        }
                    }
                    Contents::Receipt(of) => self.acked(from, of, &mut writes),
                }
                self.uncommitted.insert(id);
                self.commit(
                    writes,
                    After::Received {
                        forwarder,
                        id,
                        message,
                        receipt,
                        rollback: (from, previous),
                    },
                );
            }
        }
    }
}

fn fail(message: &str) -> NodeError {
    NodeError::Unavailable(message.to_owned())
}

impl DeliveryRt {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, NodeError> {
        super::commit::ask(&self.inbox, make, || fail("the node has stopped")).await
    }
}

#[async_trait]
impl MembersOnly for DeliveryRt {
    fn admits(&self, peer: &NodeId) -> bool {
        self.mesh.is_member(peer)
    }

    async fn serve_member(self: Arc<Self>, conn: Arc<dyn Connection>) {
        let rt = self.clone();
        self.incoming
            .serve(
                &self.core,
                conn,
                2,
                self.settings.frame_rate,
                |n| self.mesh.is_member(n),
                &self.frames_dropped,
                |from, addr, bytes| {
                    let inbox = rt.inbox.clone();
                    async move { inbox.send(Cmd::Frame { from, addr, bytes }).await.is_ok() }
                },
            )
            .await;
    }
}

/// The delivery protocol, as a handler (members only).
pub(super) fn protocol(
    rt: &Arc<DeliveryRt>,
) -> (crate::transport::Protocol, Arc<dyn ProtocolHandler>) {
    MemberService::handler(rt, DELIVER, "DeliveryService")
}

impl super::Node {
    fn delivery_rt(&self) -> Result<&Arc<DeliveryRt>, NodeError> {
        self.delivery.as_ref().ok_or_else(|| {
            NodeError::Unavailable(
                "this node was built without the mesh (NodeBuilder::mesh), so it delivers nothing"
                    .into(),
            )
        })
    }

    async fn post_letter(
        &self,
        to: NodeId,
        payload: Vec<u8>,
        acked: Option<oneshot::Sender<()>>,
    ) -> Result<LetterId, NodeError> {
        if payload.len() > MAX_PAYLOAD_LEN {
            return Err(NodeError::Protocol(format!(
                "a reliable message of {} bytes is over the limit of {MAX_PAYLOAD_LEN}",
                payload.len()
            )));
        }
        self.delivery_rt()?
            .ask(|posted| Cmd::Post {
                to,
                payload,
                posted,
                acked,
            })
            .await?
    }

    /// Sends `payload` (at most 256 KiB) to member `to` and returns once
    /// `to`'s node has acknowledged it (directly, or by a receipt through
    /// a relay). The message is in this node's outbox, durably, before it
    /// leaves: dropping this future, or this node crashing, does not stop
    /// its delivery. Wrap it in a timeout to bound the wait.
    pub async fn send_reliable(&self, to: NodeId, payload: Vec<u8>) -> Result<LetterId, NodeError> {
        let (tx, rx) = oneshot::channel();
        let id = self.post_letter(to, payload, Some(tx)).await?;
        rx.await.map_err(|_| {
            NodeError::Unavailable(format!(
                "letter {id} expired or the node stopped before it was acknowledged"
            ))
        })?;
        Ok(id)
    }

    /// Puts `payload` in the outbox for `to` and returns once it is durable
    /// there (delivery goes on in the background).
    pub async fn post_reliable(&self, to: NodeId, payload: Vec<u8>) -> Result<LetterId, NodeError> {
        self.post_letter(to, payload, None).await
    }

    /// Takes up to `max` reliable messages from this node's inbox, waiting
    /// up to `wait` for one if none is there: each message is handed over
    /// once, in order per sender, and leaves the inbox once this call has
    /// returned it (a call that timed out takes nothing; a call dropped
    /// before it returned, say the losing branch of a `select!`, takes
    /// nothing either: its messages go to the next call). Messages leave
    /// the stored inbox just after they are returned: if the node crashes
    /// in that instant, they are handed over again after the restart, so
    /// an application that must never see one twice keeps the last `seq`
    /// it processed per sender.
    pub async fn receive_reliable(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ReliableMessage>, NodeError> {
        let rt = self.delivery_rt()?;
        let (reply, rx) = oneshot::channel();
        rt.inbox
            .send(Cmd::Take { max, reply })
            .await
            .map_err(|_| fail("the node has stopped"))?;
        match tokio::time::timeout(wait, rx).await {
            // No await between taking them and returning them.
            Ok(Ok(handover)) => Ok(handover.accept()),
            Ok(Err(_)) => Err(fail("the node has stopped")),
            Err(_) => Ok(Vec::new()),
        }
    }

    /// Letters in flight at this node.
    pub async fn delivery_status(&self) -> Result<DeliveryStatus, NodeError> {
        self.delivery_rt()?.ask(|reply| Cmd::Status { reply }).await
    }
}
