//! The WebSocket gateway from outside, with a WebSocket client
//! (tokio-tungstenite) on 127.0.0.1: the admin token and a web remote's
//! token, every method, scopes, every error code, batches, oversized
//! messages, revocation and rotation closing sockets, the Origin check and
//! the connection limits. The primary and its worker talk QUIC on
//! loopback, as in the other runtime tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use mesh_policy::runtime::RuntimePolicy;
use mesh_transport::gateway::{Gateway, GatewayConfig, rpc};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::node_e2e::{Primary, pair, primary_built, worker};

const WAIT: Duration = Duration::from_secs(20);

/// A byte stream a WebSocket runs over: TCP, or TLS over TCP.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

type Ws = tokio_tungstenite::WebSocketStream<Box<dyn Io>>;

/// A client: numbered requests, answers matched by id, notifications kept.
struct Client {
    ws: Ws,
    next: i64,
    notes: Vec<Value>,
}

impl Client {
    async fn open(addr: SocketAddr) -> Client {
        Self::open_with(addr, &[]).await.unwrap()
    }

    async fn open_with(addr: SocketAddr, headers: &[(&str, &str)]) -> Result<Client, String> {
        let mut req = format!("ws://{addr}/rpc").into_client_request().unwrap();
        for (k, v) in headers {
            let name =
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap();
            req.headers_mut().insert(name, v.parse().unwrap());
        }
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let io: Box<dyn Io> = Box::new(tcp);
        let connected = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(req, io))
            .await
            .map_err(|_| "the upgrade got no answer".to_owned())?;
        match connected {
            Ok((ws, _)) => Ok(Client {
                ws,
                next: 1,
                notes: Vec::new(),
            }),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                Err(r.status().as_u16().to_string())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    async fn send_text(&mut self, text: String) {
        self.ws.send(Message::Text(text.into())).await.unwrap();
    }

    /// The next message that is not a notification.
    async fn answer(&mut self) -> Value {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("an answer in time")
                .expect("the socket is open")
                .expect("a message");
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(&t).unwrap();
            if v.get("method").is_some() && v.get("id").is_none() {
                self.notes.push(v);
                continue;
            }
            return v;
        }
    }

    /// Calls `method`: `Ok(result)` or `Err((code, error))`.
    async fn call(&mut self, method: &str, params: Value) -> Result<Value, (i64, Value)> {
        let id = self.next;
        self.next += 1;
        self.send_text(
            json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string(),
        )
        .await;
        let a = self.answer().await;
        assert_eq!(a["jsonrpc"], "2.0");
        assert_eq!(a["id"], json!(id), "{a}");
        match a.get("error") {
            Some(e) => Err((e["code"].as_i64().unwrap(), e.clone())),
            None => Ok(a["result"].clone()),
        }
    }

    async fn ok(&mut self, method: &str, params: Value) -> Value {
        match self.call(method, params.clone()).await {
            Ok(v) => v,
            Err(e) => panic!("{method} {params}: {e:?}"),
        }
    }

    async fn code(&mut self, method: &str, params: Value) -> (i64, Value) {
        match self.call(method, params.clone()).await {
            Ok(v) => panic!("{method} {params} succeeded: {v}"),
            Err(e) => e,
        }
    }

    /// Waits for a notification `method` whose params satisfy `pred`.
    async fn note(&mut self, method: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self
            .notes
            .iter()
            .position(|n| n["method"] == method && pred(&n["params"]))
        {
            return self.notes.remove(i);
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no {method} notification; had {:?}", self.notes))
                .expect("open")
                .expect("a message");
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["method"] == method && pred(&v["params"]) {
                return v;
            }
            self.notes.push(v);
        }
    }

    /// Waits for the server to close the socket; its close code.
    async fn closed(&mut self, within: Duration) -> Option<CloseCode> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => panic!("the socket stayed open"),
                Ok(None) => return None,
                Ok(Some(Err(_))) => return None,
                Ok(Some(Ok(Message::Close(c)))) => return c.map(|c| c.code),
                Ok(Some(Ok(_))) => {}
            }
        }
    }
}

struct Setup {
    p: Primary,
    gateway: Gateway,
    admin: String,
    _dir: tempfile::TempDir,
}

