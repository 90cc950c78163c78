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

    // Unknown subcommand: clap's usage error, also exit 2.
    let (code, _) = meshctl(&["frobnicate"]);
    assert_eq!(code, 2);
}
