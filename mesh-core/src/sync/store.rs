//! Replicated namespaces in storage: a log of changes, one row per change
//! under `NAMESPACE:ORIGIN:SEQ` (so a namespace is one key range, and a
//! node's own writes, numbered in order, append at the end of its origin's
//! range: a group of writes touches a few B-tree pages whatever keys it
//! writes), and one row per namespace for its version vector. The changes
//! a write or a sync produced and the vector they moved go in one batch,
//! so a crash leaves either both or neither.
//!
//! A change that stops standing (superseded by a newer write of its key,
//! or a tombstone collected) leaves a garbage row behind. Its deletion is
//! deferred and done in bulk ([`writes`]' `dropped`), when there is enough
//! of it that the deletes share pages; until then loading keeps the
//! newest change of each key ([`crate::sync::Replica::restore`]) and hands
//! the rest back as garbage, so a crash before the deletes loses nothing
//! and leaves nothing standing that should not.

use serde::{Deserialize, Serialize};

use super::replica::{Change, VersionVector};
use crate::identity::NodeId;
use crate::storage::{Record, Storage, StorageError, Table, Write};

/// The longest namespace name.
pub const MAX_NAMESPACE_LEN: usize = 64;

/// Whether `ns` is a namespace name: 1 to 64 of `a-z 0-9 - _ .`.
pub fn valid_namespace(ns: &str) -> bool {
    !ns.is_empty()
        && ns.len() <= MAX_NAMESPACE_LEN
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

/// The storage key of `origin`'s change `seq` in `ns` (`:` cannot occur
/// in a namespace or a node id's text; the number is fixed-width hex, so
/// key order is number order).
pub fn log_key(ns: &str, origin: &NodeId, seq: u64) -> String {
    format!("{ns}:{origin}:{seq:012x}")
}

/// One standing change of a namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredChange {
    /// The namespace.
    pub namespace: String,
    /// The change.
    pub change: Change,
}

impl Record for StoredChange {
    const TABLE: Table = Table::ReplicatedEntries;
    fn key(&self) -> String {
        log_key(&self.namespace, &self.change.origin(), self.change.seq)
    }
}

/// A namespace's version vector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCoverage {
    /// The namespace.
    pub namespace: String,
    /// Its vector.
    pub covered: VersionVector,
}

impl Record for StoredCoverage {
    const TABLE: Table = Table::ReplicaCoverage;
    fn key(&self) -> String {
        self.namespace.clone()
    }
}

/// The writes recording that `changed` now stand in `ns`, that the
/// changes `dropped` (origin, seq) no longer do, and, if given, the vector
/// `covered`.
pub fn writes(
    ns: &str,
    changed: &[Change],
    dropped: &[(NodeId, u64)],
    covered: Option<&VersionVector>,
) -> Result<Vec<Write>, StorageError> {
    let mut out = Vec::with_capacity(changed.len() + dropped.len() + 1);
    for c in changed {
        out.push(
            StoredChange {
                namespace: ns.to_owned(),
                change: c.clone(),
            }
            .put()?,
        );
    }
    for (origin, seq) in dropped {
        out.push(StoredChange::delete(&log_key(ns, origin, *seq)));
    }
    if let Some(covered) = covered {
        out.push(
            StoredCoverage {
                namespace: ns.to_owned(),
                covered: covered.clone(),
            }
            .put()?,
        );
    }
    Ok(out)
}

/// Loads `ns`'s stored changes (superseded ones not yet deleted
/// included) and vector.
pub fn load(storage: &dyn Storage, ns: &str) -> Result<(Vec<Change>, VersionVector), StorageError> {
    let start = format!("{ns}:");
    // ';' is the byte after ':': the range holds exactly the namespace.
    let end = format!("{ns};");
    let mut changes = Vec::new();
    let mut bad = None;
    storage.scan_range(
        Table::ReplicatedEntries,
        &start,
        &end,
        usize::MAX,
        &mut |key, body| {
            match crate::storage::decode::<StoredChange>(key, body) {
                Ok(s) if s.namespace == ns => changes.push(s.change),
                Ok(_) => {}
                Err(e) => bad = Some(e),
            }
            Ok(())
        },
    )?;
    if let Some(e) = bad {
        return Err(e);
    }
    let covered = crate::storage::StorageExt::load::<StoredCoverage>(storage, ns)?
        .map(|c| c.covered)
        .unwrap_or_default();
    Ok((changes, covered))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Timestamp;
    use crate::identity::NodeKey;
    use crate::storage::MemoryStorage;
    use crate::sync::{DEFAULT_MAX_SKEW, HlcClock, Replica, ReplicaLimits};

    #[test]
    fn namespace_names() {
        for ok in ["config", "app.rows-1", "a_b"] {
            assert!(valid_namespace(ok), "{ok}");
        }
        for bad in ["", "Config", "a:b", "a;b", "a/b", &"x".repeat(65)] {
            assert!(!valid_namespace(bad), "{bad}");
        }
    }

    #[test]
    fn a_namespace_round_trips_through_storage_and_stays_apart() {
        let me = NodeKey::from_secret_bytes(&[3; 32]).node_id();
        let store = MemoryStorage::new();
        let mut clock = HlcClock::new(me, DEFAULT_MAX_SKEW);
        let mut r = Replica::new(me, ReplicaLimits::default());
        let w = Timestamp::from_millis(1_700_000_000_000);
        let mut changed = Vec::new();
        for k in ["a", "b", "c"] {
            changed.push(
                r.write(k, Some(k.as_bytes().to_vec()), &mut clock, w)
                    .unwrap(),
            );
        }
        changed.push(r.write("b", None, &mut clock, w).unwrap());
        store
            .apply(&writes("config", &changed, &[], Some(r.covered())).unwrap())
            .unwrap();
        // Another namespace whose name extends this one's.
        store
            .apply(&writes("config2", &changed[..1], &[], None).unwrap())
            .unwrap();
        let (entries, covered) = load(&store, "config").unwrap();
        assert_eq!(entries.len(), 4, "the log keeps the superseded write of b");
        let mut back = Replica::restore(me, ReplicaLimits::default(), entries, covered);
        // The first write of b (seq 2) is garbage; the rest stand.
        assert_eq!(back.take_dropped(), vec![(me, 2)]);
        assert_eq!(
            back.entries().collect::<Vec<_>>(),
            r.entries().collect::<Vec<_>>()
        );
        assert_eq!(back.covered(), r.covered());
        let next = back.covered().get(&me).copied();
        assert_eq!(next, Some(4));
        let (other, _) = load(&store, "config2").unwrap();
        assert_eq!(other.len(), 1);
    }
}
