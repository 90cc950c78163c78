//! The gateway's methods: params in (camelCase, unknown fields refused),
//! one access check ([`authorize`]), one call of the primary's runtime API,
//! results out. Nothing here is implemented a second time: the dashboard,
//! the CLI, the bindings and the tests reach the same `Primary` methods.

use std::sync::Arc;
use std::time::Duration;

use mesh_core::clock::Timestamp;
use mesh_core::identity::NodeId;
use mesh_core::node::{NodeError, Verdict};
use mesh_core::pairing::PairingError;
use mesh_core::registry::{AuthError, RegistryError, scopes};
use mesh_core::storage::records::{ActionState, DeviceRecord};
use mesh_core::wire::{CommandUsage, HealthMetrics};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::auth::Principal;
use super::rpc::{self, RpcError};
use super::server::{Shared, Socket};

/// What a method needs of its caller.
#[derive(Debug, Clone, Copy)]
enum Need {
    /// Anyone, even without a token.
    Nobody,
    /// The admin token.
    Admin,
    /// The admin token, or a device holding this scope.
    Scope(&'static str),
}

/// Who passed the check.
enum Caller {
    Anonymous,
    Admin,
    Device(Box<DeviceRecord>),
}

/// **The one access check** of every method: the admin token, or a web
/// remote's token through the registry's gate (paired, not revoked, the
/// current token, holding the scope) at each call.
async fn authorize(shared: &Shared, socket: &Socket, need: Need) -> Result<Caller, RpcError> {
    let principal = socket.principal();
    match (need, principal) {
        (Need::Nobody, Principal::Anonymous) => Ok(Caller::Anonymous),
        (_, Principal::Admin { generation }) if generation == shared.admin.generation() => {
            Ok(Caller::Admin)
        }
        (_, Principal::Admin { .. }) => Err(RpcError::new(
            rpc::UNAUTHORIZED,
            "unauthorized: the admin token was rotated; sign in with the new one",
        )),
        (Need::Nobody, Principal::Device { node, token }) => {
            device_gate(shared, node, token, scopes::PRESENCE_WRITE).await
        }
        (_, Principal::Anonymous) => Err(RpcError::new(
            rpc::UNAUTHORIZED,
            "unauthorized: log in first (auth.login {token}, or an Authorization: Bearer header on the upgrade)",
        )),
        (Need::Admin, Principal::Device { .. }) => Err(RpcError::new(
            rpc::FORBIDDEN,
            "forbidden: this method takes the admin token",
        )
        .with_data(json!({ "scope": "admin" }))),
        (Need::Scope(scope), Principal::Device { node, token }) => {
            device_gate(shared, node, token, scope).await
        }
    }
}

async fn device_gate(
    shared: &Shared,
    node: NodeId,
    token: zeroize::Zeroizing<String>,
    scope: &'static str,
) -> Result<Caller, RpcError> {
    let primary = shared.primary.clone();
    let checked = tokio::task::spawn_blocking(move || primary.authenticate_token(&token, scope))
        .await
        .map_err(|e| RpcError::new(rpc::INTERNAL_ERROR, e.to_string()))?;
    match checked {
        Ok(d) if d.node == node => Ok(Caller::Device(Box::new(d))),
        Ok(_) => Err(RpcError::new(
            rpc::UNAUTHORIZED,
            "unauthorized: the token changed",
        )),
        Err(e) => Err(node_error(e)),
    }
}

/// Reads `params` into `T`; a bad field is -32602 naming it.
fn params<T: DeserializeOwned>(params: &Value) -> Result<T, RpcError> {
    serde_json::from_value(params.clone()).map_err(|e| {
        let text = e.to_string();
        // serde names the field between backticks: "missing field `x`".
        let field = text
            .split('`')
            .nth(1)
            .filter(|f| !f.contains(' ') && f.len() <= 64)
            .unwrap_or("params")
            .to_owned();
        RpcError::new(rpc::INVALID_PARAMS, format!("invalid params: {text}"))
            .with_data(json!({ "field": field }))
    })
}

fn node_id(text: &str, field: &str) -> Result<NodeId, RpcError> {
    text.trim()
        .parse()
        .map_err(|e| RpcError::invalid_params(field, format!("not a node id: {e}")))
}

fn millis(t: Timestamp) -> Value {
    json!(t.as_millis())
}

/// A runtime error as the gateway answers it (documented codes).
pub(crate) fn node_error(e: NodeError) -> RpcError {
    if let Some((code, why)) = e.policy_refusal() {
        return RpcError::new(rpc::POLICY_DENIED, format!("policy denied: {why}"))
            .with_data(json!({ "code": code }));
    }
    let message = e.to_string();
    match e {
        NodeError::Pairing(p) => match p {
            PairingError::Expired => RpcError::new(rpc::PAIRING_EXPIRED, message),
            PairingError::InvalidCode { attempts_left } => {
                RpcError::new(rpc::PAIRING_INVALID_CODE, message)
                    .with_data(json!({ "attemptsLeft": attempts_left }))
            }
            PairingError::AlreadyPaired(_) => RpcError::new(rpc::PAIRING_ALREADY_PAIRED, message),
            PairingError::Rejected { .. } | PairingError::TooManyAttempts => {
                RpcError::new(rpc::PAIRING_REJECTED, message)
            }
            PairingError::UnknownRequest(_) => RpcError::new(rpc::NOT_FOUND, message),
            PairingError::Busy(_) => RpcError::new(rpc::BUSY, message),
            PairingError::Invalid(_) => RpcError::new(rpc::INVALID_PARAMS, message),
            _ => RpcError::new(rpc::INTERNAL_ERROR, message),
        },
        NodeError::Auth(a) => match a {
            AuthError::ScopeMissing { scope, .. } => {
                RpcError::new(rpc::FORBIDDEN, message).with_data(json!({ "scope": scope }))
            }
            AuthError::Storage(_) => RpcError::new(rpc::INTERNAL_ERROR, message),
            _ => RpcError::new(rpc::UNAUTHORIZED, message),
        },
        NodeError::Registry(RegistryError::UnknownDevice(_)) => {
            RpcError::new(rpc::NOT_FOUND, message)
        }
        NodeError::Registry(RegistryError::AlreadyPaired { .. }) => {
            RpcError::new(rpc::PAIRING_ALREADY_PAIRED, message)
        }
        NodeError::Policy(m) => RpcError::new(rpc::INVALID_PARAMS, format!("invalid params: {m}"))
            .with_data(json!({ "field": policy_field(&m) })),
        NodeError::Protocol(_) => RpcError::new(rpc::INVALID_PARAMS, message),
        NodeError::NotConnected(_)
        | NodeError::DeviceOffline(_)
        | NodeError::Timeout(_)
        | NodeError::Unavailable(_)
        | NodeError::Transport(_) => RpcError::new(rpc::UNAVAILABLE, message),
        NodeError::Command { code, message } if code == "not_found" || code == "unknown_action" => {
            RpcError::new(rpc::NOT_FOUND, message).with_data(json!({ "code": code }))
        }
        NodeError::Command { code, message } => {
            RpcError::new(rpc::UNAVAILABLE, message).with_data(json!({ "code": code }))
        }
        NodeError::NotFound(_) => RpcError::new(rpc::NOT_FOUND, message),
        _ => RpcError::new(rpc::INTERNAL_ERROR, message),
    }
}

/// The policy document's fields, as this API names them.
const POLICY_FIELDS: &[(&str, &str)] = &[
    ("is_enabled", "isEnabled"),
    ("allowed_commands", "allowedCommands"),
    ("blocked_commands", "blockedCommands"),
    ("require_approval", "requireApproval"),
    ("max_tokens_per_call", "maxTokensPerCall"),
    ("max_cost_per_hour", "maxCostPerHour"),
    ("max_concurrent_calls", "maxConcurrentCalls"),
    ("require_vpn", "requireVpn"),
    ("allowed_hours_utc", "allowedHoursUtc"),
    ("disallow_on_battery", "disallowOnBattery"),
    ("max_file_bytes", "maxFileBytes"),
];

/// The camelCase field a policy error speaks of (`params` if none).
fn policy_field(message: &str) -> &'static str {
    POLICY_FIELDS
        .iter()
        .find(|(snake, camel)| message.contains(snake) || message.contains(camel))
        .map_or("params", |(_, camel)| camel)
}

