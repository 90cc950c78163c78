//! The README's two-terminal walkthrough, automated: the `primary` and
//! `worker` binaries over QUIC on 127.0.0.1 (mDNS off), administered with
//! `meshctl` through the primary's admin socket; then `kill -9` of the
//! primary and a restart that loses nothing acknowledged.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::{Running, eventually, meshctl, p};

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// `meshctl pairing approve CODE`, once the request is pending: the worker
/// prints its code as soon as the request is sent, a moment before the
/// primary has stored it.
fn approve(code: &str, d: &[&str; 2]) -> (i32, Value) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (rc, answer) = meshctl(&["pairing", "approve", code, d[0], d[1], "--json"]);
        if answer["error"]["kind"] != "not_found" || Instant::now() > deadline {
            return (rc, answer);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

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

#[test]
fn primary_worker_and_meshctl_pair_govern_and_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (pdir, wdir) = (dir.path().join("primary"), dir.path().join("worker"));
    let mut primary = start_primary(&pdir, "127.0.0.1:0");
    let connect = primary.wait_for("workers connect with:");
    let peer = connect.rsplit(' ').next().unwrap().to_owned();
    let port = peer.rsplit(':').next().unwrap().to_owned();
    let d = ["--data-dir", p(&pdir)];

    // Terminal 2: the worker asks to pair and shows its code.
    let worker = Running::start(
        env!("CARGO_BIN_EXE_worker"),
        &[
            "--data-dir",
            p(&wdir),
            "--connect",
            &peer,
            "--name",
            "laptop",
            "--device-id",
            "hw-laptop",
        ],
    );
    let code = worker.pairing_code();
    assert_eq!(code.len(), 6);

    // Terminal 1: meshctl sees the request and approves it with the code.
    let pending = eventually(&["pairing", "list", d[0], d[1], "--json"], |v| {
        v.as_array().is_some_and(|a| a.len() == 1)
    });
    assert_eq!(pending[0]["name"], "laptop");
    let (rc, wrong) = meshctl(&[
        "pairing",
        "approve",
        if code == "000000" { "000001" } else { "000000" },
        d[0],
        d[1],
        "--json",
    ]);
    assert_eq!(
        (rc, wrong["error"]["kind"].as_str()),
        (2, Some("pairing")),
        "{wrong}"
    );
    let (rc, approved) = approve(&code, &d);
    assert_eq!(rc, 0, "{approved}");
    worker.wait_for("paired");

    // The device is online with health from the worker's real metrics.
    let devices = eventually(&["devices", "list", d[0], d[1], "--json"], |v| {
        v[0]["online"] == true && v[0]["score"].is_u64()
    });
    assert_eq!(devices[0]["device_id"], "hw-laptop");
    // An approval-gated policy; the worker (restarted with --send) asks for `echo`.
    let policy = dir.path().join("policy.json");
    std::fs::write(
        &policy,
        r#"{"allowed_commands": ["echo"], "require_approval": true}"#,
    )
    .unwrap();
    let (rc, set) = meshctl(&[
        "policy",
        "set",
        "laptop",
        "--file",
        p(&policy),
        d[0],
        d[1],
        "--json",
    ]);
    assert_eq!(rc, 0, "{set}");
    let (rc, shown) = meshctl(&["policy", "show", "hw-laptop", d[0], d[1], "--json"]);
    assert_eq!(
        (rc, &shown["require_approval"]),
        (0, &serde_json::json!(true))
    );
    drop(worker);
    let worker = Running::start(
        env!("CARGO_BIN_EXE_worker"),
        &[
            "--data-dir",
            p(&wdir),
            "--name",
            "laptop",
            "--send",
            "echo",
            "--args",
            r#"{"hello": "primary"}"#,
        ],
    );
    let refused = worker.wait_for("command echo:");
    assert!(refused.contains("needs_approval"), "{refused}");
    let actions = eventually(&["actions", "list", d[0], d[1], "--json"], |v| {
        v.as_array().is_some_and(|a| a.len() == 1)
    });
    assert_eq!(actions[0]["state"], "proposed");
    let action = actions[0]["id"].as_str().unwrap().to_owned();
    let (rc, missing) = meshctl(&["devices", "revoke", "nobody", d[0], d[1], "--json"]);
    assert_eq!(
        (rc, missing["error"]["kind"].as_str()),
        (2, Some("not_found"))
    );
    let db = pdir.join("mesh.db");
    let (rc, report) = meshctl(&["ledger", "verify", "--db", p(&db)]);
    assert_eq!((rc, report["ok"].as_bool()), (0, Some(true)), "{report}");
    let acknowledged = report["records"].as_u64().unwrap();
    // Pairing, policy, the command's decision, the proposed action.
    assert!(acknowledged >= 4, "acknowledged changes recorded: {report}");

    // kill -9 during traffic (heartbeats), then restart on the same port.
    primary.kill();
    let (rc, gone) = meshctl(&["devices", "list", d[0], d[1], "--json"]);
    assert_eq!(
        (rc, gone["error"]["kind"].as_str()),
        (2, Some("unavailable"))
    );
    let _primary = start_primary(&pdir, &format!("127.0.0.1:{port}"));

    // Nothing acknowledged is lost, the ledger verifies, and the worker is back.
    let devices = eventually(&["devices", "list", d[0], d[1], "--json"], |v| {
        v[0]["online"] == true
    });
    assert_eq!(devices.as_array().unwrap().len(), 1);
    let (_, shown) = meshctl(&["policy", "show", "laptop", d[0], d[1], "--json"]);
    assert_eq!(shown["allowed_commands"], serde_json::json!(["echo"]));
    // The acknowledged action survived and can be approved now.
    let (rc, actions) = meshctl(&["actions", "list", d[0], d[1], "--json"]);
    assert_eq!(
        (rc, actions[0]["id"].as_str(), actions[0]["state"].as_str()),
        (0, Some(action.as_str()), Some("proposed"))
    );
    let (rc, done) = meshctl(&["actions", "approve", &action, d[0], d[1], "--json"]);
    assert_eq!(
        (rc, done["state"].as_str()),
        (0, Some("executed")),
        "{done}"
    );
    assert_eq!(done["result"], serde_json::json!({"hello": "primary"}));
    let (rc, report) = meshctl(&["ledger", "verify", "--db", p(&db)]);
    assert_eq!((rc, report["ok"].as_bool()), (0, Some(true)), "{report}");
    assert!(report["records"].as_u64().unwrap() >= acknowledged);
    // The worker keeps a ledger of its own (what it runs for its
    // primary): the primary holds a verified replica of it, pulled over
    // the session.
    let replicas = eventually(&["ledger", "replicas", d[0], d[1]], |v| {
        v["ledgers"]
            .as_array()
            .is_some_and(|l| l.iter().any(|x| x["author"] == devices[0]["node"]))
    });
    let theirs = replicas["ledgers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["author"] == devices[0]["node"])
        .unwrap();
    assert_eq!(
        (&theirs["own"], &theirs["fork"]),
        (&Value::Bool(false), &Value::Null)
    );

    // Revocation through meshctl ends the worker's session.
    let (rc, revoked) = meshctl(&["devices", "revoke", "laptop", d[0], d[1]]);
    assert_eq!(rc, 0, "{revoked}");
    worker.wait_for("revoked");
    let devices = eventually(&["devices", "list", d[0], d[1], "--json"], |v| {
        v[0]["revoked"] == true
    });
    assert_eq!(devices[0]["online"], false);
}

/// The fingerprint in the primary's banner "primary ID (FINGERPRINT)".
fn fingerprint_of(banner: &str) -> String {
    banner
        .rsplit('(')
        .next()
        .unwrap()
        .trim_end_matches(')')
        .to_owned()
}

/// A network namespace with only `lo` up, deleted on drop: mDNS stays
/// inside it (mdns-sd would otherwise use every interface of this machine).
struct Namespace(String);

impl Namespace {
    /// `None` without root or iproute2 (CI runs as root).
    fn create() -> Option<Namespace> {
        // Unique per test: tests of this binary run in parallel.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("mw{}-{n}", std::process::id());
        let ip = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ip(&["netns", "add", &name]) {
            return None;
        }
        let ns = Namespace(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]).then_some(ns)
    }

    /// [`Namespace::create`], or `None` after saying SKIPPED; under CI
    /// (which runs as root) a namespace that cannot be made is a failure,
    /// since a skip would hide one.
    fn create_or_skip() -> Option<Namespace> {
        let ns = Namespace::create();
        if ns.is_none() {
            assert!(
                std::env::var_os("CI").is_none(),
                "cannot run under CI: needs root and iproute2 to create a network namespace"
            );
            eprintln!("SKIPPED: needs root and iproute2 to create a network namespace");
        }
        ns
    }

    /// `bin args…` inside the namespace.
    fn start(&self, bin: &str, args: &[&str]) -> Running {
        let mut all = vec!["netns", "exec", &self.0, bin];
        all.extend_from_slice(args);
        Running::start("ip", &all)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// `worker --mdns` finds a `primary --mdns on` by itself (both restricted to
/// loopback, inside a namespace of their own), pairs with the code approved
/// through meshctl, and comes online.
#[test]
fn a_worker_finds_the_primary_over_mdns_and_pairs() {
    let Some(ns) = Namespace::create_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (pdir, wdir) = (dir.path().join("primary"), dir.path().join("worker"));
    let d = ["--data-dir", p(&pdir)];
    let primary = ns.start(
        env!("CARGO_BIN_EXE_primary"),
        &[
            "--data-dir",
            p(&pdir),
            "--listen",
            "127.0.0.1:0",
            "--mdns",
            "on",
            "--interface",
            "loopback",
        ],
    );
    // "primary ID (FINGERPRINT)": the worker pins that fingerprint.
    let fingerprint = fingerprint_of(&primary.wait_for("primary "));
    primary.wait_for("workers connect with:");
    let worker = ns.start(
        env!("CARGO_BIN_EXE_worker"),
        &[
            "--data-dir",
            p(&wdir),
            "--mdns",
            "--interface",
            "loopback",
            "--name",
            "tablet",
            "--primary-fingerprint",
            &fingerprint,
        ],
    );
    let found = worker.wait_for("found ");
    assert!(found.contains("127.0.0.1:"), "{found}");
    assert!(found.contains(&fingerprint), "{found}");
    assert!(found.contains("(pinned)"), "{found}");
    let code = worker.pairing_code();
    // The admin socket is a file: meshctl reaches it from outside the namespace.
    let (rc, approved) = approve(&code, &d);
    assert_eq!(rc, 0, "{approved}");
    worker.wait_for("paired");
    let devices = eventually(&["devices", "list", d[0], d[1], "--json"], |v| {
        v[0]["online"] == true
    });
    assert_eq!(devices[0]["name"], "tablet");
}

/// `--primary-fingerprint` pins the primary: a `--connect` naming another
/// node is refused before any connection, and a malformed fingerprint is a
/// usage error.
#[test]
fn a_worker_refuses_a_primary_that_is_not_the_pinned_one() {
    let dir = tempfile::tempdir().unwrap();
    let other = "aaaa-bbbb-cccc-dddd";
    let id = mesh_core::identity::NodeKey::generate().node_id();
    let out = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args([
            "--data-dir",
            p(&dir.path().join("w")),
            "--connect",
            &format!("{id}@127.0.0.1:9"),
            "--primary-fingerprint",
            other,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not aaaa-bbbb-cccc-dddd"), "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args([
            "--data-dir",
            p(&dir.path().join("w")),
            "--primary-fingerprint",
            "xyz",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("fingerprint"), "{stderr}");
}

/// Issue 14, defect 11: a primary listening on `[::1]` is reached by a
/// worker (whose endpoint is dual-stack): they pair and heartbeat over IPv6
/// only, inside a namespace whose loopback has no IPv4 address at all.
#[test]
fn a_worker_pairs_and_heartbeats_over_ipv6_only() {
    let Some(ns) = Namespace::create_or_skip() else {
        return;
    };
    let no_v4 = Command::new("ip")
        .args(["-n", &ns.0, "addr", "del", "127.0.0.1/8", "dev", "lo"])
        .status()
        .unwrap();
    assert!(no_v4.success());
    let dir = tempfile::tempdir().unwrap();
    let (pdir, wdir) = (dir.path().join("primary"), dir.path().join("worker"));
    let d = ["--data-dir", p(&pdir)];
    let primary = ns.start(
        env!("CARGO_BIN_EXE_primary"),
        &[
            "--data-dir",
            p(&pdir),
            "--listen",
            "[::1]:0",
            "--mdns",
            "off",
        ],
    );
    let hint = primary.wait_for("workers connect with:");
    let target = hint.rsplit(' ').next().unwrap().to_owned();
    assert!(target.contains("@[::1]:"), "{hint}");
    let worker = ns.start(
        env!("CARGO_BIN_EXE_worker"),
        &["--data-dir", p(&wdir), "--connect", &target, "--name", "v6"],
    );
    let code = worker.pairing_code();
    let (rc, approved) = approve(&code, &d);
    assert_eq!(rc, 0, "{approved}");
    worker.wait_for("paired");
    let devices = eventually(&["devices", "list", d[0], d[1], "--json"], |v| {
        v[0]["online"] == true && v[0]["health"] == "healthy"
    });
    assert_eq!(devices[0]["name"], "v6");
}

/// Issue 14, defect 11: two namespaces joined by a veth pair with IPv6
/// link-local addresses only (no IPv4 anywhere): `worker --mdns` finds the
/// primary's link-local address (with its interface scope) over IPv6
/// multicast, pairs, and heartbeats over it.
#[test]
fn a_worker_finds_and_pairs_over_ipv6_link_local_with_mdns() {
    let Some(ns1) = Namespace::create_or_skip() else {
        return;
    };
    let Some(ns2) = Namespace::create_or_skip() else {
        return;
    };
    let ip = |args: &[&str]| {
        let ok = Command::new("ip").args(args).status().unwrap().success();
        assert!(ok, "ip {args:?}");
    };
    let sysctl = |ns: &Namespace, key: &str| {
        let ok = Command::new("ip")
            .args(["netns", "exec", &ns.0, "sysctl", "-qw", key])
            .status()
            .unwrap()
            .success();
        assert!(ok, "sysctl {key}");
    };
    for ns in [&ns1, &ns2] {
        // Link-local addresses usable at once (no duplicate detection wait),
        // and no IPv4 on loopback either.
        sysctl(ns, "net.ipv6.conf.all.accept_dad=0");
        sysctl(ns, "net.ipv6.conf.default.accept_dad=0");
        ip(&["-n", &ns.0, "addr", "del", "127.0.0.1/8", "dev", "lo"]);
    }
    ip(&[
        "-n", &ns1.0, "link", "add", "mv0", "type", "veth", "peer", "name", "mv1", "netns", &ns2.0,
    ]);
    ip(&[
        "-n",
        &ns1.0,
        "addr",
        "add",
        "fe80::1/64",
        "dev",
        "mv0",
        "nodad",
    ]);
    ip(&[
        "-n",
        &ns2.0,
        "addr",
        "add",
        "fe80::2/64",
        "dev",
        "mv1",
        "nodad",
    ]);
    ip(&["-n", &ns1.0, "link", "set", "mv0", "up", "multicast", "on"]);
    ip(&["-n", &ns2.0, "link", "set", "mv1", "up", "multicast", "on"]);

    let dir = tempfile::tempdir().unwrap();
    let (pdir, wdir) = (dir.path().join("primary"), dir.path().join("worker"));
    let d = ["--data-dir", p(&pdir)];
    let primary = ns1.start(
        env!("CARGO_BIN_EXE_primary"),
        &[
            "--data-dir",
            p(&pdir),
            "--listen",
            "[::]:0",
            "--mdns",
            "on",
            "--interface",
            "mv0",
        ],
    );
    let fingerprint = fingerprint_of(&primary.wait_for("primary "));
    primary.wait_for("workers connect with:");
    let worker = ns2.start(
        env!("CARGO_BIN_EXE_worker"),
        &[
            "--data-dir",
            p(&wdir),
            "--mdns",
            "--interface",
            "mv1",
            "--name",
            "linklocal",
            "--primary-fingerprint",
            &fingerprint,
        ],
    );
    let found = worker.wait_for("found ");
    assert!(found.contains("fe80::"), "found over link-local: {found}");
    let code = worker.pairing_code();
    let (rc, approved) = approve(&code, &d);
    assert_eq!(rc, 0, "{approved}");
    worker.wait_for("paired");
    let devices = eventually(&["devices", "list", d[0], d[1], "--json"], |v| {
        v[0]["online"] == true && v[0]["health"] == "healthy"
    });
    assert_eq!(devices[0]["name"], "linklocal");
}
