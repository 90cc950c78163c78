//! The primary's admin connection: a Unix socket in its data directory,
//! mode 0600 (only the user running the primary can connect), carrying one
//! JSON request per line and one JSON answer per line.
//!
//! Request: `{"cmd": "devices.list", "args": {...}}`. Answer:
//! `{"ok": VALUE}` or `{"error": {"kind": KIND, "message": TEXT}}`.
//! `events.follow` answers `{"ok": "following"}` and then one
//! `{"event": {...}}` line per event until the client hangs up.
//!
//! Commands: `pairing.list`, `pairing.approve {code, request?}`,
//! `pairing.reject {request, reason?}`, `devices.list`,
//! `devices.unpair|devices.revoke|devices.rotate {device}`,
//! `policy.set {device, document}`, `policy.show {device}`, `actions.list`,
//! `actions.approve {id}`, `actions.reject {id, reason?}`,
//! `events.follow {pattern?}`, `ledger.verify`, `ledger.replicas`; the mesh: `mesh.token
//! {ttl_ms?}`, `mesh.join {token}`, `mesh.tokens`, `mesh.tokens.revoke {id}`,
//! `gateway.token.rotate` (a new admin token for the dashboard),
//! `mesh.peers`, `mesh.rename {name}`, `mesh.leave`, `mesh.block {node_id,
//! reason?}`, `mesh.unblock {node_id}`, `mesh.broadcast {topic, body}`;
//! replicated state: `config.set {key, value}`, `config.get {key}`,
//! `config.list {prefix?}`, `config.delete {key}`, `sync.status`,
//! `sync.now`; reliable messages: `deliver.send {node_id, text, wait?,
//! timeout_ms?}`, `deliver.receive {max?, wait_ms?}`, `deliver.status`. A `device` is a node id, a
//! hardware/app id or a device name.

use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mesh_core::events::Received;
use mesh_core::identity::NodeId;
use mesh_core::node::{DeviceView, NodeError, Primary};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream as AsyncUnixStream};

/// The socket's file name in the data directory.
pub const SOCKET_NAME: &str = "admin.sock";

/// The admin socket of the primary whose data directory is `data_dir`.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}

/// Checks the ledger for `ledger.verify` (the binary wires it to mesh-ledger).
pub type LedgerCheck = Arc<dyn Fn() -> Result<Value, String> + Send + Sync>;

/// Makes a new gateway admin token for `gateway.token.rotate`: the token
/// and the file it was written to.
pub type TokenRotation = Arc<dyn Fn() -> Result<(String, String), String> + Send + Sync>;

/// What the binary wires in besides the node.
#[derive(Clone)]
pub struct Hooks {
    /// `ledger.verify`.
    pub ledger: LedgerCheck,
    /// `gateway.token.rotate`, when the gateway runs.
    pub rotate_admin_token: Option<TokenRotation>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("gateway", &self.rotate_admin_token.is_some())
            .finish_non_exhaustive()
    }
}

impl Hooks {
    /// The ledger check only (no gateway).
    pub fn ledger(ledger: LedgerCheck) -> Self {
        Hooks {
            ledger,
            rotate_admin_token: None,
        }
    }
}

/// An admin failure: a stable kind and a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminError {
    /// `usage`, `not_found`, `ambiguous`, `refused`, `unavailable`, `io`, …
    pub kind: String,
    /// What went wrong.
    pub message: String,
}

impl std::fmt::Display for AdminError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

fn err(kind: &str, message: impl Into<String>) -> AdminError {
    AdminError {
        kind: kind.to_owned(),
        message: message.into(),
    }
}

fn node_error(e: NodeError) -> AdminError {
    if let NodeError::Mesh { kind, message } = &e {
        return err(kind.code(), message.clone());
    }
    if let NodeError::Sync { kind, message } = &e {
        return err(kind.code(), message.clone());
    }
    if let NodeError::Files { kind, message } = &e {
        return err(kind.as_str(), message.clone());
    }
    let kind = match &e {
        NodeError::Pairing(_) => "pairing",
        NodeError::Policy(_) => "invalid_policy",
        NodeError::NotConnected(_) => "not_connected",
        NodeError::DeviceOffline(_) => "device_offline",
        NodeError::Timeout(_) => "timeout",
        NodeError::Unavailable(_) => "unavailable",
        NodeError::NotFound(_) => "not_found",
        NodeError::Registry(_) | NodeError::Auth(_) => "registry",
        NodeError::Storage(_) => "storage",
        _ => "failed",
    };
    err(kind, e.to_string())
}

