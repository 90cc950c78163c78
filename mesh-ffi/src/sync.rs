//! Replicated state on [`MeshNode`]: namespaces shared with every member of
//! the mesh (put, get, delete, scan, a change listener), the replicated
//! configuration (JSON values) and how sync stands with each member.

use std::sync::Arc;

use mesh_core::node::ReplicatedChange;
use mesh_core::sync::Hlc;

use crate::error::MeshError;
use crate::node::{EventSubscription, MeshNode, listener_thread};

/// The version of a replicated value: the stamp of the write that stands.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ReplicaVersion {
    /// `MS.COUNTER` (the hybrid logical clock).
    pub hlc: String,
    /// The node that wrote it.
    pub node: String,
}

impl From<Hlc> for ReplicaVersion {
    fn from(h: Hlc) -> Self {
        ReplicaVersion {
            hlc: h.to_string(),
            node: h.node.to_string(),
        }
    }
}

/// A key, its value and version.
#[derive(Debug, Clone, uniffi::Record)]
pub struct ReplicatedValue {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// Its version.
    pub version: ReplicaVersion,
}

/// A change as a listener receives it.
#[derive(Debug, Clone, uniffi::Record)]
pub struct ReplicaChange {
    /// The namespace.
    pub namespace: String,
    /// The key.
    pub key: String,
    /// The new value; none if the key was deleted.
    pub value: Option<Vec<u8>>,
    /// Its version.
    pub version: ReplicaVersion,
    /// Whether this node made it.
    pub local: bool,
}

impl From<ReplicatedChange> for ReplicaChange {
    fn from(c: ReplicatedChange) -> Self {
        ReplicaChange {
            namespace: c.namespace,
            key: c.key,
            value: c.value,
            version: c.version.into(),
            local: c.local,
        }
    }
}

/// A configuration entry (`value_json` is JSON text).
#[derive(Debug, Clone, uniffi::Record)]
pub struct ConfigEntry {
    /// The key.
    pub key: String,
    /// The value, as JSON text.
    pub value_json: String,
    /// Its version.
    pub version: ReplicaVersion,
}

impl From<mesh_core::node::ConfigEntry> for ConfigEntry {
    fn from(e: mesh_core::node::ConfigEntry) -> Self {
        ConfigEntry {
            key: e.key,
            value_json: e.value.to_string(),
            version: e.version.into(),
        }
    }
}

/// How sync stands with one member.
#[derive(Debug, Clone, uniffi::Record)]
pub struct SyncPeer {
    /// The member.
    pub node_id: String,
    /// When it last sent its vectors or changes, ms since the epoch.
    pub last_sync_ms: Option<u64>,
    /// Changes this node holds that it lacks.
    pub pending: u64,
}

/// Receives changes of a replicated namespace, implemented by the app.
/// Called on a thread of its own, one change at a time, in commit order.
#[uniffi::export(with_foreign)]
pub trait ReplicaListener: Send + Sync {
    /// One change.
    fn on_change(&self, change: ReplicaChange);
}

#[uniffi::export(async_runtime = "tokio")]
impl MeshNode {
    /// Sets `key` of replicated `namespace` to `value`; returns once the
    /// write is durable here (every member gets it then).
    pub async fn replicated_put(
        &self,
        namespace: String,
        key: String,
        value: Vec<u8>,
    ) -> Result<ReplicaVersion, MeshError> {
        self.run(move |node| async move {
            Ok(node.replicated(&namespace)?.put(&key, value).await?.into())
        })
        .await
    }

    /// The value of `key` in `namespace`, if it holds one.
    pub async fn replicated_get(
        &self,
        namespace: String,
        key: String,
    ) -> Result<Option<ReplicatedValue>, MeshError> {
        self.run(move |node| async move {
            Ok(node
                .replicated(&namespace)?
                .get(&key)
                .await?
                .map(|e| ReplicatedValue {
                    key: e.key,
                    value: e.value,
                    version: e.version.into(),
                }))
        })
        .await
    }

    /// Deletes `key` from `namespace`; whether it held a value.
    pub async fn replicated_delete(
        &self,
        namespace: String,
        key: String,
    ) -> Result<bool, MeshError> {
        self.run(move |node| async move {
            Ok(node.replicated(&namespace)?.delete(&key).await?.is_some())
        })
        .await
    }

    /// The keys of `namespace` starting with `prefix` that hold a value,
    /// in key order.
    pub async fn replicated_scan(
        &self,
        namespace: String,
        prefix: String,
    ) -> Result<Vec<ReplicatedValue>, MeshError> {
        self.run(move |node| async move {
            Ok(node
                .replicated(&namespace)?
                .scan(&prefix)
                .await?
                .into_iter()
                .map(|e| ReplicatedValue {
                    key: e.key,
                    value: e.value,
                    version: e.version.into(),
                })
                .collect())
        })
        .await
    }

    /// Calls `listener` with each change of `namespace` as it commits here
    /// (local ones and members'), until the returned subscription is
    /// cancelled or dropped, or the node stops.
    pub fn subscribe_replicated(
        &self,
        namespace: String,
        listener: Arc<dyn ReplicaListener>,
    ) -> Result<Arc<EventSubscription>, MeshError> {
        let mut sub = self.node()?.replicated(&namespace)?.subscribe(1024)?;
        listener_thread("mesh-replica", move |mut stopped| async move {
            loop {
                let change = tokio::select! {
                    _ = &mut stopped => return,
                    c = sub.recv() => match c {
                        Some(c) => c,
                        None => return,
                    },
                };
                listener.on_change(change.into());
            }
        })
    }

    /// Sets configuration key `key` to `value_json` (JSON text), shared
    /// with every member.
    pub async fn mesh_config_set(
        &self,
        key: String,
        value_json: String,
    ) -> Result<ConfigEntry, MeshError> {
        let value: serde_json::Value = serde_json::from_str(&value_json)
            .map_err(|e| MeshError::invalid(format!("value is not JSON: {e}")))?;
        self.run(move |node| async move { Ok(node.config_set(&key, value).await?.into()) })
            .await
    }

    /// Configuration key `key` (`MeshError.NotFound` if unset).
    pub async fn mesh_config_get(&self, key: String) -> Result<ConfigEntry, MeshError> {
        self.run(move |node| async move { Ok(node.config_get(&key).await?.into()) })
            .await
    }

    /// Configuration keys starting with `prefix`, sorted.
    pub async fn mesh_config_list(&self, prefix: String) -> Result<Vec<ConfigEntry>, MeshError> {
        self.run(move |node| async move {
            Ok(node
                .config_list(&prefix)
                .await?
                .into_iter()
                .map(Into::into)
                .collect())
        })
        .await
    }

    /// How sync stands with each reachable member.
    pub async fn sync_status(&self) -> Result<Vec<SyncPeer>, MeshError> {
        self.run(move |node| async move {
            Ok(node
                .sync_status()
                .await?
                .into_iter()
                .map(|p| SyncPeer {
                    node_id: p.node.to_string(),
                    last_sync_ms: p.last_sync.map(|t| t.as_millis()),
                    pending: p.pending as u64,
                })
                .collect())
        })
        .await
    }
}
