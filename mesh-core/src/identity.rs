//! Node identity: a long-lived ed25519 key whose public half *is* the node id.
//!
//! * [`NodeKey`] holds the secret. It is zeroized on drop, never printed by
//!   `Debug`, and stored on disk as a PKCS#8 PEM file (`-----BEGIN PRIVATE
//!   KEY-----`, readable by `openssl pkey`) with mode `0600`.
//! * [`NodeId`] is the public key: 32 bytes, printed as 52 lowercase base32
//!   characters, with a short [`Fingerprint`] (`abcd-efgh-ijkl-mnop`, 80 bits)
//!   for people to compare on two screens.
//!
//! The same key also serves X25519 key agreement (the birational map from
//! Edwards to Montgomery form), so a payload can be sealed to a node knowing
//! nothing but its id; see [`crate::crypto`] and `ARCHITECTURE.md` for why
//! that is sound.
//!
//! ```
//! use mesh_core::identity::{NodeId, NodeKey};
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("node.key");
//! let key = NodeKey::generate();
//! key.save(&path)?;
//! let again = NodeKey::load(&path)?;
//! assert_eq!(key.node_id(), again.node_id());
//!
//! let text = key.node_id().to_string();
//! let parsed: NodeId = text.parse()?;
//! assert_eq!(parsed, key.node_id());
//! println!("node {} (fingerprint {})", parsed, parsed.fingerprint());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::LazyLock;

use data_encoding::{Encoding, Specification};
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use x25519_dalek::StaticSecret;

/// Length of a node id in bytes.
pub const NODE_ID_LEN: usize = 32;
/// Length of a node id in its printed (base32) form.
pub const NODE_ID_TEXT_LEN: usize = 52;
/// The largest key file [`NodeKey::load`] reads; a PKCS#8 ed25519 PEM is ~120 bytes.
const MAX_KEY_FILE_LEN: u64 = 16 * 1024;
const PEM_LABEL: &str = "PRIVATE KEY";
/// DER of the ed25519 algorithm identifier's OID (1.3.101.112).
const ED25519_OID_DER: [u8; 5] = [0x06, 0x03, 0x2b, 0x65, 0x70];

/// Lowercase RFC 4648 base32 without padding; decoding also accepts uppercase.
static BASE32: LazyLock<Encoding> = LazyLock::new(|| {
    let mut spec = Specification::new();
    spec.symbols.push_str("abcdefghijklmnopqrstuvwxyz234567");
    spec.translate.from.push_str("ABCDEFGHIJKLMNOPQRSTUVWXYZ");
    spec.translate.to.push_str("abcdefghijklmnopqrstuvwxyz");
    // The specification is a constant; building it cannot fail.
    #[allow(clippy::expect_used)]
    spec.encoding().expect("valid base32 specification")
});

/// A node's public identity: its ed25519 public key.
///
/// Only keys that are valid curve points of full order are node ids; small-order
/// ("weak") keys are refused at parse time because a signature under them
/// proves nothing.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId([u8; NODE_ID_LEN]);

/// Keys that passed full validation recently, so hot paths (decoding messages
/// from known peers, loading stored records) skip the ~4 µs point
/// decompression. Positive results only: a key enters after it was validated,
/// so the cache cannot make an invalid key acceptable.
///
/// Two generations of `VALIDATED_GENERATION` keys, both allocated once when
/// the first node id is parsed and never grown (7 168 keys fill exactly 8 192
/// hash buckets of 33 bytes: ~540 KB for both): when the young generation is
/// full it becomes the old one and the previous old one is cleared for reuse.
/// So up to 14 336 hot keys stay, memory is fixed, and decoding never
/// allocates for the memo. A flood of fresh keys only makes
/// every lookup a full validation, as without the cache.
struct ValidatedKeys {
    young: std::collections::HashSet<[u8; NODE_ID_LEN]>,
    old: std::collections::HashSet<[u8; NODE_ID_LEN]>,
}

const VALIDATED_GENERATION: usize = 7_168;

static VALIDATED: LazyLock<std::sync::RwLock<ValidatedKeys>> = LazyLock::new(|| {
    std::sync::RwLock::new(ValidatedKeys {
        young: std::collections::HashSet::with_capacity(VALIDATED_GENERATION),
        old: std::collections::HashSet::with_capacity(VALIDATED_GENERATION),
    })
});

