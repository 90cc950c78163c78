//! The device session as sans-IO state machines (quinn-proto style): inputs
//! come with the time, outputs are queued for the driver to carry out, and
//! timers are asked for with [`DeviceSession::poll_timeout`]. Nothing here
//! touches a socket, a clock or storage: the node's async code receives and
//! verifies messages, asks the registry, and does what the machine says.
//!
//! * [`DeviceSession`] is the primary's side of one device's session: it
//!   waits for the `Hello` (with a deadline), answers `Welcome` once the
//!   token passes, then for every message applies the device's message rate,
//!   says which scope the payload needs ([`required_scope`]), and turns the
//!   gate's answer into an output: deliver it, refuse a command with a typed
//!   code (the session goes on), or end the session with a typed
//!   [`ByeReason`].
//! * [`WorkerSession`] is the worker's side of its session with the
//!   primary: the hello and the welcome deadline, the heartbeat timer, what
//!   a primary may send (commands, results, its actions' news; nothing
//!   else reaches the worker's bus), the device's half of a two-phase token
//!   rotation (store, then acknowledge), and how the session ended
//!   ([`SessionEnd`]).
//! * [`ByeReason`] is the one table of why sessions end, with which of them
//!   are final for a device ([`ByeReason::is_permanent`]).
//!
//! The wire carries the reason as text (`SessionMessage::Bye { reason }`),
//! so a reason this build does not know still arrives as
//! [`ByeReason::Other`].

#[cfg(test)]
mod tests;
mod worker;
#[cfg(test)]
mod worker_tests;

pub use worker::{PRIMARY_EVENT_KINDS, RotatedToken, SessionEnd, WorkerOutput, WorkerSession};

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use crate::clock::Timestamp;
use crate::registry::{AuthError, scopes};
use crate::wire::{MessageId, Payload, SessionMessage};

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ByeReason {
    /// The device is not paired (never, or no longer). Final.
    Unpaired,
    /// The device was revoked. Final.
    Revoked,
    /// The token was refused at the hello. Final once every stored token
    /// was tried.
    BadToken,
    /// The device lacks `presence:write`, which every session needs. Final.
    ScopeMissing,
    /// The token was rotated while the session ran: reconnect with the
    /// current one.
    TokenRotated,
    /// The primary could not read its registry; try again later.
    Storage,
    /// The other side is stopping.
    Shutdown,
    /// A newer session of the same device replaced this one.
    Replaced,
    /// No `Hello` (or no `Welcome`) came in time.
    HelloTimeout,
    /// The peer broke the session protocol (a first message that is not a
    /// `Hello`).
    ProtocolViolation,
    /// A reason this build does not know.
    Other(String),
}

impl ByeReason {
    /// Every reason this build knows, with its wire text.
    pub const KNOWN: [ByeReason; 10] = [
        ByeReason::Unpaired,
        ByeReason::Revoked,
        ByeReason::BadToken,
        ByeReason::ScopeMissing,
        ByeReason::TokenRotated,
        ByeReason::Storage,
        ByeReason::Shutdown,
        ByeReason::Replaced,
        ByeReason::HelloTimeout,
        ByeReason::ProtocolViolation,
    ];

