//! Pairing: a 6-digit code that authenticates the key exchange (R-PAIR1–4).
//!
//! Sans-IO state machines: [`DevicePairing`] on the device and
//! [`PrimaryPairing`] on the primary take messages, user decisions and the
//! current time, and return the messages to send. No sockets, no clocks.
//!
//! # Protocol
//!
//! 1. The device draws a 6-digit code from the OS CSPRNG and **shows it**. It
//!    starts SPAKE2 (side A) with the code as password and both node ids as
//!    identities, and sends `Request { device info, pake: A }`.
//! 2. The primary stores a pending request (24 h expiry) and shows it: name,
//!    platform. The user **types the code shown on the device** to approve
//!    (or rejects, with an optional reason).
//! 3. The primary runs SPAKE2 side B with the typed code and the ids it sees:
//!    the device's id *as authenticated by the transport* and its own. It sends
//!    `Challenge { pake: B, mac_P }`, where `mac_P` is an HMAC under the shared
//!    key over the transcript (request id, both node ids, both PAKE messages).
//! 4. The device derives the key; if `mac_P` checks out it answers
//!    `Confirm { mac_D }`; if not (wrong code, or someone in the middle) it
//!    answers `Retry { pake: A' }` with a fresh SPAKE2 message.
//! 5. The primary checks `mac_D`, creates the device record and a token, and
//!    sends `Approved { sealed grant }`: token, primary id and scopes, sealed to
//!    the device's node key and bound to the request. A `Retry` costs one of 5
//!    attempts; the fifth wrong code voids the request.
//!
//! Why this is sound: SPAKE2 gives both sides the same key only if they used
//! the same code *and* the same pair of identities. An attacker without the
//! code gets one online guess per attempt (5 in 10^6 per request), learns
//! nothing offline, and cannot substitute its own key for either side's: the
//! identities would differ, the keys with them, and the MACs fail on both ends.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use serde_json::json;
use sha2::Sha256;
use spake2::{Ed25519Group, Identity, Password, Spake2};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::clock::Timestamp;
use crate::crypto::{self, CryptoError};
use crate::events::{EventBus, kinds};
use crate::identity::{NodeId, NodeKey};
use crate::ledger::record_types;
use crate::registry::{DeviceToken, NewDevice, Registry, RegistryError, TOKEN_LEN};
use crate::storage::records::{DeviceRecord, PairingRequestRecord, PairingStatus};
use crate::storage::{Record, Storage, StorageError, StorageExt};
use crate::wire::{MessageId, PairingMessage, Platform};

/// Settings shared by both sides.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct PairingConfig {
    /// How long a request stays valid. Default 24 h.
    pub expiry: Duration,
    /// Wrong codes allowed before the request is void. Default 5.
    pub max_attempts: u8,
}

impl Default for PairingConfig {
    fn default() -> Self {
        PairingConfig {
            expiry: Duration::from_secs(24 * 3600),
            max_attempts: 5,
        }
    }
}

impl PairingConfig {
    /// Sets the request lifetime.
    pub fn expiry(mut self, expiry: Duration) -> Self {
        self.expiry = expiry;
        self
    }
}

