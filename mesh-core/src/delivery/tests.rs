use std::time::Duration;

use super::*;
use crate::clock::Timestamp;
use crate::identity::{NodeId, NodeKey};

fn key(i: u8) -> NodeKey {
    NodeKey::from_secret_bytes(&[i; 32])
}

fn at(ms: u64) -> Timestamp {
    Timestamp::from_millis(1_700_000_000_000 + ms)
}

fn letter(from: &NodeKey, to: &NodeId, seq: u64) -> Letter {
    Letter::seal(
        from,
        to,
        seq,
        1,
        Contents::Message(vec![1, 2, 3]),
        at(3_600_000).as_millis(),
    )
    .unwrap()
}

#[test]
fn the_seen_window_takes_each_number_once_in_any_order() {
    let mut w = SeenWindow::default();
    for seq in [3, 1, 2, 2, 5, 1, 4] {
        if w.check(seq) == Seen::New {
            w.take(seq);
        }
    }
    assert_eq!((w.upto, w.above.len()), (5, 0));
    assert_eq!(w.check(3), Seen::Duplicate);
    assert_eq!(w.check(6), Seen::New);
    // A full window takes the next number, not ones further ahead.
    let mut w = SeenWindow::default();
    for seq in 2..(2 + MAX_SEEN_AHEAD as u64) {
        w.take(seq);
    }
    assert_eq!(w.check(MAX_SEEN_AHEAD as u64 + 10), Seen::Later);
    assert_eq!(w.check(1), Seen::New);
    w.take(1);
    assert_eq!((w.upto, w.above.len()), (MAX_SEEN_AHEAD as u64 + 1, 0));
    // A gap the sender gave up (the letter expired) does not wedge the
    // window: its floor moves it on.
    let mut w = SeenWindow::default();
    for seq in 2..(2 + MAX_SEEN_AHEAD as u64) {
        w.take(seq);
    }
    let next = MAX_SEEN_AHEAD as u64 + 2;
    assert_eq!(w.check(next + 1), Seen::Later);
    w.advance(2);
    assert_eq!((w.upto, w.above.len()), (next - 1, 0));
    assert_eq!(w.check(next + 1), Seen::New);
}

#[test]
fn the_outbox_retries_with_growing_jittered_waits_and_uses_relays_when_direct_fails() {
    let (a, c) = (key(1), key(3));
    let relays = [key(2).node_id(), key(4).node_id(), key(5).node_id()];
    let mut out = Outbox::new(RetryConfig::default(), 7);
    let l = letter(&a, &c.node_id(), 1);
    out.add(l.clone(), false, at(0));
    let reachable = |n: &NodeId| *n == c.node_id();
    // Direct at first.
    let (sends, _) = out.due(at(0), &reachable, &relays);
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0].to, c.node_id());
    let mut waits = Vec::new();
    let mut last = at(0);
    let mut relayed = false;
    for _ in 0..8 {
        let next = out.next_due().unwrap();
        waits.push(next.saturating_duration_since(last));
        last = next;
        let (sends, _) = out.due(next, &reachable, &relays);
        relayed |= sends.iter().any(|s| relays.contains(&s.to));
        assert!(sends.iter().all(|s| s.letter.id == l.id));
    }
    assert!(relayed, "after the direct tries, relays get it too");
    // 500 ms × 2^n ± 25 %, capped at 30 s ± 25 %.
    for (n, w) in waits.iter().enumerate() {
        let exp = Duration::from_millis(500)
            .saturating_mul(1 << n)
            .min(Duration::from_secs(30));
        assert!(
            *w >= exp.mul_f64(0.74) && *w <= exp.mul_f64(1.26),
            "wait {n}: {w:?} vs {exp:?}"
        );
    }
    // Only a relay it was handed to can say it holds it; that slows
    // direct tries; the recipient's ack ends it.
    let before = out.next_due().unwrap();
    assert!(out.stored(&l.id, key(9).node_id(), last).is_none());
    assert_eq!(
        out.next_due().unwrap(),
        before,
        "a stranger's Stored changed nothing"
    );
    let holder = relays
        .iter()
        .find(|r| out.entries_relayed_to(&l.id).contains(r))
        .copied()
        .unwrap();
    assert!(out.stored(&l.id, holder, last).is_none());
    assert!(out.next_due().unwrap() >= last.saturating_add(Duration::from_secs(30)));
    assert!(out.acked(&l.id).is_some());
    assert!(out.is_empty());
    // An unreachable recipient: relays at once. A receipt is done once a
    // relay holds it.
    let r = Letter::seal(
        &a,
        &c.node_id(),
        2,
        2,
        Contents::Receipt(l.id),
        at(60_000).as_millis(),
    )
    .unwrap();
    out.add(r.clone(), true, at(0));
    let (sends, _) = out.due(at(0), &|_: &NodeId| false, &relays);
    assert_eq!(sends.len(), 2);
    assert!(sends.iter().all(|s| relays.contains(&s.to)));
    assert!(out.stored(&r.id, sends[0].to, at(1)).is_some());
    // Expired letters are dropped.
    out.add(letter(&a, &c.node_id(), 3), false, at(0));
    let (_, dropped) = out.due(at(3_600_001), &reachable, &relays);
    assert_eq!(dropped.len(), 1);
    assert!(out.is_empty());
}

