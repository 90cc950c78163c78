//! The gateway's HTTP side (axum): the WebSocket at `/rpc`, the dashboard's
//! files, `/healthz`; per-socket state (principal, subscriptions, a
//! bounded queue to its writer), connection limits, the `Origin` check,
//! and closing the sockets of a device that is revoked, unpaired or given
//! a new token.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use mesh_core::clock::Timestamp;
use mesh_core::events::{Event, Received, kinds};
use mesh_core::identity::NodeId;
use mesh_core::node::Primary;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use super::auth::{AdminToken, Principal};
use super::rpc::{self, RpcError};
use super::{GatewayConfig, assets, methods};

/// Largest message taken; a larger one closes the socket with 1009.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Messages queued for a socket's writer; beyond, events are dropped and
/// the socket told it lagged.
const OUT_QUEUE: usize = 512;
/// Subscriptions per socket, and patterns per subscription.
const MAX_SUBSCRIPTIONS: usize = 16;
const MAX_PATTERNS: usize = 8;
/// Events buffered per subscription pattern on the bus.
const EVENT_BUFFER: usize = 256;
/// Requests of one socket handled at once.
const IN_FLIGHT: usize = 16;
/// Close code: the device was revoked, unpaired or re-tokened.
const CLOSE_POLICY: u16 = 1008;
/// Close code: message too big.
const CLOSE_TOO_BIG: u16 = 1009;
/// A write the client does not take within this closes the socket.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Queued messages written with one flush, at most.
const WRITE_BATCH: usize = 64;
/// An anonymous socket that neither signs in nor asks to pair within this
/// is closed.
const ANONYMOUS_GRACE: Duration = Duration::from_secs(60);
/// Failed sign-ins a socket may make before it is closed.
const MAX_FAILED_LOGINS: u32 = 5;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The client's address, as the listener saw it (TCP or TLS).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientAddr(pub(crate) SocketAddr);

/// What every socket shares.
pub(crate) struct Shared {
    pub(crate) primary: Primary,
    pub(crate) admin: AdminToken,
    config: GatewayConfig,
    sockets: Mutex<HashMap<u64, Arc<Socket>>>,
    next_socket: AtomicU64,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    total: AtomicUsize,
    local: SocketAddr,
    event_texts: Arc<EventTexts>,
    /// Counts the device changes the watcher acted on: a socket whose
    /// device token was checked before a change and registered after it
    /// (so the watcher could not see it) is checked again.
    standing: AtomicU64,
}

/// How many recent events keep their serialised form: as many as a
/// subscription buffers, so a subscriber that is behind still finds them.
const EVENT_TEXTS: usize = EVENT_BUFFER;

/// The serialised body of recent events, shared by every subscription: an
/// event going to a thousand sockets is serialised once, not a thousand
/// times. Keyed by the event's allocation (each entry holds its `Arc`, so
/// an address is never reused while it is here); the oldest goes first.
#[derive(Default)]
struct EventTexts {
    recent: Mutex<RecentTexts>,
}

#[derive(Default)]
struct RecentTexts {
    by_event: HashMap<usize, (Arc<Event>, Arc<str>)>,
    order: std::collections::VecDeque<usize>,
}

impl EventTexts {
    /// The `event` notification of `event` for subscription `sid`.
    fn notification(&self, sid: &str, event: &Arc<Event>) -> String {
        let body = self.body(event);
        // `body` is `{"type":…,"at":…,"data":…}`: the subscription goes in
        // front of its first field.
        let sid = Value::String(sid.to_owned());
        format!(
            r#"{{"jsonrpc":"2.0","method":"event","params":{{"subscriptionId":{sid},{}}}"#,
            &body[1..]
        )
    }

    fn body(&self, event: &Arc<Event>) -> Arc<str> {
        let key = Arc::as_ptr(event) as usize;
        if let Some((_, text)) = lock(&self.recent).by_event.get(&key) {
            return text.clone();
        }
        // Serialised outside the lock; if another subscriber got there
        // first, its text is kept.
        let text: Arc<str> =
            json!({ "type": event.kind, "at": event.at.as_millis(), "data": event.data })
                .to_string()
                .into();
        let mut recent = lock(&self.recent);
        if let Some((_, first)) = recent.by_event.get(&key) {
            return first.clone();
        }
        if recent.order.len() >= EVENT_TEXTS
            && let Some(oldest) = recent.order.pop_front()
        {
            recent.by_event.remove(&oldest);
        }
        recent.order.push_back(key);
        recent.by_event.insert(key, (event.clone(), text.clone()));
        text
    }
}

