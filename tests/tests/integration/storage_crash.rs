//! kill -9 in the middle of writing: every acknowledged batch survives whole,
//! no batch is half there, and SQLite's integrity check passes.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use mesh_core::storage::{SqliteStorage, Storage, Table};
use mesh_tests::{CRASH_BATCH, checksum, crash_key};

#[test]
fn sigkill_during_writes_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("crash.db");
    for round in 0..3 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_crash-writer"))
            .arg(&db)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.strip_prefix("committed ") {
                    let _ = tx.send(n.parse::<u64>().unwrap());
                }
            }
        });
        // Let it commit a good number of batches (bounded wait), then kill -9.
        let mut last = None;
        while let Ok(n) = rx.recv_timeout(Duration::from_secs(30)) {
            last = Some(n);
            if n >= 150 * (round + 1) {
                break;
            }
        }
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        reader.join().unwrap();
        // Acknowledgements still in the pipe count too.
        while let Ok(n) = rx.try_recv() {
            last = Some(n);
        }
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
