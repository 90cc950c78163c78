//! What a message carries: one [`Payload`] variant per kind in R-MESH2.
//!
//! Binary fields (file chunks, media frames, sealed boxes) travel as raw bytes,
//! never base64. JSON appears only where an application supplies free-form data
//! ([`JsonText`]), and is checked to be valid JSON when built and when decoded.

use std::fmt;
use std::net::SocketAddr;

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize};
use serde_bytes::ByteBuf;

use super::MessageId;
use crate::crypto::SealedBox;
use crate::identity::NodeId;

/// Text that is known to be one valid JSON value.
#[derive(Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct JsonText(String);

impl JsonText {
    /// Checks that `text` is one JSON value.
    pub fn new(text: impl Into<String>) -> Result<Self, serde_json::Error> {
        let text = text.into();
        serde_json::from_str::<serde::de::IgnoredAny>(&text)?;
        Ok(JsonText(text))
    }

    /// Serializes `value` to JSON text.
    pub fn from_value<T: Serialize + ?Sized>(value: &T) -> Result<Self, serde_json::Error> {
        serde_json::to_string(value).map(JsonText)
    }

    /// JSON `null`.
    pub fn null() -> Self {
        JsonText("null".into())
    }

    /// An empty JSON object, `{}`.
    pub fn empty_object() -> Self {
        JsonText("{}".into())
    }

    /// Parses the text into `T`.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(&self.0)
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for JsonText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for JsonText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        JsonText::new(text).map_err(|e| D::Error::custom(format_args!("invalid JSON text: {e}")))
    }
}

/// The platform a device runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Platform {
    /// A desktop or laptop computer.
    Desktop,
    /// An iPhone or iPad.
    Ios,
    /// An Android device.
    Android,
    /// A browser.
    Web,
}

/// Thermal state as phones report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Thermal {
    /// Normal.
    Nominal,
    /// Slightly elevated.
    Fair,
    /// High; the OS throttles.
    Serious,
    /// Critical; the OS may shut down.
    Critical,
}

/// Health metrics a device reports in a heartbeat (R-HEALTH1). Every field is
/// optional: a device reports what it knows.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct HealthMetrics {
    /// Round-trip latency to the primary, milliseconds.
    pub latency_ms: Option<f64>,
    /// Battery charge, 0–100.
    pub battery_percent: Option<f64>,
    /// On external power / charging.
    pub charging: Option<bool>,
    /// Memory in use, 0–100.
    pub memory_percent: Option<f64>,
    /// CPU load, 0–100.
    pub cpu_percent: Option<f64>,
    /// Free disk, GB.
    pub disk_free_gb: Option<f64>,
    /// How far behind sync is, milliseconds.
    pub sync_lag_ms: Option<f64>,
    /// Messages waiting to be sent.
    pub messages_pending: Option<u64>,
    /// Thermal state.
    pub thermal: Option<Thermal>,
    /// The OS's low-power mode is on.
    pub low_power_mode: Option<bool>,
}

/// A heartbeat: a sequence number for liveness plus metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Increases by one per heartbeat from the same node.
    pub seq: u64,
    /// The metrics.
    pub metrics: HealthMetrics,
}

/// A command sent to a node (`ping`, `config`, `run_action`, `chat.send`, …).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Correlates the [`CommandResult`].
    pub command_id: MessageId,
    /// The command name; policies match globs against it.
    pub name: String,
    /// Arguments.
    pub args: JsonText,
    /// How long the sender waits, milliseconds.
    pub timeout_ms: u32,
    /// What the sender declares the command costs (the policy's cost,
    /// token and job-size rules judge it); `None`: nothing declared (zero
    /// cost, no tokens, a small job).
    pub usage: Option<CommandUsage>,
}

/// What a command declares it will use, for the execution policy's
/// limits: cost against the hourly budget, tokens against the per-call
/// cap, and its size against the laptop-on-battery small-jobs-only rule.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct CommandUsage {
    /// Estimated cost (the policy's currency), finite and 0 or more.
    pub cost: Option<f64>,
    /// Tokens the call asks for.
    pub tokens: Option<u64>,
    /// How big the job is.
    pub job_size: Option<JobSize>,
}

