//! The node runtime: one API for a primary and its workers, driving the
//! sans-IO pieces (pairing, registry, health, ledger) over any
//! [`Transport`].
//!
//! What it drives: pairing with the code over the transport; paired
//! sessions opened with the device token, every message checked at the
//! registry gate (so revocation, unpairing and token rotation take effect at
//! once and close the session); heartbeats scored and tracked by the health
//! monitor; primary → worker commands (`ping`, `config`, `run_action` of a
//! registered handler); worker → primary commands decided by a
//! [`CommandPolicy`], with the approval lifecycle of actions and deferral;
//! every security-relevant change recorded in the [`Ledger`] in the same
//! storage batch; reconnection with exponential backoff and jitter.
//!
//! A node is usually started from a `DataDir` (identity and SQLite in one
//! directory) with a QUIC transport from mesh-transport, a `SignedLedger`
//! from mesh-ledger and a `RuntimePolicy` from mesh-policy; the reference
//! binaries in `examples/` and the FFI layer do exactly that.
//!
//! Each role is a type: [`NodeBuilder::start_primary`] gives a [`Primary`],
//! [`NodeBuilder::start_worker`] a [`Worker`]; both dereference to the
//! [`Node`] they are, which carries what the roles share (events, discovery,
//! the authenticated [`sessions`](Node::sessions) with peers,
//! [`command`](Node::command) to any of them, counters, shutdown).
//!
//! ```text
//!  worker                                   primary
//!    │── QUIC, ALPN pairing ──────────────────▶│  Pairing::Request (code shown on the worker)
//!    │◀──────────── Challenge (user typed it) ─│
//!    │── Confirm ─────────────────────────────▶│  device + token committed with a ledger record
//!    │◀────────────────── Approved (sealed) ───│
//!    │── QUIC, ALPN mesh ─────────────────────▶│  admitted: paired and not revoked
//!    │── Session::Hello { token } ────────────▶│  registry gate
//!    │◀──────────────────────────── Welcome ───│
//!    │── Heartbeat … Command … ───────────────▶│  gate on every message
//!    │◀────────────── Command … Bye{revoked} ──│
//! ```

mod actions;
mod backoff;
mod commit;
#[cfg(feature = "sqlite")]
mod data_dir;
mod delivery;
mod files;
mod ledger_sync;
mod link;
mod media;
mod mesh;
mod outlink;
mod primary;
mod protocols;
mod sync;
mod web;
mod worker;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::oneshot;

use crate::clock::{Clock, SystemClock, Timestamp};
use crate::discovery::{Discovery, DiscoveryError};
use crate::events::{EventBus, EventError, Subscription};
use crate::identity::{NodeId, NodeKey};
use crate::ledger::Ledger;
use crate::pairing::{PairingConfig, PairingError};
use crate::registry::{AuthError, Registry, RegistryError};
use crate::storage::records::DiscoveredNodeRecord;
use crate::storage::{Storage, StorageError};
use crate::transport::{Admission, Connection, PeerAddr, Protocol, Transport, TransportError};
use crate::wire::{CommandOutcome, CommandUsage, HealthMetrics, MessageId, Platform};

pub use actions::states as action_states;
pub use backoff::Backoff;
#[cfg(feature = "sqlite")]
pub use data_dir::{DB_FILE, DataDir, KEY_FILE};
pub use delivery::{DeliverySettings, DeliveryStatus, ReliableMessage, delivery_events};
pub use files::{
    Direction, FILES_DIR, FilesErrorKind, FilesSettings, FilesStats, TransferInfo, TransferState,
    file_events,
};
pub use ledger_sync::{LEDGER_SYNC, LEDGER_SYNC_INTERVAL, ledger_events};
pub use media::{MediaCounters, MediaIn, MediaOut, MediaOutCounter};
pub use mesh::{
    IssuedToken, MeshErrorKind, MeshSettings, MeshView, TokenStatus, TopicSubscription,
    mesh_records,
};
pub use primary::{DeviceView, FILES_SEND, Primary};
pub use protocols::{ProtocolError, ProtocolHandler};
pub use sync::{
    CONFIG_NAMESPACE, ChangeSubscription, ConfigEntry, Replicated, ReplicatedChange,
    ReplicatedEntry, SyncErrorKind, SyncPeerStatus, SyncSettings, TABLE_PREFIX,
};
pub use web::{DeviceHealthView, WebGrant, WebPairingTicket, web_token_text};
pub use worker::{PairingTicket, Worker};

/// Whether the node is the primary or a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The desktop primary: accepts pairing, holds the registry and policies.
    Primary,
    /// A worker device.
    Worker,
}

/// Node settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NodeConfig {
    /// Primary or worker.
    pub role: Role,
    /// Display name.
    pub name: String,
    /// Hardware/app id (unique among a primary's devices).
    pub device_id: String,
    /// Platform.
    pub platform: Platform,
    /// How often a worker sends a heartbeat. Default 5 s.
    pub heartbeat_interval: Duration,
    /// How long a command waits for its result. Default 10 s.
    pub command_timeout: Duration,
    /// First reconnection delay; doubles per failure. Default 500 ms.
    pub reconnect_base: Duration,
    /// Longest reconnection delay. Default 30 s.
    pub reconnect_max: Duration,
    /// Pairing settings.
    pub pairing: PairingConfig,
    /// Bounds on pairing requests (primary).
    pub pairing_limits: PairingLimits,
    /// Bounds on what one paired peer may send.
    pub peer_limits: PeerLimits,
    /// Trust progression (primary): each successful worker command raises
    /// the device's trust by `step`; at `trusted_from` a paired device
    /// becomes trusted (recorded in the ledger, `device.trusted`).
    pub trust: crate::registry::TrustConfig,
}

