//! `meshctl`: the admin command line of the mesh SDK.
//!
//! Output is JSON on stdout. Exit codes: 0 success; 2 bad usage (kind
//! `usage`) or invalid input, with `{"error": {"kind": "...", "message":
//! "..."}}` on stdout.
//!
//! Error kinds: `io` (a file cannot be read); identity: `not_found`,
//! `insecure_permissions`, `truncated`, `wrong_kind`, `malformed`,
//! `already_exists`, `invalid_node_id`; policy: `invalid_document`,
//! `invalid_glob`, `invalid_hour_window`, `invalid_limit`, `invalid_context`;
//! health: `invalid_report` (not JSON, unknown types), `invalid_metric` (out of range);
//! ledger: `invalid_entry`, `storage`, `damaged` (append to a ledger that does
//! not verify), `ambiguous_ledger`.
//!
//! `meshctl ledger verify` is the exception to "0 or 2": it exits 0 when the
//! ledger verifies, 1 when it does not (the report says where and why), 2 on
//! usage errors. More commands (pairing, devices, policies) arrive with the
//! node runtime.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use mesh_core::clock::{Clock, SystemClock};
use mesh_core::identity::{IdentityError, NodeId, NodeKey};
use mesh_core::ledger::{Body, Entry, Ledger, LedgerError, validate_record_type};
use mesh_core::storage::{SqliteStorage, Storage};
use mesh_core::wire::JsonText;
use mesh_examples::admin;
use mesh_ledger::{LedgerConfig, Replica, SignedLedger, ledger_authors, verify_ledger};
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
    /// The audit ledger: append, verify, show.
    #[command(subcommand)]
    Ledger(LedgerCmd),
    /// Pairing requests on a running primary.
    #[command(subcommand)]
    Pairing(PairingCmd),
    /// Paired devices of a running primary.
    #[command(subcommand)]
    Devices(DevicesCmd),
    /// Approval-gated actions on a running primary.
    #[command(subcommand)]
    Actions(ActionsCmd),
    /// The mesh of nodes, on a running primary (always JSON).
    #[command(subcommand)]
    Mesh(MeshCmd),
    /// Replicated configuration of a running primary, shared with its mesh
    /// (always JSON).
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Replicated state's sync with the mesh's members (always JSON).
    #[command(subcommand)]
    Sync(SyncCmd),
    /// Reliable messages to mesh members (always JSON).
    #[command(subcommand)]
    Deliver(DeliverCmd),
    /// Files between the primary and its devices.
    #[command(subcommand)]
    Files(FilesCmd),
    /// The primary's WebSocket gateway (always JSON).
    #[command(subcommand)]
    Gateway(GatewayCmd),
    /// A running primary's events.
    Events {
        /// Keep printing events as they come (until interrupted).
        #[arg(long)]
        follow: bool,
        /// Event kinds to show (glob, e.g. `pairing.*`).
        #[arg(long, default_value = "*")]
        pattern: String,
        #[command(flatten)]
        target: Target,
    },
}

/// Which running primary to talk to: its admin socket.
#[derive(clap::Args, Debug, Clone)]
struct Target {
    /// The primary's data directory (its admin socket is DIR/admin.sock).
    #[arg(long, default_value = "mesh-primary")]
    data_dir: PathBuf,
    /// The admin socket itself (overrides --data-dir).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

impl Target {
    fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| admin::socket_path(&self.data_dir))
    }
}