impl CommandUsage {
    /// Checks the values a peer sent: a cost must be finite and not
    /// negative (a NaN would compare false against every limit).
    pub fn validate(&self) -> Result<(), String> {
        match self.cost {
            Some(c) if !c.is_finite() || c < 0.0 => {
                Err(format!("cost must be a finite number, 0 or more (got {c})"))
            }
            _ => Ok(()),
        }
    }
}

/// The size of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobSize {
    /// Small (the default).
    #[default]
    Small,
    /// Large: refused on a laptop low on battery.
    Large,
}

/// The outcome of a [`Command`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandResult {
    /// The command this answers.
    pub command_id: MessageId,
    /// Success value or error.
    pub outcome: CommandOutcome,
}

/// Success or failure of a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CommandOutcome {
    /// The handler's result.
    Ok(JsonText),
    /// Refused or failed, with a machine-readable code and a sentence.
    Err {
        /// Reason code, e.g. `blocked_command`.
        code: String,
        /// Human-readable explanation.
        message: String,
    },
}

/// An event forwarded to another node (e.g. to a dashboard).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventPayload {
    /// Dotted kind, e.g. `device.online`.
    pub kind: String,
    /// Event data.
    pub data: JsonText,
}

/// A node announcing itself (on join, rename or address change).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerAnnounce {
    /// The node.
    pub node: NodeId,
    /// Its human-readable name.
    pub name: String,
    /// Where it listens (at most 16). IPv6 scope ids and flow labels are not carried: an
    /// interface index means nothing on another host, so the receiver applies
    /// the scope of the interface it heard the peer on.
    #[serde(
        serialize_with = "super::bounded::serialize::<_, _, 16>",
        deserialize_with = "super::bounded::deserialize::<_, _, 16>"
    )]
    pub addresses: Vec<SocketAddr>,
}

/// Periodic peer exchange: the peers a node knows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerExchange {
    /// Known peers (at most 64 per message).
    #[serde(
        serialize_with = "super::bounded::serialize::<_, _, 64>",
        deserialize_with = "super::bounded::deserialize::<_, _, 64>"
    )]
    pub peers: Vec<PeerAnnounce>,
}

/// Messages of the pairing protocol (driven by the pairing state machine).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PairingMessage {
    /// Device → primary: asks to pair, with its first PAKE message.
    Request {
        /// Random id of this request.
        request_id: MessageId,
        /// Hardware/app id of the device.
        device_id: String,
        /// Display name.
        device_name: String,
        /// Platform.
        platform: Platform,
        /// PAKE message.
        pake: ByteBuf,
    },
    /// Primary → device, after the user entered the code: the primary's PAKE
    /// message and its key-confirmation MAC.
    Challenge {
        /// The request.
        request_id: MessageId,
        /// PAKE message.
        pake: ByteBuf,
        /// The primary's confirmation MAC over the transcript.
        mac: [u8; 32],
    },
    /// Device → primary: the keys matched; the device's confirmation MAC.
    Confirm {
        /// The request.
        request_id: MessageId,
        /// MAC over the transcript.
        mac: [u8; 32],
    },
    /// Device → primary: the keys did not match (a wrong code, or someone in
    /// the middle); a fresh PAKE message for the next attempt.
    Retry {
        /// The request.
        request_id: MessageId,
        /// PAKE message.
        pake: ByteBuf,
    },
    /// Primary → device: approved; the device token, sealed to the device.
    Approved {
        /// The request.
        request_id: MessageId,
        /// Token and primary id, sealed.
        sealed: SealedBox,
    },
    /// Primary → device: rejected.
    Rejected {
        /// The request.
        request_id: MessageId,
        /// Why, if the user said.
        reason: Option<String>,
    },
}

/// Acknowledgement of received messages (R-MESH5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    /// The acknowledged message ids (at most 1024 per message).
    #[serde(
        serialize_with = "super::bounded::serialize::<_, _, 1024>",
        deserialize_with = "super::bounded::deserialize::<_, _, 1024>"
    )]
    pub ids: Vec<MessageId>,
}

