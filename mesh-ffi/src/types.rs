//! Records and enums crossing the boundary, and their conversions.

use mesh_core::node::{DeviceView, Role, Verdict};
use mesh_core::storage::records::{ActionRecord, DiscoveredNodeRecord, PairingRequestRecord};
use mesh_core::wire::{HealthMetrics, Platform, Thermal};

/// Primary or worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum NodeRole {
    /// The desktop primary: approves pairing, holds devices and policies.
    Primary,
    /// A worker device.
    Worker,
}

impl From<NodeRole> for Role {
    fn from(r: NodeRole) -> Role {
        match r {
            NodeRole::Primary => Role::Primary,
            NodeRole::Worker => Role::Worker,
        }
    }
}

/// The platform a device runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum DevicePlatform {
    /// Desktop.
    Desktop,
    /// iOS.
    Ios,
    /// Android.
    Android,
    /// Web.
    Web,
}

impl From<DevicePlatform> for Platform {
    fn from(p: DevicePlatform) -> Platform {
        match p {
            DevicePlatform::Desktop => Platform::Desktop,
            DevicePlatform::Ios => Platform::Ios,
            DevicePlatform::Android => Platform::Android,
            DevicePlatform::Web => Platform::Web,
        }
    }
}

impl From<Platform> for DevicePlatform {
    fn from(p: Platform) -> DevicePlatform {
        match p {
            Platform::Desktop => DevicePlatform::Desktop,
            Platform::Ios => DevicePlatform::Ios,
            Platform::Android => DevicePlatform::Android,
            Platform::Web => DevicePlatform::Web,
        }
    }
}

/// How to start a node. [`default_options`](crate::default_options) fills
/// in the defaults.
#[derive(Debug, Clone, uniffi::Record)]
pub struct NodeOptions {
    /// Primary or worker.
    pub role: NodeRole,
    /// Display name.
    pub name: String,
    /// Hardware/app id, unique among a primary's devices.
    pub device_id: String,
    /// This device's platform.
    pub platform: DevicePlatform,
    /// Where the node key and the database live (created, mode 0700).
    pub data_dir: String,
    /// QUIC listen address, e.g. `0.0.0.0:4433`; port 0 picks one.
    pub listen_addr: String,
    /// Advertise (primary) and browse (both) over mDNS.
    pub mdns: bool,
    /// mDNS interfaces: `all`, `loopback` or an interface name.
    pub mdns_interface: String,
    /// How often a worker sends a heartbeat, milliseconds.
    pub heartbeat_interval_ms: u64,
    /// How long a command waits for its result, milliseconds.
    pub command_timeout_ms: u64,
    /// Take part in the mesh of nodes (default: primaries yes, workers no).
    pub mesh: bool,
    /// Where other mesh members reach this node (`IP:PORT`, at most 4);
    /// empty: the listen address (loopback if it is `0.0.0.0`).
    pub advertise_addrs: Vec<String>,
}

/// A phone's or a computer's state, as the app knows it. Every field is
/// optional.
#[derive(Debug, Clone, Default, uniffi::Record)]
pub struct Metrics {
    /// Battery charge, 0–100.
    pub battery_percent: Option<f64>,
    /// On external power.
    pub charging: Option<bool>,
    /// CPU load, 0–100.
    pub cpu_percent: Option<f64>,
    /// Memory in use, 0–100.
    pub memory_percent: Option<f64>,
    /// Free disk, GB.
    pub disk_free_gb: Option<f64>,
    /// Thermal state.
    pub thermal: Option<ThermalState>,
    /// The OS's low-power mode.
    pub low_power_mode: Option<bool>,
}

/// Thermal state, as iOS and Android report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum ThermalState {
    /// Normal.
    Nominal,
    /// Slightly elevated.
    Fair,
    /// High; the OS throttles.
    Serious,
    /// Critical.
    Critical,
}

impl From<Metrics> for HealthMetrics {
    fn from(m: Metrics) -> HealthMetrics {
        HealthMetrics {
            battery_percent: m.battery_percent,
            charging: m.charging,
            cpu_percent: m.cpu_percent,
            memory_percent: m.memory_percent,
            disk_free_gb: m.disk_free_gb,
            thermal: m.thermal.map(|t| match t {
                ThermalState::Nominal => Thermal::Nominal,
                ThermalState::Fair => Thermal::Fair,
                ThermalState::Serious => Thermal::Serious,
                ThermalState::Critical => Thermal::Critical,
            }),
            low_power_mode: m.low_power_mode,
            ..HealthMetrics::default()
        }
    }
}

/// A worker waiting for approval on the primary.
#[derive(Debug, Clone, uniffi::Record)]
pub struct PairingRequest {
    /// Its id.
    pub request_id: String,
    /// The worker's node id.
    pub node_id: String,
    /// The worker's hardware/app id.
    pub device_id: String,
    /// The worker's display name.
    pub name: String,
    /// The worker's platform.
    pub platform: DevicePlatform,
    /// When it expires, ms since the Unix epoch.
    pub expires_at_ms: u64,
    /// Wrong codes still allowed.
    pub attempts_left: u8,
}

impl From<PairingRequestRecord> for PairingRequest {
    fn from(r: PairingRequestRecord) -> Self {
        PairingRequest {
            request_id: r.request_id,
            node_id: r.device_node.to_string(),
            device_id: r.device_id,
            name: r.device_name,
            platform: r.platform.into(),
            expires_at_ms: r.expires_at.as_millis(),
            attempts_left: r.attempts_left,
        }
    }
}

