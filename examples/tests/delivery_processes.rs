//! Reliable delivery across crashes, with `primary` processes on
//! 127.0.0.1 over QUIC: a sender fills its outbox for a recipient that is
//! down, is killed with -9, and both restart; the recipient's application
//! gets every message exactly once.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Running, eventually, meshctl, p};

/// Starts a primary on `listen`; its node id and the address it bound.
fn start(dir: &Path, name: &str, listen: &str) -> (Running, String, String) {
    let run = Running::start(
        env!("CARGO_BIN_EXE_primary"),
        &[
            "--data-dir",
            p(dir),
            "--listen",
            listen,
            "--mdns",
            "off",
            "--name",
            name,
        ],
    );
    let first = run.wait_for("primary ");
    let id = first.split(' ').nth(1).unwrap().to_owned();
    let line = run.wait_for("listening on");
    let addr = line.split(' ').nth(2).unwrap().to_owned();
    (run, id, addr)
}

const N: usize = 40;

#[test]
fn a_sender_killed_with_a_full_outbox_still_delivers_each_message_exactly_once() {
    let root = tempfile::tempdir().unwrap();
    let (s_dir, r_dir) = (root.path().join("sender"), root.path().join("recipient"));
    let (mut sender, s_id, s_addr) = start(&s_dir, "sender", "127.0.0.1:0");
    let (mut recipient, r_id, r_addr) = start(&r_dir, "recipient", "127.0.0.1:0");
    let (rc, v) = meshctl(&["mesh", "token", "--data-dir", p(&s_dir)]);
    assert_eq!(rc, 0, "{v}");
    let (rc, v) = meshctl(&[
        "mesh",
        "join",
        v["token"].as_str().unwrap(),
        "--data-dir",
        p(&r_dir),
    ]);
    assert_eq!(rc, 0, "{v}");
    for dir in [&s_dir, &r_dir] {
        eventually(&["mesh", "peers", "--data-dir", p(dir)], |v| {
            v["peers"][0]["status"] == "active"
        });
    }
    // One message while both run: acknowledged.
    let (rc, v) = meshctl(&["deliver", "send", &r_id, "hello", "--data-dir", p(&s_dir)]);
    assert_eq!((rc, v["acknowledged"].as_bool()), (0, Some(true)), "{v}");
    let (rc, v) = meshctl(&[
        "deliver",
        "receive",
        "--wait",
        "5s",
        "--data-dir",
        p(&r_dir),
    ]);
    assert_eq!(rc, 0, "{v}");
    assert_eq!(v["messages"][0]["text"], "hello");
    assert_eq!(v["messages"][0]["from"], s_id.as_str());
    // Bad input: typed errors.
    let (rc, v) = meshctl(&[
        "deliver",
        "send",
        "not-a-node",
        "x",
        "--data-dir",
        p(&s_dir),
    ]);
    assert_eq!(
        (rc, v["error"]["kind"].as_str()),
        (2, Some("invalid_node_id")),
        "{v}"
    );

    // The recipient goes down; the sender's outbox fills, durably.
    recipient.kill();
    for i in 0..N {
        let text = format!("message {i:02}");
        let (rc, v) = meshctl(&[
            "deliver",
            "send",
            &r_id,
            &text,
            "--no-wait",
            "--data-dir",
            p(&s_dir),
        ]);
        assert_eq!((rc, v["acknowledged"].as_bool()), (0, Some(false)), "{v}");
    }
    let (rc, v) = meshctl(&["deliver", "status", "--data-dir", p(&s_dir)]);
    assert_eq!((rc, v["outbox"].as_u64()), (0, Some(N as u64)), "{v}");
    // The sender is killed too, then both come back where they were.
    sender.kill();
    let (_recipient, _, _) = start(&r_dir, "recipient", &r_addr);
    let (_sender, _, _) = start(&s_dir, "sender", &s_addr);

    let started = Instant::now();
    let mut texts = Vec::new();
    while texts.len() < N {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "only {} of {N} delivered: {texts:?}",
            texts.len()
        );
        let (rc, v) = meshctl(&[
            "deliver",
            "receive",
            "--wait",
            "1s",
            "--data-dir",
            p(&r_dir),
        ]);
        assert_eq!(rc, 0, "{v}");
        for m in v["messages"].as_array().unwrap() {
            texts.push(m["text"].as_str().unwrap().to_owned());
        }
    }
    println!(
        "{N} messages delivered {:?} after the restarts",
        started.elapsed()
    );
    let distinct: BTreeSet<&String> = texts.iter().collect();
    assert_eq!((texts.len(), distinct.len()), (N, N), "{texts:?}");
    // Nothing more arrives, and the sender's outbox empties.
    let (rc, v) = meshctl(&[
        "deliver",
        "receive",
        "--wait",
        "2s",
        "--data-dir",
        p(&r_dir),
    ]);
    assert_eq!(rc, 0);
    assert_eq!(v["messages"].as_array().unwrap().len(), 0, "{v}");
    eventually(&["deliver", "status", "--data-dir", p(&s_dir)], |v| {
        v["outbox"] == 0
    });
}
