//! The records the node keeps, one type per [`Table`].

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{Record, Table};
use crate::clock::Timestamp;
use crate::identity::NodeId;
use crate::registry::Scope;
use crate::wire::{JsonText, Platform};

/// Socket addresses as text: serde's binary form of `SocketAddrV6` drops the
/// scope id that a link-local address needs.
mod socket_addrs {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub(crate) fn serialize<S: Serializer>(v: &[SocketAddr], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(ToString::to_string))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<SocketAddr>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|a| a.parse().map_err(D::Error::custom))
            .collect()
    }
}

/// Byte fields: hex in JSON documents, raw bytes in the binary encoding.
pub(crate) mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub(crate) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&data_encoding::HEXLOWER.encode(v))
        } else {
            s.serialize_bytes(v)
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        if d.is_human_readable() {
            let text = String::deserialize(d)?;
            data_encoding::HEXLOWER_PERMISSIVE
                .decode(text.as_bytes())
                .map_err(D::Error::custom)
        } else {
            serde_bytes::ByteBuf::deserialize(d).map(serde_bytes::ByteBuf::into_vec)
        }
    }
}

/// A 32-byte value: hex in JSON, 32 raw bytes in the binary encoding.
pub(crate) mod hex_array {
    use serde::{Deserializer, Serializer, de::Error};

    pub(crate) fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        super::hex_bytes::serialize(v, s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let bytes = super::hex_bytes::deserialize(d)?;
        bytes.try_into().map_err(|b: Vec<u8>| {
            D::Error::custom(format_args!("expected 32 bytes, found {}", b.len()))
        })
    }
}

/// Lifecycle of a paired device (R-PAIR5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceStatus {
    /// Pairing in progress.
    Pairing,
    /// Paired, not yet trusted.
    Paired,
    /// Earned trust through successful use (R-PAIR8).
    Trusted,
    /// Missed heartbeats.
    Offline,
    /// In an error state.
    Error,
}

/// A paired device (R-PAIR5). Keyed by its node id, which is also its public key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Node id = ed25519 public key.
    pub node: NodeId,
    /// Hardware/app id, unique among devices.
    pub device_id: String,
    /// Display name.
    pub name: String,
    /// Platform.
    pub platform: Platform,
    /// OS version, if reported.
    pub os_version: Option<String>,
    /// App version, if reported.
    pub app_version: Option<String>,
    /// Last known address.
    pub address: Option<String>,
    /// Whether this record is the primary itself.
    pub is_primary: bool,
    /// Status.
    pub status: DeviceStatus,
    /// Declared capabilities.
    pub capabilities: Vec<String>,
    /// Trust 0.0–1.0 (R-PAIR8).
    pub trust_level: f64,
    /// SHA-256 of the device token; the token itself is never stored.
    #[serde(with = "hex_array")]
    pub token_hash: [u8; 32],
    /// Granted scopes (R-PAIR7).
    pub scopes: Vec<Scope>,
    /// Successful uses, for trust progression.
    pub successes: u64,
    /// When trust last rose (it rises at most once per
    /// `TrustConfig::min_interval`, so a burst of cheap successes cannot
    /// farm it).
    #[serde(default)]
    pub trust_raised_at: Option<Timestamp>,
    /// When the record was created.
    pub created_at: Timestamp,
    /// When pairing completed.
    pub paired_at: Option<Timestamp>,
    /// Last contact.
    pub last_seen: Option<Timestamp>,
    /// Last command from or to the device.
    pub last_command: Option<Timestamp>,
    /// When revoked; a revoked device is refused everywhere (R-PAIR6).
    pub revoked_at: Option<Timestamp>,
    /// App-defined metadata (a JSON object).
    pub metadata: JsonText,
}

impl DeviceRecord {
    /// Whether the device holds `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s.as_str() == scope)
    }
}

impl Record for DeviceRecord {
    const TABLE: Table = Table::Devices;
    fn key(&self) -> String {
        self.node.to_string()
    }
}

/// Index entry: which node holds a hardware/app device id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceIdRecord {
    /// The hardware/app id; the key.
    pub device_id: String,
    /// The node paired under it.
    pub node: NodeId,
}

impl Record for DeviceIdRecord {
    const TABLE: Table = Table::DeviceIds;
    fn key(&self) -> String {
        self.device_id.clone()
    }
}

/// Status of a pairing request (R-PAIR1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairingStatus {
    /// Waiting for the user.
    Pending,
    /// The user approved; the exchange is finishing.
    Approved,
    /// The user rejected it.
    Rejected,
    /// Timed out, or voided after too many wrong codes.
    Expired,
    /// Done: the device holds its token.
    Completed,
}

