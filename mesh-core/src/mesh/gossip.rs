//! Broadcast messages (R-MESH3): signed by their origin, deduplicated by
//! (origin, id), limited in hops, and the bounded caches that deduplicate
//! and answer lazy-push requests.
//!
//! The origin signs the topic, the body, the message id, when it was sent
//! and the hop limit. Relays add one to `hops`, which is not signed: a relay
//! that resets it only makes the message travel further among honest
//! members, and deduplication still delivers it once to each. A message
//! older than the deduplication horizon is refused, so an old message
//! replayed after its key left the cache is not delivered twice.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::identity::{NodeId, NodeKey};

const GOSSIP_TAG: &[u8] = b"mesh-sdk/gossip/v1";

/// The longest topic, in bytes.
pub const MAX_TOPIC_LEN: usize = 128;
/// The largest body of one broadcast, in bytes.
pub const MAX_BODY_LEN: usize = 64 * 1024;
/// Topics starting with this are the mesh's own (blocklist, leave); an app
/// cannot broadcast on them.
pub const RESERVED_PREFIX: &str = "$mesh/";

/// What identifies one broadcast everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageKey {
    /// Who sent it first.
    pub origin: NodeId,
    /// Chosen at random by the origin.
    pub id: u64,
}

/// One broadcast as it travels.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GossipMessage {
    /// Origin and id.
    pub key: MessageKey,
    /// The topic subscribers listen on.
    pub topic: String,
    /// When the origin sent it.
    pub sent_at: Timestamp,
    /// How many relays it may take (signed).
    pub max_hops: u8,
    /// How many it took so far (not signed).
    pub hops: u8,
    /// The payload.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    #[serde(with = "serde_bytes")]
    sig: [u8; 64],
}

impl fmt::Debug for GossipMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GossipMessage")
            .field("key", &self.key)
            .field("topic", &self.topic)
            .field("sent_at", &self.sent_at)
            .field("hops", &self.hops)
            .field("max_hops", &self.max_hops)
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// Why a broadcast cannot be sent or is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GossipError {
    /// The topic is empty, too long, or reserved.
    #[error(
        "a topic is 1 to {MAX_TOPIC_LEN} bytes, without control characters, not starting with {RESERVED_PREFIX}"
    )]
    BadTopic,
    /// The body is too large.
    #[error("a broadcast body is at most {MAX_BODY_LEN} bytes, this one has {0}")]
    TooLarge(usize),
    /// The origin's signature does not verify.
    #[error("the broadcast's signature is not its origin's")]
    BadSignature,
}

/// Whether an app may broadcast on `topic`.
pub fn valid_app_topic(topic: &str) -> bool {
    valid_topic(topic) && !topic.starts_with(RESERVED_PREFIX)
}

fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= MAX_TOPIC_LEN && !topic.chars().any(char::is_control)
}

impl GossipMessage {
    /// A new message from `key`'s node, signed.
    pub fn sign(
        key: &NodeKey,
        id: u64,
        topic: &str,
        body: Vec<u8>,
        sent_at: Timestamp,
        max_hops: u8,
    ) -> Result<Self, GossipError> {
        if !valid_topic(topic) {
            return Err(GossipError::BadTopic);
        }
        if body.len() > MAX_BODY_LEN {
            return Err(GossipError::TooLarge(body.len()));
        }
        let key_ = MessageKey {
            origin: key.node_id(),
            id,
        };
        let sig = key.sign(&signed_bytes(&key_, topic, sent_at, max_hops, &body));
        Ok(GossipMessage {
            key: key_,
            topic: topic.to_owned(),
            sent_at,
            max_hops,
            hops: 0,
            body,
            sig,
        })
    }

    /// Checks shape and the origin's signature.
    pub fn verify(&self) -> Result<(), GossipError> {
        if !valid_topic(&self.topic) {
            return Err(GossipError::BadTopic);
        }
        if self.body.len() > MAX_BODY_LEN {
            return Err(GossipError::TooLarge(self.body.len()));
        }
        self.key
            .origin
            .verify(
                &signed_bytes(
                    &self.key,
                    &self.topic,
                    self.sent_at,
                    self.max_hops,
                    &self.body,
                ),
                &self.sig,
            )
            .map_err(|_| GossipError::BadSignature)
    }
}

