//! `meshctl`: the admin command line of the mesh SDK.
//!
//! Output is JSON on stdout. Exit codes: 0 success; 2 bad usage or invalid
//! input, with `{"error": {"kind": "...", "message": "..."}}` on stdout.
//! More commands (pairing, devices, policies, health, ledger) arrive with the
//! issues that build those parts.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mesh_core::identity::{IdentityError, NodeId, NodeKey};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(
    name = "meshctl",
    version,
    about = "Admin CLI of the mesh SDK (JSON output)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Node identity: create or show a node key.
    #[command(subcommand)]
    Identity(IdentityCmd),
}

#[derive(Subcommand, Debug)]
enum IdentityCmd {
    /// Create a new node key file (mode 0600); refuses to overwrite one.
    Init {
        /// Where to write the key (PKCS#8 PEM).
        #[arg(long)]
        key: PathBuf,
    },
    /// Print the node id and fingerprint of a key file.
    Show {
        /// The key file.
        #[arg(long)]
        key: PathBuf,
    },
    /// Check a printed node id and show its fingerprint.
    Parse {
        /// The node id (52 base32 characters).
        node_id: String,
    },
}

fn identity_json(key: &NodeKey) -> serde_json::Value {
    let id = key.node_id();
    json!({ "node_id": id.to_string(), "fingerprint": id.fingerprint().to_string() })
}

fn identity_error_kind(e: &IdentityError) -> &'static str {
    match e {
        IdentityError::NotFound { .. } => "not_found",
        IdentityError::InsecurePermissions { .. } => "insecure_permissions",
        IdentityError::Truncated { .. } => "truncated",
        IdentityError::WrongKind { .. } => "wrong_kind",
        IdentityError::Malformed { .. } => "malformed",
        IdentityError::AlreadyExists { .. } => "already_exists",
        _ => "io",
    }
}

fn run(cli: Cli) -> Result<serde_json::Value, (&'static str, String)> {
    match cli.command {
        Command::Identity(IdentityCmd::Init { key }) => {
            let k = NodeKey::generate();
            k.save(&key)
                .map_err(|e| (identity_error_kind(&e), e.to_string()))?;
            let mut out = identity_json(&k);
            out["key_file"] = json!(key.display().to_string());
            Ok(out)
        }
        Command::Identity(IdentityCmd::Show { key }) => NodeKey::load(&key)
            .map(|k| identity_json(&k))
            .map_err(|e| (identity_error_kind(&e), e.to_string())),
        Command::Identity(IdentityCmd::Parse { node_id }) => node_id
            .parse::<NodeId>()
            .map(|id| json!({ "node_id": id.to_string(), "fingerprint": id.fingerprint().to_string() }))
            .map_err(|e| ("invalid_node_id", e.to_string())),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err((kind, message)) => {
            println!(
                "{}",
                json!({ "error": { "kind": kind, "message": message } })
            );
            ExitCode::from(2)
        }
    }
}
