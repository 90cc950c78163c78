//! Convergence, catch-up and bad input of replicated namespaces.

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

use super::*;
use crate::clock::Timestamp;
use crate::identity::{NodeId, NodeKey};

fn node(i: usize) -> NodeId {
    let mut b = [7u8; 32];
    b[0] = i as u8;
    NodeKey::from_secret_bytes(&b).node_id()
}

const START: u64 = 1_700_000_000_000;

struct Node {
    replica: Replica,
    clock: HlcClock,
    skew_ms: i64,
}

impl Node {
    fn new(i: usize, skew_ms: i64, max_skew: Duration) -> Self {
        Node {
            replica: Replica::new(node(i), ReplicaLimits::default()),
            clock: HlcClock::new(node(i), max_skew),
            skew_ms,
        }
    }

    fn wall(&self, now: u64) -> Timestamp {
        Timestamp::from_millis(now.saturating_add_signed(self.skew_ms))
    }

    fn state(&self) -> BTreeMap<String, Change> {
        self.replica
            .entries()
            .map(|c| (c.key.clone(), c.clone()))
            .collect()
    }
}

/// Every pair syncs both ways until nothing moves.
fn anti_entropy(nodes: &mut [Node], now: u64) {
    for _ in 0..8 {
        let mut moved = false;
        for a in 0..nodes.len() {
            for b in 0..nodes.len() {
                if a == b {
                    continue;
                }
                loop {
                    let theirs = nodes[b].replica.covered().clone();
                    let delta = nodes[a].replica.delta_for(&theirs);
                    let wall = nodes[b].wall(now);
                    let nb = &mut nodes[b];
                    let out =
                        nb.replica
                            .apply(delta.changes, Some(&delta.covers), &mut nb.clock, wall);
                    moved |= !out.changed.is_empty() || out.covered_moved;
                    assert!(out.refused.is_empty(), "{:?}", out.refused);
                    if !delta.more {
                        break;
                    }
                }
            }
        }
        if !moved {
            return;
        }
    }
    panic!("anti-entropy did not settle");
}

#[derive(Debug, Clone)]
struct Op {
    at: usize,
    key: u8,
    value: Option<u8>,
    advance_ms: u64,
}