/// One WebSocket.
pub(crate) struct Socket {
    id: u64,
    pub(crate) ip: IpAddr,
    principal: Mutex<Principal>,
    out: mpsc::Sender<Outgoing>,
    subscriptions: Mutex<HashMap<String, Vec<tokio::task::AbortHandle>>>,
    next_sub: AtomicU64,
    /// A pairing request this socket waits on.
    pairing: Mutex<Option<String>>,
    /// Events dropped because the writer's queue was full.
    lagged: AtomicU64,
    /// The socket has ended: nothing may make it a device again.
    closed: std::sync::atomic::AtomicBool,
    /// Sign-ins that failed.
    failed_logins: std::sync::atomic::AtomicU32,
    /// Set once: the socket closes with this code and reason (reader and
    /// writer both watch it).
    kill: watch::Sender<Option<(u16, String)>>,
}

enum Outgoing {
    Text(String),
}

impl Socket {
    pub(crate) fn principal(&self) -> Principal {
        lock(&self.principal).clone()
    }

    fn device(&self) -> Option<NodeId> {
        match &*lock(&self.principal) {
            Principal::Device { node, .. } => Some(*node),
            _ => None,
        }
    }

    fn is_admin(&self) -> bool {
        matches!(&*lock(&self.principal), Principal::Admin { .. })
    }

    /// Queues `value` for the writer; `false` if the queue is full.
    fn send(&self, value: &Value) -> bool {
        self.send_text(value.to_string())
    }

    /// Queues a message already serialised; `false` if the queue is full.
    fn send_text(&self, text: String) -> bool {
        self.out.try_send(Outgoing::Text(text)).is_ok()
    }

    /// Closes the socket with `code` (the writer sends the close frame).
    fn close(&self, code: u16, reason: &str) {
        self.kill.send_if_modified(|k| {
            if k.is_some() {
                return false;
            }
            *k = Some((code, reason.to_owned()));
            true
        });
    }

    pub(crate) fn unsubscribe(&self, id: &str) -> bool {
        match lock(&self.subscriptions).remove(id) {
            Some(tasks) => {
                for t in tasks {
                    t.abort();
                }
                true
            }
            None => false,
        }
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        for tasks in lock(&self.subscriptions).values() {
            for t in tasks {
                t.abort();
            }
        }
    }
}

impl Shared {
    pub(crate) fn now(&self) -> Timestamp {
        self.primary.now()
    }

    /// `auth.login`: the admin token, or a web remote's token.
    pub(crate) async fn login(&self, socket: &Socket, token: &str) -> Result<Value, RpcError> {
        let standing = self.standing.load(Ordering::SeqCst);
        let principal = match self.principal_for(token).await {
            Ok(p) => p,
            Err(e) => {
                let failed = socket.failed_logins.fetch_add(1, Ordering::Relaxed) + 1;
                if failed >= MAX_FAILED_LOGINS {
                    socket.close(CLOSE_POLICY, "too many failed sign-ins");
                }
                return Err(e);
            }
        };
        // What the socket followed as someone else, it no longer does.
        let followed: Vec<String> = lock(&socket.subscriptions).keys().cloned().collect();
        for id in followed {
            socket.unsubscribe(&id);
        }
        let answer = match &principal {
            Principal::Admin { .. } => json!({ "principal": "admin" }),
            Principal::Device { node, .. } => {
                json!({ "principal": "device", "deviceId": node.to_string() })
            }
            Principal::Anonymous => json!({ "principal": "anonymous" }),
        };
        self.set_principal(socket, principal);
        self.recheck(socket, standing).await;
        Ok(answer)
    }

    /// If a device changed since `standing` was read (before the socket's
    /// token was checked), checks the socket's device token again and
    /// closes the socket if it no longer holds: the watcher closes only
    /// the sockets it can see, and this one may not have been there yet.
    async fn recheck(&self, socket: &Socket, standing: u64) {
        if self.standing.load(Ordering::SeqCst) != standing {
            self.check_device_socket(socket).await;
        }
    }

