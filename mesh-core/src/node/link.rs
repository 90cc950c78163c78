//! Signed messages over an authenticated connection.
//!
//! Every message is a signed envelope in a wire frame. A received envelope
//! must verify, must be signed by the node the transport authenticated (a
//! peer cannot speak for another), must be addressed to us, and must pass the
//! replay guard.

use std::sync::{Arc, Mutex, PoisonError};

use crate::clock::Timestamp;
use crate::identity::{NodeId, NodeKey};
use crate::transport::Connection;
use crate::wire::{
    DEFAULT_MAX_FRAME_LEN, Destination, Envelope, Payload, ReplayConfig, ReplayGuard, decode_frame,
};

use super::NodeError;

/// Encodes, signs and decodes messages for one node.
#[derive(Debug)]
pub(crate) struct Link {
    key: Arc<NodeKey>,
    replay: Mutex<ReplayGuard>,
}

impl Link {
    pub(crate) fn new(key: Arc<NodeKey>) -> Self {
        Link {
            key,
            replay: Mutex::new(ReplayGuard::new(ReplayConfig::default())),
        }
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

    /// Receives the next message from the connection's peer.
    pub(crate) async fn recv(
        &self,
        conn: &dyn Connection,
        now: impl Fn() -> Timestamp,
    ) -> Result<Payload, NodeError> {
        self.recv_timed(conn, now).await.map(|(p, _)| p)
    }

    /// Like [`Link::recv`], with the instant the frame came off the
    /// connection (for measuring processing time).
    pub(crate) async fn recv_timed(
        &self,
        conn: &dyn Connection,
        now: impl Fn() -> Timestamp,
    ) -> Result<(Payload, std::time::Instant), NodeError> {
        let frame = conn.recv().await?;
        let arrived = std::time::Instant::now();
        let (unverified, used) = decode_frame(&frame, DEFAULT_MAX_FRAME_LEN)
            .map_err(|e| NodeError::Protocol(e.to_string()))?;
        if used != frame.len() {
            return Err(NodeError::Protocol("bytes after the frame".into()));
        }
        let envelope = unverified
            .verify()
            .map_err(|e| NodeError::Protocol(e.to_string()))?;
        let env = envelope.envelope();
        if env.from != conn.remote_node() {
            return Err(NodeError::Protocol(format!(
                "a message signed by {} on {}'s connection",
                env.from,
                conn.remote_node()
            )));
        }
        if env.to != Destination::Node(self.me()) {
            return Err(NodeError::Protocol("a message for another node".into()));
        }
        self.replay
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit(&envelope, now())
            .map_err(|e| NodeError::Protocol(e.to_string()))?;
        Ok((envelope.into_envelope().payload, arrived))
    }
}