/// A paired device and its health.
#[derive(Debug, Clone, uniffi::Record)]
pub struct Device {
    /// Its node id.
    pub node_id: String,
    /// Its hardware/app id.
    pub device_id: String,
    /// Display name.
    pub name: String,
    /// Platform.
    pub platform: DevicePlatform,
    /// A session is open now.
    pub online: bool,
    /// Revoked: refused from now on.
    pub revoked: bool,
    /// `healthy`, `degraded` or `offline`, once heartbeats came.
    pub health: Option<String>,
    /// Latest health score, 0–100.
    pub score: Option<u8>,
    /// Last heartbeat, ms since the Unix epoch.
    pub last_seen_ms: Option<u64>,
}

impl From<DeviceView> for Device {
    fn from(d: DeviceView) -> Self {
        let r = d.record;
        Device {
            node_id: r.node.to_string(),
            device_id: r.device_id,
            name: r.name,
            platform: r.platform.into(),
            online: d.online,
            revoked: r.revoked_at.is_some(),
            health: d.status,
            score: d.score,
            last_seen_ms: r.last_seen.map(|t| t.as_millis()),
        }
    }
}

/// Something that happened on the node.
#[derive(Debug, Clone, uniffi::Record)]
pub struct MeshEvent {
    /// Dotted kind, e.g. `pairing.request_received`, `device.online`.
    pub kind: String,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// Details as JSON (never secrets).
    pub data_json: String,
}

/// A node found by discovery.
#[derive(Debug, Clone, uniffi::Record)]
pub struct DiscoveredNode {
    /// Its node id.
    pub node_id: String,
    /// Its advertised name.
    pub name: String,
    /// Its advertised platform.
    pub platform: Option<String>,
    /// Where it listens (`IP:PORT`).
    pub addresses: Vec<String>,
    /// `NODE_ID@ADDRESS` to pass to `request_pairing`, if it has an address.
    pub connect: Option<String>,
    /// Already paired with this node.
    pub paired: bool,
}

impl From<DiscoveredNodeRecord> for DiscoveredNode {
    fn from(n: DiscoveredNodeRecord) -> Self {
        let best = n
            .addresses
            .iter()
            .find(|a| a.is_ipv4())
            .or(n.addresses.first());
        DiscoveredNode {
            connect: best.map(|a| format!("{}@{a}", n.node)),
            node_id: n.node.to_string(),
            name: n.name,
            platform: n.platform,
            addresses: n.addresses.iter().map(ToString::to_string).collect(),
            paired: n.is_paired,
        }
    }
}

/// What a device's policy decides for a command.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct PolicyDecision {
    /// `allow`, `deny`, `needs_approval` or `defer`.
    pub verdict: String,
    /// Reason code, unless allowed.
    pub code: Option<String>,
    /// Explanation, unless allowed.
    pub message: Option<String>,
    /// For `defer`: when to try again, milliseconds.
    pub delay_ms: Option<u64>,
}

impl From<Verdict> for PolicyDecision {
    fn from(v: Verdict) -> Self {
        let (verdict, code, message, delay_ms) = match v {
            Verdict::Allow => ("allow", None, None, None),
            Verdict::Deny { code, message } => ("deny", Some(code), Some(message), None),
            Verdict::NeedsApproval { code, message } => {
                ("needs_approval", Some(code), Some(message), None)
            }
            Verdict::Defer {
                delay_ms,
                code,
                message,
            } => ("defer", Some(code), Some(message), Some(delay_ms)),
        };
        PolicyDecision {
            verdict: verdict.into(),
            code,
            message,
            delay_ms,
        }
    }
}

/// A command waiting for (or past) a person's approval on the primary.
#[derive(Debug, Clone, uniffi::Record)]
pub struct Action {
    /// Its id.
    pub id: String,
    /// `proposed`, `approved`, `executing`, `executed`, `failed`, `rejected`.
    pub state: String,
    /// The command.
    pub command: String,
    /// Its arguments (JSON).
    pub args_json: String,
    /// The worker that asked.
    pub proposed_by: String,
    /// The result (JSON), once executed.
    pub result_json: Option<String>,
    /// The error, if failed or rejected.
    pub error: Option<String>,
}

impl From<ActionRecord> for Action {
    fn from(a: ActionRecord) -> Self {
        Action {
            id: a.id,
            state: a.state.to_string(),
            command: a.command,
            args_json: a.params.as_str().to_owned(),
            proposed_by: a.proposed_by.to_string(),
            result_json: a.result.map(|r| r.as_str().to_owned()),
            error: a.error,
        }
    }
}

/// A snapshot of the node.
#[derive(Debug, Clone, uniffi::Record)]
pub struct NodeStatus {
    /// Its node id.
    pub node_id: String,
    /// Its short fingerprint, for people to compare.
    pub fingerprint: String,
    /// Primary or worker.
    pub role: NodeRole,
    /// Running (started and not stopped).
    pub running: bool,
    /// A worker's session with its primary is open.
    pub connected: bool,
    /// The QUIC address it listens on, once started.
    pub listen_addr: Option<String>,
    /// Heartbeats sent (worker).
    pub heartbeats_sent: u64,
    /// Heartbeats processed (primary).
    pub heartbeats_received: u64,
}
