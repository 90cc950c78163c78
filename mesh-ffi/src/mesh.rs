//! The mesh of nodes on [`MeshNode`]: join tokens, joining, the member
//! table, broadcasts and a topic listener, rename, leave, block.

use std::sync::Arc;
use std::time::Duration;

use mesh_core::identity::NodeId;
use mesh_core::mesh::Delivery;
use mesh_core::node::TokenStatus;
use mesh_core::storage::records::JoinTokenRecord;

use crate::error::MeshError;
use crate::node::{EventSubscription, MeshNode, listener_thread};

/// A join token just issued. `token` holds the secret: show it to the
/// person who passes it on, log it nowhere.
#[derive(Clone, uniffi::Record)]
pub struct MeshToken {
    /// The token's text (`mj1.…`, at most 256 characters).
    pub token: String,
    /// Its id (what `mesh_tokens` lists and `revoke_mesh_token` takes).
    pub id: String,
    /// The issuer: this node.
    pub issuer: String,
    /// When it expires, ms since the epoch.
    pub expires_at_ms: u64,
}

impl std::fmt::Debug for MeshToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshToken")
            .field("id", &self.id)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

/// A token this node issued (never its secret).
#[derive(Debug, Clone, uniffi::Record)]
pub struct MeshTokenInfo {
    /// Its id.
    pub id: String,
    /// `active`, `used`, `expired` or `revoked`.
    pub status: String,
    /// Created, ms since the epoch.
    pub created_at_ms: u64,
    /// Expires, ms since the epoch.
    pub expires_at_ms: u64,
    /// The node that joined with it.
    pub used_by: Option<String>,
    /// When it was used.
    pub used_at_ms: Option<u64>,
    /// When it was revoked.
    pub revoked_at_ms: Option<u64>,
}

impl MeshTokenInfo {
    fn of(t: &JoinTokenRecord, now: mesh_core::clock::Timestamp) -> Self {
        MeshTokenInfo {
            id: t.id.clone(),
            status: TokenStatus::of(t, now).as_str().into(),
            created_at_ms: t.created_at.as_millis(),
            expires_at_ms: t.expires_at.as_millis(),
            used_by: t.used_by.map(|n| n.to_string()),
            used_at_ms: t.used_at.map(|t| t.as_millis()),
            revoked_at_ms: t.revoked_at.map(|t| t.as_millis()),
        }
    }
}

/// A member of the mesh, as this node knows it.
#[derive(Debug, Clone, uniffi::Record)]
pub struct MeshPeer {
    /// Its node id.
    pub node_id: String,
    /// Its name.
    pub name: String,
    /// Where it is reached.
    pub addresses: Vec<String>,
    /// `active`, `suspect` or `inactive`.
    pub status: String,
    /// When this node last heard from or of it, ms since the epoch.
    pub last_seen_ms: u64,
    /// When this node first learned of it.
    pub joined_at_ms: u64,
}

/// This node and the members it knows.
#[derive(Debug, Clone, uniffi::Record)]
pub struct MeshPeers {
    /// This node's id.
    pub node_id: String,
    /// Its name in the mesh.
    pub name: String,
    /// The members.
    pub peers: Vec<MeshPeer>,
    /// Nodes blocked from the mesh.
    pub blocked: Vec<String>,
}

/// One broadcast, as a topic listener receives it.
#[derive(Debug, Clone, uniffi::Record)]
pub struct MeshMessage {
    /// Its topic.
    pub topic: String,
    /// The member that sent it.
    pub origin: String,
    /// Its id (unique per origin).
    pub id: u64,
    /// When the origin sent it, ms since the epoch.
    pub sent_at_ms: u64,
    /// Relays it took.
    pub hops: u8,
    /// The payload.
    pub body: Vec<u8>,
}

impl From<Delivery> for MeshMessage {
    fn from(d: Delivery) -> Self {
        MeshMessage {
            topic: d.topic,
            origin: d.key.origin.to_string(),
            id: d.key.id,
            sent_at_ms: d.sent_at.as_millis(),
            hops: d.hops,
            body: d.body,
        }
    }
}

/// Receives broadcasts, implemented by the app. Called on a thread of its
/// own, one message at a time, each message once.
#[uniffi::export(with_foreign)]
pub trait TopicListener: Send + Sync {
    /// One broadcast.
    fn on_message(&self, message: MeshMessage);
}

fn node_id(text: &str) -> Result<NodeId, MeshError> {
    text.trim()
        .parse()
        .map_err(|e| MeshError::invalid(format!("node id {text:?}: {e}")))
}

