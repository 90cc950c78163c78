//! Web remotes on the primary: browsers that reach it through the
//! WebSocket gateway (R-TRAN4). They pair with a code the browser shows
//! (`pairing::web`), become devices of platform `web` with a token of their
//! own, authenticate every socket with it through the registry's one gate,
//! report their health like heartbeats, and count as online while a socket
//! of theirs is open. The gateway drives these; nothing here knows of
//! WebSockets or JSON-RPC.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

use serde_json::json;
use tokio::sync::oneshot;
use zeroize::Zeroizing;

use super::{NodeError, Primary, lock};
use crate::clock::Timestamp;
use crate::events::kinds;
use crate::identity::{NodeId, NodeKey};
use crate::pairing::web::{WebPairingRequest, WebPairings};
use crate::pairing::{PairingCode, PairingError};
use crate::registry::{DeviceToken, NewDevice, scopes};
use crate::storage::StorageExt;
use crate::storage::records::{DeviceRecord, DiscoveredNodeRecord, HealthSample};
use crate::storage::{Record, StorageError};
use crate::wire::{HealthMetrics, Platform};

/// What the primary keeps of web remotes.
#[derive(Debug, Default)]
pub(crate) struct WebState {
    pairings: WebPairings,
    /// The socket waiting for each request's outcome.
    waiters: HashMap<String, oneshot::Sender<Result<WebGrant, PairingError>>>,
    /// Sockets open per web device.
    online: HashMap<NodeId, usize>,
}

/// A web remote's credentials, given once on approval. The token is
/// `NODE_ID.TOKEN_HEX`; `Debug` hides it.
pub struct WebGrant {
    /// The device it made.
    pub device: NodeId,
    token: Zeroizing<String>,
}

impl WebGrant {
    /// The token the browser presents from now on.
    pub fn token(&self) -> &str {
        &self.token
    }
}

impl fmt::Debug for WebGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebGrant")
            .field("device", &self.device)
            .field("token", &"******")
            .finish()
    }
}

/// The token a web remote presents: its node id and its device token.
pub fn web_token_text(device: &NodeId, token: &DeviceToken) -> Zeroizing<String> {
    Zeroizing::new(format!("{device}.{}", token.to_text().as_str()))
}

/// A web remote's pending request, as the browser holds it.
pub struct WebPairingTicket {
    /// The request's id.
    pub request_id: String,
    code: PairingCode,
    /// When it stops waiting.
    pub expires_at: Timestamp,
    outcome: oneshot::Receiver<Result<WebGrant, PairingError>>,
}

impl fmt::Debug for WebPairingTicket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebPairingTicket")
            .field("request_id", &self.request_id)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl WebPairingTicket {
    /// The code for the browser to show (the user types it at the
    /// dashboard).
    pub fn code(&self) -> &str {
        self.code.as_str()
    }

    /// Waits for the user's decision: the grant, or why not (`Rejected`,
    /// `Expired`, `TooManyAttempts`).
    pub async fn finished(self) -> Result<WebGrant, NodeError> {
        match self.outcome.await {
            Ok(r) => Ok(r?),
            Err(_) => Err(NodeError::Pairing(PairingError::Expired)),
        }
    }
}

/// A device's health as the gateway reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceHealthView {
    /// The device.
    pub device: NodeId,
    /// A session (or, for a web remote, a socket) is open.
    pub online: bool,
    /// Latest score 0–100.
    pub score: Option<u8>,
    /// `healthy`, `degraded`, `offline` or `error`, once reports came.
    pub status: Option<String>,
    /// When the last heartbeat (or report) came.
    pub last_heartbeat: Option<Timestamp>,
    /// The metrics it last reported.
    pub metrics: Option<HealthMetrics>,
}

impl Primary {
    /// A browser asks to pair through the gateway (`devices.request_pairing`):
    /// the request waits for the user, who approves it at the dashboard by
    /// typing the code the browser shows ([`WebPairingTicket::code`]) with
    /// [`Primary::approve_pairing`], like any request. Bounded per address
    /// and in all.
    pub fn request_web_pairing(
        &self,
        device_name: &str,
        device_platform: &str,
        requesting_ip: Option<IpAddr>,
    ) -> Result<WebPairingTicket, NodeError> {
        let now = self.rt.now();
        let (tx, rx) = oneshot::channel();
        let (request, code) = {
            let mut web = lock(&self.rt.primary.web);
            for gone in web.pairings.expire(now) {
                web.waiters.remove(&gone);
            }
            let (request, code) =
                web.pairings
                    .request(device_name, device_platform, requesting_ip, now)?;
            web.waiters.insert(request.request_id.clone(), tx);
            (request, code)
        };
        self.rt.events.publish(
            kinds::PAIRING_REQUEST_RECEIVED,
            now,
            json!({
                "request_id": request.request_id,
                "device_name": request.device_name,
                "platform": "web",
                "web": true,
            }),
        );
        Ok(WebPairingTicket {
            request_id: request.request_id,
            code,
            expires_at: request.expires_at,
            outcome: rx,
        })
    }

