//! kill -9 in the middle of writing: every acknowledged batch survives whole,
//! no batch is half there, and SQLite's integrity check passes.

use std::collections::BTreeMap;

use mesh_core::storage::{SqliteStorage, Storage, Table};
use mesh_tests::{CRASH_BATCH, checksum, crash_key};

use crate::support::run_and_kill;

#[test]
fn sigkill_during_writes_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("crash.db");
    for round in 0..3 {
        // Let it commit a good number of batches (bounded wait), then kill -9.
        let last = run_and_kill(env!("CARGO_BIN_EXE_crash-writer"), &db, 150 * (round + 1));
        let last = last.expect("the writer acknowledged no batch");

        let store = SqliteStorage::open(&db).unwrap();
        store.integrity_check().unwrap();
        let mut parts: BTreeMap<u64, usize> = BTreeMap::new();
        for (key, body) in store.list(Table::Actions).unwrap() {
            let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let seq = doc["seq"].as_u64().unwrap();
            let part = doc["part"].as_u64().unwrap() as usize;
            assert_eq!(key, crash_key(seq, part));
            assert_eq!(
                doc["check"],
                checksum(seq, part, doc["payload"].as_str().unwrap()),
                "torn record {key}"
            );
            *parts.entry(seq).or_default() += 1;
        }
        // Every batch present is whole.
        assert!(
            parts.values().all(|&n| n == CRASH_BATCH),
            "partial batch: {parts:?}"
        );
        // Every acknowledged batch is present: the writer restarts from 0 each
        // round and rewrites the same keys, so 0..=last must all be there.
        for seq in 0..=last {
            assert_eq!(
                parts.get(&seq),
                Some(&CRASH_BATCH),
                "acknowledged batch {seq} lost (round {round})"
            );
        }
    }
}