/// Pairing errors: each a case the app shows differently.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PairingError {
    /// The request timed out.
    #[error("the pairing request expired; start pairing again on the device")]
    Expired,
    /// The code did not match. `attempts_left` more tries remain.
    #[error("invalid code; {attempts_left} attempts left")]
    InvalidCode {
        /// Tries left before the request is void.
        attempts_left: u8,
    },
    /// Too many wrong codes: the request is void.
    #[error("too many wrong codes; the request is void, start pairing again on the device")]
    TooManyAttempts,
    /// The device (node or hardware id) is paired already.
    #[error("{0}; unpair it first")]
    AlreadyPaired(String),
    /// The user rejected the request.
    #[error("pairing rejected{}", .reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
    Rejected {
        /// The user's reason, if given.
        reason: Option<String>,
    },
    /// No such request.
    #[error("unknown pairing request {0}")]
    UnknownRequest(String),
    /// A message came from a node other than the request's.
    #[error("pairing message from {from}, but the request belongs to {expected}")]
    WrongPeer {
        /// Sender.
        from: NodeId,
        /// The request's node.
        expected: NodeId,
    },
    /// A message that does not fit the current state.
    #[error("unexpected pairing message: {0}")]
    Unexpected(&'static str),
    /// A malformed message or code.
    #[error("invalid pairing input: {0}")]
    Invalid(String),
    /// Too many requests are waiting (from this address, or in all): try
    /// again later.
    #[error("{0}; try again later")]
    Busy(String),
    /// The sealed grant did not open.
    #[error("the pairing grant could not be opened: {0}")]
    Grant(#[from] CryptoError),
    /// Storage failed; the request is unchanged.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The audit ledger refused the record; the request is unchanged.
    #[error("audit ledger: {0}")]
    Ledger(String),
}

impl From<RegistryError> for PairingError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::AlreadyPaired { what } => {
                PairingError::AlreadyPaired(format!("{what} is already paired"))
            }
            RegistryError::UnknownDevice(n) => {
                PairingError::Invalid(format!("device {n} vanished"))
            }
            RegistryError::Storage(s) => PairingError::Storage(s),
            RegistryError::Ledger(m) => PairingError::Ledger(m),
        }
    }
}

/// The 6-digit code the device shows and the user types on the primary.
#[derive(Clone, PartialEq, Eq)]
pub struct PairingCode(Zeroizing<String>);

impl PairingCode {
    /// A uniformly random code from the OS CSPRNG (000000–999999).
    pub fn generate() -> Self {
        let n: u32 = rand::random_range(0..1_000_000);
        PairingCode(Zeroizing::new(format!("{n:06}")))
    }

    /// Parses what a user typed: 6 digits, spaces and dashes ignored.
    pub fn parse(text: &str) -> Result<Self, PairingError> {
        let digits: String = text.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
        if digits.len() != 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PairingError::Invalid("a pairing code is 6 digits".into()));
        }
        Ok(PairingCode(Zeroizing::new(digits)))
    }

    /// The digits, for showing on the device.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PairingCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PairingCode(******)")
    }
}

/// What the device tells the primary about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    /// Hardware/app id (unique per device).
    pub device_id: String,
    /// Display name.
    pub name: String,
    /// Platform.
    pub platform: Platform,
}

/// What the device receives when pairing succeeds.
#[derive(Debug, Clone, PartialEq)]
pub struct PairingGrant {
    /// Its token (store it securely: keychain / keystore).
    pub token: DeviceToken,
    /// The primary it paired with.
    pub primary: NodeId,
    /// The scopes it was granted.
    pub scopes: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct GrantBody {
    token: [u8; TOKEN_LEN],
    primary: NodeId,
    scopes: Vec<String>,
}

fn password(code: &PairingCode) -> Password {
    Password::new(format!("mesh-sdk/pairing/v1:{}", code.as_str()))
}

fn spake_identities(device: &NodeId, primary: &NodeId) -> (Identity, Identity) {
    (
        Identity::new(device.as_bytes()),
        Identity::new(primary.as_bytes()),
    )
}

fn transcript(
    request: &MessageId,
    device: &NodeId,
    primary: &NodeId,
    a: &[u8],
    b: &[u8],
) -> Vec<u8> {
    let mut t = Vec::with_capacity(16 + 64 + a.len() + b.len() + 40);
    t.extend_from_slice(b"mesh-sdk/pairing/transcript/v1");
    t.extend_from_slice(&request.0);
    t.extend_from_slice(device.as_bytes());
    t.extend_from_slice(primary.as_bytes());
    for m in [a, b] {
        t.extend_from_slice(&(m.len() as u32).to_be_bytes());
        t.extend_from_slice(m);
    }
    t
}

/// HMAC-SHA256 under the PAKE key (HKDF-Expand is HMAC over `info || 0x01`).
/// The key-confirmation MAC of `role` over `transcript`, or `None` if it
/// cannot be computed (a key too short for HKDF): callers then treat the
/// confirmation as failed. It never falls back to a fixed value, which
/// both sides could "agree" on without sharing a key.
fn confirm_mac(key: &[u8], role: &[u8], transcript: &[u8]) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    let mut info = Vec::with_capacity(role.len() + transcript.len() + 32);
    info.extend_from_slice(b"mesh-sdk/pairing/confirm/v1/");
    info.extend_from_slice(role);
    info.extend_from_slice(transcript);
    let hk = Hkdf::<Sha256>::from_prk(key).ok()?;
    hk.expand(&info, &mut out).ok()?;
    Some(out)
}