    /// The text on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            ByeReason::Unpaired => "unpaired",
            ByeReason::Revoked => "revoked",
            ByeReason::BadToken => "bad_token",
            ByeReason::ScopeMissing => "scope_missing",
            ByeReason::TokenRotated => "token_rotated",
            ByeReason::Storage => "storage",
            ByeReason::Shutdown => "shutdown",
            ByeReason::Replaced => "replaced",
            ByeReason::HelloTimeout => "hello_timeout",
            ByeReason::ProtocolViolation => "protocol_violation",
            ByeReason::Other(s) => s,
        }
    }

    /// The reason named by `text` (never fails: unknown text is
    /// [`ByeReason::Other`]).
    pub fn parse(text: &str) -> ByeReason {
        ByeReason::KNOWN
            .into_iter()
            .find(|r| r.as_str() == text)
            .unwrap_or_else(|| ByeReason::Other(text.to_owned()))
    }

    /// Whether a device told this should stop trying: only the primary's
    /// signed word that it revoked or unpaired the device, or refused its
    /// token or presence. Everything else is retried with backoff.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            ByeReason::Unpaired
                | ByeReason::Revoked
                | ByeReason::BadToken
                | ByeReason::ScopeMissing
        )
    }

    /// The reason a gate refusal at the hello gives.
    pub fn from_auth(e: &AuthError) -> ByeReason {
        match e {
            AuthError::UnknownDevice(_) => ByeReason::Unpaired,
            AuthError::Revoked { .. } => ByeReason::Revoked,
            AuthError::BadToken(_) | AuthError::MalformedToken => ByeReason::BadToken,
            AuthError::ScopeMissing { .. } => ByeReason::ScopeMissing,
            AuthError::Storage(_) => ByeReason::Storage,
        }
    }
}

impl fmt::Display for ByeReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which scope a device needs for a payload it sends (R-PAIR7): commands
/// need `commands:run`, events `events:write`, everything else
/// (heartbeats, command results, session messages) `presence:write`.
/// (`actions:read` is checked where action news go out to the device;
/// `memories:read` guards nothing yet.)
pub fn required_scope(payload: &Payload) -> &'static str {
    match payload {
        Payload::Command(_) => scopes::COMMANDS_RUN,
        Payload::Event(_) => scopes::EVENTS_WRITE,
        _ => scopes::PRESENCE_WRITE,
    }
}

/// Typed codes a refused command is answered with.
pub mod refusals {
    /// Over the device's message rate.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// The device lacks `commands:run`.
    pub const SCOPE_MISSING: &str = "scope_missing";
}

fn command_id(payload: &Payload) -> Option<MessageId> {
    match payload {
        Payload::Command(cmd) => Some(cmd.command_id),
        _ => None,
    }
}

/// What the driver is told to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send this to the device.
    Send(Payload),
    /// The session is open: the device is now served (publish
    /// `peer.joined`, register the session).
    Opened,
    /// Act on this message of the device (a heartbeat, a command, a
    /// command's result, an event, a token-stored acknowledgement).
    Deliver(Payload),
    /// A message refused without acting on it: a command is answered with
    /// a failure `code` (the session goes on), anything else is dropped.
    Refuse {
        /// The command, if the message was one.
        command_id: Option<MessageId>,
        /// The code ([`refusals`]).
        code: &'static str,
        /// Why, for people.
        message: String,
    },
    /// Send `Bye` with this reason (unless the device said goodbye itself)
    /// and close the connection. Nothing follows.
    Close {
        /// Why.
        reason: ByeReason,
        /// Whether to send a `Bye` first (not when the device left).
        send_bye: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    AwaitingHello { deadline: Timestamp },
    Open,
    Closed,
}

/// The primary's side of one device session.
///
/// The device's message rate is a [`TokenBucket`](crate::limits::TokenBucket) the caller keeps per
/// device, not per session, and takes from in
/// [`DeviceSession::handle_message`]: reconnecting does not refill it.
#[derive(Debug)]
pub struct DeviceSession {
    state: State,
    out: VecDeque<Output>,
}

impl DeviceSession {
    /// A session whose `Hello` must come within `hello_timeout`.
    pub fn new(now: Timestamp, hello_timeout: Duration) -> Self {
        DeviceSession {
            state: State::AwaitingHello {
                deadline: now.saturating_add(hello_timeout),
            },
            out: VecDeque::new(),
        }
    }

