//! The device registry: paired devices, their tokens, scopes, trust, and the
//! one function every entry point calls to let a device in.
//!
//! * A device token is 32 bytes from the OS CSPRNG, handed out once (at
//!   pairing or rotation) and stored only as its SHA-256; presented tokens are
//!   compared in constant time. [`DeviceToken`] zeroizes itself and never
//!   prints its value in `Debug`.
//! * [`Registry::check`] is the gate for every entry point (commands, events,
//!   heartbeats, session messages): unknown device, revoked, wrong token or missing scope are
//!   each a typed [`AuthError`]. Nothing is cached, so unpairing, rotation and
//!   revocation take effect on the very next check.
//! * Trust (R-PAIR8): each successful use raises `trust_level` by a step; a
//!   paired device becomes `trusted` at the configured level.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::json;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::clock::Timestamp;
use crate::events::{EventBus, kinds};
use crate::identity::NodeId;
use crate::ledger::{Entry, Ledger, LedgerError, record_types};
use crate::storage::records::{DeviceIdRecord, DeviceRecord, DeviceStatus};
use crate::storage::{Record, Storage, StorageError, StorageExt, Write};

/// Scopes a device can hold (R-PAIR7). Scopes are plain strings; these are the
/// ones the SDK itself checks.
pub mod scopes {
    /// Send events.
    pub const EVENTS_WRITE: &str = "events:write";
    /// Read memories.
    pub const MEMORIES_READ: &str = "memories:read";
    /// Read actions.
    pub const ACTIONS_READ: &str = "actions:read";
    /// Report presence and heartbeats.
    pub const PRESENCE_WRITE: &str = "presence:write";
    /// Run commands on the primary.
    pub const COMMANDS_RUN: &str = "commands:run";
    /// Sync every replicated namespace with the primary (one namespace:
    /// `sync:NAMESPACE`).
    pub const SYNC_ALL: &str = "sync:*";
    /// Exchange files with the primary (sending to it, and being sent
    /// files by it).
    pub const FILES_WRITE: &str = "files:write";
    /// Exchange media streams with the primary.
    pub const MEDIA_WRITE: &str = "media:write";
    /// List the devices and read their health (the gateway's
    /// `devices.list`, `devices.get_health`).
    pub const DEVICES_READ: &str = "devices:read";
    /// Subscribe to the primary's events (the gateway's `events.subscribe`).
    pub const EVENTS_READ: &str = "events:read";
    /// What a newly paired device gets.
    pub const DEFAULT: &[&str] = &[EVENTS_WRITE, PRESENCE_WRITE, ACTIONS_READ, COMMANDS_RUN];
    /// What a newly paired web remote gets: report its own health, follow
    /// and publish events, see devices and actions. Deciding anything
    /// (pairing, policies, actions, revocation) takes the admin token.
    pub const WEB_DEFAULT: &[&str] = &[
        PRESENCE_WRITE,
        EVENTS_READ,
        EVENTS_WRITE,
        ACTIONS_READ,
        DEVICES_READ,
    ];
}

/// A scope a device holds. The SDK's own scopes ([`scopes`]) are kept as
/// static strings, so loading a device record does not allocate for them.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope(std::borrow::Cow<'static, str>);

impl Scope {
    /// A scope from a static string.
    pub const fn from_static(s: &'static str) -> Self {
        Scope(std::borrow::Cow::Borrowed(s))
    }

    /// A scope from any string; the SDK's own scopes are interned.
    pub fn new(s: &str) -> Self {
        const KNOWN: [&str; 5] = [
            scopes::EVENTS_WRITE,
            scopes::MEMORIES_READ,
            scopes::ACTIONS_READ,
            scopes::PRESENCE_WRITE,
            scopes::COMMANDS_RUN,
        ];
        match KNOWN.iter().find(|k| **k == s) {
            Some(k) => Scope::from_static(k),
            None => Scope(std::borrow::Cow::Owned(s.to_owned())),
        }
    }

