//! Finding nodes (R-DISC1–2): the [`Discovery`] trait and the
//! [`DiscoveryBook`] that every implementation records its sightings in.
//!
//! Implementations live in `mesh-transport` (mDNS, static peers). They turn
//! what they see into [`Sighting`]s and hand them to a shared book, which
//! merges repeated reports of one appearance, counts appearances, links paired
//! devices, persists [`DiscoveredNodeRecord`]s through the [`Storage`] traits
//! and publishes [`kinds::DISCOVERY_FOUND`] / [`kinds::DISCOVERY_LOST`] events.
//! The book is sans-IO: time is passed in.
//!
//! Advertisements are unauthenticated hints. Connecting pins the node id
//! (see [`crate::transport`]), so a forged advertisement costs a refused
//! connection, nothing more; the book bounds what a flood of them can store.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;

use crate::clock::Timestamp;
use crate::events::{EventBus, kinds};
use crate::identity::NodeId;
use crate::storage::records::{DeviceRecord, DiscoveredNodeRecord};
use crate::storage::{Storage, StorageError, StorageExt};

/// Addresses kept per node; further ones in one appearance are ignored.
pub const MAX_ADDRESSES: usize = 16;
/// Nodes kept by default; beyond this the least recently seen unpaired node
/// is forgotten.
pub const DEFAULT_MAX_NODES: usize = 1024;

/// What a discovery mechanism reports about one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sighting {
    /// The advertised node id.
    pub node: NodeId,
    /// Advertised display name.
    pub name: String,
    /// Advertised platform.
    pub platform: Option<String>,
    /// Advertised SDK/app version.
    pub version: Option<String>,
    /// Addresses with the advertised port.
    pub addresses: Vec<SocketAddr>,
}

/// Discovery errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// Reading or writing discovered nodes.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The mechanism could not start or stopped (e.g. no usable interface).
    #[error("discovery is unavailable: {0}")]
    Unavailable(String),
    /// An advertisement this node was asked to publish is not valid.
    #[error("invalid advertisement: {0}")]
    InvalidAdvertisement(String),
}

/// A way of finding nodes.
#[async_trait]
pub trait Discovery: Send + Sync + fmt::Debug + 'static {
    /// Every node known (kept from earlier runs too) plus any found within
    /// `timeout`. Waits the whole `timeout`; pass zero for what is known now.
    async fn discover(
        &self,
        timeout: Duration,
    ) -> Result<Vec<DiscoveredNodeRecord>, DiscoveryError>;
}

/// What a sighting changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// A new appearance: first ever, after the node was lost, or on another
    /// port (a restart). Counted, and published as `discovery.found`.
    Appeared,
    /// More addresses for the current appearance.
    Merged,
    /// Nothing new.
    Unchanged,
}

/// The record of discovered nodes shared by discovery mechanisms.
#[derive(Clone)]
pub struct DiscoveryBook {
    store: Arc<dyn Storage>,
    events: EventBus,
    max_nodes: usize,
    /// Nodes whose current appearance has not been withdrawn.
    present: Arc<Mutex<HashSet<NodeId>>>,
}

impl fmt::Debug for DiscoveryBook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiscoveryBook")
            .field("max_nodes", &self.max_nodes)
            .finish_non_exhaustive()
    }
}

impl DiscoveryBook {
    /// A book over `store`, publishing on `events`, keeping at most
    /// [`DEFAULT_MAX_NODES`] nodes.
    pub fn new(store: Arc<dyn Storage>, events: EventBus) -> Self {
        Self::with_max_nodes(store, events, DEFAULT_MAX_NODES)
    }

    /// A book keeping at most `max_nodes` nodes (at least 1).
    pub fn with_max_nodes(store: Arc<dyn Storage>, events: EventBus, max_nodes: usize) -> Self {
        DiscoveryBook {
            store,
            events,
            max_nodes: max_nodes.max(1),
            present: Arc::default(),
        }
    }

