//! The mesh as a sans-IO state machine: membership (foca's SWIM), the
//! member table, gossip broadcast with eager and lazy push, per-peer
//! scores and rate limits, and the blocklist.
//!
//! Time is passed in; nothing here touches a socket, a clock or a disk.
//! Every input ([`Mesh::handle_frame`], [`Mesh::handle_timer`],
//! [`Mesh::broadcast`], ...) queues [`MeshOutput`]s, which the driver takes
//! with [`Mesh::poll_output`]: frames to send, timers to arm, events,
//! deliveries to the application, records to store. The node runtime
//! (`node::mesh`) drives it over real transports; the simulation in the
//! tests drives a thousand of them in one thread on a virtual clock.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::num::{NonZeroU8, NonZeroU32, NonZeroUsize};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, IteratorRandom};
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use super::gossip::{
    GossipError, GossipMessage, MessageKey, MessageStore, RESERVED_PREFIX, SeenCache,
    valid_app_topic,
};
use super::member::{MemberCert, MemberError, MemberId};
use super::score::PeerScore;
use super::wire::{
    CodecError, IdentityCache, MAX_KEYS_PER_FRAME, MeshCodec, MeshFrame, swim_source,
};
use crate::clock::Timestamp;
use crate::identity::{NodeId, NodeKey};
use crate::limits::{KeyedLimiter, Rate};
use crate::storage::records::{BlockRecord, MeshSelfRecord, PeerRecord, PeerStatus};
use crate::transport::PeerAddr;

type Swim = foca::Foca<MemberId, MeshCodec, StdRng, foca::NoCustomBroadcast>;

const BLOCK_TOPIC: &str = "$mesh/block";
const LEAVE_TOPIC: &str = "$mesh/leave";
/// The longest block reason, in bytes.
pub const MAX_REASON_LEN: usize = 256;
/// How often last-seen times are stored and old members collected.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(5);
/// How long a member that went inactive is asked back, one each tick.
const RECALL_LOST_FOR: Duration = Duration::from_secs(60);

/// How a mesh behaves. The defaults suit a LAN of up to a few hundred
/// members.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MeshConfig {
    /// Members a new broadcast is pushed to by each member (eager push).
    pub fanout: usize,
    /// Relays a broadcast may take.
    pub max_hops: u8,
    /// Broadcasts accepted per origin: 50 per 10 s by default.
    pub origin_rate: Rate,
    /// Frames of any kind accepted per directly connected peer.
    pub frame_rate: Rate,
    /// How often a member tells one random member which messages it holds
    /// (lazy push), checks statuses, decays scores and collects garbage.
    pub tick: Duration,
    /// Message keys remembered for deduplication.
    pub seen_capacity: usize,
    /// How long a key is remembered; older messages are refused.
    pub seen_horizon: Duration,
    /// How far in the future a message's time may be.
    pub max_clock_skew: Duration,
    /// Messages kept to answer lazy-push requests, and their bytes.
    pub store_messages: usize,
    /// Bytes of bodies kept to answer lazy-push requests.
    pub store_bytes: usize,
    /// How long an inactive member stays in the table.
    pub gc_after: Duration,
    /// The most members the table holds.
    pub max_members: usize,
    /// Members told at once when joining or restarting.
    pub announce_to: usize,
    /// How often a member exchanges members with a random one (peer
    /// exchange: SWIM's announce, answered with a feed of members), so
    /// that every member comes to know every other and partitions heal.
    pub exchange_every: Duration,
    /// SWIM's settings.
    pub swim: foca::Config,
    /// Where checked identities are remembered (a simulation shares one
    /// among its nodes).
    pub identities: IdentityCache,
}

impl MeshConfig {
    /// Settings for a mesh of about `expected_members`.
    pub fn for_size(expected_members: u32) -> Self {
        let size = NonZeroU32::new(expected_members.max(2)).unwrap_or(NonZeroU32::MIN);
        let mut swim = foca::Config::new_lan(size);
        // A crashed member is first noticed when someone probes it: with
        // each member probing one other per period, the last of 100
        // crashed members of 1,000 is probed after about 8 periods (95 %),
        // so foca's 1 s period would put agreement after a 10 % crash at
        // about 10 s. 600 ms (acks within 300 ms, plenty on a LAN) keeps it
        // near 6 s, for about one more frame per member per second.
        swim.probe_period = Duration::from_millis(600);
        swim.probe_rtt = Duration::from_millis(300);
        // memberlist's LAN suspicion is 4 × log10(N) one-second periods;
        // half of it keeps the time to `inactive` short. Refutation still
        // has time: a suspicion reaches the suspect within a few 200 ms
        // gossip rounds (no false deaths at 1 % loss over a virtual hour:
        // `mesh::sim_tests`, and the `mesh_sim` bench at 1,000 members).
        swim.suspect_to_down_after =
            Duration::from_secs_f64(f64::from(size.get()).log10().max(1.0) * 2.0);
        // Each update is passed on 6 × log10(N + 1) times (memberlist: 4):
        // after 100 of 1,000 members crash at once, 4 left a few members
        // unaware of a crash for seconds after all the others knew.
        let max_tx = (f64::from(size.get()).log10() * 6.0).clamp(1.0, 255.0) as u8;
        swim.max_transmissions = NonZeroU8::new(max_tx).unwrap_or(NonZeroU8::MIN);
        // Frames may hold 96 KiB; 16 KiB packets carry about a hundred
        // member updates, so that a healed partition (every member on
        // each side renewing its identity) is known everywhere in seconds.
        swim.max_packet_size = NonZeroUsize::new(16 * 1024).unwrap_or(NonZeroUsize::MIN);
        // foca gossips only while it has updates to spread, so a short
        // period costs nothing when the mesh is quiet.
        swim.periodic_gossip = Some(foca::PeriodicParams {
            frequency: Duration::from_millis(200),
            num_members: NonZeroUsize::new(3).unwrap_or(NonZeroUsize::MIN),
        });
        swim.periodic_announce = Some(foca::PeriodicParams {
            frequency: Duration::from_secs(10),
            num_members: NonZeroUsize::MIN,
        });
        swim.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: Duration::from_secs(5),
            num_members: NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN),
        });
        // A member that lost every other one must still hear them back
        // (foca issue 15): keep down members long enough to re-announce.
        swim.remove_down_after = Some(Duration::from_secs(24 * 3600));
        MeshConfig {
            fanout: 8,
            max_hops: 16,
            origin_rate: Rate::per_second(5.0, 50),
            frame_rate: Rate::per_second(200.0, 1000),
            tick: Duration::from_millis(500),
            seen_capacity: 65_536,
            seen_horizon: Duration::from_secs(120),
            max_clock_skew: Duration::from_secs(30),
            store_messages: 1024,
            store_bytes: 8 << 20,
            gc_after: Duration::from_secs(24 * 3600),
            max_members: 4096,
            announce_to: 8,
            exchange_every: Duration::from_secs(2),
            swim,
            identities: IdentityCache::default(),
        }
    }

    /// A different per-origin broadcast rate.
    pub fn origin_rate(mut self, rate: Rate) -> Self {
        self.origin_rate = rate;
        self
    }

    /// A different inactive-member horizon.
    pub fn gc_after(mut self, after: Duration) -> Self {
        self.gc_after = after;
        self
    }
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig::for_size(64)
    }
}

