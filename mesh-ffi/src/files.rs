//! Files on [`MeshNode`]: send a file to the primary (a worker) or to a
//! device (the primary), follow transfers through a listener, list and
//! cancel them, and be told of files coming in.

use std::sync::Arc;

use mesh_core::events::Received;
use mesh_core::files::TransferId;
use mesh_core::node::TransferInfo;

use crate::error::MeshError;
use crate::node::{EventSubscription, MeshNode, listener_thread};

/// A file transfer, in or out.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct FileTransfer {
    /// Its id (32 hex digits).
    pub id: String,
    /// The file's BLAKE3 root hash (hex).
    pub hash: String,
    /// Its name (on the receiving side once done: the name it got).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Bytes the receiver holds verified.
    pub received: u64,
    /// `active`, `paused`, `done`, `failed` or `cancelled`.
    pub state: String,
    /// The other node.
    pub peer: String,
    /// `in` or `out`.
    pub direction: String,
    /// Why it failed or was cancelled.
    pub error: Option<String>,
    /// Where the received file is, once done (receiving side).
    pub path: Option<String>,
}

impl From<TransferInfo> for FileTransfer {
    fn from(t: TransferInfo) -> Self {
        FileTransfer {
            id: t.id.to_string(),
            hash: t.hash.to_string(),
            name: t.name,
            size: t.size,
            received: t.received,
            state: t.state.as_str().into(),
            peer: t.peer.to_string(),
            direction: t.direction.as_str().into(),
            error: t.error,
            path: t.path.map(|p| p.display().to_string()),
        }
    }
}

/// Follows transfers, implemented by the app. Called on a thread of its
/// own, one call at a time.
#[uniffi::export(with_foreign)]
pub trait TransferListener: Send + Sync {
    /// A file is coming in (accepted; it is being pulled).
    fn on_incoming(&self, transfer: FileTransfer);
    /// A transfer moved: `bytes` of `total` are at the receiver, verified.
    fn on_progress(&self, id: String, bytes: u64, total: u64);
    /// A transfer ended: done, failed or cancelled (see its state).
    fn on_finished(&self, transfer: FileTransfer);
}

fn transfer_id(text: &str) -> Result<TransferId, MeshError> {
    text.trim()
        .parse()
        .map_err(|_| MeshError::invalid(format!("{text:?} is not a transfer id")))
}

#[uniffi::export(async_runtime = "tokio")]
impl MeshNode {
    /// Sends the file at `path` to `to` (a worker: its primary's node id; the
    /// primary: a device's node id). Returns once the file is hashed and
    /// the transfer stored; it then runs in the background, through
    /// dropped connections and restarts, until the receiver holds every
    /// byte verified.
    pub async fn send_file(&self, path: String, to: String) -> Result<FileTransfer, MeshError> {
        let to = to
            .trim()
            .parse()
            .map_err(|e| MeshError::invalid(format!("node id {to:?}: {e}")))?;
        self.run(move |node| async move { Ok(node.send_file(&path, to).await?.into()) })
            .await
    }

    /// Every transfer this node knows of, oldest first.
    pub fn transfers(&self) -> Result<Vec<FileTransfer>, MeshError> {
        Ok(self
            .node()?
            .transfers()?
            .into_iter()
            .map(Into::into)
            .collect())
    }

    /// Transfer `id` (`MeshError.NotFound` if unknown).
    pub fn transfer(&self, id: String) -> Result<FileTransfer, MeshError> {
        let id = transfer_id(&id)?;
        self.node()?
            .transfer(&id)?
            .map(Into::into)
            .ok_or_else(|| MeshError::NotFound {
                detail: format!("no transfer {id}"),
            })
    }

    /// Cancels transfer `id`; both sides stop.
    pub async fn cancel_transfer(&self, id: String) -> Result<FileTransfer, MeshError> {
        let id = transfer_id(&id)?;
        self.run(move |node| async move { Ok(node.cancel_transfer(id).await?.into()) })
            .await
    }

    /// Waits until transfer `id` has ended (done, failed or cancelled).
    pub async fn wait_transfer(&self, id: String) -> Result<FileTransfer, MeshError> {
        let id = transfer_id(&id)?;
        self.run(move |node| async move { Ok(node.wait_transfer(id).await?.into()) })
            .await
    }

    /// Calls `listener` for files coming in, progress, and transfers that
    /// end, until the subscription is cancelled.
    pub fn subscribe_transfers(
        &self,
        listener: Arc<dyn TransferListener>,
    ) -> Result<Arc<EventSubscription>, MeshError> {
        let node = self.node()?;
        let mut sub = node.subscribe("transfer.*", 1024)?;
        listener_thread("mesh-transfers", move |mut stopped| async move {
            loop {
                let event = tokio::select! {
                    _ = &mut stopped => return,
                    e = sub.recv() => match e {
                        Some(Received::Event(e)) => e,
                        Some(Received::Lagged { .. }) => continue,
                        None => return,
                    },
                };
                let id = event.data["id"].as_str().unwrap_or_default().to_owned();
                let info = || {
                    id.parse::<TransferId>()
                        .ok()
                        .and_then(|i| node.transfer(&i).ok().flatten())
                        .map(FileTransfer::from)
                };
                match event.kind.as_str() {
                    "transfer.progress" => listener.on_progress(
                        id.clone(),
                        event.data["bytes"].as_u64().unwrap_or(0),
                        event.data["total"].as_u64().unwrap_or(0),
                    ),
                    "transfer.incoming" => {
                        if let Some(t) = info() {
                            listener.on_incoming(t);
                        }
                    }
                    "transfer.done" | "transfer.failed" | "transfer.cancelled" => {
                        if let Some(t) = info() {
                            listener.on_finished(t);
                        }
                    }
                    _ => {}
                }
            }
        })
    }

    /// Replaces the scopes of device `device` (the primary), e.g. adding
    /// `files:write` so it may exchange files, or `sync:*`.
    pub fn set_scopes(&self, device: String, scopes: Vec<String>) -> Result<(), MeshError> {
        let device = device
            .trim()
            .parse()
            .map_err(|e| MeshError::invalid(format!("node id {device:?}: {e}")))?;
        let scopes: Vec<&str> = scopes.iter().map(String::as_str).collect();
        self.primary_handle()?.set_scopes(&device, &scopes)?;
        Ok(())
    }
}
