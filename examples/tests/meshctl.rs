//! Black-box tests of the `meshctl` binary: its JSON and exit codes are a contract.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn meshctl(args: &[&str]) -> (i32, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .output()
        .expect("run meshctl");
    let stdout = String::from_utf8(out.stdout).expect("utf-8 output");
    let json = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), json)
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn identity_init_then_show() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("node.key");
    let (code, init) = meshctl(&["identity", "init", "--key", p(&key)]);
    assert_eq!(code, 0, "{init}");
    let id = init["node_id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 52);
    let (code, show) = meshctl(&["identity", "show", "--key", p(&key)]);
    assert_eq!(code, 0);
    assert_eq!(show["node_id"], id.as_str());
    assert_eq!(show["fingerprint"], init["fingerprint"]);
    let (code, parsed) = meshctl(&["identity", "parse", &id]);
    assert_eq!(code, 0);
    assert_eq!(parsed["fingerprint"], init["fingerprint"]);

    // A second init must not replace the identity.
    let (code, err) = meshctl(&["identity", "init", "--key", p(&key)]);
    assert_eq!(code, 2);
    assert_eq!(err["error"]["kind"], "already_exists");
    let (_, again) = meshctl(&["identity", "show", "--key", p(&key)]);
    assert_eq!(again["node_id"], id.as_str());
}

#[test]
fn identity_errors_are_json_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = meshctl(&["identity", "show", "--key", p(&dir.path().join("none"))]);
    assert_eq!(code, 2);
    assert_eq!(err["error"]["kind"], "not_found");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("meshctl identity init")
    );

    let (code, err) = meshctl(&["identity", "parse", "not-a-node-id"]);
    assert_eq!(code, 2);
    assert_eq!(err["error"]["kind"], "invalid_node_id");

    // Unknown subcommand, bad option values: usage errors, JSON, exit 2.
    let (code, err) = meshctl(&["frobnicate"]);
    assert_eq!(
        (code, err["error"]["kind"].as_str()),
        (2, Some("usage")),
        "{err}"
    );
    let (code, err) = meshctl(&["mesh", "token", "--ttl", "0s"]);
    assert_eq!(
        (code, err["error"]["kind"].as_str()),
        (2, Some("usage")),
        "{err}"
    );
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("more than zero")
    );
    let (code, err) = meshctl(&["mesh", "join"]);
    assert_eq!(
        (code, err["error"]["kind"].as_str()),
        (2, Some("usage")),
        "{err}"
    );
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn policy_check_prints_the_decision() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write(
        dir.path(),
        "policy.json",
        r#"{"allowed_commands": ["chat.*"], "blocked_commands": ["chat.admin.*"],
            "allowed_hours_utc": "09:00-17:00", "max_tokens_per_call": 1000}"#,
    );
    let office = write(
        dir.path(),
        "office.json",
        r#"{"now_utc": "2026-11-23T10:00:00Z", "tokens": 10}"#,
    );
    let (code, out) = meshctl(&[
        "policy",
        "check",
        "--policy",
        &policy,
        "--command",
        "chat.send",
        "--context",
        &office,
    ]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["decision"], "allow");
    assert_eq!(out["reason"], "allowed");
    assert!(out.get("defer_ms").is_none());

    let (code, out) = meshctl(&[
        "policy",
        "check",
        "--policy",
        &policy,
        "--command",
        "chat.admin.ban",
        "--context",
        &office,
    ]);
    assert_eq!(code, 0);
    assert_eq!(out["decision"], "deny");
    assert_eq!(out["reason"], "blocked_command");
    assert!(out["message"].as_str().unwrap().contains("chat.admin.*"));

    let night = write(
        dir.path(),
        "night.json",
        r#"{"now_utc": "2026-11-23T23:30:00+00:00"}"#,
    );
    let (_, out) = meshctl(&[
        "policy",
        "check",
        "--policy",
        &policy,
        "--command",
        "chat.send",
        "--context",
        &night,
    ]);
    assert_eq!(out["reason"], "outside_allowed_hours");

    let busy = write(
        dir.path(),
        "busy.json",
        r#"{"now_utc": "2026-11-23T10:00:00Z", "power": {"device_class": "laptop", "cpu_percent": 97}}"#,
    );
    let (code, out) = meshctl(&[
        "policy",
        "check",
        "--policy",
        &policy,
        "--command",
        "chat.send",
        "--context",
        &busy,
    ]);
    assert_eq!(code, 0);
    assert_eq!(out["decision"], "defer");
    assert_eq!(out["reason"], "cpu_busy");
    assert_eq!(out["defer_ms"], 5000);

    // Without --context: now, no usage, no power. This policy has no hour window.
    let open = write(
        dir.path(),
        "open.json",
        r#"{"allowed_commands": ["*"], "require_approval": true}"#,
    );
    let (code, out) = meshctl(&["policy", "check", "--policy", &open, "--command", "x"]);
    assert_eq!(code, 0);
    assert_eq!(out["decision"], "needs_approval");
    assert_eq!(out["reason"], "approval_required");
}