fn device_json(d: &DeviceView) -> Value {
    json!({
        "node": d.record.node.to_string(),
        "fingerprint": d.record.node.fingerprint().to_string(),
        "device_id": d.record.device_id,
        "name": d.record.name,
        "status": d.record.status,
        "revoked": d.record.revoked_at.is_some(),
        "online": d.online,
        "health": d.status,
        "score": d.score,
        "trust": d.record.trust_level,
    })
}

fn text(args: &Value, key: &str) -> Result<String, AdminError> {
    args.get(key)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| err("usage", format!("missing \"{key}\"")))
}

/// Finds a device by node id, hardware/app id or name.
fn resolve(node: &Primary, which: &str) -> Result<NodeId, AdminError> {
    if let Ok(id) = which.parse::<NodeId>() {
        return Ok(id);
    }
    let devices = node.devices().map_err(node_error)?;
    let found: Vec<&DeviceView> = devices
        .iter()
        .filter(|d| d.record.device_id == which || d.record.name == which)
        .collect();
    match found.as_slice() {
        [one] => Ok(one.record.node),
        [] => Err(err("not_found", format!("no device {which:?}"))),
        _ => Err(err(
            "ambiguous",
            format!("several devices match {which:?}; use the node id"),
        )),
    }
}

/// Runs one command against the primary.
pub async fn dispatch(
    node: &Primary,
    hooks: &Hooks,
    cmd: &str,
    args: &Value,
) -> Result<Value, AdminError> {
    let ledger = &hooks.ledger;
    match cmd {
        "gateway.token.rotate" => match &hooks.rotate_admin_token {
            Some(rotate) => {
                let (token, file) = rotate().map_err(|m| err("io", m))?;
                Ok(json!({ "token": token, "file": file }))
            }
            None => Err(err(
                "unavailable",
                "the gateway is not running: start the primary with --gateway ADDR",
            )),
        },
        "pairing.list" => {
            let pending = node.pending_pairings().map_err(node_error)?;
            Ok(Value::Array(
                pending
                    .iter()
                    .map(|r| {
                        json!({
                            "request": r.request_id,
                            "node": r.device_node.to_string(),
                            "device_id": r.device_id,
                            "name": r.device_name,
                            "platform": r.platform,
                            "attempts_left": r.attempts_left,
                            "expires_at_ms": r.expires_at.as_millis(),
                        })
                    })
                    .collect(),
            ))
        }
        "pairing.approve" => {
            let code = text(args, "code")?;
            let request = match args.get("request").and_then(Value::as_str) {
                Some(r) => r.to_owned(),
                None => {
                    // One wrong code costs that request an attempt: never guess.
                    let pending = node.pending_pairings().map_err(node_error)?;
                    match pending.as_slice() {
                        [one] => one.request_id.clone(),
                        [] => return Err(err("not_found", "no pairing request is pending")),
                        _ => {
                            return Err(err(
                                "ambiguous",
                                "several requests are pending; pass the request id",
                            ));
                        }
                    }
                }
            };
            let device = node
                .approve_pairing(&request, &code)
                .await
                .map_err(node_error)?;
            Ok(json!({ "paired": device.node.to_string(), "name": device.name }))
        }
        "pairing.reject" => {
            let request = text(args, "request")?;
            let reason = args
                .get("reason")
                .and_then(Value::as_str)
                .map(str::to_owned);
            node.reject_pairing(&request, reason)
                .await
                .map_err(node_error)?;
            Ok(json!({ "rejected": request }))
        }
        "devices.list" => Ok(Value::Array(
            node.devices()
                .map_err(node_error)?
                .iter()
                .map(device_json)
                .collect(),
        )),
        "devices.unpair" | "devices.revoke" | "devices.rotate" => {
            let device = resolve(node, &text(args, "device")?)?;
            match cmd {
                "devices.unpair" => node.unpair(&device).await,
                "devices.revoke" => node.revoke(&device).await,
                _ if args.get("force").and_then(Value::as_bool) == Some(true) => {
                    node.rotate_token_forced(&device).await
                }
                _ => node.rotate_token(&device).await,
            }
            .map_err(node_error)?;
            Ok(json!({ "device": device.to_string(), "done": cmd.trim_start_matches("devices.") }))
        }
        "devices.scopes" => {
            let device = resolve(node, &text(args, "device")?)?;
            let scopes: Vec<String> = match args.get("scopes") {
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| v.as_str().map(str::to_owned))
                    .collect::<Option<_>>()
                    .ok_or_else(|| err("usage", "scopes are strings"))?,
                _ => return Err(err("usage", "missing \"scopes\"")),
            };
            let refs: Vec<&str> = scopes.iter().map(String::as_str).collect();
            let record = node.set_scopes(&device, &refs).map_err(node_error)?;
            Ok(json!({
                "device": device.to_string(),
                "scopes": record.scopes.iter().map(|s| s.as_str().to_owned()).collect::<Vec<_>>(),
            }))
        }
        "policy.set" => {
            let device = resolve(node, &text(args, "device")?)?;
            let document = match args.get("document") {
                Some(Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
                None => return Err(err("usage", "missing \"document\"")),
            };
            node.set_policy(&device, &document).map_err(node_error)?;
            Ok(json!({ "device": device.to_string(), "policy": "set" }))
        }
        "policy.show" => {
            let device = resolve(node, &text(args, "device")?)?;
            Ok(node
                .policy(&device)
                .map_err(node_error)?
                .unwrap_or(Value::Null))
        }
        "actions.list" => {
            let actions = node.actions().map_err(node_error)?;
            Ok(Value::Array(
                actions
                    .iter()
                    .map(|a| {
                        json!({
                            "id": a.id,
                            "state": a.state,
                            "command": a.command,
                            "device": a.proposed_by.to_string(),
                            "created_at_ms": a.created_at.as_millis(),
                            "result": a.result.as_ref().and_then(|r| serde_json::from_str::<Value>(r.as_str()).ok()),
                            "error": a.error,
                        })
                    })
                    .collect(),
            ))
        }
        "actions.approve" => {
            let a = node
                .approve_action(&text(args, "id")?)
                .await
                .map_err(node_error)?;
            Ok(json!({ "id": a.id, "state": a.state, "error": a.error,
                "result": a.result.as_ref().and_then(|r| serde_json::from_str::<Value>(r.as_str()).ok()) }))
        }
        "actions.reject" => {
            let reason = args
                .get("reason")
                .and_then(Value::as_str)
                .map(str::to_owned);
            let a = node
                .reject_action(&text(args, "id")?, reason)
                .await
                .map_err(node_error)?;
            Ok(json!({ "id": a.id, "state": a.state }))
        }
        "ledger.verify" => ledger().map_err(|m| err("storage", m)),
        "ledger.replicas" => {
            let held = node.ledger_replicas().await.map_err(node_error)?;
            let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
            let cp = |c: &mesh_core::ledger::CheckpointRef| json!({ "size": c.size, "root": hex(&c.root) });
            Ok(json!({ "ledgers": held.iter().map(|h| json!({
                "author": h.author.to_string(),
                "own": h.own,
                "records": h.records,
                "checkpoint": h.checkpoint.as_ref().map(cp),
                "fork": h.fork.as_ref().map(|f| json!({
                    "reason": f.reason,
                    "first": cp(&f.first),
                    "second": cp(&f.second),
                })),
            })).collect::<Vec<_>>() }))
        }
        c if c.starts_with("mesh.") => mesh_command(node, c, args).await,
        c if c.starts_with("config.") || c.starts_with("sync.") => {
            sync_command(node, c, args).await
        }
        c if c.starts_with("deliver.") => deliver_command(node, c, args).await,
        c if c.starts_with("files.") => files_command(node, c, args).await,
        other => Err(err("usage", format!("unknown command {other:?}"))),
    }
}