    /// The scope's text, e.g. `commands:run`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for Scope {
    fn from(s: &str) -> Self {
        Scope::new(s)
    }
}

impl serde::Serialize for Scope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Scope {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Scope;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a scope string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Scope, E> {
                Ok(Scope::new(v))
            }
        }
        d.deserialize_str(V)
    }
}

/// Length of a device token in bytes.
pub const TOKEN_LEN: usize = 32;

/// A device's bearer token. Shown once; zeroized on drop; `Debug` is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceToken(Zeroizing<[u8; TOKEN_LEN]>);

impl DeviceToken {
    /// A fresh token from the OS CSPRNG.
    pub fn generate() -> Self {
        let mut t = Zeroizing::new([0u8; TOKEN_LEN]);
        rand::fill(&mut t[..]);
        DeviceToken(t)
    }

    /// Wraps raw token bytes (as received in a pairing grant).
    pub fn from_bytes(bytes: [u8; TOKEN_LEN]) -> Self {
        DeviceToken(Zeroizing::new(bytes))
    }

    /// The raw bytes, for presenting the token.
    pub fn as_bytes(&self) -> &[u8; TOKEN_LEN] {
        &self.0
    }

    /// The text form apps store (lowercase hex). Zeroized on drop.
    pub fn to_text(&self) -> Zeroizing<String> {
        Zeroizing::new(data_encoding::HEXLOWER.encode(&self.0[..]))
    }

    /// Parses [`DeviceToken::to_text`] output.
    pub fn from_text(text: &str) -> Option<Self> {
        let bytes = Zeroizing::new(
            data_encoding::HEXLOWER_PERMISSIVE
                .decode(text.trim().as_bytes())
                .ok()?,
        );
        let arr: [u8; TOKEN_LEN] = bytes.as_slice().try_into().ok()?;
        Some(DeviceToken::from_bytes(arr))
    }

    /// SHA-256 of the token: what the registry stores. A token has 256 bits of
    /// entropy, so a fast hash is enough (no password-hashing needed).
    pub fn hash(&self) -> [u8; 32] {
        hash_token(&self.0[..])
    }
}

fn hash_token(token: &[u8]) -> [u8; 32] {
    crate::crypto::tagged_sha256(b"mesh-sdk/device-token/v1", token)
}

impl fmt::Debug for DeviceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceToken(<redacted>)")
    }
}

/// Why a device was refused. The same error for every entry point.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// Not a paired device (never paired, or unpaired).
    #[error("device {0} is not paired; pair it first")]
    UnknownDevice(NodeId),
    /// Revoked: refused everywhere until paired again.
    #[error("device {node} was revoked at {at}; it must be paired again")]
    Revoked {
        /// The device.
        node: NodeId,
        /// When.
        at: Timestamp,
    },
    /// The token is wrong (or was rotated away).
    #[error("device {0} presented an invalid token (rotated or wrong); use the current token")]
    BadToken(NodeId),
    /// The device lacks the scope this entry point needs.
    #[error("device {node} lacks scope {scope:?}")]
    ScopeMissing {
        /// The device.
        node: NodeId,
        /// The scope needed.
        scope: String,
    },
    /// Not a token at all (the gateway's `NODE_ID.TOKEN` form expected).
    #[error("malformed token: expected NODE_ID.TOKEN as given at pairing")]
    MalformedToken,
    /// Storage failed while checking.
    #[error("registry storage: {0}")]
    Storage(String),
}

impl From<StorageError> for AuthError {
    fn from(e: StorageError) -> Self {
        AuthError::Storage(e.to_string())
    }
}

/// Errors of registry changes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// No such device.
    #[error("device {0} is not paired")]
    UnknownDevice(NodeId),
    /// The node or hardware id is already paired.
    #[error("{what} is already paired; unpair it first")]
    AlreadyPaired {
        /// Which id collided.
        what: String,
    },
    /// Storage failed; nothing was changed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The audit ledger refused the record; nothing was changed.
    #[error("audit ledger: {0}")]
    Ledger(String),
}

