//! The primary's side: accepting pairing and paired sessions, the gate on
//! every message, commands in both directions, revocation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::oneshot;
use zeroize::Zeroizing;

use super::link::{SessionRef, pre_auth_guard};
use super::protocols::ProtocolHandler;
use super::{Core, Node, NodeError, lock};
use crate::clock::monotonic_since;
use crate::events::kinds;
use crate::health::{HealthConfig, HealthMonitor};
use crate::identity::NodeId;
use crate::limits::{KeyedLimiter, TokenBucket};
use crate::pairing::PrimaryPairing;
use crate::pairing::{PairingCode, PairingError};
use crate::registry::Registry;
use crate::registry::scopes;
use crate::session::{ByeReason, DeviceSession, Output, refusals};
use crate::storage::records::{DeviceRecord, PairingRequestRecord};
use crate::transport::{Connection, Protocol};
use crate::wire::MessageId;
use crate::wire::{
    CommandOutcome, CommandResult, HealthMetrics, JsonText, PairingMessage, Payload, Platform,
    SessionMessage,
};
use std::sync::atomic::Ordering;

/// A device waiting in pairing, and whoever waits for its answer.
struct Waiter {
    conn: Arc<dyn Connection>,
    node: NodeId,
    /// Where it connects from (for the per-address cap).
    source: Option<String>,
    answer: Option<oneshot::Sender<Result<DeviceRecord, PairingError>>>,
}

/// The primary's runtime: the shared core and what only a primary has
/// (the registry, pairing, health, the policy, and the state below). The
/// primary's tasks and its [`Primary`] handle hold it.
pub(crate) struct PrimaryRt {
    core: Arc<Core>,
    /// The registry; with a ledger attached, every audited change goes
    /// through it (`Registry::commit`).
    pub(super) registry: Registry,
    pub(super) pairing: PrimaryPairing,
    pub(super) health: Mutex<HealthMonitor>,
    pub(super) policy: Arc<dyn super::CommandPolicy>,
    pub(super) primary: State,
}

impl std::ops::Deref for PrimaryRt {
    type Target = Core;

    fn deref(&self) -> &Core {
        &self.core
    }
}

impl PrimaryRt {
    /// Whether paired device `device` (not revoked) may sync replicated
    /// namespace `ns`: it holds `sync:NS` or `sync:*`.
    pub(super) fn device_may_sync(&self, device: &NodeId, ns: &str) -> bool {
        self.registry.get(device).ok().flatten().is_some_and(|d| {
            d.revoked_at.is_none()
                && (d.has_scope(scopes::SYNC_ALL) || d.has_scope(&format!("sync:{ns}")))
        })
    }

    /// Whether `device` may exchange media streams (paired, unrevoked,
    /// `media:write`).
    pub(super) fn device_may_media(&self, device: &NodeId) -> bool {
        matches!(self.registry.get(device), Ok(Some(d)) if d.revoked_at.is_none() && d.has_scope(scopes::MEDIA_WRITE))
    }

    /// Whether `device` may open a files connection (paired, unrevoked).
    pub(super) fn device_may_connect(&self, device: &NodeId) -> bool {
        super::protocols::paired(&self.registry, device)
    }

    /// Whether `device` may exchange a file of `size` bytes with this
    /// primary: paired, unrevoked, holding `files:write`, and its policy
    /// allows `files.send` for that size (the decision is recorded in the
    /// ledger like any command's). Blocking.
    pub(super) fn files_gate(
        &self,
        device: &NodeId,
        size: u64,
    ) -> Result<(), (super::FilesErrorKind, String)> {
        use super::FilesErrorKind as K;
        let record = match self.registry.get(device) {
            Ok(Some(d)) if d.revoked_at.is_none() => d,
            Ok(_) => return Err((K::Forbidden, format!("{device} is not a paired device"))),
            Err(e) => return Err((K::Busy, e.to_string())),
        };
        if !record.has_scope(scopes::FILES_WRITE) {
            return Err((
                K::Forbidden,
                format!("{device} lacks the {} scope", scopes::FILES_WRITE),
            ));
        }
        let now = self.now();
        let power = super::lock(&self.primary.power).get(device).cloned();
        let request = super::CommandRequest::new(device, FILES_SEND, now)
            .platform(
                power
                    .as_ref()
                    .map_or(crate::wire::Platform::Desktop, |p| p.platform),
            )
            .metrics(power.as_ref().and_then(|p| p.metrics.as_ref()))
            .file_bytes(size);
        let (verdict, _permit) = self.policy.decide(&request);
        if let Err(e) = super::actions::record_decision(self, *device, FILES_SEND, &verdict) {
            return Err((K::Busy, e.to_string()));
        }
        match verdict {
            super::Verdict::Allow => Ok(()),
            super::Verdict::Deny { code, message } if code == "file_too_large" => {
                Err((K::TooLarge, message))
            }
            super::Verdict::Deny { code, message }
            | super::Verdict::NeedsApproval { code, message }
            | super::Verdict::Defer { code, message, .. } => {
                Err((K::Forbidden, format!("files.send: {code}: {message}")))
            }
        }
    }

    pub(super) fn new(core: Arc<Core>, policy: Arc<dyn super::CommandPolicy>) -> Arc<Self> {
        let mut registry = Registry::with_trust(
            core.store.clone(),
            core.events.clone(),
            core.config.trust.clone(),
        );
        if let Some(ledger) = &core.ledger {
            registry = registry.with_ledger(ledger.clone());
        }
        let pairing = PrimaryPairing::new(
            core.key.node_id(),
            core.store.clone(),
            registry.clone(),
            core.events.clone(),
            core.config.pairing.clone(),
        );
        let health = HealthMonitor::new(
            HealthConfig::for_interval(core.config.heartbeat_interval),
            core.events.clone(),
            core.store.clone(),
        );
        Arc::new(PrimaryRt {
            registry,
            pairing,
            health: Mutex::new(health),
            policy,
            primary: State::default(),
            core,
        })
    }

    /// Writes the health state still unwritten (the node stops).
    pub(super) fn flush_health(&self) {
        let _ = lock(&self.health).flush();
    }
}

