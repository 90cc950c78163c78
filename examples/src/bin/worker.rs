//! The reference worker.
//!
//! ```text
//! worker [--data-dir DIR] (--connect NODE_ID@ADDR | --mdns) [--interface all|loopback|NAME]
//!        [--primary-fingerprint FP] [--name NAME] [--json]
//! ```
//!
//! With `--mdns` it prints the name and fingerprint of the primary it
//! found. Anyone on the network can advertise a primary; pass
//! `--primary-fingerprint` (as `primary` prints it) to pair only with that
//! one. A wrong primary gets 5 guesses of the code at most either way.
//!
//! On first start it asks the primary to pair and prints the 6-digit code to
//! type on the primary (`meshctl pairing approve CODE`); once paired it keeps
//! a session with the primary (reconnecting by itself), sends heartbeats with
//! this machine's metrics, and prints its activity. Actions it offers to the
//! primary's `run_action`: `echo` (returns its arguments) and `metrics`
//! (returns a fresh metrics sample).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use mesh_core::discovery::Discovery;
use mesh_core::identity::{Fingerprint, NodeId};
use mesh_core::node::{CommandHandler, FnHandler, MetricsSource, NodeConfig, Role, Worker};
use mesh_core::transport::PeerAddr;
use mesh_examples::{metrics::SystemMetrics, setup};
use mesh_transport::mdns::{Interfaces, MdnsDiscovery};
use mesh_transport::static_peers::StaticPeer;
use serde_json::Value;

#[derive(Parser, Debug)]
#[command(name = "worker", version, about = "The mesh SDK's reference worker")]
struct Args {
    /// Where the key and database live.
    #[arg(long, default_value = "mesh-worker")]
    data_dir: PathBuf,
    /// The primary: NODE_ID@ADDRESS (as the primary prints it).
    #[arg(long)]
    connect: Option<StaticPeer>,
    /// Find the primary over mDNS instead.
    #[arg(long)]
    mdns: bool,
    /// mDNS interfaces: all, loopback, or an interface name.
    #[arg(long, default_value = "all")]
    interface: Interfaces,
    /// Pair only with the primary of this fingerprint (as the primary
    /// prints it, e.g. k3x9-a7bq-m2pd-zw4t).
    #[arg(long)]
    primary_fingerprint: Option<Fingerprint>,
    /// Display name.
    #[arg(long, default_value = "mesh worker")]
    name: String,
    /// Hardware/app id (default: derived from the node key).
    #[arg(long)]
    device_id: Option<String>,
    /// Once connected, send this command to the primary (its policy
    /// decides) and print the outcome.
    #[arg(long)]
    send: Option<String>,
    /// Arguments of --send (JSON).
    #[arg(long, default_value = "{}")]
    args: String,
    /// Once paired, send this file to the primary (the device needs the
    /// `files:write` scope and a policy allowing `files.send`); prints
    /// `file ID: sending NAME (SIZE bytes, hash HASH)` and then
    /// `file ID: done` or `file ID: failed: REASON`. The transfer resumes
    /// by itself after a dropped connection or a restart of either side.
    #[arg(long)]
    send_file: Option<std::path::PathBuf>,
    /// Print events as JSON lines.
    #[arg(long)]
    json: bool,
}

async fn find_primary(
    args: &Args,
    node: &Worker,
    store: Arc<dyn mesh_core::storage::Storage>,
) -> Result<(NodeId, Vec<PeerAddr>), String> {
    let pinned = args.primary_fingerprint;
    if let Some(peer) = &args.connect {
        if let Some(fp) = pinned
            && peer.node.fingerprint() != fp
        {
            return Err(format!(
                "the node in --connect has fingerprint {}, not {fp}",
                peer.node.fingerprint()
            ));
        }
        if peer.addresses.is_empty() {
            return Err("no address".into());
        }
        let addrs = peer
            .addresses
            .iter()
            .map(|a| PeerAddr::Socket(*a))
            .collect();
        return Ok((peer.node, addrs));
    }
    if !args.mdns {
        return Err("not paired yet: pass --connect NODE_ID@ADDR or --mdns".into());
    }
    let mdns = MdnsDiscovery::start_for_node(
        node.node_id(),
        args.interface.clone(),
        store,
        node.events().clone(),
    )
    .map_err(|e| e.to_string())?;
    println!("looking for a primary over mDNS…");
    let mut ignored = std::collections::HashSet::new();
    for _ in 0..30 {
        let found = mdns
            .discover(Duration::from_secs(1))
            .await
            .map_err(|e| e.to_string())?;
        for n in &found {
            if let Some(fp) = pinned
                && n.node.fingerprint() != fp
                && ignored.insert(n.node)
            {
                println!(
                    "ignoring {} ({}): not the pinned primary {fp}",
                    n.name,
                    n.node.fingerprint()
                );
            }
        }
        let wanted = |n: &&mesh_core::storage::records::DiscoveredNodeRecord| {
            !n.addresses.is_empty() && pinned.is_none_or(|fp| n.node.fingerprint() == fp)
        };
        if let Some(n) = found.iter().find(wanted) {
            // Tried in this order until one connects.
            let ordered = mesh_core::discovery::dial_order(&n.addresses);
            let shown: Vec<String> = ordered.iter().map(ToString::to_string).collect();
            println!(
                "found primary {:?} fingerprint {} at {}{}",
                n.name,
                n.node.fingerprint(),
                shown.join(", "),
                if pinned.is_some() { " (pinned)" } else { "" }
            );
            return Ok((n.node, ordered.into_iter().map(PeerAddr::Socket).collect()));
        }
    }
    Err("no primary found over mDNS within 30 s".into())
}

