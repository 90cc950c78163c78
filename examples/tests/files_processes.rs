//! A file from a worker to its primary through the reference binaries over
//! QUIC on 127.0.0.1: the primary is killed with -9 half way and
//! restarted; the transfer finishes by itself, the file's SHA-256 matches,
//! and what the primary holds after the restart was not sent again.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::{Running, meshctl, p};

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

fn start_primary(dir: &Path, listen: &str) -> Running {
    Running::start(
        env!("CARGO_BIN_EXE_primary"),
        &[
            "--data-dir",
            p(dir),
            "--listen",
            listen,
            "--mdns",
            "off",
            "--name",
            "Studio",
        ],
    )
}

/// Deterministic, incompressible bytes, written in pieces.
fn write_file(path: &Path, len: usize) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for b in buf.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x >> 32) as u8;
        }
        let n = left.min(buf.len());
        f.write_all(&buf[..n]).unwrap();
        left -= n;
    }
}

fn sha256(path: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return h.finalize().to_vec();
        }
        h.update(&buf[..n]);
    }
}

fn transfer(d: &[&str; 2]) -> Option<Value> {
    let (rc, list) = meshctl(&["files", "list", d[0], d[1]]);
    if rc != 0 {
        return None;
    }
    list["transfers"].as_array()?.first().cloned()
}

#[test]
fn a_file_survives_a_kill_9_of_the_primary_half_way() {
    let dir = tempfile::tempdir().unwrap();
    let (pdir, wdir) = (dir.path().join("primary"), dir.path().join("worker"));
    let size: u64 = 300_000_000;
    let src = dir.path().join("footage.raw");
    write_file(&src, size as usize);

    let mut primary = start_primary(&pdir, "127.0.0.1:0");
    let connect = primary.wait_for("workers connect with:");
    let peer = connect.rsplit(' ').next().unwrap().to_owned();
    let port = peer.rsplit(':').next().unwrap().to_owned();
    let d = ["--data-dir", p(&pdir)];

    // Pair a worker, give it the files scope and a policy allowing files.
    let worker = Running::start(
        env!("CARGO_BIN_EXE_worker"),
        &[
            "--data-dir",
            p(&wdir),
            "--connect",
            &peer,
            "--name",
            "camera",
        ],
    );
    let code = worker.pairing_code();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (rc, answer) = meshctl(&["pairing", "approve", &code, d[0], d[1], "--json"]);
        if rc == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{answer}");
        std::thread::sleep(Duration::from_millis(100));
    }
    worker.wait_for("paired");
    drop(worker);
    let (rc, scoped) = meshctl(&[
        "devices",
        "scopes",
        "camera",
        "presence:write",
        "events:write",
        "commands:run",
        "files:write",
        d[0],
        d[1],
    ]);
    assert_eq!(rc, 0, "{scoped}");
    let policy = dir.path().join("policy.json");
    std::fs::write(&policy, r#"{"allowed_commands": ["files.send"]}"#).unwrap();
    let (rc, set) = meshctl(&[
        "policy",
        "set",
        "camera",
        "--file",
        p(&policy),
        d[0],
        d[1],
        "--json",
    ]);
    assert_eq!(rc, 0, "{set}");

    // The worker sends the file.
    let worker = Running::start(
        env!("CARGO_BIN_EXE_worker"),
        &[
            "--data-dir",
            p(&wdir),
            "--name",
            "camera",
            "--send-file",
            p(&src),
        ],
    );
    let sending = worker.wait_for("sending footage.raw");
    assert!(sending.contains(&format!("({size} bytes")), "{sending}");

    // Half way, kill -9.
    let deadline = Instant::now() + Duration::from_secs(120);
    let before = loop {
        if let Some(t) = transfer(&d)
            && t["received"].as_u64().unwrap() >= size / 2
        {
            break t["received"].as_u64().unwrap();
        }
        assert!(Instant::now() < deadline, "no progress: {:?}", transfer(&d));
        std::thread::sleep(Duration::from_millis(20));
    };
    primary.kill();
    let _primary = start_primary(&pdir, &format!("127.0.0.1:{port}"));

    // It finishes by itself.
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut resumed_at = None;
    let done = loop {
        if let Some(t) = transfer(&d) {
            if resumed_at.is_none() {
                resumed_at = t["received"].as_u64();
            }
            if t["state"] == "done" {
                break t;
            }
            assert_ne!(t["state"], "failed", "{t}");
        }
        assert!(Instant::now() < deadline, "not done: {:?}", transfer(&d));
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(done["direction"], "in");
    assert_eq!(done["size"], size);
    assert_eq!(done["name"], "footage.raw");
    let landed = pdir.join("files").join("footage.raw");
    assert_eq!(sha256(&landed), sha256(&src));
    worker.wait_for("done");
    // After the restart the primary held (nearly) everything it had
    // verified before the kill: what was sent again is what was missing.
    let resumed_at = resumed_at.unwrap();
    println!("received before the kill: {before}; held after the restart: {resumed_at}");
    assert!(
        resumed_at + size / 50 >= before,
        "held {resumed_at} after the restart, had {before} before"
    );
}
