//! Replicated state through the runtime, over QUIC on 127.0.0.1: config
//! and table writes reaching every member, concurrent writes converging,
//! a member that was down catching up, and a member turned hostile whose
//! sync frames are refused.

use std::sync::Arc;
use std::time::Duration;

use mesh_core::identity::NodeKey;
use mesh_core::node::{Node, NodeError, SyncErrorKind};
use mesh_core::storage::{MemoryStorage, Storage};
use serde_json::json;

use crate::mesh_runtime::{Member, active, member, member_with, raw_member, until};
use crate::support::next;

fn kind(e: &NodeError) -> Option<SyncErrorKind> {
    match e {
        NodeError::Sync { kind, .. } => Some(*kind),
        _ => None,
    }
}

/// `n` members in one mesh, each joined through the first one's token,
/// every one seeing all the others active.
async fn mesh_of(names: &[&str]) -> Vec<Member> {
    let members: Vec<Member> = names.iter().map(|n| member(n)).collect();
    for m in &members[1..] {
        let t = members[0].node.mesh_token(None).await.unwrap();
        m.node.join_mesh(&t.token).await.unwrap();
    }
    for m in &members {
        until(&m.node, "everyone active", |v| active(v) == names.len() - 1).await;
    }
    members
}

/// Polls `check` (bounded: 15 s) until it holds.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The config a node lists, as (key, value, version) text.
async fn config_of(node: &Node) -> Vec<(String, String, String)> {
    node.config_list("")
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.key, e.value.to_string(), format!("{:?}", e.version)))
        .collect()
}