    /// Web remotes' pending requests, oldest first (their codes are only
    /// on the browsers).
    pub fn web_pairings(&self) -> Vec<WebPairingRequest> {
        lock(&self.rt.primary.web).pairings.list(self.rt.now())
    }

    /// The browser that asked went away before an answer: its request goes.
    pub fn withdraw_web_pairing(&self, request_id: &str) {
        let mut web = lock(&self.rt.primary.web);
        web.pairings.withdraw(request_id);
        web.waiters.remove(request_id);
    }

    /// Whether `request_id` is a web remote's pending request.
    pub(super) fn is_web_request(&self, request_id: &str) -> bool {
        lock(&self.rt.primary.web)
            .pairings
            .contains(request_id, self.rt.now())
    }

    /// Approves a web remote's request with the code its browser shows:
    /// creates the device (platform `web`, [`scopes::WEB_DEFAULT`]),
    /// recorded in the ledger, and hands the token to the waiting socket.
    pub(super) async fn approve_web_pairing(
        &self,
        request_id: &str,
        code: &str,
    ) -> Result<DeviceRecord, NodeError> {
        let inner = self.rt.clone();
        let code = PairingCode::parse(code)?;
        let now = inner.now();
        let taken = lock(&inner.primary.web)
            .pairings
            .approve(request_id, &code, now);
        let request = match taken {
            Ok(r) => r,
            Err(e) => {
                if matches!(e, PairingError::TooManyAttempts | PairingError::Expired) {
                    let waiter = lock(&inner.primary.web).waiters.remove(request_id);
                    if let Some(w) = waiter {
                        let _ = w.send(Err(match &e {
                            PairingError::Expired => PairingError::Expired,
                            _ => PairingError::TooManyAttempts,
                        }));
                    }
                }
                return Err(e.into());
            }
        };
        let key = NodeKey::generate();
        let new = NewDevice {
            node: key.node_id(),
            device_id: format!("web-{}", key.node_id().fingerprint()),
            name: request.device_name.clone(),
            platform: Platform::Web,
        };
        let committing = inner.clone();
        let made = tokio::task::spawn_blocking(move || {
            let (record, token, writes) =
                committing
                    .registry
                    .prepare_device_scoped(new, scopes::WEB_DEFAULT, now)?;
            committing.registry.commit_new_device(&record, &writes)?;
            Ok::<_, NodeError>((record, token))
        })
        .await
        .map_err(|e| NodeError::Unavailable(format!("pairing did not finish: {e}")))?;
        let (record, token) = match made {
            Ok(m) => m,
            Err(e) => {
                // Nothing was made: the user may approve again.
                lock(&inner.primary.web).pairings.restore(request, code);
                return Err(e);
            }
        };
        let grant = WebGrant {
            device: record.node,
            token: web_token_text(&record.node, &token),
        };
        let waiter = lock(&inner.primary.web).waiters.remove(request_id);
        if let Some(w) = waiter {
            let _ = w.send(Ok(grant));
        }
        inner.events.publish(
            kinds::PAIRING_APPROVED,
            now,
            json!({
                "request_id": request_id,
                "node": record.node.to_string(),
                "device_id": record.device_id,
                "name": record.name,
                "platform": "web",
            }),
        );
        Ok(record)
    }

    /// Rejects a web remote's request; its browser is told.
    pub(super) fn reject_web_pairing(
        &self,
        request_id: &str,
        reason: Option<String>,
    ) -> Result<(), NodeError> {
        let inner = &self.rt;
        let mut web = lock(&inner.primary.web);
        web.pairings.reject(request_id)?;
        if let Some(w) = web.waiters.remove(request_id) {
            let _ = w.send(Err(PairingError::Rejected {
                reason: reason.clone(),
            }));
        }
        drop(web);
        inner.events.publish(
            kinds::PAIRING_REJECTED,
            inner.now(),
            json!({ "request_id": request_id, "reason": reason, "platform": "web" }),
        );
        Ok(())
    }

    /// **The gate for web remotes**: the device a `NODE_ID.TOKEN` token
    /// belongs to, if it is paired, not revoked, the token is its current
    /// one and it holds `scope` (the registry's one check, as for every
    /// other entry point). Blocking (one storage read).
    pub fn authenticate_token(&self, token: &str, scope: &str) -> Result<DeviceRecord, NodeError> {
        let bad = || NodeError::Auth(crate::registry::AuthError::MalformedToken);
        let (node, secret) = token.trim().split_once('.').ok_or_else(bad)?;
        let node: NodeId = node.parse().map_err(|_| bad())?;
        let secret = DeviceToken::from_text(secret).ok_or_else(bad)?;
        Ok(self.rt.registry.check(&node, secret.as_bytes(), scope)?)
    }