fn signed_bytes(
    key: &MessageKey,
    topic: &str,
    sent_at: Timestamp,
    max_hops: u8,
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(GOSSIP_TAG.len() + 64 + topic.len() + body.len());
    out.extend_from_slice(GOSSIP_TAG);
    out.extend_from_slice(key.origin.as_bytes());
    out.extend_from_slice(&key.id.to_be_bytes());
    out.extend_from_slice(&sent_at.as_millis().to_be_bytes());
    out.push(max_hops);
    out.extend_from_slice(&(topic.len() as u32).to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(body);
    out
}

/// The keys seen lately, bounded in count and age.
#[derive(Debug)]
pub struct SeenCache {
    set: HashSet<MessageKey>,
    order: VecDeque<(Timestamp, MessageKey)>,
    capacity: usize,
    horizon: Duration,
}

impl SeenCache {
    /// At most `capacity` keys, none older than `horizon`.
    pub fn new(capacity: usize, horizon: Duration) -> Self {
        SeenCache {
            set: HashSet::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            horizon,
        }
    }

    /// Whether `key` was seen.
    pub fn contains(&self, key: &MessageKey) -> bool {
        self.set.contains(key)
    }

    /// Remembers `key` as seen at `now`; false if it already was.
    pub fn insert(&mut self, key: MessageKey, now: Timestamp) -> bool {
        self.expire(now);
        if !self.set.insert(key) {
            return false;
        }
        self.order.push_back((now, key));
        while self.order.len() > self.capacity {
            if let Some((_, old)) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }

    fn expire(&mut self, now: Timestamp) {
        while let Some((at, key)) = self.order.front().copied() {
            if now.saturating_duration_since(at) <= self.horizon {
                break;
            }
            self.order.pop_front();
            self.set.remove(&key);
        }
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

/// Recent messages, kept to answer `IWant`, bounded in count and bytes.
#[derive(Debug)]
pub struct MessageStore {
    by_key: HashMap<MessageKey, GossipMessage>,
    order: VecDeque<(Timestamp, MessageKey)>,
    bytes: usize,
    max_messages: usize,
    max_bytes: usize,
    horizon: Duration,
}

impl MessageStore {
    /// At most `max_messages` and `max_bytes` of bodies, none older than
    /// `horizon`.
    pub fn new(max_messages: usize, max_bytes: usize, horizon: Duration) -> Self {
        MessageStore {
            by_key: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            max_messages: max_messages.max(1),
            max_bytes,
            horizon,
        }
    }

    /// Keeps `msg`, dropping the oldest beyond the bounds.
    pub fn insert(&mut self, msg: GossipMessage, now: Timestamp) {
        self.expire(now);
        if self.by_key.contains_key(&msg.key) {
            return;
        }
        self.bytes += msg.body.len();
        self.order.push_back((now, msg.key));
        self.by_key.insert(msg.key, msg);
        while self.order.len() > self.max_messages || self.bytes > self.max_bytes {
            let Some((_, old)) = self.order.pop_front() else {
                break;
            };
            if let Some(m) = self.by_key.remove(&old) {
                self.bytes -= m.body.len();
            }
        }
    }

    fn expire(&mut self, now: Timestamp) {
        while let Some((at, key)) = self.order.front().copied() {
            if now.saturating_duration_since(at) <= self.horizon {
                break;
            }
            self.order.pop_front();
            if let Some(m) = self.by_key.remove(&key) {
                self.bytes -= m.body.len();
            }
        }
    }

    /// A kept message.
    pub fn get(&self, key: &MessageKey) -> Option<&GossipMessage> {
        self.by_key.get(key)
    }

    /// The newest `n` keys, newest first.
    pub fn recent(&mut self, n: usize, now: Timestamp) -> Vec<MessageKey> {
        self.expire(now);
        self.order.iter().rev().take(n).map(|(_, k)| *k).collect()
    }

    /// Messages held.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_verify_and_tampering_is_caught() {
        let key = NodeKey::generate();
        let now = Timestamp::from_millis(1000);
        let msg = GossipMessage::sign(&key, 9, "chat", b"hi".to_vec(), now, 8).unwrap();
        msg.verify().unwrap();
        let mut relayed = msg.clone();
        relayed.hops = 3;
        relayed.verify().unwrap();
        for tamper in [
            |m: &mut GossipMessage| m.body = b"ho".to_vec(),
            |m: &mut GossipMessage| m.topic = "other".into(),
            |m: &mut GossipMessage| m.max_hops = 200,
            |m: &mut GossipMessage| m.key.id = 10,
            |m: &mut GossipMessage| m.sent_at = Timestamp::from_millis(5),
        ] {
            let mut bad = msg.clone();
            tamper(&mut bad);
            assert_eq!(bad.verify(), Err(GossipError::BadSignature));
        }
        assert_eq!(
            GossipMessage::sign(&key, 1, "", vec![], now, 8).unwrap_err(),
            GossipError::BadTopic
        );
        assert!(matches!(
            GossipMessage::sign(&key, 1, "t", vec![0; MAX_BODY_LEN + 1], now, 8),
            Err(GossipError::TooLarge(_))
        ));
        assert!(!valid_app_topic("$mesh/block"));
    }

    #[test]
    fn caches_are_bounded_in_count_age_and_bytes() {
        let origin = NodeKey::generate().node_id();
        let k = |id| MessageKey { origin, id };
        let t = Timestamp::from_millis;
        let mut seen = SeenCache::new(3, Duration::from_secs(10));
        assert!(seen.insert(k(1), t(0)));
        assert!(!seen.insert(k(1), t(0)));
        for id in 2..=4 {
            seen.insert(k(id), t(0));
        }
        assert_eq!(seen.len(), 3);
        assert!(!seen.contains(&k(1)));
        seen.insert(k(5), t(20_000));
        assert_eq!(seen.len(), 1);

        let key = NodeKey::generate();
        let mut store = MessageStore::new(10, 100, Duration::from_secs(10));
        for id in 0..5 {
            let m = GossipMessage::sign(&key, id, "t", vec![0; 40], t(0), 4).unwrap();
            store.insert(m, t(0));
        }
        assert_eq!(store.len(), 2, "100 bytes hold two bodies of 40");
        assert_eq!(store.recent(10, t(0)).len(), 2);
        assert!(store.recent(10, t(20_000)).is_empty());
    }
}
