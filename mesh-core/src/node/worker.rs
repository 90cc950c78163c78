//! The worker's side: pairing with the code, the session with its primary
//! (hello with the token, heartbeats, commands both ways), reconnection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::backoff::Backoff;
use super::link::{SessionRef, pre_auth_guard};
use super::primary::{invalid_args, run_handler};
use super::{Core, MetricsSource, Node, NodeError, lock};
use crate::clock::monotonic_since;
use crate::identity::NodeId;
use crate::pairing::{DeviceInfo, DevicePairing, DeviceStep, PairingError};
use crate::session::{ByeReason, RotatedToken, SessionEnd, WorkerOutput, WorkerSession};
use crate::storage::Record;
use crate::storage::StorageExt;
use crate::storage::records::{PrimaryLinkRecord, TokenFallbackRecord};
use crate::transport::{Connection, PeerAddr, Protocol, TransportError};
use crate::wire::ReplayGuard;
use crate::wire::{
    Command, CommandOutcome, CommandResult, CommandUsage, Heartbeat, JsonText, Payload,
    SessionMessage,
};

/// A worker's runtime: the shared core and what only a worker has (where
/// its metrics come from, and the state below). The worker's tasks and its
/// [`Worker`] handle hold it.
pub(crate) struct WorkerRt {
    core: Arc<Core>,
    metrics: Arc<dyn MetricsSource>,
    /// Set once the worker stops: the supervisor and the session see it.
    stop: tokio::sync::watch::Sender<bool>,
    pub(super) worker: State,
}

impl std::ops::Deref for WorkerRt {
    type Target = Core;

    fn deref(&self) -> &Core {
        &self.core
    }
}

impl WorkerRt {
    pub(super) fn new(core: Arc<Core>, metrics: Arc<dyn MetricsSource>) -> Arc<Self> {
        Arc::new(WorkerRt {
            core,
            metrics,
            stop: tokio::sync::watch::Sender::new(false),
            worker: State::default(),
        })
    }

    /// The open session with the primary (one of the core's sessions).
    fn primary_session(&self) -> Option<SessionRef> {
        let primary = (*lock(&self.worker.primary))?;
        self.sessions.get(&primary)
    }
}

/// A worker: its handle, with the operations only a worker has (pairing
/// with a primary, heartbeats, events and commands to it). It dereferences
/// to the [`Node`] it is, for what both roles do.
#[derive(Clone)]
pub struct Worker {
    pub(super) node: Node,
    pub(super) rt: Arc<WorkerRt>,
}

impl std::ops::Deref for Worker {
    type Target = Node;

    fn deref(&self) -> &Node {
        &self.node
    }
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.node.fmt(f)
    }
}

impl From<Worker> for Node {
    fn from(w: Worker) -> Node {
        w.node
    }
}

#[derive(Default)]
pub(crate) struct State {
    /// The primary of the open session, if one is open (its session is in
    /// the core's table).
    primary: Mutex<Option<NodeId>>,
    supervisor: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Configuration set by the primary (`config` command).
    config: Mutex<HashMap<String, Value>>,
    heartbeat_seq: AtomicU64,
    /// The primary's commands running now.
    commands_running: std::sync::atomic::AtomicUsize,
    /// The power state last given to the transports (0: none yet).
    power: std::sync::atomic::AtomicU8,
}

/// A pairing in progress on the worker: show [`code`](Self::code) to the
/// user, who types it on the primary; then [`finished`](Self::finished)
/// says how it ended.
#[derive(Debug)]
pub struct PairingTicket {
    code: String,
    request_id: String,
    outcome: oneshot::Receiver<Result<(), NodeError>>,
}

impl PairingTicket {
    /// The 6-digit code to show.
    pub fn code(&self) -> &str {
        &self.code
    }

    /// The request id the primary lists.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// Waits until the primary approved (the pairing is stored and the
    /// session starts) or the request failed (rejected, too many wrong
    /// codes, expired, connection lost).
    pub async fn finished(self) -> Result<(), NodeError> {
        self.outcome.await.unwrap_or_else(|_| {
            Err(NodeError::Unavailable(
                "the node stopped during pairing".into(),
            ))
        })
    }
}

pub(super) fn start(inner: &Arc<WorkerRt>) -> Result<(), NodeError> {
    if inner.store.load::<PrimaryLinkRecord>("primary")?.is_some() {
        supervise(inner);
    }
    Ok(())
}

