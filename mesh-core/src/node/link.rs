//! Signed messages over an authenticated connection, the replay state of
//! each peer, and the commands awaiting their results.
//!
//! Every message is a signed envelope in a wire frame. A received envelope
//! must verify, must be signed by the node the transport authenticated (a
//! peer cannot speak for another), must be addressed to us, and must pass a
//! replay guard that belongs to that sender alone: a connection that is not
//! yet authenticated at the session level (pairing, the hello) has a small
//! guard of its own; a device's session uses the device's guard, made only
//! once its token passed the gate. Nothing an unpaired key sends touches
//! state that paired devices depend on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::{NodeError, lock};
use crate::clock::Timestamp;
use crate::identity::{NodeId, NodeKey};
use crate::transport::Connection;
use crate::wire::{
    CommandOutcome, DEFAULT_MAX_FRAME_LEN, Destination, Envelope, MessageId, Payload, ReplayConfig,
    ReplayGuard, decode_frame,
};

/// Ids a connection remembers before its session is authenticated (a
/// pairing exchange is a handful of messages).
const PRE_AUTH_REPLAY_CAPACITY: usize = 64;
/// Ids one authenticated peer's guard remembers (its own traffic of one
/// clock-skew window; past that, only this peer's oldest ids are
/// forgotten, and only this peer's older messages are then refused).
const PEER_REPLAY_CAPACITY: usize = 4096;

/// A replay guard for one connection that has not authenticated its session.
pub(crate) fn pre_auth_guard() -> Mutex<ReplayGuard> {
    Mutex::new(ReplayGuard::new(
        ReplayConfig::default().capacity(PRE_AUTH_REPLAY_CAPACITY),
    ))
}

/// The replay guards of authenticated peers, one per sender key. Entries
/// are made only for peers whose session passed the gate (so the table is
/// bounded by the paired devices) and dropped when a device is unpaired or
/// revoked.
#[derive(Debug, Default)]
pub(crate) struct PeerGuards {
    peers: Mutex<HashMap<NodeId, Arc<Mutex<ReplayGuard>>>>,
}

impl PeerGuards {
    /// `peer`'s guard, made on first use.
    pub(crate) fn of(&self, peer: NodeId) -> Arc<Mutex<ReplayGuard>> {
        lock(&self.peers)
            .entry(peer)
            .or_insert_with(|| {
                Arc::new(Mutex::new(ReplayGuard::new(
                    ReplayConfig::default().capacity(PEER_REPLAY_CAPACITY),
                )))
            })
            .clone()
    }

    /// Forgets `peer` (unpaired or revoked).
    pub(crate) fn forget(&self, peer: &NodeId) {
        lock(&self.peers).remove(peer);
    }

    /// Number of peers with a guard.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.peers).len()
    }
}

/// One authenticated session's connection, numbered so that what belongs
/// to an old session (its pending calls) is not confused with a newer one
/// to the same peer.
#[derive(Debug, Clone)]
pub(crate) struct SessionRef {
    pub(crate) id: u64,
    pub(crate) peer: NodeId,
    pub(crate) conn: Arc<dyn Connection>,
    pub(crate) opened_at: Timestamp,
}

/// The open authenticated session with each peer, one per peer (a newer
/// session of the same peer replaces the older, which the caller closes).
/// Entries are made only for peers that passed their role's gate (a
/// primary's paired devices, a worker's primary), so the table is bounded
/// by who may be paired.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    open: Mutex<HashMap<NodeId, SessionRef>>,
}

impl Sessions {
    /// Records `session` as its peer's open one; returns the one it replaced.
    pub(crate) fn insert(&self, session: SessionRef) -> Option<SessionRef> {
        lock(&self.open).insert(session.peer, session)
    }

    /// `peer`'s open session.
    pub(crate) fn get(&self, peer: &NodeId) -> Option<SessionRef> {
        lock(&self.open).get(peer).cloned()
    }

    /// Whether `peer` has an open session.
    pub(crate) fn contains(&self, peer: &NodeId) -> bool {
        lock(&self.open).contains_key(peer)
    }

    /// Removes `peer`'s session, whichever it is.
    pub(crate) fn remove(&self, peer: &NodeId) -> Option<SessionRef> {
        lock(&self.open).remove(peer)
    }

    /// Removes `peer`'s session if it is still session `id` (a newer one
    /// of the same peer stays).
    pub(crate) fn remove_if(&self, peer: &NodeId, id: u64) -> Option<SessionRef> {
        let mut open = lock(&self.open);
        if open.get(peer).is_some_and(|s| s.id == id) {
            open.remove(peer)
        } else {
            None
        }
    }

    /// Removes every session.
    pub(crate) fn drain(&self) -> Vec<SessionRef> {
        lock(&self.open).drain().map(|(_, s)| s).collect()
    }

    /// The open sessions, by peer.
    pub(crate) fn list(&self) -> Vec<super::PeerSession> {
        let mut all: Vec<super::PeerSession> = lock(&self.open)
            .values()
            .map(|s| super::PeerSession {
                peer: s.peer,
                opened_at: s.opened_at,
                addr: s.conn.remote_addr(),
            })
            .collect();
        all.sort_by_key(|s| s.peer);
        all
    }
}

/// Commands sent and awaiting their result, by (peer, command id): only the
/// peer a command went to can complete it, and when that session ends its
/// calls fail at once (`connection_lost`) instead of timing out.
#[derive(Debug, Default)]
pub(crate) struct PendingCalls {
    calls: Mutex<HashMap<(NodeId, MessageId), Waiting>>,
}

/// A call's session number and its waiter.
type Waiting = (u64, oneshot::Sender<CommandOutcome>);