/// Whether `mac` is `role`'s confirmation under `key` (constant time;
/// `false` whenever the MAC cannot be computed).
fn mac_matches(key: &[u8], role: &[u8], transcript: &[u8], mac: &[u8; 32]) -> bool {
    confirm_mac(key, role, transcript).is_some_and(|expected| bool::from(expected.ct_eq(mac)))
}

fn grant_aad(request: &MessageId, primary: &NodeId, device: &NodeId) -> Vec<u8> {
    let mut aad = b"mesh-sdk/pairing/grant/v1".to_vec();
    aad.extend_from_slice(&request.0);
    aad.extend_from_slice(primary.as_bytes());
    aad.extend_from_slice(device.as_bytes());
    aad
}

fn parse_request_id(text: &str) -> Result<MessageId, PairingError> {
    let bytes = data_encoding::HEXLOWER_PERMISSIVE
        .decode(text.as_bytes())
        .map_err(|_| PairingError::UnknownRequest(text.to_owned()))?;
    let arr: [u8; 16] = bytes
        .try_into()
        .map_err(|_| PairingError::UnknownRequest(text.to_owned()))?;
    Ok(MessageId(arr))
}

// ---------------------------------------------------------------- device side

/// What the device should do after a message.
#[derive(Debug)]
pub enum DeviceStep {
    /// Send this to the primary and wait.
    Send(PairingMessage),
    /// The code did not match on the primary's side (a mistyped code, or
    /// someone in the middle). Send this (the next attempt) and tell the user.
    CodeMismatch(PairingMessage),
    /// Paired.
    Paired(PairingGrant),
}

/// The device's side of pairing.
pub struct DevicePairing {
    request_id: MessageId,
    me: NodeId,
    primary: NodeId,
    code: PairingCode,
    spake: Option<Spake2<Ed25519Group>>,
    last_a: Vec<u8>,
    confirmed: bool,
    expires_at: Timestamp,
    /// Wrong challenges left before the device gives up (as the primary
    /// does): a rogue primary cannot try codes without end.
    attempts_left: u8,
}

impl fmt::Debug for DevicePairing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevicePairing")
            .field("request_id", &self.request_id)
            .field("primary", &self.primary)
            .field("confirmed", &self.confirmed)
            .finish_non_exhaustive()
    }
}

impl DevicePairing {
    /// Starts pairing `me` with `primary` (whose id the device learned from
    /// discovery or configuration). Show [`DevicePairing::code`] to the user
    /// and send the returned request.
    pub fn start(
        me: NodeId,
        primary: NodeId,
        info: DeviceInfo,
        now: Timestamp,
        config: &PairingConfig,
    ) -> (Self, PairingMessage) {
        let code = PairingCode::generate();
        let request_id = MessageId::random();
        let (a_id, b_id) = spake_identities(&me, &primary);
        let (spake, a) = Spake2::<Ed25519Group>::start_a(&password(&code), &a_id, &b_id);
        let msg = PairingMessage::Request {
            request_id,
            device_id: info.device_id,
            device_name: info.name,
            platform: info.platform,
            pake: ByteBuf::from(a.clone()),
        };
        let session = DevicePairing {
            request_id,
            me,
            primary,
            code,
            spake: Some(spake),
            last_a: a,
            confirmed: false,
            expires_at: now.saturating_add(config.expiry),
            attempts_left: config.max_attempts.max(1),
        };
        (session, msg)
    }

    /// The code to show.
    pub fn code(&self) -> &PairingCode {
        &self.code
    }

