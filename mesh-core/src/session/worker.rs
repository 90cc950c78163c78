//! The worker's side of the session with its primary, as a sans-IO state
//! machine: the hello with the token and the deadline for the welcome, the
//! heartbeat timer, what the primary may send once the session is open,
//! the device's half of a two-phase token rotation, and how the session
//! ended (which the worker's supervisor turns into "retry" or "stop").
//!
//! ```text
//!  new ──Send(Hello)──▶ AwaitingWelcome ──Welcome──▶ Open ──Bye/lost/end──▶ Closed
//!                             │ deadline, Bye,                │ every interval: Heartbeat
//!                             └ anything else ──▶ Closed      │ TokenRotated: StoreToken
//!                                                             └ stored: Send(TokenStored)
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use zeroize::Zeroizing;

use super::ByeReason;
use crate::clock::Timestamp;
use crate::wire::{Payload, SessionMessage};

/// Event kinds a primary may publish on its workers' buses (its actions'
/// progress); anything else it sends as an event is dropped, so it cannot
/// put arbitrary events on a worker's bus.
pub const PRIMARY_EVENT_KINDS: &[&str] = &[crate::events::kinds::ACTION_UPDATED];

/// How a worker's session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEnd {
    /// The primary said goodbye (or refused the hello) with this reason,
    /// or this side ended it (`Shutdown`).
    Bye(ByeReason),
    /// The connection failed, the welcome did not come in time, or the
    /// primary broke the protocol; `connected` if the session had opened.
    Lost {
        /// Whether the session had opened.
        connected: bool,
        /// What happened, for people.
        error: String,
    },
}

/// A token the primary rotated to, for the driver to store (never printed).
#[derive(Clone, PartialEq, Eq)]
pub struct RotatedToken(Zeroizing<[u8; 32]>);

impl RotatedToken {
    /// The token's bytes.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for RotatedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RotatedToken(<redacted>)")
    }
}

/// What the driver is told to do.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum WorkerOutput {
    /// Send this to the primary.
    Send(Payload),
    /// The welcome came: the session is open (register it, publish
    /// `session.connected`, drop a fallback token kept from a rotation: the
    /// token that opened this session works).
    Opened,
    /// Send a heartbeat now (the driver samples the metrics).
    Heartbeat,
    /// Act on this message of the primary: a command, a command's result,
    /// an event of a kind the primary may publish here.
    Deliver(Payload),
    /// Phase one of a rotation: store this token durably, keeping the
    /// current one as a fallback, then report with
    /// [`WorkerSession::handle_token_stored`]. Nothing is acknowledged
    /// before it is stored.
    StoreToken(RotatedToken),
    /// Send `Bye` (if `send_bye`) and close the connection. Nothing
    /// follows; [`WorkerSession::ended`] says why.
    Close {
        /// Whether to say goodbye first (only when this side ends it).
        send_bye: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    AwaitingWelcome { deadline: Timestamp },
    Open { next_heartbeat: Timestamp },
    Closed,
}

/// The worker's side of one session with its primary.
///
/// Time is whatever the driver passes in, consistently: the node passes a
/// monotonic clock, so a wall-clock jump neither fires nor delays the
/// welcome deadline or a heartbeat.
#[derive(Debug)]
pub struct WorkerSession {
    state: State,
    heartbeat_every: Duration,
    out: VecDeque<WorkerOutput>,
    ended: Option<SessionEnd>,
    /// The digest of a rotated token waiting to be stored (at most one).
    storing: Option<[u8; 32]>,
}

impl WorkerSession {
    /// A session that says hello with `token` now, waits `welcome_timeout`
    /// for the welcome, and once open asks for a heartbeat at once and then
    /// every `heartbeat_every`.
    pub fn new(
        now: Timestamp,
        token: [u8; 32],
        welcome_timeout: Duration,
        heartbeat_every: Duration,
    ) -> Self {
        let mut out = VecDeque::new();
        out.push_back(WorkerOutput::Send(Payload::Session(
            SessionMessage::Hello { token },
        )));
        WorkerSession {
            state: State::AwaitingWelcome {
                deadline: now.saturating_add(welcome_timeout),
            },
            heartbeat_every: heartbeat_every.max(Duration::from_millis(1)),
            out,
            ended: None,
            storing: None,
        }
    }

