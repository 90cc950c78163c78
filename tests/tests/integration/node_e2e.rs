//! The node runtime end to end over real QUIC on 127.0.0.1: pairing with the
//! code (a wrong one first), rejection, heartbeats and health, commands both
//! ways with policy decisions, token rotation, revocation and unpairing
//! taking effect at once, and the ledger verifying after all of it.

use std::sync::Arc;
use std::time::Duration;

use mesh_core::identity::NodeKey;
use mesh_core::ledger::record_types;
use mesh_core::limits::Rate;
use mesh_core::node::{
    CommandPolicy, CommandRequest, FnHandler, Node, NodeConfig, NodeError, PairingLimits, Permit,
    RegistryAdmission, Role, Verdict, Worker,
};
use mesh_core::pairing::PairingError;
use mesh_core::registry::{AuthError, Registry, scopes};
use mesh_core::storage::records::PrimaryLinkRecord;
use mesh_core::storage::{MemoryStorage, Storage, StorageExt};
use mesh_core::transport::PeerAddr;
use mesh_ledger::{LedgerConfig, SignedLedger, verify_ledger};
use mesh_transport::quic::{QuicConfig, QuicTransport};
use serde_json::json;

use crate::support::{WAIT, next};

/// Allows `notes.*`, refuses the rest.
#[derive(Debug)]
struct NotesOnly;

impl CommandPolicy for NotesOnly {
    fn decide(&self, request: &CommandRequest<'_>) -> (Verdict, Permit) {
        let command = request.command;
        let verdict = if command.starts_with("notes.") {
            Verdict::Allow
        } else {
            Verdict::Deny {
                code: "blocked_command".into(),
                message: format!("{command} is not allowed for this device"),
            }
        };
        (verdict, Permit::none())
    }
}

pub(crate) struct Primary {
    pub(crate) node: mesh_core::node::Primary,
    pub(crate) store: Arc<dyn Storage>,
    pub(crate) key: Arc<NodeKey>,
    pub(crate) addr: PeerAddr,
}

pub(crate) fn quic(key: &Arc<NodeKey>, store: &Arc<dyn Storage>) -> Arc<QuicTransport> {
    let admission = Arc::new(RegistryAdmission::new(store.clone()));
    let local = "127.0.0.1:0".parse().unwrap();
    Arc::new(QuicTransport::bind(key.clone(), local, admission, QuicConfig::default()).unwrap())
}

pub(crate) fn primary() -> Primary {
    primary_with(|config| config)
}

/// A primary whose configuration `adjust` changes. Every device of these
/// tests connects from 127.0.0.1, so the per-address pairing rate is raised.
pub(crate) fn primary_with(adjust: impl FnOnce(NodeConfig) -> NodeConfig) -> Primary {
    primary_on(Arc::new(MemoryStorage::new()), adjust).0
}

/// [`primary_with`] on a store of the caller's; with its ledger.
pub(crate) fn primary_on(
    store: Arc<dyn Storage>,
    adjust: impl FnOnce(NodeConfig) -> NodeConfig,
) -> (Primary, Arc<SignedLedger>) {
    primary_built(store, adjust, |b| b)
}

