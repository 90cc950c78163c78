//! Files between a primary and its devices through the runtime, over QUIC
//! on 127.0.0.1: both ways, verified, under the device's scope and policy;
//! names that try to escape refused; a transfer that survives a restart of
//! the primary in the middle.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::files::{FILES, FileFrame, FileHash, Offer, TransferId};
use mesh_core::identity::NodeKey;
use mesh_core::node::{
    Direction, FilesErrorKind, FilesSettings, Node, NodeConfig, NodeError, RegistryAdmission, Role,
    TransferState, Worker,
};
use mesh_core::registry::scopes;
use mesh_core::storage::{SqliteStorage, Storage};
use mesh_core::transport::{PeerAddr, Transport};
use mesh_policy::runtime::RuntimePolicy;
use mesh_transport::quic::{QuicConfig, QuicTransport};
use sha2::{Digest, Sha256};

use crate::node_e2e::{Primary, pair};

const WAIT: Duration = Duration::from_secs(60);

/// Deterministic, poorly compressible bytes.
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn write(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

fn sha(path: &Path) -> Vec<u8> {
    Sha256::digest(std::fs::read(path).unwrap()).to_vec()
}

fn bind(
    key: &Arc<NodeKey>,
    store: &Arc<dyn Storage>,
    at: std::net::SocketAddr,
) -> Arc<QuicTransport> {
    let admission = Arc::new(RegistryAdmission::new(store.clone()));
    // A port just given up may take a moment to be free again.
    for _ in 0..50 {
        if let Ok(q) =
            QuicTransport::bind(key.clone(), at, admission.clone(), QuicConfig::default())
        {
            return Arc::new(q);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("cannot bind {at}");
}

struct Side {
    dir: tempfile::TempDir,
    key: Arc<NodeKey>,
    store: Arc<dyn Storage>,
}

impl Side {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Storage> =
            Arc::new(SqliteStorage::open(dir.path().join("mesh.db")).unwrap());
        Side {
            dir,
            key: Arc::new(NodeKey::generate()),
            store,
        }
    }

    fn files(&self) -> PathBuf {
        self.dir.path().join("files")
    }
}

fn start_primary(side: &Side, at: std::net::SocketAddr) -> Primary {
    let transport = bind(&side.key, &side.store, at);
    let addr = PeerAddr::Socket(transport.local_addr());
    let config = NodeConfig::new(Role::Primary, "desk", "desk-1")
        .heartbeat_interval(Duration::from_millis(100))
        .pairing_limits(mesh_core::node::PairingLimits::default().rates(
            mesh_core::limits::Rate::per_second(1000.0, 1000),
            mesh_core::limits::Rate::per_second(1000.0, 1000),
        ));
    let node = Node::builder(side.key.clone(), side.store.clone(), transport, config)
        .policy(Arc::new(RuntimePolicy::new()))
        .files(FilesSettings::new(side.files()))
        .start_primary()
        .unwrap();
    Primary {
        node,
        store: side.store.clone(),
        key: side.key.clone(),
        addr,
    }
}

fn start_worker(side: &Side, name: &str) -> (Worker, Arc<QuicTransport>) {
    let transport = bind(&side.key, &side.store, "127.0.0.1:0".parse().unwrap());
    let config = NodeConfig::new(Role::Worker, name, &format!("hw-{name}"))
        .heartbeat_interval(Duration::from_millis(100))
        .reconnect(Duration::from_millis(50), Duration::from_millis(300));
    let node = Node::builder(
        side.key.clone(),
        side.store.clone(),
        transport.clone(),
        config,
    )
    .files(FilesSettings::new(side.files()))
    .start_worker()
    .unwrap();
    (node, transport)
}

/// Gives `device` the files scope and a policy allowing `files.send` up to
/// `max` bytes.
fn allow_files(p: &Primary, device: &mesh_core::identity::NodeId, max: u64) {
    let mut granted: Vec<&str> = scopes::DEFAULT.to_vec();
    granted.push(scopes::FILES_WRITE);
    p.node.set_scopes(device, &granted).unwrap();
    p.node
        .set_policy(
            device,
            &format!(r#"{{"allowed_commands": ["files.send"], "max_file_bytes": {max}}}"#),
        )
        .unwrap();
}

async fn done(node: &Node, id: TransferId) -> mesh_core::node::TransferInfo {
    let info = tokio::time::timeout(WAIT, node.wait_transfer(id))
        .await
        .expect("the transfer ends in time")
        .unwrap();
    assert_eq!(info.state, TransferState::Done, "{info:?}");
    info
}

/// The receiving side's record of `id`, once it has one.
async fn incoming(node: &Node, id: TransferId) -> mesh_core::node::TransferInfo {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(t) = node.transfer(&id).unwrap() {
            return t;
        }
        assert!(tokio::time::Instant::now() < deadline, "{id} never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_move_both_ways_verified_under_scope_and_policy() {
    let (ps, ws) = (Side::new(), Side::new());
    let p = start_primary(&ps, "127.0.0.1:0".parse().unwrap());
    let (w, w_transport) = start_worker(&ws, "laptop");
    pair(&p, &w, false).await;
    let (p_id, w_id) = (p.node.node_id(), w.node_id());
    let src = tempfile::tempdir().unwrap();

    // Without the scope: the primary refuses the file.
    let small = write(src.path(), "notes.txt", &bytes(40_000, 1));
    let t = w.send_file(&small, p_id).await.unwrap();
    let ended = tokio::time::timeout(WAIT, w.wait_transfer(t.id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ended.state, TransferState::Failed);
    assert!(
        ended
            .error
            .as_deref()
            .is_some_and(|e| e.contains("forbidden")),
        "{ended:?}"
    );
    match p.node.send_file(&small, w_id).await {
        Err(NodeError::Files {
            kind: FilesErrorKind::Forbidden,
            ..
        }) => {}
        other => panic!("expected forbidden, got {other:?}"),
    }

    allow_files(&p, &w_id, 20_000_000);

    // Worker → primary: 5 MiB, verified, under its name; the same name
    // again gets a suffix.
    let data = bytes(5 << 20, 2);
    let big = write(src.path(), "video.mp4", &data);
    let mut progress = p.node.subscribe("transfer.progress", 1024).unwrap();
    let sent = w.send_file(&big, p_id).await.unwrap();
    assert_eq!(sent.size, data.len() as u64);
    assert_eq!(
        sent.hash,
        FileHash(*blake3_of(&data).as_bytes()),
        "content-addressed by BLAKE3"
    );
    let out = done(&w, sent.id).await;
    assert_eq!(out.direction, Direction::Out);
    assert_eq!(out.received, data.len() as u64);
    let got = incoming(&p.node, sent.id).await;
    let got = if got.state == TransferState::Done {
        got
    } else {
        done(&p.node, sent.id).await
    };
    assert_eq!(got.name, "video.mp4");
    assert_eq!(got.direction, Direction::In);
    assert_eq!(got.peer, w_id);
    let landed = ps.files().join("video.mp4");
    assert_eq!(got.path.as_deref(), Some(landed.as_path()));
    assert_eq!(sha(&landed), sha(&big));
    crate::support::next(&mut progress, "transfer.progress", Duration::from_secs(1)).await;
    let again = w.send_file(&big, p_id).await.unwrap();
    done(&w, again.id).await;
    let second = done(&p.node, again.id).await;
    assert_eq!(second.name, "video (1).mp4");
    assert_eq!(sha(&ps.files().join("video (1).mp4")), sha(&big));

    // Primary → worker (the worker dials back for it).
    // A compressible file: sent with zstd (the sender's sample paid).
    let text: Vec<u8> = (0..3 << 20)
        .map(|i| b"the quick brown fox "[i % 20])
        .collect();
    let doc = write(src.path(), "report.txt", &text);
    let down = p.node.send_file(&doc, w_id).await.unwrap();
    done(&p.node, down.id).await;
    let there = done(&w, down.id).await;
    assert_eq!(there.direction, Direction::In);
    assert_eq!(sha(&ws.files().join("report.txt")), sha(&doc));

    // The policy's size limit, both ways.
    let huge = write(src.path(), "huge.bin", &bytes(21_000_000, 4));
    match p.node.send_file(&huge, w_id).await {
        Err(NodeError::Files {
            kind: FilesErrorKind::TooLarge,
            ..
        }) => {}
        other => panic!("expected too_large, got {other:?}"),
    }
    let up = w.send_file(&huge, p_id).await.unwrap();
    let refused = tokio::time::timeout(WAIT, w.wait_transfer(up.id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(refused.state, TransferState::Failed);
    assert!(
        refused
            .error
            .as_deref()
            .is_some_and(|e| e.contains("too_large")),
        "{refused:?}"
    );

    // A hostile device (the worker's own key, by hand): names that climb
    // out are refused and nothing is written outside the files directory.
    let conn = w_transport
        .connect(p_id, &p.addr, FILES)
        .await
        .expect("a paired device may connect");
    for name in ["../escape.txt", "/etc/passwd", "..", "a\\b", "nul\0", "CON"] {
        let offer = FileFrame::Offer(Offer {
            id: TransferId::random(),
            hash: FileHash([9; 32]),
            size: 10,
            name: name.into(),
            zstd: false,
        });
        conn.send(offer.encode()).await.unwrap();
        let answer = FileFrame::decode(&conn.recv().await.unwrap()).unwrap();
        match answer {
            FileFrame::Refuse { code, .. } => assert_eq!(code, "bad_name", "{name:?}"),
            other => panic!("{name:?}: expected a refusal, got {other:?}"),
        }
    }
    assert!(!ps.dir.path().join("escape.txt").exists());
    // A file the policy allows but the disk cannot hold (512 TiB): refused
    // `no_space` before anything is stored.
    allow_files(&p, &w_id, 1 << 50);
    let huge = TransferId::random();
    conn.send(
        FileFrame::Offer(Offer {
            id: huge,
            hash: FileHash([7; 32]),
            size: 1 << 49,
            name: "disk-image.raw".into(),
            zstd: false,
        })
        .encode(),
    )
    .await
    .unwrap();
    match FileFrame::decode(&conn.recv().await.unwrap()).unwrap() {
        FileFrame::Refuse { id, code, message } => {
            assert_eq!((id, code.as_str()), (huge, "no_space"), "{message}");
        }
        other => panic!("expected no_space, got {other:?}"),
    }
    assert!(p.node.transfer(&huge).unwrap().is_none());
    allow_files(&p, &w_id, 20_000_000);
    // Garbage on the connection ends it, and changes nothing.
    conn.send(vec![0xff; 64]).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(5), conn.recv())
            .await
            .unwrap()
            .is_err()
    );
    let names: Vec<String> = std::fs::read_dir(ps.files())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with('.'))
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, vec!["video (1).mp4", "video.mp4"]);

    // Cancel: both sides stop.
    let slow = write(src.path(), "slow.bin", &bytes(15_000_000, 5));
    let c = w.send_file(&slow, p_id).await.unwrap();
    let cancelled = w.cancel_transfer(c.id).await.unwrap();
    assert_eq!(cancelled.state, TransferState::Cancelled);
    match w.cancel_transfer(c.id).await {
        Err(NodeError::Files {
            kind: FilesErrorKind::AlreadyEnded,
            ..
        }) => {}
        other => panic!("expected already_ended, got {other:?}"),
    }

    // Revoking the device mid-transfer: its transfers fail on both sides
    // and it cannot reconnect for files.
    let long = write(src.path(), "long.bin", &bytes(18_000_000, 6));
    let r = w.send_file(&long, p_id).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while p
        .node
        .transfer(&r.id)
        .unwrap()
        .is_none_or(|t| t.received == 0)
    {
        assert!(tokio::time::Instant::now() < deadline, "never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    p.node.revoke(&w_id).await.unwrap();
    let theirs = tokio::time::timeout(WAIT, p.node.wait_transfer(r.id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(theirs.state, TransferState::Failed, "{theirs:?}");
    let mine = tokio::time::timeout(WAIT, w.wait_transfer(r.id))
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(mine.state, TransferState::Failed | TransferState::Cancelled),
        "{mine:?}"
    );
    assert!(!ps.files().join("long.bin").exists());
    w.shutdown().await;
    p.node.shutdown().await;
}

fn blake3_of(data: &[u8]) -> bao_tree::blake3::Hash {
    bao_tree::blake3::hash(data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_finishes_by_itself_after_the_primary_restarts_mid_way() {
    let (ps, ws) = (Side::new(), Side::new());
    let p = start_primary(&ps, "127.0.0.1:0".parse().unwrap());
    let PeerAddr::Socket(p_at) = p.addr.clone() else {
        panic!("a socket address")
    };
    let (w, _) = start_worker(&ws, "camera");
    pair(&p, &w, false).await;
    let (p_id, w_id) = (p.node.node_id(), w.node_id());
    allow_files(&p, &w_id, 1 << 30);
    let src = tempfile::tempdir().unwrap();
    let data = bytes(48 << 20, 7);
    let file = write(src.path(), "footage.raw", &data);
    let sent = w.send_file(&file, p_id).await.unwrap();

    // Once a third has arrived, the primary goes away.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let seen = p.node.transfer(&sent.id).unwrap();
        if seen.is_some_and(|t| t.received >= data.len() as u64 / 3) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    p.node.shutdown().await;
    drop(p);
    let before = SqliteStorage::open(ps.dir.path().join("mesh.db")).map(|_| ());
    assert!(before.is_ok());

    // Back on the same port, same store: the transfer resumes from what
    // the primary holds, by itself.
    let p = start_primary(&ps, p_at);
    let mut progress = p.node.subscribe("transfer.progress", 4096).unwrap();
    let got = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(t) = p.node.transfer(&sent.id).unwrap()
                && t.state == TransferState::Done
            {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the transfer finishes after the restart");
    assert_eq!(sha(&ps.files().join(&got.name)), sha(&file));
    // It resumed: the first progress after the restart was already well
    // past the start.
    let first =
        crate::support::next(&mut progress, "transfer.progress", Duration::from_secs(1)).await;
    let bytes_then = first.data["bytes"].as_u64().unwrap();
    assert!(
        bytes_then >= data.len() as u64 / 4,
        "resumed from {bytes_then} of {}",
        data.len()
    );
    done(&w, sent.id).await;
    w.shutdown().await;
    p.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_streams_arrive_in_order_with_their_statistics() {
    use mesh_core::media::{MediaKind, Received};
    let (ps, ws) = (Side::new(), Side::new());
    let p = start_primary(&ps, "127.0.0.1:0".parse().unwrap());
    let (w, _) = start_worker(&ws, "camera");
    pair(&p, &w, false).await;
    let (p_id, w_id) = (p.node.node_id(), w.node_id());
    let mut incoming = p.node.media_incoming().unwrap();

    // Without media:write: refused both ways.
    match p.node.open_media(w_id, 9, MediaKind::Audio, "opus").await {
        Err(NodeError::Files {
            kind: FilesErrorKind::Forbidden,
            ..
        }) => {}
        other => panic!("expected forbidden, got {other:?}"),
    }
    let mut refused = p.node.subscribe("media.refused", 8).unwrap();
    let mut refused_w = w.subscribe("media.refused", 8).unwrap();
    let _nope = w
        .open_media(p_id, 9, MediaKind::Audio, "opus")
        .await
        .unwrap();
    crate::support::next(&mut refused_w, "media.refused", WAIT).await;
    assert!(refused.try_recv().is_none());

    let mut granted: Vec<&str> = scopes::DEFAULT.to_vec();
    granted.push("media:write");
    p.node.set_scopes(&w_id, &granted).unwrap();

    // A camera: 30 fps video (a key frame each second) and 20 ms audio
    // frames, for 2 s, in real time.
    let video = w
        .open_media(p_id, 1, MediaKind::Video, "h264")
        .await
        .unwrap();
    let audio = w
        .open_media(p_id, 2, MediaKind::Audio, "opus")
        .await
        .unwrap();
    let mut streams = Vec::new();
    for _ in 0..2 {
        let s = tokio::time::timeout(WAIT, incoming.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(s.from, w_id);
        streams.push(s);
    }
    streams.sort_by_key(|s| s.stream_id);
    assert_eq!(
        (streams[0].kind, streams[0].codec.as_str()),
        (MediaKind::Video, "h264")
    );
    assert_eq!(streams[1].kind, MediaKind::Audio);
    let start = tokio::time::Instant::now();
    let (mut v, mut a) = (0u64, 0u64);
    while v < 60 || a < 100 {
        let t = start.elapsed().as_micros() as u64;
        if v < 60 && t >= v * 33_333 {
            assert!(video.send(t, v % 30 == 0, vec![v as u8; 4000]).unwrap());
            v += 1;
        }
        if a < 100 && t >= a * 20_000 {
            assert!(audio.send(t, false, vec![a as u8; 160]).unwrap());
            a += 1;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    drop((video, audio));
    for (s, (n, len)) in streams.iter_mut().zip([(60u64, 4000usize), (100, 160)]) {
        let mut got = Vec::new();
        while let Ok(Some(r)) = tokio::time::timeout(Duration::from_secs(5), s.next()).await {
            match r {
                Received::Frame(f) => {
                    assert_eq!(f.payload.len(), len);
                    got.push(f.seq);
                }
                Received::Gap { from, count } => panic!("a gap of {count} at {from} on loopback"),
            }
        }
        assert_eq!(got, (0..n).collect::<Vec<_>>(), "in order, all of them");
        let st = s.stats();
        assert_eq!(
            (st.received, st.delivered, st.lost, st.too_old),
            (n, n, 0, 0)
        );
    }
    w.shutdown().await;
    p.node.shutdown().await;
}

/// Media through the runtime on the memory transport, its path delayed
/// (30 ms + up to 30 ms of jitter per packet) and lossy (2 % of packets
/// sent again 300 ms later, holding up the rest of their group's stream
/// while later groups overtake it), deadline 150 ms: every frame is
/// accounted for exactly once — delivered in order, reported in a gap, or
/// dropped as too old — the counters agree with what the app saw, and no
/// frame held up by a loss is delivered after its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_over_a_lossy_jittery_memory_path_is_accounted_for_exactly() {
    use mesh_core::media::{MediaKind, Received, SenderSettings};
    use mesh_transport::memory::{MemoryNetwork, StreamFaults};

    let net = MemoryNetwork::new(21);
    let (ps, ws) = (Side::new(), Side::new());
    let on_net = |side: &Side, name: &str| {
        let admission = Arc::new(RegistryAdmission::new(side.store.clone()));
        Arc::new(net.endpoint(side.key.node_id(), name, admission).unwrap())
    };
    let pt = on_net(&ps, "primary");
    let addr = pt.addr();
    let node = Node::builder(
        ps.key.clone(),
        ps.store.clone(),
        pt,
        NodeConfig::new(Role::Primary, "desk", "desk-1")
            .heartbeat_interval(Duration::from_millis(100)),
    )
    .policy(Arc::new(RuntimePolicy::new()))
    .files(FilesSettings::new(ps.files()))
    .start_primary()
    .unwrap();
    let p = Primary {
        node,
        store: ps.store.clone(),
        key: ps.key.clone(),
        addr,
    };
    let w = Node::builder(
        ws.key.clone(),
        ws.store.clone(),
        on_net(&ws, "camera"),
        NodeConfig::new(Role::Worker, "camera", "hw-camera")
            .heartbeat_interval(Duration::from_millis(100))
            .reconnect(Duration::from_millis(50), Duration::from_millis(300)),
    )
    .files(FilesSettings::new(ws.files()))
    .start_worker()
    .unwrap();
    pair(&p, &w, false).await;
    let (p_id, w_id) = (p.node.node_id(), w.node_id());
    let mut granted: Vec<&str> = scopes::DEFAULT.to_vec();
    granted.push(scopes::MEDIA_WRITE);
    p.node.set_scopes(&w_id, &granted).unwrap();
    let mut incoming = p.node.media_incoming().unwrap();

    let faults = StreamFaults {
        delay: Duration::from_millis(30),
        jitter: Duration::from_millis(30),
        loss: 0.02,
        retransmit: Duration::from_millis(300),
    };
    net.set_stream_faults(Some(faults));
    const DEADLINE_MS: u64 = 150;
    let settings = |kind| {
        let mut s = SenderSettings::for_kind(kind);
        s.deadline_ms = DEADLINE_MS as u32;
        s
    };
    let video = w
        .open_media_with(
            p_id,
            1,
            MediaKind::Video,
            "h264",
            settings(MediaKind::Video),
        )
        .await
        .unwrap();
    let audio = w
        .open_media_with(
            p_id,
            2,
            MediaKind::Audio,
            "opus",
            settings(MediaKind::Audio),
        )
        .await
        .unwrap();
    let mut streams = Vec::new();
    for _ in 0..2 {
        streams.push(
            tokio::time::timeout(WAIT, incoming.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    streams.sort_by_key(|s| s.stream_id);

    // What the app sees, and how old each frame is when it sees it (the
    // sender's media clock starts at `start`; one process, one clock).
    let start = tokio::time::Instant::now();
    let readers: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while let Ok(Some(r)) = tokio::time::timeout(Duration::from_secs(5), s.next()).await
                {
                    let age_ms = match &r {
                        Received::Frame(f) => {
                            (start.elapsed().as_micros() as u64).saturating_sub(f.timestamp_us)
                                / 1000
                        }
                        Received::Gap { .. } => 0,
                    };
                    seen.push((r, age_ms));
                }
                (seen, s.stats())
            })
        })
        .collect();

    // A camera for 3 s: 30 fps video (one packet a frame, a key frame each
    // second) and 20 ms audio frames.
    let (mut v, mut a) = (0u64, 0u64);
    while v < 90 || a < 150 {
        let t = start.elapsed().as_micros() as u64;
        if v < 90 && t >= v * 33_333 {
            assert!(video.send(t, v % 30 == 0, vec![v as u8; 1100]).unwrap());
            v += 1;
        }
        if a < 150 && t >= a * 20_000 {
            assert!(audio.send(t, false, vec![a as u8; 160]).unwrap());
            a += 1;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(video.counts(), (90, 0));
    assert_eq!(audio.counts(), (150, 0));
    drop((video, audio));

    let mut troubled = 0;
    for (reader, n) in readers.into_iter().zip([90u64, 150]) {
        let (seen, st) = reader.await.unwrap();
        let mut frames = Vec::new();
        let mut accounted = std::collections::BTreeSet::new();
        let mut gaps = 0;
        for (r, age_ms) in &seen {
            match r {
                Received::Frame(f) => {
                    assert!(
                        frames.last().is_none_or(|last| *last < f.seq),
                        "in order: {} after {:?}",
                        f.seq,
                        frames.last()
                    );
                    // On time: the path's delay and jitter, the receiver's
                    // estimate of the sender's clock, and scheduling slack
                    // — never a frame held up 300 ms by a loss.
                    assert!(
                        *age_ms <= DEADLINE_MS + 60 + 150,
                        "frame {} delivered {age_ms} ms after it was taken",
                        f.seq
                    );
                    frames.push(f.seq);
                    assert!(accounted.insert(f.seq));
                }
                Received::Gap { from, count } => {
                    gaps += count;
                    for s in *from..from + count {
                        assert!(accounted.insert(s), "{s} reported twice");
                    }
                }
            }
        }
        // What is in neither was dropped as too old.
        let too_old = (0..n).filter(|s| !accounted.contains(s)).count() as u64;
        assert!(accounted.iter().all(|s| *s < n));
        assert_eq!(st.delivered, frames.len() as u64, "{st:?}");
        assert_eq!(st.lost + st.late, gaps, "{st:?}");
        assert_eq!(st.too_old, too_old, "{st:?}");
        assert_eq!(st.delivered + st.lost + st.late + st.too_old, n, "{st:?}");
        // Lost means never arrived: what arrived is the rest.
        assert_eq!(st.received, n - st.lost, "{st:?}");
        assert!(st.delivered >= n / 2, "most frames arrive on time: {st:?}");
        eprintln!("stream of {n}: {st:?}");
        troubled += st.lost + st.late + st.too_old;
    }
    // The faults bit: frames held up behind a lost packet arrived after
    // later ones and were given up.
    assert!(troubled > 0);
    w.shutdown().await;
    p.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_sender_is_caught_at_the_bad_group_asked_again_and_penalised() {
    use mesh_core::files::verify::{hash_file, serve};
    use mesh_core::files::{GROUP_LEN, RangeRequest};
    use mesh_core::transport::IncomingStream;
    let (ps, ws) = (Side::new(), Side::new());
    let p = start_primary(&ps, "127.0.0.1:0".parse().unwrap());
    let (w, w_transport) = start_worker(&ws, "liar");
    pair(&p, &w, false).await;
    let (p_id, w_id) = (p.node.node_id(), w.node_id());
    allow_files(&p, &w_id, 1 << 30);
    let mut violations = p.node.subscribe("policy.violation", 64).unwrap();

    // The real file and its hash; the liar serves a copy with group 5
    // changed, against the real outboard.
    let src = tempfile::tempdir().unwrap();
    let data = bytes(20 * GROUP_LEN as usize, 9);
    let real = write(src.path(), "real.bin", &data);
    let outboard = src.path().join("real.obao");
    let (hash, size) = hash_file(&real, &outboard).unwrap();
    let mut bad = data.clone();
    bad[5 * GROUP_LEN as usize + 100] ^= 0xff;
    let forged = write(src.path(), "forged.bin", &bad);

    let conn = w_transport.connect(p_id, &p.addr, FILES).await.unwrap();
    let id = TransferId::random();
    conn.send(
        FileFrame::Offer(Offer {
            id,
            hash,
            size,
            name: "payload.bin".into(),
            zstd: false,
        })
        .encode(),
    )
    .await
    .unwrap();
    let accepted = FileFrame::decode(&conn.recv().await.unwrap()).unwrap();
    assert!(matches!(accepted, FileFrame::Accept { .. }), "{accepted:?}");
    // Serve every request from the forged copy.
    let mut asked = Vec::new();
    for _ in 0..3 {
        let Ok(Ok(IncomingStream::Bi(mut send, mut recv))) =
            tokio::time::timeout(WAIT, conn.accept_stream()).await
        else {
            panic!("no request")
        };
        let mut prefix = [0u8; 2];
        let mut at = 0;
        while at < 2 {
            at += recv.read(&mut prefix[at..]).await.unwrap().unwrap();
        }
        let body = recv
            .read_to_end(RangeRequest::body_len(prefix).unwrap())
            .await
            .unwrap();
        let request = RangeRequest::decode(&body).unwrap();
        asked.push(request.groups.clone());
        let mut answer = Vec::new();
        serve(
            &std::fs::File::open(&forged).unwrap(),
            std::fs::File::open(&outboard).unwrap(),
            hash,
            size,
            &request.groups,
            &mut answer,
            false,
        )
        .unwrap();
        let _ = send.write_all(&answer).await;
        let _ = send.finish().await;
    }
    // Caught at group 5 each time; the groups before it are kept and not
    // asked for again.
    assert_eq!(asked[0], vec![(0, 20)]);
    assert_eq!(asked[1], vec![(5, 20)], "{asked:?}");
    for _ in 0..3 {
        let v = crate::support::next(&mut violations, "policy.violation", WAIT).await;
        assert_eq!(v.data["reason"], "file_hash_mismatch");
        assert_eq!(v.data["device"], w_id.to_string());
    }
    // Three bad groups: the transfer fails, nothing lands.
    let ended = tokio::time::timeout(WAIT, p.node.wait_transfer(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ended.state, TransferState::Failed, "{ended:?}");
    assert!(ended.error.unwrap().contains("do not match"));
    assert!(!ps.files().join("payload.bin").exists());
    assert_eq!(p.node.files_stats().unwrap().groups_rejected, 3);
    w.shutdown().await;
    p.node.shutdown().await;
}

/// A peer that sends many files does not grow the transfer table for
/// ever: beyond `keep_ended`, the oldest ended transfers are forgotten, in
/// the list and in the store (a restart does not bring them back), while
/// their files stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_transfers_beyond_the_limit_are_forgotten() {
    let (ps, ws) = (Side::new(), Side::new());
    let start = |side: &Side| {
        let transport = bind(&side.key, &side.store, "127.0.0.1:0".parse().unwrap());
        let addr = PeerAddr::Socket(transport.local_addr());
        let node = Node::builder(
            side.key.clone(),
            side.store.clone(),
            transport,
            NodeConfig::new(Role::Primary, "desk", "desk-1")
                .heartbeat_interval(Duration::from_millis(100)),
        )
        .policy(Arc::new(RuntimePolicy::new()))
        .files(FilesSettings::new(side.files()).keep_ended(2))
        .start_primary()
        .unwrap();
        Primary {
            node,
            store: side.store.clone(),
            key: side.key.clone(),
            addr,
        }
    };
    let p = start(&ps);
    let (w, _) = start_worker(&ws, "scanner");
    pair(&p, &w, false).await;
    let (p_id, w_id) = (p.node.node_id(), w.node_id());
    allow_files(&p, &w_id, 1_000_000);
    let src = tempfile::tempdir().unwrap();
    let mut ids = Vec::new();
    for i in 0..4u64 {
        let f = write(src.path(), &format!("page-{i}.pdf"), &bytes(20_000, 10 + i));
        let t = w.send_file(&f, p_id).await.unwrap();
        done(&w, t.id).await;
        let got = incoming(&p.node, t.id).await;
        if got.state != TransferState::Done {
            done(&p.node, t.id).await;
        }
        ids.push(t.id);
    }
    let kept = |node: &Node| {
        let mut k: Vec<TransferId> = node.transfers().unwrap().iter().map(|t| t.id).collect();
        k.sort();
        k
    };
    let mut newest = ids[2..].to_vec();
    newest.sort();
    assert_eq!(kept(&p.node), newest, "the two newest are kept");
    assert_eq!(
        w.transfers().unwrap().len(),
        4,
        "the worker keeps its default"
    );
    for i in 0..4 {
        assert!(ps.files().join(format!("page-{i}.pdf")).exists());
    }
    p.node.shutdown().await;
    let p = start(&ps);
    assert_eq!(kept(&p.node), newest, "forgotten in the store too");
    w.shutdown().await;
    p.node.shutdown().await;
}
