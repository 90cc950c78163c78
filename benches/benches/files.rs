//! File transfer (issue 17) between a worker and its primary over QUIC on
//! 127.0.0.1, both in this process, against raw quinn in the same run:
//!
//! 1. **Throughput**: one file of 1 GiB from the worker to the primary,
//!    verification included (the sender re-checks every group against the
//!    outboard as it reads it, the receiver checks every group against the
//!    root hash before writing it; the receiver's partial state is synced
//!    every 4 MiB), from the moment the transfer is offered to the moment
//!    the file is in place — against one raw quinn stream moving the same
//!    bytes from memory to nowhere (median of 3 each, alternating). The
//!    sender's hashing (the outboard, once per file) is shown apart.
//! 2. **Resume overhead**: a 256 MiB file whose connection is dropped
//!    half way (the primary shuts down and comes back): bytes served in
//!    all against the file's size.
//! 3. **Fairness**: 10 files of 64 MiB at once; the slowest transfer's time
//!    against the fastest's.
//! 4. **Memory**: the process's peak RSS while 2 GiB move (sender and
//!    receiver together, so each is below it).
//!
//! `cargo bench -p mesh-benches --bench files`; under `cargo test
//! --benches` it runs small sizes once.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_core::identity::NodeKey;
use mesh_core::node::{
    FilesSettings, Node, NodeConfig, Primary, RegistryAdmission, Role, TransferState, Worker,
};
use mesh_core::registry::scopes;
use mesh_core::storage::{SqliteStorage, Storage};
use mesh_core::transport::PeerAddr;
use mesh_policy::runtime::RuntimePolicy;
use mesh_transport::quic::{QuicConfig, QuicTransport};

