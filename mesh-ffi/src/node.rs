//! `MeshNode`: the node runtime behind one object, with its own tokio
//! runtime, for Swift, Kotlin and Python.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use mesh_core::clock::{Clock, SystemClock};
use mesh_core::events::{EventBus, Received};
use mesh_core::identity::NodeId;
use mesh_core::node::{
    CommandHandler as CoreHandler, DataDir, MeshSettings, MetricsSource, Node, NodeConfig,
    PairingTicket as CoreTicket, Primary, Worker,
};
use mesh_core::transport::PeerAddr;
use mesh_core::wire::HealthMetrics;
use mesh_ledger::{LedgerConfig, SignedLedger};
use mesh_policy::runtime::RuntimePolicy;
use mesh_transport::mdns::{Advertisement, Interfaces, MdnsDiscovery};
use mesh_transport::quic::{QuicConfig, QuicTransport};
use mesh_transport::static_peers::StaticPeer;
use serde_json::Value;
use tokio::runtime::{Handle, Runtime};
use tokio::sync::oneshot;

use crate::error::MeshError;
use crate::types::{
    Action, Device, DiscoveredNode, MeshEvent, Metrics, NodeOptions, NodeRole, NodeStatus,
    PairingRequest, PolicyDecision,
};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Host code a command runs, implemented in Swift, Kotlin or Python and
/// registered by name with [`MeshNode::register_handler`] before `start`.
///
/// On a worker it runs for the primary's `run_action`; on the primary for a
/// worker's command that its policy allows. It is called on a background
/// thread and may block; the node stops waiting after the command timeout.
#[uniffi::export(with_foreign)]
pub trait CommandHandler: Send + Sync {
    /// Runs with the arguments (JSON); returns the result (JSON). An error
    /// fails the command with code `handler_failed` and its message.
    fn handle(&self, args_json: String) -> Result<String, MeshError>;
}

/// Receives the node's events, implemented by the app. Called on a thread
/// of its own, one event at a time.
#[uniffi::export(with_foreign)]
pub trait EventListener: Send + Sync {
    /// One event.
    fn on_event(&self, event: MeshEvent);
}

/// Adapts a foreign handler to the runtime's.
struct ForeignHandler {
    name: String,
    handler: Arc<dyn CommandHandler>,
}

impl std::fmt::Debug for ForeignHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForeignHandler")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl CoreHandler for ForeignHandler {
    fn call(&self, args: &Value) -> Result<Value, String> {
        let out = self
            .handler
            .handle(args.to_string())
            .map_err(|e| e.to_string())?;
        serde_json::from_str(&out)
            .map_err(|e| format!("handler {:?} returned invalid JSON: {e}", self.name))
    }
}

/// Metrics the app supplies (phones know their battery and thermal state
/// better than Rust does).
#[derive(Debug, Default)]
struct AppMetrics(Mutex<HealthMetrics>);

impl MetricsSource for AppMetrics {
    fn sample(&self) -> HealthMetrics {
        lock(&self.0).clone()
    }
}

/// What exists while the node runs.
struct Running {
    node: Node,
    addr: SocketAddr,
    /// Kept for its lifetime: dropping it stops mDNS.
    _mdns: Option<Arc<MdnsDiscovery>>,
}

/// A mesh node: a primary or a worker, started from a data directory.
///
/// Create it with [`MeshNode::new`], register command handlers, then
/// `start()`. Every method is safe to call from any thread; async methods
/// are Swift `async` / Kotlin `suspend` functions.
#[derive(uniffi::Object)]
pub struct MeshNode {
    options: NodeOptions,
    dir: DataDir,
    listen: SocketAddr,
    runtime: Mutex<Option<Runtime>>,
    handle: Handle,
    metrics: Arc<AppMetrics>,
    handlers: Mutex<Vec<(String, Arc<dyn CommandHandler>)>>,
    running: Mutex<Option<Running>>,
}

impl std::fmt::Debug for MeshNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshNode")
            .field("node", &self.dir.key().node_id())
            .field("role", &self.options.role)
            .finish_non_exhaustive()
    }
}

impl Drop for MeshNode {
    fn drop(&mut self) {
        // The node first (its tasks abort, connections close), then the
        // runtime, without blocking: this may run on any thread, even
        // inside an async context.
        lock(&self.running).take();
        if let Some(runtime) = lock(&self.runtime).take() {
            runtime.shutdown_background();
        }
    }
}

