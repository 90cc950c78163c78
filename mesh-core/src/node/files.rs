//! Files between a primary and its devices, in the runtime (R-XFER1,
//! R-XFER3): content-addressed by BLAKE3, verified group by group as they
//! arrive, resumable after a dropped connection or a kill -9 of either
//! side without sending verified data again.
//!
//! Connections: protocol [`FILES`], which a primary serves to its paired,
//! unrevoked devices holding the `files:write` scope. A worker dials its
//! primary whenever it has a transfer with it (or the primary asks it to,
//! with the `files.connect` command over the session); the side holding a
//! file serves data streams, the receiving side opens them. Control
//! messages ([`FileFrame`]) ride the connection's message channel.
//!
//! A transfer:
//! 1. the sender hashes the file where it is (an outboard beside the
//!    node's files directory, no copy), stores the transfer, and offers it
//!    (`Offer`: id, root hash, size, name, whether zstd would pay);
//! 2. the receiver checks the offer (name, size, the sender's scope and
//!    policy: `files.send` like any command, `max_file_bytes`), stores it
//!    and accepts; it then asks for the groups it lacks on a fresh stream
//!    (up to 256 ranges per request), checks each 16 KiB group against
//!    the root hash before writing it at its offset in a partial file, and
//!    stores which groups it holds every 64 MiB (after an fsync);
//! 3. when every group is there, the partial file is renamed into the
//!    files directory under the offered name (a numbered suffix if taken)
//!    and the receiver says `Done`.
//!
//! After a crash the receiver re-hashes only what it wrote after the last
//! stored state (what verifies counts), and the sender offers again when
//! the connection is back; the receiver answers with what it holds.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{Notify, mpsc, watch};

use super::protocols::ProtocolHandler;
use super::{Core, NodeError, lock};
use crate::clock::Timestamp;
use crate::files::verify::{self, ReceiveError, Receiving, ServeError, Syncer};
use crate::files::{
    FILES, FileFrame, FileHash, GROUP_LEN, GroupSet, Offer, RangeRequest, TransferId, check_name,
    groups_of, numbered, refusals,
};
use crate::identity::NodeId;
use crate::storage::records::PrimaryLinkRecord;
use crate::storage::{Record, StorageExt, Table};
use crate::transport::{Connection, IncomingStream, RecvStream, SendStream, TransportError};

/// Where a node keeps received files, under its data directory.
pub const FILES_DIR: &str = "files";
/// The most ranges asked for in one request.
const RANGES_PER_REQUEST: usize = crate::files::wire::MAX_REQUEST_RANGES;
/// Bytes per piece handed between a stream and the blocking side.
const PIECE: usize = 64 * 1024;
/// Pieces in flight between a stream and the blocking side.
const PIECES: usize = 8;
/// The receiver stores which groups it holds this often (bytes).
const SAVE_EVERY: u64 = 64 << 20;
/// Progress is told (event, and a frame to the sender) this often (bytes).
const PROGRESS_EVERY: u64 = 1 << 20;
/// Data streams served at once, all peers together.
const SERVING: usize = 32;
/// Groups that fail to verify before the transfer fails (the sender lies).
const MAX_STRIKES: u32 = 3;
/// How long a primary waits for a device to dial back.
const DIAL_BACK: Duration = Duration::from_secs(10);
/// Data streams one peer may have served at once.
const SERVING_PER_PEER: usize = 16;
/// Incoming transfers not ended, per peer (the total is
/// [`FilesSettings::max_active`]).
const INCOMING_PER_PEER: usize = 16;
/// Offers a peer may make per second (and at once).
const OFFERS_PER_SECOND: f64 = 5.0;
const OFFER_BURST: u32 = 20;
const MAX_PEERS_TRACKED: usize = 4096;
/// The largest file anyone may offer (1 PiB): keeps every size
/// computation far from overflow.
const MAX_SIZE: u64 = 1 << 50;
/// Refusals of the connection in a row that end an outgoing transfer.
const MAX_REFUSALS: u32 = 4;
/// Disk space an incoming file must leave free.
const SPACE_MARGIN: u64 = 64 << 20;
/// Control messages from the peer waiting for a transfer's task.
const CONTROL_QUEUE: usize = 64;
/// Progress reports from the decoder waiting to be handled (beyond, a
/// report is dropped — the next supersedes it — but a stored state is
/// waited for).
const PROGRESS_QUEUE: usize = 16;
/// Ended transfers kept by default (in memory and stored).
const KEEP_ENDED: usize = 1024;
/// Why a data stream was reset by its server.
const RESET_BUSY: u32 = 1;
const RESET_BAD_REQUEST: u32 = 2;
const RESET_UNKNOWN: u32 = 3;
const RESET_ENDED: u32 = 4;

/// One of a peer's data streams being served (released when dropped).
struct PeerSlot<'a> {
    table: &'a Mutex<HashMap<NodeId, usize>>,
    peer: NodeId,
}

impl<'a> PeerSlot<'a> {
    fn take(table: &'a Mutex<HashMap<NodeId, usize>>, peer: NodeId, max: usize) -> Option<Self> {
        let mut t = lock(table);
        let n = t.entry(peer).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerSlot { table, peer })
    }
}

impl Drop for PeerSlot<'_> {
    fn drop(&mut self) {
        let mut t = lock(self.table);
        if let Some(n) = t.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                t.remove(&self.peer);
            }
        }
    }
}

/// How long a data stream may stall (nothing read or written) before it
/// is given up.
const STALL: Duration = Duration::from_secs(30);

/// Event kinds of file transfers.
pub mod file_events {
    /// A transfer moved: `{id, direction, peer, bytes, total}`.
    pub const PROGRESS: &str = "transfer.progress";
    /// A transfer finished: `{id, direction, peer, hash, name, size}`
    /// (and `path` on the receiving side).
    pub const DONE: &str = "transfer.done";
    /// A transfer failed: `{id, direction, peer, reason}`.
    pub const FAILED: &str = "transfer.failed";
    /// A transfer was cancelled: `{id, direction, peer, reason}`.
    pub const CANCELLED: &str = "transfer.cancelled";
    /// A file is coming in: `{id, peer, name, size, hash}`.
    pub const INCOMING: &str = "transfer.incoming";
}

/// Settings of file transfer.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FilesSettings {
    /// Where received files land (default: `DATA_DIR/files`); partial
    /// files and outboards are kept in `.partial` and `.outboard` inside.
    pub dir: PathBuf,
    /// Incoming transfers not ended (active or paused), from all peers
    /// together (default 64; 16 per peer at most). An offer beyond is
    /// refused `busy`, and its sender tries again later.
    pub max_active: usize,
    /// The largest file a worker takes from its primary (default 64 GiB);
    /// on a primary each device's policy (`max_file_bytes`) decides.
    pub max_file_bytes: u64,
    /// Ended transfers (done, failed, cancelled) kept in the list and the
    /// store, newest first (default 1,024); older ones are forgotten (their
    /// received files stay where they are).
    pub keep_ended: usize,
}

impl FilesSettings {
    /// Files in `dir`, defaults otherwise.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FilesSettings {
            dir: dir.into(),
            max_active: 64,
            max_file_bytes: 64 << 30,
            keep_ended: KEEP_ENDED,
        }
    }

    /// Sets how many ended transfers are kept.
    pub fn keep_ended(mut self, n: usize) -> Self {
        self.keep_ended = n;
        self
    }

    /// Sets how many incoming transfers may be under way at once.
    pub fn max_active(mut self, n: usize) -> Self {
        self.max_active = n.max(1);
        self
    }

    /// Sets the largest file a worker takes.
    pub fn max_file_bytes(mut self, n: u64) -> Self {
        self.max_file_bytes = n;
        self
    }
}

/// Why a file operation was refused or failed ([`NodeError::Files`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FilesErrorKind {
    /// No such file or transfer.
    NotFound,
    /// A bad argument (not a file, …).
    InvalidArgument,
    /// The file's name is not a plain, portable name.
    BadName,
    /// The peer may not take part (not paired, revoked, no `files:write`,
    /// its policy does not allow `files.send`, not this worker's primary).
    Forbidden,
    /// Larger than the policy or settings allow.
    TooLarge,
    /// A worker that is not paired has nobody to send to.
    NotPaired,
    /// The transfer has ended already.
    AlreadyEnded,
    /// The receiver takes no more transfers now.
    Busy,
}

impl FilesErrorKind {
    /// The stable code: `not_found`, `invalid_argument`, `bad_name`,
    /// `forbidden`, `too_large`, `not_paired`, `already_ended`, `busy`.
    pub fn as_str(self) -> &'static str {
        match self {
            FilesErrorKind::NotFound => "not_found",
            FilesErrorKind::InvalidArgument => "invalid_argument",
            FilesErrorKind::BadName => refusals::BAD_NAME,
            FilesErrorKind::Forbidden => refusals::FORBIDDEN,
            FilesErrorKind::TooLarge => refusals::TOO_LARGE,
            FilesErrorKind::NotPaired => "not_paired",
            FilesErrorKind::AlreadyEnded => "already_ended",
            FilesErrorKind::Busy => refusals::BUSY,
        }
    }
}

impl std::fmt::Display for FilesErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counters of file transfer since the node started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FilesStats {
    /// Bytes this node served on data streams (verified encoding: file
    /// bytes and hash pairs, before compression).
    pub bytes_served: u64,
    /// Bytes of groups this node took in verified.
    pub bytes_verified: u64,
    /// Groups refused because they did not match the file's hash.
    pub groups_rejected: u64,
}