/// The primary's own protocols, served like any registered one: pairing
/// (any key may ask) and the device session (paired, unrevoked devices).
/// They hold the runtime weakly: the transports hold their admission, and
/// the runtime holds the transports.
pub(super) fn protocols(rt: &Arc<PrimaryRt>) -> Vec<(Protocol, Arc<dyn ProtocolHandler>)> {
    vec![
        (
            Protocol::PAIRING,
            Arc::new(PairingService(Arc::downgrade(rt))),
        ),
        (
            Protocol::MESH,
            Arc::new(SessionService {
                rt: Arc::downgrade(rt),
                registry: rt.registry.clone(),
            }),
        ),
    ]
}

/// Serves [`Protocol::PAIRING`].
struct PairingService(Weak<PrimaryRt>);

impl std::fmt::Debug for PairingService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PairingService")
    }
}

#[async_trait::async_trait]
impl ProtocolHandler for PairingService {
    fn admit(&self, _: &NodeId) -> bool {
        // Pairing is how keys become known; its own limits bound it.
        true
    }

    async fn serve(&self, conn: Arc<dyn Connection>) {
        match self.0.upgrade() {
            Some(rt) => pairing_session(&rt, conn).await,
            None => conn.close(),
        }
    }
}

/// The command a file transfer between a primary and a device is decided
/// as, under the device's policy.
pub const FILES_SEND: &str = "files.send";

/// Serves [`Protocol::MESH`], the device session.
struct SessionService {
    rt: Weak<PrimaryRt>,
    registry: Registry,
}

impl std::fmt::Debug for SessionService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionService")
    }
}

#[async_trait::async_trait]
impl ProtocolHandler for SessionService {
    fn admit(&self, peer: &NodeId) -> bool {
        super::protocols::paired(&self.registry, peer)
    }

    async fn serve(&self, conn: Arc<dyn Connection>) {
        match self.rt.upgrade() {
            Some(rt) => mesh_session(&rt, conn).await,
            None => conn.close(),
        }
    }
}

/// A primary: its handle, with the operations only a primary has (pairing
/// approval, the devices, their policies and actions, revocation). It
/// dereferences to the [`Node`] it is, for what both roles do.
#[derive(Clone)]
pub struct Primary {
    pub(super) node: Node,
    pub(super) rt: Arc<PrimaryRt>,
}

impl std::ops::Deref for Primary {
    type Target = Node;

    fn deref(&self) -> &Node {
        &self.node
    }
}

impl std::fmt::Debug for Primary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.node.fmt(f)
    }
}

impl From<Primary> for Node {
    fn from(p: Primary) -> Node {
        p.node
    }
}

#[derive(Default)]
pub(crate) struct State {
    /// Each device's platform and latest heartbeat metrics (the policy's
    /// power context); entries only for paired devices that opened a
    /// session, dropped on unpair and revocation.
    pub(super) power: Mutex<HashMap<NodeId, PowerContext>>,
    pairings: Mutex<HashMap<String, Waiter>>,
    /// Each device's commands running now (bounded by
    /// `PeerLimits::commands_in_flight`), cancelled on revocation.
    running: Mutex<HashMap<NodeId, HashMap<MessageId, tokio::task::AbortHandle>>>,
    /// Open mesh connections per key (bounded by
    /// `PeerLimits::connections_per_key`).
    mesh_conns: Mutex<HashMap<NodeId, usize>>,
    /// Actions being decided now (approve, reject, void): a transition
    /// claims its action first, so two concurrent approvals run it once.
    pub(super) claimed: Mutex<std::collections::HashSet<String>>,
    /// Token rotations waiting for the device's acknowledgement.
    rotations: Mutex<HashMap<NodeId, Rotation>>,
    /// Serialises policy changes (commit, then install).
    pub(super) policy_changes: Mutex<()>,
    /// Throttles the `pairing.refused` events.
    refusal_events: Mutex<RefusalEvents>,
    /// Rates of new pairing requests (made at the first request).
    pairing_rates: Mutex<Option<PairingRates>>,
    /// Each device's message rate (kept across its sessions; only paired
    /// devices get one, dropped on unpair and revocation).
    rates: Mutex<HashMap<NodeId, Arc<Mutex<TokenBucket>>>>,
    /// Actions waiting for approval, per device (bounded by
    /// `PeerLimits::proposed_actions`; counted from storage at start).
    pub(super) proposed: Mutex<HashMap<NodeId, usize>>,
    /// Web remotes: pending pairings, open sockets.
    pub(super) web: Mutex<super::web::WebState>,
}

/// A token rotation waiting for the device to acknowledge it.
struct Rotation {
    /// The session the new token was sent on.
    session: u64,
    /// `SessionMessage::stored_digest` of the new token.
    digest: [u8; 32],
    acked: oneshot::Sender<()>,
}

/// The token buckets of new pairing requests.
struct PairingRates {
    all: TokenBucket,
    per_source: KeyedLimiter<String>,
}

/// What the policy knows of a device's power.
#[derive(Debug, Clone)]
pub(crate) struct PowerContext {
    pub(super) platform: Platform,
    pub(super) metrics: Option<HealthMetrics>,
}

/// A paired device with its liveness and health.
#[derive(Debug, Clone)]
pub struct DeviceView {
    /// The registry record.
    pub record: DeviceRecord,
    /// Whether a session is open now.
    pub online: bool,
    /// Health status (`healthy`, `degraded`, `offline`), once heartbeats came.
    pub status: Option<String>,
    /// Latest health score 0–100.
    pub score: Option<u8>,
}