    /// Checks a device socket's token through the registry's gate (one
    /// read, on a blocking thread) and closes the socket if it no longer
    /// holds. Other sockets are left alone.
    async fn check_device_socket(&self, socket: &Socket) {
        let Principal::Device { node, token } = socket.principal() else {
            return;
        };
        let primary = self.primary.clone();
        let valid = tokio::task::spawn_blocking(move || {
            primary
                .authenticate_token(&token, mesh_core::registry::scopes::PRESENCE_WRITE)
                .is_ok_and(|d| d.node == node)
        })
        .await
        .unwrap_or(false);
        if !valid {
            socket.close(CLOSE_POLICY, "the device's token is no longer valid");
        }
    }

    async fn principal_for(&self, token: &str) -> Result<Principal, RpcError> {
        let refused = || {
            RpcError::new(
                rpc::UNAUTHORIZED,
                "unauthorized: the token is not the admin token nor a paired web remote's current token",
            )
        };
        if self.admin.check(token) {
            return Ok(Principal::Admin {
                generation: self.admin.generation(),
            });
        }
        // Not even the form of a device token: no storage read for it.
        let t = token.trim();
        if t.len() > 256 || t.split_once('.').is_none() {
            return Err(refused());
        }
        let primary = self.primary.clone();
        let text = zeroize::Zeroizing::new(token.trim().to_owned());
        let checking = text.clone();
        let checked = tokio::task::spawn_blocking(move || {
            primary.authenticate_token(&checking, mesh_core::registry::scopes::PRESENCE_WRITE)
        })
        .await
        .map_err(|e| RpcError::new(rpc::INTERNAL_ERROR, e.to_string()))?;
        match checked {
            Ok(d) => Ok(Principal::Device {
                node: d.node,
                token: text,
            }),
            Err(_) => Err(RpcError::new(
                rpc::UNAUTHORIZED,
                "unauthorized: the token is not the admin token nor a paired web remote's current token",
            )),
        }
    }

    fn set_principal(&self, socket: &Socket, principal: Principal) {
        if socket.closed.load(Ordering::Acquire) && principal != Principal::Anonymous {
            return;
        }
        let before = socket.device();
        let after = match &principal {
            Principal::Device { node, .. } => Some(*node),
            _ => None,
        };
        *lock(&socket.principal) = principal;
        if before != after {
            if let Some(d) = before {
                self.primary.web_socket(&d, false);
            }
            if let Some(d) = after {
                self.primary.web_socket(&d, true);
            }
        }
    }

    /// `devices.request_pairing`: asks, answers with the code for the
    /// browser to show, and later tells the socket the outcome
    /// (`pairing.approved` with its token, `pairing.rejected`, `pairing.expired`).
    pub(crate) fn request_pairing(
        self: &Arc<Self>,
        socket: &Arc<Socket>,
        name: &str,
        platform: &str,
        ip: Option<IpAddr>,
    ) -> Result<Value, RpcError> {
        {
            // Checked and claimed under one lock: one request per socket.
            let mut pairing = lock(&socket.pairing);
            if pairing.is_some() {
                return Err(RpcError::new(
                    rpc::BUSY,
                    "this socket has a pairing request waiting already",
                ));
            }
            *pairing = Some(String::new());
        }
        let ticket = match self
            .primary
            .request_web_pairing(name, platform, ip.map(source_ip))
        {
            Ok(t) => t,
            Err(e) => {
                *lock(&socket.pairing) = None;
                return Err(methods::node_error(e));
            }
        };
        let answer = json!({
            "id": ticket.request_id,
            "deviceName": name.trim(),
            "requestCode": ticket.code(),
            "expiresAt": ticket.expires_at.as_millis(),
        });
        let request_id = ticket.request_id.clone();
        *lock(&socket.pairing) = Some(request_id.clone());
        let (shared, sock) = (self.clone(), Arc::downgrade(socket));
        let expires = Duration::from_millis(
            ticket
                .expires_at
                .as_millis()
                .saturating_sub(self.now().as_millis()),
        );
        tokio::spawn(async move {
            let outcome = tokio::time::timeout(expires, ticket.finished()).await;
            let Some(socket) = sock.upgrade() else {
                shared.primary.withdraw_web_pairing(&request_id);
                return;
            };
            *lock(&socket.pairing) = None;
            let note = match outcome {
                Ok(Ok(grant)) if !socket.closed.load(Ordering::Acquire) => {
                    let token = zeroize::Zeroizing::new(grant.token().to_owned());
                    let note = rpc::notification(
                        "pairing.approved",
                        json!({ "requestId": request_id, "deviceId": grant.device.to_string(), "token": grant.token() }),
                    );
                    shared.set_principal(
                        &socket,
                        Principal::Device {
                            node: grant.device,
                            token,
                        },
                    );
                    note
                }
                Ok(Err(mesh_core::node::NodeError::Pairing(
                    mesh_core::pairing::PairingError::Rejected { reason },
                ))) => rpc::notification(
                    "pairing.rejected",
                    json!({ "requestId": request_id, "reason": reason }),
                ),
                Ok(Ok(grant)) => {
                    // Nobody holds the token: the device goes again.
                    let _ = shared.primary.unpair(&grant.device).await;
                    return;
                }
                Ok(Err(e)) => rpc::notification(
                    "pairing.failed",
                    json!({ "requestId": request_id, "message": e.to_string() }),
                ),
                Err(_) => {
                    shared.primary.withdraw_web_pairing(&request_id);
                    rpc::notification("pairing.expired", json!({ "requestId": request_id }))
                }
            };
            // Never dropped for lack of room: it may carry the token.
            let _ = socket.out.send(Outgoing::Text(note.to_string())).await;
        });
        Ok(answer)
    }