/// A timer the driver arms and hands back with [`Mesh::handle_timer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeshTimer {
    /// One of foca's.
    Swim(foca::Timer<MemberId>),
    /// The mesh's own periodic work.
    Tick,
}

/// Why a member left, in `peer.left`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaveReason {
    /// It said goodbye.
    Left,
    /// It was declared down.
    Failed,
    /// It was blocked.
    Blocked,
}

/// What the mesh reports.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum MeshEvent {
    /// A member joined, or came back after being inactive.
    Joined {
        /// The member.
        node: NodeId,
        /// Its name.
        name: String,
        /// Whether it was known before.
        rejoined: bool,
    },
    /// A member left, failed or was blocked.
    Left {
        /// The member.
        node: NodeId,
        /// Its name.
        name: String,
        /// Why.
        reason: LeaveReason,
    },
    /// A member is suspected of having failed.
    Suspect {
        /// The member.
        node: NodeId,
        /// Its name.
        name: String,
    },
    /// A suspected member answered again (refuted the suspicion, or came
    /// back before it was declared down).
    Alive {
        /// The member.
        node: NodeId,
        /// Its name.
        name: String,
    },
    /// A member changed its name.
    Renamed {
        /// The member.
        node: NodeId,
        /// Its name before.
        old: String,
        /// Its name now.
        new: String,
    },
    /// A node was blocked.
    Blocklisted {
        /// The node blocked.
        node: NodeId,
        /// The member that blocked it.
        by: NodeId,
        /// Why.
        reason: String,
    },
    /// A node was unblocked.
    Unblocked {
        /// The node.
        node: NodeId,
        /// The member that unblocked it.
        by: NodeId,
    },
    /// A peer's score fell below the line: its connections are closed.
    Disconnected {
        /// The peer.
        node: NodeId,
        /// Its score.
        score: f64,
    },
}

/// A broadcast for the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Origin and id.
    pub key: MessageKey,
    /// Its topic.
    pub topic: String,
    /// When the origin sent it.
    pub sent_at: Timestamp,
    /// Relays it took to reach this member.
    pub hops: u8,
    /// The body.
    pub body: Vec<u8>,
}

/// A change to store.
#[derive(Debug, Clone, PartialEq)]
pub enum MeshStore {
    /// A member's record, new or changed.
    Member(PeerRecord),
    /// A member removed from the table.
    Forget(NodeId),
    /// A node blocked.
    Block(BlockRecord),
    /// A node unblocked, by a member.
    Unblock {
        /// The node.
        node: NodeId,
        /// The member that lifted the block.
        by: NodeId,
    },
    /// This node's own standing.
    Myself(MeshSelfRecord),
}

/// What the driver does next.
#[derive(Debug, Clone, PartialEq)]
pub enum MeshOutput {
    /// Send `frame` to `to` (dial one of `addrs` if not connected).
    Send {
        /// The member.
        to: NodeId,
        /// Where it says it is.
        addrs: Vec<PeerAddr>,
        /// One [`MeshFrame`], encoded.
        frame: Vec<u8>,
    },
    /// Call [`Mesh::handle_timer`] with `timer` at `at`.
    Timer {
        /// When.
        at: Timestamp,
        /// Which.
        timer: MeshTimer,
    },
    /// Report this.
    Event(MeshEvent),
    /// Hand this to the application's subscribers.
    Deliver(Delivery),
    /// Close every connection to this peer.
    Disconnect(NodeId),
    /// Store this.
    Store(MeshStore),
}

/// Why a frame was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameRefusal {
    /// The peer is blocked.
    #[error("the peer is blocked")]
    Blocked,
    /// The peer's frames are over its rate.
    #[error("the peer is over its rate")]
    RateLimited,
    /// The frame does not parse.
    #[error(transparent)]
    Malformed(#[from] super::wire::FrameError),
    /// A SWIM packet from someone else than the connection's peer.
    #[error("a SWIM packet claims another source than the connection's peer")]
    Spoofed,
    /// A SWIM packet foca refused.
    #[error("SWIM refused the packet: {0}")]
    Swim(String),
    /// A forged identity or signature.
    #[error("a forged identity or signature")]
    Forged,
    /// A broadcast too old or from the future.
    #[error("a broadcast outside the deduplication horizon")]
    Stale,
    /// A broadcast over its origin's rate.
    #[error("a broadcast over its origin's rate")]
    OriginRateLimited,
}

/// Why a mesh operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MeshError {
    /// A bad broadcast.
    #[error(transparent)]
    Gossip(#[from] GossipError),
    /// A bad name or identity.
    #[error(transparent)]
    Member(#[from] MemberError),
    /// A node cannot block itself.
    #[error("a node cannot block itself")]
    BlockSelf,
    /// The node is not blocked.
    #[error("{0} is not blocked")]
    NotBlocked(NodeId),
    /// The reason is too long.
    #[error("a reason is at most {MAX_REASON_LEN} bytes")]
    ReasonTooLong,
    /// This node has left the mesh.
    #[error("this node has left the mesh")]
    Left,
    /// The member table is full.
    #[error("the member table is full")]
    Full,
    /// The joiner is blocked.
    #[error("the node is blocked")]
    Blocked,
}

/// What a member hands a node it let in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinGrant {
    /// The joiner's certificate of membership.
    pub cert: MemberCert,
    /// Every member the sponsor knows, itself included.
    pub members: Vec<GrantedMember>,
    /// The blocklist.
    pub blocked: Vec<BlockRecord>,
}

