//! `meshctl`: the admin command line of the mesh SDK.
//!
//! Output is JSON on stdout. Exit codes: 0 success; 2 bad usage or invalid
//! input, with `{"error": {"kind": "...", "message": "..."}}` on stdout.
//!
//! Error kinds: `io` (a file cannot be read); identity: `not_found`,
//! `insecure_permissions`, `truncated`, `wrong_kind`, `malformed`,
//! `already_exists`, `invalid_node_id`; policy: `invalid_document`,
//! `invalid_glob`, `invalid_hour_window`, `invalid_limit`, `invalid_context`;
//! health: `invalid_report` (not JSON, unknown types), `invalid_metric` (out of range).
//! More commands (pairing, devices, policies, health, ledger) arrive with the
//! issues that build those parts.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mesh_core::clock::{Clock, SystemClock};
use mesh_core::identity::{IdentityError, NodeId, NodeKey};
use mesh_policy::{ContextDocument, Policy};
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
    /// Execution policies: check what a policy decides.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Device health: score a heartbeat report.
    #[command(subcommand)]
    Health(HealthCmd),
}

#[derive(Subcommand, Debug)]
enum HealthCmd {
    /// Score one heartbeat report with no history.
    ///
    /// Prints {"score": N, "status": "healthy|degraded"} (degraded below 50) and exits 0.
    Score {
        /// The report (JSON): latency_ms, battery_percent, charging,
        /// memory_percent, cpu_percent, disk_free_gb, sync_lag_ms,
        /// messages_pending, thermal, low_power_mode; all optional.
        #[arg(long)]
        report: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Resolve one command against a policy file and print the decision.
    ///
    /// Prints {"decision": "allow|deny|needs_approval|defer", "reason": CODE,
    /// "message": TEXT, "defer_ms": N (defer only)} and exits 0.
    Check {
        /// The policy document (JSON).
        #[arg(long)]
        policy: PathBuf,
        /// The command name, e.g. chat.send.
        #[arg(long)]
        command: String,
        /// The request context (JSON); absent: now, no usage, no power state.
        #[arg(long)]
        context: Option<PathBuf>,
    },
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

type Failure = (&'static str, String);

fn read_file(path: &std::path::Path) -> Result<String, Failure> {
    std::fs::read_to_string(path)
        .map_err(|e| ("io", format!("cannot read {}: {e}", path.display())))
}

fn policy_check(
    policy: &std::path::Path,
    command: &str,
    context: Option<&std::path::Path>,
) -> Result<serde_json::Value, Failure> {
    let policy = Policy::from_json(&read_file(policy)?).map_err(|e| (e.kind(), e.to_string()))?;
    let context = match context {
        Some(path) => ContextDocument::from_json(&read_file(path)?),
        None => Ok(ContextDocument::default()),
    }
    .and_then(|doc| doc.into_context(SystemClock.now().as_millis()))
    .map_err(|e| ("invalid_context", e.to_string()))?;
    Ok(policy.resolve(command, &context).to_json())
}

fn health_score(report: &std::path::Path) -> Result<serde_json::Value, Failure> {
    let metrics: mesh_core::wire::HealthMetrics = serde_json::from_str(&read_file(report)?)
        .map_err(|e| ("invalid_report", format!("{}: {e}", report.display())))?;
    mesh_core::health::validate(&metrics).map_err(|e| (e.kind(), e.to_string()))?;
    let config = mesh_core::health::HealthConfig::default();
    let score = mesh_core::health::score(&metrics, &config.score);
    let status = mesh_core::health::HealthStatus::of_score(score, config.degraded_below);
    Ok(json!({ "score": score, "status": status.as_str() }))
}

fn run(cli: Cli) -> Result<serde_json::Value, Failure> {
    match cli.command {
        Command::Health(HealthCmd::Score { report }) => health_score(&report),
        Command::Policy(PolicyCmd::Check {
            policy,
            command,
            context,
        }) => policy_check(&policy, &command, context.as_deref()),
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