/// What one paired peer may send. Excess is refused with a typed code and
/// counted in [`NodeStats`]: a message over the rate is dropped
/// (`messages_refused`; a command among them is answered `rate_limited`),
/// a command over the in-flight cap is answered `too_many_commands`
/// (`commands_refused`), a connection over the per-key cap is closed at
/// once (`connections_refused`).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct PeerLimits {
    /// Messages per second from one peer. Default 100/s, burst 200.
    pub messages: crate::limits::Rate,
    /// Commands of one peer running at once. Default 16.
    pub commands_in_flight: usize,
    /// Connections of one key open at once. Default 4.
    pub connections_per_key: usize,
    /// Actions of one device waiting for approval at once; a command that
    /// would propose one more is answered `too_many_actions`. Default 32.
    pub proposed_actions: usize,
}

impl Default for PeerLimits {
    fn default() -> Self {
        PeerLimits {
            messages: crate::limits::Rate::per_second(100.0, 200),
            commands_in_flight: 16,
            connections_per_key: 4,
            proposed_actions: 32,
        }
    }
}

impl PeerLimits {
    /// Sets the message rate.
    pub fn messages(mut self, rate: crate::limits::Rate) -> Self {
        self.messages = rate;
        self
    }

    /// Sets the cap of actions waiting for approval per device (at least 1).
    pub fn proposed_actions(mut self, n: usize) -> Self {
        self.proposed_actions = n.max(1);
        self
    }

    /// Sets the in-flight command cap (at least 1).
    pub fn commands_in_flight(mut self, n: usize) -> Self {
        self.commands_in_flight = n.max(1);
        self
    }

    /// Sets the per-key connection cap (at least 1).
    pub fn connections_per_key(mut self, n: usize) -> Self {
        self.connections_per_key = n.max(1);
        self
    }
}

/// How much pairing traffic a primary takes: anyone on the network may ask
/// to pair, so every request is bounded before it costs a stored row.
///
/// A request is refused (closed at once, counted in
/// [`NodeStats::pairing_refused`], and published as `pairing.refused` with a
/// `reason` at most once a second, with the number `suppressed` since the
/// last) when the global or the source
/// address's rate is exceeded (`rate_limited`), or when as many requests as
/// allowed are already waiting (`too_many_pending`) in all or from that
/// address. A key has at most one live request: a new one from the same key
/// replaces the old. A request lives only as long as its connection (the
/// device must be connected to be approved); its row is removed when the
/// connection ends, for any reason, and rows left by a crash are removed at
/// start, so the table holds at most `max_pending` rows. The ledger keeps
/// the record of approvals and rejections.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct PairingLimits {
    /// Requests waiting at once, from everyone. Default 32.
    pub max_pending: usize,
    /// Requests waiting at once from one source address. Default 4.
    pub max_pending_per_address: usize,
    /// New requests accepted, from everyone. Default 10/s, burst 20.
    pub rate: crate::limits::Rate,
    /// New requests accepted from one source address. Default 1/s, burst 5.
    pub rate_per_address: crate::limits::Rate,
    /// A pairing connection with no message for this long is closed (the
    /// device must ask again). Default 5 minutes.
    pub idle_timeout: Duration,
}

impl Default for PairingLimits {
    fn default() -> Self {
        PairingLimits {
            max_pending: 32,
            max_pending_per_address: 4,
            rate: crate::limits::Rate::per_second(10.0, 20),
            rate_per_address: crate::limits::Rate::per_second(1.0, 5),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

impl PairingLimits {
    /// Sets the caps on waiting requests (all, per address).
    pub fn max_pending(mut self, all: usize, per_address: usize) -> Self {
        self.max_pending = all.max(1);
        self.max_pending_per_address = per_address.max(1);
        self
    }

    /// Sets the rates of new requests (all, per address).
    pub fn rates(mut self, all: crate::limits::Rate, per_address: crate::limits::Rate) -> Self {
        self.rate = all;
        self.rate_per_address = per_address;
        self
    }

    /// Sets the idle deadline of a pairing connection.
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = idle;
        self
    }
}

impl NodeConfig {
    /// Defaults for `role`, named `name` with hardware/app id `device_id`.
    pub fn new(role: Role, name: &str, device_id: &str) -> Self {
        NodeConfig {
            role,
            name: name.to_owned(),
            device_id: device_id.to_owned(),
            platform: Platform::Desktop,
            heartbeat_interval: Duration::from_secs(5),
            command_timeout: Duration::from_secs(10),
            reconnect_base: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            pairing: PairingConfig::default(),
            pairing_limits: PairingLimits::default(),
            peer_limits: PeerLimits::default(),
            trust: crate::registry::TrustConfig::default(),
        }
    }

    /// Sets the trust progression.
    pub fn trust(mut self, trust: crate::registry::TrustConfig) -> Self {
        self.trust = trust;
        self
    }

    /// Sets the bounds on what one peer may send.
    pub fn peer_limits(mut self, limits: PeerLimits) -> Self {
        self.peer_limits = limits;
        self
    }

    /// Sets the bounds on pairing requests.
    pub fn pairing_limits(mut self, limits: PairingLimits) -> Self {
        self.pairing_limits = limits;
        self
    }

    /// Sets the heartbeat interval.
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = interval;
        self
    }

    /// Sets the command timeout.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// Sets the reconnection backoff.
    pub fn reconnect(mut self, base: Duration, max: Duration) -> Self {
        self.reconnect_base = base;
        self.reconnect_max = max;
        self
    }

    /// Sets the platform.
    pub fn platform(mut self, platform: Platform) -> Self {
        self.platform = platform;
        self
    }
}

/// Where a worker's heartbeat metrics come from (the OS, or the app: phones
/// know their battery and thermal state better than Rust does).
pub trait MetricsSource: Send + Sync + fmt::Debug + 'static {
    /// The metrics now.
    fn sample(&self) -> HealthMetrics;
}

/// Heartbeats with no metrics (liveness only).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoMetrics;

impl MetricsSource for NoMetrics {
    fn sample(&self) -> HealthMetrics {
        HealthMetrics::default()
    }
}

/// Host code a command runs: registered by name, never a shell string.
///
/// The node calls it on a blocking thread (`tokio::task::spawn_blocking`),
/// so it may block — on file I/O, or on a call into Swift or Kotlin — without
/// holding up heartbeats or other commands. The node stops waiting after the
/// command timeout (`handler_timeout`); a panic fails the command
/// (`handler_panicked`).
pub trait CommandHandler: Send + Sync + fmt::Debug + 'static {
    /// Runs with the command's arguments; `Err` is the failure message.
    fn call(&self, args: &Value) -> Result<Value, String>;
}