/// A row change for database sync.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DbSync {
    /// Table name.
    pub table: String,
    /// What happened to the row.
    pub op: DbOp,
    /// Primary key of the row.
    pub key: String,
    /// The row (null for deletes).
    pub row: JsonText,
}

/// Row operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DbOp {
    /// New row.
    Insert,
    /// Changed row.
    Update,
    /// Removed row.
    Delete,
}

/// One chunk of a file transfer (R-XFER1).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct FileChunk {
    /// Identifies the transfer.
    pub transfer_id: MessageId,
    /// Chunk number, from 0.
    pub index: u64,
    /// Byte offset of this chunk in the file.
    pub offset: u64,
    /// Size of the whole file.
    pub total_size: u64,
    /// SHA-256 of `data`.
    pub chunk_hash: [u8; 32],
    /// The bytes.
    pub data: ByteBuf,
}

impl fmt::Debug for FileChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileChunk")
            .field("transfer_id", &self.transfer_id)
            .field("index", &self.index)
            .field("offset", &self.offset)
            .field("total_size", &self.total_size)
            .field("len", &self.data.len())
            .finish()
    }
}

/// Media kind of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MediaType {
    /// Audio.
    Audio,
    /// Video.
    Video,
    /// Other timed data.
    Data,
}

/// One frame of a media stream (R-XFER2). The SDK carries it; apps encode/decode.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct MediaFrame {
    /// Stream id.
    pub stream_id: u64,
    /// Media type.
    pub media_type: MediaType,
    /// Codec label, e.g. `opus`.
    pub codec: String,
    /// Sequence number within the stream.
    pub sequence: u64,
    /// Presentation time, microseconds.
    pub timestamp_us: u64,
    /// Encoded frame.
    pub data: ByteBuf,
}

impl fmt::Debug for MediaFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MediaFrame")
            .field("stream_id", &self.stream_id)
            .field("media_type", &self.media_type)
            .field("codec", &self.codec)
            .field("sequence", &self.sequence)
            .field("len", &self.data.len())
            .finish()
    }
}

/// A configuration change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigUpdate {
    /// Key.
    pub key: String,
    /// New value.
    pub value: JsonText,
    /// Version; higher wins.
    pub version: u64,
}

/// Application-defined JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustomJson {
    /// Application message type.
    pub app_type: String,
    /// Data.
    pub data: JsonText,
}

