//! Writes batches of records to an SQLite store until killed, printing
//! `committed N` after batch N is durably committed. Used by the crash test.

use std::io::Write as _;

use mesh_core::storage::{SqliteStorage, Storage, Table, Write};
use mesh_tests::{CRASH_BATCH, crash_key, crash_record};

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: crash-writer DB_PATH");
        std::process::exit(2);
    };
    let store = match SqliteStorage::open(&path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot open {path}: {e}");
            std::process::exit(1);
        }
    };
    let mut out = std::io::stdout().lock();
    for seq in 0u64.. {
        let batch: Vec<Write> = (0..CRASH_BATCH)
            .map(|part| Write::Put {
                table: Table::Actions,
                key: crash_key(seq, part),
                body: crash_record(seq, part).to_string().into_bytes(),
            })
            .collect();
        if let Err(e) = store.apply(&batch) {
            eprintln!("write failed: {e}");
            std::process::exit(1);
        }
        // Only after apply returned is the batch acknowledged.
        if writeln!(out, "committed {seq}")
            .and_then(|()| out.flush())
            .is_err()
        {
            std::process::exit(0);
        }
    }
}