#[test]
fn policy_check_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(dir.path(), "good.json", r#"{"allowed_commands": ["*"]}"#);
    for (text, kind) in [
        (r#"{"allowed_commands": ["a[" ]}"#, "invalid_glob"),
        (r#"{"allowed_hours_utc": "9-17"}"#, "invalid_hour_window"),
        (r#"{"max_cost_per_hour": -1}"#, "invalid_limit"),
        (r#"{"allow": ["*"]}"#, "invalid_document"),
    ] {
        let bad = write(dir.path(), "bad.json", text);
        let (code, out) = meshctl(&["policy", "check", "--policy", &bad, "--command", "x"]);
        assert_eq!(code, 2, "{text}");
        assert_eq!(out["error"]["kind"], kind, "{text}");
        assert!(!out["error"]["message"].as_str().unwrap().is_empty());
    }
    let bad_ctx = write(
        dir.path(),
        "ctx.json",
        r#"{"power": {"battery_percent": 140}}"#,
    );
    let (code, out) = meshctl(&[
        "policy",
        "check",
        "--policy",
        &good,
        "--command",
        "x",
        "--context",
        &bad_ctx,
    ]);
    assert_eq!(code, 2);
    assert_eq!(out["error"]["kind"], "invalid_context");
    let (code, out) = meshctl(&[
        "policy",
        "check",
        "--policy",
        "/nonexistent/p.json",
        "--command",
        "x",
    ]);
    assert_eq!(code, 2);
    assert_eq!(out["error"]["kind"], "io");
}

#[test]
fn health_score_of_a_single_report() {
    let dir = tempfile::tempdir().unwrap();
    // The source design's worked example: the table gives 90, not 60.
    let example = write(
        dir.path(),
        "example.json",
        r#"{"latency_ms": 2000, "battery_percent": 30, "memory_percent": 85}"#,
    );
    let (code, out) = meshctl(&["health", "score", "--report", &example]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out, serde_json::json!({"score": 90, "status": "healthy"}));

    let bad_day = write(
        dir.path(),
        "bad.json",
        r#"{"latency_ms": 6000, "battery_percent": 5, "memory_percent": 97, "cpu_percent": 99,
            "charging": false, "thermal": "serious", "low_power_mode": true, "messages_pending": 3}"#,
    );
    let (code, out) = meshctl(&["health", "score", "--report", &bad_day]);
    assert_eq!(code, 0);
    assert_eq!(out, serde_json::json!({"score": 30, "status": "degraded"}));

    let empty = write(dir.path(), "empty.json", "{}");
    let (_, out) = meshctl(&["health", "score", "--report", &empty]);
    assert_eq!(out, serde_json::json!({"score": 100, "status": "healthy"}));
}

#[test]
fn health_score_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    for (text, kind) in [
        (r#"{"battery_percent": 140}"#, "invalid_metric"),
        (r#"{"latency_ms": -1}"#, "invalid_metric"),
        (r#"{"thermal": "toasty"}"#, "invalid_report"),
        ("not json", "invalid_report"),
    ] {
        let f = write(dir.path(), "r.json", text);
        let (code, out) = meshctl(&["health", "score", "--report", &f]);
        assert_eq!(code, 2, "{text}");
        assert_eq!(out["error"]["kind"], kind, "{text}");
    }
    let (code, out) = meshctl(&["health", "score", "--report", "/nonexistent.json"]);
    assert_eq!((code, out["error"]["kind"].as_str()), (2, Some("io")));
}

#[test]
fn ledger_append_show_verify_and_a_tampered_record() {
    use mesh_core::storage::{SqliteStorage, Storage, Table, Write};

    let dir = tempfile::tempdir().unwrap();
    let (db, key) = (dir.path().join("ledger.db"), dir.path().join("node.key"));
    for i in 0..5 {
        let body = format!(r#"{{"device": "dev-{i}", "decision": "allow"}}"#);
        let (code, out) = meshctl(&[
            "ledger",
            "append",
            "--db",
            p(&db),
            "--key",
            p(&key),
            "--type",
            "command.decided",
            "--body",
            &body,
        ]);
        assert_eq!(code, 0, "{out}");
        assert_eq!(out["seq"], i);
        assert_eq!(out["records"], i + 1);
    }
    // The key file was created once and reused.
    let (_, who) = meshctl(&["identity", "show", "--key", p(&key)]);
    let (code, shown) = meshctl(&[
        "ledger",
        "show",
        "--db",
        p(&db),
        "--from",
        "1",
        "--limit",
        "2",
    ]);
    assert_eq!(code, 0, "{shown}");
    assert_eq!(shown["author"], who["node_id"]);
    let records = shown["records"].as_array().unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(records[0]["seq"], 1);
    assert_eq!(records[0]["type"], "command.decided");
    assert_eq!(records[1]["body"]["device"], "dev-2");
    assert_eq!(records[0]["actor"], who["node_id"]);

    let (code, report) = meshctl(&["ledger", "verify", "--db", p(&db)]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(
        report,
        serde_json::json!({"ok": true, "records": 5, "first_bad": null, "problem": null})
    );

    // Edit record 2's body in the database behind the ledger's back.
    {
        let store = SqliteStorage::open(&db).unwrap();
        let rows = store.list(Table::LedgerRecords).unwrap();
        let (k, mut body) = rows[2].clone();
        let at = body.len() - 10;
        body[at] ^= 0x01;
        store
            .apply(&[Write::Put {
                table: Table::LedgerRecords,
                key: k,
                body,
            }])
            .unwrap();
    }
    let (code, report) = meshctl(&["ledger", "verify", "--db", p(&db)]);
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["ok"], false);
    assert_eq!(report["records"], 5);
    assert_eq!(report["first_bad"], 2);
    assert!(
        report["problem"]
            .as_str()
            .unwrap()
            .starts_with("body edited"),
        "{report}"
    );
    // A damaged ledger is not extended.
    let (code, err) = meshctl(&[
        "ledger",
        "append",
        "--db",
        p(&db),
        "--key",
        p(&key),
        "--type",
        "policy.set",
        "--body",
        "{}",
    ]);
    assert_eq!(
        (code, err["error"]["kind"].as_str()),
        (2, Some("damaged")),
        "{err}"
    );
}

#[test]
fn ledger_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let (db, key) = (dir.path().join("l.db"), dir.path().join("k.key"));
    let append = |ty: &str, body: &str| {
        meshctl(&[
            "ledger",
            "append",
            "--db",
            p(&db),
            "--key",
            p(&key),
            "--type",
            ty,
            "--body",
            body,
        ])
    };
    let (code, err) = append("policy.set", "{not json");
    assert_eq!(
        (code, err["error"]["kind"].as_str()),
        (2, Some("invalid_entry"))
    );
    let (code, err) = append("Bad Type", "{}");
    assert_eq!(
        (code, err["error"]["kind"].as_str()),
        (2, Some("invalid_entry"))
    );
    let (code, err) = append("ledger.checkpoint", "{}");
    assert_eq!(
        (code, err["error"]["kind"].as_str()),
        (2, Some("invalid_entry"))
    );
    assert!(
        !db.exists() && !key.exists(),
        "refused input must not create files"
    );
    let missing = dir.path().join("missing.db");
    let (code, err) = meshctl(&["ledger", "verify", "--db", p(&missing)]);
    assert_eq!((code, err["error"]["kind"].as_str()), (2, Some("io")));
    assert!(!missing.exists(), "verify must not create a database");
    let (code, _) = meshctl(&["ledger", "verify"]);
    assert_eq!(code, 2, "usage error");
    let (code, _) = append("policy.set", r#"{"device": "d"}"#);
    assert_eq!(code, 0);
    let (code, err) = meshctl(&["ledger", "show", "--db", p(&db), "--author", "nope"]);
    assert_eq!(
        (code, err["error"]["kind"].as_str()),
        (2, Some("invalid_node_id"))
    );
}
