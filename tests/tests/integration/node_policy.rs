//! The runtime with real mesh-policy decisions over QUIC: restrictive and
//! approval-gated policies, the action lifecycle through to `executed`,
//! `failed` and `rejected`, a deferral retried after its delay, and a
//! primary restart (SQLite) that keeps identity, devices, policies, actions
//! and ledger while the worker reconnects by itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mesh_core::events::Received;
use mesh_core::identity::NodeKey;
use mesh_core::ledger::{Body, record_types};
use mesh_core::node::{
    FnHandler, MetricsSource, Node, NodeConfig, NodeError, RegistryAdmission, Role, Worker,
    action_states,
};
use mesh_core::storage::{MemoryStorage, SqliteStorage, Storage};
use mesh_core::transport::PeerAddr;
use mesh_core::wire::{CommandUsage, HealthMetrics, JobSize, Platform};
use mesh_ledger::{LedgerConfig, SignedLedger, verify_ledger};
use mesh_policy::runtime::RuntimePolicy;
use mesh_policy::{PolicyEngine, PowerThresholds};
use mesh_transport::quic::{QuicConfig, QuicTransport};
use serde_json::{Value, json};

use crate::support::{WAIT, next};

/// CPU load the worker reports; the test flips it.
#[derive(Debug, Default)]
struct Cpu(AtomicBool);

impl MetricsSource for Cpu {
    fn sample(&self) -> HealthMetrics {
        let busy = self.0.load(Ordering::Relaxed);
        HealthMetrics {
            cpu_percent: Some(if busy { 99.0 } else { 10.0 }),
            memory_percent: Some(40.0),
            ..HealthMetrics::default()
        }
    }
}

struct Primary {
    node: mesh_core::node::Primary,
    store: Arc<dyn Storage>,
    key: Arc<NodeKey>,
    addr: PeerAddr,
}

fn start_primary(store: Arc<dyn Storage>, key: Arc<NodeKey>, port: u16) -> Result<Primary, String> {
    start_primary_with(store, key, port, Duration::from_secs(5))
}

fn start_primary_with(
    store: Arc<dyn Storage>,
    key: Arc<NodeKey>,
    port: u16,
    command_timeout: Duration,
) -> Result<Primary, String> {
    let ledger = Arc::new(
        SignedLedger::open(store.clone(), key.clone(), LedgerConfig::default())
            .map_err(|e| e.to_string())?,
    );
    let admission = Arc::new(RegistryAdmission::new(store.clone()));
    let local = format!("127.0.0.1:{port}").parse().unwrap();
    let transport = Arc::new(
        QuicTransport::bind(key.clone(), local, admission, QuicConfig::default())
            .map_err(|e| e.to_string())?,
    );
    let addr = transport.addr();
    // Deferrals of 200 ms on a busy CPU, so the retry shows within a test.
    let mut thresholds = PowerThresholds::default();
    thresholds.cpu_defer_ms = 200;
    let engine = PolicyEngine::with_thresholds(thresholds);
    let config = NodeConfig::new(Role::Primary, "Studio", "primary-1")
        .heartbeat_interval(Duration::from_millis(50))
        .command_timeout(command_timeout);
    let node = Node::builder(key.clone(), store.clone(), transport, config)
        .ledger(ledger)
        .policy(Arc::new(RuntimePolicy::with_engine(engine)))
        .handler(
            "notes.write",
            Arc::new(FnHandler(|a: &Value| Ok(json!({ "stored": a["text"] })))),
        )
        .handler(
            "jobs.deploy",
            Arc::new(FnHandler(|a: &Value| {
                Ok(json!({ "deployed": a["version"] }))
            })),
        )
        .handler(
            "jobs.fail",
            Arc::new(FnHandler(|_: &Value| Err("disk full".to_owned()))),
        )
        .handler(
            "jobs.slow",
            Arc::new(FnHandler(|_: &Value| {
                std::thread::sleep(Duration::from_millis(1500));
                Ok(json!({ "slow": true }))
            })),
        )
        .start_primary()
        .map_err(|e| e.to_string())?;
    Ok(Primary {
        node,
        store,
        key,
        addr,
    })
}

fn start_worker(cpu: Arc<Cpu>) -> Worker {
    start_worker_as(cpu, Platform::Desktop, "builder")
}