    /// The request id.
    pub fn request_id(&self) -> MessageId {
        self.request_id
    }

    /// Wrong challenges the device still answers. At 0 the attempt is void
    /// (the primary voids it after the same number of wrong codes).
    pub fn attempts_left(&self) -> u8 {
        self.attempts_left
    }

    /// Handles a message from `from`. `key` is the device's node key (to open the grant).
    pub fn handle(
        &mut self,
        from: NodeId,
        msg: PairingMessage,
        key: &NodeKey,
        now: Timestamp,
    ) -> Result<DeviceStep, PairingError> {
        if now >= self.expires_at {
            return Err(PairingError::Expired);
        }
        if self.attempts_left == 0 {
            return Err(PairingError::TooManyAttempts);
        }
        if from != self.primary {
            return Err(PairingError::WrongPeer {
                from,
                expected: self.primary,
            });
        }
        match msg {
            PairingMessage::Challenge {
                request_id,
                pake,
                mac,
            } if request_id == self.request_id => {
                let spake = self
                    .spake
                    .take()
                    .ok_or(PairingError::Unexpected("a second challenge"))?;
                let t = transcript(
                    &self.request_id,
                    &self.me,
                    &self.primary,
                    &self.last_a,
                    &pake,
                );
                let matched = spake
                    .finish(&pake)
                    .ok()
                    .map(Zeroizing::new)
                    .filter(|k| mac_matches(k, b"primary", &t, &mac))
                    .and_then(|k| confirm_mac(&k, b"device", &t));
                match matched {
                    Some(mac) => {
                        self.confirmed = true;
                        Ok(DeviceStep::Send(PairingMessage::Confirm {
                            request_id,
                            mac,
                        }))
                    }
                    None => {
                        // A wrong code, or a primary guessing codes: each
                        // costs one of the device's attempts too; past the
                        // last, every challenge is refused.
                        self.attempts_left = self.attempts_left.saturating_sub(1);
                        let (a_id, b_id) = spake_identities(&self.me, &self.primary);
                        let (spake, a) =
                            Spake2::<Ed25519Group>::start_a(&password(&self.code), &a_id, &b_id);
                        self.spake = Some(spake);
                        self.last_a = a.clone();
                        Ok(DeviceStep::CodeMismatch(PairingMessage::Retry {
                            request_id,
                            pake: ByteBuf::from(a),
                        }))
                    }
                }
            }
            PairingMessage::Approved { request_id, sealed } if request_id == self.request_id => {
                if !self.confirmed {
                    return Err(PairingError::Unexpected("approval before key confirmation"));
                }
                let plain = Zeroizing::new(crypto::open(
                    key,
                    &grant_aad(&self.request_id, &self.primary, &self.me),
                    &sealed,
                )?);
                let body: GrantBody = postcard::from_bytes(&plain)
                    .map_err(|e| PairingError::Invalid(format!("grant: {e}")))?;
                if body.primary != self.primary {
                    return Err(PairingError::Invalid("grant names another primary".into()));
                }
                Ok(DeviceStep::Paired(PairingGrant {
                    token: DeviceToken::from_bytes(body.token),
                    primary: body.primary,
                    scopes: body.scopes,
                }))
            }
            PairingMessage::Rejected { request_id, reason } if request_id == self.request_id => {
                Err(PairingError::Rejected { reason })
            }
            _ => Err(PairingError::Unexpected(
                "not a message for this pairing request",
            )),
        }
    }
}

// --------------------------------------------------------------- primary side

/// A key-confirmation in flight: the key and transcript of the latest attempt.
struct Attempt {
    key: Zeroizing<Vec<u8>>,
    transcript: Vec<u8>,
}

/// The result of a successful pairing on the primary.
#[derive(Debug)]
pub struct Paired {
    /// The new device record.
    pub device: DeviceRecord,
    /// The grant to send to the device.
    pub reply: PairingMessage,
}

/// The primary's side of pairing: pending requests (persisted), user
/// decisions, and the exchanges in flight.
pub struct PrimaryPairing {
    me: NodeId,
    store: Arc<dyn Storage>,
    registry: Registry,
    events: EventBus,
    config: PairingConfig,
    attempts: Mutex<HashMap<String, Attempt>>,
}

