//! Ledger replication in the runtime (R-LED5–6): members pull each other's
//! ledgers over the ledger protocol ([`LEDGER_SYNC`]) in the background,
//! one member in turn every [`LEDGER_SYNC_INTERVAL`], and at once when a
//! member is new or back; a primary pulls each device's ledger over its
//! session when the session opens and then one device in turn every
//! interval; what comes is verified by the [`LedgerSync`]
//! implementation (mesh-ledger's hub) before it is stored. A fork raises
//! `ledger.fork` with its evidence.
//!
//! Serving: a member asks for records of a ledger this node holds (its
//! own or a replica); at most 20 requests per
//! connection, each answered off the async threads.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;

use super::mesh::MeshRt;
use super::outlink::{MemberService, MembersOnly};
use super::protocols::ProtocolHandler;
use super::{Core, NodeError, Role};
use crate::identity::NodeId;
use crate::ledger::{LedgerHolding, LedgerSync, LedgerSyncError};
use crate::limits::{Rate, TokenBucket};
use crate::transport::{Connection, PeerAddr, Protocol};

/// The ledger protocol's ALPN.
pub const LEDGER_SYNC: Protocol = Protocol::new("mesh-sdk/ledger/1");
/// How often a member's ledger is pulled (one member in turn).
pub const LEDGER_SYNC_INTERVAL: Duration = Duration::from_secs(2);
/// Requests answered per connection and second.
const REQUESTS_PER_SECOND: f64 = 20.0;
/// The largest request.
const MAX_REQUEST_LEN: usize = 64 * 1024;
/// Answers taken in one pull (each up to a checkpoint).
const ROUNDS_PER_PULL: usize = 64;
/// How long one answer may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests served at once, from all members.
const SERVING: usize = 8;
/// Forks remembered as told (then told again once).
const MAX_FORKS_TOLD: usize = 1024;

/// Event kinds of ledger replication.
pub mod ledger_events {
    /// A member signed two histories (`author`, `reason`, `first`,
    /// `second`: each `{size, root}`).
    pub const FORK: &str = "ledger.fork";
}

/// The ledger-replication side of a running node.
pub(crate) struct LedgerSyncRt {
    core: Arc<Core>,
    mesh: Option<Arc<MeshRt>>,
    sync: Arc<dyn LedgerSync>,
    serving: Arc<tokio::sync::Semaphore>,
    /// A primary's pulls from devices: the answer each waits for.
    answers:
        std::sync::Mutex<std::collections::HashMap<NodeId, tokio::sync::oneshot::Sender<Vec<u8>>>>,
}

impl std::fmt::Debug for LedgerSyncRt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LedgerSyncRt")
    }
}

/// Starts replication: with the mesh's members if there is a mesh, and
/// over device sessions.
pub(super) fn build(
    core: &Arc<Core>,
    mesh: Option<&Arc<MeshRt>>,
    sync: Arc<dyn LedgerSync>,
) -> Arc<LedgerSyncRt> {
    let rt = Arc::new(LedgerSyncRt {
        core: core.clone(),
        mesh: mesh.cloned(),
        sync,
        serving: Arc::new(tokio::sync::Semaphore::new(SERVING)),
        answers: std::sync::Mutex::new(std::collections::HashMap::new()),
    });
    if mesh.is_some() || core.config.role == Role::Primary {
        core.spawn(puller(Arc::downgrade(&rt)));
    }
    rt
}

/// Runs `f` off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LedgerSyncError> + Send + 'static,
) -> Result<T, LedgerSyncError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| LedgerSyncError::Invalid(format!("the task failed: {e}")))?
}