pub(super) async fn stop(inner: &WorkerRt) {
    // The session machine says goodbye (`WorkerSession::end`) and the
    // supervisor returns; a supervisor that does not finish in time (a send
    // stuck on a dead link) is aborted. Either way no heartbeat can follow.
    inner.stop.send_replace(true);
    let supervisor = lock(&inner.worker.supervisor).take();
    if let Some(mut task) = supervisor
        && tokio::time::timeout(Duration::from_secs(3), &mut task)
            .await
            .is_err()
    {
        task.abort();
        let _ = task.await;
    }
    // The session's own `SessionCleanup` took it out of the table when the
    // supervisor ended (returned or aborted), so nothing is left to close.
}

/// [`stop`] without the goodbye: for a node dropped without `shutdown`.
pub(super) fn stop_now(inner: &WorkerRt) {
    inner.stop.send_replace(true);
    if let Some(task) = lock(&inner.worker.supervisor).take() {
        task.abort();
    }
    if let Some(session) = lock(&inner.worker.primary)
        .take()
        .and_then(|p| inner.sessions.remove(&p))
    {
        session.conn.close();
    }
}

/// Resolves once the worker is stopping.
async fn stopping(inner: &WorkerRt) {
    let mut rx = inner.stop.subscribe();
    let _ = rx.wait_for(|stop| *stop).await;
}

fn supervise(inner: &Arc<WorkerRt>) {
    let task_inner = inner.clone();
    let task = tokio::spawn(async move { run_supervisor(task_inner).await });
    if let Some(old) = lock(&inner.worker.supervisor).replace(task) {
        old.abort();
    }
}

/// Sends one heartbeat with fresh metrics.
async fn send_heartbeat(
    inner: &WorkerRt,
    conn: &dyn Connection,
    primary: NodeId,
) -> Result<(), NodeError> {
    let seq = inner.worker.heartbeat_seq.fetch_add(1, Ordering::Relaxed) + 1;
    let mut metrics = inner.metrics.sample();
    // What the app does not report itself: the replicated changes the
    // primary lacks, and for how long it has lacked some.
    if let Some(sync) = inner.sync_rt() {
        let (lag_ms, pending) = sync.gauges();
        metrics.sync_lag_ms.get_or_insert(lag_ms as f64);
        metrics.messages_pending.get_or_insert(pending);
    }
    follow_power(inner, &metrics);
    let hb = Payload::Heartbeat(Heartbeat { seq, metrics });
    // Counted before it leaves (the primary may react before this task
    // runs again); taken back if it was not sent, including when this
    // future is dropped half-way (the session ending).
    inner.stats.heartbeats_sent.fetch_add(1, Ordering::Relaxed);
    let mut counted = Counted(&inner.stats.heartbeats_sent, false);
    let result = inner.link.send(conn, primary, hb, inner.now()).await;
    counted.1 = result.is_ok();
    result
}

/// Tells the transports when this device goes on or off battery (a
/// battery it reports, not charging), so QUIC's keep-alive follows the
/// node's own power state.
fn follow_power(inner: &WorkerRt, metrics: &crate::wire::HealthMetrics) {
    let on_battery = metrics.battery_percent.is_some() && metrics.charging == Some(false);
    let state = if on_battery {
        POWER_BATTERY
    } else {
        POWER_EXTERNAL
    };
    if inner.worker.power.swap(state, Ordering::Relaxed) == state {
        return;
    }
    for t in &inner.transports {
        if let Err(e) = t.set_on_battery(on_battery) {
            inner.events.publish(
                "transport.power_failed",
                inner.now(),
                json!({ "error": e.to_string() }),
            );
        }
    }
    inner.events.publish(
        "node.power_changed",
        inner.now(),
        json!({ "on_battery": on_battery }),
    );
}

const POWER_EXTERNAL: u8 = 1;
const POWER_BATTERY: u8 = 2;

/// A heartbeat counted as sent; uncounted on drop unless it was.
struct Counted<'a>(&'a AtomicU64, bool);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// How a session ended.
enum Ended {
    /// The primary said goodbye (or refused the hello) with this reason.
    Bye(ByeReason),
    /// The primary's transport refused this key.
    Refused(String),
    /// The connection failed or dropped; `connected` if it had been open.
    Lost { connected: bool, error: String },
}

