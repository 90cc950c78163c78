//! Join tokens (R-MESH1): what a member hands out so another node can join
//! the mesh through it.
//!
//! A token is text of at most [`MAX_TOKEN_LEN`] characters, `mj1.` and then
//! base64url (no padding) of:
//!
//! ```text
//!  version 1 │ issuer node id (32) │ expires_at ms (u64 BE) │ secret (16)
//!  │ n ≤ 4 │ n × address (family 4|6, ip, port u16 BE, IPv6: scope id u32 BE)
//!  │ checksum (4: SHA-256 under a tag of its own, of everything before)
//! ```
//!
//! The checksum only catches a mistyped or truncated token early, before
//! anything is dialled; it is no protection (anyone can recompute it). What
//! protects a token is its 128-bit secret, of which the issuer keeps only a
//! hash ([`SecretDigest`]) in its [`JoinTokenRecord`], and the issuer's node
//! id, to which the joiner pins the connection. The issuer judges a
//! presented secret by its own record ([`redeem`]): the token's expiry is
//! only a hint for the joiner.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::Duration;

use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use crate::clock::Timestamp;
use crate::crypto::tagged_sha256;
use crate::identity::{NODE_ID_LEN, NodeId};
use crate::storage::records::JoinTokenRecord;

/// What every token's text starts with (mesh join, version 1).
pub const TOKEN_PREFIX: &str = "mj1.";
/// The longest token text.
pub const MAX_TOKEN_LEN: usize = 256;
/// The most issuer addresses a token carries.
pub const MAX_TOKEN_ADDRESSES: usize = 4;
/// How long a token lives unless its issuer says otherwise.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

const VERSION: u8 = 1;
const SECRET_LEN: usize = 16;
const CHECKSUM_LEN: usize = 4;
const CHECKSUM_TAG: &[u8] = b"mesh-sdk/join-token/v1";
const DIGEST_TAG: &[u8] = b"mesh-sdk/join-secret/v1";

/// A token's 128-bit secret. Never printed; wiped when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinSecret([u8; SECRET_LEN]);

impl JoinSecret {
    /// A fresh random secret.
    pub fn generate() -> Self {
        let mut s = [0u8; SECRET_LEN];
        rand::fill(&mut s[..]);
        JoinSecret(s)
    }

    /// A secret from its bytes (a joiner's proof, as received).
    pub fn from_bytes(bytes: [u8; SECRET_LEN]) -> Self {
        JoinSecret(bytes)
    }

    /// The secret's bytes.
    pub fn expose(&self) -> &[u8; SECRET_LEN] {
        &self.0
    }

    /// What the issuer stores instead of the secret.
    pub fn digest(&self) -> SecretDigest {
        SecretDigest(tagged_sha256(DIGEST_TAG, &self.0))
    }
}

impl Drop for JoinSecret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for JoinSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JoinSecret(<redacted>)")
    }
}

/// SHA-256 of a [`JoinSecret`] under a tag of its own: what the issuer
/// keeps. Its first 8 bytes, in hex, are the token's id.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SecretDigest(pub [u8; 32]);

impl SecretDigest {
    /// The token id this digest names (16 hex characters).
    pub fn token_id(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.0[..8])
    }

    /// Whether `other` is the same digest (in constant time).
    pub fn matches(&self, other: &SecretDigest) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for SecretDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretDigest({}…)", self.token_id())
    }
}

/// A join token: who to join through, where, until when, and the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// The member that issued it (the joiner pins the connection to it).
    pub issuer: NodeId,
    /// Where the issuer listens (at most [`MAX_TOKEN_ADDRESSES`]).
    pub addresses: Vec<SocketAddr>,
    /// When it expires (a hint: the issuer's own record decides).
    pub expires_at: Timestamp,
    secret: JoinSecret,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("issuer", &self.issuer)
            .field("addresses", &self.addresses)
            .field("expires_at", &self.expires_at)
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

/// Why a token's text is not a token (every case is `token_invalid` to a
/// caller: [`TokenError::code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Longer than [`MAX_TOKEN_LEN`].
    #[error("a join token is at most {MAX_TOKEN_LEN} characters, this one {0}")]
    TooLong(usize),
    /// Not `mj1.` and base64url.
    #[error("not a join token (it starts with {TOKEN_PREFIX:?} and is base64url)")]
    NotAToken,
    /// A version this build does not read.
    #[error("join token version {0} is not supported")]
    Version(u8),
    /// Shorter than its contents say, or with bytes after them.
    #[error("the join token is truncated or has bytes after its end")]
    Length,
    /// More than [`MAX_TOKEN_ADDRESSES`] addresses, or none.
    #[error("a join token carries 1 to {MAX_TOKEN_ADDRESSES} addresses, this one {0}")]
    Addresses(usize),
    /// An address family this build does not know.
    #[error("unknown address family {0} in the join token")]
    Family(u8),
    /// The issuer's id is not a valid node id.
    #[error("the join token's issuer is not a valid node id")]
    Issuer,
    /// The checksum does not match: mistyped, truncated or edited.
    #[error("the join token's checksum does not match (mistyped or edited)")]
    Checksum,
}

