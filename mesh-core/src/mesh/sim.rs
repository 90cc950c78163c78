//! A deterministic simulation of many [`Mesh`] members in one thread: an
//! in-memory network with latency, loss, partitions and crashes, on a
//! virtual clock. Same seed, same run. The tests and the benches use it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::gossip::MessageKey;
use super::machine::{Mesh, MeshConfig, MeshOutput, MeshTimer};
use super::member::MemberId;
use super::wire::IdentityCache;
use crate::clock::Timestamp;
use crate::identity::{NodeId, NodeKey};
use crate::storage::records::{PeerRecord, PeerStatus};
use crate::transport::PeerAddr;

enum Event {
    Frame {
        to: usize,
        from: NodeId,
        bytes: Vec<u8>,
    },
    Timer {
        node: usize,
        life: u32,
        timer: MeshTimer,
    },
}

/// One simulated member.
#[derive(Debug)]
pub struct SimNode {
    /// Its mesh.
    pub mesh: Mesh,
    /// Whether it runs.
    pub alive: bool,
    /// Its side of a partition.
    pub side: u8,
    /// Bumped at each crash: timers of an earlier life are dropped.
    life: u32,
    /// Frames it sent.
    pub sent: u64,
    /// When each broadcast reached it, and in how many hops.
    pub delivered: HashMap<MessageKey, (Timestamp, u8)>,
    /// Broadcasts delivered more than once (must stay 0).
    pub double_deliveries: u64,
    /// `peer.left` events with reason `failed` it reported, by node.
    pub deaths_seen: Vec<NodeId>,
}

/// The simulated network and its members.
#[derive(Debug)]
pub struct Sim {
    /// The members.
    pub nodes: Vec<SimNode>,
    index: HashMap<NodeId, usize>,
    queue: BinaryHeap<Queued>,
    seq: u64,
    /// The virtual time.
    pub now: Timestamp,
    rng: StdRng,
    /// Probability that a frame is lost.
    pub loss: f64,
    /// Latency bounds, in milliseconds.
    pub latency_ms: (u64, u64),
    admitted: HashSet<(usize, usize)>,
    config: MeshConfig,
}

/// An event in time order (then in the order queued).
struct Queued {
    at: Reverse<(Timestamp, u64)>,
    event: Event,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.at.cmp(&other.at)
    }
}

impl std::fmt::Debug for Queued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Queued")
    }
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Event")
    }
}

impl Sim {
    /// `n` members, each joined through a random earlier one, `join_gap`
    /// of virtual time apart; then `settle` of virtual time.
    pub fn joined(n: usize, seed: u64, mut config: MeshConfig, join_gap: Duration) -> Sim {
        config.identities = IdentityCache::default();
        let start = Timestamp::from_millis(1_700_000_000_000);
        let mut sim = Sim {
            nodes: Vec::with_capacity(n),
            index: HashMap::new(),
            queue: BinaryHeap::new(),
            seq: 0,
            now: start,
            rng: StdRng::seed_from_u64(seed),
            loss: 0.0,
            latency_ms: (1, 5),
            admitted: HashSet::new(),
            config,
        };
        for i in 0..n {
            let key = Arc::new(NodeKey::from_secret_bytes(&seed_bytes(seed, i)));
            let node = key.node_id();
            let mesh = Mesh::new(
                key,
                sim.config.clone(),
                &format!("m{i}"),
                vec![PeerAddr::Memory(format!("m{i}"))],
                start.as_millis(),
                None,
                seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                sim.now,
            )
            .unwrap_or_else(|e| panic!("member {i}: {e}"));
            sim.index.insert(node, i);
            sim.nodes.push(SimNode {
                mesh,
                alive: true,
                side: 0,
                life: 0,
                sent: 0,
                delivered: HashMap::new(),
                double_deliveries: 0,
                deaths_seen: Vec::new(),
            });
            sim.flush(i);
            if i > 0 {
                let sponsor = sim.rng.random_range(0..i);
                let me = sim.nodes[i].mesh.me().clone();
                let now = sim.now;
                let grant = sim.nodes[sponsor]
                    .mesh
                    .admit_joiner(&me, now)
                    .unwrap_or_else(|e| panic!("join {i}: {e}"));
                let sponsor_id = sim.nodes[sponsor].mesh.me().node();
                sim.flush(sponsor);
                sim.nodes[i]
                    .mesh
                    .apply_grant(sponsor_id, grant, now)
                    .unwrap_or_else(|e| panic!("grant {i}: {e}"));
                sim.flush(i);
            }
            sim.run_for(join_gap);
        }
        sim
    }

