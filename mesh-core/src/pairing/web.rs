//! Pairing of web remotes: browsers that reach the primary over its
//! WebSocket gateway and have no node key to run the PAKE with.
//!
//! The browser asks with a name; the primary draws a 6-digit code from the
//! OS CSPRNG and gives it **to the browser**, which shows it. The user, at
//! the primary's dashboard, types the code the browser shows: that proves
//! the request on the dashboard is the one on the screen in front of them,
//! and not one from someone else on the network. On approval the primary
//! creates a device record (platform `web`, a node id of its own drawing)
//! and a device token, which goes to the browser over the socket that
//! asked and is used from then on.
//!
//! What protects the exchange is the gateway's channel (TLS, or loopback),
//! not the code: unlike the PAKE pairing of devices with node keys, an
//! attacker who can read the gateway's traffic can read the code and the
//! token. The code only binds the approval to the right request.
//!
//! Sans-IO: [`WebPairings`] takes requests, codes and the time, and says
//! what to do; the runtime (`node::web`) creates the device and hands the
//! token over.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use subtle::ConstantTimeEq;

use super::{PairingCode, PairingError};
use crate::clock::Timestamp;
use crate::wire::MessageId;

/// Bounds of pending web pairing requests.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WebPairingLimits {
    /// How long a request waits for the user. Default 10 minutes.
    pub expiry: Duration,
    /// Requests pending at once, from everyone. Default 32.
    pub max_pending: usize,
    /// Requests pending at once from one address. Default 4.
    pub per_address: usize,
    /// Wrong codes before a request is void. Default 5.
    pub max_attempts: u8,
}

impl Default for WebPairingLimits {
    fn default() -> Self {
        WebPairingLimits {
            expiry: Duration::from_secs(600),
            max_pending: 32,
            per_address: 4,
            max_attempts: 5,
        }
    }
}

/// A pending request, as the dashboard shows it (no code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebPairingRequest {
    /// Its id (32 hex digits).
    pub request_id: String,
    /// The name the browser gave.
    pub device_name: String,
    /// The platform it says it is (shown only; the device is `web`).
    pub device_platform: String,
    /// The address it asked from, as the gateway saw it.
    pub requesting_ip: Option<IpAddr>,
    /// When it asked.
    pub created_at: Timestamp,
    /// When it stops waiting.
    pub expires_at: Timestamp,
    /// Wrong codes left.
    pub attempts_left: u8,
}

#[derive(Debug)]
struct Pending {
    request: WebPairingRequest,
    code: PairingCode,
}

/// Longest device name kept (bytes).
pub const MAX_NAME_LEN: usize = 64;

/// The pending web pairing requests of a primary.
#[derive(Debug, Default)]
pub struct WebPairings {
    limits: WebPairingLimits,
    pending: HashMap<String, Pending>,
}

impl WebPairings {
    /// No requests; `limits` bound them.
    pub fn new(limits: WebPairingLimits) -> Self {
        WebPairings {
            limits,
            pending: HashMap::new(),
        }
    }