    /// `events.subscribe`: one bus subscription per pattern, forwarded as
    /// `event` notifications; a full queue drops events and says so
    /// (`event.lagged`) with its next event that fits.
    pub(crate) fn subscribe(
        &self,
        socket: &Arc<Socket>,
        patterns: &[String],
    ) -> Result<Value, RpcError> {
        if patterns.is_empty() || patterns.len() > MAX_PATTERNS {
            return Err(RpcError::invalid_params(
                "patterns",
                format!("1 to {MAX_PATTERNS} patterns such as \"device.*\""),
            ));
        }
        if lock(&socket.subscriptions).len() >= MAX_SUBSCRIPTIONS {
            return Err(RpcError::new(
                rpc::BUSY,
                format!("{MAX_SUBSCRIPTIONS} subscriptions on this socket already"),
            ));
        }
        let mut subs = Vec::new();
        for p in patterns {
            let sub = self
                .primary
                .events()
                .subscribe(p, EVENT_BUFFER)
                .map_err(|e| RpcError::invalid_params("patterns", e))?;
            subs.push(sub);
        }
        let id = format!("s{}", socket.next_sub.fetch_add(1, Ordering::Relaxed) + 1);
        let mut tasks = Vec::new();
        for mut sub in subs {
            let (sock, sid) = (Arc::downgrade(socket), id.clone());
            let texts = self.event_texts.clone();
            // For waiting until the queue has room for a lag notice (the
            // writer's end closes when the socket ends).
            let out = socket.out.clone();
            let task = tokio::spawn(async move {
                // Events of this subscription dropped and not yet told.
                let mut missed = 0u64;
                loop {
                    // With a count owed, whichever comes first: room in the
                    // queue (the notice goes now, even if no event follows)
                    // or the next event.
                    let r = if missed > 0 {
                        tokio::select! {
                            biased;
                            room = out.reserve() => {
                                let Ok(permit) = room else { return };
                                let note = rpc::notification(
                                    "event.lagged",
                                    json!({ "subscriptionId": sid, "missed": missed }),
                                );
                                permit.send(Outgoing::Text(note.to_string()));
                                if let Some(socket) = sock.upgrade() {
                                    socket.lagged.fetch_add(missed, Ordering::Relaxed);
                                }
                                missed = 0;
                                continue;
                            }
                            r = sub.recv() => r,
                        }
                    } else {
                        sub.recv().await
                    };
                    let Some(r) = r else { return };
                    let Some(socket) = sock.upgrade() else { return };
                    match r {
                        // Nothing overtakes a notice still owed: while one
                        // is, events count as missed.
                        Received::Event(_) if missed > 0 => missed += 1,
                        Received::Event(e) => {
                            let note = texts.notification(&sid, &e);
                            if !socket.send_text(note) {
                                missed += 1;
                            }
                        }
                        Received::Lagged { missed: m } => missed += m,
                    }
                }
            });
            tasks.push(task.abort_handle());
        }
        let mut subscriptions = lock(&socket.subscriptions);
        if subscriptions.len() >= MAX_SUBSCRIPTIONS {
            for t in tasks {
                t.abort();
            }
            return Err(RpcError::new(
                rpc::BUSY,
                format!("{MAX_SUBSCRIPTIONS} subscriptions on this socket already"),
            ));
        }
        subscriptions.insert(id.clone(), tasks);
        Ok(json!({ "subscriptionId": id }))
    }