fn start_worker_as(metrics: Arc<dyn MetricsSource>, platform: Platform, name: &str) -> Worker {
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let key = Arc::new(NodeKey::generate());
    let admission = Arc::new(RegistryAdmission::new(store.clone()));
    // A down primary shows as a handshake timeout: keep it short here.
    let mut quic = QuicConfig::default();
    quic.handshake_timeout = Duration::from_millis(300);
    let transport = Arc::new(
        QuicTransport::bind(key.clone(), "127.0.0.1:0".parse().unwrap(), admission, quic).unwrap(),
    );
    let config = NodeConfig::new(Role::Worker, name, &format!("hw-{name}"))
        .platform(platform)
        .heartbeat_interval(Duration::from_millis(50))
        .command_timeout(Duration::from_secs(5))
        .reconnect(Duration::from_millis(50), Duration::from_millis(400));
    Node::builder(key, store, transport, config)
        .metrics(metrics)
        .start_worker()
        .unwrap()
}

async fn pair(p: &Primary, w: &Worker) {
    let mut requests = p.node.subscribe("pairing.request_received", 8).unwrap();
    let mut sessions = w.subscribe("session.connected", 8).unwrap();
    let ticket = w
        .request_pairing(p.node.node_id(), p.addr.clone())
        .await
        .unwrap();
    next(&mut requests, "pairing.request_received", WAIT).await;
    p.node
        .approve_pairing(ticket.request_id(), ticket.code())
        .await
        .unwrap();
    ticket.finished().await.unwrap();
    next(&mut sessions, "session.connected", WAIT).await;
}