/// One member in a [`JoinGrant`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantedMember {
    /// Its signed identity.
    pub id: MemberId,
    /// Its status at the sponsor.
    pub status: PeerStatus,
    /// When the sponsor learned of it.
    pub joined_at: Timestamp,
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MeshStats {
    /// Frames taken.
    pub frames_in: u64,
    /// Frames queued to send.
    pub frames_out: u64,
    /// Frames refused (any reason).
    pub frames_refused: u64,
    /// Broadcasts delivered to the application.
    pub delivered: u64,
    /// Duplicate broadcasts dropped.
    pub duplicates: u64,
    /// Broadcasts dropped for their origin's rate.
    pub origin_rate_dropped: u64,
    /// Frames or broadcasts dropped because of the blocklist.
    pub blocked_dropped: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct BlockNotice {
    target: NodeId,
    block: bool,
    reason: String,
}

/// One member's view of the mesh.
pub struct Mesh {
    key: Arc<NodeKey>,
    config: MeshConfig,
    swim: Swim,
    rt: foca::AccumulatingRuntime<MemberId>,
    me: MemberId,
    cert: MemberCert,
    members: BTreeMap<NodeId, PeerRecord>,
    persisted_seen: BTreeMap<NodeId, Timestamp>,
    blocked: BTreeMap<NodeId, BlockRecord>,
    scores: BTreeMap<NodeId, PeerScore>,
    frame_limits: KeyedLimiter<NodeId>,
    origin_limits: KeyedLimiter<NodeId>,
    seen: SeenCache,
    store: MessageStore,
    rng: StdRng,
    out: VecDeque<MeshOutput>,
    left: bool,
    /// Members whose goodbye was taken (until they come back).
    said_left: BTreeSet<NodeId>,
    last_exchange: Timestamp,
    last_housekeeping: Timestamp,
    /// foca's table as the last tick saw it (node, epoch, status,
    /// incarnation), in foca's order.
    swim_seen: Vec<(NodeId, u64, PeerStatus, u16)>,
    /// Members foca holds suspect: since when, at which incarnation.
    suspected: BTreeMap<NodeId, (Timestamp, u16)>,
    stats: MeshStats,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("me", &self.me)
            .field("members", &self.members.len())
            .field("blocked", &self.blocked.len())
            .field("left", &self.left)
            .finish_non_exhaustive()
    }
}