    /// Whether the session is open (welcomed, not closed).
    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open { .. })
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// How the session ended, once it has.
    pub fn ended(&self) -> Option<&SessionEnd> {
        self.ended.as_ref()
    }

    /// The next thing to do, in order.
    pub fn poll_output(&mut self) -> Option<WorkerOutput> {
        self.out.pop_front()
    }

    /// When [`WorkerSession::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        match self.state {
            State::AwaitingWelcome { deadline } => Some(deadline),
            State::Open { next_heartbeat } => Some(next_heartbeat),
            State::Closed => None,
        }
    }

    /// Time has come to `now`: the welcome is overdue, or a heartbeat is
    /// due (one, however late: a driver that fell behind does not burst).
    pub fn handle_timeout(&mut self, now: Timestamp) {
        match self.state {
            State::AwaitingWelcome { deadline } if now >= deadline => {
                self.close(
                    SessionEnd::Lost {
                        connected: false,
                        error: "no welcome in time".into(),
                    },
                    false,
                );
            }
            State::Open { next_heartbeat } if now >= next_heartbeat => {
                self.out.push_back(WorkerOutput::Heartbeat);
                self.state = State::Open {
                    next_heartbeat: now.saturating_add(self.heartbeat_every),
                };
            }
            _ => {}
        }
    }

    /// A message from the primary, verified by the driver (signed by the
    /// primary, addressed here, fresh).
    pub fn handle_message(&mut self, payload: Payload, now: Timestamp) {
        match self.state {
            State::Closed => {}
            State::AwaitingWelcome { .. } => match payload {
                Payload::Session(SessionMessage::Welcome) => {
                    self.out.push_back(WorkerOutput::Opened);
                    self.state = State::Open {
                        next_heartbeat: now,
                    };
                    self.handle_timeout(now);
                }
                Payload::Session(SessionMessage::Bye { reason }) => {
                    self.close(SessionEnd::Bye(ByeReason::parse(&reason)), false);
                }
                other => self.close(
                    SessionEnd::Lost {
                        connected: false,
                        error: format!("no welcome: {}", other.kind()),
                    },
                    false,
                ),
            },
            State::Open { .. } => match payload {
                Payload::Session(SessionMessage::Bye { reason }) => {
                    self.close(SessionEnd::Bye(ByeReason::parse(&reason)), false);
                }
                // One rotation at a time; the primary waits for the
                // acknowledgement before it starts another.
                Payload::Session(SessionMessage::TokenRotated { token })
                    if self.storing.is_none() =>
                {
                    self.storing = Some(SessionMessage::stored_digest(&token));
                    self.out
                        .push_back(WorkerOutput::StoreToken(RotatedToken(Zeroizing::new(
                            token,
                        ))));
                }
                Payload::Command(_)
                | Payload::CommandResult(_)
                | Payload::ReplicaSync(_)
                | Payload::LedgerSync(_) => {
                    self.out.push_back(WorkerOutput::Deliver(payload));
                }
                Payload::Event(ref event) if PRIMARY_EVENT_KINDS.contains(&event.kind.as_str()) => {
                    self.out.push_back(WorkerOutput::Deliver(payload));
                }
                // Another kind of event, a second welcome, a hello, a
                // heartbeat: nothing a primary sends a worker; dropped.
                _ => {}
            },
        }
    }

    /// The driver stored the rotated token (`true`) or could not (`false`):
    /// only a stored token is acknowledged; an unstored one is not, so the
    /// primary keeps the old token valid and its rotation times out.
    pub fn handle_token_stored(&mut self, stored: bool) {
        let Some(digest) = self.storing.take() else {
            return;
        };
        if stored && self.is_open() {
            self.out.push_back(WorkerOutput::Send(Payload::Session(
                SessionMessage::TokenStored { digest },
            )));
        }
    }

    /// The connection ended under the session.
    pub fn handle_lost(&mut self, error: &str) {
        let connected = self.is_open();
        self.close(
            SessionEnd::Lost {
                connected,
                error: error.to_owned(),
            },
            false,
        );
    }

    /// This side ends the session (the worker stops): goodbye if the session
    /// is open (before the welcome there is no session to leave, and a
    /// primary would read a goodbye in place of the hello's follow-up as a
    /// broken protocol), then close.
    pub fn end(&mut self) {
        let send_bye = self.is_open();
        self.close(SessionEnd::Bye(ByeReason::Shutdown), send_bye);
    }

    fn close(&mut self, end: SessionEnd, send_bye: bool) {
        if self.state == State::Closed {
            return;
        }
        self.state = State::Closed;
        self.ended = Some(end);
        self.out.push_back(WorkerOutput::Close { send_bye });
    }
}