fn device_json(d: &mesh_core::node::DeviceView) -> Value {
    let status = if d.record.revoked_at.is_some() {
        "revoked".to_owned()
    } else if !d.online {
        "offline".to_owned()
    } else {
        d.status.clone().unwrap_or_else(|| "online".into())
    };
    json!({
        "id": d.record.node.to_string(),
        "name": d.record.name,
        "platform": d.record.platform,
        "status": status,
        "lastSeen": d.record.last_seen.map(millis),
        "trustLevel": d.record.trust_level,
        "healthScore": d.score,
        "capabilities": d.record.capabilities,
        "deviceId": d.record.device_id,
        "fingerprint": d.record.node.fingerprint().to_string(),
        "online": d.online,
        "scopes": d.record.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Login {
    token: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Empty {}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RequestPairing {
    device_name: String,
    #[serde(default)]
    device_platform: Option<String>,
    #[serde(default)]
    requesting_ip: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ApprovePairing {
    request_id: String,
    code: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RejectPairing {
    request_id: String,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DeviceOnly {
    device_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Discover {
    #[serde(default)]
    timeout: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct UpdateHealth {
    device_id: String,
    latency_ms: f64,
    #[serde(default)]
    battery_percent: Option<f64>,
    #[serde(default)]
    memory_percent: Option<f64>,
    #[serde(default)]
    cpu_percent: Option<f64>,
    #[serde(default)]
    charging: Option<bool>,
    #[serde(default)]
    disk_free_gb: Option<f64>,
    #[serde(default)]
    low_power_mode: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HealthHistory {
    device_id: String,
    /// Samples from this many ms ago (default one hour).
    #[serde(default)]
    since_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SetExecPolicy {
    device_id: String,
    allowed_commands: Vec<String>,
    #[serde(default)]
    blocked_commands: Option<Vec<String>>,
    #[serde(default)]
    max_tokens_per_call: Option<f64>,
    #[serde(default)]
    max_cost_per_hour: Option<f64>,
    #[serde(default)]
    require_approval: Option<bool>,
    #[serde(default)]
    is_enabled: Option<bool>,
    #[serde(default)]
    max_concurrent_calls: Option<f64>,
    #[serde(default)]
    require_vpn: Option<bool>,
    #[serde(default)]
    allowed_hours_utc: Option<Value>,
    #[serde(default)]
    disallow_on_battery: Option<bool>,
    #[serde(default)]
    max_file_bytes: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ResolveContext {
    #[serde(default)]
    cost: Option<f64>,
    #[serde(default)]
    tokens: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Resolve {
    device_id: String,
    command: String,
    #[serde(default)]
    context: Option<ResolveContext>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Subscribe {
    patterns: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Unsubscribe {
    subscription_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Publish {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    data: Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ActionsList {
    #[serde(default)]
    state: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ActionId {
    action_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ActionReject {
    action_id: String,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DeviceCommand {
    device_id: String,
    command: String,
    #[serde(default)]
    args: Option<Value>,
}

/// Largest `data` of an event a caller publishes (its JSON text).
const MAX_EVENT_DATA: usize = 16 * 1024;

/// The methods and what each needs.
const METHODS: &[(&str, Need)] = &[
    ("auth.login", Need::Nobody),
    ("devices.request_pairing", Need::Nobody),
    ("devices.list", Need::Scope(scopes::DEVICES_READ)),
    ("devices.pending_pairings", Need::Admin),
    ("devices.approve_pairing", Need::Admin),
    ("devices.reject_pairing", Need::Admin),
    ("devices.unpair", Need::Admin),
    ("devices.revoke", Need::Admin),
    ("devices.rotate_token", Need::Admin),
    ("nodes.discover", Need::Admin),
    ("devices.get_health", Need::Scope(scopes::DEVICES_READ)),
    (
        "devices.get_health_history",
        Need::Scope(scopes::DEVICES_READ),
    ),
    ("devices.update_health", Need::Scope(scopes::PRESENCE_WRITE)),
    ("policies.get_exec_policy", Need::Admin),
    ("policies.set_exec_policy", Need::Admin),
    ("policies.resolve", Need::Admin),
    ("events.subscribe", Need::Scope(scopes::EVENTS_READ)),
    ("events.unsubscribe", Need::Scope(scopes::EVENTS_READ)),
    ("events.publish", Need::Scope(scopes::EVENTS_WRITE)),
    ("actions.list", Need::Scope(scopes::ACTIONS_READ)),
    ("actions.approve", Need::Admin),
    ("actions.reject", Need::Admin),
    ("devices.command", Need::Admin),
    ("gateway.info", Need::Admin),
];

/// Answers one request.
pub(crate) async fn call(
    shared: &Arc<Shared>,
    socket: &Arc<Socket>,
    request: &rpc::Request,
) -> Result<Value, RpcError> {
    let Some((name, need)) = METHODS.iter().find(|(m, _)| *m == request.method) else {
        return Err(RpcError::new(
            rpc::METHOD_NOT_FOUND,
            format!("method not found: {:?}", request.method),
        ));
    };
    let p = &request.params;
    let primary = &shared.primary;
    // `auth.login` is how a principal is set, so it cannot be checked first.
    if *name == "auth.login" {
        let Login { token } = params(p)?;
        return shared.login(socket, &token).await;
    }
    let caller = authorize(shared, socket, *need).await?;
    match *name {
        "devices.request_pairing" => {
            let r: RequestPairing = params(p)?;
            if !matches!(caller, Caller::Anonymous) {
                return Err(RpcError::new(
                    rpc::PAIRING_ALREADY_PAIRED,
                    "this socket is logged in already",
                ));
            }
            // A caller's own word for its address is checked for form
            // only: the address counted and shown is the one the gateway
            // sees.
            if let Some(text) = r.requesting_ip.as_deref() {
                text.parse::<std::net::IpAddr>()
                    .map_err(|_| RpcError::invalid_params("requestingIp", "not an IP address"))?;
            }
            let ip = Some(socket.ip);
            shared.request_pairing(
                socket,
                &r.device_name,
                r.device_platform.as_deref().unwrap_or("web"),
                ip,
            )
        }
        "devices.list" => {
            Empty::deserialize(p).map_err(|e| RpcError::invalid_params("params", e))?;
            let all = blocking(primary, |p| p.devices()).await?;
            Ok(
                json!({ "devices": all.iter().filter(|d| !d.record.is_primary).map(device_json).collect::<Vec<_>>() }),
            )
        }
        "devices.pending_pairings" => {
            Empty::deserialize(p).map_err(|e| RpcError::invalid_params("params", e))?;
            let keyed = blocking(primary, |p| p.pending_pairings()).await?;
            let mut requests: Vec<Value> = keyed
                .iter()
                .map(|r| {
                    json!({
                        "requestId": r.request_id,
                        "deviceName": r.device_name,
                        "devicePlatform": r.platform,
                        "nodeId": r.device_node.to_string(),
                        "expiresAt": millis(r.expires_at),
                        "attemptsLeft": r.attempts_left,
                        "kind": "node",
                    })
                })
                .collect();
            requests.extend(primary.web_pairings().iter().map(|r| {
                json!({
                    "requestId": r.request_id,
                    "deviceName": r.device_name,
                    "devicePlatform": r.device_platform,
                    "requestingIp": r.requesting_ip.map(|ip| ip.to_string()),
                    "expiresAt": millis(r.expires_at),
                    "attemptsLeft": r.attempts_left,
                    "kind": "web",
                })
            }));
            Ok(json!({ "requests": requests }))
        }
        "devices.approve_pairing" => {
            let a: ApprovePairing = params(p)?;
            let record = primary
                .approve_pairing(&a.request_id, &a.code)
                .await
                .map_err(node_error)?;
            Ok(json!({ "success": true, "deviceId": record.node.to_string() }))
        }
        "devices.reject_pairing" => {
            let r: RejectPairing = params(p)?;
            primary
                .reject_pairing(&r.request_id, r.reason)
                .await
                .map_err(node_error)?;
            Ok(json!({ "success": true }))
        }
        "devices.unpair" | "devices.revoke" | "devices.rotate_token" => {
            let d: DeviceOnly = params(p)?;
            let device = node_id(&d.device_id, "deviceId")?;
            known(primary, device).await?;
            match *name {
                "devices.unpair" => primary.unpair(&device).await.map_err(node_error)?,
                "devices.revoke" => primary.revoke(&device).await.map_err(node_error)?,
                _ => {
                    let rotating = primary.clone();
                    let web =
                        tokio::task::spawn_blocking(move || rotating.rotate_web_token(&device))
                            .await
                            .map_err(|e| RpcError::new(rpc::INTERNAL_ERROR, e.to_string()))?;
                    return match web {
                        // A web remote: its new token is for the admin to hand over.
                        Ok(grant) => Ok(json!({ "success": true, "token": grant.token() })),
                        Err(NodeError::Unavailable(_)) => {
                            primary.rotate_token(&device).await.map_err(node_error)?;
                            Ok(json!({ "success": true }))
                        }
                        Err(e) => Err(node_error(e)),
                    };
                }
            }
            Ok(json!({ "success": true }))
        }
        "nodes.discover" => {
            let d: Discover = params(p)?;
            let timeout = Duration::from_millis(d.timeout.unwrap_or(0).min(10_000));
            let mut found = if timeout.is_zero() {
                Vec::new()
            } else {
                primary.discover(timeout).await.map_err(node_error)?
            };
            for n in blocking(primary, |p| p.discovered_nodes()).await? {
                if !found.iter().any(|f| f.node == n.node) {
                    found.push(n);
                }
            }
            let devices = blocking(primary, |p| p.devices()).await?;
            Ok(json!({ "nodes": found.iter().map(|n| {
                let paired = devices.iter().find(|d| d.record.node == n.node);
                json!({
                    "nodeId": n.node.to_string(),
                    "name": n.name,
                    "host": n.addresses.first().map(|a| a.ip().to_string()),
                    "port": n.addresses.first().map(|a| a.port()),
                    "platform": n.platform,
                    "version": n.version,
                    "firstDiscovered": millis(n.first_discovered),
                    "lastDiscovered": millis(n.last_discovered),
                    "discoveryCount": n.discovery_count,
                    "isPaired": paired.is_some() || n.is_paired,
                    "pairedDeviceId": paired.map(|d| d.record.node.to_string()),
                })
            }).collect::<Vec<_>>() }))
        }
        "devices.get_health" => {
            let d: DeviceOnly = params(p)?;
            let device = node_id(&d.device_id, "deviceId")?;
            let h = blocking(primary, move |p| p.device_health(&device)).await?;
            let m = h.metrics.as_ref();
            Ok(json!({
                "deviceId": device.to_string(),
                "isOnline": h.online,
                "latencyMs": m.and_then(|m| m.latency_ms),
                "healthScore": h.score,
                "lastHeartbeat": h.last_heartbeat.map(millis),
                "batteryPercent": m.and_then(|m| m.battery_percent),
                "memoryPercent": m.and_then(|m| m.memory_percent),
                "cpuPercent": m.and_then(|m| m.cpu_percent),
                "status": h.status,
            }))
        }
        "devices.get_health_history" => {
            let d: HealthHistory = params(p)?;
            let device = node_id(&d.device_id, "deviceId")?;
            let span = Duration::from_millis(d.since_ms.unwrap_or(3_600_000).min(7_200_000));
            let now = shared.now();
            let samples = blocking(primary, move |p| {
                p.health_history(&device, now.saturating_sub(span))
            })
            .await?;
            Ok(json!({
                "deviceId": device.to_string(),
                "samples": samples.iter().map(|s| json!({
                    "at": millis(s.at),
                    "healthScore": s.score,
                    "latencyMs": s.latency_ms,
                    "batteryPercent": s.battery_percent,
                    "memoryPercent": s.memory_percent,
                })).collect::<Vec<_>>(),
            }))
        }
        "devices.update_health" => {
            let u: UpdateHealth = params(p)?;
            let device = node_id(&u.device_id, "deviceId")?;
            if let Caller::Device(d) = &caller
                && d.node != device
            {
                return Err(RpcError::new(
                    rpc::FORBIDDEN,
                    "forbidden: a web remote may update only its own health",
                )
                .with_data(json!({ "scope": "admin" })));
            }
            let metrics = HealthMetrics {
                latency_ms: Some(u.latency_ms),
                battery_percent: u.battery_percent,
                charging: u.charging,
                memory_percent: u.memory_percent,
                cpu_percent: u.cpu_percent,
                disk_free_gb: u.disk_free_gb,
                low_power_mode: u.low_power_mode,
                ..HealthMetrics::default()
            };
            blocking(primary, move |p| p.report_health(&device, metrics))
                .await
                .map_err(|e| match e.code {
                    rpc::INVALID_PARAMS => RpcError::invalid_params("latencyMs", e.message),
                    _ => e,
                })?;
            Ok(json!({ "success": true }))
        }
        "policies.get_exec_policy" => {
            let d: DeviceOnly = params(p)?;
            let device = node_id(&d.device_id, "deviceId")?;
            let doc = blocking(primary, move |p| p.policy(&device)).await?;
            let camel = doc.map(|doc| {
                let mut out = serde_json::Map::new();
                if let Value::Object(fields) = doc {
                    for (k, v) in fields {
                        let name = POLICY_FIELDS
                            .iter()
                            .find(|(s, _)| *s == k)
                            .map_or(k.clone(), |(_, c)| (*c).to_owned());
                        out.insert(name, v);
                    }
                }
                Value::Object(out)
            });
            Ok(json!({ "deviceId": device.to_string(), "policy": camel }))
        }
        "policies.set_exec_policy" => {
            let s: SetExecPolicy = params(p)?;
            let device = node_id(&s.device_id, "deviceId")?;
            known(primary, device).await?;
            let mut doc = serde_json::Map::new();
            doc.insert("allowed_commands".into(), json!(s.allowed_commands));
            let mut put = |k: &str, v: Option<Value>| {
                if let Some(v) = v {
                    doc.insert(k.into(), v);
                }
            };
            put("blocked_commands", s.blocked_commands.map(|v| json!(v)));
            put(
                "max_tokens_per_call",
                s.max_tokens_per_call.map(|v| json!(v)),
            );
            put("max_cost_per_hour", s.max_cost_per_hour.map(|v| json!(v)));
            put("require_approval", s.require_approval.map(|v| json!(v)));
            put("is_enabled", s.is_enabled.map(|v| json!(v)));
            put(
                "max_concurrent_calls",
                s.max_concurrent_calls.map(|v| json!(v)),
            );
            put("require_vpn", s.require_vpn.map(|v| json!(v)));
            put("allowed_hours_utc", s.allowed_hours_utc);
            put(
                "disallow_on_battery",
                s.disallow_on_battery.map(|v| json!(v)),
            );
            put("max_file_bytes", s.max_file_bytes.map(|v| json!(v)));
            let text = Value::Object(doc).to_string();
            let stored = text.clone();
            blocking(primary, move |p| p.set_policy(&device, &stored)).await?;
            let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
            let id: String = digest.as_ref()[..8]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            Ok(json!({ "success": true, "policyId": id }))
        }
        "policies.resolve" => {
            let r: Resolve = params(p)?;
            let device = node_id(&r.device_id, "deviceId")?;
            let usage = CommandUsage {
                cost: r.context.as_ref().and_then(|c| c.cost),
                tokens: r.context.as_ref().and_then(|c| c.tokens),
                ..CommandUsage::default()
            };
            let command = r.command.clone();
            let verdict = blocking(primary, move |p| {
                p.check_command_with(&device, &command, usage)
            })
            .await?;
            let (allowed, decision, reason, code) = match verdict {
                Verdict::Allow => (
                    true,
                    "allow",
                    "allowed by the device's policy".to_owned(),
                    "allowed".to_owned(),
                ),
                Verdict::Deny { code, message } => (false, "deny", message, code),
                Verdict::NeedsApproval { code, message } => {
                    (false, "needs_approval", message, code)
                }
                Verdict::Defer { code, message, .. } => (false, "defer", message, code),
            };
            Ok(json!({ "allowed": allowed, "decision": decision, "reason": reason, "code": code }))
        }
        "events.subscribe" => {
            let s: Subscribe = params(p)?;
            shared.subscribe(socket, &s.patterns)
        }
        "events.unsubscribe" => {
            let u: Unsubscribe = params(p)?;
            if socket.unsubscribe(&u.subscription_id) {
                Ok(json!({ "success": true }))
            } else {
                Err(RpcError::new(
                    rpc::NOT_FOUND,
                    format!("no subscription {:?}", u.subscription_id),
                ))
            }
        }
        "events.publish" => {
            let e: Publish = params(p)?;
            if e.data.to_string().len() > MAX_EVENT_DATA {
                return Err(RpcError::invalid_params(
                    "data",
                    format!("at most {MAX_EVENT_DATA} bytes of JSON"),
                ));
            }
            let kind_ok = !e.kind.is_empty()
                && e.kind.len() <= 64
                && e.kind.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
                });
            if !kind_ok {
                return Err(RpcError::invalid_params(
                    "type",
                    "1 to 64 of a-z, 0-9, '.', '_', '-'",
                ));
            }
            let from = match &caller {
                Caller::Device(d) => d.node.to_string(),
                _ => "admin".to_owned(),
            };
            primary.events().publish(
                mesh_core::events::kinds::DEVICE_EVENT,
                shared.now(),
                json!({ "device": from, "kind": e.kind, "data": e.data }),
            );
            Ok(json!({ "success": true }))
        }
        "actions.list" => {
            let l: ActionsList = params(p)?;
            let state = match l.state.as_deref() {
                Some(s) => Some(ActionState::parse(s).ok_or_else(|| {
                    RpcError::invalid_params(
                        "state",
                        "one of proposed, approved, executing, executed, failed, rejected, voided",
                    )
                })?),
                None => None,
            };
            let all = blocking(primary, |p| p.actions()).await?;
            Ok(
                json!({ "actions": all.iter().filter(|a| state.is_none_or(|s| a.state == s)).map(action_json).collect::<Vec<_>>() }),
            )
        }
        "actions.approve" => {
            let a: ActionId = params(p)?;
            let done = primary
                .approve_action(&a.action_id)
                .await
                .map_err(node_error)?;
            Ok(json!({ "success": true, "action": action_json(&done) }))
        }
        "actions.reject" => {
            let a: ActionReject = params(p)?;
            let done = primary
                .reject_action(&a.action_id, a.reason)
                .await
                .map_err(node_error)?;
            Ok(json!({ "success": true, "action": action_json(&done) }))
        }
        "devices.command" => {
            let c: DeviceCommand = params(p)?;
            let device = node_id(&c.device_id, "deviceId")?;
            known(primary, device).await?;
            let args = c.args.unwrap_or(Value::Null);
            match c.command.as_str() {
                "ping" => {
                    let rtt = primary.ping(&device).await.map_err(node_error)?;
                    Ok(json!({ "success": true, "latencyMs": rtt.as_secs_f64() * 1000.0 }))
                }
                "config" => {
                    let key = args
                        .get("key")
                        .and_then(Value::as_str)
                        .ok_or_else(|| RpcError::invalid_params("args.key", "a string is needed"))?
                        .to_owned();
                    let value = args.get("value").cloned().unwrap_or(Value::Null);
                    primary
                        .configure(&device, &key, value)
                        .await
                        .map_err(node_error)?;
                    Ok(json!({ "success": true }))
                }
                "run_action" => {
                    let action = args
                        .get("action")
                        .and_then(Value::as_str)
                        .ok_or_else(|| {
                            RpcError::invalid_params("args.action", "a string is needed")
                        })?
                        .to_owned();
                    let inner = args.get("args").cloned().unwrap_or_else(|| json!({}));
                    let result = primary
                        .run_action(&device, &action, inner)
                        .await
                        .map_err(node_error)?;
                    Ok(json!({ "success": true, "result": result }))
                }
                other => Err(RpcError::invalid_params(
                    "command",
                    format!("{other:?}: one of ping, config, run_action"),
                )),
            }
        }
        "gateway.info" => {
            Empty::deserialize(p).map_err(|e| RpcError::invalid_params("params", e))?;
            Ok(shared.info())
        }
        _ => Err(RpcError::new(rpc::METHOD_NOT_FOUND, "method not found")),
    }
}

fn action_json(a: &mesh_core::storage::records::ActionRecord) -> Value {
    json!({
        "id": a.id,
        "state": a.state.as_str(),
        "command": a.command,
        "params": serde_json::from_str::<Value>(a.params.as_str()).unwrap_or(Value::Null),
        "proposedBy": a.proposed_by.to_string(),
        "decidedBy": a.decided_by,
        "createdAt": millis(a.created_at),
        "updatedAt": millis(a.updated_at),
        "result": a.result.as_ref().and_then(|r| serde_json::from_str::<Value>(r.as_str()).ok()),
        "error": a.error,
    })
}

/// `device` must be a paired (or revoked) device: not found otherwise (one
/// registry read, not the whole device list).
async fn known(primary: &mesh_core::node::Primary, device: NodeId) -> Result<(), RpcError> {
    blocking(primary, move |p| p.device_health(&device).map(|_| ())).await
}

/// Runs `f` with the primary off the async threads (storage reads).
async fn blocking<T: Send + 'static>(
    primary: &mesh_core::node::Primary,
    f: impl FnOnce(&mesh_core::node::Primary) -> Result<T, NodeError> + Send + 'static,
) -> Result<T, RpcError> {
    let p = primary.clone();
    tokio::task::spawn_blocking(move || f(&p))
        .await
        .map_err(|e| RpcError::new(rpc::INTERNAL_ERROR, e.to_string()))?
        .map_err(node_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(code: &str) -> NodeError {
        NodeError::Command {
            code: code.into(),
            message: format!("refused: {code}"),
        }
    }

    #[test]
    fn a_policy_refusal_is_policy_denied_with_its_reason_code() {
        for code in ["blocked_command", "needs_approval", "outside_hours"] {
            let e = node_error(command(code));
            assert_eq!(e.code, rpc::POLICY_DENIED, "{code}");
            assert_eq!(
                e.data.as_ref().map(|d| d["code"].clone()),
                Some(json!(code))
            );
            assert!(e.message.starts_with("policy denied: "), "{}", e.message);
        }
        // Failures while running are not the policy's.
        let e = node_error(command("handler_failed"));
        assert_eq!(e.code, rpc::UNAVAILABLE);
        assert_eq!(node_error(command("unknown_action")).code, rpc::NOT_FOUND);
        assert_eq!(
            node_error(NodeError::NotFound("no action a1".into())).code,
            rpc::NOT_FOUND
        );
    }
}