fn recently_validated(bytes: &[u8; NODE_ID_LEN]) -> bool {
    VALIDATED
        .read()
        .map(|v| v.young.contains(bytes) || v.old.contains(bytes))
        .unwrap_or(false)
}

fn remember_validated(bytes: &[u8; NODE_ID_LEN]) {
    if let Ok(mut v) = VALIDATED.write() {
        if v.young.len() >= VALIDATED_GENERATION {
            let keys = &mut *v;
            std::mem::swap(&mut keys.young, &mut keys.old);
            keys.young.clear(); // keeps its allocation
        }
        v.young.insert(*bytes);
    }
}

impl NodeId {
    /// Checks and wraps a raw public key: it must be a curve point of full
    /// order. (Recently validated keys are recognised without recomputation.)
    pub fn from_bytes(bytes: &[u8; NODE_ID_LEN]) -> Result<Self, NodeIdError> {
        if recently_validated(bytes) {
            return Ok(NodeId(*bytes));
        }
        let key = VerifyingKey::from_bytes(bytes).map_err(|_| NodeIdError::NotOnCurve)?;
        if key.is_weak() {
            return Err(NodeIdError::WeakKey);
        }
        remember_validated(bytes);
        Ok(NodeId(*bytes))
    }

    /// The raw 32-byte public key.
    pub fn as_bytes(&self) -> &[u8; NODE_ID_LEN] {
        &self.0
    }

    /// The short, human-comparable fingerprint of this id.
    pub fn fingerprint(&self) -> Fingerprint {
        let digest = crate::crypto::tagged_sha256(b"mesh-sdk/fingerprint/v1", &self.0);
        let mut out = [0u8; FINGERPRINT_LEN];
        out.copy_from_slice(&digest[..FINGERPRINT_LEN]);
        Fingerprint(out)
    }

    /// The ed25519 verifying key. Infallible: validity was checked on construction.
    pub(crate) fn verifying_key(&self) -> VerifyingKey {
        // Checked in `from_bytes`, the only constructor besides `NodeKey::node_id`.
        #[allow(clippy::expect_used)]
        VerifyingKey::from_bytes(&self.0).expect("NodeId holds a checked key")
    }

    /// Verifies an ed25519 signature by this node over `message` (strict RFC 8032 checks).
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> Result<(), SignatureInvalid> {
        self.verifying_key()
            .verify_strict(message, &Signature::from_bytes(signature))
            .map_err(|_| SignatureInvalid)
    }

    /// This node's X25519 public key (the Montgomery form of its ed25519 key).
    pub(crate) fn agreement_key(&self) -> x25519_dalek::PublicKey {
        x25519_dalek::PublicKey::from(self.verifying_key().to_montgomery().to_bytes())
    }
}

/// A signature did not verify under the claimed node's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("signature does not verify under the claimed node id")]
pub struct SignatureInvalid;

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE32.encode(&self.0))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.fingerprint())
    }
}

impl FromStr for NodeId {
    type Err = NodeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() != NODE_ID_TEXT_LEN {
            return Err(NodeIdError::Length { found: s.len() });
        }
        let mut bytes = [0u8; NODE_ID_LEN];
        BASE32
            .decode_mut(s.as_bytes(), &mut bytes)
            .map_err(|e| NodeIdError::Character {
                position: e.error.position,
            })?;
        NodeId::from_bytes(&bytes)
    }
}

impl Serialize for NodeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            self.0.serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
            s.parse().map_err(D::Error::custom)
        } else {
            let bytes = <[u8; NODE_ID_LEN]>::deserialize(deserializer)?;
            NodeId::from_bytes(&bytes).map_err(D::Error::custom)
        }
    }
}