impl fmt::Debug for PrimaryPairing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrimaryPairing")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

const MAX_TEXT: usize = 128;

impl PrimaryPairing {
    /// Pairing for the primary `me`.
    pub fn new(
        me: NodeId,
        store: Arc<dyn Storage>,
        registry: Registry,
        events: EventBus,
        config: PairingConfig,
    ) -> Self {
        PrimaryPairing {
            me,
            store,
            registry,
            events,
            config,
            attempts: Mutex::new(HashMap::new()),
        }
    }

    fn attempts(&self) -> std::sync::MutexGuard<'_, HashMap<String, Attempt>> {
        self.attempts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn load(&self, request_id: &str) -> Result<PairingRequestRecord, PairingError> {
        self.store
            .load::<PairingRequestRecord>(request_id)?
            .ok_or_else(|| PairingError::UnknownRequest(request_id.to_owned()))
    }

    /// Handles a `Request` from `from` (the transport-authenticated node id).
    /// Returns the stored pending request, to show to the user.
    pub fn on_request(
        &self,
        from: NodeId,
        msg: PairingMessage,
        now: Timestamp,
    ) -> Result<PairingRequestRecord, PairingError> {
        let PairingMessage::Request {
            request_id,
            device_id,
            device_name,
            platform,
            pake,
        } = msg
        else {
            return Err(PairingError::Unexpected("expected a pairing request"));
        };
        for (field, v) in [("device_id", &device_id), ("device_name", &device_name)] {
            if v.trim().is_empty() || v.len() > MAX_TEXT {
                return Err(PairingError::Invalid(format!(
                    "{field} must be 1-{MAX_TEXT} bytes"
                )));
            }
        }
        self.registry.ensure_unpaired(&from, &device_id)?;
        let record = PairingRequestRecord {
            request_id: request_id.to_string(),
            device_node: from,
            device_id,
            device_name,
            platform,
            status: PairingStatus::Pending,
            created_at: now,
            expires_at: now.saturating_add(self.config.expiry),
            attempts_left: self.config.max_attempts,
            reject_reason: None,
            device_pake: pake.into_vec(),
        };
        self.store.apply(&[record.insert()?]).map_err(|e| match e {
            StorageError::AlreadyExists { .. } => {
                PairingError::Invalid("duplicate request id".into())
            }
            other => PairingError::Storage(other),
        })?;
        self.events.publish(
            kinds::PAIRING_REQUEST_RECEIVED,
            now,
            json!({
                "request_id": record.request_id,
                "node": from.to_string(),
                "device_name": record.device_name,
                "platform": record.platform,
            }),
        );
        Ok(record)
    }

    /// Forgets a request whose exchange ended (its connection closed): the
    /// row goes, as does any attempt in flight. Approvals and rejections
    /// stay in the ledger.
    pub fn forget(&self, request_id: &str) -> Result<(), PairingError> {
        self.attempts().remove(request_id);
        self.store
            .apply(&[PairingRequestRecord::delete(request_id)])?;
        Ok(())
    }

    /// Forgets every stored request (at start: no exchange survives a
    /// restart, so none of them can be approved). Returns how many went.
    pub fn forget_all(&self) -> Result<usize, PairingError> {
        self.attempts().clear();
        let all = self.store.load_all::<PairingRequestRecord>()?;
        if all.is_empty() {
            return Ok(0);
        }
        let batch: Vec<_> = all
            .iter()
            .map(|r| PairingRequestRecord::delete(&r.request_id))
            .collect();
        self.store.apply(&batch)?;
        Ok(all.len())
    }

    /// Pending requests, expiring overdue ones first.
    pub fn pending(&self, now: Timestamp) -> Result<Vec<PairingRequestRecord>, PairingError> {
        self.expire_due(now)?;
        Ok(self
            .store
            .load_all::<PairingRequestRecord>()?
            .into_iter()
            .filter(|r| matches!(r.status, PairingStatus::Pending | PairingStatus::Approved))
            .collect())
    }