fn op() -> impl Strategy<Value = Op> {
    (
        0usize..5,
        0u8..6,
        prop::option::weighted(0.8, any::<u8>()),
        0u64..3000,
    )
        .prop_map(|(at, key, value, advance_ms)| Op {
            at,
            key,
            value,
            advance_ms,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// N replicas, random writes and deletes at random replicas with
    /// clocks skewed by up to ±5 min, each change pushed to random
    /// replicas in random order, some dropped and some duplicated; then
    /// anti-entropy. Every replica ends identical, holding for each key
    /// the write with the greatest stamp, and each replica's stamps only
    /// grew.
    #[test]
    fn replicas_converge_whatever_the_delivery(
        n in 2usize..6,
        skews in prop::collection::vec(-300_000i64..300_000, 5),
        ops in prop::collection::vec(op(), 1..60),
        seed in any::<u64>(),
        drop_pct in 0u32..60,
    ) {
        // Pairwise skew reaches 10 min: the allowed skew is set above it
        // (a stamp refused for skew is offered again later: the test
        // `a_stamp_from_the_future_is_refused_then_taken_in_time`).
        let max_skew = Duration::from_secs(11 * 60);
        let mut nodes: Vec<Node> = (0..n).map(|i| Node::new(i, skews[i], max_skew)).collect();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut now = START;
        let mut in_flight: Vec<(usize, Change)> = Vec::new();
        let mut made: Vec<Change> = Vec::new();
        let mut last_stamp: Vec<Option<Hlc>> = vec![None; n];
        for op in ops {
            now += op.advance_ms;
            let at = op.at % n;
            let wall = nodes[at].wall(now);
            let key = format!("k{}", op.key);
            let nd = &mut nodes[at];
            let c = nd
                .replica
                .write(&key, op.value.map(|v| vec![v]), &mut nd.clock, wall)
                .unwrap();
            if let Some(l) = last_stamp[at] {
                prop_assert!(c.hlc > l, "stamps of one replica only grow");
            }
            last_stamp[at] = Some(c.hlc);
            made.push(c.clone());
            for to in 0..n {
                if to == at || rng.random_range(0..100) < drop_pct {
                    continue;
                }
                for _ in 0..rng.random_range(1..=2) {
                    in_flight.push((to, c.clone()));
                }
            }
            // Deliver some of what is in flight, in random order.
            in_flight.shuffle(&mut rng);
            let k = rng.random_range(0..=in_flight.len());
            for (to, c) in in_flight.drain(..k) {
                let wall = nodes[to].wall(now);
                let nd = &mut nodes[to];
                let out = nd.replica.apply(vec![c], None, &mut nd.clock, wall);
                prop_assert!(out.refused.is_empty(), "{:?}", out.refused);
            }
        }
        // The rest arrive late (or never: anti-entropy stands in).
        for (to, c) in in_flight {
            if rng.random_bool(0.5) {
                let wall = nodes[to].wall(now);
                let nd = &mut nodes[to];
                nd.replica.apply(vec![c], None, &mut nd.clock, wall);
            }
        }
        anti_entropy(&mut nodes, now);
        let mut expected: BTreeMap<String, Change> = BTreeMap::new();
        for c in made {
            match expected.get(&c.key) {
                Some(cur) if !c.beats(cur) => {}
                _ => {
                    expected.insert(c.key.clone(), c);
                }
            }
        }
        for nd in &nodes {
            prop_assert_eq!(&nd.state(), &expected);
            prop_assert_eq!(nd.replica.covered(), nodes[0].replica.covered());
        }
    }
}

#[test]
fn a_member_that_missed_writes_gets_only_those() {
    let (mut a, mut b) = (
        Node::new(0, 0, DEFAULT_MAX_SKEW),
        Node::new(1, 0, DEFAULT_MAX_SKEW),
    );
    let mut now = START;
    for i in 0..50_000 {
        now += 1;
        let w = a.wall(now);
        a.replica
            .write(&format!("key/{i:05}"), Some(vec![1; 100]), &mut a.clock, w)
            .unwrap();
    }
    anti_entropy_pair(&mut a, &mut b, now);
    // b goes away; a takes 10,000 more writes (updates and new keys).
    for i in 0..10_000 {
        now += 1;
        let w = a.wall(now);
        a.replica
            .write(
                &format!("key/{:05}", i * 7),
                Some(vec![2; 100]),
                &mut a.clock,
                w,
            )
            .unwrap();
    }
    let full: usize = a.replica.entries().map(Change::wire_len).sum();
    let sent = anti_entropy_pair(&mut a, &mut b, now);
    assert_eq!(a.state(), b.state());
    assert_eq!(sent.0, 10_000, "only the missed writes travel");
    assert!(
        sent.1 * 5 <= full,
        "{} bytes for the catch-up, {full} for a full copy",
        sent.1
    );
}

/// Syncs a → b until done; returns (changes, bytes) sent.
fn anti_entropy_pair(a: &mut Node, b: &mut Node, now: u64) -> (usize, usize) {
    let (mut changes, mut bytes) = (0, 0);
    loop {
        let delta = a.replica.delta_for(b.replica.covered());
        changes += delta.changes.len();
        bytes += delta.changes.iter().map(Change::wire_len).sum::<usize>();
        let w = b.wall(now);
        let out = b
            .replica
            .apply(delta.changes, Some(&delta.covers), &mut b.clock, w);
        assert!(out.refused.is_empty());
        if !delta.more {
            return (changes, bytes);
        }
    }
}

#[test]
fn a_stamp_from_the_future_is_refused_then_taken_in_time() {
    // b's clock is 2 min ahead; a allows 1 min.
    let mut a = Node::new(0, 0, Duration::from_secs(60));
    let mut b = Node::new(1, 120_000, Duration::from_secs(60));
    let w = b.wall(START);
    let c = b
        .replica
        .write("pinned", Some(b"x".to_vec()), &mut b.clock, w)
        .unwrap();
    let before = a.clock.last();
    let delta = b.replica.delta_for(a.replica.covered());
    let w = a.wall(START);
    let out = a
        .replica
        .apply(delta.changes, Some(&delta.covers), &mut a.clock, w);
    assert!(matches!(
        out.refused.as_slice(),
        [(
            _,
            Refusal::FromTheFuture(FromTheFuture {
                ahead_ms: 120_000,
                ..
            })
        )]
    ));
    assert!(a.replica.get("pinned").is_none(), "nothing stored");
    assert!(a.replica.covered().is_empty(), "coverage held back");
    assert_eq!(a.clock.last(), before, "the clock was not dragged ahead");
    // A minute later (a's clock), the stamp is within the skew: the next
    // round takes it.
    let later = START + 61_000;
    let delta = b.replica.delta_for(a.replica.covered());
    let w = a.wall(later);
    let out = a
        .replica
        .apply(delta.changes, Some(&delta.covers), &mut a.clock, w);
    assert!(out.refused.is_empty());
    assert_eq!(a.replica.entry("pinned"), Some(&c));
}

#[test]
fn bad_changes_are_typed_refusals_and_change_nothing() {
    let mut a = Node::new(0, 0, DEFAULT_MAX_SKEW);
    let w = a.wall(START);
    let good = Change {
        key: "k".into(),
        value: Some(vec![1]),
        hlc: Hlc {
            ms: START,
            counter: 0,
            node: node(1),
        },
        seq: 1,
    };
    let cases = [
        (
            Change {
                key: String::new(),
                ..good.clone()
            },
            Refusal::BadKey,
        ),
        (
            Change {
                key: "x".repeat(MAX_KEY_LEN + 1),
                ..good.clone()
            },
            Refusal::BadKey,
        ),
        (
            Change {
                value: Some(vec![0; MAX_VALUE_LEN + 1]),
                ..good.clone()
            },
            Refusal::ValueTooLarge {
                len: MAX_VALUE_LEN + 1,
                max: MAX_VALUE_LEN,
            },
        ),
        (
            Change {
                seq: 0,
                ..good.clone()
            },
            Refusal::BadSeq,
        ),
        (
            Change {
                hlc: Hlc {
                    ms: START - 8 * 24 * 3600 * 1000,
                    ..good.hlc
                },
                ..good.clone()
            },
            Refusal::BeyondHorizon,
        ),
    ];
    for (c, why) in cases {
        let out = a.replica.apply(vec![c], None, &mut a.clock, w);
        assert_eq!(out.refused.len(), 1);
        assert_eq!(out.refused[0].1, why);
        assert!(a.replica.is_empty());
        assert!(a.replica.covered().is_empty());
    }
    // Writing locally refuses the same shapes.
    assert_eq!(
        a.replica.write("", Some(vec![]), &mut a.clock, w),
        Err(Refusal::BadKey)
    );
    // A replayed change is stale, not applied twice.
    let out = a.replica.apply(vec![good.clone()], None, &mut a.clock, w);
    assert_eq!(out.changed.len(), 1);
    let out = a.replica.apply(vec![good], None, &mut a.clock, w);
    assert_eq!((out.changed.len(), out.stale), (0, 1));
}

#[test]
fn a_full_namespace_refuses_new_keys_but_takes_updates() {
    let limits = ReplicaLimits {
        max_entries: 2,
        ..ReplicaLimits::default()
    };
    let mut r = Replica::new(node(0), limits);
    let mut clock = HlcClock::new(node(0), DEFAULT_MAX_SKEW);
    let w = Timestamp::from_millis(START);
    r.write("a", Some(vec![1]), &mut clock, w).unwrap();
    r.write("b", Some(vec![1]), &mut clock, w).unwrap();
    assert_eq!(
        r.write("c", Some(vec![1]), &mut clock, w),
        Err(Refusal::Full { max: 2 })
    );
    r.write("a", Some(vec![2]), &mut clock, w).unwrap();
    assert_eq!(r.get("a"), Some(&[2u8][..]));
}

#[test]
fn tombstones_go_once_every_member_has_them_or_past_the_horizon() {
    let mut a = Node::new(0, 0, DEFAULT_MAX_SKEW);
    let mut b = Node::new(1, 0, DEFAULT_MAX_SKEW);
    let c_id = node(2);
    let w = a.wall(START);
    a.replica
        .write("gone", Some(vec![1]), &mut a.clock, w)
        .unwrap();
    a.replica.write("gone", None, &mut a.clock, w).unwrap();
    anti_entropy_pair(&mut a, &mut b, START);
    a.replica.note_peer(node(1), b.replica.covered().clone());
    // c has not said what it holds: the tombstone stays.
    let members = [node(0), node(1), c_id];
    assert!(a.replica.collect(&members, w).is_empty());
    assert!(a.replica.entry("gone").is_some());
    // c says it has everything: it goes.
    a.replica.note_peer(c_id, b.replica.covered().clone());
    assert_eq!(a.replica.collect(&members, w), vec!["gone".to_owned()]);
    assert!(a.replica.entry("gone").is_none());
    // b, with c silent, collects it only past the horizon; then an old
    // copy of the key (from a member back after the horizon) is refused.
    assert!(b.replica.collect(&members, w).is_empty());
    let late = Timestamp::from_millis(START + 8 * 24 * 3600 * 1000);
    assert_eq!(b.replica.collect(&members, late), vec!["gone".to_owned()]);
    let old = Change {
        key: "gone".into(),
        value: Some(vec![1]),
        hlc: Hlc {
            ms: START,
            counter: 0,
            node: c_id,
        },
        seq: 1,
    };
    let out = b.replica.apply(vec![old], None, &mut b.clock, late);
    assert_eq!(out.refused[0].1, Refusal::BeyondHorizon);
    assert!(b.replica.get("gone").is_none());
}

#[test]
fn scans_by_prefix_skip_tombstones() {
    let mut a = Node::new(0, 0, DEFAULT_MAX_SKEW);
    let w = a.wall(START);
    for k in ["app/a", "app/b", "app/c", "apq", "other"] {
        a.replica.write(k, Some(vec![1]), &mut a.clock, w).unwrap();
    }
    a.replica.write("app/b", None, &mut a.clock, w).unwrap();
    let keys: Vec<&str> = a.replica.scan("app/").map(|c| c.key.as_str()).collect();
    assert_eq!(keys, ["app/a", "app/c"]);
}

#[test]
fn a_replica_that_lost_its_state_continues_its_sequence() {
    let mut a = Node::new(0, 0, DEFAULT_MAX_SKEW);
    let mut b = Node::new(1, 0, DEFAULT_MAX_SKEW);
    let w = a.wall(START);
    for i in 0..5 {
        a.replica
            .write(&format!("k{i}"), Some(vec![1]), &mut a.clock, w)
            .unwrap();
    }
    anti_entropy_pair(&mut a, &mut b, START);
    // a's storage is wiped; b's delta tells it how far it had got.
    let mut fresh = Node::new(0, 0, DEFAULT_MAX_SKEW);
    anti_entropy_pair(&mut b, &mut fresh, START + 1);
    let w = fresh.wall(START + 2);
    let c = fresh
        .replica
        .write("new", Some(vec![2]), &mut fresh.clock, w)
        .unwrap();
    assert_eq!(c.seq, 6, "no sequence number is used twice");
    assert!(c.hlc > b.replica.entry("k4").unwrap().hlc);
}

#[test]
fn forged_numbers_and_fake_origins_are_bounded() {
    let me = node(1);
    let mut r = Replica::new(
        me,
        ReplicaLimits {
            max_origins: 4,
            ..ReplicaLimits::default()
        },
    );
    let mut clock = HlcClock::new(me, DEFAULT_MAX_SKEW);
    let w = Timestamp::from_millis(START);
    let mk = |origin: NodeId, seq: u64, key: &str| Change {
        key: key.into(),
        value: Some(b"v".to_vec()),
        hlc: Hlc {
            ms: START,
            counter: 0,
            node: origin,
        },
        seq,
    };
    // A number no origin reaches, even in this node's own name: refused,
    // nothing moves (no overflow of the next number).
    let a = r.apply(vec![mk(me, u64::MAX, "k")], None, &mut clock, w);
    assert_eq!(a.refused.len(), 1);
    assert_eq!(r.last_own_seq(), 0);
    let covers: VersionVector = [(node(2), u64::MAX), (me, replica::MAX_SEQ + 1)]
        .into_iter()
        .collect();
    let a = r.apply(Vec::new(), Some(&covers), &mut clock, w);
    assert!(!a.covered_moved && r.covered().is_empty());
    // Losing changes from ever new origins stop at the origin limit.
    r.write(
        "k",
        Some(b"newest".to_vec()),
        &mut clock,
        Timestamp::from_millis(START + 10),
    )
    .unwrap();
    let fakes: Vec<Change> = (10..40).map(|i| mk(node(i), 5, "k")).collect();
    let a = r.apply(fakes, None, &mut clock, w);
    assert!(r.covered().len() <= 4, "{:?}", r.covered());
    assert!(!a.refused.is_empty());
    // Own changes above what is durable are not served.
    r.write(
        "k2",
        Some(b"x".to_vec()),
        &mut clock,
        Timestamp::from_millis(START + 20),
    )
    .unwrap();
    let d = r.delta_for_upto(&VersionVector::new(), 1);
    assert!(d.changes.iter().all(|c| c.origin() != me || c.seq <= 1));
    assert_eq!(d.covers.get(&me), Some(&1));
}

#[test]
fn a_second_change_under_a_number_already_taken_is_not_taken() {
    // Changes are stored under (origin, seq): a forged or buggy second
    // change with the same number must not stand beside the first (it
    // would overwrite its row on disk).
    let mut a = Node::new(1, 0, DEFAULT_MAX_SKEW);
    let mut b = Node::new(2, 0, DEFAULT_MAX_SKEW);
    let wall = a.wall(START);
    let first = a
        .replica
        .write("x", Some(b"1".to_vec()), &mut a.clock, wall)
        .unwrap();
    let out = b
        .replica
        .apply(vec![first.clone()], None, &mut b.clock, wall);
    assert_eq!(out.changed.len(), 1);
    let mut forged = first.clone();
    forged.key = "y".into();
    forged.hlc.ms += 10;
    let out = b.replica.apply(vec![forged], None, &mut b.clock, wall);
    assert!(out.changed.is_empty());
    assert_eq!(out.stale, 1);
    assert_eq!(b.replica.get("y"), None);
    assert!(b.replica.take_dropped().is_empty());
}

#[test]
fn superseded_and_collected_changes_are_handed_over_as_garbage() {
    let mut a = Node::new(1, 0, DEFAULT_MAX_SKEW);
    let wall = a.wall(START);
    let me = node(1);
    for v in [b"1", b"2", b"3"] {
        a.replica
            .write("k", Some(v.to_vec()), &mut a.clock, wall)
            .unwrap();
    }
    assert_eq!(a.replica.take_dropped(), vec![(me, 1), (me, 2)]);
    a.replica.write("k", None, &mut a.clock, wall).unwrap();
    assert_eq!(a.replica.take_dropped(), vec![(me, 3)]);
    // Alone, a tombstone is collected at once.
    assert_eq!(a.replica.collect(&[me], wall), vec!["k".to_owned()]);
    assert_eq!(a.replica.take_dropped(), vec![(me, 4)]);
    assert_eq!(a.replica.dropped_len(), 0);
}