impl From<LedgerError> for RegistryError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::Storage(e) => RegistryError::Storage(e),
            other => RegistryError::Ledger(other.to_string()),
        }
    }
}

/// A change to record in the ledger: its type and time.
struct Audit(&'static str, Timestamp);

/// Trust progression settings (R-PAIR8).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct TrustConfig {
    /// Trust of a newly paired device. Default 0.3.
    pub initial: f64,
    /// Added per successful use. Default 0.05.
    pub step: f64,
    /// From this level a paired device is `trusted`. Default 0.7.
    pub trusted_from: f64,
    /// Trust rises at most once per this long, however many commands
    /// succeed in it (each is still counted in `successes`): trust is
    /// earned over time in use, not farmed with a burst of cheap commands.
    /// Default 10 minutes (so the defaults make a device trusted after
    /// eight successes spread over at least 70 minutes).
    pub min_interval: std::time::Duration,
}

impl Default for TrustConfig {
    fn default() -> Self {
        TrustConfig {
            initial: 0.3,
            step: 0.05,
            trusted_from: 0.7,
            min_interval: std::time::Duration::from_secs(600),
        }
    }
}

impl TrustConfig {
    /// Sets the trust added per successful command (clamped to 0–1; a
    /// value that is not a number adds nothing).
    pub fn step(mut self, step: f64) -> Self {
        self.step = if step.is_nan() {
            0.0
        } else {
            step.clamp(0.0, 1.0)
        };
        self
    }

    /// Sets the shortest time between two rises of a device's trust.
    pub fn min_interval(mut self, interval: std::time::Duration) -> Self {
        self.min_interval = interval;
        self
    }

    /// Sets the level from which a paired device is trusted (clamped to
    /// 0–1; not a number: never).
    pub fn trusted_from(mut self, level: f64) -> Self {
        self.trusted_from = if level.is_nan() {
            f64::INFINITY
        } else {
            level.clamp(0.0, 1.0)
        };
        self
    }
}

/// What a new device record is made from (the pairing request's facts).
#[derive(Debug, Clone, PartialEq)]
pub struct NewDevice {
    /// Node id.
    pub node: NodeId,
    /// Hardware/app id.
    pub device_id: String,
    /// Display name.
    pub name: String,
    /// Platform.
    pub platform: crate::wire::Platform,
}

/// The registry of paired devices, over any [`Storage`].
#[derive(Clone)]
pub struct Registry {
    store: Arc<dyn Storage>,
    events: EventBus,
    trust: TrustConfig,
    /// Where security-relevant changes are recorded, in the same batch.
    ledger: Option<Arc<dyn Ledger>>,
    /// Serialises read-modify-write changes (trust, rotation, uniqueness checks).
    write: Arc<Mutex<()>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// A registry over `store`, publishing on `events`.
    pub fn new(store: Arc<dyn Storage>, events: EventBus) -> Self {
        Self::with_trust(store, events, TrustConfig::default())
    }

    /// The same with custom trust settings.
    pub fn with_trust(store: Arc<dyn Storage>, events: EventBus, trust: TrustConfig) -> Self {
        Registry {
            store,
            events,
            trust,
            ledger: None,
            write: Arc::new(Mutex::new(())),
        }
    }

    /// Records every security-relevant change (pairing approved/rejected,
    /// unpair, revoke, token rotation) in `ledger`, committed in the same
    /// storage batch as the change itself.
    pub fn with_ledger(mut self, ledger: Arc<dyn Ledger>) -> Self {
        self.ledger = Some(ledger);
        self
    }

