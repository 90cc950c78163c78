//! The one-command demo: a primary (SQLite in a temporary data directory,
//! audit ledger, mesh-policy) and three workers in one process, talking over
//! real QUIC on 127.0.0.1 (no mDNS). It pairs them with their codes, sets a
//! restrictive, a trusted and an approval-gated policy, runs allowed, denied
//! and approval-gated commands, unpairs one worker and shows it is refused;
//! then two more primaries join it in a mesh of nodes through join tokens
//! (a broadcast, a rename, a block and a leave reach the others, and a
//! member gains no power over the first primary's devices), share replicated
//! configuration and a table (a key written on two at once ends the same on
//! all), send a reliable message, and hold replicas of each other's ledgers;
//! then the web dashboard's gateway serves the admin (devices, live
//! heartbeats) and pairs a web remote by its code, cutting it off when
//! revoked; it verifies the ledger and prints a summary.
//!
//! Exits 0 only if every step did what it should.
//!
//! ```text
//! cargo run --release -p mesh-examples --bin demo
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_core::events::{Received, Subscription};
use mesh_core::identity::NodeKey;
use mesh_core::ledger::Ledger;
use mesh_core::node::{
    FilesSettings, FnHandler, MeshSettings, Node, NodeConfig, NodeError, Primary,
    RegistryAdmission, Role, Worker, action_states,
};
use mesh_core::storage::records::PeerStatus;
use mesh_core::storage::{MemoryStorage, SqliteStorage, Storage};
use mesh_core::wire::{HealthMetrics, Platform};
use mesh_ledger::{LedgerConfig, LedgerHub, SignedLedger, verify_ledger};
use mesh_policy::runtime::RuntimePolicy;
use mesh_transport::quic::{QuicConfig, QuicTransport};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

/// Prints each step and counts failures.
struct Steps {
    failed: Vec<String>,
    passed: usize,
}

impl Steps {
    fn check(&mut self, what: &str, ok: bool, detail: impl std::fmt::Display) {
        if ok {
            self.passed += 1;
            println!("  ✔ {what}: {detail}");
        } else {
            self.failed.push(what.to_owned());
            println!("  ✘ {what}: {detail}");
        }
    }
}

/// A command's outcome as one readable line.
fn show(r: &Result<Value, NodeError>) -> String {
    match r {
        Ok(v) => format!("ok {v}"),
        Err(NodeError::Command { code, message }) => format!("refused ({code}): {message}"),
        Err(e) => format!("error: {e}"),
    }
}

fn refusal(r: &Result<Value, NodeError>) -> Option<&str> {
    match r {
        Err(NodeError::Command { code, .. }) => Some(code),
        _ => None,
    }
}

async fn next(sub: &mut Subscription, kind: &str) -> Option<Value> {
    tokio::time::timeout(WAIT, async {
        loop {
            match sub.recv().await {
                Some(Received::Event(e)) if e.kind == kind => return Some(e.data.clone()),
                Some(_) => continue,
                None => return None,
            }
        }
    })
    .await
    .ok()
    .flatten()
}

#[derive(Debug)]
struct SteadyMetrics(f64);

impl mesh_core::node::MetricsSource for SteadyMetrics {
    fn sample(&self) -> HealthMetrics {
        HealthMetrics {
            cpu_percent: Some(self.0),
            memory_percent: Some(45.0),
            battery_percent: Some(80.0),
            charging: Some(true),
            ..HealthMetrics::default()
        }
    }
}

fn quic(key: &Arc<NodeKey>, store: &Arc<dyn Storage>) -> Result<Arc<QuicTransport>, String> {
    let admission = Arc::new(RegistryAdmission::new(store.clone()));
    QuicTransport::bind(
        key.clone(),
        "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?,
        admission,
        QuicConfig::default(),
    )
    .map(Arc::new)
    .map_err(|e| e.to_string())
}

fn worker(name: &str, platform: Platform, cpu: f64, files: PathBuf) -> Result<Worker, String> {
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let key = Arc::new(NodeKey::generate());
    let transport = quic(&key, &store)?;
    let config = NodeConfig::new(Role::Worker, name, &format!("demo-{name}"))
        .platform(platform)
        .heartbeat_interval(Duration::from_millis(200))
        .reconnect(Duration::from_millis(100), Duration::from_secs(2));
    Node::builder(key, store, transport, config)
        .metrics(Arc::new(SteadyMetrics(cpu)))
        .files(FilesSettings::new(files))
        .handler(
            "backup",
            Arc::new(FnHandler(|a: &Value| {
                Ok(json!({ "backed_up": a["path"], "files": 42 }))
            })),
        )
        .start_worker()
        .map_err(|e| e.to_string())
}

