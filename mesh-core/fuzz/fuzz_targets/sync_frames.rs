//! Arbitrary bytes as sync and delivery frames from a member: no input may
//! panic the decoders, a replica taking the changes, or a recipient or
//! relay taking a letter; a frame that parses re-encodes to bytes that
//! parse to the same frame.
#![no_main]

use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use mesh_core::clock::Timestamp;
use mesh_core::delivery::{DeliveryFrame, RelayLimits, RelayStore};
use mesh_core::identity::NodeKey;
use mesh_core::sync::{DEFAULT_MAX_SKEW, HlcClock, Replica, ReplicaLimits, SyncFrame};

struct State {
    key: NodeKey,
    replica: Replica,
    clock: HlcClock,
    relay: RelayStore,
}

fn state() -> &'static Mutex<State> {
    static STATE: OnceLock<Mutex<State>> = OnceLock::new();
    STATE.get_or_init(|| {
        let key = NodeKey::from_secret_bytes(&[1; 32]);
        let me = key.node_id();
        let mut limits = ReplicaLimits::default();
        limits.max_entries = 10_000;
        let mut relay_limits = RelayLimits::default();
        relay_limits.letters = 1000;
        Mutex::new(State {
            replica: Replica::new(me, limits),
            clock: HlcClock::new(me, DEFAULT_MAX_SKEW),
            relay: RelayStore::new(relay_limits),
            key,
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let now = Timestamp::from_millis(1_700_000_000_000);
    let Ok(mut s) = state().lock() else { return };
    let s = &mut *s;
    if let Ok(frame) = SyncFrame::decode(data) {
        assert_eq!(SyncFrame::decode(&frame.encode()).ok(), Some(frame.clone()));
        match frame {
            SyncFrame::Push { changes, .. } => {
                let _ = s.replica.apply(changes, None, &mut s.clock, now);
            }
            SyncFrame::Delta { delta, .. } => {
                let _ = s.replica.apply(delta.changes, Some(&delta.covers), &mut s.clock, now);
            }
            SyncFrame::Digest { vectors, .. } => {
                for (_, v) in vectors {
                    let _ = s.replica.delta_for(&v);
                    let _ = s.replica.pending_for(&v);
                }
            }
        }
    }
    if let Ok(frame) = DeliveryFrame::decode(data) {
        assert_eq!(DeliveryFrame::decode(&frame.encode()).ok(), Some(frame.clone()));
        if let DeliveryFrame::Deliver(letter) = frame {
            let _ = letter.open(&s.key);
            if s.relay.accept(letter, now).is_ok() && s.relay.len() > 900 {
                let _ = s.relay.expire(Timestamp::from_millis(u64::MAX));
            }
        }
    }
});
