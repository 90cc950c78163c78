//! Who is calling: the admin (the dashboard's user, with the admin token)
//! or a web remote (a device, with its device token), and the admin token
//! itself: made on first start in `DATA_DIR/admin.token` (mode 0600) for
//! the user to read, held in memory only as its hash.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use mesh_core::identity::NodeId;
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};

/// Who a socket speaks for.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Principal {
    /// No token yet: only `auth.login` and `devices.request_pairing`.
    Anonymous,
    /// The admin token: every method, while the token it signed in with
    /// is the current one (`generation`).
    Admin {
        /// [`AdminToken::generation`] at sign-in.
        generation: u64,
    },
    /// A web remote: what its scopes allow, checked on every call through
    /// the registry's gate.
    Device {
        /// The device.
        node: NodeId,
        /// Its token, presented again at each check (revocation and
        /// rotation take effect at once).
        token: zeroize::Zeroizing<String>,
    },
}

impl std::fmt::Debug for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Anonymous => f.write_str("Anonymous"),
            Principal::Admin { .. } => f.write_str("Admin"),
            Principal::Device { node, .. } => write!(f, "Device({node})"),
        }
    }
}

fn hash(token: &str) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, token.trim().as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The admin token's hash, and the file it lives in.
pub struct AdminToken {
    path: PathBuf,
    hash: Mutex<[u8; 32]>,
    generation: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminToken")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl AdminToken {
    /// Reads the token at `path`, or makes one there (mode 0600) if there
    /// is none. Only its hash is kept.
    pub fn load_or_create(path: &Path) -> io::Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) if !t.trim().is_empty() => zeroize::Zeroizing::new(t),
            Ok(_) => write_new(path)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => write_new(path)?,
            Err(e) => return Err(e),
        };
        Ok(AdminToken {
            path: path.to_owned(),
            hash: Mutex::new(hash(&text)),
            generation: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// How many times the token was rotated: a socket signed in under an
    /// older generation is refused.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether `presented` is the admin token (compared by hash, in
    /// constant time).
    pub fn check(&self, presented: &str) -> bool {
        let h = hash(presented);
        let mine = *self
            .hash
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        h.iter()
            .zip(mine.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    /// Makes a new token (written to the file first, then it takes
    /// effect); returns it.
    pub fn rotate(&self) -> io::Result<zeroize::Zeroizing<String>> {
        let text = write_new(&self.path)?;
        *self
            .hash
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = hash(&text);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(text)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A fresh token written to `path` (mode 0600, replaced atomically).
fn write_new(path: &Path) -> io::Result<zeroize::Zeroizing<String>> {
    let mut raw = zeroize::Zeroizing::new([0u8; 32]);
    SystemRandom::new()
        .fill(&mut raw[..])
        .map_err(|_| io::Error::other("no randomness from the OS"))?;
    let text = zeroize::Zeroizing::new(hex(&raw[..]));
    let tmp = path.with_extension("token.new");
    {
        use std::io::Write;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut f = options.open(&tmp)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        f.write_all(text.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_private_checked_and_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        let a = AdminToken::load_or_create(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        assert!(a.check(&text) && a.check(text.trim()));
        assert!(!a.check("nope") && !a.check(""));
        // A restart reads the same token.
        assert!(AdminToken::load_or_create(&path).unwrap().check(&text));
        let new = a.rotate().unwrap();
        assert!(a.check(&new) && !a.check(&text));
        assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), new.as_str());
    }
}
