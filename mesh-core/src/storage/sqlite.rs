//! SQLite storage: one file, WAL, versioned migrations.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OptionalExtension, params};

use super::{Pending, Storage, StorageError, Table, Visitor, Write};

/// Schema version this build writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 10;

/// Migrations, in order; migration `i` moves the schema from version `i` to `i + 1`.
const MIGRATIONS: &[fn(&rusqlite::Transaction<'_>) -> rusqlite::Result<()>] = &[
    migrate_v1,
    migrate_v2,
    migrate_v3,
    migrate_v4,
    migrate_v5,
    migrate_v6,
    migrate_v7,
    migrate_v8,
    migrate_v9,
    migrate_v10,
];

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

/// v5: the mesh's blocklist. Member rows change shape (status,
/// incarnation, the signed identity); no build before v5 wrote any (the
/// table held only the worker's link, moved out in v4), so any left are
/// placeholders and are dropped.
fn migrate_v5(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    create_table(tx, "mesh_blocklist")?;
    tx.execute_batch("DELETE FROM peers;")
}

/// v6: replicated namespaces (`mesh-core::sync`): standing changes and
/// version vectors.
fn migrate_v6(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    create_table(tx, "replicated_entries")?;
    create_table(tx, "replica_coverage")
}

/// v7: reliable delivery (`mesh-core::delivery`): outbox, inbox, sequence
/// numbers, letters held as a relay.
fn migrate_v7(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    for t in [
        "delivery_outbox",
        "delivery_inbox",
        "delivery_seq",
        "delivery_relay",
    ] {
        create_table(tx, t)?;
    }
    Ok(())
}

/// v8: replicated changes are a log keyed `NAMESPACE:ORIGIN:SEQ` (was
/// `NAMESPACE:KEY`, one row per key): rows are re-keyed, bodies unchanged.
fn migrate_v8(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    use crate::storage::Record;
    let rows: Vec<(String, Vec<u8>)> = tx
        .prepare("SELECT key, body FROM replicated_entries")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    tx.execute_batch("DELETE FROM replicated_entries;")?;
    let mut insert = tx.prepare("INSERT INTO replicated_entries (key, body) VALUES (?1, ?2)")?;
    for (key, body) in rows {
        let change = super::decode::<crate::sync::store::StoredChange>(&key, &body)
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        insert.execute(params![change.key(), body])?;
    }
    Ok(())
}

/// v9: file transfers (`mesh-core::files`, `node::files`).
fn migrate_v9(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    create_table(tx, "file_transfers")
}

/// v10: health samples (`node::web`, the dashboard's charts).
fn migrate_v10(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    create_table(tx, "health_samples")
}

/// The embedded default storage.
///
/// * WAL journal: readers never block the writer, and a crash never leaves a
///   half-applied transaction.
/// * `synchronous = FULL`: a batch is on disk when [`Storage::apply`] returns
///   (or its [`Pending`] says `Ok`), so a revocation or token rotation
///   survives power loss, not only a killed process.
/// * **One writer thread with group commit** (file-backed databases): every
///   batch goes to a thread that owns the write connection. The batches
///   queued while it was flushing are committed together in one
///   transaction — one fsync for all of them — each inside its own
///   savepoint, so a batch that fails (an `Insert` on a taken key, a
///   `Require` not met) is rolled back alone and the others still commit.
///   Each caller hears of its batch only after the commit. Up to
///   [`MAX_GROUP`] batches share a transaction; a full queue
///   ([`QUEUE_DEPTH`] batches) makes `submit` wait (back-pressure).
/// * Reads use a connection of their own (WAL lets them run while a write
///   commits), so a lookup — the registry gate on every message — never
///   waits behind an fsync.
/// * Versioned migrations through `PRAGMA user_version`; a file from a newer
///   SDK is refused rather than misread.
/// * A new database file is created with mode 0600.
///
/// An in-memory database ([`SqliteStorage::open_in_memory`], for tests of
/// the SQL path) has one connection used in place.
#[derive(Debug)]
pub struct SqliteStorage {
    mode: Mode,
    path: PathBuf,
}

#[derive(Debug)]
enum Mode {
    /// In memory: one connection, writes applied in place.
    Direct(Mutex<Connection>),
    /// A file: the writer thread and the read connection.
    File {
        writer: Writer,
        reader: Mutex<Connection>,
    },
}

/// What the writer thread has done (see [`SqliteStorage::write_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Transactions committed (or tried): one disk flush each.
    pub transactions: u64,
    /// Batches those transactions carried, failed ones included.
    pub batches: u64,
}

#[derive(Debug, Default)]
struct Counters {
    transactions: AtomicU64,
    batches: AtomicU64,
}

