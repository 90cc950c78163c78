//! mDNS discovery (R-DISC1) with mdns-sd: advertise this node and browse
//! for others on the local network.
//!
//! A node is advertised as an instance of [`SERVICE_TYPE`] named by its node
//! id, with TXT records `txtvers`, `id` (node id), `name`, `platform`,
//! `version` and `port`. Every resolve event becomes a
//! [`Sighting`] in the shared [`DiscoveryBook`], which merges the partial
//! address sets mdns-sd reports (often an IPv6 link-local address first, the
//! IPv4 one a little later), counts appearances and persists the nodes.
//!
//! mdns-sd listens on every interface by default. [`Interfaces`] restricts it;
//! tests use [`Interfaces::Loopback`] or run inside network namespaces.
//!
//! Advertisements are not authenticated: QUIC pins the node id on connect.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use mdns_sd::{IfKind, ResolvedService, ScopedIp, ServiceDaemon, ServiceEvent, ServiceInfo};
use mesh_core::clock::{Clock, SystemClock};
use mesh_core::discovery::{Discovery, DiscoveryBook, DiscoveryError, Sighting};
use mesh_core::events::EventBus;
use mesh_core::identity::NodeId;
use mesh_core::storage::Storage;
use mesh_core::storage::records::DiscoveredNodeRecord;
use tokio::task::JoinHandle;

/// The DNS-SD service type of mesh nodes (QUIC runs over UDP).
pub const SERVICE_TYPE: &str = "_mesh-sdk._udp.local.";
/// The TXT record schema version.
const TXT_VERSION: &str = "1";
/// Longest advertised name, platform or version, in bytes (a TXT entry
/// holds 255 bytes including its key).
pub const MAX_TXT_VALUE: usize = 200;

/// Which network interfaces mDNS uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Interfaces {
    /// Every interface that is up (mdns-sd's default).
    #[default]
    All,
    /// Only the IPv4 loopback interface: nothing leaves the host.
    Loopback,
    /// Only the interfaces with these names (e.g. `["en0"]`).
    Named(Vec<String>),
}

/// Why a text is not an interface selection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid mDNS interface {given:?}: say all, loopback, or interface names separated by commas (letters, digits, . _ - : @; at most 64 each)"
)]
pub struct InterfacesError {
    /// What was given.
    pub given: String,
}

impl std::str::FromStr for Interfaces {
    type Err = InterfacesError;

    /// `all`, `loopback`, or interface names separated by commas (as the
    /// binaries' and the bindings' `--interface` options take it). Anything
    /// else, the empty text included, is refused: a typo never widens to
    /// every interface.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let refuse = || InterfacesError {
            given: s.chars().take(80).collect(),
        };
        Ok(match s.trim() {
            "all" => Interfaces::All,
            "loopback" | "lo" => Interfaces::Loopback,
            names => {
                let names: Vec<String> = names.split(',').map(|n| n.trim().to_owned()).collect();
                let valid = |n: &String| {
                    !n.is_empty()
                        && n.len() <= 64
                        && n.chars()
                            .all(|c| c.is_ascii_alphanumeric() || "._-:@".contains(c))
                };
                if names.is_empty() || !names.iter().all(valid) {
                    return Err(refuse());
                }
                Interfaces::Named(names)
            }
        })
    }
}

/// Settings of [`MdnsDiscovery`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct MdnsConfig {
    /// Which interfaces to listen and announce on.
    pub interfaces: Interfaces,
}

impl MdnsConfig {
    /// mDNS on the given interfaces.
    pub fn with_interfaces(interfaces: Interfaces) -> Self {
        MdnsConfig { interfaces }
    }
}

/// What this node advertises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertisement {
    /// Display name.
    pub name: String,
    /// Platform (`desktop`, `ios`, `android`, `web`).
    pub platform: String,
    /// SDK or app version.
    pub version: String,
    /// The QUIC port.
    pub port: u16,
}