/// Everything a mesh message can carry.
///
/// New kinds are added at the end (the binary format numbers variants in order),
/// so older peers fail to decode new kinds with a clear error rather than
/// misreading them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Payload {
    /// Liveness and metrics.
    Heartbeat(Heartbeat),
    /// A command.
    Command(Command),
    /// A command's outcome.
    CommandResult(CommandResult),
    /// A forwarded event.
    Event(EventPayload),
    /// A node announcing itself.
    PeerAnnounce(PeerAnnounce),
    /// Peer list exchange.
    PeerExchange(PeerExchange),
    /// Pairing protocol.
    Pairing(PairingMessage),
    /// Delivery acknowledgement.
    Ack(Ack),
    /// Database row sync.
    DbSync(DbSync),
    /// File chunk.
    FileChunk(FileChunk),
    /// Media frame.
    MediaFrame(MediaFrame),
    /// Configuration update.
    ConfigUpdate(ConfigUpdate),
    /// Application JSON.
    Custom(CustomJson),
    /// Another payload sealed to the envelope's recipient; relays cannot read it.
    Sealed(SealedBox),
    /// Opening and closing a paired session between a device and its primary.
    Session(SessionMessage),
    /// Replicated state between a device and its primary: one encoded
    /// [`SyncFrame`](crate::sync::SyncFrame), decoded (with its limits)
    /// by the receiver's sync runtime.
    ReplicaSync(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Ledger replication between a device and its primary: the primary's
    /// request for the device's ledger, or the device's answer (opaque to
    /// the runtime; see [`LedgerSync`](crate::ledger::LedgerSync)).
    LedgerSync(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// The first and last words of a paired session (over an already
/// authenticated connection).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub enum SessionMessage {
    /// Device → primary: opens the session with the device's token.
    Hello {
        /// The device token from pairing (checked, never stored, by the primary).
        token: [u8; 32],
    },
    /// Primary → device: the session is open.
    Welcome,
    /// Primary → device: the device's token was rotated; this is the new one
    /// (the session then ends and the device reconnects with it).
    TokenRotated {
        /// The new device token.
        token: [u8; 32],
    },
    /// Either side: the session ends (unpaired, revoked, token rotated,
    /// shutting down), with a machine-readable reason.
    Bye {
        /// Reason code, e.g. `revoked`, `unpaired`, `token_rotated`, `shutdown`.
        reason: String,
    },
    /// Device → primary: the rotated token is stored durably; the primary
    /// may now make it the only one. `digest` names which token
    /// ([`SessionMessage::stored_digest`]), so an acknowledgement of an
    /// earlier rotation that timed out can never confirm a later one.
    TokenStored {
        /// [`SessionMessage::stored_digest`] of the token stored.
        digest: [u8; 32],
    },
}

impl SessionMessage {
    /// What a device's `TokenStored` carries for `token`: a SHA-256 under a
    /// tag of its own (not the registry's stored hash, and not the token).
    pub fn stored_digest(token: &[u8; 32]) -> [u8; 32] {
        crate::crypto::tagged_sha256(b"mesh-sdk/token-stored/v1", token)
    }
}

impl std::fmt::Debug for SessionMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        match self {
            SessionMessage::Hello { .. } => f.write_str("Hello { token: <redacted> }"),
            SessionMessage::Welcome => f.write_str("Welcome"),
            SessionMessage::TokenRotated { .. } => {
                f.write_str("TokenRotated { token: <redacted> }")
            }
            SessionMessage::Bye { reason } => write!(f, "Bye {{ reason: {reason:?} }}"),
            SessionMessage::TokenStored { .. } => f.write_str("TokenStored { digest: .. }"),
        }
    }
}

impl Payload {
    /// A short name of the kind, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Payload::Heartbeat(_) => "heartbeat",
            Payload::Command(_) => "command",
            Payload::CommandResult(_) => "command_result",
            Payload::Event(_) => "event",
            Payload::PeerAnnounce(_) => "peer_announce",
            Payload::PeerExchange(_) => "peer_exchange",
            Payload::Pairing(_) => "pairing",
            Payload::Ack(_) => "ack",
            Payload::DbSync(_) => "db_sync",
            Payload::FileChunk(_) => "file_chunk",
            Payload::MediaFrame(_) => "media_frame",
            Payload::ConfigUpdate(_) => "config_update",
            Payload::Custom(_) => "custom",
            Payload::Sealed(_) => "sealed",
            Payload::Session(_) => "session",
            Payload::ReplicaSync(_) => "replica_sync",
            Payload::LedgerSync(_) => "ledger_sync",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_text_is_validated_both_ways() {
        assert!(JsonText::new("{\"a\": 1}").is_ok());
        assert!(JsonText::new("{nope").is_err());
        assert!(JsonText::new("1 2").is_err());
        let bad = postcard::to_allocvec(&"{nope").unwrap();
        assert!(postcard::from_bytes::<JsonText>(&bad).is_err());
        let v: serde_json::Value = JsonText::from_value(&vec![1, 2]).unwrap().parse().unwrap();
        assert_eq!(v, serde_json::json!([1, 2]));
    }

    #[test]
    fn metrics_use_the_documented_json_names() {
        let m = HealthMetrics {
            battery_percent: Some(30.0),
            thermal: Some(Thermal::Serious),
            ..Default::default()
        };
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["battery_percent"], 30.0);
        assert_eq!(v["thermal"], "serious");
        let parsed: HealthMetrics = serde_json::from_str(r#"{"latency_ms": 2000}"#).unwrap();
        assert_eq!(parsed.latency_ms, Some(2000.0));
    }
}
