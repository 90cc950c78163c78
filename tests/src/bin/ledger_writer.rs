//! Appends to a SQLite-backed ledger until killed, in groups of
//! `LEDGER_GROUP` entries per transaction, printing `committed N` once the
//! group ending with entry number N (counted over every run) is durable.
//! Used by the ledger crash test.

use std::io::Write as _;
use std::sync::Arc;

use mesh_core::clock::{Clock, SystemClock};
use mesh_core::ledger::{Ledger, record_types};
use mesh_core::storage::{SqliteStorage, Storage};
use mesh_ledger::{LedgerConfig, SignedLedger};
use mesh_tests::{LEDGER_GROUP, ledger_entry, ledger_key};

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: ledger-writer DB_PATH");
        std::process::exit(2);
    };
    let store: Arc<dyn Storage> = match SqliteStorage::open(&path) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("cannot open {path}: {e}");
            std::process::exit(1);
        }
    };
    let key = Arc::new(ledger_key());
    let config = LedgerConfig::default().checkpoint_every(64);
    let ledger = match SignedLedger::open(store, key.clone(), config) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot open the ledger: {e}");
            std::process::exit(1);
        }
    };
    // Continue the numbering of entries (checkpoints are not entries).
    let mut next = match ledger.view().records(0, usize::MAX) {
        Ok(records) => records
            .iter()
            .filter(|r| r.record_type != record_types::CHECKPOINT)
            .count() as u64,
        Err(e) => {
            eprintln!("cannot read the ledger: {e}");
            std::process::exit(1);
        }
    };
    let mut out = std::io::stdout().lock();
    loop {
        let group = (next..next + LEDGER_GROUP)
            .map(|n| ledger_entry(n, key.node_id()))
            .collect();
        if let Err(e) = ledger.append(group, vec![], SystemClock.now()) {
            eprintln!("append failed: {e}");
            std::process::exit(1);
        }
        next += LEDGER_GROUP;
        // Acknowledged only after append returned.
        if writeln!(out, "committed {}", next - 1)
            .and_then(|()| out.flush())
            .is_err()
        {
            std::process::exit(0);
        }
    }
}
