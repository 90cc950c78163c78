//! Static (bootstrap) peers (R-DISC2): a configured list of node ids and
//! addresses, for networks without multicast.
//!
//! A peer is written `NODE_ID@ADDRESS[,ADDRESS…]`, for example
//! `k3v…q@192.168.1.20:4433,[fe80::1%2]:4433`. Addresses are IP literals with
//! a port; host names are not resolved here (the node never does DNS on its
//! own). The node id is what a connection pins, so a wrong address fails
//! with a refused connection, never a connection to someone else.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use mesh_core::clock::Clock;
use mesh_core::discovery::{Discovery, DiscoveryBook, DiscoveryError, Sighting};
use mesh_core::identity::NodeId;
use mesh_core::storage::records::DiscoveredNodeRecord;

/// Most addresses one static peer may list.
pub const MAX_PEER_ADDRESSES: usize = 16;

/// One configured peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticPeer {
    /// The node expected at the addresses.
    pub node: NodeId,
    /// Where to reach it.
    pub addresses: Vec<SocketAddr>,
}

/// Why a static peer does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StaticPeerError {
    /// No `@` between the node id and the addresses.
    #[error("expected NODE_ID@ADDRESS[,ADDRESS…], found {0:?}")]
    Shape(String),
    /// The part before `@` is not a node id.
    #[error("{0:?} is not a node id")]
    NodeId(String),
    /// An address is not an IP address with a port.
    #[error("{0:?} is not an IP address with a port (host names are not resolved)")]
    Address(String),
    /// No address, or too many.
    #[error("a peer needs 1 to {MAX_PEER_ADDRESSES} addresses, found {0}")]
    AddressCount(usize),
}

impl FromStr for StaticPeer {
    type Err = StaticPeerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (node, addresses) = s
            .trim()
            .split_once('@')
            .ok_or_else(|| StaticPeerError::Shape(s.to_owned()))?;
        let node = node
            .parse()
            .map_err(|_| StaticPeerError::NodeId(node.to_owned()))?;
        let addresses: Vec<&str> = addresses
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .collect();
        if addresses.is_empty() || addresses.len() > MAX_PEER_ADDRESSES {
            return Err(StaticPeerError::AddressCount(addresses.len()));
        }
        let addresses = addresses
            .into_iter()
            .map(|a| {
                a.parse()
                    .map_err(|_| StaticPeerError::Address(a.to_owned()))
            })
            .collect::<Result<Vec<SocketAddr>, _>>()?;
        Ok(StaticPeer { node, addresses })
    }
}

impl fmt::Display for StaticPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@", self.node)?;
        for (i, a) in self.addresses.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{a}")?;
        }
        Ok(())
    }
}

/// Discovery from a fixed list: the peers are recorded in the book when the
/// discovery is created, and [`discover`](Discovery::discover) answers at once.
#[derive(Debug)]
pub struct StaticDiscovery {
    book: DiscoveryBook,
}

impl StaticDiscovery {
    /// Records `peers` in `book` (time from `clock`).
    pub fn new(
        peers: &[StaticPeer],
        book: DiscoveryBook,
        clock: &dyn Clock,
    ) -> Result<Self, DiscoveryError> {
        for peer in peers {
            let sighting = Sighting {
                node: peer.node,
                name: String::new(),
                platform: None,
                version: None,
                addresses: peer.addresses.clone(),
            };
            book.sighted(sighting, clock.now())?;
        }
        Ok(StaticDiscovery { book })
    }
}

#[async_trait]
impl Discovery for StaticDiscovery {
    async fn discover(
        &self,
        _timeout: Duration,
    ) -> Result<Vec<DiscoveredNodeRecord>, DiscoveryError> {
        // Nothing more can turn up by waiting.
        Ok(self.book.list()?)
    }
}

#[cfg(test)]
mod tests {
    use mesh_core::clock::{ManualClock, Timestamp};
    use mesh_core::events::EventBus;
    use mesh_core::identity::NodeKey;
    use mesh_core::storage::{MemoryStorage, Storage};

    use std::sync::Arc;

    use super::*;

    fn node(seed: u8) -> NodeId {
        NodeKey::from_secret_bytes(&[seed; 32]).node_id()
    }

    #[test]
    fn peers_parse_and_print_back() {
        let text = format!("{}@127.0.0.1:4433,[::1]:4433", node(1));
        let peer: StaticPeer = text.parse().unwrap();
        assert_eq!(peer.node, node(1));
        assert_eq!(peer.addresses.len(), 2);
        assert_eq!(peer.to_string(), text);
        let spaced: StaticPeer = format!(" {}@ 127.0.0.1:1 , ", node(1)).parse().unwrap();
        assert_eq!(spaced.addresses, vec!["127.0.0.1:1".parse().unwrap()]);
    }

    #[test]
    fn bad_peers_get_typed_errors() {
        let id = node(1).to_string();
        let cases = [
            (
                "127.0.0.1:4433".to_owned(),
                StaticPeerError::Shape("127.0.0.1:4433".into()),
            ),
            (
                "nope@127.0.0.1:1".to_owned(),
                StaticPeerError::NodeId("nope".into()),
            ),
            (format!("{id}@"), StaticPeerError::AddressCount(0)),
            (
                format!("{id}@localhost:1"),
                StaticPeerError::Address("localhost:1".into()),
            ),
            (
                format!("{id}@127.0.0.1"),
                StaticPeerError::Address("127.0.0.1".into()),
            ),
            (
                format!("{id}@{}", vec!["127.0.0.1:1"; 17].join(",")),
                StaticPeerError::AddressCount(17),
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(text.parse::<StaticPeer>(), Err(expected), "{text}");
        }
    }

    #[tokio::test]
    async fn discover_returns_the_configured_peers_at_once() {
        let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        let book = DiscoveryBook::new(store, EventBus::new());
        let clock = ManualClock::new(Timestamp::from_millis(5_000));
        let peers: Vec<StaticPeer> = [1u8, 2]
            .iter()
            .map(|s| {
                format!("{}@127.0.0.1:{}", node(*s), 4000 + u16::from(*s))
                    .parse()
                    .unwrap()
            })
            .collect();
        let d = StaticDiscovery::new(&peers, book, &clock).unwrap();
        // A large timeout: static discovery must not wait for it.
        let found = tokio::time::timeout(
            Duration::from_secs(5),
            d.discover(Duration::from_secs(3600)),
        )
        .await
        .unwrap()
        .unwrap();
        let mut got: Vec<(NodeId, u16)> = found
            .iter()
            .map(|r| (r.node, r.addresses[0].port()))
            .collect();
        got.sort();
        let mut want = vec![(node(1), 4001), (node(2), 4002)];
        want.sort();
        assert_eq!(got, want);
        assert!(
            found
                .iter()
                .all(|r| r.first_discovered == Timestamp::from_millis(5_000))
        );
    }

    proptest::proptest! {
        #[test]
        fn any_text_parses_or_gets_a_typed_error(text in "\\PC{0,200}") {
            let _ = text.parse::<StaticPeer>();
        }

        #[test]
        fn printed_peers_parse_back(
            seed in 1u8..,
            ports in proptest::collection::vec(1u16.., 1..MAX_PEER_ADDRESSES),
            v6 in proptest::bool::ANY,
        ) {
            let addresses = ports
                .iter()
                .map(|p| if v6 { format!("[::1]:{p}") } else { format!("10.0.0.1:{p}") }.parse().unwrap())
                .collect();
            let peer = StaticPeer { node: node(seed), addresses };
            proptest::prop_assert_eq!(peer.to_string().parse::<StaticPeer>(), Ok(peer));
        }
    }
}