fn unavailable(e: mdns_sd::Error) -> DiscoveryError {
    DiscoveryError::Unavailable(format!("mDNS: {e}"))
}

/// mDNS advertisement and browsing, recording what it finds in a
/// [`DiscoveryBook`]. Must be started inside a tokio runtime.
///
/// Dropping it withdraws the advertisement (goodbye packets) and stops the
/// mdns-sd daemon thread.
pub struct MdnsDiscovery {
    local: NodeId,
    daemon: ServiceDaemon,
    book: DiscoveryBook,
    advertised: Mutex<Option<String>>,
    browser: JoinHandle<()>,
}

impl fmt::Debug for MdnsDiscovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MdnsDiscovery")
            .field("local", &self.local)
            .field("advertised", &self.advertised)
            .finish_non_exhaustive()
    }
}

impl MdnsDiscovery {
    /// Starts the mDNS daemon on the configured interfaces and browses for
    /// nodes other than `local`, recording them in `book` with times from
    /// `clock`.
    pub fn start(
        local: NodeId,
        config: MdnsConfig,
        book: DiscoveryBook,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, DiscoveryError> {
        let daemon = ServiceDaemon::new().map_err(unavailable)?;
        let started = select_interfaces(&daemon, &config.interfaces)
            .and_then(|()| daemon.browse(SERVICE_TYPE).map_err(unavailable));
        let events = match started {
            Ok(events) => events,
            Err(e) => {
                let _ = daemon.shutdown();
                return Err(e);
            }
        };
        let browser = tokio::spawn(browse(local, events, book.clone(), clock));
        Ok(MdnsDiscovery {
            local,
            daemon,
            book,
            advertised: Mutex::new(None),
            browser,
        })
    }

    /// [`start`](Self::start) as a node uses it: sightings go into a
    /// [`DiscoveryBook`] over `store`, published on `events`, timed by the
    /// system clock.
    pub fn start_for_node(
        local: NodeId,
        interfaces: Interfaces,
        store: Arc<dyn Storage>,
        events: EventBus,
    ) -> Result<Self, DiscoveryError> {
        Self::start(
            local,
            MdnsConfig::with_interfaces(interfaces),
            DiscoveryBook::new(store, events),
            Arc::new(SystemClock),
        )
    }

    /// Advertises this node (replacing an earlier advertisement). Addresses
    /// are those of the selected interfaces, kept current as they change.
    pub fn advertise(&self, ad: &Advertisement) -> Result<(), DiscoveryError> {
        let info = service_info(&self.local, ad)?;
        let fullname = info.get_fullname().to_owned();
        self.daemon.register(info).map_err(unavailable)?;
        *self
            .advertised
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(fullname);
        Ok(())
    }

    /// Withdraws the advertisement (goodbye packets), if there is one.
    pub fn withdraw(&self) -> Result<(), DiscoveryError> {
        let fullname = self
            .advertised
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(fullname) = fullname {
            let status = self.daemon.unregister(&fullname).map_err(unavailable)?;
            // The daemon answers once the goodbyes are out; bounded.
            let _ = status.recv_timeout(Duration::from_secs(2));
        }
        Ok(())
    }

    /// The book this discovery records into.
    pub fn book(&self) -> &DiscoveryBook {
        &self.book
    }
}

impl Drop for MdnsDiscovery {
    fn drop(&mut self) {
        self.browser.abort();
        // Sends goodbyes for what is registered, then ends the daemon thread.
        if let Ok(done) = self.daemon.shutdown() {
            let _ = done.recv_timeout(Duration::from_secs(2));
        }
    }
}

#[async_trait]
impl Discovery for MdnsDiscovery {
    async fn discover(
        &self,
        timeout: Duration,
    ) -> Result<Vec<DiscoveredNodeRecord>, DiscoveryError> {
        // Browsing runs all along; waiting lets answers to the queries and
        // announcements come in.
        tokio::time::sleep(timeout).await;
        Ok(self.book.list()?)
    }
}

/// The DNS-SD record of an advertisement (checked, nothing sent).
fn service_info(local: &NodeId, ad: &Advertisement) -> Result<ServiceInfo, DiscoveryError> {
    for (what, value) in [
        ("name", &ad.name),
        ("platform", &ad.platform),
        ("version", &ad.version),
    ] {
        if value.len() > MAX_TXT_VALUE {
            return Err(DiscoveryError::InvalidAdvertisement(format!(
                "{what} is {} bytes; at most {MAX_TXT_VALUE} fit a TXT record",
                value.len()
            )));
        }
    }
    if ad.port == 0 {
        return Err(DiscoveryError::InvalidAdvertisement(
            "port 0 cannot be reached; advertise the bound port".into(),
        ));
    }
    let id = local.to_string();
    let port = ad.port.to_string();
    let txt = [
        ("txtvers", TXT_VERSION),
        ("id", id.as_str()),
        ("name", ad.name.as_str()),
        ("platform", ad.platform.as_str()),
        ("version", ad.version.as_str()),
        ("port", port.as_str()),
    ];
    // The node id (52 characters) names both the instance and the host:
    // unique, and within DNS's 63-byte label limit.
    let host = format!("mesh-{}.local.", id.to_ascii_lowercase());
    Ok(
        ServiceInfo::new(SERVICE_TYPE, &id, &host, "", ad.port, &txt[..])
            .map_err(|e| DiscoveryError::InvalidAdvertisement(e.to_string()))?
            .enable_addr_auto(),
    )
}

fn select_interfaces(
    daemon: &ServiceDaemon,
    interfaces: &Interfaces,
) -> Result<(), DiscoveryError> {
    match interfaces {
        Interfaces::All => Ok(()),
        Interfaces::Loopback => {
            daemon.disable_interface(IfKind::All).map_err(unavailable)?;
            daemon
                .enable_interface(IfKind::LoopbackV4)
                .map_err(unavailable)
        }
        Interfaces::Named(names) => {
            if names.is_empty() {
                return Err(DiscoveryError::Unavailable(
                    "no interface named for mDNS".into(),
                ));
            }
            daemon.disable_interface(IfKind::All).map_err(unavailable)?;
            let kinds: Vec<IfKind> = names.iter().map(|n| IfKind::Name(n.clone())).collect();
            daemon.enable_interface(kinds).map_err(unavailable)
        }
    }
}

/// Turns browse events into sightings until the daemon stops.
async fn browse(
    local: NodeId,
    events: mdns_sd::Receiver<ServiceEvent>,
    book: DiscoveryBook,
    clock: Arc<dyn Clock>,
) {
    let mut instances: HashMap<String, NodeId> = HashMap::new();
    while let Ok(event) = events.recv_async().await {
        match event {
            ServiceEvent::ServiceResolved(service) => {
                let Some(sighting) = sighting(&service) else {
                    continue;
                };
                if sighting.node == local {
                    continue;
                }
                instances.insert(service.fullname.clone(), sighting.node);
                // A storage failure loses this sighting only; the next
                // resolve or query answer brings it again.
                let _ = book.sighted(sighting, clock.now());
            }
            ServiceEvent::ServiceRemoved(_, fullname) => {
                if let Some(node) = instances.remove(&fullname) {
                    book.lost(&node, clock.now());
                }
            }
            ServiceEvent::SearchStopped(_) => break,
            _ => {}
        }
    }
}

/// Reads a resolved instance; `None` if it is not a well-formed mesh node.
fn sighting(service: &ResolvedService) -> Option<Sighting> {
    let txt = |key: &str| {
        service
            .get_property_val_str(key)
            .filter(|v| !v.is_empty() && v.len() <= MAX_TXT_VALUE)
            .map(str::to_owned)
    };
    let node: NodeId = txt("id")?.parse().ok()?;
    let port = service.port;
    if port == 0 {
        return None;
    }
    let mut addresses: Vec<SocketAddr> = service
        .addresses
        .iter()
        .map(|ip| socket_addr(ip, port))
        .collect();
    // Deterministic order: IPv4 first, then by address.
    addresses.sort_by_key(|a| (a.is_ipv6(), *a));
    Some(Sighting {
        node,
        name: txt("name").unwrap_or_default(),
        platform: txt("platform"),
        version: txt("version"),
        addresses,
    })
}

/// An address with the port; IPv6 link-local addresses keep their scope.
fn socket_addr(ip: &ScopedIp, port: u16) -> SocketAddr {
    match (ip, ip.to_ip_addr()) {
        (ScopedIp::V6(v6), IpAddr::V6(addr)) => {
            SocketAddr::V6(SocketAddrV6::new(addr, port, 0, v6.scope_id().index))
        }
        (_, addr) => SocketAddr::new(addr, port),
    }
}

#[cfg(test)]
mod tests {
    use mesh_core::identity::NodeKey;