fn parse_node(id: &str) -> Result<NodeId, MeshError> {
    id.trim()
        .parse()
        .map_err(|e| MeshError::invalid(format!("node id {id:?}: {e}")))
}

fn parse_json(what: &str, text: &str) -> Result<Value, MeshError> {
    serde_json::from_str(text).map_err(|e| MeshError::invalid(format!("{what} is not JSON: {e}")))
}

/// Defaults for `role` with its data in `data_dir`: listen on all
/// interfaces on a port the OS picks, mDNS on every interface, heartbeats
/// every 5 s, commands wait 10 s. The device id, if left empty, is derived
/// from the node key.
#[uniffi::export]
pub fn default_options(role: NodeRole, data_dir: String) -> NodeOptions {
    let defaults = NodeConfig::new(role.into(), "", "");
    NodeOptions {
        role,
        name: match role {
            NodeRole::Primary => "mesh primary".into(),
            NodeRole::Worker => "mesh worker".into(),
        },
        device_id: String::new(),
        platform: crate::types::DevicePlatform::Desktop,
        data_dir,
        listen_addr: "0.0.0.0:0".into(),
        mdns: true,
        mdns_interface: "all".into(),
        heartbeat_interval_ms: u64::try_from(defaults.heartbeat_interval.as_millis())
            .unwrap_or(5_000),
        command_timeout_ms: u64::try_from(defaults.command_timeout.as_millis()).unwrap_or(10_000),
        mesh: role == NodeRole::Primary,
        advertise_addrs: Vec::new(),
    }
}

impl MeshNode {
    pub(crate) fn node(&self) -> Result<Node, MeshError> {
        lock(&self.running)
            .as_ref()
            .map(|r| r.node.clone())
            .ok_or_else(|| MeshError::unavailable("the node is not running: call start() first"))
    }

    /// The node's tokio runtime.
    pub(crate) fn runtime_handle(&self) -> Handle {
        self.handle.clone()
    }

    /// The primary's handle, if the node runs as the primary.
    pub(crate) fn primary_handle(&self) -> Result<Primary, MeshError> {
        self.primary()
    }

    /// The primary's handle, if the node runs as the primary.
    fn primary(&self) -> Result<Primary, MeshError> {
        self.node()?.as_primary().ok_or_else(|| {
            MeshError::unavailable("this is a primary operation; the node is a worker")
        })
    }

    /// The worker's handle, if the node runs as a worker.
    fn worker(&self) -> Result<Worker, MeshError> {
        self.node()?.as_worker().ok_or_else(|| {
            MeshError::unavailable("this is a worker operation; the node is the primary")
        })
    }

    /// Runs `op` on the node's runtime and waits for it.
    pub(crate) async fn run<T, F>(&self, op: impl FnOnce(Node) -> F) -> Result<T, MeshError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, MeshError>> + Send + 'static,
    {
        self.on(self.node()?, op).await
    }

    /// Runs `op` with `handle` (the node or a role's handle) on the node's
    /// runtime and waits for it.
    async fn on<H, T, F>(&self, handle: H, op: impl FnOnce(H) -> F) -> Result<T, MeshError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, MeshError>> + Send + 'static,
    {
        self.handle
            .spawn(op(handle))
            .await
            .map_err(|e| MeshError::Internal {
                detail: format!("the operation did not finish: {e}"),
            })?
    }

    fn config(&self) -> NodeConfig {
        let o = &self.options;
        let device_id = if o.device_id.is_empty() {
            format!(
                "{}-{}",
                match o.role {
                    NodeRole::Primary => "primary",
                    NodeRole::Worker => "worker",
                },
                self.dir.key().node_id().fingerprint()
            )
        } else {
            o.device_id.clone()
        };
        NodeConfig::new(o.role.into(), &o.name, &device_id)
            .platform(o.platform.into())
            .heartbeat_interval(Duration::from_millis(o.heartbeat_interval_ms))
            .command_timeout(Duration::from_millis(o.command_timeout_ms))
    }

