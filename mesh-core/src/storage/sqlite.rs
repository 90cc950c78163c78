//! SQLite storage: one file, WAL, versioned migrations.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OptionalExtension, params};

use super::{Storage, StorageError, Table, Visitor, Write};

/// Schema version this build writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 4;

/// Migrations, in order; migration `i` moves the schema from version `i` to `i + 1`.
const MIGRATIONS: &[fn(&rusqlite::Transaction<'_>) -> rusqlite::Result<()>] =
    &[migrate_v1, migrate_v2, migrate_v3, migrate_v4];

fn create_table(tx: &rusqlite::Transaction<'_>, name: &str) -> rusqlite::Result<()> {
    tx.execute_batch(&format!(
        "CREATE TABLE {name} (key TEXT PRIMARY KEY NOT NULL, body BLOB NOT NULL) WITHOUT ROWID;"
    ))
}

/// v1: one table per record kind.
fn migrate_v1(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    for name in [
        "devices",
        "pairing_requests",
        "discovered_nodes",
        "device_health",
        "device_exec_policies",
        "node_capabilities",
        "peers",
        "join_tokens",
        "actions",
    ] {
        create_table(tx, name)?;
    }
    Ok(())
}

/// v2: the `device_ids` index (hardware/app id → node id), filled from the
/// devices already paired.
fn migrate_v2(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    create_table(tx, "device_ids")?;
    tx.execute_batch(
        "INSERT INTO device_ids (key, body)
         SELECT json_extract(CAST(body AS TEXT), '$.device_id'),
                CAST(json_object('device_id', json_extract(CAST(body AS TEXT), '$.device_id'),
                                 'node', json_extract(CAST(body AS TEXT), '$.node')) AS BLOB)
         FROM devices;",
    )
}

/// Hands each `(key, body)` row to `visit`, borrowing SQLite's buffers.
fn visit_rows(mut rows: rusqlite::Rows<'_>, visit: &mut Visitor<'_>) -> Result<(), StorageError> {
    while let Some(row) = rows.next().map_err(backend)? {
        let key = row
            .get_ref(0)
            .and_then(|v| Ok(v.as_str()?))
            .map_err(backend)?;
        let body = row
            .get_ref(1)
            .and_then(|v| Ok(v.as_blob()?))
            .map_err(backend)?;
        visit(key, body)?;
    }
    Ok(())
}

/// v3: the audit ledger's records (mesh-ledger).
fn migrate_v3(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    create_table(tx, "ledger_records")
}

/// v4: the node's own state (`node_state`); a worker's primary link moves
/// there from `peers`, which is left to mesh members.
fn migrate_v4(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    create_table(tx, "node_state")?;
    tx.execute_batch(
        "INSERT INTO node_state (key, body) SELECT key, body FROM peers WHERE key = 'primary';
         DELETE FROM peers WHERE key = 'primary';",
    )
}

/// The embedded default storage.
///
/// * WAL journal: readers never block the writer, and a crash never leaves a
///   half-applied transaction.
/// * `synchronous = FULL`: a batch is on disk when [`Storage::apply`] returns,
///   so a revocation or token rotation survives power loss, not only a killed
///   process. (NORMAL would be faster and still crash-safe for the process, but
///   could lose the last commits on power loss.)
/// * Versioned migrations through `PRAGMA user_version`; a file from a newer
///   SDK is refused rather than misread.
/// * A new database file is created with mode 0600.
///
/// Reads of a file-backed database use a connection of their own (WAL lets
/// them run while a write commits), so a lookup — the registry gate on every
/// message — never waits behind another caller's fsync.
#[derive(Debug)]
pub struct SqliteStorage {
    /// The writer (and, in memory, the reader too).
    conn: Mutex<Connection>,
    /// Reads, for a file-backed database.
    reader: Option<Mutex<Connection>>,
    path: PathBuf,
}

fn backend(e: rusqlite::Error) -> StorageError {
    StorageError::Backend(e.to_string())
}

impl SqliteStorage {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StorageError> {
        let path = path.as_ref().to_owned();
        create_private(&path)?;
        let conn = Connection::open(&path).map_err(backend)?;
        let mut storage = Self::setup(conn, path)?;
        // Opened after the migrations, so it sees the current schema.
        let reader = Connection::open_with_flags(
            &storage.path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(backend)?;
        reader
            .busy_timeout(Duration::from_secs(5))
            .map_err(backend)?;
        storage.reader = Some(Mutex::new(reader));
        Ok(storage)
    }

    /// A private in-memory SQLite database (for tests of the SQL path).
    pub fn open_in_memory() -> Result<Self, StorageError> {
        let conn = Connection::open_in_memory().map_err(backend)?;
        Self::setup(conn, PathBuf::from(":memory:"))
    }

    fn setup(mut conn: Connection, path: PathBuf) -> Result<Self, StorageError> {
        conn.busy_timeout(Duration::from_secs(5)).map_err(backend)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(backend)?;
        if mode != "wal" && mode != "memory" {
            return Err(StorageError::Backend(format!(
                "cannot enable WAL (journal mode is {mode})"
            )));
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(backend)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(backend)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(backend)?;
        if version > SCHEMA_VERSION {
            return Err(StorageError::SchemaTooNew {
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        for (i, migrate) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
            let tx = conn.transaction().map_err(backend)?;
            migrate(&tx).map_err(backend)?;
            tx.pragma_update(None, "user_version", i as i64 + 1)
                .map_err(backend)?;
            tx.commit().map_err(backend)?;
        }
        Ok(SqliteStorage {
            conn: Mutex::new(conn),
            reader: None,
            path,
        })
    }

    pub(super) fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The connection reads use.
    fn read_conn(&self) -> MutexGuard<'_, Connection> {
        match &self.reader {
            Some(r) => r.lock().unwrap_or_else(PoisonError::into_inner),
            None => self.conn(),
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `PRAGMA integrity_check`; `Ok(())` when SQLite reports `ok`.
    pub fn integrity_check(&self) -> Result<(), StorageError> {
        let result: String = self
            .conn()
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(backend)?;
        if result == "ok" {
            Ok(())
        } else {
            Err(StorageError::Backend(format!(
                "integrity check failed: {result}"
            )))
        }
    }
}

#[cfg(unix)]
fn create_private(path: &Path) -> Result<(), StorageError> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StorageError::Backend(format!(
            "cannot create {}: {e}",
            path.display()
        ))),
    }
}

#[cfg(not(unix))]
fn create_private(_path: &Path) -> Result<(), StorageError> {
    Ok(())
}

impl Storage for SqliteStorage {
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let conn = self.read_conn();
        let mut stmt = conn
            .prepare_cached(&format!("SELECT body FROM {} WHERE key = ?1", table.name()))
            .map_err(backend)?;
        stmt.query_row(params![key], |r| r.get(0))
            .optional()
            .map_err(backend)
    }

    fn list(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        let mut out = Vec::new();
        self.scan(table, &mut |k, b| {
            out.push((k.to_owned(), b.to_vec()));
            Ok(())
        })?;
        Ok(out)
    }

    fn scan(&self, table: Table, visit: &mut Visitor<'_>) -> Result<(), StorageError> {
        let conn = self.read_conn();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT key, body FROM {} ORDER BY key",
                table.name()
            ))
            .map_err(backend)?;
        let rows = stmt.query([]).map_err(backend)?;
        visit_rows(rows, visit)
    }

    fn scan_range(
        &self,
        table: Table,
        start: &str,
        end: &str,
        limit: usize,
        visit: &mut Visitor<'_>,
    ) -> Result<(), StorageError> {
        let conn = self.read_conn();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT key, body FROM {} WHERE key >= ?1 AND key < ?2 ORDER BY key LIMIT ?3",
                table.name()
            ))
            .map_err(backend)?;
        // SQLite's LIMIT is a signed 64-bit integer.
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query(params![start, end, limit]).map_err(backend)?;
        visit_rows(rows, visit)
    }

    fn apply(&self, batch: &[Write]) -> Result<(), StorageError> {
        let mut conn = self.conn();
        // Dropping the transaction without commit rolls every write back.
        let tx = conn.transaction().map_err(backend)?;
        for w in batch {
            match w {
                Write::Put { table, key, body } => {
                    tx.prepare_cached(&format!(
                        "INSERT INTO {} (key, body) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET body = excluded.body",
                        table.name()
                    ))
                    .and_then(|mut s| s.execute(params![key, body]))
                    .map_err(backend)?;
                }
                Write::Insert { table, key, body } => {
                    let res = tx
                        .prepare_cached(&format!(
                            "INSERT INTO {} (key, body) VALUES (?1, ?2)",
                            table.name()
                        ))
                        .and_then(|mut s| s.execute(params![key, body]));
                    match res {
                        Ok(_) => {}
                        Err(rusqlite::Error::SqliteFailure(e, _))
                            if e.code == ErrorCode::ConstraintViolation =>
                        {
                            return Err(StorageError::AlreadyExists {
                                table: *table,
                                key: key.clone(),
                            });
                        }
                        Err(e) => return Err(backend(e)),
                    }
                }
                Write::Delete { table, key } => {
                    tx.prepare_cached(&format!("DELETE FROM {} WHERE key = ?1", table.name()))
                        .and_then(|mut s| s.execute(params![key]))
                        .map_err(backend)?;
                }
            }
        }
        tx.commit().map_err(backend)
    }
}