async fn puller(rt: Weak<LedgerSyncRt>) {
    let mut tick = tokio::time::interval(LEDGER_SYNC_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut turn, mut device_turn) = (0usize, 0usize);
    let mut last: BTreeMap<NodeId, Vec<PeerAddr>> = BTreeMap::new();
    let mut forks_told: HashSet<(NodeId, u64, u64)> = HashSet::new();
    loop {
        tick.tick().await;
        let Some(rt) = rt.upgrade() else { return };
        let mut due: Vec<(NodeId, Option<Vec<PeerAddr>>)> = Vec::new();
        if let Some(mesh) = rt.mesh.clone() {
            let reachable = mesh.reachable();
            // New or moved members at once, and one more in turn.
            due.extend(
                reachable
                    .iter()
                    .filter(|(n, a)| last.get(*n) != Some(*a))
                    .map(|(n, a)| (*n, Some(a.clone()))),
            );
            if !reachable.is_empty() {
                let i = turn % reachable.len();
                turn = turn.wrapping_add(1);
                if let Some((n, a)) = reachable.iter().nth(i)
                    && !due.iter().any(|(d, _)| d == n)
                {
                    due.push((*n, Some(a.clone())));
                }
            }
            last = reachable;
        }
        // A primary: one device with a session in turn (besides the pull
        // when its session opens), so what a device records while
        // connected reaches the primary too.
        if rt.core.config.role == Role::Primary {
            let devices = rt.core.sessions.list();
            if !devices.is_empty() {
                let i = device_turn % devices.len();
                device_turn = device_turn.wrapping_add(1);
                due.push((devices[i].peer, None));
            }
        }
        for (node, addrs) in due {
            let pulled = match addrs {
                Some(addrs) => rt.pull(node, &addrs).await,
                None => rt.pull_device(node).await,
            };
            if let Err(LedgerSyncError::Fork(report)) = pulled {
                let key = (report.author, report.first.size, report.second.size);
                if forks_told.len() >= MAX_FORKS_TOLD {
                    forks_told.clear();
                }
                if forks_told.insert(key) {
                    rt.tell_fork(&report);
                }
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl LedgerSyncRt {
    fn tell_fork(&self, report: &crate::ledger::ForkReport) {
        self.core.events.publish(
            ledger_events::FORK,
            self.core.now(),
            json!({
                "author": report.author.to_string(),
                "reason": report.reason,
                "first": { "size": report.first.size, "root": hex(&report.first.root) },
                "second": { "size": report.second.size, "root": hex(&report.second.root) },
            }),
        );
    }

    /// A primary: device `device`'s session opened; its ledger (entries it
    /// made while away included) is pulled over the session.
    pub(super) fn device_opened(self: &Arc<Self>, device: NodeId) {
        let rt = self.clone();
        self.core.spawn(async move {
            if let Err(LedgerSyncError::Fork(report)) = rt.pull_device(device).await {
                rt.tell_fork(&report);
            }
        });
    }

    async fn pull_device(&self, device: NodeId) -> Result<u64, LedgerSyncError> {
        self.pull_rounds(device, |request| async move {
            let session = self.core.sessions.get(&device)?;
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.answers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(device, tx);
            let payload = crate::wire::Payload::LedgerSync(request);
            self.core
                .link
                .send(session.conn.as_ref(), device, payload, self.core.now())
                .await
                .ok()?;
            tokio::time::timeout(ANSWER_TIMEOUT, rx).await.ok()?.ok()
        })
        .await
    }

    /// Asks for `author`'s ledger through `exchange` (a request out, its
    /// answer back, or none) and stores what comes, answer after answer,
    /// until one brings nothing.
    async fn pull_rounds<F, Fut>(
        &self,
        author: NodeId,
        mut exchange: F,
    ) -> Result<u64, LedgerSyncError>
    where
        F: FnMut(Vec<u8>) -> Fut,
        Fut: std::future::Future<Output = Option<Vec<u8>>>,
    {
        let mut added = 0;
        for _ in 0..ROUNDS_PER_PULL {
            let sync = self.sync.clone();
            let request = blocking(move || sync.request(&author)).await?;
            let Some(answer) = exchange(request).await else {
                break;
            };
            let sync = self.sync.clone();
            let n = blocking(move || sync.apply(&author, &answer)).await?;
            added += n;
            if n == 0 {
                break;
            }
        }
        Ok(added)
    }

    /// A primary: device `from` answered a pull (ignored if none waits).
    pub(super) fn session_answer(&self, from: NodeId, answer: Vec<u8>) {
        let waiting = self
            .answers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&from);
        if let Some(tx) = waiting {
            let _ = tx.send(answer);
        }
    }

    /// A worker: its primary asks for its ledger; answered over the
    /// session, one request at a time per the serving bound.
    pub(super) fn session_request(self: &Arc<Self>, primary: NodeId, request: Vec<u8>) {
        let Ok(permit) = self.serving.clone().try_acquire_owned() else {
            return;
        };
        let rt = self.clone();
        self.core.spawn(async move {
            let _permit = permit;
            if request.len() > MAX_REQUEST_LEN {
                return;
            }
            let sync = rt.sync.clone();
            let answer = blocking(move || {
                sync.checkpoint_own()?;
                sync.serve(&request)
            })
            .await;
            let Ok(answer) = answer else { return };
            if let Some(session) = rt.core.sessions.get(&primary) {
                let payload = crate::wire::Payload::LedgerSync(answer);
                let _ = rt
                    .core
                    .link
                    .send(session.conn.as_ref(), primary, payload, rt.core.now())
                    .await;
            }
        });
    }

    /// Pulls `author`'s own ledger from it, answer after answer, until it
    /// has nothing more.
    async fn pull(&self, author: NodeId, addrs: &[PeerAddr]) -> Result<u64, LedgerSyncError> {
        let mut conn = None;
        for addr in addrs {
            let dial = self.core.connect(author, addr, LEDGER_SYNC);
            if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(3), dial).await {
                conn = Some(c);
                break;
            }
        }
        let Some(conn) = conn else { return Ok(0) };
        let conn = &conn;
        let added = self
            .pull_rounds(author, |request| async move {
                conn.send(request).await.ok()?;
                tokio::time::timeout(ANSWER_TIMEOUT, conn.recv())
                    .await
                    .ok()?
                    .ok()
            })
            .await;
        conn.close();
        added
    }
}

#[async_trait]
impl MembersOnly for LedgerSyncRt {
    fn admits(&self, peer: &NodeId) -> bool {
        self.mesh.as_ref().is_some_and(|m| m.is_member(peer))
    }

    async fn serve_member(self: Arc<Self>, conn: Arc<dyn Connection>) {
        // Bounded work for everyone's requests together.
        let Ok(_permit) = self.serving.clone().try_acquire_owned() else {
            conn.close();
            return;
        };
        let mut bucket = TokenBucket::new(
            Rate::per_second(REQUESTS_PER_SECOND, REQUESTS_PER_SECOND as u32),
            self.core.now(),
        );
        while let Ok(request) = conn.recv().await {
            if !self.admits(&conn.remote_node())
                || request.len() > MAX_REQUEST_LEN
                || !bucket.try_take(self.core.now())
            {
                break;
            }
            let sync = self.sync.clone();
            match blocking(move || sync.serve(&request)).await {
                Ok(answer) => {
                    if conn.send(answer).await.is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        conn.close();
    }
}

/// The ledger protocol, as a handler (members only).
pub(super) fn protocol(rt: &Arc<LedgerSyncRt>) -> (Protocol, Arc<dyn ProtocolHandler>) {
    MemberService::handler(rt, LEDGER_SYNC, "LedgerService")
}

impl super::Node {
    /// The ledgers this node holds (its own and the replicas of members'),
    /// with size, latest checkpoint and any fork evidence.
    pub async fn ledger_replicas(&self) -> Result<Vec<LedgerHolding>, NodeError> {
        let Some(rt) = &self.ledger_sync else {
            return Err(NodeError::Unavailable(
                "this node replicates no ledgers (NodeBuilder::ledger_sync and a mesh)".into(),
            ));
        };
        let sync = rt.sync.clone();
        tokio::task::spawn_blocking(move || sync.holdings())
            .await
            .map_err(|e| NodeError::Unavailable(format!("the task failed: {e}")))
    }
}