pub(super) fn start(inner: &Arc<PrimaryRt>) -> Result<(), NodeError> {
    super::actions::load_policies(inner)?;
    super::actions::count_proposals(inner)?;
    // Requests left by a crash cannot be approved (their devices are no
    // longer connected): the table starts empty.
    inner.pairing.forget_all()?;
    // Accepting (pairing and device sessions) starts with the node's other
    // protocols, in `serve_protocols`.
    let ticking = inner.clone();
    inner.spawn(async move {
        let period = (ticking.config.heartbeat_interval / 2).max(Duration::from_millis(50));
        let mut interval = tokio::time::interval(period);
        loop {
            interval.tick().await;
            let now = ticking.now();
            // Scored under the lock, written after it (and off the async
            // threads): heartbeats never wait behind this fsync.
            let dirty = {
                let mut health = lock(&ticking.health);
                health.tick(now);
                health.take_dirty()
            };
            if let Ok((batch, nodes)) = dirty
                && !batch.is_empty()
            {
                let writing = ticking.clone();
                let written =
                    tokio::task::spawn_blocking(move || writing.store.apply(&batch)).await;
                if !matches!(written, Ok(Ok(()))) {
                    lock(&ticking.health).unflushed(nodes);
                }
            }
            // Checkpoints that fall due by time.
            if let Some(ledger) = &ticking.ledger {
                let _ = ledger.tick(now);
            }
        }
    });
    Ok(())
}

/// One of a key's open mesh connections; uncounted on drop.
struct ConnCount<'a> {
    inner: &'a PrimaryRt,
    node: NodeId,
}

impl<'a> ConnCount<'a> {
    /// Counts a connection of `node`, unless it has as many as it may.
    fn take(inner: &'a PrimaryRt, node: NodeId) -> Option<Self> {
        let mut conns = lock(&inner.primary.mesh_conns);
        let n = conns.entry(node).or_insert(0);
        if *n >= inner.config.peer_limits.connections_per_key {
            return None;
        }
        *n += 1;
        Some(ConnCount { inner, node })
    }
}

impl Drop for ConnCount<'_> {
    fn drop(&mut self) {
        let mut conns = lock(&self.inner.primary.mesh_conns);
        if let Some(n) = conns.get_mut(&self.node) {
            *n -= 1;
            if *n == 0 {
                conns.remove(&self.node);
            }
        }
    }
}

/// The source of a connection for per-address limits: its IPv4 address,
/// or the /64 network of its IPv6 address (any port), or the transport's
/// own name for it. One host on a LAN holds a whole /64 (SLAAC, privacy
/// addresses), so a per-/128 limit would be no limit at all.
fn source_of(conn: &dyn Connection) -> Option<String> {
    match conn.remote_addr()? {
        crate::transport::PeerAddr::Socket(a) => Some(source_key(a.ip())),
        other => Some(other.to_string()),
    }
}

/// The per-address limit key of `ip` (see [`source_of`]).
pub(super) fn source_key(ip: std::net::IpAddr) -> String {
    match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

/// Whether the waiting requests are at a cap (all, or `source`'s) for a
/// new request of `from`; `from`'s own waiting request does not count, since
/// the new one replaces it.
fn pending_full(
    waiting: &HashMap<String, Waiter>,
    limits: &super::PairingLimits,
    from: NodeId,
    source: Option<&str>,
) -> bool {
    let others = || waiting.values().filter(|w| w.node != from);
    let from_source = source.map_or(0, |src| {
        others()
            .filter(|w| w.source.as_deref() == Some(src))
            .count()
    });
    others().count() >= limits.max_pending || from_source >= limits.max_pending_per_address
}

/// Why a new pairing request is refused before it costs anything, if it is.
fn pairing_admission(
    inner: &PrimaryRt,
    from: NodeId,
    source: Option<&str>,
) -> Option<&'static str> {
    let limits = &inner.config.pairing_limits;
    let now = inner.now();
    if pending_full(&lock(&inner.primary.pairings), limits, from, source) {
        return Some("too_many_pending");
    }
    let mut rates = lock(&inner.primary.pairing_rates);
    let rates = rates.get_or_insert_with(|| PairingRates {
        all: TokenBucket::new(limits.rate, now),
        // Bounded: at most this many source addresses remembered.
        per_source: KeyedLimiter::new(limits.rate_per_address, 4096),
    });
    if let Some(src) = source
        && !rates.per_source.try_take(&src.to_owned(), now)
    {
        return Some("rate_limited");
    }
    if !rates.all.try_take(now) {
        return Some("rate_limited");
    }
    None
}

/// Refusals of unauthenticated pairing traffic are counted each, but
/// published at most once per this long (with how many were not): a flood
/// of refused requests must not flood the event bus, and every subscriber
/// with it.
const REFUSAL_EVENT_EVERY: Duration = Duration::from_secs(1);

/// When a `pairing.refused` event may go out next, and how many refusals
/// since the last one were not published.
#[derive(Debug, Default)]
struct RefusalEvents {
    next_at: Option<crate::clock::Timestamp>,
    suppressed: u64,
}

impl RefusalEvents {
    /// Whether to publish one now; if so, how many went unpublished before.
    fn admit(&mut self, now: crate::clock::Timestamp) -> Option<u64> {
        if self.next_at.is_some_and(|at| now < at) {
            self.suppressed += 1;
            return None;
        }
        self.next_at = Some(now.saturating_add(REFUSAL_EVENT_EVERY));
        Some(std::mem::take(&mut self.suppressed))
    }
}

fn refuse_pairing(inner: &PrimaryRt, conn: &dyn Connection, reason: &str, error: Option<String>) {
    inner.stats.pairing_refused.fetch_add(1, Ordering::Relaxed);
    let now = inner.now();
    let publish = lock(&inner.primary.refusal_events).admit(now);
    if let Some(suppressed) = publish {
        inner.events.publish(
            kinds::PAIRING_REFUSED,
            now,
            json!({
                "node": conn.remote_node().to_string(),
                "reason": reason,
                "error": error,
                "suppressed": suppressed,
            }),
        );
    }
    conn.close();
}