/// A [`CommandHandler`] from a closure.
pub struct FnHandler<F>(pub F);

impl<F> fmt::Debug for FnHandler<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FnHandler")
    }
}

impl<F> CommandHandler for FnHandler<F>
where
    F: Fn(&Value) -> Result<Value, String> + Send + Sync + 'static,
{
    fn call(&self, args: &Value) -> Result<Value, String> {
        (self.0)(args)
    }
}

/// What a policy says about a worker's command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Run it.
    Allow,
    /// Refuse it.
    Deny {
        /// Reason code (e.g. `blocked_command`).
        code: String,
        /// Explanation.
        message: String,
    },
    /// A person must approve it first.
    NeedsApproval {
        /// Reason code.
        code: String,
        /// Explanation.
        message: String,
    },
    /// Try again later.
    Defer {
        /// How long to wait.
        delay_ms: u64,
        /// Reason code.
        code: String,
        /// Explanation.
        message: String,
    },
}

impl Verdict {
    fn name(&self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny { .. } => "deny",
            Verdict::NeedsApproval { .. } => "needs_approval",
            Verdict::Defer { .. } => "defer",
        }
    }
}

/// Held while an allowed command runs (a policy's concurrency slot, for
/// example); dropping it frees the slot.
pub struct Permit(Option<Box<dyn Send + Sync>>);

impl Permit {
    /// No slot to hold.
    pub fn none() -> Self {
        Permit(None)
    }

    /// Holds `guard` until the command finished.
    pub fn holding(guard: impl Send + Sync + 'static) -> Self {
        Permit(Some(Box::new(guard)))
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Permit").field(&self.0.is_some()).finish()
    }
}

/// Everything a policy is told about one worker command.
///
/// The power context comes from the device itself: its `platform` (from
/// pairing) and its latest heartbeat (`metrics`: battery, charging,
/// low-power mode, thermal state, CPU). A desktop that reports a battery
/// is a laptop. What the command will use (`usage`: cost, tokens, job
/// size) is declared by the sender with the command
/// ([`Worker::send_command_with`]); a command that declares nothing costs
/// nothing and is a small job.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct CommandRequest<'a> {
    /// The device asking.
    pub device: &'a NodeId,
    /// Its platform, as paired.
    pub platform: Platform,
    /// The command name.
    pub command: &'a str,
    /// Now.
    pub now: Timestamp,
    /// The device's latest heartbeat metrics, if any came.
    pub metrics: Option<&'a HealthMetrics>,
    /// What the command declares it uses.
    pub usage: CommandUsage,
    /// For `files.send`: the file's size in bytes.
    pub file_bytes: Option<u64>,
}

impl<'a> CommandRequest<'a> {
    /// `device` asking to run `command` at `now` (a desktop with no metrics
    /// and no declared usage; see the setters).
    pub fn new(device: &'a NodeId, command: &'a str, now: Timestamp) -> Self {
        CommandRequest {
            device,
            platform: Platform::Desktop,
            command,
            now,
            metrics: None,
            usage: CommandUsage::default(),
            file_bytes: None,
        }
    }

    /// Sets the size of the file a `files.send` moves.
    pub fn file_bytes(mut self, bytes: u64) -> Self {
        self.file_bytes = Some(bytes);
        self
    }

    /// Sets the device's platform.
    pub fn platform(mut self, platform: Platform) -> Self {
        self.platform = platform;
        self
    }

