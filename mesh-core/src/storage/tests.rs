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
            let conn = s.conn();
            conn.execute_batch(
                "DROP TABLE device_ids; DROP TABLE ledger_records; DROP TABLE node_state;
                 PRAGMA user_version = 1;",
            )
            .unwrap();
            let link = crate::storage::records::PrimaryLinkRecord {
                primary: node,
                address: crate::transport::PeerAddr::Memory("p".into()),
                token: [3; 32],
                paired_at: crate::clock::Timestamp::from_millis(5),
            };
            let Ok(crate::storage::Write::Put { body, .. }) = link.put() else {
                panic!("a put");
            };
            conn.execute(
                "INSERT INTO peers (key, body) VALUES ('primary', ?1)",
                rusqlite::params![body],
            )
            .unwrap();
            let body =
                serde_json::json!({"node": node.to_string(), "device_id": "hw-old", "name": "Old"});
            conn.execute(
                "INSERT INTO devices (key, body) VALUES (?1, ?2)",
                rusqlite::params![node.to_string(), body.to_string().into_bytes()],
            )
            .unwrap();
        }
        let s = SqliteStorage::open(&path).unwrap();
        let version: i64 = s
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let moved: crate::storage::records::PrimaryLinkRecord = s.load("primary").unwrap().unwrap();
        assert_eq!(moved.token, [3; 32]);
        let left: i64 = s
            .conn()
            .query_row("SELECT count(*) FROM peers", [], |r| r.get(0))
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
        let conn = s.conn();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
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