impl TokenError {
    /// The error kind scripts see (`meshctl mesh join`): always
    /// `token_invalid`.
    pub fn code(&self) -> &'static str {
        "token_invalid"
    }
}

impl JoinToken {
    /// A token of `issuer` at `addresses` with a fresh secret, valid for
    /// `ttl` from `now`. Addresses past [`MAX_TOKEN_ADDRESSES`] are left out.
    pub fn generate(
        issuer: NodeId,
        addresses: &[SocketAddr],
        now: Timestamp,
        ttl: Duration,
    ) -> Self {
        JoinToken {
            issuer,
            addresses: addresses
                .iter()
                .take(MAX_TOKEN_ADDRESSES)
                .copied()
                .collect(),
            expires_at: now.saturating_add(ttl),
            secret: JoinSecret::generate(),
        }
    }

    /// The secret, for the joiner's proof.
    pub fn secret(&self) -> &JoinSecret {
        &self.secret
    }

    /// The token's id (what `meshctl mesh tokens` lists and revokes).
    pub fn id(&self) -> String {
        self.secret.digest().token_id()
    }

    /// Whether the token's own expiry has passed at `now`.
    pub fn is_expired(&self, now: Timestamp) -> bool {
        now >= self.expires_at
    }

    /// The record its issuer keeps: the secret's digest, never the secret.
    pub fn record(&self, created_at: Timestamp) -> JoinTokenRecord {
        let digest = self.secret.digest();
        JoinTokenRecord {
            id: digest.token_id(),
            secret_hash: digest.0,
            issuer: self.issuer,
            created_at,
            expires_at: self.expires_at,
            used_by: None,
            used_at: None,
            revoked_at: None,
        }
    }

    /// The token's text (at most [`MAX_TOKEN_LEN`] characters). It holds
    /// the secret: show it to the person who passes it on, log it nowhere.
    pub fn encode(&self) -> Zeroizing<String> {
        let mut b = Zeroizing::new(Vec::with_capacity(192));
        b.push(VERSION);
        b.extend_from_slice(self.issuer.as_bytes());
        b.extend_from_slice(&self.expires_at.as_millis().to_be_bytes());
        b.extend_from_slice(self.secret.expose());
        let addrs = &self.addresses[..self.addresses.len().min(MAX_TOKEN_ADDRESSES)];
        b.push(addrs.len() as u8);
        for a in addrs {
            match a {
                SocketAddr::V4(v4) => {
                    b.push(4);
                    b.extend_from_slice(&v4.ip().octets());
                    b.extend_from_slice(&v4.port().to_be_bytes());
                }
                SocketAddr::V6(v6) => {
                    b.push(6);
                    b.extend_from_slice(&v6.ip().octets());
                    b.extend_from_slice(&v6.port().to_be_bytes());
                    b.extend_from_slice(&v6.scope_id().to_be_bytes());
                }
            }
        }
        let sum = checksum(&b);
        b.extend_from_slice(&sum);
        let mut text = String::with_capacity(TOKEN_PREFIX.len() + b.len() * 4 / 3 + 4);
        text.push_str(TOKEN_PREFIX);
        text.push_str(&data_encoding::BASE64URL_NOPAD.encode(&b));
        Zeroizing::new(text)
    }