pub(super) async fn pairing_session(inner: &Arc<PrimaryRt>, conn: Arc<dyn Connection>) {
    let from = conn.remote_node();
    let source = source_of(conn.as_ref());
    // Bounded before anything is read, verified or stored.
    if let Some(reason) = pairing_admission(inner, from, source.as_deref()) {
        refuse_pairing(inner, conn.as_ref(), reason, None);
        return;
    }
    // This connection's own replay state: an unauthenticated key touches
    // nothing that paired devices use.
    let guard = pre_auth_guard();
    let first = tokio::time::timeout(
        inner.config.command_timeout,
        inner.link.recv(conn.as_ref(), &guard, || inner.now()),
    )
    .await;
    let Ok(Ok(Payload::Pairing(request @ PairingMessage::Request { .. }))) = first else {
        conn.close();
        return;
    };
    let PairingMessage::Request { request_id, .. } = &request else {
        return;
    };
    let rid = request_id.to_string();
    // Waiting before the request is announced, so an approval can find it.
    // One live request per key: a new one replaces the old.
    let replaced = {
        let mut waiting = lock(&inner.primary.pairings);
        // Checked again under the lock that inserts: several connections
        // may have passed the first check before any was waiting.
        if pending_full(
            &waiting,
            &inner.config.pairing_limits,
            from,
            source.as_deref(),
        ) {
            drop(waiting);
            refuse_pairing(inner, conn.as_ref(), "too_many_pending", None);
            return;
        }
        let old: Vec<String> = waiting
            .iter()
            .filter(|(_, w)| w.node == from)
            .map(|(id, _)| id.clone())
            .collect();
        if waiting.get(&rid).is_some_and(|w| w.node != from) {
            // Another key's request id: refused, and that request untouched.
            drop(waiting);
            refuse_pairing(inner, conn.as_ref(), "invalid_request", None);
            return;
        }
        let replaced: Vec<Waiter> = old.iter().filter_map(|id| waiting.remove(id)).collect();
        waiting.insert(
            rid.clone(),
            Waiter {
                conn: conn.clone(),
                node: from,
                source: source.clone(),
                answer: None,
            },
        );
        replaced
    };
    for w in replaced {
        w.conn.close();
    }
    if let Err(e) = inner.pairing.on_request(from, request, inner.now()) {
        lock(&inner.primary.pairings).remove(&rid);
        refuse_pairing(inner, conn.as_ref(), "invalid_request", Some(e.to_string()));
        return;
    }
    let idle = inner.config.pairing_limits.idle_timeout;
    // A pairing exchange is a handful of messages: more than this many a
    // second (each costs a signature check) ends the connection.
    let mut rate = TokenBucket::new(crate::limits::Rate::per_second(2.0, 10), inner.now());
    loop {
        let msg = match tokio::time::timeout(
            idle,
            inner.link.recv(conn.as_ref(), &guard, || inner.now()),
        )
        .await
        {
            Ok(Ok(Payload::Pairing(m))) => m,
            // Anything else on a pairing connection breaks the protocol;
            // silence past the idle deadline ends it too.
            Ok(Ok(_) | Err(_)) | Err(_) => break,
        };
        if !rate.try_take(inner.now()) {
            inner.stats.messages_refused.fetch_add(1, Ordering::Relaxed);
            break;
        }
        let result = inner.pairing.on_message(from, msg, inner.now());
        let answer = lock(&inner.primary.pairings)
            .get_mut(&rid)
            .and_then(|w| w.answer.take());
        match result {
            Ok(paired) => {
                let sent = inner
                    .link
                    .send(
                        conn.as_ref(),
                        from,
                        Payload::Pairing(paired.reply),
                        inner.now(),
                    )
                    .await;
                if let Some(tx) = answer {
                    let _ = tx.send(match sent {
                        Ok(()) => Ok(paired.device),
                        Err(e) => Err(PairingError::Invalid(format!("sending the grant: {e}"))),
                    });
                }
                break;
            }
            Err(e) => {
                let over = matches!(e, PairingError::TooManyAttempts | PairingError::Expired);
                if let Some(tx) = answer {
                    let _ = tx.send(Err(e));
                }
                if over {
                    break;
                }
            }
        }
    }
    lock(&inner.primary.pairings).remove(&rid);
    conn.close();
    // The request cannot be approved without its connection: its row goes.
    if let Err(e) = inner.pairing.forget(&rid) {
        inner.events.publish(
            "pairing.prune_failed",
            inner.now(),
            json!({ "request_id": rid, "error": e.to_string() }),
        );
    }
}

pub(super) async fn mesh_session(inner: &Arc<PrimaryRt>, conn: Arc<dyn Connection>) {
    let node = conn.remote_node();
    let Some(_counted) = ConnCount::take(inner, node) else {
        inner
            .stats
            .connections_refused
            .fetch_add(1, Ordering::Relaxed);
        conn.close();
        return;
    };
    // The session's protocol is the sans-IO `DeviceSession`; this drives it.
    // The hello deadline runs on a monotonic clock (a wall-clock jump
    // neither ends nor prolongs it).
    let start = Instant::now();
    let mut session = DeviceSession::new(monotonic_since(start), inner.config.command_timeout);
    let wait = session
        .poll_timeout()
        .map(|at| at.saturating_duration_since(monotonic_since(start)))
        .unwrap_or_default();
    let first = tokio::time::timeout(
        wait,
        inner
            .link
            .recv(conn.as_ref(), &pre_auth_guard(), || inner.now()),
    )
    .await;
    let mut device = None;
    let token = match first {
        Ok(Ok(payload)) => session.handle_hello(payload, monotonic_since(start), |token| {
            device = Some(
                inner
                    .registry
                    .check(&node, &token[..], scopes::PRESENCE_WRITE)?,
            );
            Ok(())
        }),
        // Nothing verifiable came: the connection goes without a word.
        Ok(Err(_)) => {
            session.handle_lost();
            None
        }
        Err(_) => {
            session.handle_timeout(monotonic_since(start));
            None
        }
    };
    let token = Zeroizing::new(token.unwrap_or([0; 32]));
    let id = inner.session_id();
    while let Some(output) = session.poll_output() {
        match output {
            Output::Opened => {
                // Opened only after the gate passed, which gave the record.
                if let Some(platform) = device.as_ref().map(|d| d.platform) {
                    lock(&inner.primary.power)
                        .entry(node)
                        .and_modify(|p| p.platform = platform)
                        .or_insert(PowerContext {
                            platform,
                            metrics: None,
                        });
                }
                let old = inner.sessions.insert(SessionRef {
                    id,
                    peer: node,
                    conn: conn.clone(),
                    opened_at: inner.now(),
                });
                if let Some(old) = old {
                    old.conn.close();
                }
                // What the device wrote in its ledger (while away too).
                if let Some(ls) = inner.ledger_sync_rt() {
                    ls.device_opened(node);
                }
            }
            Output::Send(payload) => {
                if inner
                    .link
                    .send(conn.as_ref(), node, payload, inner.now())
                    .await
                    .is_err()
                {
                    session.handle_lost();
                }
            }
            Output::Close { reason, send_bye } => {
                if send_bye {
                    bye(inner, conn.as_ref(), node, &reason).await;
                }
                conn.close();
            }
            Output::Deliver(_) | Output::Refuse { .. } => {}
        }
    }
    if !session.is_open() {
        inner.sessions.remove_if(&node, id);
        conn.close();
        return;
    }
    inner.events.publish(
        kinds::PEER_JOINED,
        inner.now(),
        json!({ "node": node.to_string(), "scope": "device" }),
    );
    serve(inner, conn.as_ref(), node, id, &token, &mut session).await;
    // Revoked or unpaired while the session started: its bucket (made
    // after the revocation dropped the old one) goes too.
    if !super::protocols::paired(&inner.registry, &node) {
        lock(&inner.primary.rates).remove(&node);
    }
    inner.sessions.remove_if(&node, id);
    conn.close();
    inner.calls.fail_session(node, id);
    inner.events.publish(
        kinds::PEER_LEFT,
        inner.now(),
        json!({ "node": node.to_string(), "scope": "device" }),
    );
}