    use super::*;

    #[test]
    fn interface_selections_parse_strictly() {
        assert_eq!("all".parse::<Interfaces>(), Ok(Interfaces::All));
        assert_eq!("loopback".parse::<Interfaces>(), Ok(Interfaces::Loopback));
        assert_eq!(
            "en0, wlan0".parse::<Interfaces>(),
            Ok(Interfaces::Named(vec!["en0".into(), "wlan0".into()]))
        );
        for bad in ["", " ", "en0,", "eth 0", "eth0;rm", &"x".repeat(65), "é"] {
            assert!(bad.parse::<Interfaces>().is_err(), "{bad:?}");
        }
    }

    fn ad() -> Advertisement {
        Advertisement {
            name: "Studio Mac".into(),
            platform: "desktop".into(),
            version: "0.1.0".into(),
            port: 4433,
        }
    }

    fn local() -> NodeId {
        NodeKey::from_secret_bytes(&[9; 32]).node_id()
    }

    #[test]
    fn an_advertisement_reads_back_as_the_same_node() {
        let mut info = service_info(&local(), &ad()).unwrap();
        assert_eq!(info.get_fullname(), format!("{}.{SERVICE_TYPE}", local()));
        assert!(info.get_hostname().len() <= 63 + ".local.".len());
        info = ServiceInfo::new(
            SERVICE_TYPE,
            &local().to_string(),
            info.get_hostname(),
            "10.250.0.1,fe80::1",
            4433,
            info.get_properties().clone().into_property_map_str(),
        )
        .unwrap();
        let s = sighting(&info.as_resolved_service()).unwrap();
        assert_eq!(s.node, local());
        assert_eq!(s.name, "Studio Mac");
        assert_eq!(s.platform.as_deref(), Some("desktop"));
        assert_eq!(s.version.as_deref(), Some("0.1.0"));
        assert_eq!(
            s.addresses[0],
            "10.250.0.1:4433".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(s.addresses.len(), 2);
    }

    #[test]
    fn bad_advertisements_are_refused_before_anything_is_sent() {
        let long = "x".repeat(MAX_TXT_VALUE + 1);
        for bad in [
            Advertisement {
                name: long.clone(),
                ..ad()
            },
            Advertisement {
                version: long,
                ..ad()
            },
            Advertisement { port: 0, ..ad() },
        ] {
            assert!(matches!(
                service_info(&local(), &bad),
                Err(DiscoveryError::InvalidAdvertisement(_))
            ));
        }
    }

    #[test]
    fn instances_without_a_valid_node_id_are_ignored() {
        let info = |txt: &[(&str, &str)]| {
            ServiceInfo::new(SERVICE_TYPE, "x", "x.local.", "10.0.0.1", 4433, txt)
                .unwrap()
                .as_resolved_service()
        };
        assert!(sighting(&info(&[("name", "no id")])).is_none());
        assert!(sighting(&info(&[("id", "not-a-node-id")])).is_none());
        let id = local().to_string();
        assert!(sighting(&info(&[("id", id.as_str())])).is_some());
    }
}