    /// Forgets expired requests; returns their ids.
    pub fn expire(&mut self, now: Timestamp) -> Vec<String> {
        let gone: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.request.expires_at <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            self.pending.remove(id);
        }
        gone
    }

    /// A new request: its record and the code for the browser to show.
    /// Refused (`Invalid`) with an empty or overlong name, or when the
    /// bounds are reached (from that address, or in all).
    pub fn request(
        &mut self,
        device_name: &str,
        device_platform: &str,
        requesting_ip: Option<IpAddr>,
        now: Timestamp,
    ) -> Result<(WebPairingRequest, PairingCode), PairingError> {
        self.expire(now);
        let name = device_name.trim();
        if name.is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
            return Err(PairingError::Invalid(format!(
                "deviceName must be 1 to {MAX_NAME_LEN} bytes of printable text"
            )));
        }
        let platform = device_platform.trim();
        if platform.len() > MAX_NAME_LEN || platform.chars().any(char::is_control) {
            return Err(PairingError::Invalid(format!(
                "devicePlatform must be at most {MAX_NAME_LEN} bytes of printable text"
            )));
        }
        if self.pending.len() >= self.limits.max_pending {
            return Err(PairingError::Busy(format!(
                "{} pairing requests are waiting already",
                self.pending.len()
            )));
        }
        if let Some(ip) = requesting_ip {
            let mine = self
                .pending
                .values()
                .filter(|p| p.request.requesting_ip == Some(ip))
                .count();
            if mine >= self.limits.per_address {
                return Err(PairingError::Busy(format!(
                    "{mine} pairing requests from {ip} are waiting already"
                )));
            }
        }
        let request = WebPairingRequest {
            request_id: MessageId::random().to_string(),
            device_name: name.to_owned(),
            device_platform: if platform.is_empty() {
                "web".to_owned()
            } else {
                platform.to_owned()
            },
            requesting_ip,
            created_at: now,
            expires_at: now.saturating_add(self.limits.expiry),
            attempts_left: self.limits.max_attempts,
        };
        let code = PairingCode::generate();
        let shown = PairingCode::parse(code.as_str())?;
        self.pending.insert(
            request.request_id.clone(),
            Pending {
                request: request.clone(),
                code,
            },
        );
        Ok((request, shown))
    }

    /// Whether `request_id` is a web request (pending, not expired).
    pub fn contains(&self, request_id: &str, now: Timestamp) -> bool {
        self.pending
            .get(request_id)
            .is_some_and(|p| p.request.expires_at > now)
    }

    /// The user typed `code` for `request_id`: the request, taken out, if
    /// it matches. A wrong code costs an attempt (the last one voids the
    /// request); an expired request is gone.
    pub fn approve(
        &mut self,
        request_id: &str,
        code: &PairingCode,
        now: Timestamp,
    ) -> Result<WebPairingRequest, PairingError> {
        let Some(p) = self.pending.get_mut(request_id) else {
            return Err(PairingError::UnknownRequest(request_id.to_owned()));
        };
        if p.request.expires_at <= now {
            self.pending.remove(request_id);
            return Err(PairingError::Expired);
        }
        let same: bool = p
            .code
            .as_str()
            .as_bytes()
            .ct_eq(code.as_str().as_bytes())
            .into();
        if !same {
            p.request.attempts_left = p.request.attempts_left.saturating_sub(1);
            if p.request.attempts_left == 0 {
                self.pending.remove(request_id);
                return Err(PairingError::TooManyAttempts);
            }
            return Err(PairingError::InvalidCode {
                attempts_left: p.request.attempts_left,
            });
        }
        self.pending
            .remove(request_id)
            .map(|p| p.request)
            .ok_or_else(|| PairingError::UnknownRequest(request_id.to_owned()))
    }

    /// Puts back a request taken by [`WebPairings::approve`] whose device
    /// could not be created (storage failed): the user may try again.
    pub fn restore(&mut self, request: WebPairingRequest, code: PairingCode) {
        self.pending
            .insert(request.request_id.clone(), Pending { request, code });
    }

    /// The user rejected `request_id`.
    pub fn reject(&mut self, request_id: &str) -> Result<WebPairingRequest, PairingError> {
        self.pending
            .remove(request_id)
            .map(|p| p.request)
            .ok_or_else(|| PairingError::UnknownRequest(request_id.to_owned()))
    }

    /// The browser went away: its request goes too.
    pub fn withdraw(&mut self, request_id: &str) -> Option<WebPairingRequest> {
        self.pending.remove(request_id).map(|p| p.request)
    }

    /// Pending requests, oldest first.
    pub fn list(&self, now: Timestamp) -> Vec<WebPairingRequest> {
        let mut all: Vec<WebPairingRequest> = self
            .pending
            .values()
            .filter(|p| p.request.expires_at > now)
            .map(|p| p.request.clone())
            .collect();
        all.sort_by(|a, b| (a.created_at, &a.request_id).cmp(&(b.created_at, &b.request_id)));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: u64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    #[test]
    fn the_code_the_browser_shows_approves_its_request_once() {
        let mut w = WebPairings::new(WebPairingLimits::default());
        let (r, code) = w.request("Kitchen tablet", "web", None, t(0)).unwrap();
        assert_eq!(code.as_str().len(), 6);
        assert!(w.contains(&r.request_id, t(1)));
        let got = w.approve(&r.request_id, &code, t(1)).unwrap();
        assert_eq!(got.device_name, "Kitchen tablet");
        assert!(matches!(
            w.approve(&r.request_id, &code, t(2)),
            Err(PairingError::UnknownRequest(_))
        ));
    }

    #[test]
    fn wrong_codes_cost_attempts_and_the_last_voids_the_request() {
        let mut w = WebPairings::new(WebPairingLimits::default());
        let (r, code) = w.request("phone", "", None, t(0)).unwrap();
        let wrong = PairingCode::parse(if code.as_str() == "000000" {
            "000001"
        } else {
            "000000"
        })
        .unwrap();
        for left in (1..5).rev() {
            match w.approve(&r.request_id, &wrong, t(1)) {
                Err(PairingError::InvalidCode { attempts_left }) => assert_eq!(attempts_left, left),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            w.approve(&r.request_id, &wrong, t(1)),
            Err(PairingError::TooManyAttempts)
        ));
        assert!(w.list(t(1)).is_empty());
        assert!(matches!(
            w.approve(&r.request_id, &code, t(1)),
            Err(PairingError::UnknownRequest(_))
        ));
    }

    #[test]
    fn requests_expire_and_are_bounded_per_address_and_in_all() {
        let limits = WebPairingLimits {
            expiry: Duration::from_secs(60),
            max_pending: 5,
            per_address: 2,
            max_attempts: 5,
        };
        let mut w = WebPairings::new(limits);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let (r, code) = w.request("a", "web", Some(ip), t(0)).unwrap();
        w.request("b", "web", Some(ip), t(0)).unwrap();
        assert!(matches!(
            w.request("c", "web", Some(ip), t(0)),
            Err(PairingError::Busy(_))
        ));
        for n in 0..3 {
            w.request(&format!("x{n}"), "web", None, t(0)).unwrap();
        }
        assert!(w.request("full", "web", None, t(0)).is_err());
        // A minute later all are gone, and the code no longer works.
        assert!(matches!(
            w.approve(&r.request_id, &code, t(60_000)),
            Err(PairingError::Expired)
        ));
        assert_eq!(w.expire(t(60_000)).len(), 4, "the other four");
        assert!(w.request("c", "web", Some(ip), t(60_000)).is_ok());
    }

    #[test]
    fn names_are_checked() {
        let mut w = WebPairings::new(WebPairingLimits::default());
        for bad in ["", "   ", "a\nb", &"x".repeat(65)] {
            assert!(
                matches!(
                    w.request(bad, "web", None, t(0)),
                    Err(PairingError::Invalid(_))
                ),
                "{bad:?}"
            );
        }
        assert!(w.request("tab", "web\u{7}", None, t(0)).is_err());
        assert!(w.list(t(0)).is_empty());
    }
}