    /// Reads a token's text (surrounding whitespace allowed: tokens are
    /// pasted). Every failure is a typed [`TokenError`].
    pub fn parse(text: &str) -> Result<JoinToken, TokenError> {
        let text = text.trim();
        if text.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong(text.len()));
        }
        let body = text
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(TokenError::NotAToken)?;
        let bytes = Zeroizing::new(
            data_encoding::BASE64URL_NOPAD
                .decode(body.as_bytes())
                .map_err(|_| TokenError::NotAToken)?,
        );
        if bytes.len() < 1 + CHECKSUM_LEN {
            return Err(TokenError::Length);
        }
        let (content, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        if checksum(content)[..] != *sum {
            return Err(TokenError::Checksum);
        }
        let mut r = Reader(content);
        let version = r.u8()?;
        if version != VERSION {
            return Err(TokenError::Version(version));
        }
        let issuer =
            NodeId::from_bytes(&r.array::<NODE_ID_LEN>()?).map_err(|_| TokenError::Issuer)?;
        let expires_at = Timestamp::from_millis(u64::from_be_bytes(r.array()?));
        let secret = JoinSecret::from_bytes(r.array()?);
        let n = usize::from(r.u8()?);
        if n == 0 || n > MAX_TOKEN_ADDRESSES {
            return Err(TokenError::Addresses(n));
        }
        let mut addresses = Vec::with_capacity(n);
        for _ in 0..n {
            addresses.push(match r.u8()? {
                4 => {
                    let ip = Ipv4Addr::from(r.array::<4>()?);
                    SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes(r.array()?))
                }
                6 => {
                    let ip = Ipv6Addr::from(r.array::<16>()?);
                    let port = u16::from_be_bytes(r.array()?);
                    let scope = u32::from_be_bytes(r.array()?);
                    SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope))
                }
                other => return Err(TokenError::Family(other)),
            });
        }
        if !r.0.is_empty() {
            return Err(TokenError::Length);
        }
        Ok(JoinToken {
            issuer,
            addresses,
            expires_at,
            secret,
        })
    }
}

impl std::str::FromStr for JoinToken {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JoinToken::parse(s)
    }
}

fn checksum(content: &[u8]) -> [u8; CHECKSUM_LEN] {
    let h = tagged_sha256(CHECKSUM_TAG, content);
    [h[0], h[1], h[2], h[3]]
}

/// Reads the token's fields in order.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u8(&mut self) -> Result<u8, TokenError> {
        Ok(self.array::<1>()?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], TokenError> {
        if self.0.len() < N {
            return Err(TokenError::Length);
        }
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        let mut out = [0u8; N];
        out.copy_from_slice(head);
        Ok(out)
    }
}

/// Why an issuer refuses a presented secret. The codes are the CLI's error
/// kinds (`meshctl mesh join`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JoinRefusal {
    /// No token of this issuer has this secret (malformed, tampered, or
    /// not ours).
    #[error("the join token is not valid here")]
    Invalid,
    /// Past its expiry.
    #[error("the join token has expired")]
    Expired,
    /// Already used, by another node.
    #[error("the join token has been used")]
    Used,
    /// Revoked by its issuer.
    #[error("the join token has been revoked")]
    Revoked,
}

impl JoinRefusal {
    /// The error kind: `token_invalid`, `token_expired`, `token_used`,
    /// `token_revoked`.
    pub fn code(&self) -> &'static str {
        match self {
            JoinRefusal::Invalid => "token_invalid",
            JoinRefusal::Expired => "token_expired",
            JoinRefusal::Used => "token_used",
            JoinRefusal::Revoked => "token_revoked",
        }
    }

    /// The refusal named by `code`, if it is one.
    pub fn from_code(code: &str) -> Option<JoinRefusal> {
        [
            JoinRefusal::Invalid,
            JoinRefusal::Expired,
            JoinRefusal::Used,
            JoinRefusal::Revoked,
        ]
        .into_iter()
        .find(|r| r.code() == code)
    }
}

/// The issuer's decision on `presented` from `joiner` at `now`, against
/// the record found under the presented secret's token id (`None`: there is
/// none). Returns the record to store (used by `joiner`), or why not.
///
/// The secret is checked first and in constant time, so a wrong one learns
/// nothing of the token's state. A token is single-use, but the node that
/// used it may present it again (its first answer may have been lost): it
/// was authenticated by its key, and gains nothing new.
pub fn redeem(
    record: Option<&JoinTokenRecord>,
    presented: &JoinSecret,
    joiner: NodeId,
    now: Timestamp,
) -> Result<JoinTokenRecord, JoinRefusal> {
    let Some(record) = record else {
        return Err(JoinRefusal::Invalid);
    };
    if !presented
        .digest()
        .matches(&SecretDigest(record.secret_hash))
    {
        return Err(JoinRefusal::Invalid);
    }
    if record.revoked_at.is_some() {
        return Err(JoinRefusal::Revoked);
    }
    match record.used_by {
        Some(by) if by == joiner => return Ok(record.clone()),
        Some(_) => return Err(JoinRefusal::Used),
        None => {}
    }
    if now >= record.expires_at {
        return Err(JoinRefusal::Expired);
    }
    Ok(JoinTokenRecord {
        used_by: Some(joiner),
        used_at: Some(now),
        ..record.clone()
    })
}

#[cfg(test)]
mod tests;