fn code(r: Result<Value, NodeError>) -> (String, String) {
    match r {
        Err(NodeError::Command { code, message }) => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn ledger_records(p: &Primary) -> Vec<mesh_ledger::LedgerRecord> {
    let ledger =
        SignedLedger::open(p.store.clone(), p.key.clone(), LedgerConfig::default()).unwrap();
    ledger.view().records(0, 1000).unwrap()
}

fn ledger_types(p: &Primary) -> Vec<String> {
    ledger_records(p)
        .into_iter()
        .map(|r| r.record_type)
        .collect()
}

fn decisions(p: &Primary) -> Vec<String> {
    ledger_records(p)
        .into_iter()
        .filter(|r| r.record_type == record_types::COMMAND_DECIDED)
        .map(|r| match r.body {
            Body::Json(j) => serde_json::from_str::<Value>(j.as_str()).unwrap()["decision"]
                .as_str()
                .unwrap()
                .to_owned(),
            Body::Bytes(_) => panic!("JSON body"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restrictive_and_approval_policies_drive_the_action_lifecycle() {
    let p = start_primary(
        Arc::new(MemoryStorage::new()),
        Arc::new(NodeKey::generate()),
        0,
    )
    .unwrap();
    let cpu = Arc::new(Cpu::default());
    let w = start_worker(cpu.clone());
    pair(&p, &w).await;
    let dev = w.node_id();

    // No policy yet: denied by default.
    assert_eq!(
        code(w.send_command("notes.write", json!({"text": "x"})).await).0,
        "policy_disabled"
    );

    // Restrictive.
    let restrictive = r#"{"allowed_commands": ["notes.*"], "blocked_commands": ["notes.delete"]}"#;
    p.node.set_policy(&dev, restrictive).unwrap();
    assert_eq!(
        p.node.policy(&dev).unwrap().unwrap()["blocked_commands"],
        json!(["notes.delete"])
    );
    assert_eq!(
        w.send_command("notes.write", json!({"text": "hi"}))
            .await
            .unwrap(),
        json!({"stored": "hi"})
    );
    let (c, m) = code(w.send_command("notes.delete", json!({})).await);
    assert_eq!(c, "blocked_command");
    assert!(m.contains("notes.delete"), "{m}");
    assert_eq!(
        code(w.send_command("jobs.deploy", json!({})).await).0,
        "command_not_allowed"
    );
    // A bad document is refused and the stored one stays.
    assert!(matches!(
        p.node.set_policy(&dev, r#"{"allowed_commands": ["["]}"#),
        Err(NodeError::Policy(_))
    ));
    assert!(matches!(
        p.node.set_policy(&dev, "not json"),
        Err(NodeError::Policy(_))
    ));
    assert_eq!(
        p.node.policy(&dev).unwrap().unwrap()["allowed_commands"],
        json!(["notes.*"])
    );

    // Trusted but approval-gated: proposed, then executed / failed / rejected.
    p.node
        .set_policy(
            &dev,
            r#"{"allowed_commands": ["jobs.*"], "require_approval": true}"#,
        )
        .unwrap();
    let mut updates = w.subscribe("action.updated", 64).unwrap();
    let (c, m) = code(w.send_command("jobs.deploy", json!({"version": 3})).await);
    assert_eq!(c, "needs_approval");
    let proposed = next(&mut updates, "action.updated", WAIT).await;
    assert_eq!(proposed.data["state"], action_states::PROPOSED);
    let id = proposed.data["id"].as_str().unwrap().to_owned();
    assert!(m.contains(&id), "{m}");
    let actions = p.node.actions().unwrap();
    assert_eq!(
        (actions.len(), actions[0].state.as_str()),
        (1, action_states::PROPOSED)
    );
    let done = p.node.approve_action(&id).await.unwrap();
    assert_eq!(done.state, action_states::EXECUTED);
    assert_eq!(done.result.unwrap().as_str(), r#"{"deployed":3}"#);
    for state in [
        action_states::APPROVED,
        action_states::EXECUTING,
        action_states::EXECUTED,
    ] {
        assert_eq!(
            next(&mut updates, "action.updated", WAIT).await.data["state"],
            state
        );
    }
    assert!(p.node.approve_action(&id).await.is_err(), "approved twice");

    code(w.send_command("jobs.fail", json!({})).await);
    let failing = next(&mut updates, "action.updated", WAIT).await.data["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let failed = p.node.approve_action(&failing).await.unwrap();
    assert_eq!(failed.state, action_states::FAILED);
    assert!(failed.error.unwrap().contains("disk full"));

    code(w.send_command("jobs.deploy", json!({"version": 4})).await);
    let mut rejected_id = String::new();
    while rejected_id.is_empty() {
        let e = next(&mut updates, "action.updated", WAIT).await;
        if e.data["state"] == action_states::PROPOSED {
            rejected_id = e.data["id"].as_str().unwrap().to_owned();
        }
    }
    let rejected = p
        .node
        .reject_action(&rejected_id, Some("not today".into()))
        .await
        .unwrap();
    assert_eq!(rejected.state, action_states::REJECTED);

    // Deferred on a busy CPU, retried after the delay, then allowed.
    p.node
        .set_policy(&dev, r#"{"allowed_commands": ["notes.*"]}"#)
        .unwrap();
    cpu.0.store(true, Ordering::Relaxed);
    let mut hb = p.node.subscribe("command.decided", 16).unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await; // let a busy heartbeat arrive
    let relief = {
        let cpu = cpu.clone();
        let mut decided = p.node.subscribe("command.decided", 16).unwrap();
        tokio::spawn(async move {
            let first = next(&mut decided, "command.decided", WAIT).await;
            assert_eq!(first.data["decision"], "defer");
            cpu.0.store(false, Ordering::Relaxed);
        })
    };
    assert_eq!(
        w.send_command("notes.write", json!({"text": "later"}))
            .await
            .unwrap(),
        json!({"stored": "later"})
    );
    relief.await.unwrap();
    let mut seen = Vec::new();
    while let Some(Received::Event(e)) = hb.try_recv() {
        seen.push(e.data["decision"].as_str().unwrap().to_owned());
    }
    assert_eq!(seen.first().map(String::as_str), Some("defer"));
    assert_eq!(seen.last().map(String::as_str), Some("allow"));

    // All of it is in the ledger, which verifies.
    let types = ledger_types(&p);
    // Three policies set (the two bad documents changed nothing).
    assert_eq!(
        types
            .iter()
            .filter(|t| *t == record_types::POLICY_SET)
            .count(),
        3
    );
    // executed: 4 transitions, failed: 4, rejected: 2.
    assert_eq!(
        types
            .iter()
            .filter(|t| *t == record_types::ACTION_TRANSITION)
            .count(),
        4 + 4 + 2
    );
    let d = decisions(&p);
    assert!(
        d.contains(&"deny".to_owned())
            && d.contains(&"needs_approval".to_owned())
            && d.contains(&"defer".to_owned())
    );
    assert!(
        verify_ledger(p.store.as_ref(), &p.key.node_id(), None)
            .unwrap()
            .ok()
    );
    w.shutdown().await;
    p.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_primary_keeps_its_state_and_the_worker_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("primary.db");
    let key_file = dir.path().join("primary.key");
    let (key, _) = NodeKey::load_or_generate(&key_file).unwrap();
    let store: Arc<dyn Storage> = Arc::new(SqliteStorage::open(&db).unwrap());
    let p = start_primary(store, Arc::new(key), 0).unwrap();
    let PeerAddr::Socket(addr) = p.addr.clone() else {
        panic!("a socket address")
    };
    let w = start_worker(Arc::new(Cpu::default()));
    pair(&p, &w).await;
    let dev = w.node_id();
    p.node
        .set_policy(
            &dev,
            r#"{"allowed_commands": ["jobs.*"], "require_approval": true}"#,
        )
        .unwrap();
    code(w.send_command("jobs.deploy", json!({"version": 9})).await);
    let id = p.node.actions().unwrap()[0].id.clone();
    let before = ledger_types(&p).len();

    // Stop the primary; the worker keeps trying.
    let mut lost = w.subscribe("session.*", 64).unwrap();
    p.node.shutdown().await;
    drop(p);
    next(&mut lost, "session.reconnecting", WAIT).await;

    // Restart from the same key file and database, on the same port.
    let (key, created) = NodeKey::load_or_generate(&key_file).unwrap();
    assert!(!created);
    let store: Arc<dyn Storage> = Arc::new(SqliteStorage::open(&db).unwrap());
    let mut restarted = None;
    for _ in 0..100 {
        match start_primary(
            store.clone(),
            Arc::new(NodeKey::load(&key_file).unwrap()),
            addr.port(),
        ) {
            Ok(p) => {
                restarted = Some(p);
                break;
            }
            // The old socket may take a moment to close.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let p = restarted.expect("rebinding the primary's port");
    assert_eq!(p.node.node_id(), key.node_id());
    next(&mut lost, "session.connected", WAIT).await;
    let devices = p.node.devices().unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].record.node, dev);
    assert!(
        p.node.policy(&dev).unwrap().unwrap()["require_approval"]
            .as_bool()
            .unwrap()
    );
    assert_eq!(p.node.actions().unwrap()[0].state, action_states::PROPOSED);
    assert_eq!(ledger_types(&p).len(), before);
    // The restored state works: the action runs, the worker's session is live.
    assert_eq!(
        p.node.approve_action(&id).await.unwrap().state,
        action_states::EXECUTED
    );
    p.node.ping(&dev).await.unwrap();
    assert!(
        verify_ledger(p.store.as_ref(), &p.key.node_id(), None)
            .unwrap()
            .ok()
    );
    w.shutdown().await;
    p.node.shutdown().await;
}

/// Fixed metrics, as an app reports them.
#[derive(Debug)]
struct Fixed(HealthMetrics);

impl MetricsSource for Fixed {
    fn sample(&self) -> HealthMetrics {
        self.0.clone()
    }
}

/// Issue 14, defect 7: the power rules fire in the runtime, from the
/// device's platform and its latest heartbeat, over QUIC. An iPhone in
/// low-power mode is refused with the power reason; a laptop (a desktop
/// platform reporting a battery) at 30 % on battery runs small jobs only;
/// the same desktop platform without a battery runs anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_rules_fire_from_the_platform_and_the_latest_heartbeat() {
    let p = start_primary(
        Arc::new(MemoryStorage::new()),
        Arc::new(NodeKey::generate()),
        0,
    )
    .unwrap();
    let phone = start_worker_as(
        Arc::new(Fixed(HealthMetrics {
            battery_percent: Some(80.0),
            charging: Some(false),
            low_power_mode: Some(true),
            ..HealthMetrics::default()
        })),
        Platform::Ios,
        "phone",
    );
    let laptop = start_worker_as(
        Arc::new(Fixed(HealthMetrics {
            battery_percent: Some(30.0),
            charging: Some(false),
            ..HealthMetrics::default()
        })),
        Platform::Desktop,
        "laptop",
    );
    let tower = start_worker_as(
        Arc::new(Fixed(HealthMetrics {
            cpu_percent: Some(10.0),
            ..HealthMetrics::default()
        })),
        Platform::Desktop,
        "tower",
    );
    let large = CommandUsage {
        job_size: Some(JobSize::Large),
        ..CommandUsage::default()
    };
    let mut online = p.node.subscribe("device.online", 8).unwrap();
    for w in [&phone, &laptop, &tower] {
        pair(&p, w).await;
        p.node
            .set_policy(&w.node_id(), r#"{"allowed_commands": ["notes.*"]}"#)
            .unwrap();
    }
    // Each device's first heartbeat has been scored.
    for _ in 0..3 {
        next(&mut online, "device.online", WAIT).await;
    }

    let (c, _) = code(
        phone
            .send_command("notes.write", json!({"text": "x"}))
            .await,
    );
    assert_eq!(c, "power_low_power_mode");
    let (c, m) = code(
        laptop
            .send_command_with("notes.write", json!({"text": "big"}), Some(large))
            .await,
    );
    assert_eq!(c, "power_small_jobs_only", "{m}");
    assert_eq!(
        laptop
            .send_command("notes.write", json!({"text": "small"}))
            .await
            .unwrap(),
        json!({"stored": "small"})
    );
    assert_eq!(
        tower
            .send_command_with("notes.write", json!({"text": "big"}), Some(large))
            .await
            .unwrap(),
        json!({"stored": "big"})
    );
    // A declared cost that is not a number a limit can judge is refused
    // before it leaves the worker.
    let bad = Some(CommandUsage {
        cost: Some(f64::NAN),
        ..CommandUsage::default()
    });
    assert!(matches!(
        tower.send_command_with("notes.write", json!({}), bad).await,
        Err(NodeError::Policy(_))
    ));
    // The dry run sees the same context.
    assert!(matches!(
        p.node.check_command_with(&laptop.node_id(), "notes.write", large),
        Ok(mesh_core::node::Verdict::Deny { code, .. }) if code == "power_small_jobs_only"
    ));
}

/// Review finding, over QUIC: what a device leaves unsaid counts against
/// it. An Android phone at 3 % that does not report whether it is charging
/// is refused by the battery rule; the same phone saying it charges runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_that_leaves_charging_unsaid_is_judged_on_battery() {
    let p = start_primary(
        Arc::new(MemoryStorage::new()),
        Arc::new(NodeKey::generate()),
        0,
    )
    .unwrap();
    let low = HealthMetrics {
        battery_percent: Some(3.0),
        ..HealthMetrics::default()
    };
    let unsaid = start_worker_as(Arc::new(Fixed(low.clone())), Platform::Android, "unsaid");
    let charging = start_worker_as(
        Arc::new(Fixed(HealthMetrics {
            charging: Some(true),
            ..low
        })),
        Platform::Android,
        "charging",
    );
    let mut online = p.node.subscribe("device.online", 8).unwrap();
    for w in [&unsaid, &charging] {
        pair(&p, w).await;
        p.node
            .set_policy(&w.node_id(), r#"{"allowed_commands": ["notes.*"]}"#)
            .unwrap();
    }
    for _ in 0..2 {
        next(&mut online, "device.online", WAIT).await;
    }
    let (c, m) = code(
        unsaid
            .send_command("notes.write", json!({"text": "x"}))
            .await,
    );
    assert_eq!(c, "power_battery_low", "{m}");
    assert_eq!(
        charging
            .send_command("notes.write", json!({"text": "x"}))
            .await
            .unwrap(),
        json!({"stored": "x"})
    );
}

fn body(r: &mesh_ledger::LedgerRecord) -> Value {
    match &r.body {
        Body::Json(j) => serde_json::from_str(j.as_str()).unwrap(),
        Body::Bytes(_) => panic!("JSON body"),
    }
}

/// Issue 14, defect 5: revoking a device cancels its deferred command (no
/// decision is made or recorded for it afterwards) and voids its proposed
/// actions, each with a ledger record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_cancels_deferred_commands_and_voids_proposed_actions() {
    let p = start_primary(
        Arc::new(MemoryStorage::new()),
        Arc::new(NodeKey::generate()),
        0,
    )
    .unwrap();
    let cpu = Arc::new(Cpu::default());
    let w = start_worker(cpu.clone());
    pair(&p, &w).await;
    let dev = w.node_id();
    p.node
        .set_policy(
            &dev,
            r#"{"allowed_commands": ["jobs.*"], "require_approval": true}"#,
        )
        .unwrap();
    assert_eq!(
        code(w.send_command("jobs.deploy", json!({"version": 1})).await).0,
        "needs_approval"
    );
    let proposed = p.node.actions().unwrap()[0].id.clone();

    // A command deferred on a busy CPU (retried every 200 ms)…
    p.node
        .set_policy(&dev, r#"{"allowed_commands": ["notes.*"]}"#)
        .unwrap();
    cpu.0.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut decided = p.node.subscribe("command.decided", 16).unwrap();
    let sender = w.clone();
    let pending = tokio::spawn(async move {
        sender
            .send_command("notes.write", json!({"text": "later"}))
            .await
    });
    let first = next(&mut decided, "command.decided", WAIT).await;
    assert_eq!(first.data["decision"], "defer");
    // …and the device is revoked while it waits.
    p.node.revoke(&dev).await.unwrap();
    assert!(pending.await.unwrap().is_err());
    tokio::time::sleep(Duration::from_millis(800)).await;

    let records = ledger_records(&p);
    let revoked_at = records
        .iter()
        .position(|r| r.record_type == record_types::DEVICE_REVOKED)
        .unwrap();
    let after: Vec<_> = records[revoked_at..]
        .iter()
        .map(|r| (r.record_type.clone(), body(r)))
        .collect();
    assert!(
        !after
            .iter()
            .any(|(t, _)| t == record_types::COMMAND_DECIDED),
        "decided after the revocation: {after:?}"
    );
    let voided: Vec<_> = after
        .iter()
        .filter(|(t, b)| {
            t == record_types::ACTION_TRANSITION && b["state"] == action_states::VOIDED
        })
        .collect();
    assert_eq!(voided.len(), 1, "{after:?}");
    assert_eq!(voided[0].1["action"], proposed.as_str());
    let action = p
        .node
        .actions()
        .unwrap()
        .into_iter()
        .find(|a| a.id == proposed)
        .unwrap();
    assert_eq!(action.state, action_states::VOIDED);
    assert!(p.node.approve_action(&proposed).await.is_err());
}

/// Issue 14, defect 5: two concurrent approvals of one action run its
/// handler once; the other is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_approvals_run_an_action_once() {
    let p = start_primary(
        Arc::new(MemoryStorage::new()),
        Arc::new(NodeKey::generate()),
        0,
    )
    .unwrap();
    let w = start_worker(Arc::new(Cpu::default()));
    pair(&p, &w).await;
    p.node
        .set_policy(
            &w.node_id(),
            r#"{"allowed_commands": ["jobs.*"], "require_approval": true}"#,
        )
        .unwrap();
    for round in 0..5 {
        code(
            w.send_command("jobs.deploy", json!({"version": round}))
                .await,
        );
        let id = p.node.actions().unwrap()[0].id.clone();
        let (a, b) = (p.node.clone(), p.node.clone());
        let (ida, idb) = (id.clone(), id.clone());
        let first = tokio::spawn(async move { a.approve_action(&ida).await });
        let second = tokio::spawn(async move { b.approve_action(&idb).await });
        let results = [first.await.unwrap(), second.await.unwrap()];
        assert_eq!(
            results.iter().filter(|r| r.is_ok()).count(),
            1,
            "{results:?}"
        );
        let executed = ledger_records(&p)
            .iter()
            .filter(|r| {
                r.record_type == record_types::ACTION_TRANSITION
                    && body(r)["action"] == id.as_str()
                    && body(r)["state"] == action_states::EXECUTED
            })
            .count();
        assert_eq!(executed, 1);
    }
}

/// Issue 14, defect 5: a handler that overran its timeout keeps its
/// concurrency permit until its thread ends: the next command is refused
/// for concurrency meanwhile, then allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overrunning_handler_keeps_its_concurrency_slot_until_it_ends() {
    let p = start_primary_with(
        Arc::new(MemoryStorage::new()),
        Arc::new(NodeKey::generate()),
        0,
        Duration::from_millis(400),
    )
    .unwrap();
    let w = start_worker(Arc::new(Cpu::default()));
    pair(&p, &w).await;
    p.node
        .set_policy(
            &w.node_id(),
            r#"{"allowed_commands": ["jobs.*"], "max_concurrent_calls": 1}"#,
        )
        .unwrap();
    assert_eq!(
        code(w.send_command("jobs.slow", json!({})).await).0,
        "handler_timeout"
    );
    // The handler still runs (1.5 s): its slot is still taken.
    assert_eq!(
        code(w.send_command("jobs.deploy", json!({"version": 1})).await).0,
        "concurrency_exceeded"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        w.send_command("jobs.deploy", json!({"version": 2}))
            .await
            .unwrap(),
        json!({"deployed": 2})
    );
}