    /// `gateway.info`: what the dashboard's "add a device" panel shows.
    pub(crate) fn info(&self) -> Value {
        let node = self.primary.node_id();
        json!({
            "nodeId": node.to_string(),
            "fingerprint": node.fingerprint().to_string(),
            "name": self.config.primary_name,
            "workerCommand": self.config.worker_command,
            "gateway": self.local.to_string(),
        })
    }

    /// Closes the sockets of `device` (revoked, unpaired, re-tokened).
    fn close_device(&self, device: &NodeId, why: &str) {
        for s in lock(&self.sockets).values() {
            if s.device().as_ref() == Some(device) {
                s.close(CLOSE_POLICY, why);
            }
        }
    }

    /// Closes every socket (the gateway stops).
    pub(crate) fn close_all(&self) {
        for s in lock(&self.sockets).values() {
            s.close(1001, "the gateway is stopping");
        }
    }

    /// Closes every admin socket (the admin token changed).
    pub(crate) fn close_admins(&self) {
        for s in lock(&self.sockets).values() {
            if s.is_admin() {
                s.close(CLOSE_POLICY, "admin token rotated");
            }
        }
    }
}

impl Shared {
    /// A socket with no WebSocket under it, speaking for `principal`: what
    /// [`super::LocalSocket`] wraps (its notifications are dropped).
    pub(crate) fn local_socket(self: &Arc<Self>, principal: Principal) -> Arc<Socket> {
        let (out, _dropped) = mpsc::channel(1);
        self.new_socket(IpAddr::from([127, 0, 0, 1]), out, principal)
    }

    /// A socket from `ip` whose writer reads `out`, speaking for `principal`.
    fn new_socket(
        &self,
        ip: IpAddr,
        out: mpsc::Sender<Outgoing>,
        principal: Principal,
    ) -> Arc<Socket> {
        let socket = Arc::new(Socket {
            id: self.next_socket.fetch_add(1, Ordering::Relaxed),
            ip,
            principal: Mutex::new(Principal::Anonymous),
            out,
            subscriptions: Mutex::new(HashMap::new()),
            next_sub: AtomicU64::new(0),
            pairing: Mutex::new(None),
            lagged: AtomicU64::new(0),
            closed: std::sync::atomic::AtomicBool::new(false),
            failed_logins: std::sync::atomic::AtomicU32::new(0),
            kill: watch::Sender::new(None),
        });
        self.set_principal(&socket, principal);
        socket
    }
}