/// The session loop: every message goes through the session machine (rate,
/// scope, gate) and the driver carries out what it says.
async fn serve(
    inner: &Arc<PrimaryRt>,
    conn: &dyn Connection,
    node: NodeId,
    session_id: u64,
    token: &[u8; 32],
    session: &mut DeviceSession,
) {
    // The device's own replay state and message rate, made now that its
    // token passed; both outlive the session (reconnecting refills
    // neither) and go when the device is unpaired or revoked.
    let guard = inner.guards.of(node);
    let rate = rate_of(inner, node);
    loop {
        let Ok((payload, arrived)) = inner.link.recv_timed(conn, &guard, || inner.now()).await
        else {
            session.handle_lost();
            return;
        };
        // The bucket is locked only to take a token, not across the gate.
        session.handle_message(
            payload,
            inner.now(),
            |now| lock(&rate).try_take(now),
            |scope| inner.registry.check(&node, token, scope).map(|_| ()),
        );
        while let Some(output) = session.poll_output() {
            match output {
                Output::Deliver(payload) => {
                    deliver(inner, conn, node, session_id, payload, arrived).await
                }
                Output::Refuse {
                    command_id,
                    code,
                    message,
                } => {
                    if code == refusals::RATE_LIMITED {
                        inner.stats.messages_refused.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(id) = command_id {
                        refuse_command(inner, conn, node, id, code, &message).await;
                    }
                }
                Output::Send(payload) => {
                    let _ = inner.link.send(conn, node, payload, inner.now()).await;
                }
                Output::Close { reason, send_bye } => {
                    if send_bye {
                        bye(inner, conn, node, &reason).await;
                    }
                    return;
                }
                Output::Opened => {}
            }
        }
    }
}

/// `node`'s message bucket, shared by all its sessions.
fn rate_of(inner: &PrimaryRt, node: NodeId) -> Arc<Mutex<TokenBucket>> {
    lock(&inner.primary.rates)
        .entry(node)
        .or_insert_with(|| {
            Arc::new(Mutex::new(TokenBucket::new(
                inner.config.peer_limits.messages,
                inner.now(),
            )))
        })
        .clone()
}

/// Acts on a message the session machine let through.
async fn deliver(
    inner: &Arc<PrimaryRt>,
    conn: &dyn Connection,
    node: NodeId,
    session_id: u64,
    payload: Payload,
    arrived: std::time::Instant,
) {
    match payload {
        Payload::Heartbeat(hb) => {
            let now = inner.now();
            // Counted before the health update publishes its events.
            inner.stats.heartbeat_received();
            let ingested = lock(&inner.health).ingest(node, now, &hb.metrics);
            if ingested.is_ok()
                && let Some(p) = lock(&inner.primary.power).get_mut(&node)
            {
                p.metrics = Some(hb.metrics);
            }
            inner.stats.heartbeat_timed(arrived.elapsed());
            if let Err(e) = ingested {
                inner.events.publish(
                    "health.rejected",
                    now,
                    json!({ "node": node.to_string(), "error": e.to_string() }),
                );
            }
        }
        Payload::Command(cmd) => start_command(inner, conn, node, cmd).await,
        Payload::CommandResult(r) => {
            inner.calls.complete(node, r.command_id, r.outcome);
        }
        // A worker's event: republished under one kind of its own, so a
        // device cannot pose as the primary's own events.
        Payload::Event(event) => {
            let data: Value = serde_json::from_str(event.data.as_str()).unwrap_or(Value::Null);
            inner.events.publish(
                kinds::DEVICE_EVENT,
                inner.now(),
                json!({ "device": node.to_string(), "kind": event.kind, "data": data }),
            );
        }
        Payload::ReplicaSync(bytes) => {
            if let Some(sync) = inner.sync_rt() {
                sync.session_frame(node, bytes);
            }
        }
        Payload::LedgerSync(answer) => {
            if let Some(ls) = inner.ledger_sync_rt() {
                ls.session_answer(node, answer);
            }
        }
        Payload::Session(SessionMessage::TokenStored { digest }) => {
            // Only the acknowledgement of this rotation's token, on the
            // session it was sent on, completes it.
            let mut rotations = lock(&inner.primary.rotations);
            if rotations
                .get(&node)
                .is_some_and(|r| r.session == session_id && r.digest == digest)
                && let Some(r) = rotations.remove(&node)
            {
                let _ = r.acked.send(());
            }
        }
        _ => {}
    }
}

/// Answers `cmd` with a failure `code` without running it.
async fn refuse_command(
    inner: &PrimaryRt,
    conn: &dyn Connection,
    node: NodeId,
    command_id: MessageId,
    code: &str,
    message: &str,
) {
    let result = Payload::CommandResult(CommandResult {
        command_id,
        outcome: CommandOutcome::Err {
            code: code.into(),
            message: message.into(),
        },
    });
    let _ = inner.link.send(conn, node, result, inner.now()).await;
}

/// Decides and runs a worker's command in a task of its own (a slow
/// handler or a deferral holds up nothing else), within the device's
/// in-flight cap; the task is registered so revocation can cancel it.
async fn start_command(
    inner: &Arc<PrimaryRt>,
    conn: &dyn Connection,
    node: NodeId,
    cmd: crate::wire::Command,
) {
    let command_id = cmd.command_id;
    let refusal = {
        let mut running = lock(&inner.primary.running);
        let mine = running.entry(node).or_default();
        if mine.contains_key(&cmd.command_id) {
            Some(("duplicate_command", "a command with this id is running"))
        } else if mine.len() >= inner.config.peer_limits.commands_in_flight {
            Some((
                "too_many_commands",
                "this device has as many commands running as it may",
            ))
        } else {
            let (task_inner, reply_conn) = (inner.clone(), session_conn(inner, &node));
            let id = cmd.command_id;
            // Registered before the task can finish: it deregisters itself
            // under the same lock.
            let task = tokio::spawn(async move {
                let outcome = super::actions::on_worker_command(&task_inner, node, &cmd).await;
                if let Some(m) = lock(&task_inner.primary.running).get_mut(&node) {
                    m.remove(&id);
                }
                let result = Payload::CommandResult(CommandResult {
                    command_id: cmd.command_id,
                    outcome,
                });
                if let Some(conn) = reply_conn {
                    let _ = task_inner
                        .link
                        .send(conn.as_ref(), node, result, task_inner.now())
                        .await;
                }
            });
            mine.insert(id, task.abort_handle());
            None
        }
    };
    if let Some((code, message)) = refusal {
        inner.stats.commands_refused.fetch_add(1, Ordering::Relaxed);
        refuse_command(inner, conn, node, command_id, code, message).await;
    }
}

/// Cancels `node`'s running and deferred commands (revoked, unpaired).
fn cancel_commands(inner: &PrimaryRt, node: &NodeId) {
    if let Some(tasks) = lock(&inner.primary.running).remove(node) {
        for (_, t) in tasks {
            t.abort();
        }
    }
}

/// Cancels every device's commands (the node stops).
pub(super) fn cancel_all_commands(inner: &PrimaryRt) {
    for (_, tasks) in lock(&inner.primary.running).drain() {
        for (_, t) in tasks {
            t.abort();
        }
    }
}

async fn bye(inner: &PrimaryRt, conn: &dyn Connection, to: NodeId, reason: &ByeReason) {
    let msg = Payload::Session(SessionMessage::Bye {
        reason: reason.as_str().to_owned(),
    });
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        inner.link.send(conn, to, msg, inner.now()),
    )
    .await;
    conn.close();
}