    /// Records a sighting at `now` and says what it changed.
    pub fn sighted(&self, sighting: Sighting, now: Timestamp) -> Result<Seen, StorageError> {
        let mut present = self.present.lock().unwrap_or_else(PoisonError::into_inner);
        let key = sighting.node.to_string();
        let old: Option<DiscoveredNodeRecord> = self.store.load(&key)?;
        let (is_paired, paired_device) = self.paired(&sighting.node)?;
        let mut addresses: Vec<SocketAddr> = Vec::new();
        for a in sighting.addresses {
            if !addresses.contains(&a) && addresses.len() < MAX_ADDRESSES {
                addresses.push(a);
            }
        }
        let moved = |old: &DiscoveredNodeRecord| {
            let ports: HashSet<u16> = old.addresses.iter().map(SocketAddr::port).collect();
            addresses.iter().any(|a| !ports.contains(&a.port()))
        };
        let (record, seen) = match old {
            Some(old) if present.contains(&sighting.node) && !moved(&old) => {
                let mut merged = old.addresses.clone();
                for a in &addresses {
                    if !merged.contains(a) && merged.len() < MAX_ADDRESSES {
                        merged.push(*a);
                    }
                }
                let changed = merged != old.addresses
                    || old.name != sighting.name
                    || old.platform != sighting.platform
                    || old.version != sighting.version;
                let record = DiscoveredNodeRecord {
                    name: sighting.name,
                    platform: sighting.platform,
                    version: sighting.version,
                    addresses: merged,
                    last_discovered: now,
                    is_paired,
                    paired_device,
                    ..old
                };
                (
                    record,
                    if changed {
                        Seen::Merged
                    } else {
                        Seen::Unchanged
                    },
                )
            }
            Some(old) => (
                DiscoveredNodeRecord {
                    name: sighting.name,
                    platform: sighting.platform,
                    version: sighting.version,
                    addresses,
                    last_discovered: now,
                    discovery_count: old.discovery_count.saturating_add(1),
                    is_paired,
                    paired_device,
                    ..old
                },
                Seen::Appeared,
            ),
            None => {
                self.make_room(&mut present, &sighting.node)?;
                (
                    DiscoveredNodeRecord {
                        node: sighting.node,
                        name: sighting.name,
                        platform: sighting.platform,
                        version: sighting.version,
                        addresses,
                        first_discovered: now,
                        last_discovered: now,
                        discovery_count: 1,
                        is_paired,
                        paired_device,
                    },
                    Seen::Appeared,
                )
            }
        };
        self.store.save(&record)?;
        present.insert(record.node);
        drop(present);
        if seen != Seen::Unchanged {
            let data = serde_json::json!({
                "node": record.node.to_string(),
                "name": record.name,
                "addresses": record.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "discovery_count": record.discovery_count,
                "is_paired": record.is_paired,
                "merged": seen == Seen::Merged,
            });
            self.events.publish(kinds::DISCOVERY_FOUND, now, data);
        }
        Ok(seen)
    }

    /// Notes that `node` withdrew its advertisement; its next sighting is a
    /// new appearance. The record is kept.
    pub fn lost(&self, node: &NodeId, now: Timestamp) {
        let removed = self
            .present
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(node);
        if removed {
            self.events.publish(
                kinds::DISCOVERY_LOST,
                now,
                serde_json::json!({ "node": node.to_string() }),
            );
        }
    }

    /// Every node in the book.
    pub fn list(&self) -> Result<Vec<DiscoveredNodeRecord>, StorageError> {
        self.store.load_all()
    }

    /// One node, if known.
    pub fn get(&self, node: &NodeId) -> Result<Option<DiscoveredNodeRecord>, StorageError> {
        self.store.load(&node.to_string())
    }

    fn paired(&self, node: &NodeId) -> Result<(bool, Option<String>), StorageError> {
        let device: Option<DeviceRecord> = self.store.load(&node.to_string())?;
        Ok(match device {
            Some(d) if d.revoked_at.is_none() && d.paired_at.is_some() => (true, Some(d.device_id)),
            _ => (false, None),
        })
    }

