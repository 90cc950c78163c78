//! An mDNS node for the network-namespace discovery test: advertises
//! (optionally) and browses with `mesh_transport::mdns`, printing one JSON
//! line per discovery event, until its standard input closes.
//!
//! ```text
//! mdns-node --seed N --interface IF|loopback [--advertise PORT]
//! ```
//!
//! `--interface loopback` selects `Interfaces::Loopback`.
//!
//! The first line is `{"event":"ready","node":ID}`. Closing stdin withdraws
//! the advertisement (goodbye packets), prints what `discover` knows as
//! `{"event":"known","nodes":[…]}` and exits 0.

use std::sync::Arc;
use std::time::Instant;

use mesh_core::clock::{Clock, SystemClock};
use mesh_core::discovery::{Discovery, DiscoveryBook};
use mesh_core::events::{EventBus, Received};
use mesh_core::identity::NodeKey;
use mesh_core::storage::{MemoryStorage, Storage};
use mesh_transport::mdns::{Advertisement, Interfaces, MdnsConfig, MdnsDiscovery};
use tokio::io::AsyncReadExt;

struct Args {
    seed: u8,
    interface: String,
    advertise: Option<u16>,
}

fn parse() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let (mut seed, mut interface, mut advertise) = (None, None, None);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--seed" => seed = Some(value()?.parse().map_err(|e| format!("--seed: {e}"))?),
            "--interface" => interface = Some(value()?),
            "--advertise" => {
                advertise = Some(value()?.parse().map_err(|e| format!("--advertise: {e}"))?)
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        seed: seed.ok_or("--seed is required")?,
        interface: interface.ok_or("--interface is required")?,
        advertise,
    })
}

fn emit(value: serde_json::Value) {
    // One line per event, flushed: the test reads them as they come.
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mdns-node: {e}");
            std::process::exit(2);
        }
    };
    let started = Instant::now();
    let key = NodeKey::from_secret_bytes(&[args.seed; 32]);
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let events = EventBus::new();
    let Ok(mut sub) = events.subscribe("discovery.*", 256) else {
        std::process::exit(1);
    };
    let book = DiscoveryBook::new(store, events);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let interfaces = match args.interface.as_str() {
        "loopback" => Interfaces::Loopback,
        name => Interfaces::Named(vec![name.to_owned()]),
    };
    let config = MdnsConfig::with_interfaces(interfaces);
    let mdns = match MdnsDiscovery::start(key.node_id(), config, book, clock) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("mdns-node: {e}");
            std::process::exit(1);
        }
    };
    if let Some(port) = args.advertise {
        let ad = Advertisement {
            name: format!("node-{}", args.seed),
            platform: "desktop".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            port,
        };
        if let Err(e) = mdns.advertise(&ad) {
            eprintln!("mdns-node: {e}");
            std::process::exit(1);
        }
    }
    emit(serde_json::json!({"event": "ready", "node": key.node_id().to_string()}));
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    loop {
        tokio::select! {
            read = stdin.read(&mut sink) => {
                if matches!(read, Ok(0) | Err(_)) {
                    break;
                }
            }
            received = sub.recv() => match received {
                Some(Received::Event(e)) => emit(serde_json::json!({
                    "event": e.kind,
                    "ms": started.elapsed().as_millis() as u64,
                    "data": e.data,
                })),
                Some(Received::Lagged { missed }) => emit(serde_json::json!({"event": "lagged", "missed": missed})),
                None => break,
            },
        }
    }
    // What discover() reports: every node known, with its history.
    let known = mdns
        .discover(std::time::Duration::ZERO)
        .await
        .unwrap_or_default();
    let known: Vec<serde_json::Value> = known
        .iter()
        .map(|r| {
            serde_json::json!({
                "node": r.node.to_string(),
                "name": r.name,
                "addresses": r.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "discovery_count": r.discovery_count,
                "is_paired": r.is_paired,
            })
        })
        .collect();
    emit(serde_json::json!({"event": "known", "nodes": known}));
    let _ = mdns.withdraw();
    drop(mdns);
}