async fn run(data_dir: PathBuf, steps: &mut Steps) -> Result<(), String> {
    println!("mesh SDK demo: one primary, three workers, real QUIC on 127.0.0.1");
    println!("data directory: {}", data_dir.display());

    // The primary: SQLite, a signed ledger, mesh-policy.
    let (key, _) =
        NodeKey::load_or_generate(data_dir.join("primary.key")).map_err(|e| e.to_string())?;
    let key = Arc::new(key);
    let store: Arc<dyn Storage> =
        Arc::new(SqliteStorage::open(data_dir.join("primary.db")).map_err(|e| e.to_string())?);
    let ledger = Arc::new(
        SignedLedger::open(store.clone(), key.clone(), LedgerConfig::default())
            .map_err(|e| e.to_string())?,
    );
    let transport = quic(&key, &store)?;
    let addr = transport.addr();
    let bound = transport.local_addr();
    let config = NodeConfig::new(Role::Primary, "demo-primary", "demo-primary")
        .heartbeat_interval(Duration::from_millis(200));
    let hub = Arc::new(LedgerHub::open(store.clone(), ledger.clone()).map_err(|e| e.to_string())?);
    let primary = Node::builder(key.clone(), store.clone(), transport, config)
        .ledger(ledger.clone())
        .ledger_sync(hub)
        .policy(Arc::new(RuntimePolicy::new()))
        .handler(
            "notes.write",
            Arc::new(FnHandler(|a: &Value| Ok(json!({ "saved": a["text"] })))),
        )
        .handler(
            "reports.generate",
            Arc::new(FnHandler(|_: &Value| {
                Ok(json!({ "report": "weekly", "pages": 3 }))
            })),
        )
        .handler(
            "deploy.release",
            Arc::new(FnHandler(|a: &Value| {
                Ok(json!({ "deployed": a["version"] }))
            })),
        )
        .mesh(MeshSettings::reachable_at(bound, &[]))
        .files(FilesSettings::new(data_dir.join("primary-files")))
        .start_primary()
        .map_err(|e| e.to_string())?;
    println!(
        "primary {} listening on {addr}",
        primary.node_id().fingerprint()
    );

    let workers = [
        ("laptop", Platform::Desktop, 20.0),
        ("phone", Platform::Android, 15.0),
        ("build-server", Platform::Desktop, 30.0),
    ];
    let mut nodes = Vec::new();
    for (name, platform, cpu) in workers {
        let files = data_dir.join(format!("{name}-files"));
        nodes.push((name, worker(name, platform, cpu, files)?));
    }

    println!("\n1. pairing with the 6-digit code");
    let mut requests = primary
        .subscribe("pairing.request_received", 16)
        .map_err(|e| e.to_string())?;
    for (name, w) in &nodes {
        let started = Instant::now();
        let mut connected = w
            .subscribe("session.connected", 4)
            .map_err(|e| e.to_string())?;
        let ticket = w
            .request_pairing(primary.node_id(), addr.clone())
            .await
            .map_err(|e| e.to_string())?;
        println!("  {name} shows code {}", ticket.code());
        next(&mut requests, "pairing.request_received").await;
        let approved = primary
            .approve_pairing(ticket.request_id(), ticket.code())
            .await;
        let finished = ticket.finished().await;
        let session = next(&mut connected, "session.connected").await.is_some();
        steps.check(
            &format!("pair {name}"),
            approved.is_ok() && finished.is_ok() && session,
            format!(
                "approved with the code, session open in {:.1} ms",
                started.elapsed().as_secs_f64() * 1e3
            ),
        );
    }
    let [(_, laptop), (_, phone), (_, server)] = &nodes[..] else {
        return Err("three workers".into());
    };

    println!("\n2. heartbeats and health");
    let deadline = Instant::now() + WAIT;
    let mut devices = primary.devices().map_err(|e| e.to_string())?;
    while devices.iter().any(|d| d.score.is_none()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        devices = primary.devices().map_err(|e| e.to_string())?;
    }
    for d in &devices {
        println!(
            "  {:<13} online={} status={} score={}",
            d.record.name,
            d.online,
            d.status.as_deref().unwrap_or("-"),
            d.score.map_or("-".to_owned(), |s| s.to_string())
        );
    }
    steps.check(
        "all three report health",
        devices.len() == 3 && devices.iter().all(|d| d.online && d.score.is_some()),
        "scored by the primary",
    );

    println!("\n3. policies");
    let restrictive = r#"{"allowed_commands": ["notes.*"], "blocked_commands": ["notes.delete"]}"#;
    let trusted = r#"{"allowed_commands": ["*"], "blocked_commands": ["system.*"]}"#;
    let gated = r#"{"allowed_commands": ["deploy.*"], "require_approval": true}"#;
    for (w, doc, what) in [
        (phone, restrictive, "restrictive → phone"),
        (laptop, trusted, "trusted → laptop"),
        (server, gated, "approval-gated → build-server"),
    ] {
        let set = primary.set_policy(&w.node_id(), doc);
        steps.check(&format!("policy {what}"), set.is_ok(), doc);
    }

    println!("\n4. primary → worker commands");
    for (name, w) in &nodes {
        let rtt = primary.ping(&w.node_id()).await;
        steps.check(
            &format!("ping {name}"),
            rtt.is_ok(),
            match &rtt {
                Ok(d) => format!("pong in {:.2} ms", d.as_secs_f64() * 1e3),
                Err(e) => format!("error: {e}"),
            },
        );
    }
    let backup = primary
        .run_action(&laptop.node_id(), "backup", json!({"path": "/home"}))
        .await;
    steps.check(
        "run_action backup on laptop",
        backup.as_ref().is_ok_and(|v| v["files"] == 42),
        show(&backup),
    );
    let shell = primary
        .run_action(&laptop.node_id(), "sh -c 'rm -rf /'", json!({}))
        .await;
    steps.check(
        "no raw shell: unknown action refused",
        refusal(&shell) == Some("unknown_action"),
        show(&shell),
    );

    println!("\n5. worker → primary commands under policy");
    let allowed = phone
        .send_command("notes.write", json!({"text": "buy milk"}))
        .await;
    steps.check("phone notes.write allowed", allowed.is_ok(), show(&allowed));
    let denied = phone.send_command("notes.delete", json!({})).await;
    steps.check(
        "phone notes.delete denied",
        refusal(&denied) == Some("blocked_command"),
        show(&denied),
    );
    let outside = phone.send_command("reports.generate", json!({})).await;
    steps.check(
        "phone reports.generate denied",
        refusal(&outside) == Some("command_not_allowed"),
        show(&outside),
    );
    let report = laptop.send_command("reports.generate", json!({})).await;
    steps.check(
        "laptop reports.generate allowed (trusted)",
        report.is_ok(),
        show(&report),
    );

    println!("\n6. approval-gated commands");
    let mut updates = server
        .subscribe("action.updated", 32)
        .map_err(|e| e.to_string())?;
    let proposed = server
        .send_command("deploy.release", json!({"version": "1.4.2"}))
        .await;
    let action = next(&mut updates, "action.updated")
        .await
        .unwrap_or(Value::Null);
    steps.check(
        "deploy proposed, awaiting approval",
        refusal(&proposed) == Some("needs_approval") && action["state"] == action_states::PROPOSED,
        format!("action {}", action["id"]),
    );
    let approved = primary
        .approve_action(action["id"].as_str().unwrap_or_default())
        .await;
    steps.check(
        "approved → executed",
        approved
            .as_ref()
            .is_ok_and(|a| a.state == action_states::EXECUTED),
        match &approved {
            Ok(a) => format!(
                "{} with {}",
                a.state,
                a.result.as_ref().map_or("nothing", |r| r.as_str())
            ),
            Err(e) => format!("error: {e}"),
        },
    );
    let _ = server
        .send_command("deploy.release", json!({"version": "9.9.9"}))
        .await;
    let mut second = Value::Null;
    while second["state"] != action_states::PROPOSED {
        match next(&mut updates, "action.updated").await {
            Some(v) => second = v,
            None => break,
        }
    }
    let rejected = primary
        .reject_action(
            second["id"].as_str().unwrap_or_default(),
            Some("not on a Friday".into()),
        )
        .await;
    steps.check(
        "second deploy rejected",
        rejected
            .as_ref()
            .is_ok_and(|a| a.state == action_states::REJECTED),
        match &rejected {
            Ok(a) => format!("{}: {}", a.state, a.error.as_deref().unwrap_or("")),
            Err(e) => format!("error: {e}"),
        },
    );

    println!("\n7. unpairing takes effect at once");
    let mut ended = phone
        .subscribe("session.ended", 4)
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let unpaired = primary.unpair(&phone.node_id()).await;
    let bye = next(&mut ended, "session.ended").await;
    steps.check(
        "phone unpaired, session closed",
        unpaired.is_ok() && bye.as_ref().is_some_and(|b| b["reason"] == "unpaired"),
        format!("in {:.1} ms", started.elapsed().as_secs_f64() * 1e3),
    );
    let after = phone
        .send_command("notes.write", json!({"text": "still here?"}))
        .await;
    steps.check("phone refused afterwards", after.is_err(), show(&after));
    let left = primary.devices().map_err(|e| e.to_string())?.len();
    steps.check(
        "primary lists two devices",
        left == 2,
        format!("{left} devices"),
    );

    mesh_step(&primary, steps).await?;
    files_step(&primary, &nodes[0].1, &data_dir, steps).await?;
    gateway_step(&primary, &data_dir, steps).await?;

    println!("\n12. audit ledger");
    let checkpoint = ledger
        .checkpoint(mesh_core::clock::Clock::now(&mesh_core::clock::SystemClock))
        .map_err(|e| e.to_string())?;
    let report = verify_ledger(store.as_ref(), &key.node_id(), None).map_err(|e| e.to_string())?;
    steps.check(
        "ledger verifies",
        report.ok() && ledger.len() == report.records,
        format!(
            "{} records, {} checkpoints, latest covers {}",
            report.records,
            report.checkpoints,
            checkpoint.map_or(0, |c| c.size)
        ),
    );

    for (_, w) in &nodes {
        w.shutdown().await;
    }
    primary.shutdown().await;
    Ok(())
}