fn node_id_arg(args: &Value) -> Result<NodeId, AdminError> {
    let text = text(args, "node_id")?;
    text.parse::<NodeId>()
        .map_err(|e| err("invalid_node_id", format!("{text:?}: {e}")))
}

fn ms(t: Option<mesh_core::clock::Timestamp>) -> Value {
    t.map_or(Value::Null, |t| json!(t.as_millis()))
}

fn config_json(e: &mesh_core::node::ConfigEntry) -> Value {
    json!({
        "key": e.key,
        "value": e.value,
        "version": { "hlc": e.version.to_string(), "node": e.version.node.to_string() },
    })
}

/// Replicated configuration and sync (`meshctl config …`, `meshctl sync …`).
async fn sync_command(node: &Primary, cmd: &str, args: &Value) -> Result<Value, AdminError> {
    match cmd {
        "config.set" => {
            let value = args
                .get("value")
                .cloned()
                .ok_or_else(|| err("usage", "missing \"value\""))?;
            let e = node
                .config_set(&text(args, "key")?, value)
                .await
                .map_err(node_error)?;
            Ok(config_json(&e))
        }
        "config.get" => {
            let e = node
                .config_get(&text(args, "key")?)
                .await
                .map_err(node_error)?;
            Ok(config_json(&e))
        }
        "config.list" => {
            let prefix = args.get("prefix").and_then(Value::as_str).unwrap_or("");
            let entries = node.config_list(prefix).await.map_err(node_error)?;
            Ok(json!({ "entries": entries.iter().map(config_json).collect::<Vec<_>>() }))
        }
        "config.delete" => {
            let key = text(args, "key")?;
            let version = node.config_delete(&key).await.map_err(node_error)?;
            Ok(json!({
                "key": key,
                "deleted": true,
                "version": { "hlc": version.to_string(), "node": version.node.to_string() },
            }))
        }
        "sync.status" => {
            let peers = node.sync_status().await.map_err(node_error)?;
            Ok(json!({ "peers": peers.iter().map(|p| json!({
                "node_id": p.node.to_string(),
                "last_sync_ms": ms(p.last_sync),
                "pending": p.pending,
            })).collect::<Vec<_>>() }))
        }
        "sync.now" => {
            let peers = node.sync_now().await.map_err(node_error)?;
            Ok(json!({ "started": true, "peers": peers }))
        }
        other => Err(err("usage", format!("unknown command {other:?}"))),
    }
}