/// [`primary_on`], with `build` adding to the node's builder.
pub(crate) fn primary_built(
    store: Arc<dyn Storage>,
    adjust: impl FnOnce(NodeConfig) -> NodeConfig,
    build: impl FnOnce(mesh_core::node::NodeBuilder) -> mesh_core::node::NodeBuilder,
) -> (Primary, Arc<SignedLedger>) {
    let key = Arc::new(NodeKey::generate());
    let ledger =
        Arc::new(SignedLedger::open(store.clone(), key.clone(), LedgerConfig::default()).unwrap());
    let transport = quic(&key, &store);
    let addr = transport.addr();
    let config = NodeConfig::new(Role::Primary, "Studio", "primary-1")
        .heartbeat_interval(Duration::from_millis(100))
        .command_timeout(Duration::from_secs(5))
        .pairing_limits(PairingLimits::default().rates(
            Rate::per_second(1000.0, 1000),
            Rate::per_second(1000.0, 1000),
        ));
    let builder = Node::builder(key.clone(), store.clone(), transport, adjust(config))
        .ledger(ledger.clone())
        .policy(Arc::new(NotesOnly))
        .handler(
            "notes.write",
            Arc::new(FnHandler(|args: &serde_json::Value| {
                Ok(json!({ "stored": args["text"] }))
            })),
        )
        .handler(
            "notes.slow",
            Arc::new(FnHandler(|_: &serde_json::Value| {
                std::thread::sleep(Duration::from_millis(400));
                Ok(json!({ "slow": true }))
            })),
        );
    // Last, so a test's additions (a policy of its own) win.
    let node = build(builder).start_primary().unwrap();
    (
        Primary {
            node,
            store,
            key,
            addr,
        },
        ledger,
    )
}

pub(crate) fn worker(name: &str) -> (Worker, Arc<dyn Storage>) {
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let key = Arc::new(NodeKey::generate());
    let transport = quic(&key, &store);
    let config = NodeConfig::new(Role::Worker, name, &format!("hw-{name}"))
        .heartbeat_interval(Duration::from_millis(100))
        .command_timeout(Duration::from_secs(5))
        .reconnect(Duration::from_millis(50), Duration::from_millis(500));
    let node = Node::builder(key, store.clone(), transport, config)
        .handler(
            "backup",
            Arc::new(FnHandler(|args: &serde_json::Value| {
                Ok(json!({ "backed_up": args["path"] }))
            })),
        )
        .start_worker()
        .unwrap();
    (node, store)
}