async fn run_supervisor(inner: Arc<WorkerRt>) {
    let seed = u64::from_le_bytes(
        inner.key.node_id().as_bytes()[..8]
            .try_into()
            .unwrap_or([7; 8]),
    );
    let mut backoff = Backoff::new(
        inner.config.reconnect_base,
        inner.config.reconnect_max,
        seed,
    );
    // Token swaps since the last session opened (at most two: each stored
    // token gets one try).
    let mut swaps = 0;
    loop {
        if *inner.stop.borrow() {
            return;
        }
        let link = match inner.store.load::<PrimaryLinkRecord>("primary") {
            Ok(Some(link)) => link,
            Ok(None) => return,
            Err(e) => {
                // A storage hiccup: try again later.
                inner.events.publish(
                    "session.storage_error",
                    inner.now(),
                    json!({ "error": e.to_string() }),
                );
                if pause(&inner, backoff.next_delay()).await {
                    return;
                }
                continue;
            }
        };
        // Final only on the primary's signed word (`ByeReason::is_permanent`):
        // a rate limit, a lost connection, a transport-level refusal, a
        // timeout, a storage hiccup on either side are retried with backoff.
        let ended = run_session(&inner, &link).await;
        if *inner.stop.borrow() {
            return;
        }
        if !matches!(ended, Ended::Bye(ByeReason::BadToken)) {
            swaps = 0;
        }
        let primary = link.primary.to_string();
        match ended {
            Ended::Bye(ByeReason::TokenRotated) => {
                backoff.reset();
                continue;
            }
            Ended::Bye(ByeReason::BadToken) if swaps < 2 && swap_tokens(&inner) => {
                // A rotation the primary has not committed (or has, and this
                // was the old token): try the other stored token.
                swaps += 1;
                continue;
            }
            // A transport refusal is not authenticated (and may be the
            // primary failing to read its registry): retried with backoff,
            // never final. The worker stops only on the primary's signed word.
            Ended::Refused(reason) => {
                inner.events.publish(
                    "session.lost",
                    inner.now(),
                    json!({ "primary": primary, "error": format!("refused: {reason}") }),
                );
            }
            Ended::Bye(reason) => {
                if reason == ByeReason::Unpaired
                    && let Err(e) = inner.store.remove::<PrimaryLinkRecord>("primary")
                {
                    inner.events.publish(
                        "session.storage_error",
                        inner.now(),
                        json!({ "error": e.to_string() }),
                    );
                }
                inner.events.publish(
                    "session.ended",
                    inner.now(),
                    json!({ "primary": primary, "reason": reason.as_str() }),
                );
                if reason.is_permanent() {
                    return;
                }
            }
            Ended::Lost { connected, error } => {
                if connected {
                    backoff.reset();
                }
                inner.events.publish(
                    "session.lost",
                    inner.now(),
                    json!({ "primary": primary, "error": error }),
                );
            }
        }
        let delay = backoff.next_delay();
        inner.events.publish(
            "session.reconnecting",
            inner.now(),
            json!({ "in_ms": delay.as_millis() as u64, "attempt": backoff.attempts() }),
        );
        if pause(&inner, delay).await {
            return;
        }
    }
}

/// Waits `delay`, or until the worker stops (`true`).
async fn pause(inner: &WorkerRt, delay: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => false,
        () = stopping(inner) => true,
    }
}

/// After `bad_token`: if a rotation left a second token, swaps the two
/// (one batch): the refused one is kept as the fallback, so neither is ever
/// lost before a session opens with the other.
fn swap_tokens(inner: &WorkerRt) -> bool {
    let (Ok(Some(other)), Ok(Some(link))) = (
        inner
            .store
            .load::<TokenFallbackRecord>(TokenFallbackRecord::KEY),
        inner.store.load::<PrimaryLinkRecord>("primary"),
    ) else {
        return false;
    };
    let swapped = PrimaryLinkRecord {
        token: other.token,
        ..link.clone()
    };
    let kept = TokenFallbackRecord {
        token: link.token,
        stored_at: other.stored_at,
    };
    let batch = swapped.put().and_then(|a| Ok(vec![a, kept.put()?]));
    match batch.and_then(|b| inner.store.apply(&b)) {
        Ok(()) => {
            inner.events.publish(
                "session.token_fallback",
                inner.now(),
                json!({ "primary": link.primary.to_string() }),
            );
            true
        }
        Err(_) => false,
    }
}