/// A JSON-RPC client over one WebSocket: answers matched by id,
/// notifications kept.
struct RpcClient {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next: u64,
    notes: Vec<Value>,
}

impl RpcClient {
    async fn open(addr: std::net::SocketAddr) -> Result<RpcClient, String> {
        let (ws, _) = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::connect_async(format!("ws://{addr}/rpc")),
        )
        .await
        .map_err(|_| "the gateway did not answer".to_owned())?
        .map_err(|e| e.to_string())?;
        Ok(RpcClient {
            ws,
            next: 1,
            notes: Vec::new(),
        })
    }

    /// The next message, or `None` when the socket closed (with its code).
    async fn message(&mut self) -> Result<Option<Value>, String> {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .map_err(|_| "no message from the gateway in time".to_owned())?;
            match m {
                Some(Ok(Message::Text(t))) => {
                    return serde_json::from_str(&t)
                        .map(Some)
                        .map_err(|e| e.to_string());
                }
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map_or(1005, |f| u16::from(f.code));
                    return Ok(Some(json!({ "closed": code })));
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Ok(None),
            }
        }
    }

    /// Calls `method`: its result, or its error object.
    async fn call(&mut self, method: &str, params: Value) -> Result<Result<Value, Value>, String> {
        use futures_util::SinkExt;
        let id = self.next;
        self.next += 1;
        let request = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        self.ws
            .send(tokio_tungstenite::tungstenite::Message::Text(
                request.to_string().into(),
            ))
            .await
            .map_err(|e| e.to_string())?;
        loop {
            let Some(m) = self.message().await? else {
                return Err(format!("{method}: the socket closed"));
            };
            if m["id"] == json!(id) {
                return Ok(match m.get("error") {
                    Some(e) => Err(e.clone()),
                    None => Ok(m["result"].clone()),
                });
            }
            self.notes.push(m);
        }
    }

    /// Waits for a notification `method` whose params satisfy `pred`.
    async fn note(&mut self, method: &str, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        let hit = |m: &Value| m["method"] == method && pred(&m["params"]);
        if let Some(i) = self.notes.iter().position(hit) {
            return Some(self.notes.remove(i));
        }
        loop {
            let m = self.message().await.ok()??;
            if hit(&m) {
                return Some(m);
            }
        }
    }
}