impl Mesh {
    /// A member named `name` at `addrs`, with identity epoch `epoch`, let in
    /// by `cert` (`None`: this node starts a mesh of its own and certifies
    /// itself). `seed` makes every random choice reproducible.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        key: Arc<NodeKey>,
        config: MeshConfig,
        name: &str,
        addrs: Vec<PeerAddr>,
        epoch: u64,
        cert: Option<MemberCert>,
        seed: u64,
        now: Timestamp,
    ) -> Result<Self, MeshError> {
        let me = MemberId::new(&key, epoch, name, addrs)?;
        let cert = cert.unwrap_or_else(|| MemberCert::issue(&key, key.node_id(), now));
        let swim = Swim::new(
            me.clone(),
            config.swim.clone(),
            StdRng::seed_from_u64(seed),
            MeshCodec::new(config.identities.clone()),
        );
        let mut mesh = Mesh {
            frame_limits: KeyedLimiter::evicting(config.frame_rate, config.max_members * 2),
            origin_limits: KeyedLimiter::evicting(config.origin_rate, config.max_members * 2),
            seen: SeenCache::new(config.seen_capacity, config.seen_horizon),
            store: MessageStore::new(
                config.store_messages,
                config.store_bytes,
                config.seen_horizon,
            ),
            rng: StdRng::seed_from_u64(seed ^ 0x6d65_7368_676f_7373),
            key,
            config,
            swim,
            rt: foca::AccumulatingRuntime::new(),
            me,
            cert,
            members: BTreeMap::new(),
            persisted_seen: BTreeMap::new(),
            blocked: BTreeMap::new(),
            scores: BTreeMap::new(),
            out: VecDeque::new(),
            left: false,
            said_left: BTreeSet::new(),
            last_exchange: now,
            last_housekeeping: now,
            swim_seen: Vec::new(),
            suspected: BTreeMap::new(),
            stats: MeshStats::default(),
        };
        mesh.store_self();
        mesh.out.push_back(MeshOutput::Timer {
            at: now + mesh.config.tick,
            timer: MeshTimer::Tick,
        });
        Ok(mesh)
    }

    // ---- reading -------------------------------------------------------

    /// This member's identity.
    pub fn me(&self) -> &MemberId {
        &self.me
    }

    /// This member's certificate.
    pub fn cert(&self) -> &MemberCert {
        &self.cert
    }

    /// Every member in the table (not this one).
    pub fn members(&self) -> impl Iterator<Item = &PeerRecord> {
        self.members.values()
    }

    /// One member.
    pub fn member(&self, node: &NodeId) -> Option<&PeerRecord> {
        self.members.get(node)
    }

    /// Members currently active.
    pub fn active_count(&self) -> usize {
        self.members
            .values()
            .filter(|m| m.status == PeerStatus::Active)
            .count()
    }

    /// The blocklist.
    pub fn blocked(&self) -> impl Iterator<Item = &BlockRecord> {
        self.blocked.values()
    }

    /// Whether `node` is blocked.
    pub fn is_blocked(&self, node: &NodeId) -> bool {
        self.blocked.contains_key(node)
    }

    /// A peer's score, if it has one.
    pub fn score(&self, node: &NodeId) -> Option<&PeerScore> {
        self.scores.get(node)
    }

    /// Counters.
    pub fn stats(&self) -> MeshStats {
        self.stats
    }

    /// Whether this member left.
    pub fn has_left(&self) -> bool {
        self.left
    }

    /// The next output, if any.
    pub fn poll_output(&mut self) -> Option<MeshOutput> {
        self.out.pop_front()
    }

    // ---- admission -------------------------------------------------------

    /// Whether `from`, which dialled this member and presented `cert`, may
    /// talk membership: not blocked, not refused for its score, and either
    /// a member this node knows or certified by one.
    pub fn admit_hello(&mut self, from: NodeId, cert: &MemberCert, now: Timestamp) -> bool {
        if self.left || self.blocked.contains_key(&from) {
            return false;
        }
        let score = self.score_mut(from, now);
        score.decay(now);
        if score.refused() {
            return false;
        }
        if cert.member != from {
            self.score_mut(from, now).bad_signature();
            return false;
        }
        // A member this node knows needs no sponsor: its certificate is
        // not checked again (a signature check per connection otherwise).
        if self.members.contains_key(&from) {
            return true;
        }
        if cert.verify().is_err() {
            self.score_mut(from, now).bad_signature();
            return false;
        }
        if self.members.len() >= self.config.max_members {
            return false;
        }
        cert.sponsor == self.me.node()
            || (self.members.contains_key(&cert.sponsor)
                && !self.blocked.contains_key(&cert.sponsor))
    }

    /// Whether a connection from `node` is to be refused at once (blocked,
    /// or its score is below the line).
    pub fn refuses(&self, node: &NodeId) -> bool {
        self.blocked.contains_key(node) || self.scores.get(node).is_some_and(PeerScore::refused)
    }

    /// Every node refused now: the blocked, and those under the score line
    /// (at most the blocklist and the scores: both bounded).
    pub fn refused(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.blocked.keys().copied().chain(
            self.scores
                .iter()
                .filter(|(n, s)| s.refused() && !self.blocked.contains_key(n))
                .map(|(n, _)| *n),
        )
    }

    // ---- joining -------------------------------------------------------

    /// Lets `joiner` in (its token was redeemed by the caller): it becomes a
    /// member here, is announced to the mesh, and gets its grant.
    pub fn admit_joiner(
        &mut self,
        joiner: &MemberId,
        now: Timestamp,
    ) -> Result<JoinGrant, MeshError> {
        if self.left {
            return Err(MeshError::Left);
        }
        self.config.identities.check(joiner)?;
        if self.blocked.contains_key(&joiner.node()) {
            return Err(MeshError::Blocked);
        }
        if !self.members.contains_key(&joiner.node())
            && self.members.len() >= self.config.max_members
        {
            return Err(MeshError::Full);
        }
        self.learn(joiner, Some(PeerStatus::Active), now);
        self.drive(now, |swim, rt| {
            swim.apply_many(
                std::iter::once(foca::Member::alive(joiner.clone())),
                true,
                rt,
            )
        });
        let mut members: Vec<GrantedMember> = self
            .members
            .values()
            .filter(|m| m.status != PeerStatus::Inactive && m.node != joiner.node())
            .map(|m| GrantedMember {
                id: m.identity.clone(),
                status: m.status,
                joined_at: m.joined_at,
            })
            .collect();
        members.push(GrantedMember {
            id: self.me.clone(),
            status: PeerStatus::Active,
            joined_at: self.cert.issued_at,
        });
        Ok(JoinGrant {
            cert: MemberCert::issue(&self.key, joiner.node(), now),
            members,
            blocked: self.blocked.values().cloned().collect(),
        })
    }

    /// Takes the grant of `sponsor`, whom this node joined through: stores
    /// the certificate, the members and the blocklist, and announces itself.
    /// Returns how many members it now knows.
    pub fn apply_grant(
        &mut self,
        sponsor: NodeId,
        grant: JoinGrant,
        now: Timestamp,
    ) -> Result<usize, MeshError> {
        if grant.cert.member != self.me.node() || grant.cert.sponsor != sponsor {
            return Err(MeshError::Member(MemberError::BadSignature));
        }
        grant.cert.verify()?;
        self.cert = grant.cert;
        self.store_self();
        for block in grant.blocked {
            if block.node != self.me.node() && self.blocked.len() < self.config.max_members {
                self.apply_block(block);
            }
        }
        let mut fresh = Vec::new();
        for m in grant.members.into_iter().take(self.config.max_members) {
            if m.id.node() == self.me.node() || self.config.identities.check(&m.id).is_err() {
                continue;
            }
            if self.blocked.contains_key(&m.id.node()) {
                continue;
            }
            self.learn(&m.id, Some(m.status), now);
            if m.id.node() == sponsor || m.status != PeerStatus::Inactive {
                fresh.push(m.id);
            }
        }
        self.restart_swim(fresh, Some(sponsor), now);
        Ok(self.members.len())
    }

    /// Restores the table stored before a restart and announces this node
    /// to the members in it: a restarted member rejoins without a token.
    pub fn restore(&mut self, records: Vec<PeerRecord>, blocks: Vec<BlockRecord>, now: Timestamp) {
        for block in blocks {
            if block.node != self.me.node() {
                self.blocked.insert(block.node, block);
            }
        }
        let mut known = Vec::new();
        for mut r in records.into_iter().take(self.config.max_members) {
            if r.node == self.me.node() || self.config.identities.check(&r.identity).is_err() {
                continue;
            }
            if r.status != PeerStatus::Inactive && !self.blocked.contains_key(&r.node) {
                known.push(r.identity.clone());
            }
            // Until heard from again, a restored member is only suspected.
            if r.status == PeerStatus::Active {
                r.status = PeerStatus::Suspect;
            }
            self.persisted_seen.insert(r.node, r.last_seen);
            self.members.insert(r.node, r);
        }
        self.restart_swim(known, None, now);
    }

    fn restart_swim(&mut self, known: Vec<MemberId>, first: Option<NodeId>, now: Timestamp) {
        let ids = known.clone();
        self.drive(now, |swim, rt| {
            swim.apply_many(ids.into_iter().map(foca::Member::alive), false, rt)
        });
        let mut targets: Vec<MemberId> = known
            .iter()
            .filter(|id| Some(id.node()) != first)
            .cloned()
            .sample(&mut self.rng, self.config.announce_to);
        if let Some(first) = first
            && let Some(id) = known.iter().find(|id| id.node() == first)
        {
            targets.insert(0, id.clone());
        }
        for id in targets {
            self.drive(now, |swim, rt| swim.announce(id, rt));
        }
    }

    // ---- inputs --------------------------------------------------------

    /// One frame from `from`, a peer whose connection was admitted.
    pub fn handle_frame(
        &mut self,
        from: NodeId,
        bytes: &[u8],
        now: Timestamp,
    ) -> Result<(), FrameRefusal> {
        let result = self.frame(from, bytes, now);
        if result.is_err() {
            self.stats.frames_refused += 1;
        } else {
            self.stats.frames_in += 1;
            if let Some(m) = self.members.get_mut(&from) {
                m.last_seen = now;
            }
        }
        if self.scores.get(&from).is_some_and(PeerScore::refused) {
            let score = self.scores.get(&from).map_or(0.0, |s| s.score);
            self.out.push_back(MeshOutput::Disconnect(from));
            self.out
                .push_back(MeshOutput::Event(MeshEvent::Disconnected {
                    node: from,
                    score,
                }));
        }
        result
    }

    fn frame(&mut self, from: NodeId, bytes: &[u8], now: Timestamp) -> Result<(), FrameRefusal> {
        if self.left {
            return Ok(());
        }
        if self.blocked.contains_key(&from) {
            self.stats.blocked_dropped += 1;
            self.out.push_back(MeshOutput::Disconnect(from));
            return Err(FrameRefusal::Blocked);
        }
        if !self.frame_limits.try_take(&from, now) {
            self.score_mut(from, now).rate_violation();
            return Err(FrameRefusal::RateLimited);
        }
        let frame = match MeshFrame::decode(bytes) {
            Ok(f) => f,
            Err(e) => {
                self.score_mut(from, now).malformed();
                return Err(e.into());
            }
        };
        match frame {
            MeshFrame::Hello { .. } => Ok(()),
            MeshFrame::Swim(packet) => {
                if swim_source(&packet) != Some(from) {
                    self.score_mut(from, now).bad_signature();
                    return Err(FrameRefusal::Spoofed);
                }
                let mut refused = None;
                self.drive(now, |swim, rt| {
                    let r = swim.handle_data(&packet, rt);
                    if let Err(e) = &r {
                        refused = Some(e.to_string());
                    }
                    r
                });
                match refused {
                    None => Ok(()),
                    Some(e) => {
                        let forged = e.contains(&CodecError::Forged.to_string());
                        let score = self.score_mut(from, now);
                        if forged {
                            score.bad_signature();
                            Err(FrameRefusal::Forged)
                        } else {
                            score.malformed();
                            Err(FrameRefusal::Swim(e))
                        }
                    }
                }
            }
            MeshFrame::Gossip(msg) => self.gossip(Some(from), msg, now),
            MeshFrame::IHave(keys) => {
                let want: Vec<MessageKey> = keys
                    .into_iter()
                    .filter(|k| !self.seen.contains(k) && !self.blocked.contains_key(&k.origin))
                    .take(MAX_KEYS_PER_FRAME)
                    .collect();
                if !want.is_empty() {
                    self.send(from, &MeshFrame::IWant(want));
                }
                Ok(())
            }
            MeshFrame::IWant(keys) => {
                let found: Vec<GossipMessage> = keys
                    .iter()
                    .filter_map(|k| self.store.get(k).cloned())
                    .collect();
                for msg in found {
                    self.send(from, &MeshFrame::Gossip(msg));
                }
                Ok(())
            }
        }
    }

    /// A timer the driver armed came due.
    pub fn handle_timer(&mut self, timer: MeshTimer, now: Timestamp) {
        if self.left {
            return;
        }
        match timer {
            MeshTimer::Swim(t) => self.drive(now, |swim, rt| swim.handle_timer(t, rt)),
            MeshTimer::Tick => {
                self.tick(now);
                self.out.push_back(MeshOutput::Timer {
                    at: now + self.config.tick,
                    timer: MeshTimer::Tick,
                });
            }
        }
    }

    /// Broadcasts `body` on `topic` to every member.
    pub fn broadcast(
        &mut self,
        topic: &str,
        body: Vec<u8>,
        now: Timestamp,
    ) -> Result<MessageKey, MeshError> {
        if !valid_app_topic(topic) {
            return Err(GossipError::BadTopic.into());
        }
        self.originate(topic, body, now)
    }

    fn originate(
        &mut self,
        topic: &str,
        body: Vec<u8>,
        now: Timestamp,
    ) -> Result<MessageKey, MeshError> {
        if self.left {
            return Err(MeshError::Left);
        }
        let id = self.rng.random::<u64>();
        let msg = GossipMessage::sign(&self.key, id, topic, body, now, self.config.max_hops)?;
        let key = msg.key;
        self.seen.insert(key, now);
        self.store.insert(msg.clone(), now);
        if topic.starts_with(RESERVED_PREFIX) {
            self.control(&msg, now);
        }
        self.relay(None, msg);
        Ok(key)
    }

    /// Blocks `target` everywhere: recorded here, then broadcast.
    pub fn block(&mut self, target: NodeId, reason: &str, now: Timestamp) -> Result<(), MeshError> {
        if target == self.me.node() {
            return Err(MeshError::BlockSelf);
        }
        if reason.len() > MAX_REASON_LEN {
            return Err(MeshError::ReasonTooLong);
        }
        let notice = BlockNotice {
            target,
            block: true,
            reason: reason.to_owned(),
        };
        self.originate(
            BLOCK_TOPIC,
            postcard::to_allocvec(&notice).unwrap_or_default(),
            now,
        )?;
        Ok(())
    }

    /// Lifts a block everywhere.
    pub fn unblock(&mut self, target: NodeId, now: Timestamp) -> Result<(), MeshError> {
        if !self.blocked.contains_key(&target) {
            return Err(MeshError::NotBlocked(target));
        }
        let notice = BlockNotice {
            target,
            block: false,
            reason: String::new(),
        };
        self.originate(
            BLOCK_TOPIC,
            postcard::to_allocvec(&notice).unwrap_or_default(),
            now,
        )?;
        Ok(())
    }

    /// Takes `name`: a new identity (the epoch one higher) that SWIM
    /// disseminates; every member sees `peer.renamed`.
    pub fn rename(&mut self, name: &str, now: Timestamp) -> Result<(), MeshError> {
        if self.left {
            return Err(MeshError::Left);
        }
        let id = MemberId::new(
            &self.key,
            self.me.epoch() + 1,
            name,
            self.me.addrs().to_vec(),
        )?;
        self.change_identity(id, now);
        Ok(())
    }

    fn change_identity(&mut self, id: MemberId, now: Timestamp) {
        self.me = id.clone();
        self.store_self();
        self.drive(now, |swim, rt| swim.change_identity(id, &mut *rt));
        // Tell a few members at once rather than wait for the next probe.
        let targets: Vec<MemberId> = self
            .members
            .values()
            .filter(|m| m.status == PeerStatus::Active)
            .sample(&mut self.rng, self.config.announce_to)
            .into_iter()
            .map(|m| m.identity.clone())
            .collect();
        for t in targets {
            self.drive(now, |swim, rt| swim.announce(t, rt));
        }
    }

    /// Leaves the mesh: every member sees `peer.left` (reason `left`).
    pub fn leave(&mut self, now: Timestamp) -> Result<(), MeshError> {
        self.originate(LEAVE_TOPIC, Vec::new(), now)?;
        // Left before foca reports itself defunct, so it does not renew.
        self.left = true;
        self.drive(now, |swim, rt| swim.leave_cluster(rt));
        Ok(())
    }

    // ---- internals -----------------------------------------------------

    fn score_mut(&mut self, node: NodeId, now: Timestamp) -> &mut PeerScore {
        self.scores
            .entry(node)
            .or_insert_with(|| PeerScore::new(now))
    }

    fn send(&mut self, to: NodeId, frame: &MeshFrame) {
        let addrs = self
            .members
            .get(&to)
            .map(|m| m.identity.addrs().to_vec())
            .unwrap_or_default();
        self.stats.frames_out += 1;
        self.out.push_back(MeshOutput::Send {
            to,
            addrs,
            frame: frame.encode(),
        });
    }

    fn store_self(&mut self) {
        self.out
            .push_back(MeshOutput::Store(MeshStore::Myself(MeshSelfRecord {
                epoch: self.me.epoch(),
                name: self.me.name().to_owned(),
                cert: self.cert.clone(),
            })));
    }

    /// Runs `f` on foca, then turns what it queued into outputs.
    fn drive<F>(&mut self, now: Timestamp, f: F)
    where
        F: FnOnce(&mut Swim, &mut foca::AccumulatingRuntime<MemberId>) -> Result<(), foca::Error>,
    {
        // foca reports errors for packets it refused; the caller looks at
        // them where it cares (handle_frame).
        let _ = f(&mut self.swim, &mut self.rt);
        while let Some((to, data)) = self.rt.to_send() {
            self.stats.frames_out += 1;
            self.out.push_back(MeshOutput::Send {
                to: to.node(),
                addrs: to.addrs().to_vec(),
                frame: MeshFrame::Swim(data.to_vec()).encode(),
            });
        }
        while let Some((after, timer)) = self.rt.to_schedule() {
            self.out.push_back(MeshOutput::Timer {
                at: now + after,
                timer: MeshTimer::Swim(timer),
            });
        }
        let mut notes = Vec::new();
        while let Some(n) = self.rt.to_notify() {
            notes.push(n);
        }
        for n in notes {
            self.notified(n, now);
        }
    }

    fn notified(&mut self, n: foca::OwnedNotification<MemberId>, now: Timestamp) {
        use foca::OwnedNotification as N;

        match n {
            N::MemberUp(id) => {
                if self.blocked.contains_key(&id.node()) {
                    self.bury(&id, now);
                } else {
                    self.learn(&id, Some(PeerStatus::Active), now);
                }
            }
            N::MemberDown(id) => self.set_status(id.node(), PeerStatus::Inactive, now),
            N::Rename(_, new) => {
                // A newer identity of the same node; its liveness comes
                // with MemberUp/MemberDown (or the status scan).
                if self.blocked.contains_key(&new.node()) {
                    self.bury(&new, now);
                } else {
                    self.learn(&new, None, now);
                }
            }
            N::Defunct => {
                // Declared down while alive: come back under a newer epoch.
                if !self.left
                    && let Ok(id) = MemberId::new(
                        &self.key,
                        self.me.epoch() + 1,
                        self.me.name(),
                        self.me.addrs().to_vec(),
                    )
                {
                    self.change_identity(id, now);
                }
            }
            N::ProbeFailed(_, id) => self.score_mut(id.node(), now).probe_failed(),
            _ => {}
        }
    }

    /// Declares a blocked node down in foca's view.
    fn bury(&mut self, id: &MemberId, now: Timestamp) {
        let down = foca::Member::new(id.clone(), u16::MAX, foca::State::Down);
        self.drive(now, |swim, rt| {
            swim.apply_many(std::iter::once(down), false, rt)
        });
    }

    /// Adds or updates a member from its identity, with `status` (`None`:
    /// as it was; active if new).
    fn learn(&mut self, id: &MemberId, status: Option<PeerStatus>, now: Timestamp) {
        let node = id.node();
        match self.members.get_mut(&node) {
            None => {
                if self.members.len() >= self.config.max_members {
                    return;
                }
                let status = status.unwrap_or(PeerStatus::Active);
                let mut record = PeerRecord::new(id.clone(), now);
                record.status = status;
                self.members.insert(node, record.clone());
                self.persisted_seen.insert(node, now);
                if status == PeerStatus::Active {
                    self.out.push_back(MeshOutput::Event(MeshEvent::Joined {
                        node,
                        name: id.name().to_owned(),
                        rejoined: false,
                    }));
                }
                self.out
                    .push_back(MeshOutput::Store(MeshStore::Member(record)));
            }
            Some(record) => {
                if id.epoch() < record.identity.epoch() {
                    return;
                }
                let mut changed = false;
                if id != &record.identity {
                    if id.name() != record.name {
                        self.out.push_back(MeshOutput::Event(MeshEvent::Renamed {
                            node,
                            old: record.name.clone(),
                            new: id.name().to_owned(),
                        }));
                    }
                    record.name = id.name().to_owned();
                    record.addresses = id.addrs().to_vec();
                    record.identity = id.clone();
                    changed = true;
                }
                record.last_seen = now;
                if changed {
                    let r = record.clone();
                    self.out.push_back(MeshOutput::Store(MeshStore::Member(r)));
                }
                if let Some(status) = status {
                    self.set_status(node, status, now);
                }
            }
        }
    }

    fn set_status(&mut self, node: NodeId, status: PeerStatus, now: Timestamp) {
        let Some(record) = self.members.get_mut(&node) else {
            return;
        };
        if record.status == status {
            return;
        }
        let before = record.status;
        record.status = status;
        if status == PeerStatus::Active {
            self.said_left.remove(&node);
        }
        if status != PeerStatus::Inactive {
            record.last_seen = now;
        }
        let name = record.name.clone();
        let r = record.clone();
        let event = match (before, status) {
            (PeerStatus::Inactive, PeerStatus::Active) => Some(MeshEvent::Joined {
                node,
                name,
                rejoined: true,
            }),
            (PeerStatus::Suspect, PeerStatus::Active) => Some(MeshEvent::Alive { node, name }),
            (_, PeerStatus::Suspect) => Some(MeshEvent::Suspect { node, name }),
            (_, PeerStatus::Inactive) => Some(MeshEvent::Left {
                node,
                name,
                reason: if self.blocked.contains_key(&node) {
                    LeaveReason::Blocked
                } else {
                    LeaveReason::Failed
                },
            }),
            _ => None,
        };
        if let Some(e) = event {
            self.out.push_back(MeshOutput::Event(e));
        }
        self.out.push_back(MeshOutput::Store(MeshStore::Member(r)));
    }

    fn gossip(
        &mut self,
        from: Option<NodeId>,
        msg: GossipMessage,
        now: Timestamp,
    ) -> Result<(), FrameRefusal> {
        let origin = msg.key.origin;
        if self.blocked.contains_key(&origin) {
            self.stats.blocked_dropped += 1;
            return Ok(());
        }
        if self.seen.contains(&msg.key) {
            self.stats.duplicates += 1;
            if let Some(from) = from {
                self.score_mut(from, now).duplicate();
            }
            return Ok(());
        }
        let too_old = now.saturating_duration_since(msg.sent_at) > self.config.seen_horizon;
        let too_new = msg.sent_at.saturating_duration_since(now) > self.config.max_clock_skew;
        if too_old || too_new {
            return Err(FrameRefusal::Stale);
        }
        if msg.verify().is_err() || msg.hops > msg.max_hops {
            if let Some(from) = from {
                self.score_mut(from, now).bad_signature();
            }
            return Err(FrameRefusal::Forged);
        }
        // Seen from here on, even if dropped for its rate: no copy of it is
        // checked again.
        self.seen.insert(msg.key, now);
        if origin != self.me.node() && !self.origin_limits.try_take(&origin, now) {
            self.stats.origin_rate_dropped += 1;
            if let Some(from) = from {
                self.score_mut(from, now).rate_violation();
            }
            return Err(FrameRefusal::OriginRateLimited);
        }
        if let Some(from) = from {
            self.score_mut(from, now).useful();
        }
        self.store.insert(msg.clone(), now);
        if msg.topic.starts_with(RESERVED_PREFIX) {
            self.control(&msg, now);
        } else if origin != self.me.node() {
            self.stats.delivered += 1;
            self.out.push_back(MeshOutput::Deliver(Delivery {
                key: msg.key,
                topic: msg.topic.clone(),
                sent_at: msg.sent_at,
                hops: msg.hops,
                body: msg.body.clone(),
            }));
        }
        self.relay(from, msg);
        Ok(())
    }

    fn relay(&mut self, from: Option<NodeId>, mut msg: GossipMessage) {
        if msg.hops >= msg.max_hops {
            return;
        }
        msg.hops += 1;
        let me = self.me.node();
        let origin = msg.key.origin;
        let targets: Vec<NodeId> = self
            .members
            .values()
            .filter(|m| {
                m.status != PeerStatus::Inactive
                    && Some(m.node) != from
                    && m.node != origin
                    && m.node != me
                    && !self.blocked.contains_key(&m.node)
                    && self.scores.get(&m.node).is_none_or(PeerScore::relay_to)
            })
            .map(|m| m.node)
            .collect::<Vec<_>>()
            .sample(&mut self.rng, self.config.fanout)
            .copied()
            .collect();
        let frame = MeshFrame::Gossip(msg);
        for to in targets {
            self.send(to, &frame);
        }
    }

    /// The mesh's own broadcasts: blocks and leaves.
    fn control(&mut self, msg: &GossipMessage, now: Timestamp) {
        let origin = msg.key.origin;
        match msg.topic.as_str() {
            BLOCK_TOPIC => {
                let Ok(notice) = postcard::from_bytes::<BlockNotice>(&msg.body) else {
                    return;
                };
                if notice.reason.len() > MAX_REASON_LEN {
                    return;
                }
                if notice.block {
                    if notice.target == self.me.node()
                        || self.blocked.len() >= self.config.max_members
                    {
                        return;
                    }
                    self.apply_block(BlockRecord {
                        node: notice.target,
                        by: origin,
                        reason: notice.reason,
                        at: msg.sent_at,
                    });
                    if let Some(id) = self.members.get(&notice.target).map(|m| m.identity.clone()) {
                        self.bury(&id, now);
                        self.set_status(notice.target, PeerStatus::Inactive, now);
                    }
                } else if self.blocked.remove(&notice.target).is_some() {
                    self.out.push_back(MeshOutput::Store(MeshStore::Unblock {
                        node: notice.target,
                        by: origin,
                    }));
                    self.out.push_back(MeshOutput::Event(MeshEvent::Unblocked {
                        node: notice.target,
                        by: origin,
                    }));
                }
            }
            LEAVE_TOPIC if origin != self.me.node() => {
                if let Some(record) = self.members.get_mut(&origin) {
                    let id = record.identity.clone();
                    // Its goodbye may come after SWIM declared it down (foca
                    // gossips the leave too): then `peer.left` is said again,
                    // once, with the reason it gave.
                    let first_word = self.said_left.insert(origin);
                    if record.status != PeerStatus::Inactive || first_word {
                        record.status = PeerStatus::Inactive;
                        record.last_seen = now;
                        let r = record.clone();
                        let name = r.name.clone();
                        self.out.push_back(MeshOutput::Store(MeshStore::Member(r)));
                        self.out.push_back(MeshOutput::Event(MeshEvent::Left {
                            node: origin,
                            name,
                            reason: LeaveReason::Left,
                        }));
                    }
                    let down = foca::Member::new(id, u16::MAX, foca::State::Down);
                    self.drive(now, |swim, rt| {
                        swim.apply_many(std::iter::once(down), false, rt)
                    });
                }
            }
            _ => {}
        }
    }

    fn apply_block(&mut self, block: BlockRecord) {
        let node = block.node;
        let fresh = self.blocked.insert(node, block.clone()).is_none();
        if fresh {
            self.out
                .push_back(MeshOutput::Event(MeshEvent::Blocklisted {
                    node,
                    by: block.by,
                    reason: block.reason.clone(),
                }));
        }
        self.out
            .push_back(MeshOutput::Store(MeshStore::Block(block)));
        self.out.push_back(MeshOutput::Disconnect(node));
    }

    fn tick(&mut self, now: Timestamp) {
        self.sync_statuses(now);
        if now.saturating_duration_since(self.last_housekeeping) >= HOUSEKEEPING_EVERY {
            self.last_housekeeping = now;
            self.housekeeping(now);
        }
        // Peer exchange.
        if now.saturating_duration_since(self.last_exchange) >= self.config.exchange_every {
            self.last_exchange = now;
            let me = self.me.node();
            let live: Vec<&PeerRecord> = self
                .members
                .values()
                .filter(|m| m.status != PeerStatus::Inactive && m.node != me)
                .collect();
            let target = live.choose(&mut self.rng).map(|m| m.identity.clone());
            if let Some(id) = target {
                self.drive(now, |swim, rt| swim.announce(id, rt));
            }
        }
        // Members lost in the last minute (not blocked, not gone by their
        // own word): one is asked back each tick. A partition that heals,
        // or a member that restarts, is then heard from within seconds,
        // where foca's own announce to down members picks among all of
        // them, however long dead.
        let lost: Vec<&PeerRecord> = self
            .members
            .values()
            .filter(|m| {
                m.status == PeerStatus::Inactive
                    && now.saturating_duration_since(m.last_seen) <= RECALL_LOST_FOR
                    && !self.blocked.contains_key(&m.node)
                    && !self.said_left.contains(&m.node)
            })
            .collect();
        if let Some(id) = lost.choose(&mut self.rng).map(|m| m.identity.clone()) {
            self.drive(now, |swim, rt| swim.announce(id, rt));
        }
        // Lazy push: tell one member what this one holds.
        let recent = self.store.recent(MAX_KEYS_PER_FRAME, now);
        if !recent.is_empty() {
            let me = self.me.node();
            let active: Vec<NodeId> = self
                .members
                .values()
                .filter(|m| m.status == PeerStatus::Active && m.node != me)
                .map(|m| m.node)
                .collect();
            let target = active.choose(&mut self.rng).copied();
            if let Some(to) = target {
                self.send(to, &MeshFrame::IHave(recent));
            }
        }
    }

    /// Takes the statuses foca decided without a notification (suspicion,
    /// refutation). foca's table is compared with the one seen at the last
    /// tick, in foca's order, so only the members that changed are looked
    /// up (foca reorders its table rarely: then every member is).
    fn sync_statuses(&mut self, now: Timestamp) {
        let mut changed: Vec<(NodeId, u64, PeerStatus, u16)> = Vec::new();
        let mut len = 0;
        for (i, m) in self.swim.iter_membership_state().enumerate() {
            let status = match m.state() {
                foca::State::Alive => PeerStatus::Active,
                foca::State::Suspect => PeerStatus::Suspect,
                foca::State::Down => PeerStatus::Inactive,
            };
            let state = (m.id().node(), m.id().epoch(), status, m.incarnation());
            len = i + 1;
            match self.swim_seen.get_mut(i) {
                Some(seen) if *seen == state => {}
                Some(seen) => {
                    *seen = state;
                    changed.push(state);
                }
                None => {
                    self.swim_seen.push(state);
                    changed.push(state);
                }
            }
        }
        self.swim_seen.truncate(len);
        for &(node, _, status, incarnation) in &changed {
            if status == PeerStatus::Suspect {
                self.suspected.entry(node).or_insert((now, incarnation));
            } else {
                self.suspected.remove(&node);
            }
        }
        for (node, epoch, status, incarnation) in changed {
            if self.blocked.contains_key(&node) {
                continue;
            }
            let Some(record) = self.members.get_mut(&node) else {
                continue;
            };
            if record.identity.epoch() > epoch {
                continue;
            }
            record.incarnation = incarnation;
            if record.status != status {
                self.set_status(node, status, now);
            }
        }
    }

    /// Suspicions foca forgot to end. foca drops its pending timers when
    /// this member's own identity changes (after being declared down, as
    /// when a partition heals), so a member suspected just before stays
    /// `suspect` for good. Past the suspicion timeout (and a probe period
    /// more), such a suspicion ends as foca would have ended it: down, at
    /// the incarnation suspected. If the member is in fact alive, it is
    /// heard from again (foca announces to down members) and comes back.
    fn expire_suspicions(&mut self, now: Timestamp) {
        let after = self.config.swim.suspect_to_down_after + self.config.swim.probe_period;
        let expired: Vec<(NodeId, u16)> = self
            .suspected
            .iter()
            .filter(|(_, (since, _))| now.saturating_duration_since(*since) >= after)
            .map(|(n, (_, inc))| (*n, *inc))
            .collect();
        for (node, incarnation) in expired {
            self.suspected.remove(&node);
            let Some(member) = self
                .swim
                .iter_membership_state()
                .find(|m| m.id().node() == node)
            else {
                continue;
            };
            if member.state() != foca::State::Suspect || member.incarnation() != incarnation {
                continue;
            }
            let down = foca::Member::new(member.id().clone(), incarnation, foca::State::Down);
            self.drive(now, |swim, rt| {
                swim.apply_many(std::iter::once(down), false, rt)
            });
        }
    }

    /// Every few seconds: statuses all compared again, last-seen times
    /// stored now and then, and inactive members past the horizon
    /// collected.
    fn housekeeping(&mut self, now: Timestamp) {
        // The next tick looks every member up again, so a record changed
        // here without foca's table changing is put right within seconds.
        self.swim_seen.clear();
        self.expire_suspicions(now);
        // Scores decay (a tenth every ten seconds), and the neutral ones of
        // nodes that are not members go.
        for s in self.scores.values_mut() {
            s.decay(now);
        }
        self.scores
            .retain(|n, s| s.score != 0.0 || self.members.contains_key(n));
        let stale: Vec<PeerRecord> = self
            .members
            .values()
            .filter(|m| {
                self.persisted_seen.get(&m.node).is_none_or(|t| {
                    m.last_seen.saturating_duration_since(*t) >= Duration::from_secs(30)
                })
            })
            .cloned()
            .collect();
        for r in stale {
            self.persisted_seen.insert(r.node, r.last_seen);
            self.out.push_back(MeshOutput::Store(MeshStore::Member(r)));
        }
        let gone: Vec<NodeId> = self
            .members
            .values()
            .filter(|m| {
                m.status == PeerStatus::Inactive
                    && now.saturating_duration_since(m.last_seen) >= self.config.gc_after
            })
            .map(|m| m.node)
            .collect();
        for node in gone {
            self.members.remove(&node);
            self.persisted_seen.remove(&node);
            self.said_left.remove(&node);
            self.out
                .push_back(MeshOutput::Store(MeshStore::Forget(node)));
        }
    }
}