/// The next verified message from the primary, as an owned future (kept
/// across the driver's waits, so a timer firing never drops a message
/// half-read).
fn next_message(
    inner: &Arc<WorkerRt>,
    conn: &Arc<dyn Connection>,
    guard: &Arc<Mutex<ReplayGuard>>,
) -> impl std::future::Future<Output = Result<Payload, NodeError>> + Send + 'static {
    let (inner, conn, guard) = (inner.clone(), conn.clone(), guard.clone());
    async move { inner.link.recv(conn.as_ref(), &guard, || inner.now()).await }
}

/// One session with the primary: connects, then drives the sans-IO
/// [`WorkerSession`] (hello and welcome deadline, heartbeats, what the
/// primary sends, the device's half of a rotation, the goodbye when the
/// worker stops) until it ends.
async fn run_session(inner: &Arc<WorkerRt>, link: &PrimaryLinkRecord) -> Ended {
    let primary = link.primary;
    let connecting = tokio::select! {
        c = inner.connect(primary, &link.address, Protocol::MESH) => c,
        () = stopping(inner) => return Ended::Bye(ByeReason::Shutdown),
    };
    let conn: Arc<dyn Connection> = match connecting {
        Ok(c) => Arc::from(c),
        // The primary's admission refuses revoked and unknown keys (or
        // could not read its registry).
        Err(TransportError::Refused(reason)) => return Ended::Refused(reason),
        Err(e) => {
            return Ended::Lost {
                connected: false,
                error: e.to_string(),
            };
        }
    };
    let start = std::time::Instant::now();
    let mut session = WorkerSession::new(
        monotonic_since(start),
        link.token,
        inner.config.command_timeout,
        inner.config.heartbeat_interval,
    );
    let session_id = inner.session_id();
    // However this ends (returned, or the task aborted), the session leaves
    // the table, its connection closes and its calls fail.
    let _ended = SessionCleanup {
        inner,
        primary,
        id: session_id,
        conn: conn.clone(),
    };
    // Until the welcome, this connection's own replay state; then the
    // primary's. A receive is armed only once the outputs of the last
    // message are carried out, so the message after the welcome is checked
    // against the primary's guard.
    let mut guard = Arc::new(pre_auth_guard());
    let mut incoming = None;
    let mut stop = std::pin::pin!(stopping(inner));
    let mut stop_seen = false;
    loop {
        while let Some(output) = session.poll_output() {
            match output {
                WorkerOutput::Send(payload) => {
                    if let Err(e) = inner
                        .link
                        .send(conn.as_ref(), primary, payload, inner.now())
                        .await
                    {
                        session.handle_lost(&e.to_string());
                    }
                }
                WorkerOutput::Opened => {
                    opened(inner, &conn, primary, session_id).await;
                    guard = inner.guards.of(primary);
                }
                WorkerOutput::Heartbeat => {
                    if let Err(e) = send_heartbeat(inner, conn.as_ref(), primary).await {
                        session.handle_lost(&e.to_string());
                    }
                }
                WorkerOutput::Deliver(payload) => deliver(inner, &conn, primary, payload).await,
                WorkerOutput::StoreToken(token) => {
                    let stored = store_rotated(inner, link, token).await;
                    session.handle_token_stored(stored);
                }
                WorkerOutput::Close { send_bye } => {
                    // Out of the table first: nothing else (a heartbeat sent
                    // by hand, an event, a command's result) goes out on
                    // this session after the goodbye.
                    SessionCleanup::leave(inner, primary, session_id);
                    if send_bye {
                        let reason = match session.ended() {
                            Some(SessionEnd::Bye(r)) => r.clone(),
                            _ => ByeReason::Shutdown,
                        };
                        let bye = Payload::Session(SessionMessage::Bye {
                            reason: reason.to_string(),
                        });
                        let _ = tokio::time::timeout(
                            Duration::from_secs(2),
                            inner.link.send(conn.as_ref(), primary, bye, inner.now()),
                        )
                        .await;
                    }
                    conn.close();
                }
            }
        }
        if session.is_closed() {
            break;
        }
        let wait = session
            .poll_timeout()
            .map(|at| at.saturating_duration_since(monotonic_since(start)))
            .unwrap_or(Duration::from_secs(3600));
        let receiving =
            incoming.get_or_insert_with(|| Box::pin(next_message(inner, &conn, &guard)));
        tokio::select! {
            received = receiving => {
                incoming = None;
                match received {
                    Ok(payload) => session.handle_message(payload, monotonic_since(start)),
                    Err(e) => session.handle_lost(&e.to_string()),
                }
            }
            () = tokio::time::sleep(wait) => session.handle_timeout(monotonic_since(start)),
            () = &mut stop, if !stop_seen => {
                stop_seen = true;
                session.end();
            }
        }
    }
    match session.ended() {
        Some(SessionEnd::Bye(reason)) => Ended::Bye(reason.clone()),
        Some(SessionEnd::Lost { connected, error }) => Ended::Lost {
            connected: *connected,
            error: error.clone(),
        },
        None => Ended::Lost {
            connected: false,
            error: "the session ended without a reason".into(),
        },
    }
}