/// Why a string or byte array is not a node id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NodeIdError {
    /// The text has the wrong length.
    #[error("a node id is {NODE_ID_TEXT_LEN} base32 characters, this one has {found}")]
    Length {
        /// The length found.
        found: usize,
    },
    /// A character outside the base32 alphabet (a–z, 2–7), or non-zero trailing bits.
    #[error("invalid base32 at position {position} of the node id (allowed: a-z, 2-7)")]
    Character {
        /// Byte offset of the first bad character.
        position: usize,
    },
    /// The bytes are not the encoding of a point on the ed25519 curve.
    #[error("not an ed25519 public key (the bytes are not a curve point)")]
    NotOnCurve,
    /// A small-order point: anyone can sign for it.
    #[error("refusing a weak (small-order) ed25519 public key")]
    WeakKey,
}

const FINGERPRINT_LEN: usize = 10;

/// A short digest of a [`NodeId`] for people to compare, e.g. `k3x9-a7bq-m2pd-zw4t`.
///
/// 80 bits: enough that nobody can grind a key with a chosen fingerprint.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; FINGERPRINT_LEN]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = BASE32.encode(&self.0);
        for (i, chunk) in text.as_bytes().chunks(4).enumerate() {
            if i > 0 {
                f.write_str("-")?;
            }
            // Base32 output is ASCII.
            f.write_str(std::str::from_utf8(chunk).map_err(|_| fmt::Error)?)?;
        }
        Ok(())
    }
}

/// Why a string is not a fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a fingerprint is 16 base32 characters (a-z, 2-7) in groups of 4, e.g. k3x9-a7bq-m2pd-zw4t"
)]
pub struct FingerprintError;

/// Parses `abcd-efgh-ijkl-mnop` (dashes, spaces and colons optional, any case).
impl FromStr for Fingerprint {
    type Err = FingerprintError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > 64 {
            return Err(FingerprintError);
        }
        let text: String = s
            .trim()
            .chars()
            .filter(|c| !matches!(c, '-' | ' ' | ':'))
            .map(|c| c.to_ascii_lowercase())
            .collect();
        let mut out = [0u8; FINGERPRINT_LEN];
        if BASE32.decode_len(text.len()).ok() != Some(FINGERPRINT_LEN) {
            return Err(FingerprintError);
        }
        BASE32
            .decode_mut(text.as_bytes(), &mut out)
            .map_err(|_| FingerprintError)?;
        Ok(Fingerprint(out))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// A node's secret identity key. Zeroized on drop; `Debug` shows only the node id.
pub struct NodeKey {
    signing: SigningKey,
    /// The X25519 form of the same secret, cached for sealing.
    agreement: StaticSecret,
    id: NodeId,
}

impl NodeKey {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        rand::fill(&mut seed[..]);
        Self::from_secret_bytes(&seed)
    }

    /// Rebuilds a key from its 32-byte ed25519 secret (seed).
    pub fn from_secret_bytes(secret: &[u8; 32]) -> Self {
        Self::from_signing(SigningKey::from_bytes(secret))
    }

    fn from_signing(signing: SigningKey) -> Self {
        let agreement = StaticSecret::from(signing.to_scalar_bytes());
        let id = NodeId(signing.verifying_key().to_bytes());
        NodeKey {
            signing,
            agreement,
            id,
        }
    }

    /// The public node id of this key.
    pub fn node_id(&self) -> NodeId {
        self.id
    }