/// One HTTP GET on the gateway: the status line and the body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<(String, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut out = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut out))
        .await
        .map_err(|_| "no HTTP answer in time".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = out.lines().next().unwrap_or_default().to_owned();
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    Ok((status, body))
}

/// The gateway and dashboard: the admin over a WebSocket sees the devices
/// and live heartbeats; a browser-style web remote pairs by its code,
/// reports its health, and is cut off the moment it is revoked.
async fn gateway_step(
    primary: &Primary,
    data_dir: &std::path::Path,
    steps: &mut Steps,
) -> Result<(), String> {
    use mesh_transport::gateway::{ADMIN_TOKEN_FILE, Gateway, GatewayConfig, rpc};
    println!("\n11. the web dashboard's gateway (JSON-RPC 2.0 over a WebSocket)");
    let config = GatewayConfig::new("127.0.0.1:0".parse().map_err(|e| format!("{e}"))?, data_dir)
        .dashboard("demo-primary", None);
    let gateway = Gateway::start(primary.clone(), config)
        .await
        .map_err(|e| e.to_string())?;
    let addr = gateway.local_addr();
    let (health, page) = (
        http_get(addr, "/healthz").await?,
        http_get(addr, "/").await?,
    );
    steps.check(
        "gateway serves the dashboard",
        health.0.contains(" 200 ") && page.0.contains(" 200 ") && page.1.contains("<html"),
        format!("http://{addr}/ ({} bytes of page, embedded)", page.1.len()),
    );

    let token =
        std::fs::read_to_string(data_dir.join(ADMIN_TOKEN_FILE)).map_err(|e| e.to_string())?;
    let mut admin = RpcClient::open(addr).await?;
    let who = admin
        .call("auth.login", json!({"token": token.trim()}))
        .await?;
    let listed = admin.call("devices.list", json!({})).await?;
    let devices = listed
        .as_ref()
        .ok()
        .and_then(|l| l["devices"].as_array().cloned())
        .unwrap_or_default();
    steps.check(
        "admin signs in with DATA_DIR/admin.token and lists the devices",
        who.as_ref().is_ok_and(|w| w["principal"] == "admin") && devices.len() == 2,
        devices
            .iter()
            .map(|d| {
                format!(
                    "{} ({}, score {})",
                    d["name"].as_str().unwrap_or("?"),
                    d["status"].as_str().unwrap_or("?"),
                    d["healthScore"]
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
    );
    let subscribed = admin
        .call("events.subscribe", json!({"patterns": ["device.*"]}))
        .await?;
    let beat = if subscribed.is_ok() {
        admin
            .note("event", |p| p["type"] == "device.heartbeat")
            .await
    } else {
        None
    };
    steps.check(
        "a heartbeat arrives live on `device.*`",
        beat.is_some(),
        beat.map_or("none".to_owned(), |b| b["params"]["data"].to_string()),
    );

    // A browser asks to pair; the code it shows is typed into the dashboard.
    let mut web = RpcClient::open(addr).await?;
    let asked = web
        .call(
            "devices.request_pairing",
            json!({"deviceName": "Kitchen tablet", "devicePlatform": "web"}),
        )
        .await?
        .map_err(|e| format!("devices.request_pairing: {e}"))?;
    let (request, code) = (asked["id"].clone(), asked["requestCode"].clone());
    let wrong = if code == "000000" { "000001" } else { "000000" };
    let refused = admin
        .call(
            "devices.approve_pairing",
            json!({"requestId": request, "code": wrong}),
        )
        .await?;
    let approved = admin
        .call(
            "devices.approve_pairing",
            json!({"requestId": request, "code": code}),
        )
        .await?;
    let granted = web
        .note("pairing.approved", |p| p["requestId"] == request)
        .await;
    let device = approved
        .as_ref()
        .map(|a| a["deviceId"].clone())
        .unwrap_or(Value::Null);
    steps.check(
        "a web remote pairs by the code it shows (a wrong code is refused)",
        refused
            .as_ref()
            .is_err_and(|e| e["code"] == rpc::PAIRING_INVALID_CODE)
            && approved.is_ok()
            && granted
                .as_ref()
                .is_some_and(|g| g["params"]["token"].is_string()),
        format!(
            "device {}, token sent on its socket",
            device.as_str().unwrap_or("?")
        ),
    );
    let reported = web
        .call(
            "devices.update_health",
            json!({"deviceId": device, "latencyMs": 35, "batteryPercent": 80}),
        )
        .await?;
    let seen = admin
        .call("devices.get_health", json!({"deviceId": device}))
        .await?;
    let not_mine = web
        .call("devices.update_health", json!({"deviceId": devices.first().map_or(Value::Null, |d| d["id"].clone()), "latencyMs": 1}))
        .await?;
    steps.check(
        "it reports its own health, and only its own",
        reported.is_ok()
            && seen
                .as_ref()
                .is_ok_and(|h| h["isOnline"] == true && h["latencyMs"] == 35.0)
            && not_mine
                .as_ref()
                .is_err_and(|e| e["code"] == rpc::FORBIDDEN),
        format!(
            "health {}",
            seen.map_or_else(|e| e.to_string(), |h| h.to_string())
        ),
    );
    let started = Instant::now();
    let revoked = admin
        .call("devices.revoke", json!({"deviceId": device}))
        .await?;
    let closed = loop {
        match web.message().await? {
            Some(m) if m.get("closed").is_some() => break m["closed"].as_u64(),
            Some(_) => continue,
            None => break None,
        }
    };
    steps.check(
        "revoking it closes its socket at once",
        revoked.is_ok() && closed == Some(1008),
        format!(
            "close code {closed:?} after {:.1} ms",
            started.elapsed().as_secs_f64() * 1e3
        ),
    );
    gateway.shutdown().await;
    Ok(())
}

/// A file from the laptop to the primary, verified as it arrives, and a
/// second of video from its camera.
async fn files_step(
    primary: &Primary,
    laptop: &Worker,
    data_dir: &std::path::Path,
    steps: &mut Steps,
) -> Result<(), String> {
    use mesh_core::media::{MediaKind, Received};
    println!("\n10. files and media (BLAKE3-verified, resumable; frames in groups)");
    let id = laptop.node_id();
    let mut granted: Vec<&str> = mesh_core::registry::scopes::DEFAULT.to_vec();
    granted.extend([
        mesh_core::registry::scopes::FILES_WRITE,
        mesh_core::registry::scopes::MEDIA_WRITE,
    ]);
    primary
        .set_scopes(&id, &granted)
        .map_err(|e| e.to_string())?;
    primary
        .set_policy(
            &id,
            r#"{"allowed_commands": ["notes.*", "reports.*", "files.send"], "max_file_bytes": 100000000}"#,
        )
        .map_err(|e| e.to_string())?;
    let src = data_dir.join("holiday.mov");
    let bytes: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &bytes).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let sent = laptop
        .send_file(&src, primary.node_id())
        .await
        .map_err(|e| e.to_string())?;
    let done = tokio::time::timeout(WAIT, laptop.wait_transfer(sent.id))
        .await
        .map_err(|_| "the transfer did not end in time".to_string())?
        .map_err(|e| e.to_string())?;
    let landed = primary
        .transfer(&sent.id)
        .map_err(|e| e.to_string())?
        .and_then(|t| t.path)
        .and_then(|p| std::fs::read(p).ok());
    steps.check(
        "laptop sends 8 MiB to the primary, every 16 KiB checked against its BLAKE3 root",
        done.state == mesh_core::node::TransferState::Done && landed.as_deref() == Some(&bytes[..]),
        format!(
            "{} in {:.0} ms, hash {}…",
            sent.name,
            started.elapsed().as_secs_f64() * 1e3,
            &sent.hash.to_string()[..16]
        ),
    );
    let bad = data_dir.join(".hidden");
    std::fs::write(&bad, b"x").map_err(|e| e.to_string())?;
    let refused = laptop.send_file(&bad, primary.node_id()).await;
    steps.check(
        "a name the receiver would not take is refused before anything moves",
        matches!(
            refused,
            Err(mesh_core::node::NodeError::Files {
                kind: mesh_core::node::FilesErrorKind::BadName,
                ..
            })
        ),
        "\".hidden\": bad_name",
    );
    let mut incoming = primary.media_incoming().map_err(|e| e.to_string())?;
    let camera = laptop
        .open_media(primary.node_id(), 1, MediaKind::Video, "h264")
        .await
        .map_err(|e| e.to_string())?;
    let mut stream = tokio::time::timeout(WAIT, incoming.recv())
        .await
        .ok()
        .flatten()
        .ok_or("no media stream arrived")?;
    let t0 = Instant::now();
    for i in 0..30u64 {
        let at = i * 33_333;
        while (t0.elapsed().as_micros() as u64) < at {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        camera
            .send(at, i % 15 == 0, vec![i as u8; 3_000])
            .map_err(|e| e.to_string())?;
    }
    drop(camera);
    let mut frames = 0;
    while let Ok(Some(r)) = tokio::time::timeout(Duration::from_secs(3), stream.next()).await {
        if matches!(r, Received::Frame(_)) {
            frames += 1;
        }
    }
    let st = stream.stats();
    steps.check(
        "a second of 30 fps video arrives in order",
        frames == 30 && st.lost == 0,
        format!(
            "{frames} frames, {} lost, jitter {:.1} ms",
            st.lost, st.jitter_ms
        ),
    );
    Ok(())
}

/// Another primary, a mesh member (memory storage, its own ledger).
fn mesh_primary(name: &str) -> Result<Primary, String> {
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let key = Arc::new(NodeKey::generate());
    let transport = quic(&key, &store)?;
    let bound = transport.local_addr();
    let ledger = SignedLedger::open(store.clone(), key.clone(), LedgerConfig::default())
        .map_err(|e| e.to_string())?;
    let ledger = Arc::new(ledger);
    let hub = LedgerHub::open(store.clone(), ledger.clone()).map_err(|e| e.to_string())?;
    Node::builder(
        key,
        store,
        transport,
        NodeConfig::new(Role::Primary, name, name),
    )
    .ledger(ledger)
    .ledger_sync(Arc::new(hub))
    .mesh(MeshSettings::reachable_at(bound, &[]))
    .start_primary()
    .map_err(|e| e.to_string())
}

async fn all_active(nodes: &[&Primary], n: usize) -> bool {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let mut ok = true;
        for node in nodes {
            let view = node.mesh_peers().await.map_err(|e| e.to_string());
            ok &= view.is_ok_and(|v| {
                v.peers
                    .iter()
                    .filter(|p| p.status == PeerStatus::Active)
                    .count()
                    == n
            });
        }
        if ok {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Two more primaries join `primary` in a mesh through join tokens.
async fn mesh_step(primary: &Primary, steps: &mut Steps) -> Result<(), String> {
    println!("\n8. a mesh of primaries (join tokens, gossip, blocklist)");
    let studio = mesh_primary("studio")?;
    let attic = mesh_primary("attic")?;
    let mut events = primary
        .subscribe("peer.*", 256)
        .map_err(|e| e.to_string())?;
    let token = primary.mesh_token(None).await.map_err(|e| e.to_string())?;
    println!(
        "   token from demo-primary ({} characters)",
        token.token.len()
    );
    let joined = studio.join_mesh(&token.token).await;
    steps.check(
        "studio joins through demo-primary's token",
        joined.is_ok(),
        format!("{joined:?} members known"),
    );
    let reused = attic.join_mesh(&token.token).await;
    steps.check(
        "the used token is refused to attic",
        matches!(&reused, Err(NodeError::Mesh { kind, .. }) if kind.code() == "token_used"),
        show_mesh(&reused),
    );
    let second = studio.mesh_token(None).await.map_err(|e| e.to_string())?;
    let joined = attic.join_mesh(&second.token).await;
    steps.check(
        "attic joins through studio's token",
        joined.is_ok(),
        format!("{joined:?} members known"),
    );
    steps.check(
        "all three see each other active",
        all_active(&[primary, &studio, &attic], 2).await,
        "SWIM membership over QUIC",
    );
    let mut inbox = primary
        .mesh_subscribe("chat/*", 16)
        .map_err(|e| e.to_string())?;
    let sent = attic
        .mesh_broadcast("chat/general", b"hello from the attic".to_vec())
        .await
        .map_err(|e| e.to_string())?;
    let got = tokio::time::timeout(WAIT, inbox.recv())
        .await
        .ok()
        .flatten();
    steps.check(
        "attic's broadcast reaches demo-primary, signed by attic",
        got.as_ref()
            .is_some_and(|d| d.key == sent && d.key.origin == attic.node_id()),
        got.map_or("nothing".into(), |d| {
            String::from_utf8_lossy(&d.body).into_owned()
        }),
    );
    studio
        .mesh_rename("studio-2")
        .await
        .map_err(|e| e.to_string())?;
    let renamed = next(&mut events, "peer.renamed").await;
    steps.check(
        "studio's rename reaches demo-primary",
        renamed.as_ref().is_some_and(|e| e["new"] == "studio-2"),
        renamed.map_or("no event".into(), |e| e.to_string()),
    );
    replicated_step(primary, &studio, &attic, steps).await?;
    // Membership gives no power over another primary's devices.
    let devices = primary.devices().map_err(|e| e.to_string())?;
    if let Some(device) = devices.first() {
        let r = studio.command(&device.record.node, "ping", json!({})).await;
        steps.check(
            "a mesh member cannot command demo-primary's devices",
            matches!(r, Err(NodeError::NotConnected(_))),
            show(&r),
        );
    }
    primary
        .mesh_block(attic.node_id(), "demo")
        .await
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + WAIT;
    let mut blocked_at_studio = Vec::new();
    while Instant::now() < deadline {
        let view = studio.mesh_peers().await.map_err(|e| e.to_string())?;
        blocked_at_studio = view.blocked;
        if !blocked_at_studio.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    steps.check(
        "demo-primary's block of attic reaches studio, with who blocked it",
        blocked_at_studio
            .iter()
            .any(|b| b.node == attic.node_id() && b.by == primary.node_id()),
        format!("{} blocked at studio", blocked_at_studio.len()),
    );
    studio.mesh_leave().await.map_err(|e| e.to_string())?;
    let left = loop {
        match next(&mut events, "peer.left").await {
            Some(e) if e["node"] == studio.node_id().to_string() => break Some(e),
            Some(_) => continue,
            None => break None,
        }
    };
    steps.check(
        "studio's leave reaches demo-primary at once",
        left.as_ref().is_some_and(|e| e["reason"] == "left"),
        left.map_or("no event".into(), |e| e.to_string()),
    );
    studio.shutdown().await;
    attic.shutdown().await;
    Ok(())
}

/// Polls `check` (bounded by WAIT).
async fn within<F, Fut>(mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Replicated configuration, tables, reliable messages and ledgers among
/// the three primaries.
async fn replicated_step(
    primary: &Primary,
    studio: &Primary,
    attic: &Primary,
    steps: &mut Steps,
) -> Result<(), String> {
    println!("\n9. replicated state, reliable messages, ledger replicas");
    let set = primary
        .config_set("site.name", json!("demo-lab"))
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "   config site.name = \"demo-lab\" at version {}",
        set.version
    );
    steps.check(
        "a config key set on demo-primary reaches studio and attic",
        within(|| async {
            studio
                .config_get("site.name")
                .await
                .is_ok_and(|e| e.version == set.version)
                && attic
                    .config_get("site.name")
                    .await
                    .is_ok_and(|e| e.version == set.version)
        })
        .await,
        "pushed as it committed",
    );
    let (x, y) = tokio::join!(
        studio.config_set("mode", json!("studio's")),
        attic.config_set("mode", json!("attic's"))
    );
    let winner = match (x, y) {
        (Ok(x), Ok(y)) => {
            if x.version > y.version {
                x.value
            } else {
                y.value
            }
        }
        (x, y) => return Err(format!("config set failed: {x:?} {y:?}")),
    };
    steps.check(
        "a key written on two members at once ends the same on all three",
        within(|| async {
            let mut same = true;
            for n in [primary, studio, attic] {
                same &= n.config_get("mode").await.is_ok_and(|e| e.value == winner);
            }
            same
        })
        .await,
        format!("last writer wins: {winner}"),
    );
    primary
        .table_insert("rooms", "r1", json!({"name": "kitchen", "floor": 0}))
        .await
        .map_err(|e| e.to_string())?;
    steps.check(
        "a table row inserted on demo-primary reaches attic",
        within(|| async { attic.table_rows("rooms").await.is_ok_and(|r| r.len() == 1) }).await,
        "table.rooms",
    );
    let sent = tokio::time::timeout(
        WAIT,
        attic.send_reliable(primary.node_id(), b"hello, reliably".to_vec()),
    )
    .await;
    let got = primary
        .receive_reliable(10, WAIT)
        .await
        .map_err(|e| e.to_string())?;
    steps.check(
        "attic's reliable message is acknowledged and taken once by demo-primary",
        matches!(sent, Ok(Ok(_))) && got.len() == 1 && got[0].payload == b"hello, reliably",
        format!("{} message(s)", got.len()),
    );
    steps.check(
        "demo-primary holds replicas of studio's and attic's ledgers",
        within(|| async {
            primary.ledger_replicas().await.is_ok_and(|l| {
                [studio.node_id(), attic.node_id()]
                    .iter()
                    .all(|n| l.iter().any(|h| h.author == *n && !h.own))
            })
        })
        .await,
        "pulled over mesh-sdk/ledger/1",
    );
    Ok(())
}

fn show_mesh(r: &Result<usize, NodeError>) -> String {
    match r {
        Ok(n) => format!("joined, {n} members"),
        Err(e) => format!("refused: {e}"),
    }
}

fn main() -> ExitCode {
    let data_dir = std::env::temp_dir().join(format!("mesh-demo-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&data_dir) {
        eprintln!("cannot create {}: {e}", data_dir.display());
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let mut steps = Steps {
        failed: Vec::new(),
        passed: 0,
    };
    let result = runtime.block_on(run(data_dir.clone(), &mut steps));
    let _ = std::fs::remove_dir_all(&data_dir);
    println!();
    match result {
        Err(e) => {
            println!("demo stopped: {e}");
            ExitCode::FAILURE
        }
        Ok(()) if steps.failed.is_empty() => {
            println!("summary: all {} steps did what they should", steps.passed);
            ExitCode::SUCCESS
        }
        Ok(()) => {
            println!(
                "summary: {} passed, {} failed: {}",
                steps.passed,
                steps.failed.len(),
                steps.failed.join(", ")
            );
            ExitCode::FAILURE
        }
    }
}