async fn setup(adjust: impl FnOnce(GatewayConfig) -> GatewayConfig) -> Setup {
    let store: Arc<dyn mesh_core::storage::Storage> =
        Arc::new(mesh_core::storage::MemoryStorage::new());
    let (p, _ledger) = primary_built(store, |c| c, |b| b.policy(Arc::new(RuntimePolicy::new())));
    let dir = tempfile::tempdir().unwrap();
    let config = adjust(GatewayConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.path(),
    ));
    let gateway = Gateway::start(p.node.clone(), config).await.unwrap();
    let admin = std::fs::read_to_string(dir.path().join("admin.token"))
        .unwrap()
        .trim()
        .to_owned();
    Setup {
        p,
        gateway,
        admin,
        _dir: dir,
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_methods_errors_and_live_events() {
    let s = setup(|c| c).await;
    let addr = s.gateway.local_addr();
    let (status, body) = http_get(addr, "/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "ok"
    );
    let (status, page) = http_get(addr, "/").await;
    assert_eq!(status, 200);
    assert!(page.contains("<html"), "the dashboard is served");

    // Anonymous: only login and pairing requests.
    let mut c = Client::open(addr).await;
    let (code, _) = c.code("devices.list", json!({})).await;
    assert_eq!(code, rpc::UNAUTHORIZED);
    let (code, _) = c.code("auth.login", json!({"token": "nope"})).await;
    assert_eq!(code, rpc::UNAUTHORIZED);
    // What a caller sent is quoted back at most briefly.
    let long_field = "f".repeat(100_000);
    let (code, e) = c.code("auth.login", json!({ long_field: 1 })).await;
    assert_eq!(code, rpc::INVALID_PARAMS);
    assert!(
        e["message"].as_str().unwrap().len() < 600,
        "{}",
        e["message"].as_str().unwrap().len()
    );
    // Five failed sign-ins close the socket.
    let mut guesser = Client::open(addr).await;
    for _ in 0..4 {
        let (code, _) = guesser
            .code("auth.login", json!({"token": "guess.guess"}))
            .await;
        assert_eq!(code, rpc::UNAUTHORIZED);
    }
    guesser
        .send_text(
            json!({"jsonrpc": "2.0", "id": 99, "method": "auth.login", "params": {"token": "guess.guess"}})
                .to_string(),
        )
        .await;
    assert_eq!(
        guesser.closed(Duration::from_secs(2)).await,
        Some(CloseCode::Policy)
    );
    // A page that rebound its DNS name to this address sends its own Host.
    assert_eq!(
        Client::open_with(addr, &[("host", "attacker.example:80")])
            .await
            .err()
            .as_deref(),
        Some("403")
    );
    // The protocol's own errors.
    c.send_text("{not json".into()).await;
    let a = c.answer().await;
    assert_eq!(
        (a["error"]["code"].as_i64(), &a["id"]),
        (Some(rpc::PARSE_ERROR), &Value::Null)
    );
    c.send_text(r#"{"jsonrpc":"1.0","id":4,"method":"devices.list"}"#.into())
        .await;
    assert_eq!(
        c.answer().await["error"]["code"],
        json!(rpc::INVALID_REQUEST)
    );
    let (code, _) = c.code("devices.nope", json!({})).await;
    assert_eq!(code, rpc::METHOD_NOT_FOUND);

    assert_eq!(
        c.ok("auth.login", json!({"token": s.admin})).await["principal"],
        "admin"
    );
    let (code, e) = c.code("devices.get_health", json!({})).await;
    assert_eq!(code, rpc::INVALID_PARAMS);
    assert_eq!(e["data"]["field"], "deviceId", "{e}");
    let (code, e) = c.code("devices.list", json!({"extra": 1})).await;
    assert_eq!(code, rpc::INVALID_PARAMS, "{e}");
    let (code, _) = c
        .code(
            "devices.get_health",
            json!({"deviceId": mesh_core::identity::NodeKey::generate().node_id().to_string()}),
        )
        .await;
    assert_eq!(code, rpc::NOT_FOUND);

    // A worker comes online while we watch.
    let sub = c
        .ok(
            "events.subscribe",
            json!({"patterns": ["device.*", "pairing.*"]}),
        )
        .await;
    let sid = sub["subscriptionId"].as_str().unwrap().to_owned();
    let (w, _) = worker("laptop");
    pair(&s.p, &w, false).await;
    let wid = w.node_id().to_string();
    let online = c
        .note("event", |p| {
            p["type"] == "device.online" && p["data"]["node"] == json!(wid)
        })
        .await;
    assert_eq!(online["params"]["subscriptionId"], json!(sid));
    assert!(online["params"]["at"].as_u64().unwrap() > 0);
    // Every heartbeat is an event, with the score it left.
    let beat = c
        .note("event", |p| {
            p["type"] == "device.heartbeat" && p["data"]["node"] == json!(wid)
        })
        .await;
    assert!(beat["params"]["data"]["score"].as_u64().is_some(), "{beat}");

    let list = c.ok("devices.list", json!({})).await;
    let d = &list["devices"][0];
    for field in [
        "id",
        "name",
        "platform",
        "status",
        "lastSeen",
        "trustLevel",
        "healthScore",
        "capabilities",
    ] {
        assert!(d.get(field).is_some(), "devices.list lacks {field}: {d}");
    }
    assert_eq!(
        (d["id"].as_str(), d["name"].as_str()),
        (Some(wid.as_str()), Some("laptop"))
    );
    let h = c.ok("devices.get_health", json!({"deviceId": wid})).await;
    assert_eq!(h["isOnline"], true, "{h}");
    assert!(h["healthScore"].as_u64().is_some(), "{h}");
    assert!(h["lastHeartbeat"].as_u64().is_some(), "{h}");
    let ping = c
        .ok(
            "devices.command",
            json!({"deviceId": wid, "command": "ping"}),
        )
        .await;
    assert!(ping["latencyMs"].as_f64().unwrap() >= 0.0);
    let ran = c
        .ok("devices.command", json!({"deviceId": wid, "command": "run_action", "args": {"action": "backup", "args": {"path": "/x"}}}))
        .await;
    assert_eq!(ran["result"]["backed_up"], "/x");
    let (code, e) = c
        .code(
            "devices.command",
            json!({"deviceId": wid, "command": "reboot"}),
        )
        .await;
    assert_eq!(
        (code, e["data"]["field"].as_str()),
        (rpc::INVALID_PARAMS, Some("command"))
    );
    // config reaches the worker's own settings (and says so on its bus).
    let mut configured = w.subscribe("config.updated", 4).unwrap();
    let set = c
        .ok(
            "devices.command",
            json!({"deviceId": wid, "command": "config", "args": {"key": "upload.limit", "value": 5}}),
        )
        .await;
    assert_eq!(set["success"], true);
    match tokio::time::timeout(WAIT, configured.recv()).await {
        Ok(Some(mesh_core::events::Received::Event(e))) => {
            assert_eq!(
                (e.data["key"].as_str(), e.data["value"].as_i64()),
                (Some("upload.limit"), Some(5))
            );
        }
        other => panic!("the worker did not apply the setting: {other:?}"),
    }
    let (code, e) = c
        .code(
            "devices.command",
            json!({"deviceId": wid, "command": "config", "args": {"value": 5}}),
        )
        .await;
    assert_eq!(
        (code, e["data"]["field"].as_str()),
        (rpc::INVALID_PARAMS, Some("args.key"))
    );

    // History: the heartbeats so far, as stored.
    let mut samples = 0;
    for _ in 0..100 {
        let hist = c
            .ok("devices.get_health_history", json!({"deviceId": wid}))
            .await;
        samples = hist["samples"].as_array().unwrap().len();
        if samples > 0 {
            assert!(hist["samples"][0]["healthScore"].as_u64().is_some());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(samples > 0, "health samples are stored");

    // Policies: set (camelCase, every field), resolve, validation naming the field.
    let set = c
        .ok("policies.set_exec_policy", json!({
            "deviceId": wid, "allowedCommands": ["notes.*", "jobs.*"], "blockedCommands": ["notes.delete"],
            "maxCostPerHour": 2.5, "requireApproval": false, "maxFileBytes": 1000,
        }))
        .await;
    assert_eq!(set["success"], true);
    assert_eq!(set["policyId"].as_str().unwrap().len(), 16);
    let got = c
        .ok("policies.get_exec_policy", json!({"deviceId": wid}))
        .await;
    assert_eq!(
        got["policy"]["allowedCommands"],
        json!(["notes.*", "jobs.*"])
    );
    let r = c
        .ok(
            "policies.resolve",
            json!({"deviceId": wid, "command": "notes.write"}),
        )
        .await;
    assert_eq!(
        (r["allowed"].as_bool(), r["decision"].as_str()),
        (Some(true), Some("allow"))
    );
    let r = c
        .ok(
            "policies.resolve",
            json!({"deviceId": wid, "command": "system.shutdown"}),
        )
        .await;
    assert_eq!(r["allowed"], false);
    assert_eq!(r["decision"], "deny");
    assert_eq!(r["code"], "command_not_allowed", "{r}");
    let (code, e) = c
        .code(
            "policies.set_exec_policy",
            json!({"deviceId": wid, "allowedCommands": ["a"], "allowedHoursUtc": "25:00-26:00"}),
        )
        .await;
    assert_eq!(code, rpc::INVALID_PARAMS);
    assert_eq!(e["data"]["field"], "allowedHoursUtc", "{e}");
    let (code, e) = c
        .code("policies.set_exec_policy", json!({"deviceId": wid}))
        .await;
    assert_eq!(
        (code, e["data"]["field"].as_str()),
        (rpc::INVALID_PARAMS, Some("allowedCommands"))
    );

    // Actions: approval-gated, then approved through the gateway.
    c.ok(
        "policies.set_exec_policy",
        json!({"deviceId": wid, "allowedCommands": ["notes.*"], "requireApproval": true}),
    )
    .await;
    let denied = w.send_command("notes.write", json!({"text": "hi"})).await;
    assert!(denied.is_err(), "needs approval");
    let proposed = c.ok("actions.list", json!({"state": "proposed"})).await;
    let action = proposed["actions"][0]["id"].as_str().unwrap().to_owned();
    let done = c.ok("actions.approve", json!({"actionId": action})).await;
    assert_eq!(done["action"]["state"], "executed", "{done}");
    let (code, _) = c.code("actions.approve", json!({"actionId": action})).await;
    assert_ne!(code, 0);
    // A second one is rejected with a reason, and stays rejected.
    let denied = w
        .send_command("notes.write", json!({"text": "again"}))
        .await;
    assert!(denied.is_err(), "needs approval");
    let proposed = c.ok("actions.list", json!({"state": "proposed"})).await;
    let second = proposed["actions"][0]["id"].as_str().unwrap().to_owned();
    assert_ne!(second, action);
    let rejected = c
        .ok(
            "actions.reject",
            json!({"actionId": second, "reason": "not today"}),
        )
        .await;
    assert_eq!(
        (
            rejected["success"].as_bool(),
            rejected["action"]["state"].as_str()
        ),
        (Some(true), Some("rejected")),
        "{rejected}"
    );
    assert_eq!(rejected["action"]["error"], "not today");
    let listed = c.ok("actions.list", json!({"state": "rejected"})).await;
    assert_eq!(listed["actions"][0]["id"], json!(second));
    let (code, _) = c.code("actions.approve", json!({"actionId": second})).await;
    assert_ne!(code, 0, "a rejected action cannot be approved");
    let (code, _) = c
        .code("actions.approve", json!({"actionId": "no-such-action"}))
        .await;
    assert_eq!(code, rpc::NOT_FOUND);
    let (code, e) = c.code("actions.reject", json!({})).await;
    assert_eq!(
        (code, e["data"]["field"].as_str()),
        (rpc::INVALID_PARAMS, Some("actionId"))
    );
    let (code, _) = c.code("actions.list", json!({"state": "sideways"})).await;
    assert_eq!(code, rpc::INVALID_PARAMS);

    // A policy denial through devices.command is -32004 with the reason code.
    // (The primary's own commands to the worker are not policy-gated; a
    // worker's are — resolve shows the decision.)

    // Batches: answers for requests, none for notifications.
    c.send_text(
        json!([
            {"jsonrpc": "2.0", "id": "a", "method": "devices.list"},
            {"jsonrpc": "2.0", "method": "devices.list"},
            {"jsonrpc": "2.0", "id": "b", "method": "nodes.discover", "params": {}},
            7
        ])
        .to_string(),
    )
    .await;
    let batch = c.answer().await;
    let batch = batch.as_array().unwrap();
    assert_eq!(batch.len(), 3, "{batch:?}");
    assert_eq!(batch[0]["id"], "a");
    assert!(batch[1]["result"]["nodes"].is_array());
    assert_eq!(batch[2]["error"]["code"], json!(rpc::INVALID_REQUEST));

    assert_eq!(
        c.ok("events.unsubscribe", json!({"subscriptionId": sid}))
            .await["success"],
        true
    );
    let (code, _) = c
        .code("events.unsubscribe", json!({"subscriptionId": sid}))
        .await;
    assert_eq!(code, rpc::NOT_FOUND);
    let info = c.ok("gateway.info", json!({})).await;
    assert_eq!(info["nodeId"], json!(s.p.node.node_id().to_string()));

    // Unpair: the device is gone.
    assert_eq!(
        c.ok("devices.unpair", json!({"deviceId": wid})).await["success"],
        true
    );
    let list = c.ok("devices.list", json!({})).await;
    assert!(
        list["devices"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["id"] != json!(wid))
    );

    // Over 1 MiB: closed with 1009. The server closes as soon as it reads
    // the frame's length; if the client is still writing then, TCP resets
    // the connection and the close frame may be lost with it (a loaded
    // machine): tried again on a new socket, and every code seen must be
    // 1009.
    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"devices.list","params":{{"pad":"{}"}}}}"#,
        "x".repeat(1 << 20)
    );
    let mut codes = Vec::new();
    for _ in 0..3 {
        let mut b = Client::open(addr).await;
        b.ok("auth.login", json!({"token": s.admin})).await;
        let _ = b.ws.send(Message::Text(big.clone().into())).await;
        if let Some(code) = b.closed(WAIT).await {
            codes.push(code);
            break;
        }
    }
    assert_eq!(
        codes,
        [CloseCode::Size],
        "the close code of an oversized message"
    );
    w.shutdown().await;
    s.p.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_remote_pairs_by_code_acts_within_its_scopes_and_is_cut_off_when_revoked() {
    let s = setup(|c| c).await;
    let addr = s.gateway.local_addr();
    let mut admin = Client::open_with(addr, &[("authorization", &format!("Bearer {}", s.admin))])
        .await
        .unwrap();
    admin
        .ok(
            "events.subscribe",
            json!({"patterns": ["pairing.*", "device.*"]}),
        )
        .await;

    // The browser asks; the dashboard sees it (without the code).
    let mut web = Client::open(addr).await;
    let asked = web
        .ok(
            "devices.request_pairing",
            json!({"deviceName": "Kitchen tablet", "devicePlatform": "ipad", "requestingIp": "10.9.9.9"}),
        )
        .await;
    let (request, code) = (
        asked["id"].as_str().unwrap().to_owned(),
        asked["requestCode"].as_str().unwrap().to_owned(),
    );
    assert_eq!(code.len(), 6);
    assert!(asked["expiresAt"].as_u64().unwrap() > 0);
    assert_eq!(asked["deviceName"], "Kitchen tablet");
    admin
        .note("event", |p| {
            p["type"] == "pairing.request_received" && p["data"]["request_id"] == json!(request)
        })
        .await;
    let pending = admin.ok("devices.pending_pairings", json!({})).await;
    let mine = &pending["requests"][0];
    assert_eq!(
        (mine["requestId"].as_str(), mine["kind"].as_str()),
        (Some(request.as_str()), Some("web"))
    );
    assert!(mine.get("requestCode").is_none() && !pending.to_string().contains(&code));
    assert_eq!(
        mine["requestingIp"], "127.0.0.1",
        "the address seen, not the one claimed"
    );
    let (c2, _) = web
        .code("devices.request_pairing", json!({"deviceName": "again"}))
        .await;
    assert_eq!(c2, rpc::BUSY, "one request per socket");

    // A wrong code costs an attempt; the right one pairs.
    let wrong = if code == "000000" { "000001" } else { "000000" };
    let (c3, e) = admin
        .code(
            "devices.approve_pairing",
            json!({"requestId": request, "code": wrong}),
        )
        .await;
    assert_eq!(c3, rpc::PAIRING_INVALID_CODE);
    assert_eq!(e["data"]["attemptsLeft"], 4);
    let approved = admin
        .ok(
            "devices.approve_pairing",
            json!({"requestId": request, "code": code}),
        )
        .await;
    assert_eq!(approved["success"], true);
    let device = approved["deviceId"].as_str().unwrap().to_owned();
    let (c4, _) = admin
        .code(
            "devices.approve_pairing",
            json!({"requestId": request, "code": code}),
        )
        .await;
    assert_eq!(c4, rpc::NOT_FOUND);
    let granted = web
        .note("pairing.approved", |p| p["requestId"] == json!(request))
        .await;
    assert_eq!(granted["params"]["deviceId"], json!(device));
    let token = granted["params"]["token"].as_str().unwrap().to_owned();
    admin
        .note("event", |p| {
            p["type"] == "device.online" && p["data"]["node"] == json!(device)
        })
        .await;

    // The web remote is a device of platform web, online while connected.
    let list = admin.ok("devices.list", json!({})).await;
    let d = list["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == json!(device))
        .unwrap()
        .clone();
    assert_eq!(
        (d["platform"].as_str(), d["name"].as_str()),
        (Some("web"), Some("Kitchen tablet"))
    );
    assert_eq!(d["online"], true);

    // Within its scopes, on the socket that paired.
    assert!(web.ok("devices.list", json!({})).await["devices"].is_array());
    assert!(web.ok("actions.list", json!({})).await["actions"].is_array());
    assert_eq!(
        web.ok(
            "events.publish",
            json!({"type": "tablet.tap", "data": {"x": 1}})
        )
        .await["success"],
        true
    );
    admin
        .note("event", |p| {
            p["type"] == "device.event"
                && p["data"]["kind"] == "tablet.tap"
                && p["data"]["device"] == json!(device)
        })
        .await;
    let (c5, _) = web
        .code("events.publish", json!({"type": "Bad Kind!"}))
        .await;
    assert_eq!(c5, rpc::INVALID_PARAMS);
    let (c5, e) = web
        .code(
            "events.publish",
            json!({"type": "tablet.big", "data": {"x": "y".repeat(20_000)}}),
        )
        .await;
    assert_eq!(
        (c5, e["data"]["field"].as_str()),
        (rpc::INVALID_PARAMS, Some("data"))
    );
    assert_eq!(
        web.ok(
            "devices.update_health",
            json!({"deviceId": device, "latencyMs": 35, "batteryPercent": 80, "memoryPercent": 40})
        )
        .await["success"],
        true
    );
    let h = admin
        .ok("devices.get_health", json!({"deviceId": device}))
        .await;
    assert_eq!(
        (
            h["isOnline"].as_bool(),
            h["latencyMs"].as_f64(),
            h["batteryPercent"].as_f64()
        ),
        (Some(true), Some(35.0), Some(80.0))
    );
    assert!(h["healthScore"].as_u64().unwrap() > 50, "{h}");
    let (c6, e) = web
        .code(
            "devices.update_health",
            json!({"deviceId": s.p.node.node_id().to_string(), "latencyMs": 1}),
        )
        .await;
    assert_eq!(
        (c6, e["data"]["scope"].as_str()),
        (rpc::FORBIDDEN, Some("admin"))
    );
    let (c7, _) = web
        .code(
            "devices.update_health",
            json!({"deviceId": device, "latencyMs": -5}),
        )
        .await;
    assert_eq!(c7, rpc::INVALID_PARAMS);
    for (m, p) in [
        (
            "devices.approve_pairing",
            json!({"requestId": "x", "code": "123456"}),
        ),
        ("devices.revoke", json!({"deviceId": device})),
        (
            "policies.set_exec_policy",
            json!({"deviceId": device, "allowedCommands": []}),
        ),
        ("actions.approve", json!({"actionId": "x"})),
        (
            "devices.command",
            json!({"deviceId": device, "command": "ping"}),
        ),
    ] {
        assert_eq!(web.code(m, p).await.0, rpc::FORBIDDEN, "{m}");
    }

    // A second socket with the token in the upgrade's header.
    let mut web2 = Client::open_with(addr, &[("authorization", &format!("Bearer {token}"))])
        .await
        .unwrap();
    assert!(web2.ok("devices.list", json!({})).await["devices"].is_array());
    assert_eq!(
        Client::open_with(addr, &[("authorization", "Bearer nope")])
            .await
            .err()
            .as_deref(),
        Some("401")
    );

    // New scopes: its sockets close (it signs in again under them).
    let mut web_s = Client::open_with(addr, &[("authorization", &format!("Bearer {token}"))])
        .await
        .unwrap();
    // (Answered: the gateway holds the socket now.)
    assert!(web_s.ok("devices.list", json!({})).await["devices"].is_array());
    let dev: mesh_core::identity::NodeId = device.parse().unwrap();
    s.p.node
        .set_scopes(
            &dev,
            &[
                "presence:write",
                "events:read",
                "events:write",
                "actions:read",
                "devices:read",
            ],
        )
        .unwrap();
    assert_eq!(
        web_s.closed(Duration::from_secs(1)).await,
        Some(CloseCode::Policy)
    );
    assert_eq!(
        web.closed(Duration::from_secs(1)).await,
        Some(CloseCode::Policy)
    );
    assert_eq!(
        web2.closed(Duration::from_secs(1)).await,
        Some(CloseCode::Policy)
    );
    let mut web = Client::open_with(addr, &[("authorization", &format!("Bearer {token}"))])
        .await
        .unwrap();
    let mut web2 = Client::open_with(addr, &[("authorization", &format!("Bearer {token}"))])
        .await
        .unwrap();
    assert!(web.ok("devices.list", json!({})).await["devices"].is_array());
    assert!(web2.ok("devices.list", json!({})).await["devices"].is_array());

    // A new token: both sockets close at once; the old token is refused,
    // the new one works.
    let rotated = admin
        .ok("devices.rotate_token", json!({"deviceId": device}))
        .await;
    let new_token = rotated["token"].as_str().unwrap().to_owned();
    assert_ne!(new_token, token);
    assert_eq!(
        web.closed(Duration::from_secs(1)).await,
        Some(CloseCode::Policy)
    );
    assert_eq!(
        web2.closed(Duration::from_secs(1)).await,
        Some(CloseCode::Policy)
    );
    let mut web3 = Client::open(addr).await;
    assert_eq!(
        web3.code("auth.login", json!({"token": token})).await.0,
        rpc::UNAUTHORIZED
    );
    assert_eq!(
        web3.ok("auth.login", json!({"token": new_token})).await["deviceId"],
        json!(device)
    );

    // Revoked: closed within a second, and the token no longer opens one.
    admin
        .ok("devices.revoke", json!({"deviceId": device}))
        .await;
    assert_eq!(
        web3.closed(Duration::from_secs(1)).await,
        Some(CloseCode::Policy)
    );
    let mut web4 = Client::open(addr).await;
    assert_eq!(
        web4.code("auth.login", json!({"token": new_token})).await.0,
        rpc::UNAUTHORIZED
    );

    // Rejected: the browser is told.
    let asked = web4
        .ok(
            "devices.request_pairing",
            json!({"deviceName": "Hall display"}),
        )
        .await;
    let request = asked["id"].as_str().unwrap().to_owned();
    admin
        .ok(
            "devices.reject_pairing",
            json!({"requestId": request, "reason": "not ours"}),
        )
        .await;
    let note = web4
        .note("pairing.rejected", |p| p["requestId"] == json!(request))
        .await;
    assert_eq!(note["params"]["reason"], "not ours");
    assert_eq!(
        admin
            .code("devices.reject_pairing", json!({"requestId": request}))
            .await
            .0,
        rpc::NOT_FOUND
    );

    // The admin token rotates: admin sockets close, the old token is refused.
    let old_admin = s.admin.clone();
    let fresh = s.gateway.rotate_admin_token().unwrap();
    assert_eq!(
        admin.closed(Duration::from_secs(1)).await,
        Some(CloseCode::Policy)
    );
    let mut again = Client::open(addr).await;
    assert_eq!(
        again
            .code("auth.login", json!({"token": old_admin}))
            .await
            .0,
        rpc::UNAUTHORIZED
    );
    assert_eq!(
        again
            .ok("auth.login", json!({"token": fresh.as_str()}))
            .await["principal"],
        "admin"
    );
    s.p.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_connection_limits_and_tls_rules() {
    let s = setup(|c| {
        c.limits(3, 100)
            .allowed_origins(vec!["http://localhost:3000".into()])
    })
    .await;
    let addr = s.gateway.local_addr();
    // A page from elsewhere may not open a socket; its own origin and a
    // configured one may.
    assert_eq!(
        Client::open_with(addr, &[("origin", "http://evil.example")])
            .await
            .err()
            .as_deref(),
        Some("403")
    );
    let own = format!("http://{addr}");
    let a = Client::open_with(addr, &[("origin", own.as_str())])
        .await
        .unwrap();
    let b = Client::open_with(addr, &[("origin", "http://localhost:3000")])
        .await
        .unwrap();
    let c = Client::open(addr).await;
    // The fourth from the same address is refused; one closing frees a slot.
    assert_eq!(
        Client::open_with(addr, &[]).await.err().as_deref(),
        Some("429")
    );
    drop((a, b));
    let mut ok = None;
    for _ in 0..50 {
        if let Ok(c) = Client::open_with(addr, &[]).await {
            ok = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok.is_some(), "a freed slot is taken again");
    drop(c);

    // Beyond loopback without TLS: refused unless insecure (nothing is
    // bound: the check comes first).
    let dir = tempfile::tempdir().unwrap();
    let wide = GatewayConfig::new("0.0.0.0:0".parse().unwrap(), dir.path());
    match Gateway::start(s.p.node.clone(), wide).await {
        Err(mesh_transport::gateway::GatewayError::TlsRequired(_)) => {}
        other => panic!("expected TlsRequired, got {other:?}"),
    }
    // A certificate that is not one: a clear error.
    std::fs::write(dir.path().join("cert.pem"), "not a certificate").unwrap();
    std::fs::write(dir.path().join("key.pem"), "not a key").unwrap();
    let bad = GatewayConfig::new("127.0.0.1:0".parse().unwrap(), dir.path()).tls(
        mesh_transport::gateway::TlsFiles {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
        },
    );
    match Gateway::start(s.p.node.clone(), bad).await {
        Err(mesh_transport::gateway::GatewayError::Tls(m)) => {
            assert!(m.contains("cert.pem"), "{m}")
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
    s.p.node.shutdown().await;
}

/// A subscriber that stops reading is dropped events, told how many with
/// `event.lagged` (exactly: what it got plus what it was told it missed is
/// what was published), and the publisher is never held up by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_does_not_read_is_told_what_it_missed() {
    let s = setup(|c| c).await;
    let addr = s.gateway.local_addr();
    let mut slow = Client::open(addr).await;
    slow.ok("auth.login", json!({"token": s.admin})).await;
    slow.ok("events.subscribe", json!({"patterns": ["device.event"]}))
        .await;
    let mut publisher = Client::open(addr).await;
    publisher.ok("auth.login", json!({"token": s.admin})).await;
    // 4,000 events of 8 KiB (32 MiB): more than the socket's queue and
    // loopback's buffers hold while `slow` reads nothing. Batches of 50.
    let pad = "p".repeat(8 * 1024);
    let total = 4_000u64;
    for batch in 0..total / 50 {
        let calls: Vec<Value> = (0..50)
            .map(|i| {
                let n = batch * 50 + i;
                json!({"jsonrpc": "2.0", "id": n, "method": "events.publish",
                       "params": {"type": "flood.item", "data": {"n": n, "pad": pad}}})
            })
            .collect();
        publisher.send_text(Value::Array(calls).to_string()).await;
        let answers = publisher.answer().await;
        let answers = answers.as_array().unwrap();
        assert_eq!(answers.len(), 50);
        assert!(
            answers.iter().all(|a| a["result"]["success"] == true),
            "a publish failed: {answers:?}"
        );
    }
    // One more: delivered or counted like the rest (the queue may still be
    // full). Whatever is owed is told once `slow` reads, with no event
    // after it needed.
    publisher
        .ok("events.publish", json!({"type": "flood.end", "data": {}}))
        .await;
    let (mut got, mut missed) = (0u64, 0u64);
    while got + missed < total + 1 {
        let m = tokio::time::timeout(WAIT, slow.ws.next())
            .await
            .expect("the slow subscriber's socket keeps going")
            .expect("open")
            .expect("a message");
        let Message::Text(t) = m else { continue };
        let v: Value = serde_json::from_str(&t).unwrap();
        match v["method"].as_str() {
            Some("event") => got += 1,
            Some("event.lagged") => missed += v["params"]["missed"].as_u64().unwrap(),
            _ => {}
        }
    }
    assert_eq!(
        got + missed,
        total + 1,
        "every event is delivered or counted"
    );
    assert!(missed > 0, "the flood overflowed the queue (got {got})");
    // Nothing more is owed or sent: the next message is the answer.
    let info = slow.ok("gateway.info", json!({})).await;
    assert!(
        slow.notes
            .iter()
            .all(|n| n["method"] != "event.lagged" && n["method"] != "event"),
        "nothing after the count: {:?}",
        slow.notes.first()
    );
    assert_eq!(info["nodeId"], json!(s.p.node.node_id().to_string()));
    s.p.node.shutdown().await;
}

/// With a certificate the gateway speaks TLS only: a wss client that
/// trusts the certificate signs in; plain ws on the same port gets nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_gateway_serves_wss() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            // A server certificate, not a CA (rustls refuses a CA as the
            // end entity).
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "extendedKeyUsage=serverAuth",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (Debian's openssl package; .ci/run installs it)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let files = mesh_transport::gateway::TlsFiles {
        cert: cert.clone(),
        key,
    };
    let s = setup(|c| c.tls(files)).await;
    let addr = s.gateway.local_addr();

    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_file(&cert).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .expect("the TLS handshake");
    let url = format!("wss://localhost:{}/rpc", addr.port());
    let io: Box<dyn Io> = Box::new(tls);
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, io))
        .await
        .unwrap()
        .expect("the upgrade over TLS");
    let mut c = Client {
        ws,
        next: 1,
        notes: Vec::new(),
    };
    assert_eq!(
        c.ok("auth.login", json!({"token": s.admin})).await["principal"],
        "admin"
    );
    assert!(c.ok("devices.list", json!({})).await["devices"].is_array());

    // Plain WebSocket to the TLS port: refused at once (not left hanging).
    match Client::open_with(addr, &[]).await {
        Ok(_) => panic!("a plain WebSocket was upgraded on the TLS port"),
        Err(e) => assert_ne!(e, "the upgrade got no answer", "refused, not ignored"),
    }
    s.p.node.shutdown().await;
}
