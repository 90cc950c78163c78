//! Protocols as a registry: what a node accepts, by ALPN, each with its own
//! admission.
//!
//! The SDK's own protocols are built in: [`Protocol::PAIRING`] (a primary
//! admits any key: pairing is how keys become known) and [`Protocol::MESH`]
//! (the device session: a primary admits paired, unrevoked devices), served
//! by the primary's runtime as handlers like any other. Other
//! layers (membership, files, media, an app's own) register a
//! [`ProtocolHandler`] with [`NodeBuilder::protocol`](super::NodeBuilder::protocol):
//! its [`ProtocolHandler::admit`] is asked during the handshake, before any
//! byte of the connection is read, and [`ProtocolHandler::serve`] then owns
//! the connection. At start the node tells each transport exactly which
//! protocols it serves ([`Transport::serve`](crate::transport::Transport::serve)):
//! a worker, which accepts no pairing and no device sessions, serves only
//! what was registered (nothing by default, so its endpoint refuses every
//! incoming connection).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::identity::NodeId;
use crate::registry::Registry;
use crate::transport::{Admission, Connection, Protocol};

/// Serves one protocol of a node.
#[async_trait]
pub trait ProtocolHandler: Send + Sync + fmt::Debug + 'static {
    /// Whether `peer` may open a connection for this protocol. Called during
    /// the handshake on the transport's task: keep it quick and
    /// non-blocking (a lookup, not I/O).
    fn admit(&self, peer: &NodeId) -> bool;

    /// Serves one admitted connection until it ends. Each connection gets a
    /// task of its own; the handler bounds what a peer can make it hold.
    async fn serve(&self, conn: Arc<dyn Connection>);
}

/// The protocols a node serves: its role's own (the primary's pairing and
/// device sessions, which are handlers like any other) and the registered
/// ones.
#[derive(Debug, Clone, Default)]
pub(super) struct Protocols {
    served: BTreeMap<Protocol, Arc<dyn ProtocolHandler>>,
}

/// Why a protocol cannot be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The SDK serves this one itself.
    #[error("{0} is served by the SDK itself")]
    BuiltIn(Protocol),
    /// Registered twice.
    #[error("{0} is registered twice")]
    Duplicate(Protocol),
}

impl Protocols {
    /// The role's own protocols (`built_in`), then `registered`, which may
    /// not take an ALPN of the SDK's ([`Protocol::PAIRING`],
    /// [`Protocol::MESH`]) whether or not this role serves it.
    pub(super) fn new(
        built_in: Vec<(Protocol, Arc<dyn ProtocolHandler>)>,
        registered: Vec<(Protocol, Arc<dyn ProtocolHandler>)>,
    ) -> Result<Self, ProtocolError> {
        let mut served = BTreeMap::new();
        for (protocol, handler) in built_in {
            served.insert(protocol, handler);
        }
        for (protocol, handler) in registered {
            if protocol == Protocol::PAIRING
                || protocol == Protocol::MESH
                || protocol == crate::mesh::MEMBERSHIP
                || protocol == crate::mesh::JOIN
            {
                return Err(ProtocolError::BuiltIn(protocol));
            }
            if served.insert(protocol, handler).is_some() {
                return Err(ProtocolError::Duplicate(protocol));
            }
        }
        Ok(Protocols { served })
    }

    /// Every protocol served, in ALPN order.
    pub(super) fn list(&self) -> Vec<Protocol> {
        self.served.keys().copied().collect()
    }

    /// Whether any protocol beyond the device protocols is served (those
    /// need [`Transport::serve`](crate::transport::Transport::serve)).
    pub(super) fn any_registered(&self) -> bool {
        self.served
            .keys()
            .any(|p| *p != Protocol::PAIRING && *p != Protocol::MESH)
    }

    /// What serves `protocol`.
    pub(super) fn get(&self, protocol: Protocol) -> Option<&Arc<dyn ProtocolHandler>> {
        self.served.get(&protocol)
    }

    /// The admission the node gives its transports: each protocol's
    /// handler decides; anything not served is refused.
    pub(super) fn admission(&self) -> Arc<dyn Admission> {
        Arc::new(NodeAdmission {
            protocols: self.clone(),
        })
    }
}

#[derive(Debug)]
struct NodeAdmission {
    protocols: Protocols,
}

impl Admission for NodeAdmission {
    fn admit(&self, peer: &NodeId, protocol: Protocol) -> bool {
        self.protocols.get(protocol).is_some_and(|h| h.admit(peer))
    }
}

/// Whether `peer` is a paired device that is not revoked.
pub(super) fn paired(registry: &Registry, peer: &NodeId) -> bool {
    matches!(registry.get(peer), Ok(Some(device)) if device.revoked_at.is_none())
}