async fn same_config(nodes: &[&Node]) -> bool {
    let first = config_of(nodes[0]).await;
    for n in &nodes[1..] {
        if config_of(n).await != first {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_and_table_writes_reach_every_member_and_concurrent_writes_converge() {
    let ms = mesh_of(&["alpha", "bravo", "charlie"]).await;
    let (a, b, c) = (&ms[0].node, &ms[1].node, &ms[2].node);
    let mut b_changes = b.replicated("config").unwrap().subscribe(64).unwrap();

    // A write on one member reaches the others, with its version.
    let set = a.config_set("site.name", json!("lab")).await.unwrap();
    assert_eq!(set.version.node, a.node_id());
    let seen = tokio::time::timeout(Duration::from_secs(10), b_changes.recv())
        .await
        .expect("b hears of a's write")
        .unwrap();
    assert_eq!(
        (seen.key.as_str(), seen.local, seen.version),
        ("site.name", false, set.version)
    );
    assert_eq!(seen.value.as_deref(), Some(&b"\"lab\""[..]));
    eventually("c has site.name", || async {
        c.config_get("site.name")
            .await
            .is_ok_and(|e| e.value == json!("lab") && e.version == set.version)
    })
    .await;

    // The same key written on two members at once: every member ends with
    // the one of greater version.
    let (x, y) = tokio::join!(
        a.config_set("mode", json!({"by": "alpha"})),
        b.config_set("mode", json!({"by": "bravo"}))
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    let winner = if x.version > y.version { x } else { y };
    eventually("all agree on mode", || async {
        same_config(&[a, b, c]).await
            && c.config_get("mode")
                .await
                .is_ok_and(|e| e.value == winner.value)
    })
    .await;

    // A delete is replicated; deleting what is not there is not_found.
    c.config_delete("site.name").await.unwrap();
    eventually("site.name gone everywhere", || async {
        let mut gone = true;
        for n in [a, b, c] {
            gone &= n
                .config_get("site.name")
                .await
                .is_err_and(|e| kind(&e) == Some(SyncErrorKind::NotFound));
        }
        gone
    })
    .await;
    let e = c.config_delete("site.name").await.unwrap_err();
    assert_eq!(kind(&e), Some(SyncErrorKind::NotFound));

    // Tables: insert, update, delete, each replicated; typed refusals.
    a.table_insert("devices", "d1", json!({"name": "kiosk"}))
        .await
        .unwrap();
    let e = a
        .table_insert("devices", "d1", json!({"name": "again"}))
        .await
        .unwrap_err();
    assert_eq!(kind(&e), Some(SyncErrorKind::Exists));
    eventually("b has row d1", || async {
        b.table_rows("devices").await.unwrap() == vec![("d1".into(), json!({"name": "kiosk"}))]
    })
    .await;
    b.table_update("devices", "d1", json!({"name": "lobby"}))
        .await
        .unwrap();
    let e = b
        .table_update("devices", "d9", json!({"name": "x"}))
        .await
        .unwrap_err();
    assert_eq!(kind(&e), Some(SyncErrorKind::NotFound));
    eventually("c has the update", || async {
        c.table_rows("devices").await.unwrap() == vec![("d1".into(), json!({"name": "lobby"}))]
    })
    .await;
    c.table_delete("devices", "d1").await.unwrap();
    eventually("row gone at a", || async {
        a.table_rows("devices").await.unwrap().is_empty()
    })
    .await;

    // Bad input: typed errors, nothing stored.
    let before = config_of(a).await;
    let e = a
        .table_insert("devices", "d2", json!([1, 2]))
        .await
        .unwrap_err();
    assert_eq!(kind(&e), Some(SyncErrorKind::InvalidArgument));
    let e = a.replicated("Not:A:Name").unwrap_err();
    assert_eq!(kind(&e), Some(SyncErrorKind::InvalidArgument));
    let e = a
        .replicated("config")
        .unwrap()
        .put("raw", b"not json".to_vec())
        .await
        .unwrap_err();
    assert_eq!(kind(&e), Some(SyncErrorKind::InvalidArgument));
    let e = a
        .config_set("big", json!("x".repeat(70 * 1024)))
        .await
        .unwrap_err();
    assert_eq!(kind(&e), Some(SyncErrorKind::ValueTooLarge));
    let e = a.config_set("", json!(1)).await.unwrap_err();
    assert_eq!(kind(&e), Some(SyncErrorKind::InvalidArgument));
    let e = a.config_get("never-set").await.unwrap_err();
    assert_eq!(kind(&e), Some(SyncErrorKind::NotFound));
    assert_eq!(config_of(a).await, before);

    // Status: every member listed, nothing pending once synced.
    assert_eq!(a.sync_now().await.unwrap(), 2);
    eventually("nothing pending", || async {
        let status = a.sync_status().await.unwrap();
        status.len() == 2
            && status
                .iter()
                .all(|p| p.pending == 0 && p.last_sync.is_some())
    })
    .await;
    for m in ms {
        m.node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_was_down_catches_up_and_its_own_writes_are_kept() {
    let ms = mesh_of(&["north", "south"]).await;
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let key = Arc::new(NodeKey::generate());
    let c = member_with("west", store.clone(), key.clone());
    let t = ms[0].node.mesh_token(None).await.unwrap();
    c.node.join_mesh(&t.token).await.unwrap();
    until(&ms[1].node, "west active", |v| active(v) == 2).await;
    // c writes, then goes down (its store kept, as a crash would).
    c.node.config_set("west.only", json!(1)).await.unwrap();
    c.node.config_set("shared", json!("west")).await.unwrap();
    eventually("a has west's writes", || async {
        ms[0].node.config_get("west.only").await.is_ok()
    })
    .await;
    drop(c);

    // While it is down, the others write 2,000 keys and overwrite one of its.
    let bulk = ms[0].node.replicated("bulk").unwrap();
    for i in 0..2_000 {
        bulk.put(&format!("k{i:05}"), vec![i as u8; 32])
            .await
            .unwrap();
    }
    ms[1]
        .node
        .config_set("shared", json!("south"))
        .await
        .unwrap();

    // It comes back (same key and store, a new port) and catches up.
    let c = member_with("west", store, key);
    let west = c.node.replicated("bulk").unwrap();
    eventually("west has the 2,000 keys", || async {
        west.scan("").await.unwrap().len() == 2_000
    })
    .await;
    assert_eq!(
        west.scan("").await.unwrap(),
        bulk.scan("").await.unwrap(),
        "the same entries and versions"
    );
    eventually("one config everywhere", || async {
        same_config(&[&ms[0].node, &ms[1].node, &c.node]).await
    })
    .await;
    assert_eq!(
        c.node.config_get("shared").await.unwrap().value,
        json!("south")
    );
    assert_eq!(
        c.node.config_get("west.only").await.unwrap().value,
        json!(1)
    );
    c.node.shutdown().await;
    for m in ms {
        m.node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_members_sync_frames_are_refused_and_change_nothing() {
    use mesh_core::clock::{Clock, SystemClock};
    use mesh_core::sync::{Change, Hlc, SYNC, SyncFrame, VersionVector};
    use mesh_core::transport::{PeerAddr, Transport};

    let ms = mesh_of(&["target", "bystander"]).await;
    let (a, b) = (&ms[0].node, &ms[1].node);
    let mut events = a.subscribe("sync.refused", 64).unwrap();
    let (evil_key, evil, _grant) = raw_member(&ms[0]).await;
    let conn = evil
        .connect(a.node_id(), &PeerAddr::Socket(ms[0].addr), SYNC)
        .await
        .unwrap();
    let now = SystemClock.now().as_millis();
    let change = |node, at: u64, seq, key: &str, len| Change {
        key: key.into(),
        value: Some(vec![b'1'; len]),
        hlc: Hlc {
            ms: at,
            counter: 0,
            node,
        },
        seq,
    };
    let push = |changes| {
        SyncFrame::Push {
            namespace: "config".into(),
            changes,
        }
        .encode()
    };
    let evil_id = evil_key.node_id();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", vec![0xff; 64]),
        (
            "a push in another member's name",
            push(vec![change(b.node_id(), now, 1, "forged", 1)]),
        ),
        (
            "a stamp ten minutes ahead",
            push(vec![change(evil_id, now + 600_000, 1, "future", 1)]),
        ),
        (
            "a value over the limit",
            push(vec![change(evil_id, now, 1, "huge", 65 * 1024 + 1)]),
        ),
    ];
    for (what, bytes) in cases {
        conn.send(bytes).await.unwrap();
        let e = next(&mut events, "sync.refused", Duration::from_secs(10)).await;
        assert_eq!(e.data["node"], evil_id.to_string(), "{what}");
    }
    // A well-formed change of its own is taken; replaying it later (after
    // a newer write) changes nothing.
    let fine = push(vec![change(evil_id, now, 1, "evil.key", 1)]);
    conn.send(fine.clone()).await.unwrap();
    eventually("a took the honest change", || async {
        a.config_get("evil.key").await.is_ok()
    })
    .await;
    a.config_set("evil.key", json!("overwritten"))
        .await
        .unwrap();
    conn.send(fine).await.unwrap();
    let digest = SyncFrame::Digest {
        vectors: vec![("config".into(), VersionVector::new())],
        reply: false,
        all: true,
    };
    conn.send(digest.encode()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        a.config_get("evil.key").await.unwrap().value,
        json!("overwritten")
    );
    // Nothing of the refused frames was stored.
    for key in ["forged", "future", "huge"] {
        let e = a.config_get(key).await.unwrap_err();
        assert_eq!(kind(&e), Some(SyncErrorKind::NotFound), "{key}");
    }
    // Blocked, it is refused; the honest members carry on.
    a.mesh_block(evil_id, "hostile sync").await.unwrap();
    eventually("evil's sync connection refused", || async {
        match evil
            .connect(a.node_id(), &PeerAddr::Socket(ms[0].addr), SYNC)
            .await
        {
            Err(_) => true,
            Ok(c) => tokio::time::timeout(Duration::from_secs(2), c.recv())
                .await
                .is_ok_and(|r| r.is_err()),
        }
    })
    .await;
    a.config_set("after", json!(true)).await.unwrap();
    eventually("b has it", || async { b.config_get("after").await.is_ok() }).await;
    for m in ms {
        m.node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_syncs_the_namespaces_its_scopes_allow_with_its_primary() {
    use mesh_core::registry::scopes;

    use crate::node_e2e::{pair, primary, worker};

    let p = primary();
    let (w, _store) = worker("tablet");
    pair(&p, &w, false).await;
    let device = w.node_id();
    // The device may sync `notes`, nothing else.
    p.node
        .set_scopes(
            &device,
            &[
                scopes::PRESENCE_WRITE,
                scopes::EVENTS_WRITE,
                scopes::COMMANDS_RUN,
                "sync:notes",
            ],
        )
        .unwrap();
    let mut refused = p.node.subscribe("sync.refused", 16).unwrap();

    // Both ways, in the namespace it may sync.
    let from_device = w.replicated("notes").unwrap();
    let at_primary = p.node.replicated("notes").unwrap();
    let v = from_device.put("todo/1", b"milk".to_vec()).await.unwrap();
    eventually("the primary has the device's note", || async {
        at_primary
            .get("todo/1")
            .await
            .unwrap()
            .is_some_and(|e| e.version == v && e.value == b"milk")
    })
    .await;
    let v = at_primary.put("todo/2", b"eggs".to_vec()).await.unwrap();
    eventually("the device has the primary's note", || async {
        from_device
            .get("todo/2")
            .await
            .unwrap()
            .is_some_and(|e| e.version == v)
    })
    .await;

    // Not in a namespace it may not sync: refused at the primary, and the
    // primary's own keys there do not reach it.
    w.replicated("secrets")
        .unwrap()
        .put("k", b"from the device".to_vec())
        .await
        .unwrap();
    let e = next(&mut refused, "sync.refused", Duration::from_secs(10)).await;
    assert_eq!(e.data["node"], device.to_string());
    p.node
        .replicated("secrets")
        .unwrap()
        .put("p", b"from the primary".to_vec())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        p.node
            .replicated("secrets")
            .unwrap()
            .get("k")
            .await
            .unwrap()
            .is_none(),
        "a namespace without scope reached the primary"
    );
    assert!(
        w.replicated("secrets")
            .unwrap()
            .get("p")
            .await
            .unwrap()
            .is_none(),
        "a namespace without scope reached the device"
    );

    // Heartbeats carry the real figures: the one change the primary cannot
    // take stays pending on the device, and for longer and longer.
    w.send_heartbeat().await.unwrap();
    let mut first = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        w.send_heartbeat().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Some(m) = p.node.device_metrics(&device)
            && m.messages_pending == Some(1)
            && m.sync_lag_ms.is_some_and(|l| l > 0.0)
        {
            match first {
                None => first = m.sync_lag_ms,
                Some(f) if m.sync_lag_ms > Some(f) => break,
                _ => {}
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "heartbeats never showed the pending change: {:?}",
            p.node.device_metrics(&device)
        );
    }
    // With that namespace allowed, it goes through and nothing is pending.
    p.node
        .set_scopes(
            &device,
            &[
                scopes::PRESENCE_WRITE,
                scopes::EVENTS_WRITE,
                scopes::COMMANDS_RUN,
                scopes::SYNC_ALL,
            ],
        )
        .unwrap();
    // Sync runs by itself (a device session's vectors every 30 s, changes
    // as they commit); a change refused before is asked for now.
    assert_eq!(w.sync_now().await.unwrap(), 1);
    eventually("the device's secret arrives once allowed", || async {
        p.node
            .replicated("secrets")
            .unwrap()
            .get("k")
            .await
            .unwrap()
            .is_some()
    })
    .await;
    eventually("nothing pending in the heartbeat", || async {
        let _ = w.send_heartbeat().await;
        p.node
            .device_metrics(&device)
            .is_some_and(|m| m.messages_pending == Some(0) && m.sync_lag_ms == Some(0.0))
    })
    .await;
    assert!(
        p.node
            .sync_status()
            .await
            .unwrap()
            .iter()
            .any(|s| s.node == device)
    );
    w.shutdown().await;
    p.node.shutdown().await;
}

/// A node on SQLite (memory transport, no peers) under a fixed key.
fn sqlite_node(dir: &std::path::Path, key: &Arc<NodeKey>) -> Node {
    use mesh_core::node::{NodeConfig, RegistryAdmission, Role};
    let store: Arc<dyn Storage> =
        Arc::new(mesh_core::storage::SqliteStorage::open(dir.join("mesh.db")).unwrap());
    let net = mesh_transport::memory::MemoryNetwork::new(1);
    let admission = Arc::new(RegistryAdmission::new(store.clone()));
    let t = Arc::new(net.endpoint(key.node_id(), "solo", admission).unwrap());
    Node::builder(
        key.clone(),
        store,
        t,
        NodeConfig::new(Role::Primary, "solo", "solo"),
    )
    .start()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwritten_keys_leave_garbage_that_is_deleted_in_bulk_and_survives_a_restart() {
    // Changes are stored as a log (origin, seq): overwriting a key leaves
    // the old row behind until enough garbage has piled up to delete in
    // bulk. What a restart loads must still be the newest of each key.
    let dir = tempfile::tempdir().unwrap();
    let key = Arc::new(NodeKey::generate());
    let n = sqlite_node(dir.path(), &key);
    let ns = n.replicated("hot").unwrap();
    let mut tasks = Vec::new();
    for w in 0..50 {
        let ns = ns.clone();
        tasks.push(tokio::spawn(async move {
            ns.put(&format!("own/{w}"), vec![w]).await.unwrap();
            for i in 0..60u32 {
                ns.put("hot", i.to_be_bytes().to_vec()).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let hot = ns.get("hot").await.unwrap().map(|e| (e.value, e.version));
    let before = ns.scan("").await.unwrap();
    assert_eq!(before.len(), 51);
    n.shutdown().await;
    drop((ns, n));

    // 3,050 writes, 2,999 of them superseded: most rows are gone.
    let rows = mesh_core::storage::SqliteStorage::open(dir.path().join("mesh.db"))
        .unwrap()
        .list(mesh_core::storage::Table::ReplicatedEntries)
        .unwrap()
        .len();
    assert!(
        (51..1_500).contains(&rows),
        "{rows} rows stored for 51 keys after 3,050 writes"
    );

    let back = sqlite_node(dir.path(), &key);
    let ns = back.replicated("hot").unwrap();
    assert_eq!(
        ns.get("hot").await.unwrap().map(|e| (e.value, e.version)),
        hot
    );
    let after = ns.scan("").await.unwrap();
    assert_eq!(
        after
            .iter()
            .map(|c| (&c.key, &c.value, &c.version))
            .collect::<Vec<_>>(),
        before
            .iter()
            .map(|c| (&c.key, &c.value, &c.version))
            .collect::<Vec<_>>()
    );
    // Writing on after the restart continues the numbering: the new rows
    // overwrite no row of the log (the garbage deleted later would take
    // them with it), so they are what the next restart finds.
    let mut last = None;
    for i in 0..1_100u32 {
        last = Some(ns.put("hot", i.to_be_bytes().to_vec()).await.unwrap());
    }
    back.shutdown().await;
    drop((ns, back));
    let again = sqlite_node(dir.path(), &key);
    let hot = again.replicated("hot").unwrap().get("hot").await.unwrap();
    let hot = hot.expect("hot stands");
    assert_eq!(hot.value, 1_099u32.to_be_bytes().to_vec());
    assert_eq!(Some(hot.version), last);
    again.shutdown().await;
}
