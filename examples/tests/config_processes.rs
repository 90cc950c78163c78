//! Five `primary` processes on 127.0.0.1 in one mesh share their
//! configuration: two are killed with -9 right after writing (so their
//! last writes may not have left them), the other three write while they
//! are down (some of the same keys), the two restart from their data
//! directories and write again; within 5 s every member prints the same
//! `meshctl config list`.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Running, eventually, meshctl, p};
use serde_json::Value;

const N: usize = 5;

fn start(dir: &Path, name: &str) -> Running {
    let run = Running::start(
        env!("CARGO_BIN_EXE_primary"),
        &[
            "--data-dir",
            p(dir),
            "--listen",
            "127.0.0.1:0",
            "--mdns",
            "off",
            "--name",
            name,
        ],
    );
    run.wait_for("listening on");
    run
}

fn set(dir: &Path, key: &str, value: &str) -> Value {
    let (rc, v) = meshctl(&["config", "set", key, value, "--data-dir", p(dir)]);
    assert_eq!(rc, 0, "config set {key}: {v}");
    v
}

fn list(dir: &Path) -> Value {
    let (rc, v) = meshctl(&["config", "list", "--data-dir", p(dir)]);
    assert_eq!(rc, 0, "config list: {v}");
    v
}

#[test]
fn five_primaries_converge_on_one_config_after_two_are_killed_and_restarted() {
    let root = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..N).map(|i| root.path().join(format!("m{i}"))).collect();
    let mut runs: Vec<Running> = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        runs.push(start(dir, &format!("m{i}")));
        if i > 0 {
            let (rc, v) = meshctl(&["mesh", "token", "--data-dir", p(&dirs[i - 1])]);
            assert_eq!(rc, 0, "{v}");
            let t = v["token"].as_str().unwrap().to_owned();
            let (rc, v) = meshctl(&["mesh", "join", &t, "--data-dir", p(dir)]);
            assert_eq!(rc, 0, "{v}");
        }
    }
    for dir in &dirs {
        eventually(&["mesh", "peers", "--data-dir", p(dir)], |v| {
            v["peers"]
                .as_array()
                .is_some_and(|a| a.iter().filter(|x| x["status"] == "active").count() == N - 1)
        });
    }

    // The contract's shapes.
    let v = set(&dirs[0], "site", r#"{"name": "lab", "floor": 3}"#);
    assert_eq!(v["key"], "site");
    assert_eq!(v["value"]["floor"], 3);
    assert!(
        v["version"]["hlc"]
            .as_str()
            .is_some_and(|h| h.contains('.'))
    );
    assert!(v["version"]["node"].as_str().is_some());
    let (rc, v) = meshctl(&["config", "get", "nope", "--data-dir", p(&dirs[1])]);
    assert_eq!(
        (rc, v["error"]["kind"].as_str()),
        (2, Some("not_found")),
        "{v}"
    );
    let (rc, v) = meshctl(&["config", "set", "k", "{not json", "--data-dir", p(&dirs[1])]);
    assert_eq!(rc, 2, "{v}");
    assert!(v["error"]["kind"].is_string());
    eventually(&["config", "get", "site", "--data-dir", p(&dirs[4])], |v| {
        v["value"]["name"] == "lab"
    });

    // Members 3 and 4 write, and are killed at once.
    for i in [3, 4] {
        set(&dirs[i], "shared", &format!("\"from m{i}\""));
        set(&dirs[i], &format!("only.m{i}"), &i.to_string());
        runs[i].kill();
    }
    // The other side writes while they are down, some keys the same.
    for (i, dir) in dirs.iter().enumerate().take(3) {
        set(dir, &format!("only.m{i}"), &i.to_string());
    }
    set(&dirs[1], "shared", "\"from m1\"");
    set(&dirs[2], "only.m3", "\"overwritten by m2\"");
    let (rc, v) = meshctl(&["config", "delete", "site", "--data-dir", p(&dirs[0])]);
    assert_eq!(rc, 0, "{v}");

    // They restart and write again.
    for i in [3, 4] {
        runs[i] = start(&dirs[i], &format!("m{i}"));
    }
    let restarted = Instant::now();
    set(&dirs[4], "after.restart", "true");
    let converged = loop {
        let mut lists: Vec<Value> = dirs.iter().map(|d| list(d)).collect();
        if lists.iter().all(|l| *l == lists[0])
            && lists[0]["entries"].as_array().unwrap().len() == 7
        {
            break lists.swap_remove(0);
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(20),
            "no agreement within 20 s: {lists:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = restarted.elapsed();
    println!("all {N} print the same config list {took:?} after the restart: {converged}");
    assert!(took <= Duration::from_secs(5), "took {took:?}");
    let entries = converged["entries"].as_array().unwrap();
    let keys: Vec<&str> = entries.iter().map(|e| e["key"].as_str().unwrap()).collect();
    assert_eq!(
        keys,
        [
            "after.restart",
            "only.m0",
            "only.m1",
            "only.m2",
            "only.m3",
            "only.m4",
            "shared"
        ]
    );
    // The later writes won.
    assert_eq!(entries[4]["value"], "overwritten by m2");
    assert_eq!(entries[6]["value"], "from m1");

    // Ledgers: m0 holds a replica of every other member's.
    let v = eventually(&["ledger", "replicas", "--data-dir", p(&dirs[0])], |v| {
        v["ledgers"].as_array().is_some_and(|l| l.len() == N)
    });
    let ledgers = v["ledgers"].as_array().unwrap();
    assert_eq!(
        ledgers.iter().filter(|l| l["own"] == true).count(),
        1,
        "{v}"
    );
    assert!(ledgers.iter().all(|l| l["fork"].is_null()), "{v}");
    // Status: every member listed with nothing pending, once synced.
    let (rc, v) = meshctl(&["sync", "now", "--data-dir", p(&dirs[0])]);
    assert_eq!(rc, 0, "{v}");
    eventually(&["sync", "status", "--data-dir", p(&dirs[0])], |v| {
        v["peers"].as_array().is_some_and(|a| {
            a.len() == N - 1
                && a.iter()
                    .all(|x| x["pending"] == 0 && x["last_sync_ms"].as_u64().is_some())
        })
    });
}