/// Ends a session's traces when the session ends, however it ends (its
/// driver returning, or its task aborted): out of the table, its
/// connection closed, its pending calls failed (`connection_lost`).
struct SessionCleanup<'a> {
    inner: &'a WorkerRt,
    primary: NodeId,
    id: u64,
    conn: Arc<dyn Connection>,
}

impl SessionCleanup<'_> {
    /// Takes session `id` with `primary` out of the table (if it is still
    /// the one there).
    fn leave(inner: &WorkerRt, primary: NodeId, id: u64) {
        if inner.sessions.remove_if(&primary, id).is_some() {
            let mut current = lock(&inner.worker.primary);
            if *current == Some(primary) {
                *current = None;
            }
        }
    }
}

impl Drop for SessionCleanup<'_> {
    fn drop(&mut self) {
        Self::leave(self.inner, self.primary, self.id);
        self.conn.close();
        self.inner.calls.fail_session(self.primary, self.id);
    }
}

/// The welcome came: the session is registered as the node's session with
/// its primary, and a fallback token kept from a rotation goes (the token
/// that opened this session works).
async fn opened(inner: &Arc<WorkerRt>, conn: &Arc<dyn Connection>, primary: NodeId, id: u64) {
    let store = inner.store.clone();
    let _ = tokio::task::spawn_blocking(move || {
        if let Ok(Some(_)) = store.load::<TokenFallbackRecord>(TokenFallbackRecord::KEY) {
            let _ = store.apply(&[TokenFallbackRecord::delete(TokenFallbackRecord::KEY)]);
        }
    })
    .await;
    let old = inner.sessions.insert(SessionRef {
        id,
        peer: primary,
        conn: conn.clone(),
        opened_at: inner.now(),
    });
    *lock(&inner.worker.primary) = Some(primary);
    if let Some(old) = old {
        old.conn.close();
    }
    inner.events.publish(
        "session.connected",
        inner.now(),
        json!({ "primary": primary.to_string() }),
    );
}

/// Acts on what the session machine let through from the primary.
async fn deliver(
    inner: &Arc<WorkerRt>,
    conn: &Arc<dyn Connection>,
    primary: NodeId,
    payload: Payload,
) {
    match payload {
        Payload::Command(cmd) => {
            // Run in its own task: a slow handler holds up neither other
            // commands nor the session, within the in-flight cap. If the
            // result cannot be sent, the connection is gone and the session
            // sees it.
            let limit = inner.config.peer_limits.commands_in_flight;
            let running = &inner.worker.commands_running;
            if running.fetch_add(1, Ordering::AcqRel) >= limit {
                running.fetch_sub(1, Ordering::AcqRel);
                inner.stats.commands_refused.fetch_add(1, Ordering::Relaxed);
                let refused = Payload::CommandResult(CommandResult {
                    command_id: cmd.command_id,
                    outcome: CommandOutcome::Err {
                        code: "too_many_commands".into(),
                        message: "this worker runs as many commands as it may".into(),
                    },
                });
                let _ = inner
                    .link
                    .send(conn.as_ref(), primary, refused, inner.now())
                    .await;
                return;
            }
            let (task_inner, task_conn) = (inner.clone(), conn.clone());
            inner.spawn(async move {
                let outcome = handle_command(&task_inner, &cmd).await;
                record_executed(&task_inner, primary, &cmd, &outcome).await;
                task_inner
                    .worker
                    .commands_running
                    .fetch_sub(1, Ordering::AcqRel);
                let result = Payload::CommandResult(CommandResult {
                    command_id: cmd.command_id,
                    outcome,
                });
                let _ = task_inner
                    .link
                    .send(task_conn.as_ref(), primary, result, task_inner.now())
                    .await;
            });
        }
        Payload::CommandResult(r) => {
            inner.calls.complete(primary, r.command_id, r.outcome);
        }
        Payload::ReplicaSync(bytes) => {
            if let Some(sync) = inner.sync_rt() {
                sync.session_frame(primary, bytes);
            }
        }
        Payload::LedgerSync(request) => {
            if let Some(ls) = inner.ledger_sync_rt() {
                ls.session_request(primary, request);
            }
        }
        // Only kinds a primary may publish here reach this far.
        Payload::Event(event) => {
            if let Ok(data) = serde_json::from_str::<Value>(event.data.as_str()) {
                inner.events.publish(&event.kind, inner.now(), data);
            }
        }
        _ => {}
    }
}