async fn run(args: Args) -> Result<(), String> {
    let device_id = args.device_id.clone();
    let metrics = Arc::new(SystemMetrics::new());
    let sampler = metrics.clone();
    let dir = setup::open_dir(&args.data_dir)?;
    let device_id =
        device_id.unwrap_or_else(|| format!("worker-{}", dir.key().node_id().fingerprint()));
    let config = NodeConfig::new(Role::Worker, &args.name, &device_id)
        .heartbeat_interval(Duration::from_secs(2));
    let listen = "0.0.0.0:0".parse().map_err(|e| format!("{e}"))?;
    let echo: Arc<dyn CommandHandler> = Arc::new(FnHandler(|a: &Value| Ok(a.clone())));
    let sample: Arc<dyn CommandHandler> = Arc::new(FnHandler(move |_: &Value| {
        serde_json::to_value(sampler.sample()).map_err(|e| e.to_string())
    }));
    let parts = setup::worker(
        &dir,
        listen,
        config,
        metrics,
        vec![("echo", echo), ("metrics", sample)],
    )?;
    let node = parts.node.clone();
    println!(
        "worker {} ({})",
        node.node_id(),
        node.node_id().fingerprint()
    );
    let events = node.subscribe("*", 1024).map_err(|e| e.to_string())?;
    if let Some(name) = args.send.clone() {
        let command_args: Value =
            serde_json::from_str(&args.args).map_err(|e| format!("--args: {e}"))?;
        let mut connected = node
            .subscribe("session.connected", 4)
            .map_err(|e| e.to_string())?;
        let sender = node.clone();
        tokio::spawn(async move {
            // Subscribed first, then checked: the session may already be open.
            if sender.is_connected() || connected.recv().await.is_some() {
                match sender.send_command(&name, command_args).await {
                    Ok(v) => println!("command {name}: ok {v}"),
                    Err(mesh_core::node::NodeError::Command { code, message }) => {
                        println!("command {name}: refused ({code}): {message}")
                    }
                    Err(e) => println!("command {name}: error: {e}"),
                }
            }
        });
    }
    match node.paired_primary().map_err(|e| e.to_string())? {
        Some(primary) => println!("paired with {}; connecting", primary.fingerprint()),
        None => {
            let (primary, addrs) = find_primary(&args, &node, parts.store.clone()).await?;
            let ticket = node
                .request_pairing_at(primary, &addrs)
                .await
                .map_err(|e| e.to_string())?;
            println!();
            println!("    pairing code: {}", ticket.code());
            println!(
                "    on the primary: meshctl pairing approve {}",
                ticket.code()
            );
            println!();
            ticket
                .finished()
                .await
                .map_err(|e| format!("pairing failed: {e}"))?;
            println!("paired");
        }
    }
    if let Some(path) = args.send_file.clone() {
        let primary = node
            .paired_primary()
            .map_err(|e| e.to_string())?
            .ok_or("not paired")?;
        let sender = node.clone();
        tokio::spawn(async move {
            match sender.send_file(&path, primary).await {
                Ok(t) => {
                    println!(
                        "file {}: sending {} ({} bytes, hash {})",
                        t.id, t.name, t.size, t.hash
                    );
                    match sender.wait_transfer(t.id).await {
                        Ok(t) if t.state == mesh_core::node::TransferState::Done => {
                            println!("file {}: done", t.id)
                        }
                        Ok(t) => println!(
                            "file {}: {}: {}",
                            t.id,
                            t.state.as_str(),
                            t.error.unwrap_or_default()
                        ),
                        Err(e) => println!("file {}: error: {e}", t.id),
                    }
                }
                Err(e) => println!("file: refused: {e}"),
            }
        });
    }
    setup::print_events(events, args.json).await;
    node.shutdown().await;
    Ok(())
}

fn main() -> ExitCode {
    setup::block_on("worker", run(Args::parse()))
}