    /// Builds and starts the node (inside the runtime's context).
    fn launch(&self) -> Result<Running, MeshError> {
        let key = self.dir.key();
        let store = self.dir.store();
        let transport = QuicTransport::bind(
            key.clone(),
            self.listen,
            Arc::new(self.dir.admission()),
            QuicConfig::default(),
        )
        .map_err(|e| MeshError::Network {
            detail: format!("cannot listen on {}: {e}", self.listen),
        })?;
        let addr = transport.local_addr();
        let events = EventBus::new();
        let mut builder = self
            .dir
            .builder(Arc::new(transport), self.config())
            .events(events.clone())
            .metrics(self.metrics.clone());
        for (name, handler) in lock(&self.handlers).iter() {
            let bridge = ForeignHandler {
                name: name.clone(),
                handler: handler.clone(),
            };
            builder = builder.handler(name, Arc::new(bridge));
        }
        let mdns = if self.options.mdns {
            // Checked in `new`: a bad value never widens to all interfaces.
            let interfaces: Interfaces = self.options.mdns_interface.parse().map_err(
                |e: mesh_transport::mdns::InterfacesError| MeshError::invalid(e.to_string()),
            )?;
            let mdns =
                MdnsDiscovery::start_for_node(key.node_id(), interfaces, store.clone(), events)
                    .map_err(|e| MeshError::Network {
                        detail: e.to_string(),
                    })?;
            let mdns = Arc::new(mdns);
            builder = builder.discovery(mdns.clone());
            Some(mdns)
        } else {
            None
        };
        if self.options.role == NodeRole::Primary {
            let ledger = SignedLedger::open(store, key, LedgerConfig::default()).map_err(|e| {
                MeshError::Storage {
                    detail: format!("the audit ledger: {e}"),
                }
            })?;
            builder = builder
                .ledger(Arc::new(ledger))
                .policy(Arc::new(RuntimePolicy::new()));
            if let Some(mdns) = &mdns {
                mdns.advertise(&Advertisement {
                    name: self.options.name.clone(),
                    platform: "desktop".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    port: addr.port(),
                })
                .map_err(|e| MeshError::Network {
                    detail: e.to_string(),
                })?;
            }
        }
        if self.options.mesh {
            let advertise = self
                .options
                .advertise_addrs
                .iter()
                .map(|a| {
                    a.parse::<SocketAddr>()
                        .map_err(|e| MeshError::invalid(format!("advertise address {a:?}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            builder = builder.mesh(MeshSettings::reachable_at(addr, &advertise));
        }
        let node = builder.start()?;
        Ok(Running {
            node,
            addr,
            _mdns: mdns,
        })
    }
}

#[uniffi::export(async_runtime = "tokio")]
impl MeshNode {
    /// Opens the data directory (creating the node key on first use) and
    /// prepares the node; nothing listens until [`MeshNode::start`].
    #[uniffi::constructor]
    pub fn new(options: NodeOptions) -> Result<Arc<Self>, MeshError> {
        let listen: SocketAddr = options.listen_addr.parse().map_err(|e| {
            MeshError::invalid(format!("listen address {:?}: {e}", options.listen_addr))
        })?;
        if options.heartbeat_interval_ms == 0 || options.command_timeout_ms == 0 {
            return Err(MeshError::invalid(
                "heartbeat_interval_ms and command_timeout_ms must be above 0",
            ));
        }
        if options.data_dir.is_empty() {
            return Err(MeshError::invalid("data_dir is empty"));
        }
        options
            .mdns_interface
            .parse::<Interfaces>()
            .map_err(|e| MeshError::invalid(e.to_string()))?;
        let dir = DataDir::open(&options.data_dir)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("mesh-node")
            .enable_all()
            .build()
            .map_err(|e| MeshError::Internal {
                detail: format!("cannot start the runtime: {e}"),
            })?;
        Ok(Arc::new(MeshNode {
            handle: runtime.handle().clone(),
            runtime: Mutex::new(Some(runtime)),
            options,
            dir,
            listen,
            metrics: Arc::new(AppMetrics::default()),
            handlers: Mutex::new(Vec::new()),
            running: Mutex::new(None),
        }))
    }

    /// Registers host code under `name` (before `start`).
    pub fn register_handler(
        &self,
        name: String,
        handler: Arc<dyn CommandHandler>,
    ) -> Result<(), MeshError> {
        if lock(&self.running).is_some() {
            return Err(MeshError::invalid("handlers are registered before start()"));
        }
        if name.is_empty() {
            return Err(MeshError::invalid("a handler needs a name"));
        }
        lock(&self.handlers).push((name, handler));
        Ok(())
    }

    /// Starts listening (QUIC), discovery and the node's work. A paired
    /// worker reconnects to its primary by itself.
    pub fn start(&self) -> Result<(), MeshError> {
        let mut running = lock(&self.running);
        if running.is_some() {
            return Err(MeshError::invalid("the node is already running"));
        }
        let _context = self.handle.enter();
        *running = Some(self.launch()?);
        Ok(())
    }

    /// Says goodbye to peers and stops. The node can be started again.
    pub async fn stop(&self) -> Result<(), MeshError> {
        let Some(running) = lock(&self.running).take() else {
            return Ok(());
        };
        let node = running.node.clone();
        let done = self
            .handle
            .spawn(async move { node.shutdown().await })
            .await;
        drop(running);
        done.map_err(|e| MeshError::Internal {
            detail: format!("shutdown did not finish: {e}"),
        })
    }

    /// This node's id (its public key, base32).
    pub fn node_id(&self) -> String {
        self.dir.key().node_id().to_string()
    }

    /// The short fingerprint people compare.
    pub fn fingerprint(&self) -> String {
        self.dir.key().node_id().fingerprint().to_string()
    }

    /// What a worker passes to `request_pairing`: `NODE_ID@ADDRESS`, once
    /// started (the address as bound; replace `0.0.0.0` with a reachable one).
    pub fn connect_string(&self) -> Option<String> {
        lock(&self.running)
            .as_ref()
            .map(|r| format!("{}@{}", self.node_id(), r.addr))
    }

    /// A snapshot of the node.
    pub async fn status(&self) -> NodeStatus {
        let running = lock(&self.running)
            .as_ref()
            .map(|r| (r.node.clone(), r.addr));
        let (connected, addr, stats) = match &running {
            Some((node, addr)) => (
                node.as_worker().is_some_and(|w| w.is_connected()),
                Some(addr.to_string()),
                node.stats(),
            ),
            None => (false, None, Default::default()),
        };
        NodeStatus {
            node_id: self.node_id(),
            fingerprint: self.fingerprint(),
            role: self.options.role,
            running: running.is_some(),
            connected,
            listen_addr: addr,
            heartbeats_sent: stats.heartbeats_sent,
            heartbeats_received: stats.heartbeats_received,
        }
    }

    /// Subscribes `listener` to events whose kind matches `pattern`
    /// (`*`, `pairing.*`, `device.online`, …). Delivery stops when the
    /// returned subscription is closed or dropped, or the node stops.
    pub fn subscribe(
        &self,
        pattern: String,
        listener: Arc<dyn EventListener>,
    ) -> Result<Arc<EventSubscription>, MeshError> {
        let mut sub = self.node()?.subscribe(&pattern, 1024)?;
        listener_thread("mesh-events", move |mut stopped| async move {
            loop {
                let event = tokio::select! {
                    _ = &mut stopped => return,
                    r = sub.recv() => match r {
                        Some(Received::Event(e)) => MeshEvent {
                            kind: e.kind.clone(),
                            at_ms: e.at.as_millis(),
                            data_json: e.data.to_string(),
                        },
                        Some(Received::Lagged { missed }) => MeshEvent {
                            kind: "events.lagged".into(),
                            at_ms: SystemClock.now().as_millis(),
                            data_json: serde_json::json!({ "missed": missed }).to_string(),
                        },
                        None => return,
                    },
                };
                listener.on_event(event);
            }
        })
    }

    /// Nodes found by discovery so far, plus any found within `timeout_ms`.
    pub async fn discover(&self, timeout_ms: u64) -> Result<Vec<DiscoveredNode>, MeshError> {
        self.run(move |node| async move {
            let found = node.discover(Duration::from_millis(timeout_ms)).await?;
            Ok(found.into_iter().map(Into::into).collect())
        })
        .await
    }

    // ----- worker -----

    /// Worker: asks the primary at `primary` (`NODE_ID@ADDRESS`, as the
    /// primary or discovery shows it) to pair. Show the ticket's code to
    /// the user, who types it on the primary; then await `finished()`.
    pub async fn request_pairing(&self, primary: String) -> Result<Arc<PairingTicket>, MeshError> {
        let peer: StaticPeer = primary
            .parse()
            .map_err(|e| MeshError::invalid(format!("{primary:?}: {e}")))?;
        let addr = *peer
            .addresses
            .first()
            .ok_or_else(|| MeshError::invalid("the primary needs an address"))?;
        let ticket = self
            .on(self.worker()?, move |node| async move {
                Ok(node
                    .request_pairing(peer.node, PeerAddr::Socket(addr))
                    .await?)
            })
            .await?;
        Ok(Arc::new(PairingTicket {
            code: ticket.code().to_owned(),
            request_id: ticket.request_id().to_owned(),
            ticket: Mutex::new(Some(ticket)),
            handle: self.handle.clone(),
        }))
    }

    /// Worker: the primary it is paired with, if any.
    pub fn paired_primary(&self) -> Result<Option<String>, MeshError> {
        Ok(self.worker()?.paired_primary()?.map(|n| n.to_string()))
    }

    /// Worker: whether the session with the primary is open.
    pub fn is_connected(&self) -> bool {
        self.worker().is_ok_and(|n| n.is_connected())
    }

    /// Worker: the metrics later heartbeats carry.
    pub fn set_metrics(&self, metrics: Metrics) {
        *lock(&self.metrics.0) = metrics.into();
    }

    /// Worker: sets the metrics and sends a heartbeat with them now.
    pub async fn send_heartbeat(&self, metrics: Metrics) -> Result<(), MeshError> {
        self.set_metrics(metrics);
        self.on(self.worker()?, |node| async move {
            Ok(node.send_heartbeat().await?)
        })
        .await
    }

    /// Worker: sends command `name` with `args_json` to the primary, whose
    /// policy for this device decides; returns the result (JSON). A refusal
    /// is `MeshError::PolicyDenied` with its reason code.
    pub async fn send_command(&self, name: String, args_json: String) -> Result<String, MeshError> {
        let args = parse_json("args_json", &args_json)?;
        self.on(self.worker()?, move |node| async move {
            Ok(node.send_command(&name, args).await?.to_string())
        })
        .await
    }

    /// Worker: a configuration value the primary set (JSON).
    pub fn config_value(&self, key: String) -> Result<Option<String>, MeshError> {
        Ok(self.worker()?.config_value(&key).map(|v| v.to_string()))
    }

    // ----- primary -----

    /// Primary: pairing requests waiting for the user.
    pub fn pending_pairings(&self) -> Result<Vec<PairingRequest>, MeshError> {
        Ok(self
            .primary()?
            .pending_pairings()?
            .into_iter()
            .map(Into::into)
            .collect())
    }

    /// Primary: approves request `request_id` with the code the worker
    /// shows. A wrong code is `MeshError::Pairing` (attempts are limited).
    pub async fn approve_pairing(
        &self,
        request_id: String,
        code: String,
    ) -> Result<String, MeshError> {
        self.on(self.primary()?, move |node| async move {
            let device = node.approve_pairing(&request_id, &code).await?;
            Ok(device.node.to_string())
        })
        .await
    }

    /// Primary: rejects request `request_id`.
    pub async fn reject_pairing(
        &self,
        request_id: String,
        reason: Option<String>,
    ) -> Result<(), MeshError> {
        self.on(self.primary()?, move |node| async move {
            Ok(node.reject_pairing(&request_id, reason).await?)
        })
        .await
    }

    /// Primary: paired devices with their health.
    pub fn devices(&self) -> Result<Vec<Device>, MeshError> {
        Ok(self
            .primary()?
            .devices()?
            .into_iter()
            .map(Into::into)
            .collect())
    }

    /// Primary: sends command `name` to worker `device` (`ping`, `config`,
    /// `run_action`); returns its result (JSON).
    pub async fn command(
        &self,
        device: String,
        name: String,
        args_json: String,
    ) -> Result<String, MeshError> {
        let device = parse_node(&device)?;
        let args = parse_json("args_json", &args_json)?;
        self.run(
            move |node| async move { Ok(node.command(&device, &name, args).await?.to_string()) },
        )
        .await
    }

    /// Primary: runs the handler worker `device` registered as `action`.
    pub async fn run_action(
        &self,
        device: String,
        action: String,
        args_json: String,
    ) -> Result<String, MeshError> {
        let device = parse_node(&device)?;
        let args = parse_json("args_json", &args_json)?;
        self.on(self.primary()?, move |node| async move {
            Ok(node.run_action(&device, &action, args).await?.to_string())
        })
        .await
    }

    /// Primary: round-trip time to worker `device`, microseconds.
    pub async fn ping(&self, device: String) -> Result<u64, MeshError> {
        let device = parse_node(&device)?;
        self.on(self.primary()?, move |node| async move {
            let rtt = node.ping(&device).await?;
            Ok(u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX))
        })
        .await
    }

    /// Primary: revokes `device`; it is refused from now on.
    pub async fn revoke(&self, device: String) -> Result<(), MeshError> {
        let device = parse_node(&device)?;
        self.on(self.primary()?, move |node| async move {
            Ok(node.revoke(&device).await?)
        })
        .await
    }

    /// Primary: unpairs `device`; it forgets this primary.
    pub async fn unpair(&self, device: String) -> Result<(), MeshError> {
        let device = parse_node(&device)?;
        self.on(self.primary()?, move |node| async move {
            Ok(node.unpair(&device).await?)
        })
        .await
    }

    /// Primary: gives `device` a new token. Without `force` the device
    /// must be connected: it stores the new token and acknowledges before
    /// the old one stops working (`Network` error if it is offline). With
    /// `force` the old token stops at once; an offline device must then
    /// pair again.
    pub async fn rotate_token(&self, device: String, force: bool) -> Result<(), MeshError> {
        let device = parse_node(&device)?;
        self.on(self.primary()?, move |node| async move {
            if force {
                node.rotate_token_forced(&device).await?;
            } else {
                node.rotate_token(&device).await?;
            }
            Ok(())
        })
        .await
    }

    /// Primary: sets `device`'s execution policy (a mesh-policy document,
    /// JSON); checked first, stored and audited.
    pub fn set_policy(&self, device: String, policy_json: String) -> Result<(), MeshError> {
        let device = parse_node(&device)?;
        Ok(self.primary()?.set_policy(&device, &policy_json)?)
    }

    /// Primary: `device`'s policy document (JSON), if set.
    pub fn policy(&self, device: String) -> Result<Option<String>, MeshError> {
        let device = parse_node(&device)?;
        Ok(self.primary()?.policy(&device)?.map(|v| v.to_string()))
    }

    /// Primary: what `device`'s policy decides for `command` now, without
    /// running or recording anything.
    pub fn check_command(
        &self,
        device: String,
        command: String,
    ) -> Result<PolicyDecision, MeshError> {
        let device = parse_node(&device)?;
        Ok(self.primary()?.check_command(&device, &command)?.into())
    }

    /// Primary: actions (commands needing approval) and their states.
    pub fn actions(&self) -> Result<Vec<Action>, MeshError> {
        Ok(self
            .primary()?
            .actions()?
            .into_iter()
            .map(Into::into)
            .collect())
    }

    /// Primary: approves a proposed action; it runs now.
    pub async fn approve_action(&self, id: String) -> Result<Action, MeshError> {
        self.on(self.primary()?, move |node| async move {
            Ok(node.approve_action(&id).await?.into())
        })
        .await
    }

    /// Primary: rejects a proposed action.
    pub async fn reject_action(
        &self,
        id: String,
        reason: Option<String>,
    ) -> Result<Action, MeshError> {
        self.on(self.primary()?, move |node| async move {
            Ok(node.reject_action(&id, reason).await?.into())
        })
        .await
    }
}

/// A worker's pending pairing: show `code()` to the user, then await
/// `finished()`.
#[derive(uniffi::Object)]
pub struct PairingTicket {
    code: String,
    request_id: String,
    ticket: Mutex<Option<CoreTicket>>,
    handle: Handle,
}

impl std::fmt::Debug for PairingTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The code is a secret until it is used.
        f.debug_struct("PairingTicket")
            .field("request_id", &self.request_id)
            .finish_non_exhaustive()
    }
}

#[uniffi::export(async_runtime = "tokio")]
impl PairingTicket {
    /// The 6-digit code to type on the primary.
    pub fn code(&self) -> String {
        self.code.clone()
    }

    /// The request's id (the primary lists it).
    pub fn request_id(&self) -> String {
        self.request_id.clone()
    }

    /// Waits until the primary approved (the worker is then paired and
    /// connects by itself) or refused (`MeshError::Pairing`).
    pub async fn finished(&self) -> Result<(), MeshError> {
        let ticket = lock(&self.ticket)
            .take()
            .ok_or_else(|| MeshError::invalid("finished() was already awaited"))?;
        self.handle
            .spawn(async move { ticket.finished().await })
            .await
            .map_err(|e| MeshError::Internal {
                detail: e.to_string(),
            })??;
        Ok(())
    }
}

/// Runs `body` on a thread of its own (with a runtime of its own, so a
/// slow listener holds up nothing of the node's) until it returns or the
/// subscription it gives is cancelled: `body` gets the receiver that
/// fires then.
pub(crate) fn listener_thread<F, Fut>(
    name: &str,
    body: F,
) -> Result<Arc<EventSubscription>, MeshError>
where
    F: FnOnce(oneshot::Receiver<()>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (stop, stopped) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() else {
                return;
            };
            rt.block_on(body(stopped));
        })
        .map_err(|e| MeshError::Internal {
            detail: format!("cannot start the listener thread: {e}"),
        })?;
    Ok(Arc::new(EventSubscription {
        stop: Mutex::new(Some(stop)),
        thread: Mutex::new(Some(thread)),
    }))
}