/// A pairing request as the primary keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairingRequestRecord {
    /// Random request id (hex).
    pub request_id: String,
    /// The requesting node.
    pub device_node: NodeId,
    /// Hardware/app id.
    pub device_id: String,
    /// Display name.
    pub device_name: String,
    /// Platform.
    pub platform: Platform,
    /// Status.
    pub status: PairingStatus,
    /// Created.
    pub created_at: Timestamp,
    /// Expires.
    pub expires_at: Timestamp,
    /// Wrong codes left before the request is void.
    pub attempts_left: u8,
    /// Why it was rejected.
    pub reject_reason: Option<String>,
    /// The device's current public PAKE message (not secret), so the user can
    /// approve even after the primary restarted.
    #[serde(with = "hex_bytes")]
    pub device_pake: Vec<u8>,
}

impl Record for PairingRequestRecord {
    const TABLE: Table = Table::PairingRequests;
    fn key(&self) -> String {
        self.request_id.clone()
    }
}

/// A node seen by discovery (R-DISC1).
///
/// What a node advertises is a hint, not a proof: connecting to it over QUIC
/// pins [`node`](Self::node), so a forged advertisement leads only to a
/// refused connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiscoveredNodeRecord {
    /// The node.
    pub node: NodeId,
    /// Advertised name.
    pub name: String,
    /// Advertised platform.
    pub platform: Option<String>,
    /// Advertised version.
    pub version: Option<String>,
    /// Where it can be reached (address and port), from the latest
    /// appearance; repeated reports of one appearance are merged.
    /// (Stored as text, so an IPv6 link-local address keeps its scope.)
    #[serde(with = "socket_addrs")]
    pub addresses: Vec<SocketAddr>,
    /// First seen.
    pub first_discovered: Timestamp,
    /// Last seen.
    pub last_discovered: Timestamp,
    /// Appearances: the first sighting, and each one after the node was lost
    /// or came back on another port.
    pub discovery_count: u64,
    /// Whether it is a paired (and not revoked) device.
    pub is_paired: bool,
    /// The paired device's hardware/app id, when paired.
    pub paired_device: Option<String>,
}

impl Record for DiscoveredNodeRecord {
    const TABLE: Table = Table::DiscoveredNodes;
    fn key(&self) -> String {
        self.node.to_string()
    }
}

/// Latest health of a device (R-HEALTH).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthRecord {
    /// The device.
    pub node: NodeId,
    /// Last heartbeat.
    pub last_heartbeat: Timestamp,
    /// Score 0–100.
    pub score: u8,
    /// `healthy`, `degraded`, `offline` or `error`.
    pub status: String,
    /// Errors counted.
    pub error_count: u64,
    /// Last error.
    pub last_error: Option<String>,
    /// When the last error happened.
    pub last_error_at: Option<Timestamp>,
}

impl Record for HealthRecord {
    const TABLE: Table = Table::DeviceHealth;
    fn key(&self) -> String {
        self.node.to_string()
    }
}

/// One health sample of a device (the dashboard's chart of the last hour).
/// Kept in a ring of [`HealthSample::SLOTS`] slots of
/// [`HealthSample::SLOT_MS`] per device, so the table cannot grow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthSample {
    /// The device.
    pub node: NodeId,
    /// When it was taken.
    pub at: Timestamp,
    /// Health score 0–100.
    pub score: u8,
    /// Latency the device reported, ms.
    pub latency_ms: Option<f64>,
    /// Battery %, if reported.
    pub battery_percent: Option<f64>,
    /// Memory in use %, if reported.
    pub memory_percent: Option<f64>,
}

impl HealthSample {
    /// Length of a slot: one sample per device per slot.
    pub const SLOT_MS: u64 = 15_000;
    /// Slots per device (two hours).
    pub const SLOTS: u64 = 480;

    /// The slot `at` falls in.
    pub fn slot(at: Timestamp) -> u64 {
        (at.as_millis() / Self::SLOT_MS) % Self::SLOTS
    }
}

impl Record for HealthSample {
    const TABLE: Table = Table::HealthSamples;
    fn key(&self) -> String {
        format!("{}:{:03}", self.node, Self::slot(self.at))
    }
}

/// A device's execution policy, kept as its JSON document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecPolicyRecord {
    /// The device.
    pub node: NodeId,
    /// The policy document (mesh-policy's `PolicyDocument` JSON).
    pub document: JsonText,
    /// Last change.
    pub updated_at: Timestamp,
}

impl Record for ExecPolicyRecord {
    const TABLE: Table = Table::DeviceExecPolicies;
    fn key(&self) -> String {
        self.node.to_string()
    }
}