/// The open session's connection to `node`, if any.
pub(super) fn session_conn(inner: &PrimaryRt, node: &NodeId) -> Option<Arc<dyn Connection>> {
    inner.sessions.get(node).map(|s| s.conn)
}

/// Runs the handler registered as `name` with `args` on a blocking thread
/// (host code may block: file I/O, a call into Swift or Kotlin), waiting at
/// most the command timeout. A handler that panics or overruns fails the
/// command (`handler_panicked`, `handler_timeout`); it never takes the node
/// down.
pub(super) async fn run_handler(
    inner: &Core,
    name: &str,
    args: &JsonText,
    missing_code: &str,
    permit: super::Permit,
) -> CommandOutcome {
    let Some(handler) = inner.handlers.get(name).cloned() else {
        return CommandOutcome::Err {
            code: missing_code.into(),
            message: format!("no handler is registered for {name:?}"),
        };
    };
    let args: Value = match serde_json::from_str(args.as_str()) {
        Ok(v) => v,
        Err(e) => return invalid_args(&e),
    };
    let timeout = inner.config.command_timeout;
    // The permit (a policy's concurrency slot) lives on the handler's
    // thread: a handler that overruns its timeout keeps its slot until it
    // really ends.
    let running = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        handler.call(&args)
    });
    match tokio::time::timeout(timeout, running).await {
        Ok(Ok(Ok(v))) => match JsonText::from_value(&v) {
            Ok(json) => CommandOutcome::Ok(json),
            Err(e) => CommandOutcome::Err {
                code: "handler_failed".into(),
                message: format!("the handler for {name:?} returned an unsendable result: {e}"),
            },
        },
        Ok(Ok(Err(message))) => CommandOutcome::Err {
            code: "handler_failed".into(),
            message,
        },
        Ok(Err(_)) => CommandOutcome::Err {
            code: "handler_panicked".into(),
            message: format!("the handler for {name:?} panicked"),
        },
        Err(_) => CommandOutcome::Err {
            code: "handler_timeout".into(),
            message: format!("the handler for {name:?} took longer than {timeout:?}"),
        },
    }
}

/// The outcome of a command whose arguments are not what it takes.
pub(super) fn invalid_args(e: &dyn std::fmt::Display) -> CommandOutcome {
    CommandOutcome::Err {
        code: "invalid_args".into(),
        message: format!("the command's arguments are not valid JSON: {e}"),
    }
}

/// Ends `node`'s session with `reason`, if it has one.
async fn end_session(inner: &PrimaryRt, node: &NodeId, reason: ByeReason) {
    let session = inner.sessions.remove(node);
    if let Some(s) = session {
        bye(inner, s.conn.as_ref(), *node, &reason).await;
    }
}

/// Closes every connection without goodbyes: for a node dropped without
/// `shutdown`.
pub(super) fn close_now(inner: &PrimaryRt) {
    cancel_all_commands(inner);
    for s in inner.sessions.drain() {
        s.conn.close();
    }
    for (_, w) in lock(&inner.primary.pairings).drain() {
        w.conn.close();
    }
}