#[derive(Debug, Default)]
struct Counters {
    served: std::sync::atomic::AtomicU64,
    verified: std::sync::atomic::AtomicU64,
    rejected: std::sync::atomic::AtomicU64,
}

/// Which way a transfer goes, seen from this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// To this node.
    In,
    /// From this node.
    Out,
}

impl Direction {
    /// `in` or `out`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }
}

/// Where a transfer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransferState {
    /// Moving, or about to.
    Active,
    /// Waiting for the peer to be reachable again.
    Paused,
    /// Every byte is there and verified.
    Done,
    /// Stopped by an error (see its `error`).
    Failed,
    /// Stopped by either side.
    Cancelled,
}

impl TransferState {
    /// `active`, `paused`, `done`, `failed` or `cancelled`.
    pub fn as_str(self) -> &'static str {
        match self {
            TransferState::Active => "active",
            TransferState::Paused => "paused",
            TransferState::Done => "done",
            TransferState::Failed => "failed",
            TransferState::Cancelled => "cancelled",
        }
    }

    /// Whether the transfer has ended (done, failed or cancelled).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TransferState::Done | TransferState::Failed | TransferState::Cancelled
        )
    }
}

/// A transfer as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TransferRecord {
    id: TransferId,
    direction: Direction,
    peer: NodeId,
    hash: FileHash,
    /// The offered name; on the receiving side, once done, the final one.
    name: String,
    size: u64,
    received: u64,
    state: TransferState,
    /// The file sent (out).
    source: Option<PathBuf>,
    /// Its modification time when it was hashed (ns since the epoch; 0 if
    /// unknown): a file changed since is not served.
    source_modified_ns: u64,
    /// The groups held verified (in).
    have: GroupSet,
    zstd: bool,
    error: Option<String>,
    /// Receiving side: the name claimed in the files directory just
    /// before the partial file was moved there (so a crash in between is
    /// recognised).
    placing: Option<String>,
    created_at: Timestamp,
    updated_at: Timestamp,
}

impl Record for TransferRecord {
    const TABLE: Table = Table::FileTransfers;
    fn key(&self) -> String {
        self.id.to_string()
    }
}

/// A transfer, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TransferInfo {
    /// Its id.
    pub id: TransferId,
    /// The file's BLAKE3 root hash.
    pub hash: FileHash,
    /// The file's name (on the receiving side once done: the name it got
    /// in the files directory).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Bytes the receiver holds verified.
    pub received: u64,
    /// Where it stands.
    pub state: TransferState,
    /// The other node.
    pub peer: NodeId,
    /// Which way.
    pub direction: Direction,
    /// Why it failed or was cancelled.
    pub error: Option<String>,
    /// Where the received file is, once done (receiving side).
    pub path: Option<PathBuf>,
}

/// Decides whether a device may exchange a file of `size` bytes with this
/// primary (paired, unrevoked, `files:write`, its policy allows
/// `files.send`): `Err((code, message))` if not. Blocking (records the
/// decision in the ledger).
pub(super) type FilesGate =
    Arc<dyn Fn(&NodeId, u64) -> Result<(), (FilesErrorKind, String)> + Send + Sync>;

/// Whether a peer may do something (a quick, blocking registry check).
pub(super) type PeerCheck = Arc<dyn Fn(&NodeId) -> bool + Send + Sync>;

/// The role's side of file transfer.
pub(super) enum FilesSide {
    /// A primary: who may connect at all (paired, unrevoked: asked at the
    /// handshake; a revocation or unpairing closes the connection at once),
    /// and the gate each file passes (on offer and on every resume).
    Primary {
        admit: PeerCheck,
        gate: FilesGate,
        media: PeerCheck,
    },
    /// A worker: only its primary.
    Worker,
}

impl FilesSide {
    /// A primary's check of a device for media (paired, unrevoked,
    /// `media:write`); blocking.
    pub(super) fn media_check(&self) -> Option<&PeerCheck> {
        match self {
            FilesSide::Primary { media, .. } => Some(media),
            FilesSide::Worker => None,
        }
    }
}

/// Control messages for a running transfer.
#[derive(Debug)]
enum Control {
    Accepted(u64),
    Refused(String, String),
    Progress(u64),
    Done,
    Cancelled(String),
    /// A connection to the peer is up (again).
    Connected,
}

struct Live {
    record: TransferRecord,
    stop: Arc<AtomicBool>,
    control: Option<mpsc::Sender<Control>>,
    /// Which task holds `control`.
    generation: u64,
    state: watch::Sender<TransferState>,
}

/// The file transfer runtime of a node.
pub(super) struct FilesRt {
    core: Arc<Core>,
    settings: FilesSettings,
    side: FilesSide,
    transfers: Mutex<BTreeMap<TransferId, Live>>,
    conns: Mutex<HashMap<NodeId, Arc<dyn Connection>>>,
    connected: Notify,
    serving: Arc<tokio::sync::Semaphore>,
    /// Data streams being served, per peer.
    serving_per_peer: Mutex<HashMap<NodeId, usize>>,
    counters: Arc<Counters>,
    /// Offers per peer (a token bucket each).
    offers: Mutex<crate::limits::KeyedLimiter<NodeId>>,
    persisting: tokio::sync::Mutex<()>,
    media: super::media::Media,
    /// Numbers the tasks driving transfers (a task ending clears only its
    /// own channel).
    generation: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for FilesRt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilesRt")
            .field("dir", &self.settings.dir)
            .finish_non_exhaustive()
    }
}

fn fail(message: impl Into<String>) -> NodeError {
    NodeError::Unavailable(message.into())
}

fn files_error(kind: FilesErrorKind, message: impl Into<String>) -> NodeError {
    NodeError::Files {
        kind,
        message: message.into(),
    }
}

/// Runs `f` off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, NodeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| fail(format!("a blocking task failed: {e}")))?
}

/// Builds the runtime: creates its directories, loads stored transfers and
/// resumes those not ended.
pub(super) fn build(
    core: &Arc<Core>,
    settings: FilesSettings,
    side: FilesSide,
) -> Result<Arc<FilesRt>, NodeError> {
    for d in [
        settings.dir.clone(),
        settings.dir.join(".partial"),
        settings.dir.join(".outboard"),
    ] {
        std::fs::create_dir_all(&d)
            .map_err(|e| fail(format!("cannot create {}: {e}", d.display())))?;
    }
    let stored: Vec<TransferRecord> = core.store.load_all()?;
    let rt = Arc::new(FilesRt {
        core: core.clone(),
        settings,
        side,
        transfers: Mutex::new(BTreeMap::new()),
        conns: Mutex::new(HashMap::new()),
        connected: Notify::new(),
        serving: Arc::new(tokio::sync::Semaphore::new(SERVING)),
        serving_per_peer: Mutex::new(HashMap::new()),
        counters: Arc::default(),
        offers: Mutex::new(crate::limits::KeyedLimiter::evicting(
            crate::limits::Rate::per_second(OFFERS_PER_SECOND, OFFER_BURST),
            MAX_PEERS_TRACKED,
        )),
        persisting: tokio::sync::Mutex::new(()),
        media: super::media::Media::default(),
        generation: std::sync::atomic::AtomicU64::new(0),
    });
    if matches!(rt.side, FilesSide::Primary { .. }) {
        // A device revoked or unpaired loses its files connection at once,
        // and its transfers fail.
        // (The two kinds exactly: `device.*` also carries a heartbeat event
        // per heartbeat of every device.)
        let mut revoked = core
            .events
            .subscribe(crate::events::kinds::DEVICE_REVOKED, 64)?;
        let mut unpaired = core
            .events
            .subscribe(crate::events::kinds::DEVICE_UNPAIRED, 64)?;
        let weak = Arc::downgrade(&rt);
        core.spawn(async move {
            loop {
                let got = tokio::select! {
                    r = revoked.recv() => r,
                    u = unpaired.recv() => u,
                };
                let Some(got) = got else { return };
                let Some(rt) = weak.upgrade() else { return };
                let gone: Vec<NodeId> = match got {
                    crate::events::Received::Event(e) => e.data["node"]
                        .as_str()
                        .and_then(|n| n.parse().ok())
                        .into_iter()
                        .collect(),
                    // Missed some: check every connection.
                    crate::events::Received::Lagged { .. } => {
                        let peers: Vec<NodeId> = lock(&rt.conns).keys().copied().collect();
                        let check = rt.clone();
                        tokio::task::spawn_blocking(move || {
                            peers.into_iter().filter(|p| !check.admits(p)).collect()
                        })
                        .await
                        .unwrap_or_default()
                    }
                };
                for peer in gone {
                    rt.drop_peer(&peer).await;
                }
            }
        });
    }
    for mut record in stored {
        if !record.state.is_final()
            && let FilesSide::Primary { admit, .. } = &rt.side
            && !admit(&record.peer)
        {
            // Revoked or unpaired while this node was down.
            record.state = TransferState::Failed;
            record.error = Some("the device is no longer paired".into());
            core.store.save(&record)?;
        }
        let resume = !record.state.is_final();
        let direction = record.direction;
        let id = record.id;
        rt.insert(record);
        if resume {
            match direction {
                Direction::In => rt.spawn_in(id),
                Direction::Out => rt.spawn_out(id),
            }
        }
    }
    Ok(rt)
}

/// The protocol handler ([`FILES`]).
pub(super) fn protocol(
    rt: &Arc<FilesRt>,
) -> (crate::transport::Protocol, Arc<dyn ProtocolHandler>) {
    (FILES, Arc::new(FilesService(Arc::downgrade(rt))))
}