/// Phase one of a rotation on the device: the new token and the old one (in
/// case the primary never commits) in one durable batch, off the async
/// threads. `true` once stored; a failure is published and not
/// acknowledged.
async fn store_rotated(inner: &WorkerRt, link: &PrimaryLinkRecord, token: RotatedToken) -> bool {
    let rotated = PrimaryLinkRecord {
        token: *token.expose(),
        ..link.clone()
    };
    let previous = TokenFallbackRecord {
        token: link.token,
        stored_at: inner.now(),
    };
    let store = inner.store.clone();
    let saved = tokio::task::spawn_blocking(move || {
        rotated
            .put()
            .and_then(|a| Ok(vec![a, previous.put()?]))
            .and_then(|batch| store.apply(&batch))
    })
    .await;
    let error = match saved {
        Ok(Ok(())) => return true,
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    };
    inner.events.publish(
        "session.token_save_failed",
        inner.now(),
        json!({ "error": error }),
    );
    false
}

/// The primary's commands: `ping`, `config`, `run_action`.
/// Records in the device's own ledger (if it has one) that it ran `cmd`
/// for `primary`, and how it ended; the primary pulls that ledger over the
/// session. A failure to record is published, not fatal: the command ran.
async fn record_executed(
    inner: &Arc<WorkerRt>,
    primary: NodeId,
    cmd: &Command,
    outcome: &CommandOutcome,
) {
    let Some(ledger) = inner.core.ledger.clone() else {
        return;
    };
    let body = json!({
        "primary": primary.to_string(),
        "command": cmd.name,
        "command_id": cmd.command_id,
        "outcome": match outcome {
            CommandOutcome::Ok(_) => "ok",
            CommandOutcome::Err { code, .. } => code.as_str(),
        },
    });
    let now = inner.now();
    let entry = crate::ledger::Entry::json(
        crate::ledger::record_types::COMMAND_EXECUTED,
        ledger.author(),
        &body,
    );
    let appended =
        tokio::task::spawn_blocking(move || ledger.append(vec![entry], vec![], now)).await;
    if !matches!(appended, Ok(Ok(_))) {
        inner.events.publish(
            "ledger.append_failed",
            inner.now(),
            json!({ "record_type": crate::ledger::record_types::COMMAND_EXECUTED }),
        );
    }
}