#[path = "../common/raw_quinn.rs"]
mod raw_quinn;

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

    fn transport(&self, at: std::net::SocketAddr) -> Arc<QuicTransport> {
        let admission = Arc::new(RegistryAdmission::new(self.store.clone()));
        for _ in 0..50 {
            if let Ok(q) = QuicTransport::bind(
                self.key.clone(),
                at,
                admission.clone(),
                QuicConfig::default(),
            ) {
                return Arc::new(q);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("cannot bind {at}");
    }
}

fn primary(side: &Side, at: std::net::SocketAddr) -> (Primary, std::net::SocketAddr) {
    let t = side.transport(at);
    let addr = t.local_addr();
    let node = Node::builder(
        side.key.clone(),
        side.store.clone(),
        t,
        NodeConfig::new(Role::Primary, "desk", "desk-1"),
    )
    .policy(Arc::new(RuntimePolicy::new()))
    .files(FilesSettings::new(side.dir.path().join("files")))
    .start_primary()
    .unwrap();
    (node, addr)
}

fn worker(side: &Side) -> Worker {
    let t = side.transport("127.0.0.1:0".parse().unwrap());
    Node::builder(
        side.key.clone(),
        side.store.clone(),
        t,
        NodeConfig::new(Role::Worker, "cam", "cam-1")
            .reconnect(Duration::from_millis(50), Duration::from_millis(300)),
    )
    .files(FilesSettings::new(side.dir.path().join("files")))
    .start_worker()
    .unwrap()
}

/// A paired worker allowed to send files.
async fn paired(p: &Primary, addr: std::net::SocketAddr, w: &Worker) {
    let ticket = w
        .request_pairing(p.node_id(), PeerAddr::Socket(addr))
        .await
        .unwrap();
    let request = loop {
        if let Some(r) = p
            .pending_pairings()
            .unwrap()
            .into_iter()
            .find(|r| r.device_node == w.node_id())
        {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    p.approve_pairing(&request.request_id, ticket.code())
        .await
        .unwrap();
    ticket.finished().await.unwrap();
    let mut granted: Vec<&str> = scopes::DEFAULT.to_vec();
    granted.push(scopes::FILES_WRITE);
    p.set_scopes(&w.node_id(), &granted).unwrap();
    p.set_policy(&w.node_id(), r#"{"allowed_commands": ["files.send"]}"#)
        .unwrap();
}

/// A file of `len` incompressible bytes.
fn file(dir: &Path, name: &str, len: u64, seed: u64) -> PathBuf {
    use std::io::Write;
    let path = dir.join(name);
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for b in buf.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x >> 40) as u8;
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
    path
}

/// Sends `path`; (seconds hashing, seconds moving) until the primary has
/// the file in place.
async fn send(w: &Worker, p: &Primary, path: &Path) -> (f64, f64) {
    let t0 = Instant::now();
    let t = w.send_file(path, p.node_id()).await.unwrap();
    let hashed = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    loop {
        if let Some(got) = p.transfer(&t.id).unwrap()
            && got.state == TransferState::Done
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    (hashed, t1.elapsed().as_secs_f64())
}

/// CPU seconds (user + system, all threads) this process has used so far
/// (Linux: /proc/self/stat, in ticks of 1/100 s).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the line: 11 and 12 here.
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) as f64 / 100.0
}

/// [`send`], and the CPU seconds the move took (after hashing).
async fn send_timed(w: &Worker, p: &Primary, path: &Path) -> (f64, f64, f64) {
    let t0 = Instant::now();
    let t = w.send_file(path, p.node_id()).await.unwrap();
    let hashed = t0.elapsed().as_secs_f64();
    let (t1, c1) = (Instant::now(), cpu_seconds());
    loop {
        if let Some(got) = p.transfer(&t.id).unwrap()
            && got.state == TransferState::Done
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    (hashed, t1.elapsed().as_secs_f64(), cpu_seconds() - c1)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn reset_peak_rss() {
    // Linux: "5" resets the peak RSS (VmHWM) to the current RSS.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let gib: u64 = if full { 1 << 30 } else { 32 << 20 };
    rt.block_on(async {
        let (ps, ws) = (Side::new(), Side::new());
        let (p, addr) = primary(&ps, "127.0.0.1:0".parse().unwrap());
        let w = worker(&ws);
        paired(&p, addr, &w).await;
        let src = tempfile::tempdir().unwrap();

        // 1. Throughput.
        let big = file(src.path(), "big.bin", gib, 1);
        let (mut ours, mut raw, mut hashing) = (Vec::new(), Vec::new(), Vec::new());
        let (mut ours_cpu, mut raw_cpu) = (Vec::new(), Vec::new());
        let gib_f = gib as f64 / (1u64 << 30) as f64;
        for i in 0..3 {
            let c0 = cpu_seconds();
            raw.push(gib as f64 / raw_quinn::raw_transfer(gib as usize).await / 1e9);
            raw_cpu.push((cpu_seconds() - c0) / gib_f);
            let (h, s, cpu) = send_timed(&w, &p, &big).await;
            hashing.push(gib as f64 / h / 1e9);
            ours.push(gib as f64 / s / 1e9);
            ours_cpu.push(cpu / gib_f);
            let _ = std::fs::remove_file(
                ps.dir
                    .path()
                    .join("files")
                    .join(if i == 0 { "big.bin".into() } else { format!("big ({i}).bin") }),
            );
        }
        let (o, r) = (median(ours.clone()), median(raw.clone()));
        println!("## File transfer over QUIC on 127.0.0.1\n");
        println!("| what | ours | raw quinn, one stream | ratio |\n|---|---|---|---|");
        println!(
            "| {} MiB worker → primary, verified, in place (median of 3) | {o:.3} GB/s ({:.3}–{:.3}) | {r:.3} GB/s ({:.3}–{:.3}) | **{:.2}** |",
            gib >> 20,
            ours.iter().copied().fold(f64::MAX, f64::min),
            ours.iter().copied().fold(0.0, f64::max),
            raw.iter().copied().fold(f64::MAX, f64::min),
            raw.iter().copied().fold(0.0, f64::max),
            o / r
        );
        let (oc, rc) = (median(ours_cpu), median(raw_cpu));
        println!(
            "| CPU seconds per GiB moved (user + system, both ends, median) | {oc:.2} s | {rc:.2} s | {:.2} |",
            oc / rc
        );
        println!(
            "\nhashing the file once before offering it (the outboard): {:.3} GB/s (median)",
            median(hashing)
        );
        println!(
            "\nOn 2 cores with both ends in one process, the throughput ours could reach if \
             it kept both cores as busy as raw quinn does is raw × (raw CPU / our CPU) = {:.2}× raw \
             (measured: {:.2}×).\n",
            rc / oc,
            o / r
        );

        // 4. Memory while moving 2 GiB (in the full run).
        let two = if full { 2u64 << 30 } else { 64 << 20 };
        let huge = file(src.path(), "huge.bin", two, 4);
        reset_peak_rss();
        let before = peak_rss_kib();
        let (_, s) = send(&w, &p, &huge).await;
        let peak = peak_rss_kib();
        println!(
            "| peak RSS of sender + receiver (one process) moving {} MiB | {} MiB (at the start: {} MiB) | {:.3} GB/s |\n|---|---|---|\n",
            two >> 20,
            peak / 1024,
            before / 1024,
            two as f64 / s / 1e9
        );
        let _ = std::fs::remove_file(huge);
        let _ = std::fs::remove_file(ps.dir.path().join("files").join("huge.bin"));

        // 3. Fairness: 10 at once.
        let each = if full { 64u64 << 20 } else { 4 << 20 };
        let paths: Vec<PathBuf> = (0..10)
            .map(|i| file(src.path(), &format!("f{i}.bin"), each, 10 + i))
            .collect();
        let started = Instant::now();
        let mut runs = Vec::new();
        for path in &paths {
            let (w, p, path) = (w.clone(), p.clone(), path.clone());
            runs.push(tokio::spawn(async move { send(&w, &p, &path).await }));
        }
        let mut times = Vec::new();
        for r in runs {
            times.push(r.await.unwrap().1);
        }
        let all = started.elapsed().as_secs_f64();
        let (fast, slow) = (
            times.iter().copied().fold(f64::MAX, f64::min),
            times.iter().copied().fold(0.0, f64::max),
        );
        println!(
            "| 10 transfers of {} MiB at once | fastest {fast:.2} s, slowest {slow:.2} s | slowest/fastest **{:.2}** | {:.3} GB/s together |\n|---|---|---|---|\n",
            each >> 20,
            slow / fast,
            (10 * each) as f64 / all / 1e9
        );

        // 2. Resume overhead: the primary goes away half way.
        let quarter = if full { 256u64 << 20 } else { 16 << 20 };
        let mid = file(src.path(), "mid.bin", quarter, 7);
        let served_before = w.files_stats().unwrap().bytes_served;
        let t = w.send_file(&mid, p.node_id()).await.unwrap();
        loop {
            if p.transfer(&t.id)
                .unwrap()
                .is_some_and(|x| x.received >= quarter / 2)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        p.shutdown().await;
        drop(p);
        // What the worker served up to here reached the old process (or
        // was lost in flight with it).
        tokio::time::sleep(Duration::from_millis(200)).await;
        let served_then = w.files_stats().unwrap().bytes_served;
        let (p, _) = primary(&ps, addr);
        let info = tokio::time::timeout(Duration::from_secs(300), w.wait_transfer(t.id))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(info.state, TransferState::Done, "{info:?}");
        let served_after = w.files_stats().unwrap().bytes_served - served_then;
        // The new process counts only what it took after the restart:
        // exactly what it lacked.
        let missing = p.files_stats().unwrap().bytes_verified;
        let served_all = w.files_stats().unwrap().bytes_served - served_before;
        println!(
            "| {} MiB, the primary restarted half way | lacked after the restart: {missing} bytes | served after the restart: {served_after} bytes | **{:.4}x** what was lacking (hash pairs are 0.0039x) | served in all: {:.4}x the file |\n|---|---|---|---|---|",
            quarter >> 20,
            served_after as f64 / missing.max(1) as f64,
            served_all as f64 / quarter as f64
        );
        w.shutdown().await;
        p.shutdown().await;
    });
}