impl PendingCalls {
    /// Registers a call to `peer` on session `session`.
    pub(crate) fn expect(
        &self,
        peer: NodeId,
        session: u64,
        id: MessageId,
    ) -> oneshot::Receiver<CommandOutcome> {
        let (tx, rx) = oneshot::channel();
        lock(&self.calls).insert((peer, id), (session, tx));
        rx
    }

    /// Completes `from`'s call `id`; a result from anyone else, or for no
    /// pending call, is ignored (returns `false`).
    pub(crate) fn complete(&self, from: NodeId, id: MessageId, outcome: CommandOutcome) -> bool {
        match lock(&self.calls).remove(&(from, id)) {
            Some((_, tx)) => tx.send(outcome).is_ok(),
            None => false,
        }
    }

    /// Forgets one call (timed out, or never sent).
    pub(crate) fn forget(&self, peer: NodeId, id: MessageId) {
        lock(&self.calls).remove(&(peer, id));
    }

    /// Fails every call of session `session` to `peer`: their waiters see
    /// the connection lost.
    pub(crate) fn fail_session(&self, peer: NodeId, session: u64) {
        lock(&self.calls).retain(|(p, _), (s, _)| !(*p == peer && *s == session));
    }

    /// Number of calls waiting.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.calls).len()
    }
}

/// Encodes, signs and decodes messages for one node.
#[derive(Debug)]
pub(crate) struct Link {
    key: Arc<NodeKey>,
}

impl Link {
    pub(crate) fn new(key: Arc<NodeKey>) -> Self {
        Link { key }
    }

    pub(crate) fn me(&self) -> NodeId {
        self.key.node_id()
    }

    /// Signs `payload` for `to` and sends it.
    pub(crate) async fn send(
        &self,
        conn: &dyn Connection,
        to: NodeId,
        payload: Payload,
        now: Timestamp,
    ) -> Result<(), NodeError> {
        let frame = Envelope::new(self.me(), Destination::Node(to), now, payload)
            .sign(&self.key)
            .and_then(|e| e.to_frame())
            .map_err(|e| NodeError::Protocol(format!("encoding a message: {e}")))?;
        conn.send(frame).await?;
        Ok(())
    }

    /// Receives the next message from the connection's peer, checked
    /// against `guard` (the peer's own).
    pub(crate) async fn recv(
        &self,
        conn: &dyn Connection,
        guard: &Mutex<ReplayGuard>,
        now: impl Fn() -> Timestamp,
    ) -> Result<Payload, NodeError> {
        self.recv_timed(conn, guard, now).await.map(|(p, _)| p)
    }

    /// Like [`Link::recv`], with the instant the frame came off the
    /// connection (for measuring processing time).
    pub(crate) async fn recv_timed(
        &self,
        conn: &dyn Connection,
        guard: &Mutex<ReplayGuard>,
        now: impl Fn() -> Timestamp,
    ) -> Result<(Payload, std::time::Instant), NodeError> {
        let frame = conn.recv().await?;
        let arrived = std::time::Instant::now();
        let (unverified, used) = decode_frame(&frame, DEFAULT_MAX_FRAME_LEN)
            .map_err(|e| NodeError::Protocol(e.to_string()))?;
        if used != frame.len() {
            return Err(NodeError::Protocol("bytes after the frame".into()));
        }
        // Cheap checks before the signature: the claimed sender must be the
        // authenticated peer.
        if unverified.claimed_from() != conn.remote_node() {
            return Err(NodeError::Protocol(format!(
                "a message signed by {} on {}'s connection",
                unverified.claimed_from(),
                conn.remote_node()
            )));
        }
        let envelope = unverified
            .verify()
            .map_err(|e| NodeError::Protocol(e.to_string()))?;
        let env = envelope.envelope();
        if env.to != Destination::Node(self.me()) {
            return Err(NodeError::Protocol("a message for another node".into()));
        }
        lock(guard)
            .admit(&envelope, now())
            .map_err(|e| NodeError::Protocol(e.to_string()))?;
        Ok((envelope.into_envelope().payload, arrived))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_peer_a_call_went_to_can_complete_it() {
        let calls = PendingCalls::default();
        let (a, b) = (NodeKey::generate().node_id(), NodeKey::generate().node_id());
        let id = MessageId::random();
        let mut rx = calls.expect(a, 1, id);
        assert!(!calls.complete(b, id, CommandOutcome::Ok(crate::wire::JsonText::null())));
        assert!(rx.try_recv().is_err());
        assert_eq!(calls.len(), 1);
        assert!(calls.complete(a, id, CommandOutcome::Ok(crate::wire::JsonText::null())));
        assert!(matches!(rx.try_recv(), Ok(CommandOutcome::Ok(_))));
        assert_eq!(calls.len(), 0);
    }

    #[test]
    fn a_session_ending_fails_its_calls_and_no_others() {
        let calls = PendingCalls::default();
        let a = NodeKey::generate().node_id();
        let mut old = calls.expect(a, 1, MessageId::random());
        let mut new = calls.expect(a, 2, MessageId::random());
        calls.fail_session(a, 1);
        assert!(matches!(
            old.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert!(matches!(
            new.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
    }

    #[test]
    fn peers_have_guards_of_their_own() {
        let guards = PeerGuards::default();
        let (a, b) = (NodeKey::generate(), NodeKey::generate());
        assert!(Arc::ptr_eq(
            &guards.of(a.node_id()),
            &guards.of(a.node_id())
        ));
        assert!(!Arc::ptr_eq(
            &guards.of(a.node_id()),
            &guards.of(b.node_id())
        ));
        assert_eq!(guards.len(), 2);
        guards.forget(&a.node_id());
        assert_eq!(guards.len(), 1);
    }
}
