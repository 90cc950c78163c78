//! The mesh of nodes through the runtime, over QUIC on 127.0.0.1: join
//! tokens, membership, broadcast, rename, block, leave, and every bad token.

use std::sync::Arc;
use std::time::Duration;

use mesh_core::events::Subscription;
use mesh_core::identity::NodeKey;
use mesh_core::node::{
    MeshErrorKind, MeshSettings, Node, NodeConfig, NodeError, Primary, RegistryAdmission, Role,
};
use mesh_core::storage::records::PeerStatus;
use mesh_core::storage::{MemoryStorage, Storage};
use mesh_core::transport::PeerAddr;
use mesh_ledger::{LedgerConfig, SignedLedger};
use mesh_transport::quic::{QuicConfig, QuicTransport};

use crate::support::next;

pub(crate) struct Member {
    pub(crate) node: Primary,
    pub(crate) ledger: Arc<SignedLedger>,
    pub(crate) store: Arc<dyn Storage>,
    pub(crate) addr: std::net::SocketAddr,
}

pub(crate) fn member(name: &str) -> Member {
    member_with(
        name,
        Arc::new(MemoryStorage::new()),
        Arc::new(NodeKey::generate()),
    )
}

pub(crate) fn member_with(name: &str, store: Arc<dyn Storage>, key: Arc<NodeKey>) -> Member {
    member_adjusted(name, store, key, |s| s)
}

pub(crate) fn member_adjusted(
    name: &str,
    store: Arc<dyn Storage>,
    key: Arc<NodeKey>,
    adjust: impl FnOnce(MeshSettings) -> MeshSettings,
) -> Member {
    let admission = Arc::new(RegistryAdmission::new(store.clone()));
    let local = "127.0.0.1:0".parse().unwrap();
    let quic = Arc::new(
        QuicTransport::bind(key.clone(), local, admission, QuicConfig::default()).unwrap(),
    );
    let ledger =
        Arc::new(SignedLedger::open(store.clone(), key.clone(), LedgerConfig::default()).unwrap());
    let addr = quic.local_addr();
    let settings = adjust(MeshSettings::new(vec![PeerAddr::Socket(addr)]));
    let node = Node::builder(
        key,
        store.clone(),
        quic,
        NodeConfig::new(Role::Primary, name, name),
    )
    .ledger(ledger.clone())
    .mesh(settings)
    .start_primary()
    .unwrap();
    Member {
        node,
        ledger,
        store,
        addr,
    }
}

fn kind(e: &NodeError) -> Option<MeshErrorKind> {
    match e {
        NodeError::Mesh { kind, .. } => Some(*kind),
        _ => None,
    }
}