async fn handle_command(inner: &WorkerRt, cmd: &Command) -> CommandOutcome {
    let args: Value = match serde_json::from_str(cmd.args.as_str()) {
        Ok(v) => v,
        Err(e) => return invalid_args(&e),
    };
    inner.events.publish(
        "command.received",
        inner.now(),
        json!({ "command": cmd.name }),
    );
    let ok = |v: Value| {
        CommandOutcome::Ok(JsonText::from_value(&v).unwrap_or_else(|_| JsonText::null()))
    };
    match cmd.name.as_str() {
        "ping" => ok(json!({ "pong": true })),
        // The primary has a file for this worker: dial it for files.
        "files.connect" => match inner.core.files_rt() {
            Some(files) => {
                files.dial_back();
                ok(json!({ "ok": true }))
            }
            None => CommandOutcome::Err {
                code: "unavailable".into(),
                message: "this worker does not take files".into(),
            },
        },
        "config" => {
            let (Some(key), Some(value)) =
                (args.get("key").and_then(Value::as_str), args.get("value"))
            else {
                return CommandOutcome::Err {
                    code: "invalid_args".into(),
                    message: "config needs {\"key\": string, \"value\": any}".into(),
                };
            };
            lock(&inner.worker.config).insert(key.to_owned(), value.clone());
            inner.events.publish(
                "config.updated",
                inner.now(),
                json!({ "key": key, "value": value }),
            );
            ok(json!({ "ok": true }))
        }
        "run_action" => {
            let Some(action) = args.get("action").and_then(Value::as_str) else {
                return CommandOutcome::Err {
                    code: "invalid_args".into(),
                    message: "run_action needs {\"action\": name, \"args\": …}".into(),
                };
            };
            let action_args = match JsonText::from_value(args.get("args").unwrap_or(&Value::Null)) {
                Ok(a) => a,
                Err(e) => return invalid_args(&e),
            };
            run_handler(
                inner,
                action,
                &action_args,
                "unknown_action",
                super::Permit::none(),
            )
            .await
        }
        other => CommandOutcome::Err {
            code: "unknown_command".into(),
            message: format!("this worker does not know the command {other:?}"),
        },
    }
}

impl Worker {
    /// Asks `primary` at `addr` to pair. The returned ticket holds the code
    /// to show; the exchange continues in the background.
    pub async fn request_pairing(
        &self,
        primary: NodeId,
        addr: PeerAddr,
    ) -> Result<PairingTicket, NodeError> {
        self.request_pairing_at(primary, &[addr]).await
    }

    /// [`Worker::request_pairing`] with every address discovery reported:
    /// socket addresses are tried in [`dial_order`](crate::discovery::dial_order)
    /// (others as given) until one connects; the one that did is kept for
    /// the session. Fails with the last error if none connects.
    pub async fn request_pairing_at(
        &self,
        primary: NodeId,
        addrs: &[PeerAddr],
    ) -> Result<PairingTicket, NodeError> {
        let inner = self.rt.clone();
        let sockets: Vec<std::net::SocketAddr> = addrs
            .iter()
            .filter_map(|a| match a {
                PeerAddr::Socket(s) => Some(*s),
                _ => None,
            })
            .collect();
        let mut ordered: Vec<PeerAddr> = crate::discovery::dial_order(&sockets)
            .into_iter()
            .map(PeerAddr::Socket)
            .collect();
        ordered.extend(
            addrs
                .iter()
                .filter(|a| !matches!(a, PeerAddr::Socket(_)))
                .cloned(),
        );
        let mut last = NodeError::Unavailable("no address to reach the primary at".into());
        let mut reached = None;
        for a in ordered {
            match inner.connect(primary, &a, Protocol::PAIRING).await {
                Ok(c) => {
                    reached = Some((a, c));
                    break;
                }
                Err(e) => last = e.into(),
            }
        }
        let Some((addr, conn)) = reached else {
            return Err(last);
        };
        let conn: Arc<dyn Connection> = Arc::from(conn);
        let info = DeviceInfo {
            device_id: inner.config.device_id.clone(),
            name: inner.config.name.clone(),
            platform: inner.config.platform,
        };
        let (mut session, request) = DevicePairing::start(
            inner.key.node_id(),
            primary,
            info,
            inner.now(),
            &inner.config.pairing,
        );
        let code = session.code().as_str().to_owned();
        let request_id = session.request_id().to_string();
        inner
            .link
            .send(
                conn.as_ref(),
                primary,
                Payload::Pairing(request),
                inner.now(),
            )
            .await?;
        let (tx, rx) = oneshot::channel();
        let task_inner = inner.clone();
        inner.spawn(async move {
            let inner = task_inner;
            let guard = pre_auth_guard();
            let result = loop {
                let msg = match inner.link.recv(conn.as_ref(), &guard, || inner.now()).await {
                    Ok(Payload::Pairing(m)) => m,
                    Ok(_) => continue,
                    Err(e) => break Err(e),
                };
                match session.handle(primary, msg, &inner.key, inner.now()) {
                    Ok(DeviceStep::Send(reply)) => {
                        if let Err(e) = inner
                            .link
                            .send(conn.as_ref(), primary, Payload::Pairing(reply), inner.now())
                            .await
                        {
                            break Err(e);
                        }
                    }
                    Ok(DeviceStep::CodeMismatch(reply)) => {
                        inner.events.publish(
                            "pairing.code_mismatch",
                            inner.now(),
                            json!({ "primary": primary.to_string() }),
                        );
                        if let Err(e) = inner
                            .link
                            .send(conn.as_ref(), primary, Payload::Pairing(reply), inner.now())
                            .await
                        {
                            break Err(e);
                        }
                        if session.attempts_left() == 0 {
                            // The primary voids it too; a rogue one gets no
                            // further guesses.
                            break Err(PairingError::TooManyAttempts.into());
                        }
                    }
                    Ok(DeviceStep::Paired(grant)) => {
                        let record = PrimaryLinkRecord {
                            primary: grant.primary,
                            address: addr.clone(),
                            token: *grant.token.as_bytes(),
                            paired_at: inner.now(),
                        };
                        break inner.store.save(&record).map_err(NodeError::from);
                    }
                    Err(e) => break Err(e.into()),
                }
            };
            conn.close();
            if result.is_ok() {
                inner.events.publish(
                    "pairing.completed",
                    inner.now(),
                    json!({ "primary": primary.to_string() }),
                );
                supervise(&inner);
            }
            let _ = tx.send(result);
        });
        Ok(PairingTicket {
            code,
            request_id,
            outcome: rx,
        })
    }