/// Stops event delivery when closed or dropped.
#[derive(uniffi::Object)]
pub struct EventSubscription {
    stop: Mutex<Option<oneshot::Sender<()>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for EventSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSubscription").finish_non_exhaustive()
    }
}

#[uniffi::export]
impl EventSubscription {
    /// Stops delivery. Returns once no more events will be delivered
    /// (at once if called from the listener itself). Dropping the
    /// subscription (Kotlin `close()`, Swift release) does the same.
    pub fn cancel(&self) {
        lock(&self.stop).take();
        let thread = lock(&self.thread).take();
        if let Some(t) = thread
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
    }
}

impl Drop for EventSubscription {
    fn drop(&mut self) {
        self.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(dir: &std::path::Path) -> NodeOptions {
        let mut o = default_options(NodeRole::Worker, dir.display().to_string());
        o.listen_addr = "127.0.0.1:0".into();
        o.mdns = false;
        o
    }

    #[test]
    fn bad_options_are_refused_before_anything_is_created() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("node");
        let mut o = options(&dir);
        o.listen_addr = "nowhere".into();
        assert!(matches!(
            MeshNode::new(o),
            Err(MeshError::InvalidInput { .. })
        ));
        let mut o = options(&dir);
        o.heartbeat_interval_ms = 0;
        assert!(matches!(
            MeshNode::new(o),
            Err(MeshError::InvalidInput { .. })
        ));
        // A bad interface is refused, never widened to all interfaces.
        for bad in ["", "eth0;rm -rf", "wl an0"] {
            let mut o = options(&dir);
            o.mdns = true;
            o.mdns_interface = bad.into();
            assert!(
                matches!(MeshNode::new(o), Err(MeshError::InvalidInput { .. })),
                "{bad:?}"
            );
        }
        assert!(!dir.exists(), "nothing is written for refused options");
    }

    #[test]
    fn calls_before_start_and_of_the_other_role_are_unavailable() {
        let tmp = tempfile::tempdir().unwrap();
        let node = MeshNode::new(options(tmp.path())).unwrap();
        assert!(matches!(node.devices(), Err(MeshError::Unavailable { .. })));
        assert!(node.connect_string().is_none());
        node.start().unwrap();
        assert!(matches!(node.start(), Err(MeshError::InvalidInput { .. })));
        assert!(matches!(
            node.pending_pairings(),
            Err(MeshError::Unavailable { .. })
        ));
        assert!(matches!(
            node.set_policy("not-an-id".into(), "{}".into()),
            Err(MeshError::InvalidInput { .. })
        ));
        let id = node.node_id();
        assert!(
            node.connect_string()
                .unwrap()
                .starts_with(&format!("{id}@127.0.0.1:"))
        );
        // Dropped while running, outside any runtime: no panic, no hang.
        drop(node);
    }
}