/// A transfer as `meshctl files` prints it.
pub fn transfer_json(t: &mesh_core::node::TransferInfo) -> Value {
    json!({
        "id": t.id.to_string(),
        "hash": t.hash.to_string(),
        "name": t.name,
        "size": t.size,
        "received": t.received,
        "state": t.state.as_str(),
        "peer": t.peer.to_string(),
        "direction": t.direction.as_str(),
        "error": t.error,
    })
}

/// File transfers (`meshctl files …`).
async fn files_command(node: &Primary, cmd: &str, args: &Value) -> Result<Value, AdminError> {
    match cmd {
        "files.send" => {
            let path = text(args, "path")?;
            let to = resolve(node, &text(args, "to")?)?;
            let t = node.send_file(&path, to).await.map_err(node_error)?;
            Ok(
                json!({ "id": t.id.to_string(), "hash": t.hash.to_string(), "name": t.name, "size": t.size }),
            )
        }
        "files.list" => {
            let all = node.transfers().map_err(node_error)?;
            Ok(json!({ "transfers": all.iter().map(transfer_json).collect::<Vec<_>>() }))
        }
        "files.cancel" => {
            let id = text(args, "id")?
                .parse()
                .map_err(|_| err("invalid_argument", "not a transfer id"))?;
            let t = node.cancel_transfer(id).await.map_err(node_error)?;
            Ok(transfer_json(&t))
        }
        other => Err(err("usage", format!("unknown command {other:?}"))),
    }
}

/// Reliable messages (`meshctl deliver …`).
async fn deliver_command(node: &Primary, cmd: &str, args: &Value) -> Result<Value, AdminError> {
    use std::time::Duration;
    match cmd {
        "deliver.send" => {
            let to = node_id_arg(args)?;
            let text = text(args, "text")?;
            if args.get("wait").and_then(Value::as_bool) == Some(false) {
                let id = node
                    .post_reliable(to, text.into_bytes())
                    .await
                    .map_err(node_error)?;
                return Ok(json!({ "id": id.to_hex(), "acknowledged": false }));
            }
            let wait = Duration::from_millis(
                args.get("timeout_ms")
                    .and_then(Value::as_u64)
                    .unwrap_or(30_000),
            );
            match tokio::time::timeout(wait, node.send_reliable(to, text.into_bytes())).await {
                Ok(Ok(id)) => Ok(json!({ "id": id.to_hex(), "acknowledged": true })),
                Ok(Err(e)) => Err(node_error(e)),
                Err(_) => Err(err(
                    "timeout",
                    "not acknowledged in time; the message stays in the outbox and is delivered later",
                )),
            }
        }
        "deliver.receive" => {
            let max = args.get("max").and_then(Value::as_u64).unwrap_or(100);
            let wait = args.get("wait_ms").and_then(Value::as_u64).unwrap_or(0);
            let messages = node
                .receive_reliable(
                    usize::try_from(max).unwrap_or(usize::MAX),
                    Duration::from_millis(wait.max(1)),
                )
                .await
                .map_err(node_error)?;
            Ok(json!({ "messages": messages.iter().map(|m| json!({
                "id": m.id.to_hex(),
                "from": m.from.to_string(),
                "seq": m.seq,
                "text": String::from_utf8_lossy(&m.payload),
                "received_at_ms": m.received_at.as_millis(),
            })).collect::<Vec<_>>() }))
        }
        "deliver.status" => {
            let s = node.delivery_status().await.map_err(node_error)?;
            Ok(json!({ "outbox": s.outbox, "inbox": s.inbox, "relayed": s.relayed }))
        }
        other => Err(err("usage", format!("unknown command {other:?}"))),
    }
}