#[uniffi::export(async_runtime = "tokio")]
impl MeshNode {
    /// Issues a join token valid for `ttl_ms` (default 24 h).
    pub async fn mesh_token(&self, ttl_ms: Option<u64>) -> Result<MeshToken, MeshError> {
        self.run(move |node| async move {
            let t = node.mesh_token(ttl_ms.map(Duration::from_millis)).await?;
            Ok(MeshToken {
                token: t.token.to_string(),
                id: t.id,
                issuer: t.issuer.to_string(),
                expires_at_ms: t.expires_at.as_millis(),
            })
        })
        .await
    }

    /// Joins the mesh through `token`; returns how many members this node
    /// now knows. A refusal is `MeshError::Join` with its code
    /// (`token_invalid`, `token_expired`, `token_used`, `token_revoked`,
    /// `issuer_unreachable`, `join_refused`).
    pub async fn join_mesh(&self, token: String) -> Result<u32, MeshError> {
        self.run(move |node| async move {
            let n = node.join_mesh(&token).await?;
            Ok(u32::try_from(n).unwrap_or(u32::MAX))
        })
        .await
    }

    /// The tokens this node issued, oldest first.
    pub async fn mesh_tokens(&self) -> Result<Vec<MeshTokenInfo>, MeshError> {
        self.run(move |node| async move {
            let now = mesh_core::clock::Clock::now(&mesh_core::clock::SystemClock);
            Ok(node
                .mesh_tokens()
                .await?
                .iter()
                .map(|t| MeshTokenInfo::of(t, now))
                .collect())
        })
        .await
    }

    /// Revokes the token `id`.
    pub async fn revoke_mesh_token(&self, id: String) -> Result<(), MeshError> {
        self.run(move |node| async move {
            node.revoke_mesh_token(&id).await?;
            Ok(())
        })
        .await
    }

    /// This node and the members it knows.
    pub async fn mesh_peers(&self) -> Result<MeshPeers, MeshError> {
        self.run(move |node| async move {
            let view = node.mesh_peers().await?;
            Ok(MeshPeers {
                node_id: view.node.to_string(),
                name: view.name,
                peers: view
                    .peers
                    .iter()
                    .map(|p| MeshPeer {
                        node_id: p.node.to_string(),
                        name: p.name.clone(),
                        addresses: p.addresses.iter().map(ToString::to_string).collect(),
                        status: p.status.as_str().into(),
                        last_seen_ms: p.last_seen.as_millis(),
                        joined_at_ms: p.joined_at.as_millis(),
                    })
                    .collect(),
                blocked: view.blocked.iter().map(|b| b.node.to_string()).collect(),
            })
        })
        .await
    }

    /// Broadcasts `body` (at most 64 KiB) on `topic` to every member;
    /// returns the message's id.
    pub async fn broadcast(&self, topic: String, body: Vec<u8>) -> Result<u64, MeshError> {
        self.run(move |node| async move { Ok(node.mesh_broadcast(&topic, body).await?.id) })
            .await
    }

    /// Calls `listener` with each broadcast on topics matching `pattern`
    /// (`*`, `PREFIX*` or one topic), once each, until the returned
    /// subscription is cancelled or dropped, or the node stops.
    pub fn subscribe_topic(
        &self,
        pattern: String,
        listener: Arc<dyn TopicListener>,
    ) -> Result<Arc<EventSubscription>, MeshError> {
        let mut sub = self.node()?.mesh_subscribe(&pattern, 1024)?;
        listener_thread("mesh-topic", move |mut stopped| async move {
            loop {
                let message = tokio::select! {
                    _ = &mut stopped => return,
                    m = sub.recv() => match m {
                        Some(m) => m,
                        None => return,
                    },
                };
                listener.on_message(message.into());
            }
        })
    }

    /// Takes `name` in the mesh; every member sees `peer.renamed`.
    pub async fn mesh_rename(&self, name: String) -> Result<(), MeshError> {
        self.run(move |node| async move { Ok(node.mesh_rename(&name).await?) })
            .await
    }

    /// Leaves the mesh; every member sees `peer.left`.
    pub async fn mesh_leave(&self) -> Result<(), MeshError> {
        self.run(move |node| async move { Ok(node.mesh_leave().await?) })
            .await
    }

    /// Blocks `node_id` from the whole mesh (recorded in the ledger).
    pub async fn mesh_block(&self, node_id: String, reason: String) -> Result<(), MeshError> {
        let target = self::node_id(&node_id)?;
        self.run(move |node| async move { Ok(node.mesh_block(target, &reason).await?) })
            .await
    }

    /// Lifts a block.
    pub async fn mesh_unblock(&self, node_id: String) -> Result<(), MeshError> {
        let target = self::node_id(&node_id)?;
        self.run(move |node| async move { Ok(node.mesh_unblock(target).await?) })
            .await
    }
}