    /// Commits `batch`, with a ledger record of `record_type` and `body`
    /// when a ledger is attached: both or neither.
    pub(crate) fn commit(
        &self,
        batch: Vec<Write>,
        record_type: &str,
        body: serde_json::Value,
        now: Timestamp,
    ) -> Result<(), RegistryError> {
        match &self.ledger {
            Some(ledger) => {
                let entry = Entry::json(record_type, ledger.author(), &body);
                ledger.append(vec![entry], batch, now)?;
            }
            // Nothing to record and nothing to write: no empty transaction.
            None if batch.is_empty() => {}
            None => self.store.apply(&batch)?,
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.write.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// **The gate.** Every entry point (commands, events, heartbeats,
    /// session messages) calls this with the authenticated node id, the
    /// presented token and the scope it needs.
    pub fn check(
        &self,
        node: &NodeId,
        token: &[u8],
        scope: &str,
    ) -> Result<DeviceRecord, AuthError> {
        let device: DeviceRecord = self
            .store
            .load(&node.to_string())?
            .ok_or(AuthError::UnknownDevice(*node))?;
        if let Some(at) = device.revoked_at {
            return Err(AuthError::Revoked { node: *node, at });
        }
        let presented = hash_token(token);
        if !bool::from(presented.as_slice().ct_eq(device.token_hash.as_slice())) {
            return Err(AuthError::BadToken(*node));
        }
        if !device.has_scope(scope) {
            return Err(AuthError::ScopeMissing {
                node: *node,
                scope: scope.to_owned(),
            });
        }
        Ok(device)
    }

    /// One device.
    pub fn get(&self, node: &NodeId) -> Result<Option<DeviceRecord>, StorageError> {
        self.store.load(&node.to_string())
    }

    /// All devices, ordered by node id.
    pub fn list(&self) -> Result<Vec<DeviceRecord>, StorageError> {
        self.store.load_all()
    }

    /// Checks that neither the node nor the hardware id is paired already
    /// (two point lookups: devices, and the `device_ids` index).
    pub fn ensure_unpaired(&self, node: &NodeId, device_id: &str) -> Result<(), RegistryError> {
        if self
            .store
            .get(DeviceRecord::TABLE, &node.to_string())?
            .is_some()
        {
            return Err(RegistryError::AlreadyPaired {
                what: format!("node {node}"),
            });
        }
        if self.store.get(DeviceIdRecord::TABLE, device_id)?.is_some() {
            return Err(RegistryError::AlreadyPaired {
                what: format!("device id {device_id:?}"),
            });
        }
        Ok(())
    }

    /// Builds the record and token for a newly paired device, and the writes
    /// that store it (the record and its `device_ids` index entry, both as
    /// inserts), for the caller to commit in one batch with its own writes
    /// (pairing commits them together with the request's new status).
    pub fn prepare_device(
        &self,
        new: NewDevice,
        now: Timestamp,
    ) -> Result<(DeviceRecord, DeviceToken, Vec<Write>), RegistryError> {
        self.prepare_device_scoped(new, scopes::DEFAULT, now)
    }

    /// [`Registry::prepare_device`] with the scopes `granted` instead of
    /// [`scopes::DEFAULT`].
    pub fn prepare_device_scoped(
        &self,
        new: NewDevice,
        granted: &[&str],
        now: Timestamp,
    ) -> Result<(DeviceRecord, DeviceToken, Vec<Write>), RegistryError> {
        self.ensure_unpaired(&new.node, &new.device_id)?;
        let token = DeviceToken::generate();
        let record = DeviceRecord {
            node: new.node,
            device_id: new.device_id,
            name: new.name,
            platform: new.platform,
            os_version: None,
            app_version: None,
            address: None,
            is_primary: false,
            status: DeviceStatus::Paired,
            capabilities: vec![],
            trust_level: self.trust.initial,
            token_hash: token.hash(),
            scopes: granted.iter().map(|s| Scope::new(s)).collect(),
            successes: 0,
            trust_raised_at: None,
            created_at: now,
            paired_at: Some(now),
            last_seen: Some(now),
            last_command: None,
            revoked_at: None,
            metadata: crate::wire::JsonText::empty_object(),
        };
        // Inserts: the batch fails if the node or the device id was paired meanwhile.
        let index = DeviceIdRecord {
            device_id: record.device_id.clone(),
            node: record.node,
        };
        let writes = vec![record.insert()?, index.insert()?];
        Ok((record, token, writes))
    }

    /// Commits a batch holding the writes of [`Registry::prepare_device`]
    /// (plus the caller's). A node or device id taken meanwhile fails it whole.
    pub fn commit_new_device(
        &self,
        record: &DeviceRecord,
        batch: &[Write],
    ) -> Result<(), RegistryError> {
        let body = json!({
            "node": record.node.to_string(),
            "device_id": record.device_id,
            "name": record.name,
            "scopes": record.scopes.iter().map(Scope::as_str).collect::<Vec<_>>(),
        });
        let now = record.paired_at.unwrap_or(record.created_at);
        self.commit(batch.to_vec(), record_types::PAIRING_APPROVED, body, now)
            .map_err(|e| match e {
                RegistryError::Storage(StorageError::AlreadyExists { table, .. }) => {
                    RegistryError::AlreadyPaired {
                        what: if table == DeviceIdRecord::TABLE {
                            format!("device id {:?}", record.device_id)
                        } else {
                            format!("node {}", record.node)
                        },
                    }
                }
                other => other,
            })
    }

    /// A read-modify-write of one device, recorded in the ledger if `audit`.
    fn update_audited(
        &self,
        node: &NodeId,
        audit: Option<Audit>,
        change: impl FnOnce(&mut DeviceRecord),
    ) -> Result<DeviceRecord, RegistryError> {
        let _g = self.lock();
        let mut device = self.get(node)?.ok_or(RegistryError::UnknownDevice(*node))?;
        change(&mut device);
        let batch = vec![device.put()?];
        match audit {
            Some(Audit(record_type, now)) => self.commit(
                batch,
                record_type,
                json!({ "node": node.to_string(), "device_id": device.device_id }),
                now,
            )?,
            None => self.store.apply(&batch)?,
        }
        Ok(device)
    }

    /// Removes the device; its token stops working at once. (Telling the
    /// device is the runtime's job.)
    pub fn unpair(&self, node: &NodeId, now: Timestamp) -> Result<(), RegistryError> {
        {
            let _g = self.lock();
            let device = self.get(node)?.ok_or(RegistryError::UnknownDevice(*node))?;
            // The record, its index entry and the ledger record go together.
            self.commit(
                vec![
                    DeviceRecord::delete(&node.to_string()),
                    DeviceIdRecord::delete(&device.device_id),
                ],
                record_types::DEVICE_UNPAIRED,
                json!({ "node": node.to_string(), "device_id": device.device_id }),
                now,
            )?;
        }
        self.events.publish(
            kinds::DEVICE_UNPAIRED,
            now,
            json!({ "node": node.to_string() }),
        );
        Ok(())
    }

    /// Issues a new token; the old one is refused from this moment.
    pub fn rotate_token(
        &self,
        node: &NodeId,
        now: Timestamp,
    ) -> Result<DeviceToken, RegistryError> {
        let token = DeviceToken::generate();
        self.rotate_token_to(node, &token, now)?;
        Ok(token)
    }

    /// Makes `token` the device's only token (the second phase of a
    /// rotation the device acknowledged), audited.
    pub fn rotate_token_to(
        &self,
        node: &NodeId,
        token: &DeviceToken,
        now: Timestamp,
    ) -> Result<(), RegistryError> {
        let hash = token.hash();
        let audit = Audit(record_types::TOKEN_ROTATED, now);
        self.update_audited(node, Some(audit), |d| d.token_hash = hash)?;
        self.events.publish(
            kinds::DEVICE_TOKEN_ROTATED,
            now,
            json!({ "node": node.to_string() }),
        );
        Ok(())
    }

    /// Revokes the device: every check fails until it is unpaired and paired again.
    pub fn revoke(&self, node: &NodeId, now: Timestamp) -> Result<(), RegistryError> {
        let audit = Audit(record_types::DEVICE_REVOKED, now);
        self.update_audited(node, Some(audit), |d| {
            d.revoked_at = Some(now);
            d.status = DeviceStatus::Error;
        })?;
        self.events.publish(
            kinds::DEVICE_REVOKED,
            now,
            json!({ "node": node.to_string() }),
        );
        Ok(())
    }

    /// Replaces the device's scopes, with a ledger record.
    pub fn set_scopes(
        &self,
        node: &NodeId,
        scopes: &[&str],
        now: Timestamp,
    ) -> Result<DeviceRecord, RegistryError> {
        let device = self.update_with(node, now, |d| {
            d.scopes = scopes.iter().map(|s| Scope::new(s)).collect();
            Some((
                record_types::SCOPES_SET,
                json!({ "node": node.to_string(), "device_id": d.device_id, "scopes": scopes }),
            ))
        })?;
        self.events.publish(
            kinds::DEVICE_SCOPES_SET,
            now,
            json!({ "node": node.to_string(), "scopes": scopes }),
        );
        Ok(device)
    }

    /// Records a successful use: raises trust, and promotes a paired device
    /// to trusted at the configured level (R-PAIR8); the promotion is
    /// recorded in the ledger and published (`device.trusted`).
    pub fn record_success(
        &self,
        node: &NodeId,
        now: Timestamp,
    ) -> Result<DeviceRecord, RegistryError> {
        let trust = self.trust.clone();
        let device = self.update_with(node, now, |d| {
            d.successes += 1;
            d.last_seen = Some(now);
            let due = d
                .trust_raised_at
                .is_none_or(|at| now.saturating_duration_since(at) >= trust.min_interval);
            if !due {
                return None;
            }
            d.trust_level = (d.trust_level + trust.step).min(1.0);
            d.trust_raised_at = Some(now);
            let promote =
                d.status == DeviceStatus::Paired && d.trust_level + 1e-9 >= trust.trusted_from;
            promote.then(|| {
                d.status = DeviceStatus::Trusted;
                (
                    record_types::DEVICE_TRUSTED,
                    json!({ "node": node.to_string(), "device_id": d.device_id, "trust_level": d.trust_level, "successes": d.successes }),
                )
            })
        })?;
        Ok(device)
    }

    /// Changes a device; `change` says whether (and what) to record in the
    /// ledger, in the same batch.
    fn update_with(
        &self,
        node: &NodeId,
        now: Timestamp,
        change: impl FnOnce(&mut DeviceRecord) -> Option<(&'static str, serde_json::Value)>,
    ) -> Result<DeviceRecord, RegistryError> {
        let audited = {
            let _g = self.lock();
            let mut device = self.get(node)?.ok_or(RegistryError::UnknownDevice(*node))?;
            let audit = change(&mut device);
            let batch = vec![device.put()?];
            match &audit {
                Some((record_type, body)) => self.commit(batch, record_type, body.clone(), now)?,
                None => self.store.apply(&batch)?,
            }
            (device, audit)
        };
        if let (device, Some((record_types::DEVICE_TRUSTED, _))) = &audited {
            self.events.publish(
                kinds::DEVICE_TRUSTED,
                now,
                json!({ "node": node.to_string(), "trust_level": device.trust_level }),
            );
        }
        Ok(audited.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Received;
    use crate::identity::NodeKey;
    use crate::storage::MemoryStorage;
    use crate::wire::Platform;

    const T: Timestamp = Timestamp::from_millis(1_750_000_000_000);

    fn setup() -> (Registry, EventBus) {
        let events = EventBus::new();
        (
            Registry::new(Arc::new(MemoryStorage::new()), events.clone()),
            events,
        )
    }

    fn pair(reg: &Registry, seed: u8) -> (NodeId, DeviceToken) {
        let node = NodeKey::from_secret_bytes(&[seed; 32]).node_id();
        let (record, token, writes) = reg
            .prepare_device(
                NewDevice {
                    node,
                    device_id: format!("hw-{seed}"),
                    name: "Phone".into(),
                    platform: Platform::Ios,
                },
                T,
            )
            .unwrap();
        reg.commit_new_device(&record, &writes).unwrap();
        (node, token)
    }

    #[test]
    fn check_accepts_the_right_token_and_scope() {
        let (reg, _) = setup();
        let (node, token) = pair(&reg, 1);
        let d = reg
            .check(&node, token.as_bytes(), scopes::COMMANDS_RUN)
            .unwrap();
        assert_eq!(d.status, DeviceStatus::Paired);
        // The stored hash is not the token.
        assert_ne!(d.token_hash.as_slice(), token.as_bytes());
        assert_eq!(d.token_hash, token.hash());
    }

    #[test]
    fn every_refusal_is_typed() {
        let (reg, _) = setup();
        let (node, token) = pair(&reg, 1);
        let stranger = NodeKey::from_secret_bytes(&[9; 32]).node_id();
        assert_eq!(
            reg.check(&stranger, token.as_bytes(), scopes::COMMANDS_RUN),
            Err(AuthError::UnknownDevice(stranger))
        );
        assert_eq!(
            reg.check(&node, &[0u8; 32], scopes::COMMANDS_RUN),
            Err(AuthError::BadToken(node))
        );
        assert_eq!(
            reg.check(&node, b"short", scopes::COMMANDS_RUN),
            Err(AuthError::BadToken(node))
        );
        assert_eq!(
            reg.check(&node, token.as_bytes(), scopes::MEMORIES_READ),
            Err(AuthError::ScopeMissing {
                node,
                scope: scopes::MEMORIES_READ.into()
            })
        );
    }

    #[test]
    fn revocation_refuses_every_entry_point_at_once() {
        let (reg, events) = setup();
        let mut sub = events.subscribe("device.*", 8).unwrap();
        let (node, token) = pair(&reg, 1);
        reg.revoke(&node, T).unwrap();
        for scope in scopes::DEFAULT {
            assert_eq!(
                reg.check(&node, token.as_bytes(), scope),
                Err(AuthError::Revoked { node, at: T })
            );
        }
        assert!(
            matches!(sub.try_recv(), Some(Received::Event(e)) if e.kind == kinds::DEVICE_REVOKED)
        );
        // A revoked device cannot pair again without unpairing first.
        assert!(matches!(
            reg.ensure_unpaired(&node, "hw-other"),
            Err(RegistryError::AlreadyPaired { .. })
        ));
    }

    #[test]
    fn rotation_invalidates_the_old_token() {
        let (reg, events) = setup();
        let mut sub = events.subscribe("device.token_rotated", 8).unwrap();
        let (node, old) = pair(&reg, 1);
        let new = reg.rotate_token(&node, T).unwrap();
        assert_ne!(old, new);
        assert_eq!(
            reg.check(&node, old.as_bytes(), scopes::COMMANDS_RUN),
            Err(AuthError::BadToken(node))
        );
        reg.check(&node, new.as_bytes(), scopes::COMMANDS_RUN)
            .unwrap();
        assert!(sub.try_recv().is_some());
    }

    #[test]
    fn unpair_removes_the_device() {
        let (reg, events) = setup();
        let mut sub = events.subscribe("device.unpaired", 8).unwrap();
        let (node, token) = pair(&reg, 1);
        reg.unpair(&node, T).unwrap();
        assert_eq!(
            reg.check(&node, token.as_bytes(), scopes::COMMANDS_RUN),
            Err(AuthError::UnknownDevice(node))
        );
        assert!(sub.try_recv().is_some());
        assert!(matches!(
            reg.unpair(&node, T),
            Err(RegistryError::UnknownDevice(_))
        ));
        // Pairing again works after unpairing.
        reg.ensure_unpaired(&node, "hw-1").unwrap();
    }

    #[test]
    fn hardware_ids_are_unique() {
        let (reg, _) = setup();
        pair(&reg, 1);
        let other = NodeKey::from_secret_bytes(&[2; 32]).node_id();
        let err = reg
            .prepare_device(
                NewDevice {
                    node: other,
                    device_id: "hw-1".into(),
                    name: "Clone".into(),
                    platform: Platform::Android,
                },
                T,
            )
            .unwrap_err();
        assert!(matches!(err, RegistryError::AlreadyPaired { .. }), "{err}");
        assert!(err.to_string().contains("unpair it first"));
    }

    #[test]
    fn a_race_for_the_same_device_id_fails_the_second_commit_whole() {
        let (reg, _) = setup();
        let new = |seed: u8| NewDevice {
            node: NodeKey::from_secret_bytes(&[seed; 32]).node_id(),
            device_id: "hw-same".into(),
            name: "Twin".into(),
            platform: Platform::Desktop,
        };
        // Both prepared before either commits, as two concurrent approvals would be.
        let (a, _, wa) = reg.prepare_device(new(1), T).unwrap();
        let (b, _, wb) = reg.prepare_device(new(2), T).unwrap();
        reg.commit_new_device(&a, &wa).unwrap();
        let err = reg.commit_new_device(&b, &wb).unwrap_err();
        assert!(err.to_string().contains("hw-same"), "{err}");
        assert!(reg.get(&b.node).unwrap().is_none());
        // Unpairing frees the id.
        reg.unpair(&a.node, T).unwrap();
        let (c, _, wc) = reg.prepare_device(new(2), T).unwrap();
        reg.commit_new_device(&c, &wc).unwrap();
    }

    #[test]
    fn trust_grows_with_use_over_time_until_trusted() {
        let (reg, _) = setup();
        let (node, _) = pair(&reg, 1);
        let mut d = reg.get(&node).unwrap().unwrap();
        assert_eq!(d.trust_level, 0.3);
        let minutes = |m: u64| T + std::time::Duration::from_secs(60 * m);
        // A burst of successes in one minute raises trust once.
        for s in 0..50 {
            d = reg
                .record_success(&node, minutes(0) + std::time::Duration::from_millis(s))
                .unwrap();
        }
        assert_eq!((d.successes, d.trust_level), (50, 0.35));
        // Then once per 10 minutes of use: 0.3 + 8 steps of 0.05 is 0.7.
        for i in 1..7 {
            d = reg.record_success(&node, minutes(10 * i)).unwrap();
            assert_eq!(d.status, DeviceStatus::Paired);
            // Within the interval: counted, not raised.
            let level = d.trust_level;
            d = reg.record_success(&node, minutes(10 * i + 9)).unwrap();
            assert_eq!(d.trust_level, level);
        }
        d = reg.record_success(&node, minutes(70)).unwrap();
        assert_eq!(d.status, DeviceStatus::Trusted);
        for i in 8..30 {
            d = reg.record_success(&node, minutes(10 * i)).unwrap();
        }
        assert_eq!(d.trust_level, 1.0);
        assert_eq!(d.successes, 50 + 12 + 1 + 22);
    }

    #[test]
    fn known_scopes_are_interned_and_serialize_as_strings() {
        let known = Scope::new("commands:run");
        assert!(matches!(known.0, std::borrow::Cow::Borrowed(_)));
        let custom = Scope::new("photos:read");
        assert!(matches!(custom.0, std::borrow::Cow::Owned(_)));
        let json = serde_json::to_string(&vec![known.clone(), custom.clone()]).unwrap();
        assert_eq!(json, r#"["commands:run","photos:read"]"#);
        let back: Vec<Scope> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, vec![known.clone(), custom]);
        let bin = postcard::to_allocvec(&known).unwrap();
        let again: Scope = postcard::from_bytes(&bin).unwrap();
        assert!(matches!(again.0, std::borrow::Cow::Borrowed(_)));
    }

    #[test]
    fn tokens_never_show_in_debug_and_round_trip_as_text() {
        let t = DeviceToken::from_bytes([0xab; 32]);
        assert_eq!(format!("{t:?}"), "DeviceToken(<redacted>)");
        let text = t.to_text();
        assert_eq!(DeviceToken::from_text(&text), Some(t));
        assert_eq!(DeviceToken::from_text("abcd"), None);
        assert_eq!(DeviceToken::from_text("zz"), None);
    }
}