#[derive(Subcommand, Debug)]
enum PairingCmd {
    /// Pending pairing requests.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Approve with the 6-digit code the device shows.
    Approve {
        /// The code.
        code: String,
        /// The request (needed when several are pending).
        #[arg(long)]
        request: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Reject a request.
    Reject {
        /// The request id.
        request: String,
        /// Why (shown on the device).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Set KEY to a JSON value. Prints {"key", "value", "version": {"hlc", "node"}}.
    Set {
        /// The key.
        key: String,
        /// The value, as JSON (`42`, `"text"`, `{"a": 1}`).
        value: String,
        #[command(flatten)]
        target: Target,
    },
    /// Show KEY (error kind not_found if unset).
    Get {
        /// The key.
        key: String,
        #[command(flatten)]
        target: Target,
    },
    /// Every key, sorted. Prints {"entries": [{"key", "value", "version"}]}.
    List {
        /// Only keys starting with this.
        #[arg(long)]
        prefix: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Delete KEY (error kind not_found if unset).
    Delete {
        /// The key.
        key: String,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand, Debug)]
enum DeliverCmd {
    /// Send TEXT to member NODE_ID. Prints {"id", "acknowledged"}; waits
    /// for the acknowledgement unless --no-wait (error kind timeout after
    /// --timeout; delivery goes on).
    Send {
        /// The recipient.
        node_id: String,
        /// The message.
        text: String,
        /// Return once the message is durable in the outbox.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for the acknowledgement: 30s, 2m (default 30s).
        #[arg(long, value_parser = parse_ttl, default_value = "30s")]
        timeout: u64,
        #[command(flatten)]
        target: Target,
    },
    /// Take messages from the inbox (each is handed over once). Prints
    /// {"messages": [{"id", "from", "seq", "text", "received_at_ms"}]}.
    Receive {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        max: usize,
        /// Wait this long for one if none is there: 500ms, 5s (default 0s).
        #[arg(long, value_parser = parse_ttl, default_value = "0s")]
        wait: u64,
        #[command(flatten)]
        target: Target,
    },
    /// Letters in flight. Prints {"outbox", "inbox", "relayed"}.
    Status {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand, Debug)]
enum GatewayCmd {
    /// The dashboard's admin token.
    #[command(subcommand)]
    Token(GatewayTokenCmd),
}

#[derive(Subcommand, Debug)]
enum GatewayTokenCmd {
    /// Make a new admin token (written to DATA_DIR/admin.token, mode 0600);
    /// the old one stops working and its sockets close. Prints {"token",
    /// "file"}.
    Rotate {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand, Debug)]
enum FilesCmd {
    /// Send the file at PATH to a device (node id, device id or name).
    /// Prints {"id", "hash", "name", "size"}; the transfer goes on in the
    /// background (see `files list`).
    Send {
        /// The file.
        path: std::path::PathBuf,
        /// The device.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        target: Target,
    },
    /// Every transfer, in and out. Prints {"transfers": [{"id", "hash",
    /// "name", "size", "received", "state", "peer", "direction"}]}.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Cancel transfer ID (both sides stop).
    Cancel {
        /// The transfer.
        id: String,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand, Debug)]
enum SyncCmd {
    /// Per member: when it last synced, changes it lacks. Prints
    /// {"peers": [{"node_id", "last_sync_ms", "pending"}]}.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Sync with every member now (it also runs by itself).
    Now {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand, Debug)]
enum MeshCmd {
    /// Issue a join token. Prints {"token", "id", "issuer", "expires_at_ms"}.
    Token {
        /// How long it is valid: 24h, 30m, 90s, 2d, 500ms (default 24h).
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<u64>,
        #[command(flatten)]
        target: Target,
    },
    /// Join the mesh through a token. Prints {"joined": true, "peers": N}.
    Join {
        /// The token (mj1.…).
        token: String,
        #[command(flatten)]
        target: Target,
    },
    /// Tokens this node issued (never their secrets); `tokens revoke ID`.
    Tokens {
        #[command(subcommand)]
        action: Option<TokensCmd>,
        #[command(flatten)]
        target: Target,
    },
    /// This node and the members it knows.
    Peers {
        #[command(flatten)]
        target: Target,
    },
    /// Take a new name in the mesh.
    Rename {
        /// The name (1 to 64 bytes).
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Leave the mesh (members see peer.left at once).
    Leave {
        #[command(flatten)]
        target: Target,
    },
    /// Block a node from the whole mesh.
    Block {
        /// Its node id.
        node_id: String,
        /// Why (recorded in the ledger).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Lift a block.
    Unblock {
        /// Its node id.
        node_id: String,
        #[command(flatten)]
        target: Target,
    },
    /// Broadcast a text on a topic to every member.
    Broadcast {
        /// The topic.
        topic: String,
        /// The text.
        body: String,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand, Debug)]
enum TokensCmd {
    /// Revoke a token by its id.
    Revoke {
        /// The token's id (from `mesh tokens`).
        id: String,
        #[command(flatten)]
        target: Target,
    },
}

/// A lifetime: a number and a unit (ms, s, m, h, d), in milliseconds.
fn parse_ttl(text: &str) -> Result<u64, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (n, unit) = text.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{text:?} is not a lifetime like 24h, 30m, 90s"))?;
    let scale = match unit {
        "ms" => 1,
        "s" | "" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("unknown unit {unit:?} (ms, s, m, h, d)")),
    };
    match n.checked_mul(scale) {
        Some(0) => Err("a lifetime must be more than zero".into()),
        Some(ms) if ms <= 365 * 86_400_000 => Ok(ms),
        _ => Err("a lifetime is at most 365 days".into()),
    }
}

#[derive(Subcommand, Debug)]
enum DevicesCmd {
    /// Paired devices with liveness and health.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Remove a device; its session closes now.
    Unpair {
        /// Node id, hardware/app id or name.
        device: String,
        #[command(flatten)]
        target: Target,
    },
    /// Revoke a device; it is refused from now on.
    Revoke {
        /// Node id, hardware/app id or name.
        device: String,
        #[command(flatten)]
        target: Target,
    },
    /// Replace a device's scopes (e.g. add `files:write`, `sync:*`).
    /// Prints {"device", "scopes"}.
    Scopes {
        /// Node id, hardware/app id or name.
        device: String,
        /// The scopes it holds from now on.
        #[arg(required = true)]
        scopes: Vec<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Rotate a device's token: the connected device stores the new one
    /// and acknowledges, then the old one is refused. An offline device
    /// fails with device_offline unless --force (it must then pair again).
    Rotate {
        /// Node id, hardware/app id or name.
        device: String,
        /// Rotate without the device's acknowledgement.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand, Debug)]
enum ActionsCmd {
    /// Actions, newest first.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Approve a proposed action (it runs now).
    Approve {
        /// The action id.
        id: String,
        #[command(flatten)]
        target: Target,
    },
    /// Reject a proposed action.
    Reject {
        /// The action id.
        id: String,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand, Debug)]
enum LedgerCmd {
    /// Append one record signed by KEYFILE's node (both files are created if
    /// missing). Prints {"author": ID, "seq": N, "records": TOTAL}.
    Append {
        /// The SQLite database.
        #[arg(long)]
        db: PathBuf,
        /// The node key (PKCS#8 PEM, mode 0600).
        #[arg(long)]
        key: PathBuf,
        /// Record type, e.g. policy.set (a-z 0-9 . _ -).
        #[arg(long = "type")]
        record_type: String,
        /// Record body (JSON).
        #[arg(long)]
        body: String,
    },
    /// Verify a ledger end to end. Prints {"ok": bool, "records": N,
    /// "first_bad": index-or-null, "problem": text-or-null}; exits 0 when ok,
    /// 1 when not.
    Verify {
        /// The SQLite database.
        #[arg(long)]
        db: PathBuf,
        /// Whose ledger, when the database holds several.
        #[arg(long)]
        author: Option<String>,
    },
    /// The ledgers a running primary holds: its own and its replicas of
    /// members', with size, latest checkpoint and any fork evidence. Prints
    /// {"ledgers": [{"author", "own", "records", "checkpoint": {"size",
    /// "root"}, "fork": {"reason", "first", "second"} | null}]}.
    Replicas {
        #[command(flatten)]
        target: Target,
    },
    /// Print records. Prints {"author": ID, "records": [...]}.
    Show {
        /// The SQLite database.
        #[arg(long)]
        db: PathBuf,
        /// First record.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Most records to print.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Whose ledger, when the database holds several.
        #[arg(long)]
        author: Option<String>,
    },
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
    /// Set a device's policy on a running primary.
    Set {
        /// Node id, hardware/app id or name.
        device: String,
        /// The policy document (a JSON file).
        #[arg(long)]
        file: PathBuf,
        #[command(flatten)]
        target: Target,
    },
    /// Show a device's policy on a running primary.
    Show {
        /// Node id, hardware/app id or name.
        device: String,
        #[command(flatten)]
        target: Target,
    },
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

fn open_db(db: &std::path::Path, create: bool) -> Result<Arc<dyn Storage>, Failure> {
    if !create && !db.exists() {
        return Err(("io", format!("{} does not exist", db.display())));
    }
    SqliteStorage::open(db)
        .map(|s| Arc::new(s) as Arc<dyn Storage>)
        .map_err(|e| ("storage", e.to_string()))
}

fn ledger_error(e: LedgerError) -> Failure {
    match e {
        LedgerError::InvalidEntry(m) => ("invalid_entry", m),
        LedgerError::Damaged { .. } => ("damaged", e.to_string()),
        other => ("storage", other.to_string()),
    }
}

/// The ledger to read: the one named, or the only one in the database.
fn ledger_author(store: &dyn Storage, author: Option<&str>) -> Result<Option<NodeId>, Failure> {
    if let Some(a) = author {
        return a
            .parse()
            .map(Some)
            .map_err(|e: mesh_core::identity::NodeIdError| ("invalid_node_id", e.to_string()));
    }
    let authors = ledger_authors(store).map_err(|e| ("storage", e.to_string()))?;
    match authors.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        many => Err((
            "ambiguous_ledger",
            format!("the database holds {} ledgers; pass --author", many.len()),
        )),
    }
}

fn ledger_append(
    db: &std::path::Path,
    key: &std::path::Path,
    record_type: &str,
    body: &str,
) -> Result<serde_json::Value, Failure> {
    // Check the input before creating any file.
    let body =
        JsonText::new(body).map_err(|e| ("invalid_entry", format!("--body is not JSON: {e}")))?;
    validate_record_type(record_type).map_err(ledger_error)?;
    let (key, _) =
        NodeKey::load_or_generate(key).map_err(|e| (identity_error_kind(&e), e.to_string()))?;
    let key = Arc::new(key);
    let store = open_db(db, true)?;
    let ledger =
        SignedLedger::open(store, key.clone(), LedgerConfig::default()).map_err(ledger_error)?;
    let entry = Entry {
        record_type: record_type.to_owned(),
        actor: key.node_id(),
        body: Body::Json(body),
    };
    let appended = ledger
        .append(vec![entry], vec![], SystemClock.now())
        .map_err(ledger_error)?;
    Ok(json!({
        "author": key.node_id().to_string(),
        "seq": appended.first_seq,
        "records": ledger.len(),
    }))
}

fn ledger_verify(db: &std::path::Path, author: Option<&str>) -> Result<serde_json::Value, Failure> {
    let store = open_db(db, false)?;
    let Some(author) = ledger_author(store.as_ref(), author)? else {
        return Ok(json!({"ok": true, "records": 0, "first_bad": null, "problem": null}));
    };
    let report =
        verify_ledger(store.as_ref(), &author, None).map_err(|e| ("storage", e.to_string()))?;
    Ok(json!({
        "ok": report.ok(),
        "records": report.records,
        "first_bad": report.first_bad,
        "problem": report.problem.as_ref().map(ToString::to_string),
    }))
}

fn ledger_show(
    db: &std::path::Path,
    from: u64,
    limit: usize,
    author: Option<&str>,
) -> Result<serde_json::Value, Failure> {
    let store = open_db(db, false)?;
    let Some(author) = ledger_author(store.as_ref(), author)? else {
        return Ok(json!({"author": null, "records": []}));
    };
    let replica = Replica::open(store, author).map_err(ledger_error)?;
    let records = replica.view().records(from, limit).map_err(ledger_error)?;
    let records: Vec<serde_json::Value> = records
        .iter()
        .map(|r| {
            let body = match &r.body {
                Body::Json(j) => {
                    serde_json::from_str(j.as_str()).unwrap_or(serde_json::Value::Null)
                }
                Body::Bytes(b) => json!({ "hex": hex(b) }),
            };
            json!({
                "seq": r.seq,
                "timestamp_ms": r.timestamp.as_millis(),
                "actor": r.actor.to_string(),
                "type": r.record_type,
                "body": body,
                "prev_hash": hex(&r.prev_hash),
                "signed": r.signature.is_some(),
            })
        })
        .collect();
    Ok(json!({ "author": author.to_string(), "records": records }))
}

/// Text for the admin commands' answers (`--json` prints the JSON instead).
fn human(cmd: &str, v: &serde_json::Value) -> String {
    let rows =
        |v: &serde_json::Value, f: &dyn Fn(&serde_json::Value) -> String, empty: &str| match v
            .as_array()
        {
            Some(a) if !a.is_empty() => a.iter().map(f).collect::<Vec<_>>().join("\n"),
            _ => empty.to_owned(),
        };
    let s = |v: &serde_json::Value| {
        v.as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string())
    };
    match cmd {
        "pairing.list" => rows(
            v,
            &|r| {
                format!(
                    "{}  {} ({}, {})  node {}  {} attempts left",
                    s(&r["request"]),
                    s(&r["name"]),
                    s(&r["platform"]),
                    s(&r["device_id"]),
                    s(&r["node"]),
                    r["attempts_left"]
                )
            },
            "no pending pairing requests",
        ),
        "devices.list" => rows(
            v,
            &|d| {
                format!(
                    "{:<16} {:<8} {:<7} health {} score {}  node {}",
                    s(&d["name"]),
                    s(&d["status"]),
                    if d["online"] == true {
                        "online"
                    } else {
                        "offline"
                    },
                    s(&d["health"]),
                    s(&d["score"]),
                    s(&d["node"])
                )
            },
            "no paired devices",
        ),
        "actions.list" => rows(
            v,
            &|a| {
                format!(
                    "{}  {:<9} {}  from {}",
                    s(&a["id"]),
                    s(&a["state"]),
                    s(&a["command"]),
                    s(&a["device"])
                )
            },
            "no actions",
        ),
        "pairing.approve" => format!("paired {} ({})", s(&v["name"]), s(&v["paired"])),
        _ => serde_json::to_string_pretty(v).unwrap_or_default(),
    }
}

/// Runs an admin command against a running primary.
fn run_admin(target: &Target, cmd: &str, args: serde_json::Value) -> ExitCode {
    match admin::request(&target.socket(), cmd, args) {
        Ok(v) => {
            if target.json {
                println!("{v}");
            } else {
                println!("{}", human(cmd, &v));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!(
                "{}",
                json!({ "error": { "kind": e.kind, "message": e.message } })
            );
            ExitCode::from(2)
        }
    }
}

/// Runs an admin command whose answer is always JSON.
fn run_admin_json(target: &Target, cmd: &str, args: serde_json::Value) -> ExitCode {
    let target = Target {
        json: true,
        ..target.clone()
    };
    run_admin(&target, cmd, args)
}

fn mesh_command(command: &MeshCmd) -> ExitCode {
    match command {
        MeshCmd::Token { ttl, target } => {
            run_admin_json(target, "mesh.token", json!({ "ttl_ms": ttl }))
        }
        MeshCmd::Join { token, target } => {
            run_admin_json(target, "mesh.join", json!({ "token": token }))
        }
        MeshCmd::Tokens {
            action: None,
            target,
        } => run_admin_json(target, "mesh.tokens", json!({})),
        MeshCmd::Tokens {
            action: Some(TokensCmd::Revoke { id, target }),
            ..
        } => run_admin_json(target, "mesh.tokens.revoke", json!({ "id": id })),
        MeshCmd::Peers { target } => run_admin_json(target, "mesh.peers", json!({})),
        MeshCmd::Rename { name, target } => {
            run_admin_json(target, "mesh.rename", json!({ "name": name }))
        }
        MeshCmd::Leave { target } => run_admin_json(target, "mesh.leave", json!({})),
        MeshCmd::Block {
            node_id,
            reason,
            target,
        } => run_admin_json(
            target,
            "mesh.block",
            json!({ "node_id": node_id, "reason": reason }),
        ),
        MeshCmd::Unblock { node_id, target } => {
            run_admin_json(target, "mesh.unblock", json!({ "node_id": node_id }))
        }
        MeshCmd::Broadcast {
            topic,
            body,
            target,
        } => run_admin_json(
            target,
            "mesh.broadcast",
            json!({ "topic": topic, "body": body }),
        ),
    }
}

fn config_command(command: &ConfigCmd) -> ExitCode {
    match command {
        ConfigCmd::Set { key, value, target } => {
            let value: serde_json::Value = match serde_json::from_str(value) {
                Ok(v) => v,
                Err(e) => {
                    println!(
                        "{}",
                        json!({ "error": { "kind": "invalid_json", "message": format!("VALUE_JSON is not JSON: {e}") } })
                    );
                    return ExitCode::from(2);
                }
            };
            run_admin_json(target, "config.set", json!({ "key": key, "value": value }))
        }
        ConfigCmd::Get { key, target } => {
            run_admin_json(target, "config.get", json!({ "key": key }))
        }
        ConfigCmd::List { prefix, target } => {
            run_admin_json(target, "config.list", json!({ "prefix": prefix }))
        }
        ConfigCmd::Delete { key, target } => {
            run_admin_json(target, "config.delete", json!({ "key": key }))
        }
    }
}

/// The admin commands, if `command` is one.
fn admin_command(command: &Command) -> Option<ExitCode> {
    Some(match command {
        Command::Mesh(m) => mesh_command(m),
        Command::Config(c) => config_command(c),
        Command::Ledger(LedgerCmd::Replicas { target }) => {
            run_admin_json(target, "ledger.replicas", json!({}))
        }
        Command::Deliver(DeliverCmd::Send {
            node_id,
            text,
            no_wait,
            timeout,
            target,
        }) => run_admin_json(
            target,
            "deliver.send",
            json!({ "node_id": node_id, "text": text, "wait": !no_wait, "timeout_ms": timeout }),
        ),
        Command::Deliver(DeliverCmd::Receive { max, wait, target }) => run_admin_json(
            target,
            "deliver.receive",
            json!({ "max": max, "wait_ms": wait }),
        ),
        Command::Deliver(DeliverCmd::Status { target }) => {
            run_admin_json(target, "deliver.status", json!({}))
        }
        Command::Files(FilesCmd::Send { path, to, target }) => {
            // The primary reads the file where it is: give it a full path.
            match std::path::absolute(path) {
                Ok(path) => run_admin_json(
                    target,
                    "files.send",
                    json!({ "path": path.display().to_string(), "to": to }),
                ),
                Err(e) => {
                    println!(
                        "{}",
                        json!({ "error": { "kind": "invalid_argument", "message": format!("{}: {e}", path.display()) } })
                    );
                    ExitCode::from(2)
                }
            }
        }
        Command::Files(FilesCmd::List { target }) => {
            run_admin_json(target, "files.list", json!({}))
        }
        Command::Gateway(GatewayCmd::Token(GatewayTokenCmd::Rotate { target })) => {
            run_admin_json(target, "gateway.token.rotate", json!({}))
        }
        Command::Files(FilesCmd::Cancel { id, target }) => {
            run_admin_json(target, "files.cancel", json!({ "id": id }))
        }
        Command::Sync(SyncCmd::Status { target }) => {
            run_admin_json(target, "sync.status", json!({}))
        }
        Command::Sync(SyncCmd::Now { target }) => run_admin_json(target, "sync.now", json!({})),
        Command::Pairing(PairingCmd::List { target }) => {
            run_admin(target, "pairing.list", json!({}))
        }
        Command::Pairing(PairingCmd::Approve {
            code,
            request,
            target,
        }) => run_admin(
            target,
            "pairing.approve",
            json!({ "code": code, "request": request }),
        ),
        Command::Pairing(PairingCmd::Reject {
            request,
            reason,
            target,
        }) => run_admin(
            target,
            "pairing.reject",
            json!({ "request": request, "reason": reason }),
        ),
        Command::Devices(DevicesCmd::List { target }) => {
            run_admin(target, "devices.list", json!({}))
        }
        Command::Devices(DevicesCmd::Unpair { device, target }) => {
            run_admin(target, "devices.unpair", json!({ "device": device }))
        }
        Command::Devices(DevicesCmd::Revoke { device, target }) => {
            run_admin(target, "devices.revoke", json!({ "device": device }))
        }
        Command::Devices(DevicesCmd::Scopes {
            device,
            scopes,
            target,
        }) => run_admin_json(
            target,
            "devices.scopes",
            json!({ "device": device, "scopes": scopes }),
        ),
        Command::Devices(DevicesCmd::Rotate {
            device,
            force,
            target,
        }) => run_admin(
            target,
            "devices.rotate",
            json!({ "device": device, "force": force }),
        ),
        Command::Policy(PolicyCmd::Set {
            device,
            file,
            target,
        }) => match std::fs::read_to_string(file) {
            Ok(document) => run_admin(
                target,
                "policy.set",
                json!({ "device": device, "document": document }),
            ),
            Err(e) => {
                println!(
                    "{}",
                    json!({ "error": { "kind": "io", "message": format!("cannot read {}: {e}", file.display()) } })
                );
                ExitCode::from(2)
            }
        },
        Command::Policy(PolicyCmd::Show { device, target }) => {
            run_admin(target, "policy.show", json!({ "device": device }))
        }
        Command::Actions(ActionsCmd::List { target }) => {
            run_admin(target, "actions.list", json!({}))
        }
        Command::Actions(ActionsCmd::Approve { id, target }) => {
            run_admin(target, "actions.approve", json!({ "id": id }))
        }
        Command::Actions(ActionsCmd::Reject { id, reason, target }) => run_admin(
            target,
            "actions.reject",
            json!({ "id": id, "reason": reason }),
        ),
        Command::Events {
            follow,
            pattern,
            target,
        } => {
            if !follow {
                println!(
                    "{}",
                    json!({ "error": { "kind": "usage", "message": "events needs --follow (past events are in the ledger: meshctl ledger show)" } })
                );
                return Some(ExitCode::from(2));
            }
            let result = admin::follow(&target.socket(), pattern, |line| {
                let event = &line["event"];
                if target.json {
                    println!("{line}");
                } else if event.is_object() {
                    println!(
                        "{:<26} {}",
                        event["kind"].as_str().unwrap_or(""),
                        event["data"]
                    );
                }
                true
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    println!(
                        "{}",
                        json!({ "error": { "kind": e.kind, "message": e.message } })
                    );
                    ExitCode::from(2)
                }
            }
        }
        _ => return None,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn run(cli: Cli) -> Result<serde_json::Value, Failure> {
    match cli.command {
        Command::Ledger(LedgerCmd::Append {
            db,
            key,
            record_type,
            body,
        }) => ledger_append(&db, &key, &record_type, &body),
        Command::Ledger(LedgerCmd::Verify { db, author }) => {
            ledger_verify(&db, author.as_deref())
        }
        Command::Ledger(LedgerCmd::Show {
            db,
            from,
            limit,
            author,
        }) => ledger_show(&db, from, limit, author.as_deref()),
        Command::Health(HealthCmd::Score { report }) => health_score(&report),
        Command::Ledger(LedgerCmd::Replicas { .. }) => Err((
            "usage",
            "this command talks to a running primary".into(),
        )),
        // Answered over the admin socket (see `admin_command`).
        Command::Pairing(_)
        | Command::Mesh(_)
        | Command::Config(_)
        | Command::Sync(_)
        | Command::Deliver(_)
        | Command::Files(_)
        | Command::Gateway(_)
        | Command::Devices(_)
        | Command::Actions(_)
        | Command::Events { .. }
        | Command::Policy(PolicyCmd::Set { .. } | PolicyCmd::Show { .. }) => Err((
            "usage",
            "this command talks to a running primary".into(),
        )),
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
    // Usage errors are JSON like every other error (exit 2); help and
    // version print as usual.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let message = e.to_string();
            let first =
                if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    "a subcommand is missing (see --help)"
                } else {
                    message.lines().next().unwrap_or("bad usage")
                };
            println!(
                "{}",
                json!({ "error": { "kind": "usage", "message": first.trim_start_matches("error: ") } })
            );
            eprint!("{message}");
            return ExitCode::from(2);
        }
    };
    if let Some(code) = admin_command(&cli.command) {
        return code;
    }
    // `ledger verify` reports a bad ledger as output, with exit code 1.
    let is_verify = matches!(cli.command, Command::Ledger(LedgerCmd::Verify { .. }));
    match run(cli) {
        Ok(v) => {
            println!("{v}");
            if is_verify && v["ok"] != json!(true) {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
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
