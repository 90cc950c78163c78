//! kill -9 while a ledger appends in groups: after each crash every
//! acknowledged entry is present and intact, the ledger verifies from the
//! first record to the last, and the next run carries on from there.

use std::collections::BTreeSet;
use std::sync::Arc;

use mesh_core::ledger::{Body, record_types};
use mesh_core::storage::{SqliteStorage, Storage};
use mesh_ledger::{LedgerConfig, SignedLedger, verify_ledger};
use mesh_tests::{LEDGER_GROUP, ledger_key};

use crate::support::run_and_kill;

#[test]
fn sigkill_during_appends_loses_no_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let mut acknowledged_total = 0;
    for round in 1..=3u64 {
        let last = run_and_kill(env!("CARGO_BIN_EXE_ledger-writer"), &db, 400 * round);
        let last = last.expect("the writer acknowledged nothing");
        assert!(last + 1 >= acknowledged_total);
        acknowledged_total = last + 1;

        let store: Arc<dyn Storage> = Arc::new(SqliteStorage::open(&db).unwrap());
        let key = Arc::new(ledger_key());
        let report = verify_ledger(store.as_ref(), &key.node_id(), None).unwrap();
        assert!(report.ok(), "round {round}: {report:?}");
        // Reopening verifies again and rebuilds the tree.
        let ledger = SignedLedger::open(store, key, LedgerConfig::default()).unwrap();
        let records = ledger.view().records(0, usize::MAX).unwrap();
        assert_eq!(records.len() as u64, report.records);
        let mut entries = BTreeSet::new();
        for r in records
            .iter()
            .filter(|r| r.record_type != record_types::CHECKPOINT)
        {
            let Body::Json(j) = &r.body else {
                panic!("entry {} has a bytes body", r.seq)
            };
            let doc: serde_json::Value = serde_json::from_str(j.as_str()).unwrap();
            assert!(entries.insert(doc["n"].as_u64().unwrap()), "entry twice");
        }
        // Entries are numbered without gaps, whole groups only.
        let count = entries.len() as u64;
        assert_eq!(entries, (0..count).collect::<BTreeSet<_>>());
        assert_eq!(count % LEDGER_GROUP, 0, "a group was torn");
        assert!(
            count >= acknowledged_total,
            "round {round}: {count} entries, {acknowledged_total} acknowledged"
        );
    }
}
