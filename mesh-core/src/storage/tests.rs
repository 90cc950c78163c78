use super::*;

crate::storage_conformance_tests!(memory_conformance, crate::storage::MemoryStorage::new);

#[cfg(feature = "sqlite")]
crate::storage_conformance_tests!(sqlite_memory_conformance, || {
    crate::storage::SqliteStorage::open_in_memory().unwrap()
});

#[cfg(feature = "sqlite")]
crate::storage_conformance_tests!(sqlite_file_conformance, || {
    // Each store gets its own file; the directory lives until the process ends.
    let dir = Box::leak(Box::new(tempfile::tempdir().unwrap()));
    crate::storage::SqliteStorage::open(dir.path().join("mesh.db")).unwrap()
});

#[cfg(feature = "sqlite")]
mod sqlite_only {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn committed_writes_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.db");
        {
            let s = SqliteStorage::open(&path).unwrap();
            s.apply(&[Write::Put {
                table: Table::Devices,
                key: "k".into(),
                body: b"{}".to_vec(),
            }])
            .unwrap();
        }
        let s = SqliteStorage::open(&path).unwrap();
        assert_eq!(s.get(Table::Devices, "k").unwrap(), Some(b"{}".to_vec()));
        s.integrity_check().unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn migrating_v7_to_v8_rekeys_replicated_changes_as_a_log() {
        use crate::sync::store::{StoredChange, load, log_key};
        use crate::sync::{Change, Hlc};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.db");
        let me = crate::identity::NodeKey::from_secret_bytes(&[5; 32]).node_id();
        let change = Change {
            key: "a".into(),
            value: Some(b"1".to_vec()),
            hlc: Hlc {
                ms: 1_700_000_000_000,
                counter: 0,
                node: me,
            },
            seq: 3,
        };
        {
            let s = SqliteStorage::open(&path).unwrap();
            let Ok(Write::Put { body, .. }) = StoredChange {
                namespace: "config".into(),
                change: change.clone(),
            }
            .put() else {
                panic!("a put");
            };
            // A v7 row: keyed by namespace and key.
            s.with_writer(move |conn| {
                conn.execute(
                    "INSERT INTO replicated_entries (key, body) VALUES ('config:a', ?1)",
                    rusqlite::params![body],
                )
                .unwrap();
                conn.execute_batch(
                    "DROP TABLE file_transfers; DROP TABLE health_samples; PRAGMA user_version = 7;",
                )
                    .unwrap();
            })
            .unwrap();
        }
        let s = SqliteStorage::open(&path).unwrap();
        let keys: Vec<String> = s
            .list(Table::ReplicatedEntries)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, vec![log_key("config", &me, 3)]);
        let (changes, _) = load(&s, "config").unwrap();
        assert_eq!(changes, vec![change]);
    }

    #[test]
    fn migrating_v1_to_v2_backfills_the_device_id_index() {
        use crate::storage::records::DeviceIdRecord;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.db");
        let node = crate::identity::NodeKey::from_secret_bytes(&[4; 32]).node_id();
        {
            // Build a v1 file: the v1 tables, one device, a worker's primary
            // link in `peers`, user_version 1 (the migrations to v2, v3 and
            // v4 then add device_ids, ledger_records and node_state, and
            // move the link).
            let s = SqliteStorage::open(&path).unwrap();
            let link = crate::storage::records::PrimaryLinkRecord {
                primary: node,
                address: crate::transport::PeerAddr::Memory("p".into()),
                token: [3; 32],
                paired_at: crate::clock::Timestamp::from_millis(5),
            };
            let Ok(crate::storage::Write::Put { body: link, .. }) = link.put() else {
                panic!("a put");
            };
            s.with_writer(move |conn| {
            conn.execute_batch(
                "DROP TABLE device_ids; DROP TABLE ledger_records; DROP TABLE node_state;
                 DROP TABLE mesh_blocklist; DROP TABLE replicated_entries;
                 DROP TABLE replica_coverage; DROP TABLE delivery_outbox;
                 DROP TABLE delivery_inbox; DROP TABLE delivery_seq;
                 DROP TABLE delivery_relay; DROP TABLE file_transfers;
                 DROP TABLE health_samples; PRAGMA user_version = 1;",
            )
            .unwrap();
            conn.execute(
                "INSERT INTO peers (key, body) VALUES ('primary', ?1)",
                rusqlite::params![link],
            )
            .unwrap();
            let body =
                serde_json::json!({"node": node.to_string(), "device_id": "hw-old", "name": "Old"});
            conn.execute(
                "INSERT INTO devices (key, body) VALUES (?1, ?2)",
                rusqlite::params![node.to_string(), body.to_string().into_bytes()],
            )
            .unwrap();
            })
            .unwrap();
        }
        let s = SqliteStorage::open(&path).unwrap();
        let version: i64 = s
            .with_writer(|conn| conn.query_row("PRAGMA user_version", [], |r| r.get(0)))
            .unwrap()
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let moved: crate::storage::records::PrimaryLinkRecord = s.load("primary").unwrap().unwrap();
        assert_eq!(moved.token, [3; 32]);
        let left: i64 = s
            .with_writer(|conn| conn.query_row("SELECT count(*) FROM peers", [], |r| r.get(0)))
            .unwrap()
            .unwrap();
        assert_eq!(left, 0, "the link left the mesh members' table");
        let index: DeviceIdRecord = s.load("hw-old").unwrap().unwrap();
        assert_eq!(
            index,
            DeviceIdRecord {
                device_id: "hw-old".into(),
                node
            }
        );
        s.integrity_check().unwrap();
    }

    /// Drops the last handle of `s` (waiting for a helper thread that still
    /// holds a clone to let go), so the file is closed.
    fn close(mut s: std::sync::Arc<SqliteStorage>) {
        loop {
            match std::sync::Arc::try_unwrap(s) {
                Ok(store) => return drop(store),
                Err(back) => {
                    s = back;
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }
        }
    }

    /// Holds the writer thread inside a job until the returned sender is
    /// dropped (or sent to), so batches submitted meanwhile queue up.
    fn hold_writer(s: &std::sync::Arc<SqliteStorage>) -> std::sync::mpsc::Sender<()> {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started, is_started) = std::sync::mpsc::channel();
        let s2 = s.clone();
        std::thread::spawn(move || {
            s2.with_writer(move |_| {
                started.send(()).unwrap();
                let _ = held.recv();
            })
            .unwrap();
        });
        is_started.recv().unwrap();
        release
    }

    #[test]
    fn batches_queued_together_share_one_transaction_and_fail_alone() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(SqliteStorage::open(dir.path().join("mesh.db")).unwrap());
        s.apply(&[Write::Put {
            table: Table::Devices,
            key: "taken".into(),
            body: b"old".to_vec(),
        }])
        .unwrap();
        let before = s.write_stats();
        assert_eq!(
            before,
            WriteStats {
                transactions: 1,
                batches: 1
            }
        );

        let release = hold_writer(&s);
        let put = |key: String| Write::Put {
            table: Table::Actions,
            key,
            body: b"x".to_vec(),
        };
        let mut pending: Vec<_> = (0..100)
            .map(|i| s.submit(vec![put(format!("a{i:03}"))]))
            .collect();
        // One bad batch in the middle, and one that builds on it.
        let bad = s.submit(vec![
            put("b-first".into()),
            Write::Insert {
                table: Table::Devices,
                key: "taken".into(),
                body: b"new".to_vec(),
            },
        ]);
        let on_bad = s.submit(vec![
            Write::Require {
                table: Table::Actions,
                key: "b-first".into(),
            },
            put("b-second".into()),
        ]);
        pending.extend((100..200).map(|i| s.submit(vec![put(format!("a{i:03}"))])));
        drop(release);

        for p in pending {
            p.wait().unwrap();
        }
        assert!(matches!(
            bad.wait(),
            Err(StorageError::AlreadyExists { .. })
        ));
        assert!(matches!(on_bad.wait(), Err(StorageError::Missing { .. })));
        let after = s.write_stats();
        assert_eq!(after.batches - before.batches, 202);
        assert_eq!(
            after.transactions - before.transactions,
            1,
            "202 queued batches, one transaction (one fsync)"
        );
        assert_eq!(s.list(Table::Actions).unwrap().len(), 200);
        assert_eq!(s.get(Table::Actions, "b-first").unwrap(), None);
        assert_eq!(
            s.get(Table::Devices, "taken").unwrap(),
            Some(b"old".to_vec())
        );
        // Durable: a fresh open sees them all.
        close(s);
        let s = SqliteStorage::open(dir.path().join("mesh.db")).unwrap();
        assert_eq!(s.list(Table::Actions).unwrap().len(), 200);
    }

    /// A batch that fills the disk (here: the file's page cap) fails; every
    /// batch of its group is then reported exactly as it ended up on disk
    /// (`Ok` ones are there after a reopen, failed ones are not), whatever
    /// SQLite chose to roll back.
    #[test]
    fn a_full_disk_in_a_group_reports_every_batch_as_it_landed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.db");
        let s = std::sync::Arc::new(SqliteStorage::open(&path).unwrap());
        let pages: i64 = s
            .with_writer(|c| c.query_row("PRAGMA page_count", [], |r| r.get(0)))
            .unwrap()
            .unwrap();
        s.with_writer(move |c| c.pragma_update(None, "max_page_count", pages + 8))
            .unwrap()
            .unwrap();
        let put = |key: &str, len: usize| Write::Put {
            table: Table::Actions,
            key: key.into(),
            body: vec![7; len],
        };
        let release = hold_writer(&s);
        let keys = ["before", "huge", "after"];
        let pending: Vec<_> = [
            s.submit(vec![put(keys[0], 100)]),
            s.submit(vec![put(keys[1], 1 << 20)]),
            s.submit(vec![put(keys[2], 100)]),
        ]
        .into_iter()
        .collect();
        drop(release);
        let outcomes: Vec<bool> = pending.into_iter().map(|p| p.wait().is_ok()).collect();
        assert!(!outcomes[1], "the batch over the cap fails");
        close(s);
        let s = SqliteStorage::open(&path).unwrap();
        for (key, ok) in keys.iter().zip(&outcomes) {
            assert_eq!(
                s.get(Table::Actions, key).unwrap().is_some(),
                *ok,
                "{key}: reported {ok}, stored the opposite"
            );
        }
    }

    #[test]
    fn many_threads_writing_at_once_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(SqliteStorage::open(dir.path().join("mesh.db")).unwrap());
        let release = hold_writer(&s);
        let threads: Vec<_> = (0..16)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..20 {
                        s.apply(&[Write::Put {
                            table: Table::Actions,
                            key: format!("{t:02}/{i:02}"),
                            body: vec![t],
                        }])
                        .unwrap();
                    }
                })
            })
            .collect();
        // Let the threads queue their first batches behind the held writer
        // (two of sixteen are enough for the assertion below).
        std::thread::sleep(std::time::Duration::from_millis(100));
        drop(release);
        for t in threads {
            t.join().unwrap();
        }
        let stats = s.write_stats();
        assert_eq!(stats.batches, 320);
        assert!(
            stats.transactions < stats.batches,
            "concurrent writers share transactions: {stats:?}"
        );
        assert_eq!(s.list(Table::Actions).unwrap().len(), 320);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.db");
        drop(SqliteStorage::open(&path).unwrap());
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(conn);
        match SqliteStorage::open(&path) {
            Err(StorageError::SchemaTooNew { found, supported }) => {
                assert_eq!((found, supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn wal_and_full_sync_are_on() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStorage::open(dir.path().join("mesh.db")).unwrap();
        let (mode, sync, version) = s
            .with_writer(|conn| {
                let mode: String = conn
                    .query_row("PRAGMA journal_mode", [], |r| r.get(0))
                    .unwrap();
                let sync: i64 = conn
                    .query_row("PRAGMA synchronous", [], |r| r.get(0))
                    .unwrap();
                let version: i64 = conn
                    .query_row("PRAGMA user_version", [], |r| r.get(0))
                    .unwrap();
                (mode, sync, version)
            })
            .unwrap();
        assert_eq!((mode.as_str(), sync, version), ("wal", 2, SCHEMA_VERSION));
    }

    #[test]
    fn not_a_database_is_a_backend_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.db");
        std::fs::write(
            &path,
            b"this is not an SQLite database at all, just some text....",
        )
        .unwrap();
        assert!(matches!(
            SqliteStorage::open(&path),
            Err(StorageError::Backend(_))
        ));
    }
}

#[test]
fn action_states_are_typed_but_stored_as_their_text() {
    use crate::storage::records::ActionState;
    for s in ActionState::ALL {
        assert_eq!(ActionState::parse(s.as_str()), Some(s));
        // JSON and postcard carry the text, as records did before the type.
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            format!("\"{}\"", s.as_str())
        );
        assert_eq!(
            postcard::to_allocvec(&s).unwrap(),
            postcard::to_allocvec(s.as_str()).unwrap()
        );
        let back: ActionState =
            postcard::from_bytes(&postcard::to_allocvec(s.as_str()).unwrap()).unwrap();
        assert_eq!(back, s);
    }
    assert!(serde_json::from_str::<ActionState>("\"exploded\"").is_err());
    use ActionState::*;
    assert!(Proposed.can_become(Approved) && Approved.can_become(Executing));
    assert!(Executing.can_become(Executed) && Executing.can_become(Failed));
    assert!(Proposed.can_become(Rejected) && Proposed.can_become(Voided));
    assert!(
        !Proposed.can_become(Executed),
        "no running without approval"
    );
    assert!(!Executed.can_become(Proposed) && !Rejected.can_become(Approved));
    let finals: Vec<ActionState> = ActionState::ALL
        .into_iter()
        .filter(|s| s.is_final())
        .collect();
    assert_eq!(finals, vec![Executed, Failed, Rejected, Voided]);
}
