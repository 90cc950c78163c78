//! A primary or a worker assembled from a data directory: the node key
//! (`node.key`, mode 0600), SQLite (`mesh.db`, WAL), and for the primary the
//! signed ledger and mesh-policy, over QUIC.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use mesh_core::identity::{NodeId, NodeKey};
use mesh_core::node::{
    CommandHandler, DataDir, FnHandler, MeshSettings, MetricsSource, NodeConfig, Primary, Worker,
};
use mesh_core::storage::Storage;
use mesh_ledger::{LedgerConfig, LedgerHub, SignedLedger, verify_ledger};
use mesh_policy::runtime::RuntimePolicy;
use mesh_transport::quic::{QuicConfig, QuicTransport};
use serde_json::json;

use crate::admin::LedgerCheck;

/// What a started node is made of; `N` is its role's handle.
#[derive(Debug)]
pub struct Parts<N> {
    /// The node.
    pub node: N,
    /// Its identity.
    pub key: Arc<NodeKey>,
    /// Its storage.
    pub store: Arc<dyn Storage>,
    /// Its ledger.
    pub ledger: Option<Arc<SignedLedger>>,
    /// The QUIC address it listens on.
    pub addr: SocketAddr,
}

/// Opens (or creates) the data directory `dir`.
pub fn open_dir(dir: &Path) -> Result<DataDir, String> {
    DataDir::open(dir).map_err(|e| e.to_string())
}

/// The node's signed ledger in `dir`'s store, and the hub that replicates
/// it (and holds the ledgers of others).
fn ledger(dir: &DataDir) -> Result<(Arc<SignedLedger>, Arc<LedgerHub>), String> {
    let (key, store) = (dir.key(), dir.store());
    let ledger = Arc::new(
        SignedLedger::open(store.clone(), key, LedgerConfig::default())
            .map_err(|e| e.to_string())?,
    );
    let hub = Arc::new(LedgerHub::open(store, ledger.clone()).map_err(|e| e.to_string())?);
    Ok((ledger, hub))
}

fn quic(dir: &DataDir, listen: SocketAddr) -> Result<Arc<QuicTransport>, String> {
    let admission = Arc::new(dir.admission());
    QuicTransport::bind(dir.key(), listen, admission, QuicConfig::default())
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// Starts a primary from `dir`, listening on `listen`, a member of the mesh
/// reachable at `advertise` (see [`MeshSettings::reachable_at`]).
pub fn primary(
    dir: &Path,
    listen: SocketAddr,
    advertise: &[SocketAddr],
    config: NodeConfig,
) -> Result<Parts<Primary>, String> {
    let dir = open_dir(dir)?;
    let (key, store) = (dir.key(), dir.store());
    let (ledger, hub) = ledger(&dir)?;
    let transport = quic(&dir, listen)?;
    let addr = transport.local_addr();
    let echo: Arc<dyn CommandHandler> = Arc::new(FnHandler(|a: &serde_json::Value| Ok(a.clone())));
    let node = dir
        .builder(transport, config)
        .ledger(ledger.clone())
        .ledger_sync(hub)
        .policy(Arc::new(RuntimePolicy::new()))
        // What workers may ask for, if their policy allows: `echo` returns its arguments.
        .handler("echo", echo)
        .mesh(MeshSettings::reachable_at(addr, advertise))
        .start_primary()
        .map_err(|e| e.to_string())?;
    Ok(Parts {
        node,
        key,
        store,
        ledger: Some(ledger),
        addr,
    })
}

/// Starts a worker from `dir` with the actions it offers; it reconnects to
/// its primary by itself if it is paired already.
pub fn worker(
    dir: &DataDir,
    listen: SocketAddr,
    config: NodeConfig,
    metrics: Arc<dyn MetricsSource>,
    actions: Vec<(&str, Arc<dyn CommandHandler>)>,
) -> Result<Parts<Worker>, String> {
    let (key, store) = (dir.key(), dir.store());
    let (ledger, hub) = ledger(dir)?;
    let transport = quic(dir, listen)?;
    let addr = transport.local_addr();
    // The worker's own ledger (its registry changes and command
    // decisions), pulled by its primary each time the session opens.
    let mut builder = dir
        .builder(transport, config)
        .metrics(metrics)
        .ledger(ledger.clone())
        .ledger_sync(hub);
    for (name, handler) in actions {
        builder = builder.handler(name, handler);
    }
    let node = builder.start_worker().map_err(|e| e.to_string())?;
    Ok(Parts {
        node,
        key,
        store,
        ledger: Some(ledger),
        addr,
    })
}

/// `ledger.verify` for the admin socket: the same check as `meshctl ledger verify`.
pub fn ledger_check(store: Arc<dyn Storage>, author: NodeId) -> LedgerCheck {
    Arc::new(move || {
        let report = verify_ledger(store.as_ref(), &author, None).map_err(|e| e.to_string())?;
        Ok(json!({
            "ok": report.ok(),
            "records": report.records,
            "first_bad": report.first_bad,
            "problem": report.problem.as_ref().map(ToString::to_string),
        }))
    })
}

/// Prints `events` (text, or JSON lines with `json`; not `device.heartbeat`,
/// one per heartbeat of every device) until Ctrl-C or the
/// bus closes.
pub async fn print_events(mut events: mesh_core::events::Subscription, json: bool) {
    use mesh_core::events::Received;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return,
            received = events.recv() => match received {
                // One per heartbeat of every device: too many to print.
                Some(Received::Event(e)) if e.kind == mesh_core::events::kinds::DEVICE_HEARTBEAT => {}
                Some(Received::Event(e)) => {
                    if json {
                        println!("{}", json!({ "kind": e.kind, "at_ms": e.at.as_millis(), "data": e.data }));
                    } else {
                        println!("{:<26} {}", e.kind, e.data);
                    }
                }
                Some(Received::Lagged { missed }) => println!("({missed} events not shown)"),
                None => return,
            },
        }
    }
}

/// Runs a binary's async main on a multi-threaded runtime; errors go to
/// stderr as `NAME: error` with exit code 1.
pub fn block_on(
    name: &str,
    main: impl std::future::Future<Output = Result<(), String>>,
) -> std::process::ExitCode {
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|runtime| runtime.block_on(main));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