    /// Forgets the least recently seen unpaired node when the book is full.
    fn make_room(
        &self,
        present: &mut HashSet<NodeId>,
        newcomer: &NodeId,
    ) -> Result<(), StorageError> {
        let all: Vec<DiscoveredNodeRecord> = self.store.load_all()?;
        if all.len() < self.max_nodes {
            return Ok(());
        }
        let victim = all
            .iter()
            .filter(|r| !r.is_paired && r.node != *newcomer)
            .min_by_key(|r| (r.last_discovered, r.node));
        if let Some(victim) = victim {
            self.store
                .remove::<DiscoveredNodeRecord>(&victim.node.to_string())?;
            present.remove(&victim.node);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Received;
    use crate::identity::NodeKey;
    use crate::registry::{NewDevice, Registry};
    use crate::storage::MemoryStorage;
    use crate::wire::Platform;

    fn node(seed: u8) -> NodeId {
        NodeKey::from_secret_bytes(&[seed; 32]).node_id()
    }

    fn sighting(seed: u8, addresses: &[&str]) -> Sighting {
        Sighting {
            node: node(seed),
            name: format!("node-{seed}"),
            platform: Some("desktop".into()),
            version: Some("0.1.0".into()),
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    fn book() -> (DiscoveryBook, Arc<dyn Storage>, EventBus) {
        let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        let events = EventBus::new();
        (
            DiscoveryBook::new(store.clone(), events.clone()),
            store,
            events,
        )
    }

    fn t(ms: u64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    #[test]
    fn repeated_resolves_of_one_appearance_merge_addresses() {
        let (book, _, _) = book();
        // mdns-sd reports the IPv6 link-local address first, the IPv4 one later.
        let first = book
            .sighted(sighting(1, &["[fe80::1%2]:4000"]), t(10))
            .unwrap();
        let second = book
            .sighted(sighting(1, &["10.0.0.1:4000"]), t(20))
            .unwrap();
        let third = book
            .sighted(sighting(1, &["10.0.0.1:4000"]), t(30))
            .unwrap();
        assert_eq!(
            (first, second, third),
            (Seen::Appeared, Seen::Merged, Seen::Unchanged)
        );
        let r = book.get(&node(1)).unwrap().unwrap();
        assert_eq!(
            r.addresses,
            vec![
                "[fe80::1%2]:4000".parse().unwrap(),
                "10.0.0.1:4000".parse().unwrap()
            ]
        );
        assert_eq!((r.first_discovered, r.last_discovered), (t(10), t(30)));
        assert_eq!(r.discovery_count, 1);
    }

    #[test]
    fn a_node_that_comes_back_counts_again_with_its_new_addresses() {
        let (book, _, _) = book();
        book.sighted(sighting(1, &["10.0.0.1:4000"]), t(10))
            .unwrap();
        book.lost(&node(1), t(20));
        assert_eq!(
            book.sighted(sighting(1, &["10.0.0.2:4000"]), t(30))
                .unwrap(),
            Seen::Appeared
        );
        let r = book.get(&node(1)).unwrap().unwrap();
        assert_eq!(r.discovery_count, 2);
        assert_eq!(r.addresses, vec!["10.0.0.2:4000".parse().unwrap()]);
        assert_eq!(r.first_discovered, t(10));
    }

    #[test]
    fn a_new_port_without_a_goodbye_is_a_restart() {
        let (book, _, _) = book();
        book.sighted(sighting(1, &["10.0.0.1:4000"]), t(10))
            .unwrap();
        assert_eq!(
            book.sighted(sighting(1, &["10.0.0.1:4001"]), t(20))
                .unwrap(),
            Seen::Appeared
        );
        let r = book.get(&node(1)).unwrap().unwrap();
        assert_eq!((r.discovery_count, r.addresses.len()), (2, 1));
        assert_eq!(r.addresses[0].port(), 4001);
    }

    #[test]
    fn records_outlive_the_book_and_a_restart_counts_as_an_appearance() {
        let (book, store, events) = book();
        book.sighted(sighting(1, &["10.0.0.1:4000"]), t(10))
            .unwrap();
        let reopened = DiscoveryBook::new(store, events);
        assert_eq!(reopened.list().unwrap().len(), 1);
        assert_eq!(
            reopened
                .sighted(sighting(1, &["10.0.0.1:4000"]), t(50))
                .unwrap(),
            Seen::Appeared
        );
        assert_eq!(reopened.get(&node(1)).unwrap().unwrap().discovery_count, 2);
    }

    #[test]
    fn paired_devices_are_linked_and_revocation_unlinks() {
        let (book, store, events) = book();
        let registry = Registry::new(store, events);
        let (record, _token, writes) = registry
            .prepare_device(
                NewDevice {
                    node: node(1),
                    device_id: "laptop-7".into(),
                    name: "Laptop".into(),
                    platform: Platform::Desktop,
                },
                t(1),
            )
            .unwrap();
        registry.commit_new_device(&record, &writes).unwrap();
        book.sighted(sighting(1, &["10.0.0.1:4000"]), t(10))
            .unwrap();
        book.sighted(sighting(2, &["10.0.0.2:4000"]), t(10))
            .unwrap();
        let r = book.get(&node(1)).unwrap().unwrap();
        assert_eq!(
            (r.is_paired, r.paired_device.as_deref()),
            (true, Some("laptop-7"))
        );
        assert!(!book.get(&node(2)).unwrap().unwrap().is_paired);
        registry.revoke(&node(1), t(20)).unwrap();
        book.sighted(sighting(1, &["10.0.0.1:4000"]), t(30))
            .unwrap();
        let r = book.get(&node(1)).unwrap().unwrap();
        assert_eq!((r.is_paired, r.paired_device), (false, None));
    }

    #[test]
    fn a_flood_of_advertisements_is_bounded() {
        let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        let book = DiscoveryBook::with_max_nodes(store, EventBus::new(), 3);
        for seed in 1..=10u8 {
            book.sighted(sighting(seed, &["10.0.0.1:4000"]), t(u64::from(seed)))
                .unwrap();
        }
        let mut kept: Vec<NodeId> = book.list().unwrap().into_iter().map(|r| r.node).collect();
        kept.sort();
        let mut newest = vec![node(8), node(9), node(10)];
        newest.sort();
        assert_eq!(kept, newest);
        let many: Vec<String> = (0..100).map(|p| format!("10.0.0.1:{}", 1000 + p)).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        book.sighted(sighting(10, &many), t(20)).unwrap();
        assert_eq!(
            book.get(&node(10)).unwrap().unwrap().addresses.len(),
            MAX_ADDRESSES
        );
    }

    #[test]
    fn appearances_and_losses_are_published() {
        let (book, _, events) = book();
        let mut sub = events.subscribe("discovery.*", 16).unwrap();
        book.sighted(sighting(1, &["10.0.0.1:4000"]), t(10))
            .unwrap();
        book.sighted(sighting(1, &["10.0.0.1:4000"]), t(11))
            .unwrap();
        book.lost(&node(1), t(12));
        book.lost(&node(1), t(13));
        let mut seen = Vec::new();
        while let Some(Received::Event(e)) = sub.try_recv() {
            seen.push((e.kind.clone(), e.data["node"].as_str().map(str::to_owned)));
        }
        let id = Some(node(1).to_string());
        assert_eq!(
            seen,
            vec![
                (kinds::DISCOVERY_FOUND.to_owned(), id.clone()),
                (kinds::DISCOVERY_LOST.to_owned(), id)
            ]
        );
    }
}

/// The order in which to try a node's reported addresses: loopback first
/// (same host), then routable IPv6, then IPv4, then IPv6 link-local with a
/// scope (interface) id; a link-local address without one cannot be dialled
/// and is left out. Duplicates go; the order within a class is kept.
pub fn dial_order(addrs: &[std::net::SocketAddr]) -> Vec<std::net::SocketAddr> {
    use std::net::SocketAddr;
    fn class(a: &SocketAddr) -> Option<u8> {
        match a {
            _ if a.ip().is_loopback() => Some(0),
            SocketAddr::V6(v6) if v6.ip().is_unicast_link_local() => {
                (v6.scope_id() != 0).then_some(3)
            }
            SocketAddr::V6(_) => Some(1),
            SocketAddr::V4(_) => Some(2),
        }
    }
    let mut out: Vec<(u8, SocketAddr)> = Vec::new();
    for a in addrs {
        let a = match a {
            // An IPv4-mapped IPv6 address is an IPv4 address.
            SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
                Some(v4) => SocketAddr::from((v4, v6.port())),
                None => *a,
            },
            SocketAddr::V4(_) => *a,
        };
        if let Some(c) = class(&a)
            && !out.iter().any(|(_, b)| *b == a)
        {
            out.push((c, a));
        }
    }
    out.sort_by_key(|(c, _)| *c);
    out.into_iter().map(|(_, a)| a).collect()
}

#[cfg(test)]
mod dial_order_tests {
    use super::dial_order;

    #[test]
    fn loopback_then_ipv6_then_ipv4_then_scoped_link_local() {
        let addrs: Vec<std::net::SocketAddr> = [
            "[fe80::1]:5",
            "192.168.1.4:5",
            "[fe80::2%3]:5",
            "[2001:db8::1]:5",
            "[::ffff:10.0.0.9]:5",
            "[::1]:5",
            "192.168.1.4:5",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let ordered: Vec<String> = dial_order(&addrs).iter().map(ToString::to_string).collect();
        assert_eq!(
            ordered,
            [
                "[::1]:5",
                "[2001:db8::1]:5",
                "192.168.1.4:5",
                "10.0.0.9:5",
                "[fe80::2%3]:5"
            ]
        );
        assert!(dial_order(&[]).is_empty());
    }
}