/// Most batches one transaction of the writer commits.
pub const MAX_GROUP: usize = 512;
/// Batches queued for the writer before [`Storage::submit`] waits.
pub const QUEUE_DEPTH: usize = 4096;

/// What the writer thread is asked to do.
enum Job {
    /// Commit a batch, then say how it went.
    Batch {
        writes: Vec<Write>,
        done: SyncSender<Result<(), StorageError>>,
    },
    /// Run on the write connection between transactions (integrity checks,
    /// tests that edit the file under the SDK).
    Run(Box<dyn FnOnce(&mut Connection) + Send>),
}

/// The writer thread and its queue; dropping it lets the queue drain and
/// joins the thread (so the file is closed when the storage is).
struct Writer {
    queue: Option<SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
}

impl fmt::Debug for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writer").finish_non_exhaustive()
    }
}

impl Writer {
    fn start(conn: Connection) -> Result<Writer, StorageError> {
        let (queue, jobs) = sync_channel(QUEUE_DEPTH);
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let thread = std::thread::Builder::new()
            .name("mesh-storage-writer".into())
            .spawn(move || writer_loop(conn, jobs, &c))
            .map_err(|e| StorageError::Backend(format!("cannot start the storage writer: {e}")))?;
        Ok(Writer {
            queue: Some(queue),
            thread: Some(thread),
            counters,
        })
    }

    /// Queues a job; `Err` gives it back if the writer has stopped.
    fn send(&self, job: Job) -> Result<(), Job> {
        match &self.queue {
            Some(q) => q.send(job).map_err(|e| e.0),
            None => Err(job),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.queue = None;
        if let Some(thread) = self.thread.take() {
            // A panic in the writer has already failed its callers.
            let _ = thread.join();
        }
    }
}

/// A batch waiting in the writer, with where its outcome goes.
type Queued = (Vec<Write>, SyncSender<Result<(), StorageError>>);

/// The writer thread: takes a job, then whatever else is queued (up to
/// `MAX_GROUP` batches), and commits those batches in one transaction.
fn writer_loop(mut conn: Connection, jobs: Receiver<Job>, counters: &Counters) {
    let mut group: Vec<Queued> = Vec::with_capacity(MAX_GROUP);
    while let Ok(first) = jobs.recv() {
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                Job::Batch { writes, done } => group.push((writes, done)),
                Job::Run(f) => {
                    commit_group(&mut conn, &mut group, counters);
                    f(&mut conn);
                }
            }
            if group.len() < MAX_GROUP {
                next = jobs.try_recv().ok();
            }
        }
        commit_group(&mut conn, &mut group, counters);
    }
}

/// One transaction for the whole group, a savepoint per batch; answers
/// every batch after the commit.
fn commit_group(conn: &mut Connection, group: &mut Vec<Queued>, counters: &Counters) {
    if group.is_empty() {
        return;
    }
    counters.transactions.fetch_add(1, Ordering::Relaxed);
    counters
        .batches
        .fetch_add(group.len() as u64, Ordering::Relaxed);
    let mut outcomes = Vec::with_capacity(group.len());
    let committed = (|| {
        let mut tx = conn.transaction().map_err(backend)?;
        for (writes, _) in group.iter() {
            let mut sp = tx.savepoint().map_err(backend)?;
            let outcome = apply_writes(&sp, writes);
            match &outcome {
                Ok(()) => sp.commit().map_err(backend)?,
                // A failed batch is rolled back alone (ROLLBACK TO, then
                // RELEASE); if either fails, the whole group fails rather
                // than commit part of the batch.
                Err(_) => {
                    sp.rollback().map_err(backend)?;
                    sp.commit().map_err(backend)?;
                }
            }
            // Some errors (disk full, I/O, out of memory) make SQLite roll
            // the whole transaction back by itself: the batches before this
            // one are gone too, and nothing of the group may be reported
            // as committed.
            if tx.is_autocommit() {
                return Err(StorageError::Backend(format!(
                    "SQLite rolled the group's transaction back ({})",
                    outcome
                        .err()
                        .map_or_else(|| "no error".into(), |e| e.to_string())
                )));
            }
            outcomes.push(outcome);
        }
        tx.commit().map_err(backend)
    })();
    if let Err(e) = committed {
        outcomes = vec![Err(e); group.len()];
    }
    for ((_, done), outcome) in group.drain(..).zip(outcomes) {
        // The caller may have stopped waiting (dropped its `Pending`); the
        // batch's outcome stands either way.
        let _ = done.send(outcome);
    }
}