/// The mesh commands (`meshctl mesh …`).
async fn mesh_command(node: &Primary, cmd: &str, args: &Value) -> Result<Value, AdminError> {
    match cmd {
        "mesh.token" => {
            let ttl = args
                .get("ttl_ms")
                .and_then(Value::as_u64)
                .map(std::time::Duration::from_millis);
            let t = node.mesh_token(ttl).await.map_err(node_error)?;
            Ok(json!({
                "token": t.token.as_str(),
                "id": t.id,
                "issuer": t.issuer.to_string(),
                "expires_at_ms": t.expires_at.as_millis(),
            }))
        }
        "mesh.join" => {
            let peers = node
                .join_mesh(&text(args, "token")?)
                .await
                .map_err(node_error)?;
            Ok(json!({ "joined": true, "peers": peers }))
        }
        "mesh.tokens" => {
            let now = mesh_core::clock::Clock::now(&mesh_core::clock::SystemClock);
            let tokens = node.mesh_tokens().await.map_err(node_error)?;
            Ok(json!({ "tokens": tokens.iter().map(|t| json!({
                "id": t.id,
                "issuer": t.issuer.to_string(),
                "status": mesh_core::node::TokenStatus::of(t, now).as_str(),
                "created_at_ms": t.created_at.as_millis(),
                "expires_at_ms": t.expires_at.as_millis(),
                "used_by": t.used_by.map(|n| n.to_string()),
                "used_at_ms": ms(t.used_at),
                "revoked_at_ms": ms(t.revoked_at),
            })).collect::<Vec<_>>() }))
        }
        "mesh.tokens.revoke" => {
            let t = node
                .revoke_mesh_token(&text(args, "id")?)
                .await
                .map_err(node_error)?;
            Ok(json!({ "revoked": t.id, "revoked_at_ms": ms(t.revoked_at) }))
        }
        "mesh.peers" => {
            let view = node.mesh_peers().await.map_err(node_error)?;
            Ok(json!({
                "self": { "node_id": view.node.to_string(), "name": view.name },
                "peers": view.peers.iter().map(|p| json!({
                    "node_id": p.node.to_string(),
                    "name": p.name,
                    "addresses": p.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "status": p.status.as_str(),
                    "last_seen_ms": p.last_seen.as_millis(),
                    "joined_at_ms": p.joined_at.as_millis(),
                })).collect::<Vec<_>>(),
                "blocked": view.blocked.iter().map(|b| json!({
                    "node_id": b.node.to_string(),
                    "by": b.by.to_string(),
                    "reason": b.reason,
                    "at_ms": b.at.as_millis(),
                })).collect::<Vec<_>>(),
            }))
        }
        "mesh.rename" => {
            let name = text(args, "name")?;
            node.mesh_rename(&name).await.map_err(node_error)?;
            Ok(json!({ "renamed": true, "name": name }))
        }
        "mesh.leave" => {
            node.mesh_leave().await.map_err(node_error)?;
            Ok(json!({ "left": true }))
        }
        "mesh.block" => {
            let target = node_id_arg(args)?;
            let reason = args.get("reason").and_then(Value::as_str).unwrap_or("");
            node.mesh_block(target, reason).await.map_err(node_error)?;
            Ok(json!({ "blocked": target.to_string(), "reason": reason }))
        }
        "mesh.unblock" => {
            let target = node_id_arg(args)?;
            node.mesh_unblock(target).await.map_err(node_error)?;
            Ok(json!({ "unblocked": target.to_string() }))
        }
        "mesh.broadcast" => {
            let topic = text(args, "topic")?;
            let body = text(args, "body")?;
            let key = node
                .mesh_broadcast(&topic, body.into_bytes())
                .await
                .map_err(node_error)?;
            Ok(json!({ "origin": key.origin.to_string(), "id": key.id.to_string() }))
        }
        other => Err(err("usage", format!("unknown command {other:?}"))),
    }
}