/// Capabilities a node declares (`filesystem:read`, …).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapabilitiesRecord {
    /// The node.
    pub node: NodeId,
    /// Capabilities.
    pub capabilities: Vec<String>,
    /// Last change.
    pub updated_at: Timestamp,
}

impl Record for CapabilitiesRecord {
    const TABLE: Table = Table::NodeCapabilities;
    fn key(&self) -> String {
        self.node.to_string()
    }
}

/// A member's status as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerStatus {
    /// Answering probes.
    Active,
    /// A probe failed; not yet declared down (it may still refute).
    Suspect,
    /// Declared down, left, or blocked.
    Inactive,
}

impl PeerStatus {
    /// `active`, `suspect` or `inactive` (the CLI's and the events' word).
    pub fn as_str(self) -> &'static str {
        match self {
            PeerStatus::Active => "active",
            PeerStatus::Suspect => "suspect",
            PeerStatus::Inactive => "inactive",
        }
    }
}

/// A mesh member (R-MESH1), as this node last knew it. Inactive members
/// are removed after the mesh's horizon (24 h by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerRecord {
    /// The member.
    pub node: NodeId,
    /// Its name.
    pub name: String,
    /// Its addresses.
    pub addresses: Vec<crate::transport::PeerAddr>,
    /// Its status.
    pub status: PeerStatus,
    /// When this node first learned of it.
    pub joined_at: Timestamp,
    /// When this node last heard from or of it.
    pub last_seen: Timestamp,
    /// Its SWIM incarnation, as last seen.
    pub incarnation: u16,
    /// Its signed identity (name, addresses and epoch), which a restarted
    /// node rejoins with.
    pub identity: crate::mesh::member::MemberId,
}

impl PeerRecord {
    /// An active member first seen at `now`.
    pub fn new(identity: crate::mesh::member::MemberId, now: Timestamp) -> Self {
        PeerRecord {
            node: identity.node(),
            name: identity.name().to_owned(),
            addresses: identity.addrs().to_vec(),
            status: PeerStatus::Active,
            joined_at: now,
            last_seen: now,
            incarnation: 0,
            identity,
        }
    }
}

impl Record for PeerRecord {
    const TABLE: Table = Table::Peers;
    fn key(&self) -> String {
        self.node.to_string()
    }
}

/// A node blocked from the mesh: who blocked it, when and why. Every
/// member keeps the list it learned; the ledger keeps the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRecord {
    /// The blocked node; the key.
    pub node: NodeId,
    /// The member that blocked it.
    pub by: NodeId,
    /// Why, as the blocker said (at most 256 bytes).
    pub reason: String,
    /// When the blocker blocked it.
    pub at: Timestamp,
}

impl Record for BlockRecord {
    const TABLE: Table = Table::Blocklist;
    fn key(&self) -> String {
        self.node.to_string()
    }
}

/// This node's own standing in the mesh: its identity's epoch and name,
/// and the certificate it was let in with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshSelfRecord {
    /// The epoch of its current identity.
    pub epoch: u64,
    /// Its name in the mesh.
    pub name: String,
    /// Its certificate of membership.
    pub cert: crate::mesh::member::MemberCert,
}

impl MeshSelfRecord {
    /// The key in [`Table::NodeState`].
    pub const KEY: &'static str = "mesh.self";
}

impl Record for MeshSelfRecord {
    const TABLE: Table = Table::NodeState;
    fn key(&self) -> String {
        Self::KEY.to_owned()
    }
}

/// A join token its issuer handed out (R-MESH1), keyed by the token's id
/// (`mesh::token`): the secret's digest, never the secret, and what became
/// of it. Single-use: `used_by` is set by the one redemption.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    /// The token's id (16 hex characters of the secret's digest); the key.
    pub id: String,
    /// SHA-256 of the secret under its own tag (`JoinSecret::digest`).
    #[serde(with = "hex_array")]
    pub secret_hash: [u8; 32],
    /// Issuer (this node).
    pub issuer: NodeId,
    /// Created.
    pub created_at: Timestamp,
    /// Expires.
    pub expires_at: Timestamp,
    /// The node that joined with it.
    pub used_by: Option<NodeId>,
    /// When it was used.
    pub used_at: Option<Timestamp>,
    /// When its issuer revoked it.
    pub revoked_at: Option<Timestamp>,
}

impl Record for JoinTokenRecord {
    const TABLE: Table = Table::JoinTokens;
    fn key(&self) -> String {
        self.id.clone()
    }
}