    /// Marks overdue requests expired (publishing `pairing.expired`); returns their ids.
    pub fn expire_due(&self, now: Timestamp) -> Result<Vec<String>, PairingError> {
        let mut overdue: Vec<PairingRequestRecord> = self
            .store
            .load_all::<PairingRequestRecord>()?
            .into_iter()
            .filter(|r| {
                matches!(r.status, PairingStatus::Pending | PairingStatus::Approved)
                    && now >= r.expires_at
            })
            .collect();
        if overdue.is_empty() {
            return Ok(vec![]);
        }
        for r in &mut overdue {
            r.status = PairingStatus::Expired;
        }
        // One commit for all of them; events only once it is durable.
        let batch = overdue
            .iter()
            .map(Record::put)
            .collect::<Result<Vec<_>, _>>()?;
        self.store.apply(&batch)?;
        let mut attempts = self.attempts();
        for r in &overdue {
            attempts.remove(&r.request_id);
            self.events.publish(
                kinds::PAIRING_EXPIRED,
                now,
                json!({ "request_id": r.request_id, "reason": "timeout" }),
            );
        }
        Ok(overdue.into_iter().map(|r| r.request_id).collect())
    }

    /// Checks a request may still be decided; expires it if overdue.
    fn open_request(
        &self,
        request_id: &str,
        now: Timestamp,
    ) -> Result<PairingRequestRecord, PairingError> {
        let r = self.load(request_id)?;
        match r.status {
            PairingStatus::Pending | PairingStatus::Approved if now >= r.expires_at => {
                self.expire_due(now)?;
                Err(PairingError::Expired)
            }
            PairingStatus::Pending | PairingStatus::Approved => Ok(r),
            PairingStatus::Expired if r.attempts_left == 0 => Err(PairingError::TooManyAttempts),
            PairingStatus::Expired => Err(PairingError::Expired),
            PairingStatus::Rejected => Err(PairingError::Rejected {
                reason: r.reject_reason,
            }),
            PairingStatus::Completed => Err(PairingError::AlreadyPaired(format!(
                "request {request_id} already completed"
            ))),
        }
    }

    /// The user approves `request_id` by typing the code the device shows.
    /// Returns the device to send to and the challenge. Whether the code was
    /// right shows when the device answers ([`PrimaryPairing::on_message`]).
    pub fn approve(
        &self,
        request_id: &str,
        code: &PairingCode,
        now: Timestamp,
    ) -> Result<(NodeId, PairingMessage), PairingError> {
        let mut r = self.open_request(request_id, now)?;
        let rid = parse_request_id(&r.request_id)?;
        let (a_id, b_id) = spake_identities(&r.device_node, &self.me);
        let (spake, b) = Spake2::<Ed25519Group>::start_b(&password(code), &a_id, &b_id);
        let key = Zeroizing::new(
            spake
                .finish(&r.device_pake)
                .map_err(|e| PairingError::Invalid(format!("device PAKE message: {e:?}")))?,
        );
        let t = transcript(&rid, &r.device_node, &self.me, &r.device_pake, &b);
        let mac = confirm_mac(&key, b"primary", &t)
            .ok_or_else(|| PairingError::Invalid("the PAKE key is unusable".into()))?;
        r.status = PairingStatus::Approved;
        self.store.apply(&[r.put()?])?;
        self.attempts()
            .insert(r.request_id.clone(), Attempt { key, transcript: t });
        Ok((
            r.device_node,
            PairingMessage::Challenge {
                request_id: rid,
                pake: ByteBuf::from(b),
                mac,
            },
        ))
    }