/// Pairs `w` with `p` using the right code (after one wrong one if asked).
pub(crate) async fn pair(p: &Primary, w: &Worker, wrong_first: bool) {
    let mut requests = p.node.subscribe("pairing.request_received", 8).unwrap();
    let mut sessions = w.subscribe("session.connected", 8).unwrap();
    let ticket = w
        .request_pairing(p.node.node_id(), p.addr.clone())
        .await
        .unwrap();
    assert_eq!(ticket.code().len(), 6);
    next(&mut requests, "pairing.request_received", WAIT).await;
    let pending = p.node.pending_pairings().unwrap();
    let request = pending
        .iter()
        .find(|r| r.device_node == w.node_id())
        .unwrap();
    assert_eq!(request.request_id, ticket.request_id());
    if wrong_first {
        let wrong = if ticket.code() == "000000" {
            "000001"
        } else {
            "000000"
        };
        match p.node.approve_pairing(&request.request_id, wrong).await {
            Err(NodeError::Pairing(PairingError::InvalidCode { attempts_left })) => {
                assert_eq!(attempts_left, 4)
            }
            other => panic!("expected a wrong-code error, got {other:?}"),
        }
    }
    let device = p
        .node
        .approve_pairing(&request.request_id, ticket.code())
        .await
        .unwrap();
    assert_eq!(device.node, w.node_id());
    ticket.finished().await.unwrap();
    next(&mut sessions, "session.connected", WAIT).await;
    assert!(w.is_connected());
    assert_eq!(w.paired_primary().unwrap(), Some(p.node.node_id()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_heartbeat_command_rotate_revoke_and_audit() {
    let p = primary();
    let (w, w_store) = worker("laptop");
    // Subscribed before pairing: the first heartbeat may be scored at once.
    let mut online = p.node.subscribe("device.online", 8).unwrap();
    pair(&p, &w, true).await;

    // Heartbeats arrive and are scored.
    next(&mut online, "device.online", WAIT).await;
    let devices = p.node.devices().unwrap();
    assert_eq!(devices.len(), 1);
    assert!(devices[0].online);
    assert_eq!(devices[0].status.as_deref(), Some("healthy"));
    assert!(w.stats().heartbeats_sent >= 1);
    assert!(p.node.stats().heartbeats_received >= 1);
    // Timings are kept only when asked for.
    assert!(p.node.stats().heartbeat_nanos.is_empty());

    // Primary → worker: ping, config, run_action.
    let rtt = p.node.ping(&w.node_id()).await.unwrap();
    assert!(rtt < Duration::from_secs(1), "{rtt:?}");
    p.node
        .configure(&w.node_id(), "sync.interval", json!(30))
        .await
        .unwrap();
    assert_eq!(w.config_value("sync.interval"), Some(json!(30)));
    let out = p
        .node
        .run_action(&w.node_id(), "backup", json!({"path": "/data"}))
        .await
        .unwrap();
    assert_eq!(out, json!({"backed_up": "/data"}));
    match p.node.run_action(&w.node_id(), "rm -rf /", json!({})).await {
        Err(NodeError::Command { code, .. }) => assert_eq!(code, "unknown_action"),
        other => panic!("{other:?}"),
    }

    // Worker → primary: allowed runs the handler; denied carries the reason code.
    let stored = w
        .send_command("notes.write", json!({"text": "hi"}))
        .await
        .unwrap();
    assert_eq!(stored, json!({"stored": "hi"}));
    match w.send_command("shell.exec", json!({})).await {
        Err(NodeError::Command { code, message }) => {
            assert_eq!(code, "blocked_command");
            assert!(message.contains("shell.exec"));
        }
        other => panic!("{other:?}"),
    }

    // Token rotation: the old token is refused at once; the worker reconnects with the new one.
    let old: PrimaryLinkRecord = w_store.load("primary").unwrap().unwrap();
    let mut sessions = w.subscribe("session.connected", 8).unwrap();
    p.node.rotate_token(&w.node_id()).await.unwrap();
    let registry = Registry::new(p.store.clone(), mesh_core::events::EventBus::new());
    assert!(matches!(
        registry.check(&w.node_id(), &old.token, scopes::PRESENCE_WRITE),
        Err(AuthError::BadToken(_))
    ));
    next(&mut sessions, "session.connected", WAIT).await;
    let new: PrimaryLinkRecord = w_store.load("primary").unwrap().unwrap();
    assert_ne!(new.token, old.token);
    registry
        .check(&w.node_id(), &new.token, scopes::PRESENCE_WRITE)
        .unwrap();
    assert_eq!(p.node.ping(&w.node_id()).await.map(|_| ()).ok(), Some(()));

    // Revocation takes effect at once: when `revoke` returns, the primary
    // has already ended the session (not waiting for the device's next
    // message), and the worker hears `revoked` and is refused from then on.
    let mut ended = w.subscribe("session.ended", 8).unwrap();
    p.node.revoke(&w.node_id()).await.unwrap();
    assert!(
        p.node.sessions().is_empty(),
        "the session ended with the revocation"
    );
    assert!(!p.node.devices().unwrap()[0].online);
    let bye = next(&mut ended, "session.ended", WAIT).await;
    assert_eq!(bye.data["reason"], "revoked");
    assert!(!w.is_connected());
    assert!(matches!(
        w.send_command("notes.write", json!({})).await,
        Err(NodeError::NotConnected(_))
    ));
    assert!(matches!(
        p.node.ping(&w.node_id()).await,
        Err(NodeError::NotConnected(_))
    ));

    // Everything is in the ledger, which verifies.
    let ledger =
        SignedLedger::open(p.store.clone(), p.key.clone(), LedgerConfig::default()).unwrap();
    let types: Vec<String> = ledger
        .view()
        .records(0, 100)
        .unwrap()
        .into_iter()
        .map(|r| r.record_type)
        .collect();
    assert_eq!(
        types,
        [
            record_types::PAIRING_APPROVED,
            record_types::COMMAND_DECIDED,
            record_types::COMMAND_DECIDED,
            record_types::TOKEN_ROTATED,
            record_types::DEVICE_REVOKED,
        ]
    );
    let report = verify_ledger(p.store.as_ref(), &p.key.node_id(), None).unwrap();
    assert!(report.ok(), "{report:?}");
    w.shutdown().await;
    p.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_request_fails_on_the_worker_and_an_unpaired_worker_forgets_its_primary() {
    let p = primary();
    let (w, _) = worker("phone");
    let mut requests = p.node.subscribe("pairing.request_received", 8).unwrap();
    let ticket = w
        .request_pairing(p.node.node_id(), p.addr.clone())
        .await
        .unwrap();
    next(&mut requests, "pairing.request_received", WAIT).await;
    p.node
        .reject_pairing(ticket.request_id(), Some("unknown device".into()))
        .await
        .unwrap();
    match ticket.finished().await {
        Err(NodeError::Pairing(PairingError::Rejected { reason })) => {
            assert_eq!(reason.as_deref(), Some("unknown device"))
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(w.paired_primary().unwrap(), None);

    let (w2, _) = worker("tablet");
    pair(&p, &w2, false).await;
    let mut ended = w2.subscribe("session.ended", 8).unwrap();
    p.node.unpair(&w2.node_id()).await.unwrap();
    let bye = next(&mut ended, "session.ended", WAIT).await;
    assert_eq!(bye.data["reason"], "unpaired");
    assert_eq!(w2.paired_primary().unwrap(), None);
    assert!(p.node.devices().unwrap().is_empty());
    w.shutdown().await;
    w2.shutdown().await;
    p.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_has_its_own_handle_and_a_clear_error_for_the_other() {
    let p = primary();
    let (w, _) = worker("watch");
    // The other role's operations do not exist on a handle; a plain `Node`
    // gives only its own role's handle.
    let as_node: Node = w.clone().into();
    assert!(as_node.as_primary().is_none());
    assert!(as_node.as_worker().is_some());
    assert!(p.node.as_worker().is_none());
    assert_eq!(p.node.role(), Role::Primary);
    // A builder refuses to start a role its configuration does not name.
    let key = Arc::new(NodeKey::generate());
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let config = NodeConfig::new(Role::Worker, "w", "hw-w");
    let refused =
        Node::builder(key.clone(), store.clone(), quic(&key, &store), config).start_primary();
    assert!(matches!(refused, Err(NodeError::Unavailable(_))));
    // Unpaired, a worker has no primary to send to.
    assert!(matches!(
        w.send_command("notes.write", json!({})).await,
        Err(NodeError::Unavailable(_))
    ));
    // Nor does either have a session with anyone.
    assert!(w.sessions().is_empty() && p.node.sessions().is_empty());
    w.shutdown().await;
    p.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_on_two_transports_and_a_worker_that_discovers_it() {
    use mesh_core::discovery::DiscoveryBook;
    use mesh_core::events::EventBus;
    use mesh_transport::memory::MemoryNetwork;
    use mesh_transport::static_peers::{StaticDiscovery, StaticPeer};

    // The primary listens on QUIC and on an in-memory network.
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let key = Arc::new(NodeKey::generate());
    let net = MemoryNetwork::new(5);
    let memory = Arc::new(
        net.endpoint(
            key.node_id(),
            "primary",
            Arc::new(RegistryAdmission::new(store.clone())),
        )
        .unwrap(),
    );
    let memory_addr = memory.addr();
    let quic_transport = quic(&key, &store);
    let quic_addr = quic_transport.addr();
    let config = NodeConfig::new(Role::Primary, "Studio", "primary-1")
        .heartbeat_interval(Duration::from_millis(100));
    let node = Node::builder(key.clone(), store.clone(), quic_transport, config)
        .transport(memory)
        .start_primary()
        .unwrap();
    let via = |addr: PeerAddr| Primary {
        node: node.clone(),
        store: store.clone(),
        key: key.clone(),
        addr,
    };

    // A worker whose only transport is the in-memory network, finding the
    // primary through a static peer list.
    let w_store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let w_key = Arc::new(NodeKey::generate());
    let w_transport = Arc::new(
        net.endpoint(
            w_key.node_id(),
            "worker",
            Arc::new(RegistryAdmission::new(w_store.clone())),
        )
        .unwrap(),
    );
    let events = EventBus::new();
    let book = DiscoveryBook::new(w_store.clone(), events.clone());
    let peer: StaticPeer = format!(
        "{}@{}",
        node.node_id(),
        match &quic_addr {
            PeerAddr::Socket(a) => a.to_string(),
            _ => unreachable!(),
        }
    )
    .parse()
    .unwrap();
    let discovery =
        Arc::new(StaticDiscovery::new(&[peer], book, &mesh_core::clock::SystemClock).unwrap());
    let config = NodeConfig::new(Role::Worker, "memory-worker", "hw-mem")
        .heartbeat_interval(Duration::from_millis(100));
    let w = Node::builder(w_key, w_store, w_transport, config)
        .events(events)
        .discovery(discovery)
        .start_worker()
        .unwrap();
    let found = w.discover(Duration::ZERO).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].node, node.node_id());

    // That QUIC address is not the memory transport's kind: refused cleanly.
    let socket = PeerAddr::Socket(found[0].addresses[0]);
    assert!(matches!(
        w.request_pairing(node.node_id(), socket).await,
        Err(NodeError::Transport(
            mesh_core::transport::TransportError::AddressNotSupported(_)
        ))
    ));
    // The memory worker pairs over the in-memory network, a QUIC worker over QUIC.
    pair(&via(memory_addr), &w, false).await;
    let (q, _) = worker("quic-worker");
    pair(&via(quic_addr), &q, false).await;
    assert_eq!(node.devices().unwrap().len(), 2);
    node.ping(&w.node_id()).await.unwrap();
    node.ping(&q.node_id()).await.unwrap();
    w.shutdown().await;
    q.shutdown().await;
    node.shutdown().await;
}

/// Host code that blocks (as a Swift or Kotlin callback may) runs off the
/// runtime: while one handler is blocked, pings and heartbeats go on; a
/// handler that overruns the worker's command timeout fails with
/// `handler_timeout`, one that panics with `handler_panicked`, and the worker
/// keeps serving. Dropping the last handle of a node without `shutdown`
/// stops it: the primary sees the session end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_panicking_and_overrunning_handlers_do_not_stall_the_worker() {
    let p = primary();
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let key = Arc::new(NodeKey::generate());
    let transport = quic(&key, &store);
    let config = NodeConfig::new(Role::Worker, "slowpoke", "hw-slowpoke")
        .heartbeat_interval(Duration::from_millis(100))
        .command_timeout(Duration::from_millis(1500))
        .reconnect(Duration::from_millis(50), Duration::from_millis(500));
    // `wait` blocks its thread until the test lets it go.
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = std::sync::Mutex::new(released);
    let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel::<()>();
    let w = Node::builder(key, store, transport, config)
        .handler(
            "wait",
            Arc::new(FnHandler(move |_: &serde_json::Value| {
                let _ = entered_tx.send(());
                let rx = released.lock().unwrap();
                rx.recv().map_err(|e| e.to_string())?;
                Ok(json!("released"))
            })),
        )
        .handler(
            "boom",
            Arc::new(FnHandler(
                |_: &serde_json::Value| -> Result<serde_json::Value, String> {
                    panic!("a bug in host code")
                },
            )),
        )
        .start_worker()
        .unwrap();
    pair(&p, &w, false).await;
    let device = w.node_id();

    // 1. A blocked handler: the session goes on.
    let waiting = {
        let primary = p.node.clone();
        tokio::spawn(async move { primary.run_action(&device, "wait", json!({})).await })
    };
    tokio::time::timeout(WAIT, entered.recv())
        .await
        .unwrap()
        .unwrap();
    let before = p.node.stats().heartbeats_received;
    p.node.ping(&device).await.unwrap();
    // Heartbeats keep arriving (every 100 ms) while the handler is blocked.
    tokio::time::timeout(WAIT, async {
        while p.node.stats().heartbeats_received < before + 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("heartbeats stopped while a handler was blocked");
    release.send(()).unwrap();
    assert_eq!(waiting.await.unwrap().unwrap(), json!("released"));

    // 2. Overrunning the worker's 1.5 s command timeout.
    let overrun = p.node.run_action(&device, "wait", json!({})).await;
    match overrun {
        Err(NodeError::Command { code, .. }) => assert_eq!(code, "handler_timeout"),
        other => panic!("expected handler_timeout, got {other:?}"),
    }
    release.send(()).unwrap();

    // 3. A panicking handler.
    match p.node.run_action(&device, "boom", json!({})).await {
        Err(NodeError::Command { code, .. }) => assert_eq!(code, "handler_panicked"),
        other => panic!("expected handler_panicked, got {other:?}"),
    }
    p.node.ping(&device).await.unwrap();

    // 4. Dropped without shutdown: the primary sees it leave.
    let mut left = p
        .node
        .subscribe(mesh_core::events::kinds::PEER_LEFT, 8)
        .unwrap();
    drop(w);
    let gone = next(&mut left, mesh_core::events::kinds::PEER_LEFT, WAIT).await;
    assert_eq!(gone.data["node"], device.to_string());
    p.node.shutdown().await;
}

/// A node holds an authenticated session with each of many peers, lists
/// them, and sends commands to any of them through the one `Node` API both
/// roles share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_holds_a_session_with_each_peer_and_commands_reach_any_of_them() {
    let p = primary();
    let mut workers = Vec::new();
    for name in ["one", "two", "three"] {
        let (w, _) = worker(name);
        pair(&p, &w, false).await;
        workers.push(w);
    }
    let mut ids: Vec<_> = workers.iter().map(|w| w.node_id()).collect();
    ids.sort();
    let open = p.node.sessions();
    assert_eq!(open.iter().map(|s| s.peer).collect::<Vec<_>>(), ids);
    for s in &open {
        match &s.addr {
            Some(PeerAddr::Socket(a)) => assert!(a.ip().is_loopback(), "{a}"),
            other => panic!("a QUIC session has a socket address, not {other:?}"),
        }
    }
    for w in &workers {
        // A worker's one session is with its primary.
        let mine = w.sessions();
        assert_eq!(mine.len(), 1);
        assert_eq!(mine[0].peer, p.node.node_id());
        // The primary reaches each device through the shared API …
        let pong = p
            .node
            .command(&w.node_id(), "ping", json!({}))
            .await
            .unwrap();
        assert_eq!(pong["pong"], true);
        // … and each device its primary, whose policy decides.
        let node: &Node = w;
        let stored = node
            .command(&p.node.node_id(), "notes.write", json!({ "text": "hi" }))
            .await
            .unwrap();
        assert_eq!(stored["stored"], "hi");
        let refused = node
            .command(&p.node.node_id(), "shell.exec", json!({}))
            .await
            .unwrap_err();
        assert_eq!(
            refused.policy_refusal().map(|r| r.0),
            Some("blocked_command")
        );
    }
    // No session with a stranger.
    let stranger = NodeKey::generate().node_id();
    assert!(matches!(
        p.node.command(&stranger, "ping", json!({})).await,
        Err(NodeError::NotConnected(n)) if n == stranger
    ));
    // A worker that leaves leaves the table; the others stay.
    let gone = workers.remove(0);
    let gone_id = gone.node_id();
    let mut left = p.node.subscribe("peer.left", 8).unwrap();
    gone.shutdown().await;
    next(&mut left, "peer.left", WAIT).await;
    let open: Vec<_> = p.node.sessions().into_iter().map(|s| s.peer).collect();
    assert_eq!(open.len(), 2);
    assert!(!open.contains(&gone_id));
    for w in workers {
        w.shutdown().await;
    }
    p.node.shutdown().await;
}
