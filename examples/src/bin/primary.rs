//! The reference desktop primary.
//!
//! ```text
//! primary [--data-dir DIR] [--listen ADDR] [--mdns on|off] [--interface all|loopback|NAME]
//!         [--name NAME] [--json] [--advertise ADDR]... [--join TOKEN]
//! ```
//!
//! Keeps its identity, devices, policies, actions and audit ledger in the
//! data directory (SQLite), listens for QUIC, optionally advertises itself
//! over mDNS, serves `meshctl` on `DIR/admin.sock` (mode 0600) and prints
//! its events. It is a member of the mesh of nodes (`meshctl mesh …`);
//! `--join TOKEN` joins a mesh at start (a node that joined before rejoins
//! from its stored member table by itself). Ctrl-C stops it cleanly.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use mesh_core::node::{NodeConfig, Role};
use mesh_examples::{admin, setup};
use mesh_transport::mdns::{Advertisement, Interfaces, MdnsDiscovery};

#[derive(Parser, Debug)]
#[command(
    name = "primary",
    version,
    about = "The mesh SDK's reference desktop primary"
)]
struct Args {
    /// Where the key, database and admin socket live.
    #[arg(long, default_value = "mesh-primary")]
    data_dir: PathBuf,
    /// QUIC listen address.
    #[arg(long, default_value = "0.0.0.0:4433")]
    listen: std::net::SocketAddr,
    /// Advertise over mDNS.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    mdns: String,
    /// mDNS interfaces: all, loopback, or an interface name.
    #[arg(long, default_value = "all")]
    interface: Interfaces,
    /// Display name.
    #[arg(long, default_value = "mesh primary")]
    name: String,
    /// Print events as JSON lines.
    #[arg(long)]
    json: bool,
    /// Where other mesh members reach this node (repeatable, at most 4;
    /// default: the listen address, loopback if it is 0.0.0.0).
    #[arg(long)]
    advertise: Vec<std::net::SocketAddr>,
    /// Join the mesh through this token at start.
    #[arg(long)]
    join: Option<String>,
}

async fn run(args: Args) -> Result<(), String> {
    let config = NodeConfig::new(Role::Primary, &args.name, "primary");
    let parts = setup::primary(&args.data_dir, args.listen, &args.advertise, config)?;
    let node = parts.node.clone();
    let socket = admin::socket_path(&args.data_dir);
    let check = setup::ledger_check(parts.store.clone(), parts.key.node_id());
    let _admin = admin::serve(&socket, node.clone(), check).map_err(|e| e.to_string())?;
    let _mdns = if args.mdns == "on" {
        let mdns = MdnsDiscovery::start_for_node(
            node.node_id(),
            args.interface.clone(),
            parts.store.clone(),
            node.events().clone(),
        )
        .map_err(|e| e.to_string())?;
        mdns.advertise(&Advertisement {
            name: args.name.clone(),
            platform: "desktop".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            port: parts.addr.port(),
        })
        .map_err(|e| e.to_string())?;
        Some(mdns)
    } else {
        None
    };
    println!(
        "primary {} ({})",
        node.node_id(),
        node.node_id().fingerprint()
    );
    println!(
        "listening on {} (QUIC); admin socket {}",
        parts.addr,
        socket.display()
    );
    println!(
        "workers connect with: worker --connect {}@{}",
        node.node_id(),
        parts.addr
    );
    let events = node.subscribe("*", 1024).map_err(|e| e.to_string())?;
    if let Some(token) = &args.join {
        match node.join_mesh(token).await {
            Ok(peers) => println!("joined the mesh: {peers} members known"),
            Err(e) => {
                node.shutdown().await;
                let _ = std::fs::remove_file(&socket);
                return Err(format!("cannot join the mesh: {e}"));
            }
        }
    }
    setup::print_events(events, args.json).await;
    println!("shutting down");
    node.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

fn main() -> ExitCode {
    setup::block_on("primary", run(Args::parse()))
}