    /// Sets the device's latest metrics.
    pub fn metrics(mut self, metrics: Option<&'a HealthMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Sets the declared usage.
    pub fn usage(mut self, usage: CommandUsage) -> Self {
        self.usage = usage;
        self
    }

    /// Whether the device runs on a battery it reports (a phone, or a
    /// desktop platform with a battery: a laptop).
    pub fn reports_battery(&self) -> bool {
        self.metrics.is_some_and(|m| m.battery_percent.is_some())
    }
}

/// Decides the commands workers send to the primary, and keeps the
/// per-device policy documents (mesh-policy implements it behind its
/// `runtime` feature).
pub trait CommandPolicy: Send + Sync + fmt::Debug + 'static {
    /// The verdict for `request` now, and what to hold while an allowed
    /// command runs.
    fn decide(&self, request: &CommandRequest<'_>) -> (Verdict, Permit);

    /// Checks `document` without installing it; `Err` says what is wrong.
    /// The runtime checks, then commits the document with its ledger
    /// record, and only then installs it.
    fn validate(&self, document: &str) -> Result<(), String> {
        let _ = document;
        Err("this policy does not take documents".into())
    }

    /// Installs `device`'s policy document (JSON), already validated and
    /// committed.
    fn install(&self, device: &NodeId, document: &str) -> Result<(), String> {
        let _ = (device, document);
        Err("this policy does not take documents".into())
    }

    /// Removes `device`'s policy (it is then denied everything).
    fn remove(&self, device: &NodeId) {
        let _ = device;
    }
}

/// Refuses everything: the default until a policy is configured.
#[derive(Debug, Clone, Copy, Default)]
pub struct DenyAll;

impl CommandPolicy for DenyAll {
    fn decide(&self, _: &CommandRequest<'_>) -> (Verdict, Permit) {
        let verdict = Verdict::Deny {
            code: "policy_disabled".into(),
            message: "no execution policy is configured on the primary".into(),
        };
        (verdict, Permit::none())
    }
}

/// Runtime errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Pairing failed (wrong code, rejected, expired, …).
    #[error(transparent)]
    Pairing(#[from] PairingError),
    /// The registry refused a change.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The gate refused a device (unknown, revoked, wrong token, scope).
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A registered protocol cannot be served.
    #[error(transparent)]
    ProtocolSetup(#[from] protocols::ProtocolError),
    /// A command was refused or failed on the other side.
    #[error("command refused or failed: {code}: {message}")]
    Command {
        /// Reason code.
        code: String,
        /// Explanation.
        message: String,
    },
    /// No answer in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The device is not connected.
    #[error("device {0} is not connected")]
    NotConnected(NodeId),
    /// The operation needs the device online (a token rotation it must
    /// acknowledge); force it to go ahead without.
    #[error("device {0} is offline; a forced rotation makes it pair again")]
    DeviceOffline(NodeId),
    /// This operation belongs to the other role, or needs pairing first.
    #[error("not available: {0}")]
    Unavailable(String),
    /// No such thing on this node (an action id, …).
    #[error("not found: {0}")]
    NotFound(String),
    /// The peer broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A subscription could not be made.
    #[error(transparent)]
    Events(#[from] EventError),
    /// A policy document was refused.
    #[error("invalid policy: {0}")]
    Policy(String),
    /// Discovery failed.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// The node key could not be loaded or created.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    /// A mesh operation failed (see [`MeshErrorKind`] for the kinds).
    #[error("{kind}: {message}")]
    Mesh {
        /// What kind of failure.
        kind: MeshErrorKind,
        /// What went wrong.
        message: String,
    },
    /// A replicated-state operation failed (see [`SyncErrorKind`]).
    #[error("{kind}: {message}")]
    Sync {
        /// What kind of failure.
        kind: SyncErrorKind,
        /// What went wrong.
        message: String,
    },
    /// A file transfer refused or failed (see [`FilesErrorKind`]).
    #[error("{kind}: {message}")]
    Files {
        /// Why, as a stable code.
        kind: files::FilesErrorKind,
        /// What happened.
        message: String,
    },
    /// The data directory could not be created or secured.
    #[error("cannot use data directory {path}: {source}", path = .path.display())]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}

/// Reason codes of commands that failed in the runtime or in host code, as
/// opposed to the policy's refusals (`blocked_command`, `needs_approval`,
/// `deferred`, `policy_disabled`, a time window, a battery rule, …).
pub const FAILURE_CODES: &[&str] = &[
    "audit_failed",
    "cancelled",
    "connection_lost",
    "duplicate_command",
    "handler_failed",
    "handler_panicked",
    "handler_timeout",
    "invalid_args",
    "rate_limited",
    "scope_missing",
    "too_many_commands",
    "unknown_action",
    "unknown_command",
];

impl NodeError {
    /// The reason code and message if this is a command the other side's
    /// policy refused (not one that failed while running).
    pub fn policy_refusal(&self) -> Option<(&str, &str)> {
        match self {
            NodeError::Command { code, message } if !FAILURE_CODES.contains(&code.as_str()) => {
                Some((code, message))
            }
            _ => None,
        }
    }
}

/// Admits keys per protocol from the registry in `store`: anyone may reach
/// pairing; mesh traffic needs a paired, unrevoked device. Build the
/// transport with it (from the same store) before building the node.
#[derive(Debug, Clone)]
pub struct RegistryAdmission {
    registry: Registry,
}

impl RegistryAdmission {
    /// Admission decided by the devices in `store`.
    pub fn new(store: Arc<dyn Storage>) -> Self {
        RegistryAdmission {
            registry: Registry::new(store, EventBus::new()),
        }
    }
}

impl Admission for RegistryAdmission {
    fn admit(&self, peer: &NodeId, protocol: Protocol) -> bool {
        if protocol == Protocol::PAIRING {
            true
        } else if protocol == Protocol::MESH {
            protocols::paired(&self.registry, peer)
        } else {
            false
        }
    }
}

/// Builds a [`Node`].
pub struct NodeBuilder {
    key: Arc<NodeKey>,
    store: Arc<dyn Storage>,
    transports: Vec<Arc<dyn Transport>>,
    discovery: Vec<Arc<dyn Discovery>>,
    config: NodeConfig,
    events: EventBus,
    clock: Arc<dyn Clock>,
    ledger: Option<Arc<dyn Ledger>>,
    metrics: Arc<dyn MetricsSource>,
    policy: Arc<dyn CommandPolicy>,
    handlers: HashMap<String, Arc<dyn CommandHandler>>,
    protocols: Vec<(Protocol, Arc<dyn protocols::ProtocolHandler>)>,
    record_timings: bool,
    data_dir: Option<std::path::PathBuf>,
    mesh: Option<MeshSettings>,
    ledger_sync: Option<Arc<dyn crate::ledger::LedgerSync>>,
    sync: SyncSettings,
    files: Option<FilesSettings>,
}

impl fmt::Debug for NodeBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeBuilder")
            .field("node", &self.key.node_id())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl NodeBuilder {
    /// Another transport (e.g. a second QUIC endpoint): connections go through the
    /// first that supports the address; the primary accepts on all.
    pub fn transport(mut self, transport: Arc<dyn Transport>) -> Self {
        self.transports.push(transport);
        self
    }

    /// A way of finding nodes (mDNS, static peers); see [`Node::discover`].
    pub fn discovery(mut self, discovery: Arc<dyn Discovery>) -> Self {
        self.discovery.push(discovery);
        self
    }

    /// The event bus to publish on (default: a new one).
    pub fn events(mut self, events: EventBus) -> Self {
        self.events = events;
        self
    }

    /// The clock (default: the system clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The audit ledger: registry changes and command decisions are recorded
    /// in it, in the same storage batch. A primary also ticks it with its
    /// periodic work, so checkpoints that fall due by time are made.
    pub fn ledger(mut self, ledger: Arc<dyn Ledger>) -> Self {
        self.ledger = Some(ledger);
        self
    }

    /// Where heartbeat metrics come from (workers; default: none).
    pub fn metrics(mut self, metrics: Arc<dyn MetricsSource>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The policy for workers' commands (primary; default: [`DenyAll`]).
    pub fn policy(mut self, policy: Arc<dyn CommandPolicy>) -> Self {
        self.policy = policy;
        self
    }

    /// Registers host code under `name`: on a worker it runs for the
    /// primary's `run_action` with `{"action": name}`; on the primary it runs
    /// for workers' commands named `name` that the policy allows.
    pub fn handler(mut self, name: &str, handler: Arc<dyn CommandHandler>) -> Self {
        self.handlers.insert(name.to_owned(), handler);
        self
    }

    /// Serves `protocol` (an ALPN of the app's or of a later SDK layer) with
    /// `handler`, on either role: the node's transports then accept it, and
    /// `handler.admit` decides which keys may use it. [`Protocol::PAIRING`]
    /// and [`Protocol::MESH`] are the SDK's own ([`NodeBuilder::start`]
    /// refuses them, and a protocol registered twice, with
    /// [`NodeError::ProtocolSetup`]).
    pub fn protocol(
        mut self,
        protocol: Protocol,
        handler: Arc<dyn protocols::ProtocolHandler>,
    ) -> Self {
        self.protocols.push((protocol, handler));
        self
    }

    /// Takes part in the mesh of nodes with `settings`: the node serves the
    /// membership and join protocols, restores its member table from
    /// storage, and offers [`Node::mesh_token`], [`Node::join_mesh`] and the
    /// other `mesh_*` operations.
    pub fn mesh(mut self, settings: MeshSettings) -> Self {
        self.mesh = Some(settings);
        self
    }

    /// How replicated state syncs with the node's devices or primary when
    /// it takes part in no mesh (in a mesh, [`MeshSettings::sync`] says).
    pub fn sync(mut self, settings: SyncSettings) -> Self {
        self.sync = settings;
        self
    }

    /// File transfer between a primary and its devices ([`Node::send_file`]),
    /// files landing in `settings.dir`. A node built from a [`DataDir`]
    /// has it on by default, in `DATA_DIR/files`.
    pub fn files(mut self, settings: FilesSettings) -> Self {
        self.files = Some(settings);
        self
    }

    /// Replicates ledgers through `sync` (mesh-ledger's `LedgerHub`): with
    /// the mesh's members (their ledgers pulled in the background, this
    /// node's served), and between a primary and its devices (a primary
    /// pulls each device's ledger over its session when it opens; a worker
    /// answers with its own).
    pub fn ledger_sync(mut self, sync: Arc<dyn crate::ledger::LedgerSync>) -> Self {
        self.ledger_sync = Some(sync);
        self
    }

    /// Keeps the primary's per-heartbeat processing times (for benchmarks
    /// and diagnostics; see [`Node::stats`]).
    pub fn record_timings(mut self, on: bool) -> Self {
        self.record_timings = on;
        self
    }

    /// Starts the node's tasks (inside a tokio runtime), in the role its
    /// configuration names; [`Node::as_primary`] and [`Node::as_worker`]
    /// give the role's handle.
    pub fn start(self) -> Result<Node, NodeError> {
        let core = Arc::new(Core {
            stats: Stats {
                timings: self.record_timings.then(|| Mutex::new(Vec::new())),
                ..Stats::default()
            },
            link: link::Link::new(self.key.clone()),
            key: self.key,
            store: self.store,
            transports: self.transports,
            discovery: self.discovery,
            config: self.config,
            events: self.events,
            clock: self.clock,
            handlers: self.handlers,
            calls: link::PendingCalls::default(),
            guards: link::PeerGuards::default(),
            sessions: link::Sessions::default(),
            next_session: std::sync::atomic::AtomicU64::new(1),
            tasks: Mutex::new(Vec::new()),
            data_dir: self.data_dir,
            ledger: self.ledger,
            sync: std::sync::OnceLock::new(),
            ledger_sync: std::sync::OnceLock::new(),
            files: std::sync::OnceLock::new(),
        });
        let (role, mut built_in) = match core.config.role {
            Role::Primary => {
                let rt = primary::PrimaryRt::new(core.clone(), self.policy);
                let built_in = primary::protocols(&rt);
                (RoleRt::Primary(rt), built_in)
            }
            Role::Worker => (
                RoleRt::Worker(worker::WorkerRt::new(core.clone(), self.metrics)),
                Vec::new(),
            ),
        };
        // Replicated state runs on every node: with its devices (a
        // primary) or its primary (a worker) over their sessions, and with
        // the mesh's members if it takes part in a mesh.
        let side = match &role {
            RoleRt::Primary(rt) => {
                let prt = rt.clone();
                sync::SessionSide::Devices(Arc::new(move |device: &NodeId, ns: &str| {
                    prt.device_may_sync(device, ns)
                }))
            }
            RoleRt::Worker(_) => sync::SessionSide::Primary,
        };
        let sync_settings = self
            .mesh
            .as_ref()
            .map_or_else(|| self.sync.clone(), |m| m.sync.clone());
        let (mesh, delivery, sync) = match self.mesh {
            Some(settings) => {
                let delivery_settings = settings.delivery.clone();
                let rt = mesh::build(&core, settings)?;
                built_in.extend(mesh::protocols(&rt));
                let sync = sync::build(&core, Some(&rt), side, sync_settings)?;
                built_in.push(sync::protocol(&sync));
                let delivery = delivery::build(&core, &rt, delivery_settings)?;
                built_in.push(delivery::protocol(&delivery));
                (Some(rt), Some(delivery), sync)
            }
            None => (None, None, sync::build(&core, None, side, sync_settings)?),
        };
        let _ = core.sync.set(Arc::downgrade(&sync));
        let sync = Some(sync);
        // Ledgers: with the mesh's members over their protocol, and with
        // devices (a primary pulls its devices' ledgers) over the session.
        let ledger_sync = self.ledger_sync.map(|ls| {
            let rt = ledger_sync::build(&core, mesh.as_ref(), ls);
            if mesh.is_some() {
                built_in.push(ledger_sync::protocol(&rt));
            }
            let _ = core.ledger_sync.set(Arc::downgrade(&rt));
            rt
        });
        // Files: a primary serves them to its devices; a worker dials.
        let files = match self.files {
            Some(settings) => {
                let side = match &role {
                    RoleRt::Primary(rt) => {
                        let (a, g, m) = (rt.clone(), rt.clone(), rt.clone());
                        files::FilesSide::Primary {
                            admit: Arc::new(move |peer: &NodeId| a.device_may_connect(peer)),
                            gate: Arc::new(move |peer: &NodeId, size: u64| {
                                g.files_gate(peer, size)
                            }),
                            media: Arc::new(move |peer: &NodeId| m.device_may_media(peer)),
                        }
                    }
                    RoleRt::Worker(_) => files::FilesSide::Worker,
                };
                let rt = files::build(&core, settings, side)?;
                if core.config.role == Role::Primary {
                    built_in.push(files::protocol(&rt));
                }
                let _ = core.files.set(Arc::downgrade(&rt));
                Some(rt)
            }
            None => None,
        };
        let protocols = protocols::Protocols::new(built_in, self.protocols)?;
        let node = Node {
            owner: Arc::new(Owner {
                core: core.clone(),
                role: role.clone(),
            }),
            core,
            role,
            mesh,
            sync,
            delivery,
            ledger_sync,
            files,
        };
        match &node.role {
            RoleRt::Primary(rt) => primary::start(rt)?,
            RoleRt::Worker(rt) => worker::start(rt)?,
        }
        serve_protocols(&node.core, &protocols)?;
        Ok(node)
    }

    /// Starts a primary ([`NodeBuilder::start`] for a configuration whose
    /// role is [`Role::Primary`]; any other is refused with
    /// [`NodeError::Unavailable`] before anything starts).
    pub fn start_primary(self) -> Result<Primary, NodeError> {
        if self.config.role != Role::Primary {
            return Err(NodeError::Unavailable(
                "start_primary needs a configuration with Role::Primary".into(),
            ));
        }
        self.start()?
            .as_primary()
            .ok_or_else(|| NodeError::Unavailable("the node did not start as a primary".into()))
    }

    /// Starts a worker (see [`NodeBuilder::start_primary`]).
    pub fn start_worker(self) -> Result<Worker, NodeError> {
        if self.config.role != Role::Worker {
            return Err(NodeError::Unavailable(
                "start_worker needs a configuration with Role::Worker".into(),
            ));
        }
        self.start()?
            .as_worker()
            .ok_or_else(|| NodeError::Unavailable("the node did not start as a worker".into()))
    }
}

/// Tells every transport what the node serves (and who may use it), and
/// accepts on each if it serves anything.
fn serve_protocols(core: &Arc<Core>, protocols: &protocols::Protocols) -> Result<(), NodeError> {
    let list = protocols.list();
    let admission = protocols.admission();
    let registered = protocols.any_registered();
    for transport in &core.transports {
        match transport.serve(&list, admission.clone()) {
            Ok(()) => {}
            // A transport that knows only the built-in protocols keeps the
            // admission it was made with; it cannot carry registered ones.
            Err(TransportError::Unsupported(_)) if !registered => {}
            Err(e) => return Err(e.into()),
        }
    }
    if !list.is_empty() {
        for transport in core.transports.clone() {
            accept_on(core, transport, protocols.clone());
        }
    }
    Ok(())
}

/// Accepts connections on one transport and hands each, in a task of its
/// own, to the handler of its protocol.
fn accept_on(core: &Arc<Core>, transport: Arc<dyn Transport>, protocols: protocols::Protocols) {
    let accepting = core.clone();
    core.spawn(async move {
        loop {
            match transport.accept().await {
                Ok(conn) => {
                    let conn: Arc<dyn Connection> = Arc::from(conn);
                    match protocols.get(conn.protocol()).cloned() {
                        Some(handler) => accepting.spawn(async move { handler.serve(conn).await }),
                        // Admission refuses what is not served; a transport
                        // without `serve` may still let it in.
                        None => conn.close(),
                    }
                }
                Err(TransportError::Closed) => break,
                Err(_) => continue,
            }
        }
    });
}

/// Counters of a running node, and (if asked for with
/// [`NodeBuilder::record_timings`]) the time the primary spent on each
/// heartbeat, from the frame leaving the transport to the health update.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    heartbeats_sent: std::sync::atomic::AtomicU64,
    heartbeats_received: std::sync::atomic::AtomicU64,
    pairing_refused: std::sync::atomic::AtomicU64,
    messages_refused: std::sync::atomic::AtomicU64,
    commands_refused: std::sync::atomic::AtomicU64,
    connections_refused: std::sync::atomic::AtomicU64,
    timings: Option<Mutex<Vec<u32>>>,
}

/// Most heartbeat timings kept.
const MAX_TIMINGS: usize = 1 << 20;

impl Stats {
    fn heartbeat_received(&self) {
        self.heartbeats_received
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn heartbeat_timed(&self, took: Duration) {
        if let Some(t) = &self.timings {
            let mut t = lock(t);
            if t.len() < MAX_TIMINGS {
                t.push(u32::try_from(took.as_nanos()).unwrap_or(u32::MAX));
            }
        }
    }
}

/// A snapshot of a node's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeStats {
    /// Heartbeats a worker sent.
    pub heartbeats_sent: u64,
    /// Heartbeats the primary processed.
    pub heartbeats_received: u64,
    /// Pairing requests refused by [`PairingLimits`] (rate or caps).
    pub pairing_refused: u64,
    /// Messages dropped over a peer's rate ([`PeerLimits::messages`]).
    pub messages_refused: u64,
    /// Commands refused over a peer's in-flight cap.
    pub commands_refused: u64,
    /// Connections closed over a key's connection cap.
    pub connections_refused: u64,
    /// Per-heartbeat processing times on the primary, nanoseconds (only
    /// with [`NodeBuilder::record_timings`]; at most 2^20 kept).
    pub heartbeat_nanos: Vec<u32>,
}

/// What both roles share: identity, storage, transports, the signed link,
/// the authenticated sessions with peers, the calls awaiting results, the
/// node's tasks. Each role's own state is in its runtime
/// ([`primary::PrimaryRt`], [`worker::WorkerRt`]), which the node's tasks
/// and the role's handle hold; nothing checks the role at run time.
pub(crate) struct Core {
    stats: Stats,
    key: Arc<NodeKey>,
    store: Arc<dyn Storage>,
    /// Tried in order; `AddressNotSupported` passes to the next.
    transports: Vec<Arc<dyn Transport>>,
    discovery: Vec<Arc<dyn Discovery>>,
    config: NodeConfig,
    events: EventBus,
    clock: Arc<dyn Clock>,
    /// Host code by name: a worker runs it for the primary's `run_action`,
    /// a primary for workers' commands its policy allows.
    handlers: HashMap<String, Arc<dyn CommandHandler>>,
    link: link::Link,
    /// Commands sent and awaiting their result, by (peer, command id).
    calls: link::PendingCalls,
    /// Each authenticated peer's replay guard.
    guards: link::PeerGuards,
    /// The open authenticated session with each peer (a primary's devices,
    /// a worker's primary; the primaries of a mesh next).
    sessions: link::Sessions,
    /// Numbers sessions.
    next_session: std::sync::atomic::AtomicU64,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    data_dir: Option<std::path::PathBuf>,
    /// The audit ledger (also held by the primary's registry), ticked by
    /// the primary.
    ledger: Option<Arc<dyn Ledger>>,
    /// Replicated state (set once at start): device sessions hand it their
    /// sync frames, a worker's heartbeats read its figures.
    sync: std::sync::OnceLock<std::sync::Weak<sync::SyncRt>>,
    /// Ledger replication (set once at start, if the node has it).
    ledger_sync: std::sync::OnceLock<std::sync::Weak<ledger_sync::LedgerSyncRt>>,
    /// File transfer (set once at start, if the node has it).
    files: std::sync::OnceLock<std::sync::Weak<files::FilesRt>>,
}

/// The role's runtime.
#[derive(Clone)]
enum RoleRt {
    Primary(Arc<primary::PrimaryRt>),
    Worker(Arc<worker::WorkerRt>),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Core {
    fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// The sync runtime, while the node runs.
    fn sync_rt(&self) -> Option<Arc<sync::SyncRt>> {
        self.sync.get().and_then(std::sync::Weak::upgrade)
    }

    /// Ledger replication, if the node has it.
    fn ledger_sync_rt(&self) -> Option<Arc<ledger_sync::LedgerSyncRt>> {
        self.ledger_sync.get().and_then(std::sync::Weak::upgrade)
    }

    /// File transfer, if the node has it.
    fn files_rt(&self) -> Option<Arc<files::FilesRt>> {
        self.files.get().and_then(std::sync::Weak::upgrade)
    }

    /// Connects through the first transport that supports `addr`.
    async fn connect(
        &self,
        peer: NodeId,
        addr: &PeerAddr,
        protocol: Protocol,
    ) -> Result<Box<dyn Connection>, TransportError> {
        for t in &self.transports {
            match t.connect(peer, addr, protocol).await {
                Err(TransportError::AddressNotSupported(_)) => continue,
                other => return other,
            }
        }
        Err(TransportError::AddressNotSupported(addr.clone()))
    }

    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task);
        let mut tasks = lock(&self.tasks);
        tasks.retain(|t| !t.is_finished());
        tasks.push(handle);
    }

    /// A new session number.
    fn session_id(&self) -> u64 {
        self.next_session
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Sends command `name` to the peer of `session` and waits for its
    /// result: the one way commands go out, in both directions. Fails with
    /// `connection_lost` as soon as that session ends.
    async fn call(
        &self,
        session: &link::SessionRef,
        name: &str,
        args: &Value,
        usage: Option<CommandUsage>,
    ) -> Result<Value, NodeError> {
        let id = MessageId::random();
        let to = session.peer;
        let rx = self.calls.expect(to, session.id, id);
        let timeout = self.config.command_timeout;
        let cmd = crate::wire::Payload::Command(crate::wire::Command {
            command_id: id,
            name: name.to_owned(),
            args: crate::wire::JsonText::from_value(args)
                .map_err(|e| NodeError::Protocol(e.to_string()))?,
            timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
            usage,
        });
        if let Err(e) = self
            .link
            .send(session.conn.as_ref(), to, cmd, self.now())
            .await
        {
            self.calls.forget(to, id);
            return Err(e);
        }
        self.await_result(to, id, rx, timeout).await
    }

    /// Waits for a call's outcome within the command timeout.
    async fn await_result(
        &self,
        to: NodeId,
        id: MessageId,
        rx: oneshot::Receiver<CommandOutcome>,
        timeout: Duration,
    ) -> Result<Value, NodeError> {
        let outcome = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => {
                return Err(NodeError::Command {
                    code: "connection_lost".into(),
                    message: "the connection closed before the result came".into(),
                });
            }
            Err(_) => {
                self.calls.forget(to, id);
                return Err(NodeError::Timeout(timeout));
            }
        };
        match outcome {
            CommandOutcome::Ok(json) => {
                serde_json::from_str(json.as_str()).map_err(|e| NodeError::Protocol(e.to_string()))
            }
            CommandOutcome::Err { code, message } => Err(NodeError::Command { code, message }),
        }
    }
}

/// A running node, of either role: what both roles do (identity, events,
/// discovery, the sessions with peers, commands to them, counters,
/// shutdown). The role's own operations are on its typed handle,
/// [`Primary`] or [`Worker`] ([`Node::as_primary`], [`Node::as_worker`],
/// or [`NodeBuilder::start_primary`] / [`NodeBuilder::start_worker`]).
///
/// Clones (and role handles) share the node; when the last is dropped
/// without [`Node::shutdown`], the node's tasks are aborted and its
/// connections closed (without the goodbye `shutdown` sends).
#[derive(Clone)]
pub struct Node {
    core: Arc<Core>,
    role: RoleRt,
    /// The mesh runtime, if the node takes part in the mesh.
    mesh: Option<Arc<mesh::MeshRt>>,
    /// Replicated state, synced with the mesh's members.
    sync: Option<Arc<sync::SyncRt>>,
    /// Reliable delivery to the mesh's members.
    delivery: Option<Arc<delivery::DeliveryRt>>,
    /// Ledger replication with the mesh's members.
    ledger_sync: Option<Arc<ledger_sync::LedgerSyncRt>>,
    /// File transfer.
    files: Option<Arc<files::FilesRt>>,
    /// Held only by handles (the node's own tasks hold the runtimes).
    #[allow(dead_code)]
    owner: Arc<Owner>,
}

/// Stops the node when the last handle goes.
struct Owner {
    core: Arc<Core>,
    role: RoleRt,
}

impl Drop for Owner {
    fn drop(&mut self) {
        match &self.role {
            RoleRt::Primary(rt) => primary::close_now(rt),
            RoleRt::Worker(rt) => worker::stop_now(rt),
        }
        for t in lock(&self.core.tasks).drain(..) {
            t.abort();
        }
        if let RoleRt::Primary(rt) = &self.role {
            rt.flush_health();
        }
    }
}

/// An authenticated session the node holds with a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerSession {
    /// The peer.
    pub peer: NodeId,
    /// When the session opened.
    pub opened_at: Timestamp,
    /// Where the peer is, as the transport sees it.
    pub addr: Option<PeerAddr>,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.core.key.node_id())
            .field("role", &self.role())
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Starts building a node from its identity, storage and transport.
    pub fn builder(
        key: Arc<NodeKey>,
        store: Arc<dyn Storage>,
        transport: Arc<dyn Transport>,
        config: NodeConfig,
    ) -> NodeBuilder {
        NodeBuilder {
            key,
            store,
            transports: vec![transport],
            discovery: Vec::new(),
            config,
            events: EventBus::new(),
            clock: Arc::new(SystemClock),
            ledger: None,
            metrics: Arc::new(NoMetrics),
            policy: Arc::new(DenyAll),
            handlers: HashMap::new(),
            protocols: Vec::new(),
            record_timings: false,
            data_dir: None,
            mesh: None,
            ledger_sync: None,
            sync: SyncSettings::default(),
            files: None,
        }
    }

    /// The time on this node's clock (what its records and events carry).
    pub fn now(&self) -> Timestamp {
        self.core.now()
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.core.key.node_id()
    }

    /// The role.
    pub fn role(&self) -> Role {
        match self.role {
            RoleRt::Primary(_) => Role::Primary,
            RoleRt::Worker(_) => Role::Worker,
        }
    }

    /// The primary's handle, if this node is the primary.
    pub fn as_primary(&self) -> Option<Primary> {
        match &self.role {
            RoleRt::Primary(rt) => Some(Primary {
                node: self.clone(),
                rt: rt.clone(),
            }),
            RoleRt::Worker(_) => None,
        }
    }

    /// The worker's handle, if this node is a worker.
    pub fn as_worker(&self) -> Option<Worker> {
        match &self.role {
            RoleRt::Worker(rt) => Some(Worker {
                node: self.clone(),
                rt: rt.clone(),
            }),
            RoleRt::Primary(_) => None,
        }
    }

    /// The authenticated sessions open now, one per peer: a primary's
    /// connected devices, a worker's primary.
    pub fn sessions(&self) -> Vec<PeerSession> {
        self.core.sessions.list()
    }

    /// Sends command `name` with `args` to `peer`, with which a session is
    /// open, and waits for its result (or the refusal): a primary's
    /// commands to a device, a worker's to its primary (which decides it
    /// by the device's policy). Fails with [`NodeError::NotConnected`]
    /// without a session, with `connection_lost` as soon as the session
    /// ends, and with [`NodeError::Timeout`] after the command timeout.
    pub async fn command(
        &self,
        peer: &NodeId,
        name: &str,
        args: Value,
    ) -> Result<Value, NodeError> {
        let session = self
            .core
            .sessions
            .get(peer)
            .ok_or(NodeError::NotConnected(*peer))?;
        self.core.call(&session, name, &args, None).await
    }

    /// The data directory, if the node was built from a [`DataDir`].
    pub fn data_dir(&self) -> Option<&std::path::Path> {
        self.core.data_dir.as_deref()
    }

    /// The event bus.
    pub fn events(&self) -> &EventBus {
        &self.core.events
    }

    /// Subscribes to events matching `pattern` (e.g. `pairing.*`).
    pub fn subscribe(&self, pattern: &str, capacity: usize) -> Result<Subscription, NodeError> {
        Ok(self.core.events.subscribe(pattern, capacity)?)
    }

    /// Every node the configured discovery mechanisms know, plus any found
    /// within `timeout` (one entry per node).
    pub async fn discover(
        &self,
        timeout: Duration,
    ) -> Result<Vec<DiscoveredNodeRecord>, NodeError> {
        let mut found: Vec<DiscoveredNodeRecord> = Vec::new();
        for d in &self.core.discovery {
            for n in d.discover(timeout).await? {
                if n.node != self.node_id() && !found.iter().any(|f| f.node == n.node) {
                    found.push(n);
                }
            }
        }
        Ok(found)
    }

    /// The node's counters (and timings, if recorded).
    pub fn stats(&self) -> NodeStats {
        let s = &self.core.stats;
        NodeStats {
            heartbeats_sent: s.heartbeats_sent.load(std::sync::atomic::Ordering::Relaxed),
            heartbeats_received: s
                .heartbeats_received
                .load(std::sync::atomic::Ordering::Relaxed),
            pairing_refused: s.pairing_refused.load(std::sync::atomic::Ordering::Relaxed),
            messages_refused: s
                .messages_refused
                .load(std::sync::atomic::Ordering::Relaxed),
            commands_refused: s
                .commands_refused
                .load(std::sync::atomic::Ordering::Relaxed),
            connections_refused: s
                .connections_refused
                .load(std::sync::atomic::Ordering::Relaxed),
            heartbeat_nanos: s
                .timings
                .as_ref()
                .map(|t| lock(t).clone())
                .unwrap_or_default(),
        }
    }

    /// Stops every task and closes every connection.
    pub async fn shutdown(&self) {
        match &self.role {
            RoleRt::Primary(rt) => {
                primary::close_all(rt, crate::session::ByeReason::Shutdown).await
            }
            RoleRt::Worker(rt) => worker::stop(rt).await,
        }
        let tasks: Vec<_> = lock(&self.core.tasks).drain(..).collect();
        for t in tasks {
            t.abort();
        }
        if let RoleRt::Primary(rt) = &self.role {
            rt.flush_health();
        }
    }
}
