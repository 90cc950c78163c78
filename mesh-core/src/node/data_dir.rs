//! A node's data directory: its identity and its database in one place.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::identity::NodeKey;
use crate::storage::{SqliteStorage, Storage};

use super::{NodeBuilder, NodeConfig, NodeError, RegistryAdmission};
use crate::transport::Transport;

/// The key file in a data directory (mode 0600).
pub const KEY_FILE: &str = "node.key";
/// The SQLite database in a data directory (WAL mode).
pub const DB_FILE: &str = "mesh.db";

/// A node's data directory: `node.key` (its ed25519 identity, created on
/// first use, mode 0600) and `mesh.db` (devices, pairing, policies, actions,
/// ledger). The directory is created with mode 0700.
///
/// Restarting a node from the same directory keeps its identity and state.
/// The directory belongs to one process at a time.
///
/// ```no_run
/// # async fn run(transport: std::sync::Arc<dyn mesh_core::transport::Transport>) -> Result<(), mesh_core::node::NodeError> {
/// use mesh_core::node::{DataDir, NodeConfig, Role};
/// let dir = DataDir::open("/var/lib/my-app/mesh")?;
/// let node = dir
///     .builder(transport, NodeConfig::new(Role::Primary, "desk", "desk-1"))
///     .start()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct DataDir {
    path: PathBuf,
    key: Arc<NodeKey>,
    store: Arc<dyn Storage>,
}

impl std::fmt::Debug for DataDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataDir")
            .field("path", &self.path)
            .field("node", &self.key.node_id())
            .finish_non_exhaustive()
    }
}

impl DataDir {
    /// Opens `path`, creating it, the key and the database as needed.
    pub fn open(path: impl AsRef<Path>) -> Result<DataDir, NodeError> {
        let path = path.as_ref().to_owned();
        create_private_dir(&path)?;
        let (key, _) = NodeKey::load_or_generate(path.join(KEY_FILE))?;
        let store = SqliteStorage::open(path.join(DB_FILE))?;
        Ok(DataDir {
            path,
            key: Arc::new(key),
            store: Arc::new(store),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The node's identity.
    pub fn key(&self) -> Arc<NodeKey> {
        self.key.clone()
    }

    /// The node's storage.
    pub fn store(&self) -> Arc<dyn Storage> {
        self.store.clone()
    }

    /// Who may connect, decided by this directory's registry: give it to
    /// the transport.
    pub fn admission(&self) -> RegistryAdmission {
        RegistryAdmission::new(self.store.clone())
    }

    /// A node builder with this directory's identity and storage.
    pub fn builder(&self, transport: Arc<dyn Transport>, config: NodeConfig) -> NodeBuilder {
        let mut builder = super::Node::builder(self.key(), self.store(), transport, config);
        builder.data_dir = Some(self.path.clone());
        builder.files = Some(super::FilesSettings::new(
            self.path.join(super::files::FILES_DIR),
        ));
        builder
    }
}

fn create_private_dir(path: &Path) -> Result<(), NodeError> {
    let io = |e: std::io::Error| NodeError::DataDir {
        path: path.to_owned(),
        source: e,
    };
    std::fs::create_dir_all(path).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopening_keeps_the_identity() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("node");
        let first = DataDir::open(&path).unwrap().key().node_id();
        let again = DataDir::open(&path).unwrap().key().node_id();
        assert_eq!(first, again);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
    }

    #[test]
    fn a_file_in_the_way_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("file");
        std::fs::write(&path, b"x").unwrap();
        let err = DataDir::open(&path).unwrap_err();
        assert!(matches!(err, NodeError::DataDir { .. }), "{err}");
        assert!(err.to_string().contains("data directory"), "{err}");
    }
}