    /// Signs `message` (ed25519, RFC 8032).
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }

    pub(crate) fn agreement_secret(&self) -> &StaticSecret {
        &self.agreement
    }

    /// Loads a key file written by [`NodeKey::save`] (PKCS#8 PEM).
    ///
    /// Refuses files that others can read (any group or world permission bit,
    /// as ssh does), files that are truncated, and files holding another kind
    /// of key or document.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, IdentityError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| IdentityError::io(path, e))?;
        let meta = file.metadata().map_err(|e| IdentityError::io(path, e))?;
        check_permissions(path, &meta)?;
        if meta.len() > MAX_KEY_FILE_LEN {
            return Err(IdentityError::WrongKind {
                path: path.to_owned(),
                found: format!("a {}-byte file, far larger than a key file", meta.len()),
            });
        }
        let mut raw = zeroize::Zeroizing::new(Vec::new());
        file.take(MAX_KEY_FILE_LEN)
            .read_to_end(&mut raw)
            .map_err(|e| IdentityError::io(path, e))?;
        Self::from_pem(&raw).map_err(|kind| kind.at(path))
    }

    /// Parses a PKCS#8 PEM document holding an ed25519 private key.
    pub fn from_pem(raw: &[u8]) -> Result<Self, KeyFileProblem> {
        if raw.iter().all(u8::is_ascii_whitespace) {
            return Err(KeyFileProblem::Truncated("the file is empty"));
        }
        let text = std::str::from_utf8(raw)
            .map_err(|_| KeyFileProblem::WrongKind("binary data, not a PEM text file".into()))?;
        let begin = text
            .find("-----BEGIN ")
            .ok_or_else(|| KeyFileProblem::WrongKind("text without a PEM header".into()))?;
        let after_begin = &text[begin + "-----BEGIN ".len()..];
        let label_end = after_begin
            .find("-----")
            .ok_or(KeyFileProblem::Truncated("the PEM header line is cut off"))?;
        let label = &after_begin[..label_end];
        if label != PEM_LABEL {
            return Err(KeyFileProblem::WrongKind(format!(
                "a PEM \"{label}\" document"
            )));
        }
        let body_and_rest = &after_begin[label_end + 5..];
        let end_marker = format!("-----END {PEM_LABEL}-----");
        let body_end = body_and_rest
            .find(&end_marker)
            .ok_or(KeyFileProblem::Truncated("the PEM footer is missing"))?;
        let body: zeroize::Zeroizing<Vec<u8>> = zeroize::Zeroizing::new(
            body_and_rest[..body_end]
                .bytes()
                .filter(|b| !b.is_ascii_whitespace())
                .collect(),
        );
        let der = zeroize::Zeroizing::new(
            data_encoding::BASE64
                .decode(&body)
                .map_err(|_| KeyFileProblem::Malformed("the PEM body is not valid base64"))?,
        );
        if !der
            .windows(ED25519_OID_DER.len())
            .any(|w| w == ED25519_OID_DER)
        {
            return Err(KeyFileProblem::WrongKind(
                "a private key of another algorithm (expected ed25519)".into(),
            ));
        }
        let signing = SigningKey::from_pkcs8_der(&der).map_err(|_| {
            // An ed25519 PKCS#8 v1 document is 48 bytes; shorter means cut off.
            if der.len() < 48 {
                KeyFileProblem::Truncated("the key data is shorter than an ed25519 key")
            } else {
                KeyFileProblem::Malformed("the PKCS#8 structure is invalid")
            }
        })?;
        Ok(Self::from_signing(signing))
    }

    /// The key as a PKCS#8 PEM document. The returned string is zeroized on drop.
    pub fn to_pem(&self) -> zeroize::Zeroizing<String> {
        // Encoding a valid key into a growable string cannot fail.
        #[allow(clippy::expect_used)]
        self.signing
            .to_pkcs8_pem(LineEnding::LF)
            .expect("PKCS#8 encoding of an ed25519 key")
    }

    /// Writes the key to a new file with mode `0600`, atomically: the file
    /// appears complete or not at all, and is flushed to disk before this returns.
    ///
    /// Refuses to overwrite an existing file (losing an identity is not undoable).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), IdentityError> {
        let path = path.as_ref();
        if path.exists() {
            return Err(IdentityError::AlreadyExists {
                path: path.to_owned(),
            });
        }
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let file_name = path
            .file_name()
            .ok_or_else(|| IdentityError::io(path, io::ErrorKind::InvalidInput.into()))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(file_name);
        tmp_name.push(format!(".tmp{:016x}", rand::random::<u64>()));
        let tmp = dir.join(tmp_name);
        let result = (|| {
            let mut file = secret_file_options().open(&tmp)?;
            file.write_all(self.to_pem().as_bytes())?;
            file.sync_all()?;
            // Hard-link rather than rename: fails if `path` appeared meanwhile.
            match fs::hard_link(&tmp, path) {
                Ok(()) => fs::remove_file(&tmp)?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(e),
                // Filesystems without hard links (FAT, some mounts): rename,
                // after checking again that nothing appeared at `path`.
                Err(_) if !path.exists() => fs::rename(&tmp, path)?,
                Err(e) => return Err(e),
            }
            if let Ok(d) = File::open(&dir) {
                // Persist the directory entry; not every platform allows this.
                let _ = d.sync_all();
            }
            Ok(())
        })();
        result.map_err(|e: io::Error| {
            let _ = fs::remove_file(&tmp);
            if e.kind() == io::ErrorKind::AlreadyExists {
                IdentityError::AlreadyExists {
                    path: path.to_owned(),
                }
            } else {
                IdentityError::io(path, e)
            }
        })
    }

    /// Loads the key at `path`, or generates and saves one if there is no file.
    /// Returns the key and whether it was just created.
    pub fn load_or_generate(path: impl AsRef<Path>) -> Result<(Self, bool), IdentityError> {
        let path = path.as_ref();
        match Self::load(path) {
            Ok(key) => Ok((key, false)),
            Err(IdentityError::NotFound { .. }) => {
                let key = Self::generate();
                key.save(path)?;
                Ok((key, true))
            }
            Err(e) => Err(e),
        }
    }
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeKey")
            .field("node_id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

#[cfg(unix)]
fn secret_file_options() -> OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = OpenOptions::new();
    o.write(true).create_new(true).mode(0o600);
    o
}