struct FilesService(Weak<FilesRt>);

impl std::fmt::Debug for FilesService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FilesService")
    }
}

#[async_trait::async_trait]
impl ProtocolHandler for FilesService {
    fn admit(&self, peer: &NodeId) -> bool {
        self.0.upgrade().is_some_and(|rt| rt.admits(peer))
    }

    async fn serve(&self, conn: Arc<dyn Connection>) {
        match self.0.upgrade() {
            Some(rt) => rt.run_conn(conn).await,
            None => conn.close(),
        }
    }
}

impl FilesRt {
    pub(super) fn now(&self) -> Timestamp {
        self.core.now()
    }

    // ---- for the media side (node::media) ----------------------------------

    pub(super) fn side(&self) -> &FilesSide {
        &self.side
    }

    pub(super) fn media(&self) -> &super::media::Media {
        &self.media
    }

    pub(super) fn spawn_task(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.core.spawn(task);
    }

    pub(super) fn clock_handle(&self) -> impl Fn() -> Timestamp + Send + Sync + 'static {
        let core = self.core.clone();
        move || core.now()
    }

    pub(super) fn is_conn(&self, conn: &Arc<dyn Connection>) -> bool {
        lock(&self.conns)
            .get(&conn.remote_node())
            .is_some_and(|c| Arc::ptr_eq(c, conn))
    }

    fn admits(&self, peer: &NodeId) -> bool {
        match &self.side {
            // The gate's full check (scope, policy, size) runs per file;
            // here only who may connect at all.
            FilesSide::Primary { admit, .. } => admit(peer),
            // A worker serves nothing; its own connections are dialled.
            FilesSide::Worker => false,
        }
    }

    fn insert(&self, record: TransferRecord) {
        let (state, _) = watch::channel(record.state);
        lock(&self.transfers).insert(
            record.id,
            Live {
                record,
                stop: Arc::new(AtomicBool::new(false)),
                control: None,
                generation: 0,
                state,
            },
        );
    }

    fn record(&self, id: &TransferId) -> Option<TransferRecord> {
        lock(&self.transfers).get(id).map(|l| l.record.clone())
    }

    fn info(&self, r: &TransferRecord) -> TransferInfo {
        TransferInfo {
            id: r.id,
            hash: r.hash,
            name: r.name.clone(),
            size: r.size,
            received: r.received,
            state: r.state,
            peer: r.peer,
            direction: r.direction,
            error: r.error.clone(),
            path: (r.direction == Direction::In && r.state == TransferState::Done)
                .then(|| self.settings.dir.join(&r.name)),
        }
    }

    /// Changes transfer `id` with `f` and stores it (off the async
    /// threads); tells watchers of its state.
    async fn update(
        &self,
        id: TransferId,
        f: impl FnOnce(&mut TransferRecord),
    ) -> Result<TransferRecord, NodeError> {
        // One change stored at a time, in the order they were made.
        let _persisting = self.persisting.lock().await;
        let now = self.now();
        let record = {
            let mut all = lock(&self.transfers);
            let live = all.get_mut(&id).ok_or_else(|| {
                files_error(FilesErrorKind::NotFound, format!("no transfer {id}"))
            })?;
            if live.record.state.is_final() {
                // An ended transfer stays ended.
                return Err(files_error(
                    FilesErrorKind::AlreadyEnded,
                    format!("transfer {id} is {}", live.record.state.as_str()),
                ));
            }
            f(&mut live.record);
            live.record.updated_at = now;
            live.state.send_replace(live.record.state);
            live.record.clone()
        };
        let forget = if record.state.is_final() {
            self.oldest_ended()
        } else {
            Vec::new()
        };
        let store = self.core.store.clone();
        let stored = record.clone();
        blocking(move || {
            store.save(&stored)?;
            if !forget.is_empty() {
                let deletes: Vec<_> = forget
                    .iter()
                    .map(|id| TransferRecord::delete(&id.to_string()))
                    .collect();
                store.apply(&deletes)?;
            }
            Ok(())
        })
        .await?;
        Ok(record)
    }

    /// Takes out of the table the ended transfers beyond the newest
    /// `keep_ended` (a peer that sends many small files does not grow it
    /// for ever); returns their ids, to delete from the store.
    fn oldest_ended(&self) -> Vec<TransferId> {
        let mut all = lock(&self.transfers);
        let mut ended: Vec<(Timestamp, TransferId)> = all
            .values()
            .filter(|l| l.record.state.is_final())
            .map(|l| (l.record.updated_at, l.record.id))
            .collect();
        let keep = self.settings.keep_ended;
        if ended.len() <= keep {
            return Vec::new();
        }
        ended.sort();
        let excess = ended.len() - keep;
        ended
            .into_iter()
            .take(excess)
            .map(|(_, id)| {
                all.remove(&id);
                id
            })
            .collect()
    }

    pub(super) fn publish(&self, kind: &str, data: serde_json::Value) {
        self.core.events.publish(kind, self.now(), data);
    }

    // ---- connections -----------------------------------------------------

    fn conn(&self, peer: &NodeId) -> Option<Arc<dyn Connection>> {
        lock(&self.conns).get(peer).cloned()
    }

    /// Serves one files connection until it ends: control messages and
    /// data streams.
    async fn run_conn(self: Arc<Self>, conn: Arc<dyn Connection>) {
        let peer = conn.remote_node();
        if let Some(old) = lock(&self.conns).insert(peer, conn.clone()) {
            old.close();
        }
        self.connected.notify_waiters();
        self.tell_peer(&peer, || Control::Connected);
        loop {
            tokio::select! {
                msg = conn.recv() => match msg {
                    Ok(bytes) => match FileFrame::decode(&bytes) {
                        Ok(frame) => self.on_frame(&peer, &conn, frame).await,
                        Err(_) => break,
                    },
                    Err(_) => break,
                },
                stream = conn.accept_stream() => match stream {
                    Ok(IncomingStream::Bi(send, recv)) => {
                        let rt = self.clone();
                        self.core.spawn(async move { rt.serve_stream(peer, send, recv).await });
                    }
                    Ok(IncomingStream::Uni(recv)) => {
                        let rt = self.clone();
                        self.core.spawn(async move { rt.on_media_group(peer, recv).await });
                    }
                    Err(_) => break,
                },
            }
        }
        conn.close();
        let mut conns = lock(&self.conns);
        if conns.get(&peer).is_some_and(|c| Arc::ptr_eq(c, &conn)) {
            conns.remove(&peer);
        }
    }

    /// `peer` may no longer take part: its connection closes and its
    /// transfers fail.
    async fn drop_peer(self: &Arc<Self>, peer: &NodeId) {
        if let Some(conn) = lock(&self.conns).remove(peer) {
            conn.close();
        }
        let ids: Vec<TransferId> = lock(&self.transfers)
            .values()
            .filter(|l| l.record.peer == *peer && !l.record.state.is_final())
            .map(|l| l.record.id)
            .collect();
        for id in ids {
            self.end(
                id,
                TransferState::Failed,
                Some("the device was revoked or unpaired".into()),
            )
            .await;
        }
    }

    /// Sends `make()` to every running transfer with `peer`.
    fn tell_peer(&self, peer: &NodeId, make: impl Fn() -> Control) {
        for live in lock(&self.transfers).values() {
            if live.record.peer == *peer
                && let Some(c) = &live.control
            {
                let _ = c.try_send(make());
            }
        }
    }

    pub(super) async fn send_frame(conn: &Arc<dyn Connection>, frame: &FileFrame) -> bool {
        conn.send(frame.encode()).await.is_ok()
    }

    /// A worker: a connection to its primary (dialled if there is none).
    async fn dial_primary(self: &Arc<Self>) -> Result<Arc<dyn Connection>, NodeError> {
        let store = self.core.store.clone();
        let link = blocking(move || Ok(store.load::<PrimaryLinkRecord>("primary")?))
            .await?
            .ok_or_else(|| files_error(FilesErrorKind::NotPaired, "this worker is not paired"))?;
        if let Some(c) = self.conn(&link.primary) {
            return Ok(c);
        }
        let mut last = None;
        for transport in &self.core.transports {
            match transport.connect(link.primary, &link.address, FILES).await {
                Ok(conn) => {
                    let conn: Arc<dyn Connection> = Arc::from(conn);
                    let rt = self.clone();
                    let serving = conn.clone();
                    self.core.spawn(async move { rt.run_conn(serving).await });
                    // Registered by run_conn; wait until it is.
                    for _ in 0..100 {
                        if self.conn(&link.primary).is_some() {
                            break;
                        }
                        tokio::task::yield_now().await;
                    }
                    return Ok(conn);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(TransportError::Refused(m)) => files_error(FilesErrorKind::Forbidden, m),
            Some(e) => fail(format!("cannot reach the primary for files: {e}")),
            None => fail("no transport"),
        })
    }

    /// A connection to `peer`: an open one, or (a worker) dialled, or (a
    /// primary) asked of the device over its session.
    pub(super) async fn connect(
        self: &Arc<Self>,
        peer: &NodeId,
    ) -> Result<Arc<dyn Connection>, NodeError> {
        if let Some(c) = self.conn(peer) {
            return Ok(c);
        }
        match self.side {
            FilesSide::Worker => self.dial_primary().await,
            FilesSide::Primary { .. } => {
                let session = self
                    .core
                    .sessions
                    .get(peer)
                    .ok_or(NodeError::NotConnected(*peer))?;
                let waiting = self.connected.notified();
                tokio::pin!(waiting);
                waiting.as_mut().enable();
                self.core
                    .call(&session, "files.connect", &json!({}), None)
                    .await?;
                let deadline = tokio::time::Instant::now() + DIAL_BACK;
                loop {
                    if let Some(c) = self.conn(peer) {
                        return Ok(c);
                    }
                    if tokio::time::timeout_at(deadline, waiting.as_mut())
                        .await
                        .is_err()
                    {
                        return Err(NodeError::Timeout(DIAL_BACK));
                    }
                    waiting.set(self.connected.notified());
                    waiting.as_mut().enable();
                }
            }
        }
    }

    // ---- control messages ------------------------------------------------

    async fn on_frame(
        self: &Arc<Self>,
        peer: &NodeId,
        conn: &Arc<dyn Connection>,
        frame: FileFrame,
    ) {
        let (id, control) = match frame {
            FileFrame::Offer(offer) => {
                self.on_offer(peer, conn, offer).await;
                return;
            }
            FileFrame::MediaOpen(open) => {
                self.on_media_open(peer, conn, open).await;
                return;
            }
            FileFrame::MediaClose { stream_id } => {
                self.on_media_close(peer, stream_id);
                return;
            }
            FileFrame::MediaRefuse { stream_id, message } => {
                self.publish(
                    "media.refused",
                    json!({ "peer": peer.to_string(), "stream_id": stream_id, "message": message }),
                );
                return;
            }
            FileFrame::Accept { id, received } => (id, Control::Accepted(received)),
            FileFrame::Refuse { id, code, message } => (id, Control::Refused(code, message)),
            FileFrame::Progress { id, received } => (id, Control::Progress(received)),
            FileFrame::Done { id } => (id, Control::Done),
            FileFrame::Cancel { id, reason } => (id, Control::Cancelled(reason)),
        };
        // A peer speaks only of its own transfers.
        let all = lock(&self.transfers);
        if let Some(live) = all.get(&id)
            && live.record.peer == *peer
        {
            if let Some(c) = &live.control {
                // Full: the peer talks faster than the transfer's task
                // listens; what is dropped is superseded (progress) or
                // re-sent (offers), and a cancel still stops it below.
                if let Err(mpsc::error::TrySendError::Full(Control::Cancelled(reason))) =
                    c.try_send(control)
                {
                    live.stop.store(true, Ordering::Relaxed);
                    drop(all);
                    let rt = self.clone();
                    self.core.spawn(async move {
                        rt.end(id, TransferState::Cancelled, Some(reason)).await
                    });
                }
            } else if let Control::Cancelled(reason) = control {
                // Not running (paused, or ended): still take a cancel.
                drop(all);
                let rt = self.clone();
                self.core
                    .spawn(async move { rt.end(id, TransferState::Cancelled, Some(reason)).await });
            }
        }
    }

    /// The receiving side of an offer.
    async fn on_offer(self: &Arc<Self>, peer: &NodeId, conn: &Arc<dyn Connection>, offer: Offer) {
        let refuse = |code: &str, message: String| FileFrame::Refuse {
            id: offer.id,
            code: code.to_owned(),
            message,
        };
        if let Some(known) = self.record(&offer.id) {
            let answer = if known.peer != *peer
                || known.direction != Direction::In
                || known.hash != offer.hash
                || known.size != offer.size
            {
                refuse(refusals::FORBIDDEN, "not this transfer".into())
            } else {
                match known.state {
                    TransferState::Done => FileFrame::Done { id: offer.id },
                    TransferState::Failed | TransferState::Cancelled => FileFrame::Cancel {
                        id: offer.id,
                        reason: known.error.unwrap_or_else(|| "ended".into()),
                    },
                    TransferState::Active | TransferState::Paused => {
                        // Resuming passes the gate again (the device's scope
                        // or policy may have changed since).
                        match self.gate_again(peer, known.size).await {
                            Ok(()) => {
                                self.spawn_in(offer.id);
                                FileFrame::Accept {
                                    id: offer.id,
                                    received: known.received,
                                }
                            }
                            Err((code, message)) => {
                                let reason = format!("refused on resuming ({code}): {message}");
                                self.end(offer.id, TransferState::Failed, Some(reason))
                                    .await;
                                refuse(&code, message)
                            }
                        }
                    }
                }
            };
            Self::send_frame(conn, &answer).await;
            return;
        }
        if let Err((code, message)) = self.check_offer(peer, &offer).await {
            Self::send_frame(conn, &refuse(&code, message)).await;
            return;
        }
        let now = self.now();
        let record = TransferRecord {
            id: offer.id,
            direction: Direction::In,
            peer: *peer,
            hash: offer.hash,
            name: offer.name.clone(),
            size: offer.size,
            received: 0,
            state: TransferState::Active,
            source: None,
            source_modified_ns: 0,
            have: GroupSet::new(),
            zstd: offer.zstd,
            error: None,
            placing: None,
            created_at: now,
            updated_at: now,
        };
        let store = self.core.store.clone();
        let stored = record.clone();
        if blocking(move || Ok(store.save(&stored)?)).await.is_err() {
            Self::send_frame(
                conn,
                &refuse(
                    refusals::BUSY,
                    "the receiver cannot store the transfer".into(),
                ),
            )
            .await;
            return;
        }
        self.insert(record);
        self.publish(
            file_events::INCOMING,
            json!({
                "id": offer.id.to_string(),
                "peer": peer.to_string(),
                "name": offer.name,
                "size": offer.size,
                "hash": offer.hash.to_string(),
            }),
        );
        Self::send_frame(
            conn,
            &FileFrame::Accept {
                id: offer.id,
                received: 0,
            },
        )
        .await;
        self.spawn_in(offer.id);
    }

    /// A primary: the gate for `peer` and a file of `size` bytes, again.
    async fn gate_again(&self, peer: &NodeId, size: u64) -> Result<(), (String, String)> {
        match &self.side {
            FilesSide::Primary { gate, .. } => {
                let (gate, peer) = (gate.clone(), *peer);
                tokio::task::spawn_blocking(move || gate(&peer, size))
                    .await
                    .map_err(|e| (refusals::BUSY.to_owned(), e.to_string()))?
                    .map_err(|(kind, message)| (kind.as_str().to_owned(), message))
            }
            FilesSide::Worker => Ok(()),
        }
    }

    /// Whether this node takes `offer` from `peer`.
    async fn check_offer(&self, peer: &NodeId, offer: &Offer) -> Result<(), (String, String)> {
        if !lock(&self.offers).try_take(peer, self.now()) {
            return Err((
                refusals::BUSY.into(),
                "too many offers; try again later".into(),
            ));
        }
        if let Err(e) = check_name(&offer.name) {
            return Err((refusals::BAD_NAME.into(), e.to_string()));
        }
        if offer.size > MAX_SIZE {
            return Err((
                refusals::TOO_LARGE.into(),
                format!("{} bytes is over any limit ({MAX_SIZE})", offer.size),
            ));
        }
        let (mine, all) = {
            let transfers = lock(&self.transfers);
            let open = transfers
                .values()
                .filter(|l| l.record.direction == Direction::In && !l.record.state.is_final());
            let (mut mine, mut all) = (0, 0);
            for l in open {
                all += 1;
                if l.record.peer == *peer {
                    mine += 1;
                }
            }
            (mine, all)
        };
        if mine >= INCOMING_PER_PEER || all >= self.settings.max_active {
            return Err((
                refusals::BUSY.into(),
                format!("{mine} transfers from this peer ({all} in all) are under way already"),
            ));
        }
        match &self.side {
            FilesSide::Primary { gate, .. } => {
                let (gate, peer, size) = (gate.clone(), *peer, offer.size);
                tokio::task::spawn_blocking(move || gate(&peer, size))
                    .await
                    .map_err(|e| (refusals::BUSY.to_owned(), e.to_string()))?
                    .map_err(|(kind, message)| (kind.as_str().to_owned(), message))?;
            }
            FilesSide::Worker => {
                if lock(&self.conns).get(peer).is_none() {
                    return Err((
                        refusals::FORBIDDEN.into(),
                        "not this worker's primary".into(),
                    ));
                }
                if offer.size > self.settings.max_file_bytes {
                    return Err((
                        refusals::TOO_LARGE.into(),
                        format!(
                            "{} bytes; this worker takes at most {}",
                            offer.size, self.settings.max_file_bytes
                        ),
                    ));
                }
            }
        }
        // Room for the file and its outboard (about 1/256 of it), and a
        // margin so a full disk does not stop the rest of the node.
        let dir = self.settings.dir.clone();
        let needed = offer.size + offer.size / 256 + SPACE_MARGIN;
        match blocking(move || Ok(free_space(&dir))).await {
            Ok(Some(free)) if free < needed => Err((
                refusals::NO_SPACE.into(),
                format!("{needed} bytes needed, {free} free on the receiver's disk"),
            )),
            _ => Ok(()),
        }
    }

    // ---- receiving -------------------------------------------------------

    /// Starts (or resumes) pulling transfer `id`, unless it runs already.
    fn spawn_in(self: &Arc<Self>, id: TransferId) {
        self.drive(id, Direction::In);
    }

    /// Starts the task that drives transfer `id` (pulls it in, or offers
    /// and serves it out) unless one runs already; a transfer that fails
    /// in it ends.
    fn drive(self: &Arc<Self>, id: TransferId, direction: Direction) {
        let (tx, rx) = mpsc::channel(CONTROL_QUEUE);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        {
            let mut all = lock(&self.transfers);
            let Some(live) = all.get_mut(&id) else { return };
            if live.control.as_ref().is_some_and(|c| !c.is_closed()) {
                return;
            }
            live.control = Some(tx);
            live.generation = generation;
        }
        let rt = self.clone();
        self.core.spawn(async move {
            let outcome = match direction {
                Direction::In => rt.pull(id, rx).await,
                Direction::Out => rt.push(id, rx).await,
            };
            if let Some(live) = lock(&rt.transfers).get_mut(&id)
                && live.generation == generation
            {
                live.control = None;
            }
            if let Err((state, reason)) = outcome {
                rt.end(id, state, Some(reason)).await;
            }
        });
    }

    fn paths(&self, id: &TransferId) -> (PathBuf, PathBuf) {
        let base = self.settings.dir.join(".partial");
        (
            base.join(format!("{id}.part")),
            base.join(format!("{id}.obao")),
        )
    }

    /// Pulls transfer `id` until it is whole (then done) or ends.
    async fn pull(
        self: &Arc<Self>,
        id: TransferId,
        mut control: mpsc::Receiver<Control>,
    ) -> Result<(), (TransferState, String)> {
        let failed = |m: String| (TransferState::Failed, m);
        let record = self.record(&id).ok_or_else(|| failed("gone".into()))?;
        let (part, outboard) = self.paths(&id);
        let mut strikes = 0u32;
        let mut backoff = Duration::from_millis(100);
        let (hash, size) = (record.hash, record.size);
        let total = groups_of(size);
        // What is on disk beyond what was stored (after a crash).
        let known = record.have.clone();
        let placing = record.placing.clone();
        let dir = self.settings.dir.clone();
        let found = blocking(move || {
            if !part.exists() {
                if let Some(name) = placing
                    && dir.join(&name).exists()
                {
                    // Moved into place just before a crash.
                    return Ok(Err(name));
                }
                // Gone (or never made): nothing on disk is verified.
                let _ = std::fs::remove_file(&outboard);
                let rx = Receiving::open(&part, &outboard, hash, size)
                    .map_err(|e| fail(format!("cannot open the partial file: {e}")))?;
                drop(rx);
                return Ok(Ok(GroupSet::new()));
            }
            let rx = Receiving::open(&part, &outboard, hash, size)
                .map_err(|e| fail(format!("cannot open the partial file: {e}")))?;
            let found = rx
                .recover(&known)
                .map_err(|e| fail(format!("cannot read the partial file: {e}")))?;
            // Durable before the state that names it.
            rx.sync()
                .map_err(|e| fail(format!("cannot sync the partial file: {e}")))?;
            Ok(Ok(found))
        })
        .await
        .map_err(|e| failed(e.to_string()))?;
        let found = match found {
            Ok(found) => found,
            Err(name) => {
                let record = self
                    .update(id, |r| {
                        r.state = TransferState::Done;
                        r.name.clone_from(&name);
                        r.received = size;
                        r.have = GroupSet::from_ranges([(0, total)]);
                    })
                    .await
                    .map_err(|e| failed(e.to_string()))?;
                self.told_done(&record).await;
                return Ok(());
            }
        };
        if found != record.have {
            let received = received_bytes(&found, size);
            let _ = self
                .update(id, |r| {
                    r.have = found.clone();
                    r.received = received;
                })
                .await;
        }
        loop {
            let record = self.record(&id).ok_or_else(|| failed("gone".into()))?;
            if record.state.is_final() {
                return Ok(());
            }
            if size == 0 || record.have.covers(total) {
                if self.finish(id).await.map_err(failed)? {
                    return Ok(());
                }
                continue;
            }
            let Some(conn) = self.conn(&record.peer) else {
                let _ = self.update(id, |r| r.state = TransferState::Paused).await;
                // Wait for the sender to come back (it offers again).
                loop {
                    match control.recv().await {
                        Some(Control::Connected) => break,
                        Some(Control::Cancelled(reason)) => {
                            return Err((TransferState::Cancelled, reason));
                        }
                        Some(_) => {}
                        None => return Ok(()),
                    }
                }
                continue;
            };
            if record.state == TransferState::Paused {
                let _ = self.update(id, |r| r.state = TransferState::Active).await;
            }
            let missing = record.have.missing(total, RANGES_PER_REQUEST);
            match self.request(&conn, &record, missing, &mut control).await {
                Ok(()) => {}
                Err(Pulled::Cancelled(reason)) => return Err((TransferState::Cancelled, reason)),
                Err(Pulled::Lied(group)) => {
                    self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                    strikes += 1;
                    self.publish(
                        crate::events::kinds::POLICY_VIOLATION,
                        json!({
                            "device": record.peer.to_string(),
                            "reason": "file_hash_mismatch",
                            "message": format!("transfer {id}: group {group} does not match the file's hash"),
                        }),
                    );
                    if strikes >= MAX_STRIKES {
                        return Err(failed(format!(
                            "the sender sent {strikes} groups that do not match the file's hash"
                        )));
                    }
                }
                Err(Pulled::Disk(e)) => return Err(failed(format!("writing the file: {e}"))),
                Err(Pulled::Refused(code)) => {
                    // The sender does not know the transfer, or ended it.
                    return Err(failed(format!(
                        "the sender refused the data stream (code {code})"
                    )));
                }
                Err(Pulled::Stream) => {
                    // This stream failed (the sender busy, the connection
                    // going): the connection is left to its own fate (other
                    // transfers share it); ask again after a pause, or
                    // wait for the peer if the connection is gone.
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        c = control.recv() => if let Some(Control::Cancelled(reason)) = c {
                            return Err((TransferState::Cancelled, reason));
                        },
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
            backoff = Duration::from_millis(100);
        }
    }

    /// One request for `missing` on a fresh stream of `conn`, and its
    /// answer taken in.
    async fn request(
        self: &Arc<Self>,
        conn: &Arc<dyn Connection>,
        record: &TransferRecord,
        missing: Vec<(u64, u64)>,
        control: &mut mpsc::Receiver<Control>,
    ) -> Result<(), Pulled> {
        let id = record.id;
        let (mut send, mut recv) = conn.open_bi(0).await.map_err(|_| Pulled::Stream)?;
        let request = RangeRequest {
            id,
            hash: record.hash,
            groups: missing.clone(),
            zstd: record.zstd,
        };
        send.write_all(&request.encode())
            .await
            .map_err(|_| Pulled::Stream)?;
        let _ = send.finish().await;
        // Bytes from the stream to the blocking decoder, a few pieces at a
        // time (backpressure: the stream is not read faster than the disk
        // takes it).
        let (pieces_tx, pieces_rx) = mpsc::channel::<Vec<u8>>(PIECES);
        // The reset code the sender ended the stream with, if it did.
        let reset = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let reset_seen = reset.clone();
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; PIECE];
            loop {
                match tokio::time::timeout(STALL, recv.read(&mut buf)).await {
                    Ok(Ok(Some(n))) => {
                        if pieces_tx.send(buf[..n].to_vec()).await.is_err() {
                            recv.stop(0);
                            return;
                        }
                    }
                    Ok(Err(crate::transport::StreamError::Reset(code))) => {
                        reset_seen.store(code, Ordering::Relaxed);
                        return;
                    }
                    // A sender that stalls is given up on.
                    Err(_) => {
                        recv.stop(0);
                        return;
                    }
                    Ok(Ok(None) | Err(_)) => return,
                }
            }
        });
        let stop = lock(&self.transfers)
            .get(&id)
            .map(|l| l.stop.clone())
            .unwrap_or_default();
        let (part, outboard) = self.paths(&id);
        let (hash, size, zstd) = (record.hash, record.size, record.zstd);
        let mut have = record.have.clone();
        let (progress_tx, mut progress_rx) = mpsc::channel::<(GroupSet, u64, bool)>(PROGRESS_QUEUE);
        let stop_flag = stop.clone();
        let counters = self.counters.clone();
        let taking = tokio::task::spawn_blocking(move || -> Result<(), ReceiveError> {
            let mut rx =
                Receiving::open(&part, &outboard, hash, size).map_err(ReceiveError::Disk)?;
            let input = Pieces::new(pieces_rx);
            let mut received = received_bytes(&have, size);
            let (mut since_save, mut since_progress) = (0u64, 0u64);
            let mut on_group = |rx: &Syncer, g: u64, len: u64| -> bool {
                have.insert(g);
                received += len;
                counters.verified.fetch_add(len, Ordering::Relaxed);
                since_save += len;
                since_progress += len;
                if since_save >= SAVE_EVERY {
                    since_save = 0;
                    since_progress = 0;
                    // Durable data and outboard before the state that
                    // names them.
                    if rx.sync().is_ok() {
                        let _ = progress_tx.blocking_send((have.clone(), received, true));
                    }
                } else if since_progress >= PROGRESS_EVERY {
                    since_progress = 0;
                    // Superseded by the next one: dropped rather than
                    // waited for when the queue is full.
                    let _ = progress_tx.try_send((have.clone(), received, false));
                }
                !stop_flag.load(Ordering::Relaxed)
            };
            let result = if zstd {
                let mut decoder =
                    zstd::stream::read::Decoder::new(input).map_err(ReceiveError::Disk)?;
                // A sender cannot make this side hold a large window (level
                // 1 needs 2^19 at most).
                decoder.window_log_max(21).map_err(ReceiveError::Disk)?;
                take_with(&mut rx, &missing, decoder, &mut on_group)
            } else {
                take_with(&mut rx, &missing, input, &mut on_group)
            };
            let synced = rx.sync();
            let _ = progress_tx.blocking_send((have.clone(), received, synced.is_ok()));
            result
        });
        tokio::pin!(taking);
        let outcome = loop {
            tokio::select! {
                done = &mut taking => break done,
                Some((have, received, save)) = progress_rx.recv() => {
                    self.progressed(id, have, received, save).await;
                }
                Some(c) = control.recv() => {
                    // A new offer or connection while this request runs
                    // changes nothing; a cancel stops it.
                    if let Control::Cancelled(reason) = c {
                        stop.store(true, Ordering::Relaxed);
                        // Nothing more is taken from the decoder: it must
                        // not wait for room.
                        progress_rx.close();
                        // The reader first: its end ends the decoder's
                        // input, so the blocking side returns.
                        reader.abort();
                        let _ = (&mut taking).await;
                        return Err(Pulled::Cancelled(reason));
                    }
                }
            }
        };
        while let Ok((have, received, save)) = progress_rx.try_recv() {
            self.progressed(id, have, received, save).await;
        }
        reader.abort();
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(ReceiveError::Mismatch { group })) => Err(Pulled::Lied(group)),
            Ok(Err(ReceiveError::Disk(e))) => Err(Pulled::Disk(e.to_string())),
            Ok(Err(ReceiveError::Stopped)) => Err(Pulled::Cancelled("cancelled".into())),
            Ok(Err(_)) => match reset.load(Ordering::Relaxed) {
                code @ (RESET_UNKNOWN | RESET_ENDED | RESET_BAD_REQUEST) => {
                    Err(Pulled::Refused(code))
                }
                _ => Err(Pulled::Stream),
            },
            Err(e) => Err(Pulled::Disk(e.to_string())),
        }
    }

    /// The receiver moved: remember (stored if `save`), tell the sender and
    /// the app.
    async fn progressed(&self, id: TransferId, have: GroupSet, received: u64, save: bool) {
        let record = if save {
            self.update(id, |r| {
                r.have = have;
                r.received = received;
            })
            .await
            .ok()
        } else {
            let mut all = lock(&self.transfers);
            all.get_mut(&id).map(|l| {
                l.record.received = received;
                l.record.clone()
            })
        };
        let Some(record) = record else { return };
        if let Some(conn) = self.conn(&record.peer) {
            let _ = conn
                .send(FileFrame::Progress { id, received }.encode())
                .await;
        }
        self.publish(
            file_events::PROGRESS,
            json!({
                "id": id.to_string(),
                "direction": "in",
                "peer": record.peer.to_string(),
                "bytes": received,
                "total": record.size,
            }),
        );
    }

    /// Every group is there: the file moves into place under its name.
    /// `Ok(false)`: the partial file was not whole after all; the transfer
    /// goes on from nothing verified.
    async fn finish(self: &Arc<Self>, id: TransferId) -> Result<bool, String> {
        let record = self.record(&id).ok_or("gone")?;
        let (part, outboard) = self.paths(&id);
        let dir = self.settings.dir.clone();
        let (name, size, hash) = (record.name.clone(), record.size, record.hash);
        // The partial file must be whole (it was verified group by group;
        // a file cut short or gone since is fetched again, never padded).
        let claimed = blocking(move || {
            if size == 0 {
                if hash != verify::empty_hash() {
                    return Err(fail("an empty file does not have this hash"));
                }
                std::fs::File::create(&part).map_err(|e| fail(e.to_string()))?;
            }
            let f = std::fs::File::open(&part).map_err(|e| fail(e.to_string()))?;
            let len = f.metadata().map_err(|e| fail(e.to_string()))?.len();
            if len != size {
                return Ok(None);
            }
            f.sync_all().map_err(|e| fail(e.to_string()))?;
            Ok(Some(claim(&dir, &name).map_err(|e| fail(e.to_string()))?))
        })
        .await
        .map_err(|e| e.to_string())?;
        let Some(final_name) = claimed else {
            // Start over: whatever is on disk is checked again.
            self.update(id, |r| {
                r.have = GroupSet::new();
                r.received = 0;
            })
            .await
            .map_err(|e| e.to_string())?;
            return Ok(false);
        };
        // The name claimed is stored before the move: a crash in between is
        // recognised on restart (the partial file gone, the name there).
        self.update(id, |r| r.placing = Some(final_name.clone()))
            .await
            .map_err(|e| e.to_string())?;
        let (part, dir2, chosen) = (
            self.paths(&id).0,
            self.settings.dir.clone(),
            final_name.clone(),
        );
        blocking(move || {
            std::fs::rename(&part, dir2.join(&chosen)).map_err(|e| fail(e.to_string()))?;
            if let Ok(d) = std::fs::File::open(&dir2) {
                let _ = d.sync_all();
            }
            let _ = std::fs::remove_file(&outboard);
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())?;
        let record = self
            .update(id, |r| {
                r.state = TransferState::Done;
                r.name = final_name.clone();
                r.received = size;
                r.have = GroupSet::from_ranges([(0, groups_of(size))]);
            })
            .await
            .map_err(|e| e.to_string())?;
        self.told_done(&record).await;
        Ok(true)
    }

    /// The receiver holds the file: the sender and the app are told.
    async fn told_done(&self, record: &TransferRecord) {
        if let Some(conn) = self.conn(&record.peer) {
            Self::send_frame(&conn, &FileFrame::Done { id: record.id }).await;
        }
        self.publish(
            file_events::DONE,
            json!({
                "id": record.id.to_string(),
                "direction": "in",
                "peer": record.peer.to_string(),
                "hash": record.hash.to_string(),
                "name": record.name,
                "size": record.size,
                "path": self.settings.dir.join(&record.name).display().to_string(),
            }),
        );
    }

    /// Ends transfer `id` in `state` (failed or cancelled), tells the
    /// peer and the app; a receiver drops its partial file.
    async fn end(self: &Arc<Self>, id: TransferId, state: TransferState, reason: Option<String>) {
        let Some(before) = self.record(&id) else {
            return;
        };
        if before.state.is_final() {
            return;
        }
        let running = lock(&self.transfers).get(&id).and_then(|live| {
            live.stop.store(true, Ordering::Relaxed);
            live.control.clone()
        });
        let Ok(record) = self
            .update(id, |r| {
                r.state = state;
                r.error.clone_from(&reason);
            })
            .await
        else {
            return;
        };
        let reason = reason.unwrap_or_default();
        // The task driving it (parked or not) stops.
        if let Some(c) = running {
            // Full or not, the task stops: the state is final and its stop
            // flag set; this only wakes it sooner.
            let _ = c.try_send(Control::Cancelled(reason.clone()));
        }
        if let Some(conn) = self.conn(&record.peer) {
            Self::send_frame(
                &conn,
                &FileFrame::Cancel {
                    id,
                    reason: reason
                        .chars()
                        .take(crate::files::wire::MAX_REASON_LEN / 4)
                        .collect(),
                },
            )
            .await;
        }
        let leftovers = if record.direction == Direction::In {
            let (part, outboard) = self.paths(&id);
            vec![part, outboard]
        } else {
            vec![self.outboard_path(&id)]
        };
        let _ = blocking(move || {
            for f in leftovers {
                let _ = std::fs::remove_file(f);
            }
            Ok(())
        })
        .await;
        let kind = if state == TransferState::Cancelled {
            file_events::CANCELLED
        } else {
            file_events::FAILED
        };
        self.publish(
            kind,
            json!({
                "id": id.to_string(),
                "direction": record.direction.as_str(),
                "peer": record.peer.to_string(),
                "reason": reason,
            }),
        );
    }

    // ---- sending ---------------------------------------------------------

    fn spawn_out(self: &Arc<Self>, id: TransferId) {
        self.drive(id, Direction::Out);
    }

    /// Offers transfer `id` whenever a connection is up, until the
    /// receiver says it is done or the transfer ends. Data streams are
    /// served by the connection as the receiver asks.
    async fn push(
        self: &Arc<Self>,
        id: TransferId,
        mut control: mpsc::Receiver<Control>,
    ) -> Result<(), (TransferState, String)> {
        let mut backoff = Duration::from_millis(250);
        // Refusals of the connection in a row: a revoked device is refused
        // for good, but a receiver that is starting is refused until it
        // serves files (a few hundred ms): only a refusal that lasts ends
        // the transfer.
        let mut refused = 0u32;
        loop {
            let record = self
                .record(&id)
                .ok_or((TransferState::Failed, "gone".to_owned()))?;
            if record.state.is_final() {
                return Ok(());
            }
            let conn = match self.connect(&record.peer).await {
                Ok(c) => {
                    refused = 0;
                    c
                }
                Err(NodeError::Files {
                    kind: FilesErrorKind::Forbidden,
                    message,
                }) if refused + 1 >= MAX_REFUSALS => {
                    return Err((TransferState::Failed, message));
                }
                Err(e) => {
                    if matches!(
                        e,
                        NodeError::Files {
                            kind: FilesErrorKind::Forbidden,
                            ..
                        }
                    ) {
                        refused += 1;
                    }
                    if record.state != TransferState::Paused {
                        let _ = self.update(id, |r| r.state = TransferState::Paused).await;
                    }
                    // Back when a connection comes (a worker redials on
                    // its own backoff; a primary waits for the device).
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        c = control.recv() => match c {
                            Some(Control::Cancelled(reason)) => {
                                return Err((TransferState::Cancelled, reason));
                            }
                            None => return Ok(()),
                            _ => {}
                        },
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(250);
            let offer = FileFrame::Offer(Offer {
                id,
                hash: record.hash,
                size: record.size,
                name: record.name.clone(),
                zstd: record.zstd,
            });
            if !Self::send_frame(&conn, &offer).await {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            // Until the receiver ends it, or the connection goes.
            loop {
                let closed = async {
                    while self
                        .conn(&record.peer)
                        .is_some_and(|c| Arc::ptr_eq(&c, &conn))
                    {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                };
                let c = tokio::select! {
                    c = control.recv() => c,
                    () = closed => break,
                };
                match c {
                    Some(Control::Accepted(received)) => {
                        let received = received.min(record.size);
                        let _ = self
                            .update(id, |r| {
                                r.received = received;
                                r.state = TransferState::Active;
                            })
                            .await;
                    }
                    Some(Control::Progress(received)) => {
                        // In memory (stored when the state changes); only
                        // forward, never past the size: a receiver's claim.
                        let moved = lock(&self.transfers).get_mut(&id).is_some_and(|l| {
                            let r = received.min(l.record.size);
                            let moved = r > l.record.received;
                            l.record.received = l.record.received.max(r);
                            moved
                        });
                        if !moved {
                            continue;
                        }
                        self.publish(
                            file_events::PROGRESS,
                            json!({
                                "id": id.to_string(),
                                "direction": "out",
                                "peer": record.peer.to_string(),
                                "bytes": received,
                                "total": record.size,
                            }),
                        );
                    }
                    Some(Control::Done) => {
                        let size = record.size;
                        let _ = self
                            .update(id, |r| {
                                r.state = TransferState::Done;
                                r.received = size;
                            })
                            .await;
                        self.publish(
                            file_events::DONE,
                            json!({
                                "id": id.to_string(),
                                "direction": "out",
                                "peer": record.peer.to_string(),
                                "hash": record.hash.to_string(),
                                "name": record.name,
                                "size": size,
                            }),
                        );
                        let outboard = self.outboard_path(&id);
                        let _ = blocking(move || {
                            let _ = std::fs::remove_file(outboard);
                            Ok(())
                        })
                        .await;
                        return Ok(());
                    }
                    Some(Control::Refused(code, _)) if code == refusals::BUSY => {
                        // Not now: offered again later.
                        let _ = self.update(id, |r| r.state = TransferState::Paused).await;
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                            c = control.recv() => if let Some(Control::Cancelled(reason)) = c {
                                return Err((TransferState::Cancelled, reason));
                            },
                        }
                        break;
                    }
                    Some(Control::Refused(code, message)) => {
                        return Err((
                            TransferState::Failed,
                            format!("refused ({code}): {message}"),
                        ));
                    }
                    Some(Control::Cancelled(reason)) => {
                        return Err((TransferState::Cancelled, reason));
                    }
                    Some(Control::Connected) => break,
                    None => return Ok(()),
                }
            }
        }
    }

    fn outboard_path(&self, id: &TransferId) -> PathBuf {
        self.settings
            .dir
            .join(".outboard")
            .join(format!("{id}.obao"))
    }

    /// Serves one data stream: the groups asked for, verified as read.
    async fn serve_stream(
        self: Arc<Self>,
        peer: NodeId,
        mut send: Box<dyn SendStream>,
        mut recv: Box<dyn RecvStream>,
    ) {
        // The request first, whole within 10 s; nothing is held meanwhile
        // but this task.
        let request = match tokio::time::timeout(
            Duration::from_secs(10),
            read_request(recv.as_mut()),
        )
        .await
        {
            Ok(Ok(r)) => r,
            _ => {
                send.reset(RESET_BAD_REQUEST);
                return;
            }
        };
        let Some(record) = self.record(&request.id) else {
            send.reset(RESET_UNKNOWN);
            return;
        };
        let Some(source) = record.source.clone() else {
            send.reset(RESET_UNKNOWN);
            return;
        };
        if record.peer != peer
            || record.direction != Direction::Out
            || record.hash != request.hash
            || request.check_size(record.size).is_err()
        {
            send.reset(RESET_UNKNOWN);
            return;
        }
        if record.state.is_final() {
            // Ended here while the receiver was away: it hears so now.
            send.reset(RESET_ENDED);
            if let Some(conn) = self.conn(&peer) {
                Self::send_frame(
                    &conn,
                    &FileFrame::Cancel {
                        id: record.id,
                        reason: record
                            .error
                            .clone()
                            .unwrap_or_else(|| record.state.as_str().into()),
                    },
                )
                .await;
            }
            return;
        }
        // Bounded per peer and in all.
        let Some(_slot) = PeerSlot::take(&self.serving_per_peer, peer, SERVING_PER_PEER) else {
            send.reset(RESET_BUSY);
            return;
        };
        let Ok(_permit) = self.serving.clone().try_acquire_owned() else {
            send.reset(RESET_BUSY);
            return;
        };
        let outboard = self.outboard_path(&record.id);
        let (hash, size, zstd) = (record.hash, record.size, request.zstd);
        let groups = request.groups;
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(PIECES);
        let modified = record.source_modified_ns;
        let serving = tokio::task::spawn_blocking(move || -> Result<(), ServeError> {
            let data = std::fs::File::open(&source).map_err(ServeError::Read)?;
            // Changed since it was hashed (size or time): not served. The
            // receiver checks every group anyway; this saves re-hashing here.
            let len = data.metadata().map_err(ServeError::Read)?.len();
            if len != size || modified_ns(&source) != modified {
                return Err(ServeError::SourceChanged(
                    "its size or modification time changed".into(),
                ));
            }
            let ob = std::fs::File::open(&outboard).map_err(ServeError::Read)?;
            let out = Chunker::new(tx);
            if zstd {
                let mut enc =
                    zstd::stream::write::Encoder::new(out, 1).map_err(ServeError::Write)?;
                verify::serve(&data, ob, hash, size, &groups, &mut enc, false)?;
                let mut out = enc.finish().map_err(ServeError::Write)?;
                out.flush().map_err(ServeError::Write)
            } else {
                let mut out = out;
                verify::serve(&data, ob, hash, size, &groups, &mut out, false)?;
                out.flush().map_err(ServeError::Write)
            }
        });
        let mut ok = true;
        while let Some(piece) = rx.recv().await {
            // A receiver that stops reading is given up on.
            if !matches!(
                tokio::time::timeout(STALL, send.write_all(&piece)).await,
                Ok(Ok(()))
            ) {
                ok = false;
                break;
            }
            self.counters
                .served
                .fetch_add(piece.len() as u64, Ordering::Relaxed);
        }
        drop(rx);
        match serving.await {
            Ok(Ok(())) if ok => {
                let _ = send.finish().await;
            }
            // The file changed or cannot be read: the transfer cannot go on.
            Ok(Err(e @ (ServeError::SourceChanged(_) | ServeError::Read(_)))) => {
                send.reset(RESET_ENDED);
                self.end(record.id, TransferState::Failed, Some(e.to_string()))
                    .await;
            }
            _ => send.reset(RESET_BUSY),
        }
    }

    // ---- the API ---------------------------------------------------------

    /// Offers the file at `path` to `to`.
    pub(super) async fn send_file(
        self: &Arc<Self>,
        path: &Path,
        to: NodeId,
    ) -> Result<TransferInfo, NodeError> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| {
                files_error(
                    FilesErrorKind::BadName,
                    format!("{} has no file name", path.display()),
                )
            })?
            .to_owned();
        check_name(&name).map_err(|e| files_error(FilesErrorKind::BadName, e.to_string()))?;
        let probe = path.to_owned();
        let meta = blocking(move || {
            std::fs::metadata(&probe).map_err(|e| {
                files_error(
                    FilesErrorKind::NotFound,
                    format!("{}: {e}", probe.display()),
                )
            })
        })
        .await?;
        if !meta.is_file() {
            return Err(files_error(
                FilesErrorKind::InvalidArgument,
                format!("{} is not a file", path.display()),
            ));
        }
        match &self.side {
            FilesSide::Primary { gate, .. } => {
                let (gate, size) = (gate.clone(), meta.len());
                tokio::task::spawn_blocking(move || gate(&to, size))
                    .await
                    .map_err(|e| fail(e.to_string()))?
                    .map_err(|(kind, message)| files_error(kind, message))?;
            }
            FilesSide::Worker => {
                let store = self.core.store.clone();
                let link =
                    blocking(move || Ok(store.load::<PrimaryLinkRecord>("primary")?)).await?;
                if link.is_none_or(|l| l.primary != to) {
                    return Err(files_error(
                        FilesErrorKind::Forbidden,
                        "a worker sends files to its primary only",
                    ));
                }
            }
        }
        let source = std::path::absolute(path).map_err(|e| fail(e.to_string()))?;
        let probed = source.clone();
        let modified_now = blocking(move || Ok(modified_ns(&probed))).await?;
        // The same file (path, size, modification time) to the same peer,
        // still under way (say, asked for again after a restart): that
        // transfer, not a second one.
        let running = lock(&self.transfers)
            .values()
            .find(|l| {
                let r = &l.record;
                r.direction == Direction::Out
                    && r.peer == to
                    && !r.state.is_final()
                    && r.size == meta.len()
                    && r.source_modified_ns == modified_now
                    && r.source.as_deref() == Some(source.as_path())
            })
            .map(|l| l.record.clone());
        if let Some(r) = running {
            return Ok(self.info(&r));
        }
        let id = TransferId::random();
        let outboard = self.outboard_path(&id);
        let hashing = source.clone();
        let (hash, size, zstd, modified) = blocking(move || {
            let modified = modified_ns(&hashing);
            let (hash, size) = verify::hash_file(&hashing, &outboard).map_err(|e| {
                files_error(
                    FilesErrorKind::NotFound,
                    format!("reading {}: {e}", hashing.display()),
                )
            })?;
            Ok((hash, size, compresses(&hashing), modified))
        })
        .await?;
        let now = self.now();
        let record = TransferRecord {
            id,
            direction: Direction::Out,
            peer: to,
            hash,
            name,
            size,
            received: 0,
            state: TransferState::Active,
            source: Some(source),
            source_modified_ns: modified,
            have: GroupSet::new(),
            zstd,
            error: None,
            placing: None,
            created_at: now,
            updated_at: now,
        };
        let store = self.core.store.clone();
        let stored = record.clone();
        blocking(move || Ok(store.save(&stored)?)).await?;
        self.insert(record.clone());
        self.spawn_out(id);
        Ok(self.info(&record))
    }

    pub(super) fn stats(&self) -> FilesStats {
        FilesStats {
            bytes_served: self.counters.served.load(Ordering::Relaxed),
            bytes_verified: self.counters.verified.load(Ordering::Relaxed),
            groups_rejected: self.counters.rejected.load(Ordering::Relaxed),
        }
    }

    pub(super) fn list(&self) -> Vec<TransferInfo> {
        let mut all: Vec<TransferRecord> = lock(&self.transfers)
            .values()
            .map(|l| l.record.clone())
            .collect();
        all.sort_by_key(|r| (r.created_at, r.id));
        all.iter().map(|r| self.info(r)).collect()
    }

    pub(super) fn get(&self, id: &TransferId) -> Option<TransferInfo> {
        self.record(id).map(|r| self.info(&r))
    }

    pub(super) async fn cancel(
        self: &Arc<Self>,
        id: TransferId,
    ) -> Result<TransferInfo, NodeError> {
        let record = self
            .record(&id)
            .ok_or_else(|| files_error(FilesErrorKind::NotFound, format!("no transfer {id}")))?;
        if record.state.is_final() {
            return Err(files_error(
                FilesErrorKind::AlreadyEnded,
                format!("transfer {id} is {}", record.state.as_str()),
            ));
        }
        self.end(id, TransferState::Cancelled, Some("cancelled here".into()))
            .await;
        self.get(&id).ok_or_else(|| fail("gone"))
    }

    pub(super) async fn wait(&self, id: TransferId) -> Result<TransferInfo, NodeError> {
        let mut rx = lock(&self.transfers)
            .get(&id)
            .map(|l| l.state.subscribe())
            .ok_or_else(|| files_error(FilesErrorKind::NotFound, format!("no transfer {id}")))?;
        loop {
            if rx.borrow_and_update().is_final() {
                break;
            }
            if rx.changed().await.is_err() {
                break;
            }
        }
        self.get(&id).ok_or_else(|| fail("gone"))
    }

    /// A worker, asked by its primary: dial it for files.
    pub(super) fn dial_back(self: &Arc<Self>) {
        if matches!(self.side, FilesSide::Worker) {
            let rt = self.clone();
            self.core.spawn(async move {
                let _ = rt.dial_primary().await;
            });
        }
    }
}

enum Pulled {
    Cancelled(String),
    Lied(u64),
    Disk(String),
    /// The sender reset the stream with this code: it does not serve the
    /// transfer.
    Refused(u32),
    Stream,
}

fn take_with(
    rx: &mut Receiving,
    groups: &[(u64, u64)],
    input: impl Read,
    on_group: &mut impl FnMut(&Syncer, u64, u64) -> bool,
) -> Result<(), ReceiveError> {
    // `take` borrows the receiver mutably; the callback syncs the files
    // now and then through a second handle to them.
    let syncer = rx.syncer().map_err(ReceiveError::Disk)?;
    rx.take(groups, input, |g, len| on_group(&syncer, g, len))
}

/// Bytes held by `have` in a file of `size` bytes.
fn received_bytes(have: &GroupSet, size: u64) -> u64 {
    let total = groups_of(size);
    let mut n = have.count().min(total) * GROUP_LEN;
    if have.contains(total - 1) {
        n -= total * GROUP_LEN - size;
    }
    n.min(size)
}

/// Reads a range request from the start of a data stream.
async fn read_request(recv: &mut dyn RecvStream) -> Result<RangeRequest, ()> {
    let mut prefix = [0u8; 2];
    read_exact(recv, &mut prefix).await?;
    let n = RangeRequest::body_len(prefix).map_err(|_| ())?;
    let mut body = vec![0u8; n];
    read_exact(recv, &mut body).await?;
    RangeRequest::decode(&body).map_err(|_| ())
}

async fn read_exact(recv: &mut dyn RecvStream, buf: &mut [u8]) -> Result<(), ()> {
    let mut at = 0;
    while at < buf.len() {
        match tokio::time::timeout(Duration::from_secs(10), recv.read(&mut buf[at..])).await {
            Ok(Ok(Some(n))) if n > 0 => at += n,
            _ => return Err(()),
        }
    }
    Ok(())
}

/// Claims a free name in `dir` for `name`: `name`, or `name (1)`, … if
/// taken, by creating it (so two transfers never take the same one); the
/// partial file then replaces the claim.
/// Bytes free for this process on the file system of `dir` (`None` where
/// it cannot be told).
#[cfg(unix)]
fn free_space(dir: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(not(unix))]
fn free_space(_dir: &Path) -> Option<u64> {
    None
}

fn claim(dir: &Path, name: &str) -> io::Result<String> {
    for n in 0..1_000u32 {
        let candidate = numbered(name, n);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(&candidate))
        {
            Ok(_) => return Ok(candidate),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other(format!("no free name for {name:?}")))
}

/// The modification time of `path`, ns since the epoch (0 if unknown).
fn modified_ns(path: &Path) -> u64 {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Whether zstd pays for the file at `path`: a sample of its start
/// compresses to under 90 %. Already compressed data (media, archives)
/// does not, and is sent as it is.
fn compresses(path: &Path) -> bool {
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    let mut sample = vec![0u8; 256 * 1024];
    let mut n = 0;
    while n < sample.len() {
        match f.read(&mut sample[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    if n < 4096 {
        return false;
    }
    zstd::bulk::compress(&sample[..n], 1).is_ok_and(|c| c.len() * 10 < n * 9)
}

/// A `Read` over pieces handed from an async stream reader (used on a
/// blocking thread).
struct Pieces {
    rx: mpsc::Receiver<Vec<u8>>,
    piece: Vec<u8>,
    at: usize,
}

impl Pieces {
    fn new(rx: mpsc::Receiver<Vec<u8>>) -> Self {
        Pieces {
            rx,
            piece: Vec::new(),
            at: 0,
        }
    }
}

impl Read for Pieces {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at >= self.piece.len() {
            match self.rx.blocking_recv() {
                Some(p) => {
                    self.piece = p;
                    self.at = 0;
                }
                // The stream ended (or failed).
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.piece.len() - self.at);
        buf[..n].copy_from_slice(&self.piece[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// A `Write` that hands pieces of [`PIECE`] bytes to an async writer.
struct Chunker {
    tx: mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl Chunker {
    fn new(tx: mpsc::Sender<Vec<u8>>) -> Self {
        Chunker {
            tx,
            buf: Vec::with_capacity(PIECE),
        }
    }
}

impl Write for Chunker {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= PIECE {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = std::mem::replace(&mut self.buf, Vec::with_capacity(PIECE));
        self.tx
            .blocking_send(piece)
            .map_err(|_| io::Error::new(io::ErrorKind::ConnectionReset, "the stream is gone"))
    }
}

impl super::Node {
    pub(super) fn files_rt(&self) -> Result<Arc<FilesRt>, NodeError> {
        self.files
            .clone()
            .ok_or_else(|| fail("file transfer is not enabled on this node (NodeBuilder::files)"))
    }

    /// Sends the file at `path` to `to` (a worker: its primary; a primary:
    /// a paired device holding `files:write` whose policy allows
    /// `files.send`). Returns once the file is hashed and the transfer
    /// stored; it then runs in the background, through dropped connections
    /// and restarts of either side, until the receiver holds every byte
    /// verified. Follow it with [`Node::wait_transfer`](super::Node::wait_transfer) or the
    /// `transfer.*` events.
    pub async fn send_file(
        &self,
        path: impl AsRef<Path>,
        to: NodeId,
    ) -> Result<TransferInfo, NodeError> {
        self.files_rt()?.send_file(path.as_ref(), to).await
    }

    /// Every transfer this node knows of, in and out, oldest first.
    pub fn transfers(&self) -> Result<Vec<TransferInfo>, NodeError> {
        Ok(self.files_rt()?.list())
    }

    /// Transfer `id`.
    pub fn transfer(&self, id: &TransferId) -> Result<Option<TransferInfo>, NodeError> {
        Ok(self.files_rt()?.get(id))
    }

    /// Cancels transfer `id` (both sides stop; a receiver drops the
    /// partial file).
    pub async fn cancel_transfer(&self, id: TransferId) -> Result<TransferInfo, NodeError> {
        self.files_rt()?.cancel(id).await
    }

    /// Waits until transfer `id` has ended (done, failed or cancelled).
    pub async fn wait_transfer(&self, id: TransferId) -> Result<TransferInfo, NodeError> {
        self.files_rt()?.wait(id).await
    }

    /// Counters of file transfer since the node started.
    pub fn files_stats(&self) -> Result<FilesStats, NodeError> {
        Ok(self.files_rt()?.stats())
    }

    /// Where received files land.
    pub fn files_dir(&self) -> Result<PathBuf, NodeError> {
        Ok(self.files_rt()?.settings.dir.clone())
    }
}