pub(super) async fn close_all(inner: &Arc<PrimaryRt>, reason: ByeReason) {
    cancel_all_commands(inner);
    // Every goodbye at once, within one deadline: a thousand dead links
    // cost the same few seconds as one.
    let mut byes = tokio::task::JoinSet::new();
    for s in inner.sessions.drain() {
        let (rt, reason) = (inner.clone(), reason.clone());
        byes.spawn(async move { bye(&rt, s.conn.as_ref(), s.peer, &reason).await });
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), byes.join_all()).await;
    let waiting: Vec<Waiter> = lock(&inner.primary.pairings)
        .drain()
        .map(|(_, w)| w)
        .collect();
    for w in waiting {
        w.conn.close();
    }
}

impl Primary {
    /// Pairing requests waiting for the user.
    pub fn pending_pairings(&self) -> Result<Vec<PairingRequestRecord>, NodeError> {
        let inner = &self.rt;
        Ok(inner.pairing.pending(inner.now())?)
    }

    /// Approves a pending request with the code the device shows; returns
    /// the new device once the device confirmed the code. A wrong code fails
    /// with [`PairingError::InvalidCode`] and the request stays pending.
    pub async fn approve_pairing(
        &self,
        request_id: &str,
        code: &str,
    ) -> Result<DeviceRecord, NodeError> {
        if self.is_web_request(request_id) {
            return self.approve_web_pairing(request_id, code).await;
        }
        let inner = &self.rt;
        let code = PairingCode::parse(code)?;
        let conn = lock(&inner.primary.pairings)
            .get(request_id)
            .map(|w| (w.conn.clone(), w.node));
        let Some((conn, node)) = conn else {
            if !self
                .pending_pairings()?
                .iter()
                .any(|r| r.request_id == request_id)
            {
                return Err(PairingError::UnknownRequest(request_id.to_owned()).into());
            }
            return Err(NodeError::Unavailable(format!(
                "the device of request {request_id} is not connected; it must ask again"
            )));
        };
        // (A storage write: on a blocking thread.)
        let (rt, rid, now) = (inner.clone(), request_id.to_owned(), inner.now());
        let (to, challenge) =
            tokio::task::spawn_blocking(move || rt.pairing.approve(&rid, &code, now))
                .await
                .map_err(|e| NodeError::Unavailable(format!("approving did not finish: {e}")))??;
        if to != node {
            return Err(NodeError::Protocol(format!(
                "request {request_id} belongs to {to}, but {node} is waiting on it"
            )));
        }
        let (tx, rx) = oneshot::channel();
        if let Some(w) = lock(&inner.primary.pairings).get_mut(request_id) {
            w.answer = Some(tx);
        }
        inner
            .link
            .send(conn.as_ref(), to, Payload::Pairing(challenge), inner.now())
            .await?;
        match tokio::time::timeout(inner.config.command_timeout, rx).await {
            Ok(Ok(result)) => Ok(result?),
            Ok(Err(_)) => Err(NodeError::NotConnected(node)),
            Err(_) => Err(NodeError::Timeout(inner.config.command_timeout)),
        }
    }

    /// Rejects a pending request; the device is told.
    pub async fn reject_pairing(
        &self,
        request_id: &str,
        reason: Option<String>,
    ) -> Result<(), NodeError> {
        if self.is_web_request(request_id) {
            return self.reject_web_pairing(request_id, reason);
        }
        let inner = &self.rt;
        // (A registry and ledger write: on a blocking thread.)
        let (rt, rid, now) = (inner.clone(), request_id.to_owned(), inner.now());
        let (to, msg) = tokio::task::spawn_blocking(move || rt.pairing.reject(&rid, reason, now))
            .await
            .map_err(|e| NodeError::Unavailable(format!("rejecting did not finish: {e}")))??;
        let waiter = lock(&inner.primary.pairings).remove(request_id);
        if let Some(w) = waiter {
            let _ = inner
                .link
                .send(w.conn.as_ref(), to, Payload::Pairing(msg), inner.now())
                .await;
            w.conn.close();
        }
        Ok(())
    }

    /// Paired devices with liveness and health.
    pub fn devices(&self) -> Result<Vec<DeviceView>, NodeError> {
        let inner = &self.rt;
        let health = lock(&inner.health);
        Ok(inner
            .registry
            .list()?
            .into_iter()
            .map(|record| {
                let h = health.device(&record.node);
                DeviceView {
                    online: inner.sessions.contains(&record.node) || self.web_online(&record.node),
                    status: h.map(|h| h.status().as_str().to_owned()),
                    score: h.and_then(|h| h.score()),
                    record,
                }
            })
            .collect())
    }

    /// `ping` → `pong`: the round-trip time to a worker.
    pub async fn ping(&self, device: &NodeId) -> Result<Duration, NodeError> {
        let start = Instant::now();
        let pong = self.command(device, "ping", json!({})).await?;
        if pong.get("pong") != Some(&Value::Bool(true)) {
            return Err(NodeError::Protocol(format!(
                "unexpected ping answer {pong}"
            )));
        }
        Ok(start.elapsed())
    }

    /// Sets a configuration key on a worker.
    pub async fn configure(
        &self,
        device: &NodeId,
        key: &str,
        value: Value,
    ) -> Result<(), NodeError> {
        self.command(device, "config", json!({ "key": key, "value": value }))
            .await
            .map(|_| ())
    }

    /// Runs the handler a worker registered as `action`.
    pub async fn run_action(
        &self,
        device: &NodeId,
        action: &str,
        args: Value,
    ) -> Result<Value, NodeError> {
        self.command(
            device,
            "run_action",
            json!({ "action": action, "args": args }),
        )
        .await
    }

    /// Revokes a device: its session closes now and it is refused from now on.
    pub async fn revoke(&self, device: &NodeId) -> Result<(), NodeError> {
        self.cut_off(*device, true).await
    }

    /// Unpairs a device: its session closes now and its record is removed.
    pub async fn unpair(&self, device: &NodeId) -> Result<(), NodeError> {
        self.cut_off(*device, false).await
    }