/// Counts one connection from `ip`, within the limits.
struct Slot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Slot {
    fn take(shared: &Arc<Shared>, ip: IpAddr) -> Option<Slot> {
        let ip = source_ip(ip);
        let mut per_ip = lock(&shared.per_ip);
        let mine = per_ip.entry(ip).or_insert(0);
        if *mine >= shared.config.max_per_address
            || shared.total.load(Ordering::Relaxed) >= shared.config.max_connections
        {
            if *mine == 0 {
                per_ip.remove(&ip);
            }
            return None;
        }
        *mine += 1;
        shared.total.fetch_add(1, Ordering::Relaxed);
        Some(Slot {
            shared: shared.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut per_ip = lock(&self.shared.per_ip);
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
        self.shared.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Builds the shared state and the router.
pub(crate) fn router(
    primary: Primary,
    admin: AdminToken,
    config: GatewayConfig,
    local: SocketAddr,
) -> (Arc<Shared>, Router) {
    let shared = Arc::new(Shared {
        primary,
        admin,
        config,
        sockets: Mutex::new(HashMap::new()),
        next_socket: AtomicU64::new(1),
        per_ip: Mutex::new(HashMap::new()),
        total: AtomicUsize::new(0),
        local,
        event_texts: Arc::default(),
        standing: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/rpc", get(upgrade))
        .route("/healthz", get(healthz))
        .route("/", get(|| async { assets::page("index.html") }))
        .route("/app.js", get(|| async { assets::page("app.js") }))
        .route("/style.css", get(|| async { assets::page("style.css") }))
        .with_state(shared.clone());
    (shared, app)
}

/// Watches the bus for devices that lose their standing, and closes their
/// sockets at once.
pub(crate) fn watch_devices(shared: &Arc<Shared>) -> Option<tokio::task::JoinHandle<()>> {
    let mut subs = Vec::new();
    for kind in [
        kinds::DEVICE_REVOKED,
        kinds::DEVICE_UNPAIRED,
        kinds::DEVICE_TOKEN_ROTATED,
        kinds::DEVICE_SCOPES_SET,
    ] {
        subs.push((kind, shared.primary.events().subscribe(kind, 1024).ok()?));
    }
    let weak = Arc::downgrade(shared);
    Some(tokio::spawn(async move {
        let mut merged = futures_merge(subs);
        while let Some((kind, node)) = merged.recv().await {
            let Some(shared) = weak.upgrade() else { return };
            // Counted before closing: a socket registered after the loop
            // below sees the change and checks itself again.
            shared.standing.fetch_add(1, Ordering::SeqCst);
            if let Some(node) = node {
                let why = match kind {
                    k if k == kinds::DEVICE_REVOKED => "revoked",
                    k if k == kinds::DEVICE_UNPAIRED => "unpaired",
                    k if k == kinds::DEVICE_SCOPES_SET => "scopes changed: sign in again",
                    _ => "token rotated",
                };
                shared.close_device(&node, why);
            } else {
                // Lagged: events were missed; check every device socket.
                let sockets: Vec<Arc<Socket>> = lock(&shared.sockets).values().cloned().collect();
                for s in sockets {
                    shared.check_device_socket(&s).await;
                }
            }
        }
    }))
}

/// The node ids of several subscriptions' events, in one channel (`None`
/// when events were missed).
fn futures_merge(
    subs: Vec<(&'static str, mesh_core::events::Subscription)>,
) -> mpsc::Receiver<(&'static str, Option<NodeId>)> {
    let (tx, rx) = mpsc::channel(256);
    for (kind, mut sub) in subs {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(r) = sub.recv().await {
                let item = match r {
                    Received::Event(e) => e.data["node"].as_str().and_then(|n| n.parse().ok()),
                    Received::Lagged { .. } => None,
                };
                if tx.send((kind, item)).await.is_err() {
                    return;
                }
            }
        });
    }
    rx
}

async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        json!({ "status": "ok", "nodeId": shared.primary.node_id().to_string() }).to_string(),
    )
        .into_response()
}

/// Whether the upgrade's `Origin` may open a socket: absent (not a
/// browser), the page's own origin, or one configured.
fn origin_allowed(headers: &HeaderMap, config: &GatewayConfig) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    if config.allowed_origins.iter().any(|o| o == origin) {
        return true;
    }
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    origin == format!("{scheme}://{host}")
}

/// Whether the request's `Host` names this gateway (a page that rebinds
/// its own DNS name to 127.0.0.1 sends its own name): the bound address,
/// `localhost`, or a configured origin's host. Bound to every address
/// (TLS required then, which a rebinding page cannot pass), any host.
fn host_allowed(headers: &HeaderMap, config: &GatewayConfig, local: SocketAddr) -> bool {
    if local.ip().is_unspecified() {
        return true;
    }
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let port = local.port();
    let mut names = vec![
        local.to_string(),
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
    ];
    names.extend(
        config
            .allowed_origins
            .iter()
            .filter_map(|o| o.split_once("://").map(|(_, h)| h.to_owned())),
    );
    names.iter().any(|n| n.eq_ignore_ascii_case(host))
}

/// The address a client is counted under: IPv4 as it is, IPv6 by its /64
/// (one host holds a whole /64).
pub(crate) fn source_ip(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

async fn upgrade(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(ClientAddr(peer)): ConnectInfo<ClientAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if !origin_allowed(&headers, &shared.config) {
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    if !host_allowed(&headers, &shared.config, shared.local) {
        return (StatusCode::FORBIDDEN, "host not allowed").into_response();
    }
    // Counted before any work is done for it.
    let Some(slot) = Slot::take(&shared, peer.ip()) else {
        return (StatusCode::TOO_MANY_REQUESTS, "too many connections").into_response();
    };
    let standing = shared.standing.load(Ordering::SeqCst);
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(|t| zeroize::Zeroizing::new(t.trim().to_owned()));
    let principal = match bearer {
        Some(token) => match shared.principal_for(&token).await {
            Ok(p) => p,
            Err(e) => return (StatusCode::UNAUTHORIZED, e.message).into_response(),
        },
        None => Principal::Anonymous,
    };
    ws.max_message_size(MAX_MESSAGE + 1)
        .max_frame_size(MAX_MESSAGE + 1)
        .on_upgrade(move |socket| run(shared, socket, peer.ip(), principal, standing, slot))
}

async fn run(
    shared: Arc<Shared>,
    ws: WebSocket,
    ip: IpAddr,
    principal: Principal,
    standing: u64,
    slot: Slot,
) {
    let (out, mut queued) = mpsc::channel(OUT_QUEUE);
    let socket = shared.new_socket(ip, out, principal);
    lock(&shared.sockets).insert(socket.id, socket.clone());
    shared.recheck(&socket, standing).await;
    let (mut sink, mut stream) = futures_split(ws);
    let mut killed = socket.kill.subscribe();
    // The writer: if it gives up on the client, the socket ends.
    let closer = Arc::downgrade(&socket);
    let writer = tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                m = queued.recv() => m,
                _ = killed.wait_for(Option::is_some) => None,
            };
            if let Some(Outgoing::Text(t)) = next {
                // What else is queued by now (up to a batch) goes out in
                // the same write: one flush, not one per message.
                let batch = async {
                    sink.feed(Message::Text(Utf8Bytes::from(t))).await?;
                    for _ in 1..WRITE_BATCH {
                        let Ok(Outgoing::Text(more)) = queued.try_recv() else {
                            break;
                        };
                        sink.feed(Message::Text(Utf8Bytes::from(more))).await?;
                    }
                    sink.flush().await
                };
                // A client that does not read is not waited for long, and
                // a close goes ahead of what it has not read.
                let sent = tokio::select! {
                    s = tokio::time::timeout(WRITE_TIMEOUT, batch) => Some(s),
                    _ = killed.wait_for(Option::is_some) => None,
                };
                match sent {
                    Some(Ok(Ok(()))) => continue,
                    Some(_) => {
                        if let Some(socket) = closer.upgrade() {
                            socket.close(1011, "the client stopped reading");
                        }
                        return;
                    }
                    None => {}
                }
            }
            // Closing: with the code and reason whoever closed it gave.
            let close = killed.borrow().clone();
            let (code, reason) = close.unwrap_or((1000, String::new()));
            let frame = CloseFrame {
                code,
                reason: Utf8Bytes::from(reason),
            };
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                sink.send(Message::Close(Some(frame))),
            )
            .await;
            return;
        }
    });
    let limit = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    // The socket's requests: aborted when it ends.
    let mut requests = tokio::task::JoinSet::new();
    let mut killed = socket.kill.subscribe();
    let anonymous_until = tokio::time::Instant::now() + ANONYMOUS_GRACE;
    let mut grace = true;
    loop {
        let next = tokio::select! {
            m = stream.next() => m,
            _ = killed.wait_for(Option::is_some) => break,
            () = tokio::time::sleep_until(anonymous_until), if grace => {
                grace = false;
                if socket.principal() == Principal::Anonymous && lock(&socket.pairing).is_none() {
                    socket.close(CLOSE_POLICY, "sign in or ask to pair within 60 s");
                    break;
                }
                continue;
            }
        };
        while requests.try_join_next().is_some() {}
        let text = match next {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Binary(_))) => {
                let e = RpcError::new(
                    rpc::INVALID_REQUEST,
                    "invalid request: send JSON text messages",
                );
                socket.send(&rpc::response(None, Err(e)));
                continue;
            }
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                // Over the size limit, or a protocol error.
                let too_big = e.to_string().to_lowercase().contains("too long")
                    || e.to_string().to_lowercase().contains("too big")
                    || e.to_string().to_lowercase().contains("size");
                if too_big {
                    socket.close(CLOSE_TOO_BIG, "message too big (1 MiB at most)");
                } else {
                    socket.close(1002, "protocol error");
                }
                break;
            }
        };
        if text.len() > MAX_MESSAGE {
            socket.close(CLOSE_TOO_BIG, "message too big (1 MiB at most)");
            break;
        }
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        let (shared, sock) = (shared.clone(), socket.clone());
        requests.spawn(async move {
            let _permit = permit;
            if let Some(answer) = answer(&shared, &sock, text.as_str()).await {
                // Answers are never dropped for events: wait for room.
                let _ = sock.out.send(Outgoing::Text(answer.to_string())).await;
            }
        });
    }
    socket.closed.store(true, Ordering::Release);
    lock(&shared.sockets).remove(&socket.id);
    requests.abort_all();
    let waiting = lock(&socket.pairing).take();
    if let Some(request) = waiting {
        shared.primary.withdraw_web_pairing(&request);
    }
    shared.set_principal(&socket, Principal::Anonymous);
    let subscriptions: Vec<String> = lock(&socket.subscriptions).keys().cloned().collect();
    for id in subscriptions {
        socket.unsubscribe(&id);
    }
    // Let the writer send what is queued (and a close), briefly; then it
    // goes, whatever it was doing.
    let mut writer = writer;
    if tokio::time::timeout(Duration::from_secs(1), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
    drop(slot);
}