    /// `n` members that already know each other, as when each restarts
    /// from a stored member table: no join storm, so large meshes are
    /// quick to set up. Each member starts with the others `suspect` and
    /// takes them for `active` once foca has them alive (its first tick).
    pub fn formed(n: usize, seed: u64, mut config: MeshConfig) -> Sim {
        config.identities = IdentityCache::default();
        let start = Timestamp::from_millis(1_700_000_000_000);
        let mut sim = Sim {
            nodes: Vec::with_capacity(n),
            index: HashMap::new(),
            queue: BinaryHeap::new(),
            seq: 0,
            now: start,
            rng: StdRng::seed_from_u64(seed),
            loss: 0.0,
            latency_ms: (1, 5),
            admitted: HashSet::new(),
            config,
        };
        for i in 0..n {
            let key = Arc::new(NodeKey::from_secret_bytes(&seed_bytes(seed, i)));
            let node = key.node_id();
            let mesh = Mesh::new(
                key,
                sim.config.clone(),
                &format!("m{i}"),
                vec![PeerAddr::Memory(format!("m{i}"))],
                start.as_millis(),
                None,
                seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                sim.now,
            )
            .unwrap_or_else(|e| panic!("member {i}: {e}"));
            sim.index.insert(node, i);
            sim.nodes.push(SimNode {
                mesh,
                alive: true,
                side: 0,
                life: 0,
                sent: 0,
                delivered: HashMap::new(),
                double_deliveries: 0,
                deaths_seen: Vec::new(),
            });
        }
        let ids: Vec<MemberId> = sim.nodes.iter().map(|m| m.mesh.me().clone()).collect();
        for i in 0..n {
            let records = ids
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, id)| PeerRecord::new(id.clone(), start))
                .collect();
            sim.nodes[i].mesh.restore(records, Vec::new(), start);
            sim.flush(i);
        }
        sim
    }

    /// The node id of member `i`.
    pub fn id(&self, i: usize) -> NodeId {
        self.nodes[i].mesh.me().node()
    }

    fn push(&mut self, at: Timestamp, event: Event) {
        self.seq += 1;
        self.queue.push(Queued {
            at: Reverse((at, self.seq)),
            event,
        });
    }

    /// Takes every output of member `i`.
    pub fn flush(&mut self, i: usize) {
        while let Some(out) = self.nodes[i].mesh.poll_output() {
            match out {
                MeshOutput::Send { to, frame, .. } => {
                    self.nodes[i].sent += 1;
                    let Some(&j) = self.index.get(&to) else {
                        continue;
                    };
                    if self.rng.random_bool(self.loss.clamp(0.0, 1.0)) {
                        continue;
                    }
                    let (lo, hi) = self.latency_ms;
                    let delay = self.rng.random_range(lo..=hi.max(lo));
                    let from = self.id(i);
                    self.push(
                        self.now + Duration::from_millis(delay),
                        Event::Frame {
                            to: j,
                            from,
                            bytes: frame,
                        },
                    );
                }
                MeshOutput::Timer { at, timer } => {
                    let life = self.nodes[i].life;
                    self.push(
                        at,
                        Event::Timer {
                            node: i,
                            life,
                            timer,
                        },
                    );
                }
                MeshOutput::Deliver(d) => {
                    let node = &mut self.nodes[i];
                    if node.delivered.insert(d.key, (self.now, d.hops)).is_some() {
                        node.double_deliveries += 1;
                    }
                }
                MeshOutput::Event(super::MeshEvent::Left {
                    node,
                    reason: super::LeaveReason::Failed,
                    ..
                }) => self.nodes[i].deaths_seen.push(node),
                _ => {}
            }
        }
    }

    /// Runs the network until `until`.
    pub fn run_until(&mut self, until: Timestamp) {
        while let Some(q) = self.queue.peek() {
            let at = q.at.0.0;
            if at > until {
                break;
            }
            let Some(Queued { event, .. }) = self.queue.pop() else {
                break;
            };
            self.now = self.now.max(at);
            match event {
                Event::Frame { to, from, bytes } => {
                    let Some(&src) = self.index.get(&from) else {
                        continue;
                    };
                    let (a, b) = (&self.nodes[src], &self.nodes[to]);
                    if !b.alive || !a.alive || a.side != b.side {
                        continue;
                    }
                    if !self.admitted.contains(&(src, to)) {
                        let cert = self.nodes[src].mesh.cert().clone();
                        let now = self.now;
                        if !self.nodes[to].mesh.admit_hello(from, &cert, now) {
                            continue;
                        }
                        self.admitted.insert((src, to));
                    }
                    let now = self.now;
                    let _ = self.nodes[to].mesh.handle_frame(from, &bytes, now);
                    self.flush(to);
                }
                Event::Timer { node, life, timer } => {
                    if !self.nodes[node].alive || self.nodes[node].life != life {
                        continue;
                    }
                    let now = self.now;
                    self.nodes[node].mesh.handle_timer(timer, now);
                    self.flush(node);
                }
            }
        }
        self.now = self.now.max(until);
    }

    /// Runs the network for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    /// Member `i` broadcasts `body` on `topic`.
    pub fn broadcast(&mut self, i: usize, topic: &str, body: Vec<u8>) -> MessageKey {
        let now = self.now;
        let key = self.nodes[i]
            .mesh
            .broadcast(topic, body, now)
            .unwrap_or_else(|e| panic!("broadcast: {e}"));
        self.flush(i);
        key
    }

    /// Crashes member `i`: it stops, its timers are dropped.
    pub fn crash(&mut self, i: usize) {
        self.nodes[i].alive = false;
        self.nodes[i].life += 1;
        self.admitted.retain(|(a, b)| *a != i && *b != i);
    }

    /// How many live members have `key` delivered (the origin counts as
    /// having it).
    pub fn reached(&self, key: &MessageKey) -> usize {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(i, n)| {
                n.alive && (n.delivered.contains_key(key) || self.id(*i) == key.origin)
            })
            .count()
    }

    /// The most hops any live member's delivery of `key` took.
    pub fn rounds(&self, key: &MessageKey) -> u8 {
        self.nodes
            .iter()
            .filter_map(|n| n.delivered.get(key).map(|(_, h)| *h + 1))
            .max()
            .unwrap_or(0)
    }

    /// Whether every live member sees exactly the live members as active,
    /// and every crashed one as suspect or inactive.
    pub fn agree_on_live_set(&self) -> bool {
        let live: HashSet<NodeId> = (0..self.nodes.len())
            .filter(|i| self.nodes[*i].alive)
            .map(|i| self.id(i))
            .collect();
        self.nodes.iter().filter(|n| n.alive).all(|n| {
            let me = n.mesh.me().node();
            let view: HashSet<NodeId> = n
                .mesh
                .members()
                .filter(|m| m.status == PeerStatus::Active)
                .map(|m| m.node)
                .chain(std::iter::once(me))
                .collect();
            view == live
        })
    }
}

fn seed_bytes(seed: u64, i: usize) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&seed.to_be_bytes());
    b[8..16].copy_from_slice(&(i as u64).to_be_bytes());
    b[16] = 1;
    b
}