    /// Whether the session is open (past the hello, not closed).
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The next thing to do, in order.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`DeviceSession::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        match self.state {
            State::AwaitingHello { deadline } => Some(deadline),
            _ => None,
        }
    }

    /// Time has come to `now`.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        if let State::AwaitingHello { deadline } = self.state
            && now >= deadline
        {
            self.close(ByeReason::HelloTimeout, false);
        }
    }

    /// The connection ended under the session.
    pub fn handle_lost(&mut self) {
        self.state = State::Closed;
    }

    fn close(&mut self, reason: ByeReason, send_bye: bool) {
        if self.state != State::Closed {
            self.state = State::Closed;
            self.out.push_back(Output::Close { reason, send_bye });
        }
    }

    /// The first message, before any token passed: it must be a `Hello`,
    /// whose token the driver checks (`gate`, for `presence:write`) and
    /// passes in. Returns the token to keep for the session's later checks.
    pub fn handle_hello(
        &mut self,
        payload: Payload,
        now: Timestamp,
        gate: impl FnOnce(&[u8; 32]) -> Result<(), AuthError>,
    ) -> Option<[u8; 32]> {
        if !matches!(self.state, State::AwaitingHello { .. }) {
            return None;
        }
        self.handle_timeout(now);
        if self.is_closed() {
            return None;
        }
        let Payload::Session(SessionMessage::Hello { token }) = payload else {
            self.close(ByeReason::ProtocolViolation, false);
            return None;
        };
        match gate(&token) {
            Ok(()) => {
                self.state = State::Open;
                self.out.push_back(Output::Opened);
                self.out
                    .push_back(Output::Send(Payload::Session(SessionMessage::Welcome)));
                Some(token)
            }
            Err(e) => {
                self.close(ByeReason::from_auth(&e), true);
                None
            }
        }
    }

    /// A later message of the open session. `take` takes one token of the
    /// device's message bucket (a [`TokenBucket`](crate::limits::TokenBucket) kept per device, so
    /// reconnecting does not refill it); `gate` checks the device's token
    /// for the scope the payload needs ([`required_scope`]) and is not
    /// called for a message over the rate.
    pub fn handle_message(
        &mut self,
        payload: Payload,
        now: Timestamp,
        take: impl FnOnce(Timestamp) -> bool,
        gate: impl FnOnce(&'static str) -> Result<(), AuthError>,
    ) {
        if !self.is_open() {
            return;
        }
        // Over its rate, a device's messages are dropped before any work;
        // a command among them is told why.
        if !take(now) {
            self.out.push_back(Output::Refuse {
                command_id: command_id(&payload),
                code: refusals::RATE_LIMITED,
                message: "over this device's message rate".into(),
            });
            return;
        }
        let scope = required_scope(&payload);
        match gate(scope) {
            Ok(()) => {}
            // A scope this device lacks refuses that message, not the
            // session (presence:write, which everything else needs, ends it).
            Err(AuthError::ScopeMissing { .. }) if scope != scopes::PRESENCE_WRITE => {
                self.out.push_back(Output::Refuse {
                    command_id: command_id(&payload),
                    code: refusals::SCOPE_MISSING,
                    message: format!("this device lacks the {scope} scope"),
                });
                return;
            }
            // The token passed at the hello, so a bad token now means it was
            // rotated while this session ran: the device reconnects with its
            // current one (never a permanent refusal).
            Err(AuthError::BadToken(_)) => {
                self.close(ByeReason::TokenRotated, true);
                return;
            }
            Err(e) => {
                self.close(ByeReason::from_auth(&e), true);
                return;
            }
        }
        match payload {
            Payload::Session(SessionMessage::Bye { reason }) => {
                // The device left; nothing to answer.
                self.close(ByeReason::parse(&reason), false);
            }
            // A second hello, or a welcome the device has no business
            // sending: ignored.
            Payload::Session(SessionMessage::Hello { .. } | SessionMessage::Welcome) => {}
            other => self.out.push_back(Output::Deliver(other)),
        }
    }

    /// The primary ends the session (`reason`: revoked, unpaired, rotated,
    /// shutdown, replaced).
    pub fn end(&mut self, reason: ByeReason) {
        self.close(reason, true);
    }
}