async fn handle(node: Primary, hooks: Hooks, stream: AsyncUnixStream) {
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let request: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                let answer =
                    json!({ "error": { "kind": "usage", "message": format!("not JSON: {e}") } });
                if write
                    .write_all(format!("{answer}\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
        };
        let cmd = request["cmd"].as_str().unwrap_or_default().to_owned();
        let args = request.get("args").cloned().unwrap_or(Value::Null);
        if cmd == "events.follow" {
            let pattern = args.get("pattern").and_then(Value::as_str).unwrap_or("*");
            let mut sub = match node.subscribe(pattern, 1024) {
                Ok(s) => s,
                Err(e) => {
                    let answer = json!({ "error": { "kind": "usage", "message": e.to_string() } });
                    let _ = write.write_all(format!("{answer}\n").as_bytes()).await;
                    return;
                }
            };
            if write.write_all(b"{\"ok\":\"following\"}\n").await.is_err() {
                return;
            }
            while let Some(r) = sub.recv().await {
                let line = match r {
                    Received::Event(e) => {
                        json!({ "event": { "kind": e.kind, "at_ms": e.at.as_millis(), "data": e.data } })
                    }
                    Received::Lagged { missed } => json!({ "lagged": missed }),
                };
                if write
                    .write_all(format!("{line}\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
            }
            return;
        }
        let answer = match dispatch(&node, &hooks, &cmd, &args).await {
            Ok(v) => json!({ "ok": v }),
            Err(e) => json!({ "error": { "kind": e.kind, "message": e.message } }),
        };
        if write
            .write_all(format!("{answer}\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Listens on `path` (mode 0600) and serves admin requests for `node` until
/// the task is dropped. A stale socket file from a crashed primary is
/// replaced; a live one (another primary on the same data directory) is an
/// error.
pub fn serve(
    path: &Path,
    node: Primary,
    hooks: Hooks,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "{} is in use: is another primary running on this data directory?",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(handle(node.clone(), hooks.clone(), stream));
        }
    }))
}

/// Sends one request to the primary at `socket` and returns its answer.
pub fn request(socket: &Path, cmd: &str, args: Value) -> Result<Value, AdminError> {
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        err(
            "unavailable",
            format!(
                "cannot reach the primary's admin socket {}: {e}",
                socket.display()
            ),
        )
    })?;
    let line = json!({ "cmd": cmd, "args": args });
    writeln!(stream, "{line}").map_err(|e| err("io", e.to_string()))?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(|e| err("io", e.to_string()))?;
    parse_answer(&answer)
}

fn parse_answer(line: &str) -> Result<Value, AdminError> {
    let v: Value =
        serde_json::from_str(line.trim()).map_err(|e| err("io", format!("bad answer: {e}")))?;
    if let Some(ok) = v.get("ok") {
        return Ok(ok.clone());
    }
    Err(err(
        v["error"]["kind"].as_str().unwrap_or("failed"),
        v["error"]["message"].as_str().unwrap_or("no message"),
    ))
}

/// Follows the primary's events, calling `each` per line, until the
/// primary goes away or `each` returns false.
pub fn follow(
    socket: &Path,
    pattern: &str,
    mut each: impl FnMut(&Value) -> bool,
) -> Result<(), AdminError> {
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        err(
            "unavailable",
            format!("cannot reach {}: {e}", socket.display()),
        )
    })?;
    writeln!(
        stream,
        "{}",
        json!({ "cmd": "events.follow", "args": { "pattern": pattern } })
    )
    .map_err(|e| err("io", e.to_string()))?;
    let mut reader = BufReader::new(&stream);
    let mut first = String::new();
    reader
        .read_line(&mut first)
        .map_err(|e| err("io", e.to_string()))?;
    parse_answer(&first)?;
    for line in reader.lines() {
        let Ok(line) = line else { break };
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if !each(&v) {
            break;
        }
    }
    Ok(())
}