/// Waits (bounded) until `check` holds for `node`'s view.
pub(crate) async fn until(
    node: &Node,
    what: &str,
    check: impl Fn(&mesh_core::node::MeshView) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let view = node.mesh_peers().await.unwrap();
        if check(&view) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 15 s; view {view:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn active(view: &mesh_core::node::MeshView) -> usize {
    view.peers
        .iter()
        .filter(|p| p.status == PeerStatus::Active)
        .count()
}

fn ledger_types(ledger: &SignedLedger) -> Vec<(String, String)> {
    ledger
        .view()
        .records(0, 10_000)
        .unwrap()
        .into_iter()
        .map(|r| {
            let body = match &r.body {
                mesh_core::ledger::Body::Json(j) => j.as_str().to_owned(),
                mesh_core::ledger::Body::Bytes(_) => String::new(),
            };
            (r.record_type, body)
        })
        .collect()
}

async fn topic_once(sub: &mut mesh_core::node::TopicSubscription) -> mesh_core::mesh::Delivery {
    tokio::time::timeout(Duration::from_secs(10), sub.recv())
        .await
        .expect("a broadcast within 10 s")
        .expect("the node is running")
}

async fn peer_event(sub: &mut Subscription, kind: &str) -> serde_json::Value {
    next(sub, kind, Duration::from_secs(10)).await.data.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_join_through_tokens_and_see_broadcasts_renames_blocks_and_leaves() {
    let a = member("alpha");
    let b = member("bravo");
    let c = member("charlie");
    let d = member("delta");
    let mut a_events = a.node.subscribe("peer.*", 256).unwrap();

    // b joins through a's token, c through b's, d through c's: a chain.
    let t = a.node.mesh_token(None).await.unwrap();
    assert!(t.token.len() <= 256);
    assert_eq!(b.node.join_mesh(&t.token).await.unwrap(), 1);
    let joined = peer_event(&mut a_events, "peer.joined").await;
    assert_eq!(joined["node"], b.node.node_id().to_string());
    let t = b.node.mesh_token(None).await.unwrap();
    assert!(c.node.join_mesh(&t.token).await.unwrap() >= 2);
    let t = c.node.mesh_token(None).await.unwrap();
    assert!(d.node.join_mesh(&t.token).await.unwrap() >= 3);
    for m in [&a, &b, &c, &d] {
        until(&m.node, "everyone active", |v| active(v) == 3).await;
    }
    // The token records what used it; the ledger too.
    let tokens = a.node.mesh_tokens().await.unwrap();
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0].used_by, Some(b.node.node_id()));
    assert!(
        ledger_types(&a.ledger)
            .iter()
            .any(|(t, body)| t == "peer.joined" && body.contains(&b.node.node_id().to_string()))
    );

    // A broadcast reaches every other member once.
    let mut subs: Vec<_> = [&a, &b, &d]
        .iter()
        .map(|m| m.node.mesh_subscribe("chat/*", 64).unwrap())
        .collect();
    let key = c
        .node
        .mesh_broadcast("chat/general", b"hello".to_vec())
        .await
        .unwrap();
    for sub in &mut subs {
        let got = topic_once(sub).await;
        assert_eq!(got.key, key);
        assert_eq!(got.body, b"hello");
        assert_eq!(got.topic, "chat/general");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for sub in &mut subs {
        assert!(sub.try_recv().is_none(), "delivered twice");
    }

    // A rename reaches everyone.
    d.node.mesh_rename("delta-2").await.unwrap();
    let renamed = peer_event(&mut a_events, "peer.renamed").await;
    assert_eq!(renamed["new"], "delta-2");
    for m in [&a, &b, &c] {
        let id = d.node.node_id();
        until(&m.node, "rename seen", move |v| {
            v.peers.iter().any(|p| p.node == id && p.name == "delta-2")
        })
        .await;
    }

    // a blocks c: everyone drops c, c's broadcasts reach nobody, and the
    // ledgers say who blocked whom.
    a.node.mesh_block(c.node.node_id(), "spam").await.unwrap();
    let blocked = peer_event(&mut a_events, "peer.blocklisted").await;
    assert_eq!(blocked["by"], a.node.node_id().to_string());
    for m in [&a, &b, &d] {
        let id = c.node.node_id();
        until(&m.node, "block seen", move |v| {
            v.blocked.iter().any(|x| x.node == id)
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = c
        .node
        .mesh_broadcast("chat/general", b"spam".to_vec())
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for sub in &mut subs {
        assert!(
            sub.try_recv().is_none(),
            "a blocked node's broadcast arrived"
        );
    }
    for m in [&a, &b, &d] {
        let entries = ledger_types(&m.ledger);
        assert!(
            entries.iter().any(|(t, body)| t == "peer.blocklisted"
                && body.contains(&c.node.node_id().to_string())
                && body.contains(&a.node.node_id().to_string())),
            "no peer.blocklisted record naming c and a: {entries:?}"
        );
    }
    // Stored, so a restart keeps it.
    assert_eq!(
        b.store
            .list(mesh_core::storage::Table::Blocklist)
            .unwrap()
            .len(),
        1
    );
    a.node.mesh_unblock(c.node.node_id()).await.unwrap();
    for m in [&a, &b, &d] {
        until(&m.node, "unblock seen", |v| v.blocked.is_empty()).await;
    }

    // A graceful leave is seen at once.
    b.node.mesh_leave().await.unwrap();
    let left = loop {
        let e = peer_event(&mut a_events, "peer.left").await;
        if e["node"] == b.node.node_id().to_string() {
            break e;
        }
    };
    assert_eq!(left["reason"], "left");
    for m in [&a, &d] {
        let id = b.node.node_id();
        until(&m.node, "leave seen", move |v| {
            v.peers
                .iter()
                .any(|p| p.node == id && p.status == PeerStatus::Inactive)
        })
        .await;
    }
    for m in [a, b, c, d] {
        m.node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_get_their_kind_and_change_nothing() {
    let a = member("issuer");
    let j = member("joiner");
    let other = member("other");

    // Tampered: one character changed.
    let t = a.node.mesh_token(None).await.unwrap();
    let mut text = t.token.to_string();
    let i = text.len() / 2;
    let flipped = if &text[i..=i] == "A" { "B" } else { "A" };
    text.replace_range(i..=i, flipped);
    let e = j.node.join_mesh(&text).await.unwrap_err();
    assert_eq!(kind(&e), Some(MeshErrorKind::TokenInvalid), "{e}");
    assert_eq!(
        kind(&j.node.join_mesh("garbage").await.unwrap_err()),
        Some(MeshErrorKind::TokenInvalid)
    );
    assert_eq!(
        kind(&j.node.join_mesh(&"x".repeat(300)).await.unwrap_err()),
        Some(MeshErrorKind::TokenInvalid)
    );

    // Foreign: a well-formed token naming a's id and address whose secret
    // a never issued.
    let forged = mesh_core::mesh::token::JoinToken::generate(
        a.node.node_id(),
        &[a.addr],
        mesh_core::clock::Clock::now(&mesh_core::clock::SystemClock),
        Duration::from_secs(60),
    );
    let e = j.node.join_mesh(&forged.encode()).await.unwrap_err();
    assert_eq!(kind(&e), Some(MeshErrorKind::TokenInvalid), "{e}");

    // Revoked.
    let r = a.node.mesh_token(None).await.unwrap();
    a.node.revoke_mesh_token(&r.id).await.unwrap();
    let e = j.node.join_mesh(&r.token).await.unwrap_err();
    assert_eq!(kind(&e), Some(MeshErrorKind::TokenRevoked), "{e}");

    // Expired (by its own expiry, and by the issuer's record).
    let x = a
        .node
        .mesh_token(Some(Duration::from_millis(1)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let e = j.node.join_mesh(&x.token).await.unwrap_err();
    assert_eq!(kind(&e), Some(MeshErrorKind::TokenExpired), "{e}");

    // Nothing of any of them let j in.
    assert!(j.node.mesh_peers().await.unwrap().peers.is_empty());
    assert!(a.node.mesh_peers().await.unwrap().peers.is_empty());

    // Used: j joins with a good one; another node cannot use it again,
    // while j may present it again (its answer may have been lost).
    assert_eq!(j.node.join_mesh(&t.token).await.unwrap(), 1);
    let e = other.node.join_mesh(&t.token).await.unwrap_err();
    assert_eq!(kind(&e), Some(MeshErrorKind::TokenUsed), "{e}");
    assert!(j.node.join_mesh(&t.token).await.is_ok());
    let view = a.node.mesh_peers().await.unwrap();
    assert_eq!(view.peers.len(), 1, "{view:?}");
    assert!(other.node.mesh_peers().await.unwrap().peers.is_empty());

    // Unknown id to revoke.
    let e = a
        .node
        .revoke_mesh_token("0000000000000000")
        .await
        .unwrap_err();
    assert_eq!(kind(&e), Some(MeshErrorKind::NotFound));

    // Unreachable: the issuer is gone.
    let gone = a.node.mesh_token(None).await.unwrap();
    a.node.shutdown().await;
    drop(a);
    let e = other.node.join_mesh(&gone.token).await.unwrap_err();
    assert_eq!(kind(&e), Some(MeshErrorKind::IssuerUnreachable), "{e}");
    j.node.shutdown().await;
    other.node.shutdown().await;
}

/// A raw endpoint of a hostile node: its own key, no runtime.
pub(crate) fn raw_endpoint(key: &Arc<NodeKey>) -> QuicTransport {
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let admission = Arc::new(RegistryAdmission::new(store));
    QuicTransport::bind(
        key.clone(),
        "127.0.0.1:0".parse().unwrap(),
        admission,
        QuicConfig::default(),
    )
    .unwrap()
}

/// A node without a runtime that joins `a`'s mesh with a real token (to
/// turn hostile): its key, its endpoint, its grant.
pub(crate) async fn raw_member(
    a: &Member,
) -> (Arc<NodeKey>, QuicTransport, mesh_core::mesh::JoinGrant) {
    use mesh_core::mesh::JOIN;
    use mesh_core::mesh::member::MemberId;
    use mesh_core::mesh::wire::{JoinAnswer, JoinRequest};
    use mesh_core::transport::Transport;

    let key = Arc::new(NodeKey::generate());
    let endpoint = raw_endpoint(&key);
    let t = a.node.mesh_token(None).await.unwrap();
    let token = mesh_core::mesh::token::JoinToken::parse(&t.token).unwrap();
    let me = MemberId::new(
        &key,
        1,
        "evil",
        vec![PeerAddr::Socket(endpoint.local_addr())],
    )
    .unwrap();
    let join = endpoint
        .connect(a.node.node_id(), &PeerAddr::Socket(a.addr), JOIN)
        .await
        .unwrap();
    join.send(
        JoinRequest {
            secret: *token.secret().expose(),
            member: me,
        }
        .encode(),
    )
    .await
    .unwrap();
    let JoinAnswer::Granted(grant) = JoinAnswer::decode(&join.recv().await.unwrap()).unwrap()
    else {
        panic!("the hostile member's token was refused");
    };
    join.close();
    (key, endpoint, grant)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_are_refused_and_cut_off_while_members_carry_on() {
    use mesh_core::mesh::MEMBERSHIP;
    use mesh_core::mesh::gossip::GossipMessage;
    use mesh_core::mesh::member::MemberCert;
    use mesh_core::mesh::wire::MeshFrame;
    use mesh_core::transport::Transport;

    let a = member("target");
    let b = member("bystander");
    let t = a.node.mesh_token(None).await.unwrap();
    b.node.join_mesh(&t.token).await.unwrap();
    until(&a.node, "b active", |v| active(v) == 1).await;
    let mut a_events = a.node.subscribe("peer.*", 256).unwrap();
    let to_a = PeerAddr::Socket(a.addr);

    // 1. Not a member: garbage first, a self-certified hello, silence.
    let stranger_key = Arc::new(NodeKey::generate());
    let stranger = raw_endpoint(&stranger_key);
    let now = mesh_core::clock::Clock::now(&mesh_core::clock::SystemClock);
    let own = MemberCert::issue(&stranger_key, stranger_key.node_id(), now);
    // A certificate for another node (b), which the stranger signed itself.
    let stolen = MemberCert::issue(&stranger_key, b.node.node_id(), now);
    let firsts: [(&str, Option<Vec<u8>>); 4] = [
        ("garbage", Some(vec![0xff; 64])),
        (
            "a self-certified hello",
            Some(MeshFrame::Hello { cert: own }.encode()),
        ),
        (
            "a hello with another node's certificate",
            Some(MeshFrame::Hello { cert: stolen }.encode()),
        ),
        ("nothing (closed after the hello timeout)", None),
    ];
    for (what, first) in firsts {
        let conn = stranger
            .connect(a.node.node_id(), &to_a, MEMBERSHIP)
            .await
            .unwrap();
        if let Some(bytes) = first {
            conn.send(bytes).await.unwrap();
        }
        let answer = tokio::time::timeout(Duration::from_secs(5), conn.recv()).await;
        assert!(
            answer.unwrap().is_err(),
            "a stranger's connection with {what} stays open"
        );
    }
    assert_eq!(
        a.node.mesh_peers().await.unwrap().peers.len(),
        1,
        "a stranger got in"
    );

    // 2. A member that turns hostile: it joins with a real token, then
    //    sends forged broadcasts, a SWIM packet in another's name, an
    //    oversized frame and a flood.
    let (evil_key, evil, grant) = raw_member(&a).await;
    let conn = evil
        .connect(a.node.node_id(), &to_a, MEMBERSHIP)
        .await
        .unwrap();
    conn.send(MeshFrame::Hello { cert: grant.cert }.encode())
        .await
        .unwrap();
    let now = mesh_core::clock::Clock::now(&mesh_core::clock::SystemClock);
    let mut forged =
        GossipMessage::sign(&evil_key, 7, "chat/general", b"real".to_vec(), now, 8).unwrap();
    forged.body = b"forged".to_vec();
    let mut sub_b = b.node.mesh_subscribe("*", 64).unwrap();
    let mut sub_a = a.node.mesh_subscribe("*", 64).unwrap();
    let mut sent = 0;
    for _ in 0..3 {
        if conn
            .send(MeshFrame::Gossip(forged.clone()).encode())
            .await
            .is_ok()
        {
            sent += 1;
        }
    }
    let _ = conn.send(vec![0u8; 200 * 1024]).await;
    for _ in 0..2_000 {
        if conn.send(vec![0x07; 32]).await.is_err() {
            break;
        }
    }
    assert!(sent >= 1);
    let cut = peer_event(&mut a_events, "peer.disconnected").await;
    assert_eq!(cut["node"], evil_key.node_id().to_string());
    // Forged bodies reached no application.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(sub_a.try_recv().is_none() && sub_b.try_recv().is_none());
    // It is refused from now on; the honest member carries on.
    let again = evil.connect(a.node.node_id(), &to_a, MEMBERSHIP).await;
    match again {
        Err(_) => {}
        Ok(c) => {
            let _ = c
                .send(
                    MeshFrame::Hello {
                        cert: MemberCert::issue(&evil_key, evil_key.node_id(), now),
                    }
                    .encode(),
                )
                .await;
            assert!(
                tokio::time::timeout(Duration::from_secs(5), c.recv())
                    .await
                    .unwrap()
                    .is_err()
            );
        }
    }
    let key = b
        .node
        .mesh_broadcast("chat/general", b"still here".to_vec())
        .await
        .unwrap();
    assert_eq!(topic_once(&mut sub_a).await.key, key);
    for m in [a, b] {
        m.node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_cannot_crowd_out_members_or_spend_everyones_joins() {
    use mesh_core::mesh::MEMBERSHIP;
    use mesh_core::mesh::member::MemberId;
    use mesh_core::mesh::wire::{JoinAnswer, JoinRequest};
    use mesh_core::transport::Transport;

    let a = member_adjusted(
        "crowded",
        Arc::new(MemoryStorage::new()),
        Arc::new(NodeKey::generate()),
        |mut s| {
            s.max_unverified = 2;
            s
        },
    );
    let b = member("member");
    let to_a = PeerAddr::Socket(a.addr);
    // A stranger keeps every unverified slot of a taken with silent
    // connections, the whole time.
    let stranger = Arc::new(raw_endpoint(&Arc::new(NodeKey::generate())));
    let target = a.node.node_id();
    let (s2, addr) = (stranger.clone(), to_a.clone());
    let crowd = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            if let Ok(c) = s2.connect(target, &addr, MEMBERSHIP).await {
                held.push(c);
            }
            if held.len() > 8 {
                held.remove(0);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = a.node.mesh_token(None).await.unwrap();
    b.node.join_mesh(&t.token).await.unwrap();
    until(&a.node, "b active at a", |v| active(v) == 1).await;
    until(&b.node, "a active at b", |v| active(v) == 1).await;
    let mut inbox = a.node.mesh_subscribe("*", 16).unwrap();
    let key = b
        .node
        .mesh_broadcast("chat/general", b"through the crowd".to_vec())
        .await
        .unwrap();
    assert_eq!(topic_once(&mut inbox).await.key, key);
    crowd.abort();

    // Join attempts from one address: a burst of 5 answered, then refused
    // before any secret is looked at.
    let guesser_key = Arc::new(NodeKey::generate());
    let guesser = raw_endpoint(&guesser_key);
    let mut codes = Vec::new();
    for i in 0..7u8 {
        let c = guesser
            .connect(a.node.node_id(), &to_a, mesh_core::mesh::JOIN)
            .await
            .unwrap();
        let req = JoinRequest {
            secret: [i; 16],
            member: MemberId::new(&guesser_key, 1, "guesser", vec![]).unwrap(),
        };
        let _ = c.send(req.encode()).await;
        match c.recv().await.map(|b| JoinAnswer::decode(&b)) {
            Ok(Ok(JoinAnswer::Refused { code, message })) => codes.push((code, message)),
            other => panic!("unexpected answer {other:?}"),
        }
        c.close();
    }
    // 127.0.0.1 already spent one attempt on b's join: 4 of a burst of 5.
    assert!(
        codes[..4].iter().all(|(c, _)| c == "token_invalid"),
        "{codes:?}"
    );
    assert!(
        codes[4..]
            .iter()
            .all(|(c, m)| c == "join_refused" && m.contains("too many")),
        "{codes:?}"
    );
    for m in [a, b] {
        m.node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_may_join_the_mesh_too() {
    let a = member("primary-a");
    let key = Arc::new(NodeKey::generate());
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let admission = Arc::new(RegistryAdmission::new(store.clone()));
    let quic = Arc::new(
        QuicTransport::bind(
            key.clone(),
            "127.0.0.1:0".parse().unwrap(),
            admission,
            QuicConfig::default(),
        )
        .unwrap(),
    );
    let settings = MeshSettings::reachable_at(quic.local_addr(), &[]);
    let worker = Node::builder(
        key,
        store,
        quic,
        NodeConfig::new(Role::Worker, "phone", "hw-phone"),
    )
    .mesh(settings)
    .start_worker()
    .unwrap();
    let t = a.node.mesh_token(None).await.unwrap();
    assert_eq!(worker.join_mesh(&t.token).await.unwrap(), 1);
    until(&a.node, "the worker active at a", |v| active(v) == 1).await;
    until(&worker, "a active at the worker", |v| active(v) == 1).await;
    let mut inbox = worker.mesh_subscribe("*", 8).unwrap();
    let key = a.node.mesh_broadcast("news", b"hi".to_vec()).await.unwrap();
    assert_eq!(topic_once(&mut inbox).await.key, key);
    // Without the mesh, a node says so.
    let plain = crate::node_e2e::primary();
    let e = plain.node.mesh_peers().await.unwrap_err();
    assert_eq!(kind(&e), Some(MeshErrorKind::Disabled));
    plain.node.shutdown().await;
    worker.shutdown().await;
    a.node.shutdown().await;
}