    /// Revokes (`revoke`) or unpairs a device, in a task of its own that
    /// runs to the end even if the caller stops waiting (a dashboard tab
    /// closed, a coroutine cancelled): half done, the registry would refuse
    /// the device while its session, commands and actions lived on.
    async fn cut_off(&self, device: NodeId, revoke: bool) -> Result<(), NodeError> {
        let rt = self.rt.clone();
        let task = tokio::spawn(async move {
            let inner = &rt;
            // The registry writes (SQLite, the ledger) on a blocking thread.
            let (registry, now) = (inner.registry.clone(), inner.now());
            tokio::task::spawn_blocking(move || {
                if revoke {
                    registry.revoke(&device, now)
                } else {
                    registry.unpair(&device, now)
                }
            })
            .await
            .map_err(|e| NodeError::Unavailable(format!("the registry write failed: {e}")))??;
            inner.guards.forget(&device);
            cancel_commands(inner, &device);
            lock(&inner.primary.power).remove(&device);
            lock(&inner.primary.rates).remove(&device);
            let (reason, why) = if revoke {
                (ByeReason::Revoked, "revoked")
            } else {
                (ByeReason::Unpaired, "unpaired")
            };
            end_session(inner, &device, reason).await;
            super::actions::void_actions(inner, &device, why).await?;
            Ok(())
        });
        task.await.map_err(|e| {
            NodeError::Unavailable(format!("cutting off {device} did not finish: {e}"))
        })?
    }

    /// The metrics `device` reported in its latest heartbeat (battery,
    /// CPU, replicated changes its primary lacks (`messages_pending`) and
    /// for how long (`sync_lag_ms`), …), if one came since this node
    /// started.
    pub fn device_metrics(&self, device: &NodeId) -> Option<crate::wire::HealthMetrics> {
        lock(&self.rt.primary.power)
            .get(device)
            .and_then(|p| p.metrics.clone())
    }

    /// Replaces a device's scopes (recorded in the ledger). A session
    /// already open is checked against the new scopes from its next message.
    pub fn set_scopes(&self, device: &NodeId, scopes: &[&str]) -> Result<DeviceRecord, NodeError> {
        let inner = &self.rt;
        Ok(inner.registry.set_scopes(device, scopes, inner.now())?)
    }

    /// Rotates a connected device's token in two phases: the new token is
    /// sent, the device stores it durably and acknowledges, and only then
    /// does it become the only one (the old one is refused from then on;
    /// the device reconnects with the new one). Fails with
    /// [`NodeError::DeviceOffline`] if the device is not connected (see
    /// [`Primary::rotate_token_forced`]), and with a timeout if no
    /// acknowledgement comes (the old token then stays valid).
    pub async fn rotate_token(&self, device: &NodeId) -> Result<(), NodeError> {
        let inner = &self.rt;
        let session = inner
            .sessions
            .get(device)
            .ok_or(NodeError::DeviceOffline(*device))?;
        let token = crate::registry::DeviceToken::generate();
        let (tx, rx) = oneshot::channel();
        {
            let mut rotations = lock(&inner.primary.rotations);
            if rotations.contains_key(device) {
                return Err(NodeError::Unavailable(format!(
                    "a rotation of {device}'s token is already waiting for the device"
                )));
            }
            rotations.insert(
                *device,
                Rotation {
                    session: session.id,
                    digest: SessionMessage::stored_digest(token.as_bytes()),
                    acked: tx,
                },
            );
        }
        let msg = Payload::Session(SessionMessage::TokenRotated {
            token: *token.as_bytes(),
        });
        let sent = inner
            .link
            .send(session.conn.as_ref(), *device, msg, inner.now())
            .await;
        let acked = match sent {
            Ok(()) => tokio::time::timeout(inner.config.command_timeout, rx).await,
            Err(e) => {
                lock(&inner.primary.rotations).remove(device);
                return Err(e);
            }
        };
        match acked {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(NodeError::NotConnected(*device)),
            Err(_) => {
                lock(&inner.primary.rotations).remove(device);
                return Err(NodeError::Timeout(inner.config.command_timeout));
            }
        }
        inner
            .registry
            .rotate_token_to(device, &token, inner.now())?;
        let session = inner.sessions.remove(device);
        if let Some(s) = session {
            bye(inner, s.conn.as_ref(), *device, &ByeReason::TokenRotated).await;
        }
        Ok(())
    }

    /// Rotates a device's token without its acknowledgement, connected or
    /// not: the old token is refused at once, and a device that does not
    /// receive the new one must pair again.
    pub async fn rotate_token_forced(&self, device: &NodeId) -> Result<(), NodeError> {
        let inner = &self.rt;
        let token = inner.registry.rotate_token(device, inner.now())?;
        let session = inner.sessions.remove(device);
        if let Some(s) = session {
            let msg = Payload::Session(SessionMessage::TokenRotated {
                token: *token.as_bytes(),
            });
            let _ = inner
                .link
                .send(s.conn.as_ref(), *device, msg, inner.now())
                .await;
            bye(inner, s.conn.as_ref(), *device, &ByeReason::TokenRotated).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod source_tests {
    use super::{RefusalEvents, source_key};

    #[test]
    fn refusal_events_go_out_once_a_second_with_the_count_left_out() {
        let t = crate::clock::Timestamp::from_millis;
        let mut e = RefusalEvents::default();
        assert_eq!(e.admit(t(1_000)), Some(0));
        for ms in 1_001..2_000 {
            assert_eq!(e.admit(t(ms)), None);
        }
        assert_eq!(e.admit(t(2_000)), Some(999));
        assert_eq!(e.admit(t(2_500)), None);
        assert_eq!(e.admit(t(9_000)), Some(1));
    }

    #[test]
    fn ipv6_sources_are_limited_per_64_and_ipv4_per_address() {
        let a = source_key("2001:db8:1:2::1".parse().unwrap());
        let b = source_key("2001:db8:1:2:ffff:1234:5678:9abc".parse().unwrap());
        let c = source_key("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, "2001:db8:1:2::/64");
        assert_eq!(a, b, "one /64, one source");
        assert_ne!(a, c);
        assert_eq!(source_key("10.0.0.7".parse().unwrap()), "10.0.0.7");
        // An IPv4-mapped IPv6 address is its IPv4 address.
        assert_eq!(source_key("::ffff:10.0.0.7".parse().unwrap()), "10.0.0.7");
        assert_eq!(source_key("fe80::1".parse().unwrap()), "fe80:0:0:0::/64");
    }
}