    /// Issues a web remote a new token (the old one stops working at once,
    /// and its sockets close on the `device.token_rotated` event). Devices
    /// with node keys rotate over their session instead
    /// ([`Primary::rotate_token`]).
    pub fn rotate_web_token(&self, device: &NodeId) -> Result<WebGrant, NodeError> {
        let inner = &self.rt;
        let record = inner.registry.get(device)?.ok_or(NodeError::Registry(
            crate::registry::RegistryError::UnknownDevice(*device),
        ))?;
        if record.platform != Platform::Web {
            return Err(NodeError::Unavailable(format!(
                "{device} is not a web remote: rotate its token over its session"
            )));
        }
        let token = inner.registry.rotate_token(device, inner.now())?;
        Ok(WebGrant {
            device: *device,
            token: web_token_text(device, &token),
        })
    }

    /// A socket of web remote `device` opened (`true`) or closed: the
    /// device is online while one is open (`device.online` /
    /// `device.offline` on the first and the last).
    pub fn web_socket(&self, device: &NodeId, open: bool) {
        let inner = &self.rt;
        let changed = {
            let mut web = lock(&inner.primary.web);
            let n = web.online.entry(*device).or_insert(0);
            if open {
                *n += 1;
                *n == 1
            } else {
                *n = n.saturating_sub(1);
                let last = *n == 0;
                if last {
                    web.online.remove(device);
                }
                last
            }
        };
        if changed {
            inner.events.publish(
                if open {
                    kinds::DEVICE_ONLINE
                } else {
                    kinds::DEVICE_OFFLINE
                },
                inner.now(),
                json!({ "node": device.to_string(), "platform": "web" }),
            );
        }
    }

    /// Whether web remote `device` has a socket open.
    pub(super) fn web_online(&self, device: &NodeId) -> bool {
        lock(&self.rt.primary.web).online.contains_key(device)
    }

    /// Takes a health report for `device` as a heartbeat (scored, events,
    /// history, the policy's power context): how web remotes, which have
    /// no session, report. The caller checked that the reporter may.
    /// A device the registry does not know is refused
    /// ([`RegistryError::UnknownDevice`](crate::registry::RegistryError::UnknownDevice)).
    /// Blocking (one registry read).
    pub fn report_health(&self, device: &NodeId, metrics: HealthMetrics) -> Result<(), NodeError> {
        let inner = &self.rt;
        let platform = inner
            .registry
            .get(device)?
            .ok_or(crate::registry::RegistryError::UnknownDevice(*device))?
            .platform;
        let now = inner.now();
        lock(&inner.health)
            .ingest(*device, now, &metrics)
            .map_err(|e| NodeError::Protocol(format!("bad health report: {e}")))?;
        lock(&inner.primary.power).insert(
            *device,
            super::primary::PowerContext {
                platform,
                metrics: Some(metrics),
            },
        );
        inner.stats.heartbeat_received();
        Ok(())
    }

    /// Nodes discovery has seen (stored by the discovery book: mDNS, static
    /// peers), newest sighting first. Blocking (one table read).
    pub fn discovered_nodes(&self) -> Result<Vec<DiscoveredNodeRecord>, NodeError> {
        let mut all: Vec<DiscoveredNodeRecord> = self.rt.store.load_all()?;
        all.sort_by_key(|n| std::cmp::Reverse(n.last_discovered));
        Ok(all)
    }

    /// One device's health now.
    pub fn device_health(&self, device: &NodeId) -> Result<DeviceHealthView, NodeError> {
        let inner = &self.rt;
        if inner.registry.get(device)?.is_none() {
            return Err(NodeError::Registry(
                crate::registry::RegistryError::UnknownDevice(*device),
            ));
        }
        let online = inner.sessions.contains(device) || self.web_online(device);
        let (score, status, last) = {
            let health = lock(&inner.health);
            match health.device(device) {
                Some(h) => (
                    h.score(),
                    Some(h.status().as_str().to_owned()),
                    h.last_heartbeat(),
                ),
                None => (None, None, None),
            }
        };
        let metrics = lock(&inner.primary.power)
            .get(device)
            .and_then(|p| p.metrics.clone());
        Ok(DeviceHealthView {
            device: *device,
            online,
            score,
            status,
            last_heartbeat: last,
            metrics,
        })
    }

    /// `device`'s stored health samples taken at or after `since`, oldest
    /// first (one per 15 s, two hours at most). Blocking (one range read).
    pub fn health_history(
        &self,
        device: &NodeId,
        since: Timestamp,
    ) -> Result<Vec<HealthSample>, NodeError> {
        let prefix = format!("{device}:");
        let end = format!("{device};");
        let mut out = Vec::new();
        self.rt.store.scan_range(
            HealthSample::TABLE,
            &prefix,
            &end,
            HealthSample::SLOTS as usize,
            &mut |key, body| {
                let s: HealthSample = crate::storage::decode(key, body)?;
                if s.at >= since {
                    out.push(s);
                }
                Ok::<(), StorageError>(())
            },
        )?;
        out.sort_by_key(|s| s.at);
        Ok(out)
    }
}