/// The answer to one message (`None`: notifications only).
pub(crate) async fn answer(
    shared: &Arc<Shared>,
    socket: &Arc<Socket>,
    text: &str,
) -> Option<Value> {
    let message = match rpc::parse(text) {
        Ok(m) => m,
        Err(e) => return Some(rpc::response(None, Err(e))),
    };
    match message {
        rpc::Message::Single(call) => one(shared, socket, call).await,
        rpc::Message::Batch(calls) => {
            let mut out = Vec::new();
            for call in calls {
                if let Some(a) = one(shared, socket, call).await {
                    out.push(a);
                }
            }
            (!out.is_empty()).then_some(Value::Array(out))
        }
    }
}

async fn one(shared: &Arc<Shared>, socket: &Arc<Socket>, call: rpc::Call) -> Option<Value> {
    match call {
        rpc::Call::Invalid(id, e) => Some(rpc::response(id.as_ref(), Err(e))),
        rpc::Call::Request(r) => {
            let outcome = methods::call(shared, socket, &r).await;
            r.id.as_ref().map(|id| rpc::response(Some(id), outcome))
        }
    }
}

use futures_util::{SinkExt, StreamExt};

fn futures_split(
    ws: WebSocket,
) -> (
    futures_util::stream::SplitSink<WebSocket, Message>,
    futures_util::stream::SplitStream<WebSocket>,
) {
    ws.split()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_notification_is_serialised_once_and_reads_as_the_plain_one() {
        let texts = EventTexts::default();
        let event = Arc::new(Event {
            kind: "device.heartbeat".into(),
            at: Timestamp::from_millis(1_796_000_000_123),
            data: json!({"node": "n\"1", "score": 97, "text": "é{}"}),
        });
        let a = texts.notification("s1", &event);
        let b = texts.notification("s2", &event);
        let plain = |sid: &str| {
            rpc::notification(
                "event",
                json!({ "subscriptionId": sid, "type": event.kind, "at": event.at.as_millis(), "data": event.data }),
            )
        };
        assert_eq!(serde_json::from_str::<Value>(&a).unwrap(), plain("s1"));
        assert_eq!(serde_json::from_str::<Value>(&b).unwrap(), plain("s2"));
        assert_eq!(lock(&texts.recent).order.len(), 1, "serialised once");
        // A different event with equal contents is another entry.
        let twin = Arc::new((*event).clone());
        texts.notification("s1", &twin);
        assert_eq!(lock(&texts.recent).order.len(), 2);
        for i in 0..(EVENT_TEXTS as u64 * 2) {
            let e = Arc::new(Event {
                kind: "x.y".into(),
                at: Timestamp::from_millis(i),
                data: Value::Null,
            });
            texts.notification("s1", &e);
        }
        let recent = lock(&texts.recent);
        assert_eq!(
            (recent.order.len(), recent.by_event.len()),
            (EVENT_TEXTS, EVENT_TEXTS),
            "bounded"
        );
    }
}