#[test]
fn a_relay_holds_within_its_limits_and_drops_at_expiry() {
    let (a, c, d) = (key(1), key(3), key(4));
    let limits = RelayLimits {
        letters_per_recipient: 2,
        letters: 3,
        max_hold: Duration::from_secs(60),
        ..RelayLimits::default()
    };
    let mut relay = RelayStore::new(limits);
    assert_eq!(relay.accept(letter(&a, &c.node_id(), 1), at(0)), Ok(true));
    assert_eq!(relay.accept(letter(&a, &c.node_id(), 1), at(0)), Ok(false));
    assert_eq!(relay.accept(letter(&a, &c.node_id(), 2), at(0)), Ok(true));
    assert_eq!(
        relay.accept(letter(&a, &c.node_id(), 3), at(0)),
        Err(RelayRefusal::Full)
    );
    assert_eq!(relay.accept(letter(&a, &d.node_id(), 1), at(0)), Ok(true));
    assert_eq!(
        relay.accept(letter(&a, &d.node_id(), 2), at(0)),
        Err(RelayRefusal::Full),
        "the whole store is full"
    );
    assert_eq!(
        relay.accept(letter(&a, &d.node_id(), 2), at(3_600_001)),
        Err(RelayRefusal::Expired)
    );
    assert_eq!(relay.for_recipient(&c.node_id()).len(), 2);
    let first = LetterId::of(&a.node_id(), &c.node_id(), 1);
    assert!(relay.remove(&c.node_id(), &first));
    assert!(!relay.remove(&c.node_id(), &first));
    // Held at most max_hold, though the letters live an hour.
    assert!(relay.expire(at(59_000)).is_empty());
    assert_eq!(relay.expire(at(61_000)).len(), 2);
    assert!(relay.is_empty());
}

#[test]
fn delivery_frames_round_trip_and_bad_ones_are_refused() {
    let (a, c) = (key(1), key(3));
    let l = letter(&a, &c.node_id(), 1);
    for f in [
        DeliveryFrame::Deliver(l.clone()),
        DeliveryFrame::Ack(vec![l.id]),
        DeliveryFrame::Stored(vec![l.id]),
    ] {
        assert_eq!(DeliveryFrame::decode(&f.encode()).unwrap(), f);
    }
    let mut trailing = DeliveryFrame::Ack(vec![l.id]).encode();
    trailing.push(0);
    assert!(matches!(
        DeliveryFrame::decode(&trailing),
        Err(DeliveryFrameError::Malformed(_))
    ));
    assert_eq!(
        DeliveryFrame::decode(&DeliveryFrame::Ack(vec![l.id; MAX_IDS_PER_FRAME + 1]).encode()),
        Err(DeliveryFrameError::TooManyIds)
    );
    assert!(matches!(
        DeliveryFrame::decode(&vec![0; MAX_DELIVERY_FRAME_LEN + 1]),
        Err(DeliveryFrameError::TooLarge(_))
    ));
}

/// The seeds of the `sync_frames` fuzz target: one valid frame of each
/// kind. `WRITE_FUZZ_SEEDS=1 cargo test -p mesh-core --lib sync_fuzz_seeds`
/// writes them again after a format change.
#[test]
fn sync_fuzz_seeds_decode() {
    use crate::sync::{Change, Delta, Hlc, SyncFrame};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/sync_frames");
    let (a, c) = (key(2), key(1));
    let change = Change {
        key: "k".into(),
        value: Some(b"v".to_vec()),
        hlc: Hlc {
            ms: 1_700_000_000_000,
            counter: 0,
            node: a.node_id(),
        },
        seq: 1,
    };
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        (
            "push",
            SyncFrame::Push {
                namespace: "config".into(),
                changes: vec![change.clone()],
            }
            .encode(),
        ),
        (
            "digest",
            SyncFrame::Digest {
                vectors: vec![("config".into(), [(a.node_id(), 1)].into_iter().collect())],
                reply: true,
                all: true,
            }
            .encode(),
        ),
        (
            "delta",
            SyncFrame::Delta {
                namespace: "config".into(),
                delta: Delta {
                    changes: vec![change],
                    covers: [(a.node_id(), 1)].into_iter().collect(),
                    more: false,
                },
            }
            .encode(),
        ),
        (
            "deliver",
            DeliveryFrame::Deliver(letter(&a, &c.node_id(), 1)).encode(),
        ),
        (
            "ack",
            DeliveryFrame::Ack(vec![LetterId::of(&a.node_id(), &c.node_id(), 1)]).encode(),
        ),
    ];
    if std::env::var_os("WRITE_FUZZ_SEEDS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    for (name, _) in &seeds {
        let bytes = std::fs::read(dir.join(name)).unwrap_or_else(|_| {
            panic!("seed {name} missing: WRITE_FUZZ_SEEDS=1 cargo test -p mesh-core --lib sync_fuzz_seeds")
        });
        assert!(
            SyncFrame::decode(&bytes).is_ok() || DeliveryFrame::decode(&bytes).is_ok(),
            "seed {name} no longer decodes: WRITE_FUZZ_SEEDS=1 cargo test -p mesh-core --lib sync_fuzz_seeds"
        );
    }
}