/// Where an action is in its lifecycle (R-ACT2). Stored and sent as its
/// text (`"proposed"`, …), so records and JSON read the same as before the
/// type existed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActionState {
    /// Waiting for a person.
    Proposed,
    /// Approved; about to run.
    Approved,
    /// Running.
    Executing,
    /// Ran; `result` holds the outcome.
    Executed,
    /// Ran and failed; `error` says why.
    Failed,
    /// Refused by a person.
    Rejected,
    /// Void: its device was revoked or unpaired before anyone decided.
    Voided,
}

impl ActionState {
    /// Every state.
    pub const ALL: [ActionState; 7] = [
        ActionState::Proposed,
        ActionState::Approved,
        ActionState::Executing,
        ActionState::Executed,
        ActionState::Failed,
        ActionState::Rejected,
        ActionState::Voided,
    ];

    /// The state's text.
    pub fn as_str(self) -> &'static str {
        self.as_str_const()
    }

    /// [`ActionState::as_str`], usable in constants.
    pub const fn as_str_const(self) -> &'static str {
        match self {
            ActionState::Proposed => "proposed",
            ActionState::Approved => "approved",
            ActionState::Executing => "executing",
            ActionState::Executed => "executed",
            ActionState::Failed => "failed",
            ActionState::Rejected => "rejected",
            ActionState::Voided => "voided",
        }
    }

    /// The state named `text`.
    pub fn parse(text: &str) -> Option<ActionState> {
        ActionState::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Whether the lifecycle allows going from `self` to `next`:
    /// proposed → approved | rejected | voided; approved → executing;
    /// executing → executed | failed. The last four are final.
    pub fn can_become(self, next: ActionState) -> bool {
        use ActionState::*;
        matches!(
            (self, next),
            (Proposed, Approved | Rejected | Voided)
                | (Approved, Executing)
                | (Executing, Executed | Failed)
        )
    }

    /// Whether nothing follows this state.
    pub fn is_final(self) -> bool {
        ActionState::ALL.iter().all(|n| !self.can_become(*n))
    }
}

impl std::fmt::Display for ActionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for ActionState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Serialize for ActionState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ActionState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        ActionState::parse(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown action state {text:?}")))
    }
}

/// An action and its lifecycle (R-ACT2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionRecord {
    /// Action id.
    pub id: String,
    /// Where it is in its lifecycle.
    pub state: ActionState,
    /// Command name.
    pub command: String,
    /// Parameters.
    pub params: JsonText,
    /// Who proposed it.
    pub proposed_by: NodeId,
    /// Who approved or rejected it.
    pub decided_by: Option<String>,
    /// Created.
    pub created_at: Timestamp,
    /// Last change.
    pub updated_at: Timestamp,
    /// Result.
    pub result: Option<JsonText>,
    /// Error.
    pub error: Option<String>,
}

impl Record for ActionRecord {
    const TABLE: Table = Table::Actions;
    fn key(&self) -> String {
        self.id.clone()
    }
}

/// A worker's link to its primary: who, where, and the token it presents.
/// Kept in [`Table::NodeState`] under the key `"primary"`. The token is the
/// worker's own credential (the primary stores only its hash); the SQLite
/// file is created with mode 0600.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryLinkRecord {
    /// The primary.
    pub primary: NodeId,
    /// Where it was last reached.
    pub address: crate::transport::PeerAddr,
    /// The device token.
    pub token: [u8; 32],
    /// When pairing completed.
    pub paired_at: Timestamp,
}

impl std::fmt::Debug for PrimaryLinkRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrimaryLinkRecord")
            .field("primary", &self.primary)
            .field("address", &self.address)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl Record for PrimaryLinkRecord {
    const TABLE: Table = Table::NodeState;
    fn key(&self) -> String {
        "primary".to_owned()
    }
}

/// The token a worker presented before a rotation it acknowledged: kept
/// until a session opens with the new one, so a primary that stopped
/// between the acknowledgement and its commit still admits the device.
/// In [`Table::NodeState`] under `"primary.previous_token"`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenFallbackRecord {
    /// The previous token.
    pub token: [u8; 32],
    /// When the new one was stored.
    pub stored_at: Timestamp,
}

impl TokenFallbackRecord {
    /// Its key.
    pub const KEY: &'static str = "primary.previous_token";
}

impl std::fmt::Debug for TokenFallbackRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenFallbackRecord")
            .field("token", &"<redacted>")
            .field("stored_at", &self.stored_at)
            .finish()
    }
}

impl Record for TokenFallbackRecord {
    const TABLE: Table = Table::NodeState;
    fn key(&self) -> String {
        Self::KEY.to_owned()
    }
}