#[cfg(not(unix))]
fn secret_file_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.write(true).create_new(true);
    o
}

#[cfg(unix)]
fn check_permissions(path: &Path, meta: &fs::Metadata) -> Result<(), IdentityError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::InsecurePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_permissions(_path: &Path, _meta: &fs::Metadata) -> Result<(), IdentityError> {
    Ok(())
}

/// What is wrong with the contents of a key file (without the path).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileProblem {
    /// The file ends early.
    #[error("truncated: {0}")]
    Truncated(&'static str),
    /// Not an ed25519 private key at all.
    #[error("not an ed25519 node key: found {0}")]
    WrongKind(String),
    /// Looks like a key file but its contents are invalid.
    #[error("malformed: {0}")]
    Malformed(&'static str),
}

impl KeyFileProblem {
    fn at(self, path: &Path) -> IdentityError {
        let path = path.to_owned();
        match self {
            KeyFileProblem::Truncated(why) => IdentityError::Truncated { path, why },
            KeyFileProblem::WrongKind(found) => IdentityError::WrongKind { path, found },
            KeyFileProblem::Malformed(why) => IdentityError::Malformed { path, why },
        }
    }
}

/// Errors loading or saving a node key file. Messages name the file and what to do;
/// none contains key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// No file at that path.
    #[error("no node key at {path}: create one with `meshctl identity init --key {path}`", path = .path.display())]
    NotFound {
        /// The path that was tried.
        path: PathBuf,
    },
    /// Others may read the file, so the key must be assumed leaked.
    #[error("node key {path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`, or make a new key if it may have leaked", path = .path.display())]
    InsecurePermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file ends early (an interrupted copy, a full disk).
    #[error("node key {path} is truncated ({why}); restore it from a backup", path = .path.display())]
    Truncated {
        /// The key file.
        path: PathBuf,
        /// What is missing.
        why: &'static str,
    },
    /// The file holds something other than an ed25519 private key.
    #[error("{path} is not an ed25519 node key: it holds {found}", path = .path.display())]
    WrongKind {
        /// The file.
        path: PathBuf,
        /// What was found instead.
        found: String,
    },
    /// The file is a PEM private key whose contents are invalid.
    #[error("node key {path} is malformed: {why}", path = .path.display())]
    Malformed {
        /// The key file.
        path: PathBuf,
        /// What is invalid.
        why: &'static str,
    },
    /// Saving would overwrite an existing key.
    #[error("{path} already exists; refusing to overwrite a node key", path = .path.display())]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },
    /// Another I/O failure.
    #[error("cannot access node key {path}: {source}", path = .path.display())]
    Io {
        /// The key file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

impl IdentityError {
    fn io(path: &Path, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::NotFound {
            IdentityError::NotFound {
                path: path.to_owned(),
            }
        } else {
            IdentityError::Io {
                path: path.to_owned(),
                source,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write_secret(path: &Path, data: &[u8]) {
        fs::write(path, data).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[test]
    fn fingerprints_parse_back_in_any_usual_spelling() {
        let fp = NodeKey::generate().node_id().fingerprint();
        let text = fp.to_string();
        assert_eq!(text.parse::<Fingerprint>(), Ok(fp));
        assert_eq!(text.to_uppercase().parse::<Fingerprint>(), Ok(fp));
        assert_eq!(text.replace('-', "").parse::<Fingerprint>(), Ok(fp));
        assert_eq!(
            format!(" {} ", text.replace('-', ":")).parse::<Fingerprint>(),
            Ok(fp)
        );
        for bad in [
            "",
            "abcd",
            &text[1..],
            &format!("{text}a"),
            "1111-1111-1111-1111",
            &"a".repeat(100),
        ] {
            assert_eq!(bad.parse::<Fingerprint>(), Err(FingerprintError), "{bad:?}");
        }
    }

    #[test]
    fn save_load_round_trip_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let key = NodeKey::generate();
        key.save(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = NodeKey::load(&path).unwrap();
        assert_eq!(loaded.node_id(), key.node_id());
        assert_eq!(loaded.sign(b"x"), key.sign(b"x"));
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn save_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        NodeKey::generate().save(&path).unwrap();
        let err = NodeKey::generate().save(&path).unwrap_err();
        assert!(matches!(err, IdentityError::AlreadyExists { .. }), "{err}");
    }

    #[test]
    fn load_or_generate_creates_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let (a, created) = NodeKey::load_or_generate(&path).unwrap();
        assert!(created);
        let (b, created) = NodeKey::load_or_generate(&path).unwrap();
        assert!(!created);
        assert_eq!(a.node_id(), b.node_id());
    }

    #[test]
    fn missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = NodeKey::load(dir.path().join("nope.key")).unwrap_err();
        assert!(matches!(err, IdentityError::NotFound { .. }), "{err}");
        assert!(err.to_string().contains("meshctl identity init"));
    }

    #[test]
    fn world_or_group_readable_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        NodeKey::generate().save(&path).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            match NodeKey::load(&path).unwrap_err() {
                IdentityError::InsecurePermissions { mode: m, .. } => assert_eq!(m, mode),
                other => panic!("mode {mode:o}: {other}"),
            }
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        NodeKey::load(&path).unwrap();
    }

    #[test]
    fn truncated_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let pem = NodeKey::generate().to_pem();
        let full = pem.as_bytes();
        // Empty, header cut, footer missing, body cut short.
        let body_cut = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            &data_encoding::BASE64.encode(
                &data_encoding::BASE64
                    .decode(full.split(|b| *b == b'\n').nth(1).unwrap())
                    .unwrap()[..30]
            )
        );
        for data in [
            &b""[..],
            &full[..15],
            &full[..full.len() - 10],
            body_cut.as_bytes(),
        ] {
            write_secret(&path, data);
            let err = NodeKey::load(&path).unwrap_err();
            assert!(
                matches!(err, IdentityError::Truncated { .. }),
                "{:?}: {err}",
                String::from_utf8_lossy(data)
            );
        }
    }

    #[test]
    fn wrong_kinds_of_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        // An X25519 private key in PKCS#8 (OID 1.3.101.110), as openssl writes it.
        let x25519_pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VuBCIEIFDX8U3xWZWnUyVYpJDkPUeQsGdyUzp2gbN4TUzF3Ylr\n-----END PRIVATE KEY-----\n";
        let cases: [&[u8]; 4] = [
            b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n",
            b"\x00\x01\x02\xff binary",
            b"just some text\n",
            x25519_pem.as_bytes(),
        ];
        for data in cases {
            write_secret(&path, data);
            let err = NodeKey::load(&path).unwrap_err();
            assert!(matches!(err, IdentityError::WrongKind { .. }), "{err}");
        }
    }

    #[test]
    fn malformed_body() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        write_secret(
            &path,
            b"-----BEGIN PRIVATE KEY-----\n!!!not base64!!!\n-----END PRIVATE KEY-----\n",
        );
        let err = NodeKey::load(&path).unwrap_err();
        assert!(matches!(err, IdentityError::Malformed { .. }), "{err}");
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let key = NodeKey::from_secret_bytes(&[0x42; 32]);
        let dbg = format!("{key:?}");
        assert!(dbg.contains("<redacted>"));
        let pem = key.to_pem();
        let der_b64 = pem.lines().nth(1).unwrap();
        assert!(!dbg.contains(der_b64));
        assert!(!dbg.contains("4242"));
        assert!(!dbg.contains("66, 66"));
    }

    #[test]
    fn node_id_text_round_trip_and_case() {
        let id = NodeKey::generate().node_id();
        let text = id.to_string();
        assert_eq!(text.len(), NODE_ID_TEXT_LEN);
        assert_eq!(text, text.to_lowercase());
        assert_eq!(text.parse::<NodeId>().unwrap(), id);
        assert_eq!(text.to_uppercase().parse::<NodeId>().unwrap(), id);
        let fp = id.fingerprint().to_string();
        assert_eq!(fp.len(), 19);
        assert_eq!(fp.matches('-').count(), 3);
    }

    #[test]
    fn node_id_parse_errors() {
        let good = NodeKey::generate().node_id().to_string();
        assert_eq!(
            "abc".parse::<NodeId>().unwrap_err(),
            NodeIdError::Length { found: 3 }
        );
        assert_eq!(
            format!("{good}a").parse::<NodeId>().unwrap_err(),
            NodeIdError::Length { found: 53 }
        );
        let mut bad = good.clone().into_bytes();
        bad[7] = b'1';
        assert_eq!(
            String::from_utf8(bad)
                .unwrap()
                .parse::<NodeId>()
                .unwrap_err(),
            NodeIdError::Character { position: 7 }
        );
        // The identity point (small order) encodes as 0x01 followed by zeros.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let text = BASE32.encode(&identity);
        assert_eq!(text.parse::<NodeId>().unwrap_err(), NodeIdError::WeakKey);
        // y = 2 is not on the curve.
        let mut off_curve = [0u8; 32];
        off_curve[0] = 2;
        assert_eq!(
            BASE32.encode(&off_curve).parse::<NodeId>().unwrap_err(),
            NodeIdError::NotOnCurve
        );
    }

    #[test]
    fn validation_memo_never_admits_invalid_keys() {
        // Fill well past two generations with valid keys, interleaving
        // invalid and weak ones: the invalid ones are refused every time.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let mut off_curve = [0u8; 32];
        off_curve[0] = 2;
        for i in 0..(2 * VALIDATED_GENERATION + 10) as u32 {
            let mut seed = [0u8; 32];
            seed[..4].copy_from_slice(&i.to_le_bytes());
            if i % 4096 == 0 {
                assert_eq!(NodeId::from_bytes(&identity), Err(NodeIdError::WeakKey));
                assert_eq!(NodeId::from_bytes(&off_curve), Err(NodeIdError::NotOnCurve));
            }
            let id = NodeKey::from_secret_bytes(&seed).node_id();
            // Twice: once validated, once from the memo; same answer.
            assert_eq!(NodeId::from_bytes(id.as_bytes()), Ok(id));
            assert_eq!(NodeId::from_bytes(id.as_bytes()), Ok(id));
        }
        let v = VALIDATED.read().unwrap();
        assert!(v.young.len() <= VALIDATED_GENERATION && v.old.len() <= VALIDATED_GENERATION);
        // Never grown past the allocation made at start.
        assert!(
            v.young.capacity() < 2 * VALIDATED_GENERATION
                && v.old.capacity() < 2 * VALIDATED_GENERATION
        );
        assert!(!v.young.contains(&identity) && !v.old.contains(&identity));
    }

    #[test]
    fn node_id_serde_forms() {
        let id = NodeKey::generate().node_id();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<NodeId>(&json).unwrap(), id);
        let bin = postcard::to_allocvec(&id).unwrap();
        assert_eq!(bin.len(), 32);
        assert_eq!(postcard::from_bytes::<NodeId>(&bin).unwrap(), id);
        assert!(serde_json::from_str::<NodeId>("\"zz\"").is_err());
    }

    #[test]
    fn signatures_verify_only_for_the_signer() {
        let a = NodeKey::generate();
        let b = NodeKey::generate();
        let sig = a.sign(b"hello");
        assert!(a.node_id().verify(b"hello", &sig).is_ok());
        assert!(a.node_id().verify(b"hellO", &sig).is_err());
        assert!(b.node_id().verify(b"hello", &sig).is_err());
    }
}