    /// Whether the session with the primary is open.
    pub fn is_connected(&self) -> bool {
        self.rt.primary_session().is_some()
    }

    /// The primary this worker is paired with, if any.
    pub fn paired_primary(&self) -> Result<Option<NodeId>, NodeError> {
        Ok(self
            .rt
            .store
            .load::<PrimaryLinkRecord>("primary")?
            .map(|l| l.primary))
    }

    /// A configuration value the primary set.
    pub fn config_value(&self, key: &str) -> Option<Value> {
        lock(&self.rt.worker.config).get(key).cloned()
    }

    /// Sends a heartbeat now (besides the periodic ones), e.g. right after
    /// the app's metrics changed (see [`MetricsSource`](super::MetricsSource)).
    pub async fn send_heartbeat(&self) -> Result<(), NodeError> {
        let inner = &self.rt;
        let session = self.session()?;
        send_heartbeat(inner, session.conn.as_ref(), session.peer).await
    }

    /// The open session with the paired primary.
    fn session(&self) -> Result<SessionRef, NodeError> {
        let primary = self
            .paired_primary()?
            .ok_or_else(|| NodeError::Unavailable("not paired".into()))?;
        self.rt
            .primary_session()
            .filter(|s| s.peer == primary)
            .ok_or(NodeError::NotConnected(primary))
    }

    /// Publishes an event to the primary (needs the `events:write`
    /// scope there): it appears on the primary's bus as `device.event`
    /// with this device, `kind` and `data`.
    pub async fn publish_event(&self, kind: &str, data: Value) -> Result<(), NodeError> {
        let inner = &self.rt;
        if kind.is_empty() || kind.len() > 128 {
            return Err(NodeError::Unavailable(
                "an event kind is 1-128 bytes".into(),
            ));
        }
        let session = self.session()?;
        let event = Payload::Event(crate::wire::EventPayload {
            kind: kind.to_owned(),
            data: JsonText::from_value(&data).map_err(|e| NodeError::Protocol(e.to_string()))?,
        });
        inner
            .link
            .send(session.conn.as_ref(), session.peer, event, inner.now())
            .await
    }

    /// Sends a command to the primary, which checks it against this
    /// worker's policy; returns the handler's result or the refusal.
    pub async fn send_command(&self, name: &str, args: Value) -> Result<Value, NodeError> {
        self.send_command_with(name, args, None).await
    }

    /// [`Worker::send_command`], declaring what the command will use (cost,
    /// tokens, job size) for the primary's policy to judge: a cost against
    /// the device's hourly budget, tokens against the per-call cap, a large
    /// job against the small-jobs-only rule of a laptop on a low battery.
    pub async fn send_command_with(
        &self,
        name: &str,
        args: Value,
        usage: Option<CommandUsage>,
    ) -> Result<Value, NodeError> {
        let inner = &self.rt;
        if let Some(u) = &usage {
            u.validate().map_err(NodeError::Policy)?;
        }
        let session = self.session()?;
        inner.call(&session, name, &args, usage).await
    }
}
