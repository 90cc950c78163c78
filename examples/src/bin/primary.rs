//! The reference desktop primary.
//!
//! ```text
//! primary [--data-dir DIR] [--listen ADDR] [--mdns on|off] [--interface all|loopback|NAME]
//!         [--name NAME] [--json] [--advertise ADDR]... [--join TOKEN]
//!         [--gateway ADDR [--gateway-tls CERT KEY | --gateway-insecure]
//!          [--gateway-origin ORIGIN]...]
//! ```
//!
//! Keeps its identity, devices, policies, actions and audit ledger in the
//! data directory (SQLite), listens for QUIC, optionally advertises itself
//! over mDNS, serves `meshctl` on `DIR/admin.sock` (mode 0600) and prints
//! its events. It is a member of the mesh of nodes (`meshctl mesh …`);
//! `--join TOKEN` joins a mesh at start (a node that joined before rejoins
//! from its stored member table by itself). With `--gateway ADDR` it also
//! serves the web dashboard and the WebSocket gateway (JSON-RPC 2.0 at
//! `/rpc`) on ADDR; the dashboard's admin token is in `DIR/admin.token`
//! (`meshctl gateway token rotate` makes a new one). Beyond loopback the
//! gateway needs TLS (`--gateway-tls CERT KEY`) unless
//! `--gateway-insecure`. Ctrl-C stops it cleanly.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use mesh_core::node::{NodeConfig, Role};
use mesh_examples::{admin, setup};
use mesh_transport::gateway::{ADMIN_TOKEN_FILE, Gateway, GatewayConfig, TlsFiles};
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
    /// Serve the dashboard and the WebSocket gateway here (off by default).
    #[arg(long)]
    gateway: Option<std::net::SocketAddr>,
    /// The gateway's TLS certificate chain and private key (PEM files).
    #[arg(long, num_args = 2, value_names = ["CERT", "KEY"])]
    gateway_tls: Option<Vec<PathBuf>>,
    /// Serve the gateway beyond loopback without TLS (tokens cross the
    /// network in the clear).
    #[arg(long)]
    gateway_insecure: bool,
    /// Also let pages from this origin open the gateway's WebSocket
    /// (repeatable; the dashboard's own origin always may).
    #[arg(long)]
    gateway_origin: Vec<String>,
}

async fn run(args: Args) -> Result<(), String> {
    let config = NodeConfig::new(Role::Primary, &args.name, "primary");
    let parts = setup::primary(&args.data_dir, args.listen, &args.advertise, config)?;
    let node = parts.node.clone();
    let socket = admin::socket_path(&args.data_dir);
    let check = setup::ledger_check(parts.store.clone(), parts.key.node_id());
    let mut hooks = admin::Hooks::ledger(check);
    let gateway = match args.gateway {
        Some(addr) => {
            let mut config = GatewayConfig::new(addr, &args.data_dir)
                .insecure(args.gateway_insecure)
                .allowed_origins(args.gateway_origin.clone())
                .dashboard(
                    &args.name,
                    Some(format!(
                        "worker --data-dir mesh-worker --connect {}@{} --primary-fingerprint {}",
                        node.node_id(),
                        parts.addr,
                        node.node_id().fingerprint()
                    )),
                );
            if let Some(files) = &args.gateway_tls
                && let [cert, key] = files.as_slice()
            {
                config = config.tls(TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                });
            }
            let tls = config.tls.is_some();
            let token_file = config.admin_token.clone();
            let g = match Gateway::start(node.clone(), config).await {
                Ok(g) => Arc::new(g),
                Err(e) => {
                    node.shutdown().await;
                    return Err(format!("cannot start the gateway: {e}"));
                }
            };
            let rotating = g.clone();
            hooks.rotate_admin_token = Some(Arc::new(move || {
                rotating
                    .rotate_admin_token()
                    .map(|t| (t.to_string(), token_file.display().to_string()))
                    .map_err(|e| e.to_string())
            }));
            println!(
                "dashboard on {}://{} (admin token in {})",
                if tls { "https" } else { "http" },
                g.local_addr(),
                args.data_dir.join(ADMIN_TOKEN_FILE).display()
            );
            Some(g)
        }
        None => None,
    };
    let _admin = admin::serve(&socket, node.clone(), hooks).map_err(|e| e.to_string())?;
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
    drop(gateway);
    node.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

fn main() -> ExitCode {
    setup::block_on("primary", run(Args::parse()))
}