/// Applies a batch's writes on `conn` (inside the caller's transaction or
/// savepoint); the first failing write fails the batch.
fn apply_writes(conn: &Connection, batch: &[Write]) -> Result<(), StorageError> {
    for w in batch {
        match w {
            Write::Put { table, key, body } => {
                conn.prepare_cached(&format!(
                    "INSERT INTO {} (key, body) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET body = excluded.body",
                    table.name()
                ))
                .and_then(|mut s| s.execute(params![key, body]))
                .map_err(backend)?;
            }
            Write::Insert { table, key, body } => {
                let res = conn
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
                conn.prepare_cached(&format!("DELETE FROM {} WHERE key = ?1", table.name()))
                    .and_then(|mut s| s.execute(params![key]))
                    .map_err(backend)?;
            }
            Write::Require { table, key } => {
                let found = conn
                    .prepare_cached(&format!("SELECT 1 FROM {} WHERE key = ?1", table.name()))
                    .and_then(|mut s| s.exists(params![key]))
                    .map_err(backend)?;
                if !found {
                    return Err(StorageError::Missing {
                        table: *table,
                        key: key.clone(),
                    });
                }
            }
        }
    }
    Ok(())
}

fn backend(e: rusqlite::Error) -> StorageError {
    StorageError::Backend(e.to_string())
}

fn writer_gone() -> StorageError {
    StorageError::Backend("the storage writer has stopped".into())
}

impl SqliteStorage {
    /// Opens (creating if needed) the database at `path`, migrates it and
    /// starts its writer thread.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StorageError> {
        let path = path.as_ref().to_owned();
        create_private(&path)?;
        let conn = Connection::open(&path).map_err(backend)?;
        let conn = Self::setup(conn)?;
        // Opened after the migrations, so it sees the current schema.
        let reader = Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(backend)?;
        reader
            .busy_timeout(Duration::from_secs(5))
            .map_err(backend)?;
        Ok(SqliteStorage {
            mode: Mode::File {
                writer: Writer::start(conn)?,
                reader: Mutex::new(reader),
            },
            path,
        })
    }

    /// A private in-memory SQLite database (for tests of the SQL path).
    pub fn open_in_memory() -> Result<Self, StorageError> {
        let conn = Connection::open_in_memory().map_err(backend)?;
        Ok(SqliteStorage {
            mode: Mode::Direct(Mutex::new(Self::setup(conn)?)),
            path: PathBuf::from(":memory:"),
        })
    }

    fn setup(mut conn: Connection) -> Result<Connection, StorageError> {
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
        Ok(conn)
    }

    /// Runs `f` on the write connection, between the writer's
    /// transactions, and returns what it returns.
    pub(super) fn with_writer<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> R + Send + 'static,
    ) -> Result<R, StorageError> {
        match &self.mode {
            Mode::Direct(conn) => Ok(f(&mut conn.lock().unwrap_or_else(PoisonError::into_inner))),
            Mode::File { writer, .. } => {
                let (tx, rx) = sync_channel(1);
                writer
                    .send(Job::Run(Box::new(move |conn| {
                        // The caller waits on `rx` below.
                        let _ = tx.send(f(conn));
                    })))
                    .map_err(|_| writer_gone())?;
                rx.recv().map_err(|_| writer_gone())
            }
        }
    }

    /// The connection reads use.
    fn read_conn(&self) -> MutexGuard<'_, Connection> {
        match &self.mode {
            Mode::Direct(conn) => conn,
            Mode::File { reader, .. } => reader,
        }
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
    }

    /// Transactions and batches the writer thread has committed (all zero
    /// for an in-memory database, which has no writer). Batches per
    /// transaction is how much group commit saved.
    pub fn write_stats(&self) -> WriteStats {
        match &self.mode {
            Mode::Direct(_) => WriteStats::default(),
            Mode::File { writer, .. } => WriteStats {
                transactions: writer.counters.transactions.load(Ordering::Relaxed),
                batches: writer.counters.batches.load(Ordering::Relaxed),
            },
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `PRAGMA integrity_check`; `Ok(())` when SQLite reports `ok`.
    pub fn integrity_check(&self) -> Result<(), StorageError> {
        let result: String = self.with_writer(|conn| {
            conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))
                .map_err(backend)
        })??;
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
        match &self.mode {
            Mode::Direct(conn) => {
                let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
                // Dropping the transaction without commit rolls every write back.
                let tx = conn.transaction().map_err(backend)?;
                apply_writes(&tx, batch)?;
                tx.commit().map_err(backend)
            }
            Mode::File { .. } => self.submit(batch.to_vec()).wait(),
        }
    }

    fn submit(&self, batch: Vec<Write>) -> Pending {
        match &self.mode {
            Mode::Direct(_) => Pending::ready(self.apply(&batch)),
            Mode::File { writer, .. } => {
                let (done, outcome) = sync_channel(1);
                match writer.send(Job::Batch {
                    writes: batch,
                    done,
                }) {
                    Ok(()) => Pending::waiting(outcome),
                    Err(_) => Pending::ready(Err(writer_gone())),
                }
            }
        }
    }
}