    /// The user rejects `request_id`. Returns the device and the message to send.
    pub fn reject(
        &self,
        request_id: &str,
        reason: Option<String>,
        now: Timestamp,
    ) -> Result<(NodeId, PairingMessage), PairingError> {
        let mut r = self.open_request(request_id, now)?;
        r.status = PairingStatus::Rejected;
        r.reject_reason = reason.clone();
        let audit = json!({
            "request_id": r.request_id,
            "node": r.device_node.to_string(),
            "device_id": r.device_id,
            "reason": reason,
        });
        self.registry
            .commit(vec![r.put()?], record_types::PAIRING_REJECTED, audit, now)?;
        self.attempts().remove(request_id);
        self.events.publish(
            kinds::PAIRING_REJECTED,
            now,
            json!({ "request_id": r.request_id, "reason": reason }),
        );
        Ok((
            r.device_node,
            PairingMessage::Rejected {
                request_id: parse_request_id(&r.request_id)?,
                reason,
            },
        ))
    }

    /// Handles the device's answer to a challenge: `Confirm` completes the
    /// pairing; `Retry` means the code was wrong and costs an attempt.
    pub fn on_message(
        &self,
        from: NodeId,
        msg: PairingMessage,
        now: Timestamp,
    ) -> Result<Paired, PairingError> {
        let (request_id, confirm_mac_d, retry_pake) = match msg {
            PairingMessage::Confirm { request_id, mac } => (request_id, Some(mac), None),
            PairingMessage::Retry { request_id, pake } => (request_id, None, Some(pake.into_vec())),
            _ => {
                return Err(PairingError::Unexpected(
                    "expected a confirmation or a retry",
                ));
            }
        };
        let rid = request_id.to_string();
        let mut r = self.open_request(&rid, now)?;
        if from != r.device_node {
            return Err(PairingError::WrongPeer {
                from,
                expected: r.device_node,
            });
        }
        let attempt = self
            .attempts()
            .remove(&rid)
            .ok_or(PairingError::Unexpected(
                "no approval is in progress for this request",
            ))?;
        let confirmed = confirm_mac_d
            .is_some_and(|mac| mac_matches(&attempt.key, b"device", &attempt.transcript, &mac));
        if !confirmed {
            return Err(self.wrong_code(r, retry_pake, now)?);
        }
        // Keys matched: create the device and complete the request atomically.
        let (device, token, mut batch) = self.registry.prepare_device(
            NewDevice {
                node: r.device_node,
                device_id: r.device_id.clone(),
                name: r.device_name.clone(),
                platform: r.platform,
            },
            now,
        )?;
        r.status = PairingStatus::Completed;
        batch.push(r.put()?);
        self.registry.commit_new_device(&device, &batch)?;
        let body = Zeroizing::new(
            postcard::to_allocvec(&GrantBody {
                token: *token.as_bytes(),
                primary: self.me,
                scopes: device.scopes.iter().map(ToString::to_string).collect(),
            })
            .map_err(|e| PairingError::Invalid(e.to_string()))?,
        );
        let sealed = crypto::seal(
            &r.device_node,
            &grant_aad(&request_id, &self.me, &r.device_node),
            &body,
        )?;
        self.events.publish(
            kinds::PAIRING_APPROVED,
            now,
            json!({ "request_id": rid, "node": r.device_node.to_string(), "device_name": r.device_name }),
        );
        Ok(Paired {
            device,
            reply: PairingMessage::Approved { request_id, sealed },
        })
    }

    /// Counts a wrong code; voids the request at the limit.
    fn wrong_code(
        &self,
        mut r: PairingRequestRecord,
        next_pake: Option<Vec<u8>>,
        now: Timestamp,
    ) -> Result<PairingError, PairingError> {
        r.attempts_left = r.attempts_left.saturating_sub(1);
        if let Some(p) = next_pake {
            r.device_pake = p;
        }
        if r.attempts_left == 0 {
            r.status = PairingStatus::Expired;
            self.store.apply(&[r.put()?])?;
            self.events.publish(
                kinds::PAIRING_EXPIRED,
                now,
                json!({ "request_id": r.request_id, "reason": "too_many_attempts" }),
            );
            return Ok(PairingError::TooManyAttempts);
        }
        r.status = PairingStatus::Pending;
        self.store.apply(&[r.put()?])?;
        Ok(PairingError::InvalidCode {
            attempts_left: r.attempts_left,
        })
    }
}

#[cfg(test)]
mod tests;
pub mod web;
