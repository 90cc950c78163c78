//! Twenty `primary` processes on 127.0.0.1 form a mesh through a chain of
//! join tokens (each issued by a different member, half used with
//! `primary --join`, half with `meshctl mesh join`), then: a rename, a
//! block and a graceful leave reach every member within 2 s; a `kill -9`'d
//! member is `suspect` or `inactive` everywhere within 10 s, and `active`
//! again within 10 s of its restart. Times are taken from the members' own
//! event lines (`primary --json`), so polling adds nothing to them.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Running, eventually, meshctl, p};
use serde_json::Value;

const N: usize = 20;

struct Member {
    dir: PathBuf,
    run: Running,
    id: String,
}

fn start(dir: &Path, name: &str, join: Option<&str>) -> Running {
    let mut args = vec![
        "--data-dir",
        p(dir),
        "--listen",
        "127.0.0.1:0",
        "--mdns",
        "off",
        "--name",
        name,
        "--json",
    ];
    if let Some(t) = join {
        args.extend(["--join", t]);
    }
    Running::start(env!("CARGO_BIN_EXE_primary"), &args)
}

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

fn token(dir: &Path) -> String {
    let (rc, v) = meshctl(&["mesh", "token", "--ttl", "10m", "--data-dir", p(dir)]);
    assert_eq!(rc, 0, "{v}");
    v["token"].as_str().unwrap().to_owned()
}

/// The time (`at_ms`) of `member`'s first event of `kinds` about `node`
/// satisfying `extra`, within `within`.
fn event_at(
    member: &Member,
    kinds: &[&str],
    node: &str,
    within: Duration,
    extra: impl Fn(&Value) -> bool,
) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = member.run.lines.recv_timeout(left).unwrap_or_else(|_| {
            panic!("{}: no {kinds:?} about {node} within {within:?}", member.id)
        });
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let kind = v["kind"].as_str().unwrap_or("");
        if kinds.contains(&kind) && v["data"]["node"] == node && extra(&v["data"]) {
            return v["at_ms"].as_u64().unwrap();
        }
    }
}

/// The slowest of `members` (all but `except`) to report `kinds` about
/// `node` after `since`, in milliseconds.
fn slowest(
    members: &[Member],
    except: &[usize],
    kinds: &[&str],
    node: &str,
    since: u64,
    extra: impl Fn(&Value) -> bool + Copy,
) -> u64 {
    let mut times: Vec<u64> = members
        .iter()
        .enumerate()
        .filter(|(i, _)| !except.contains(i))
        .map(|(_, m)| {
            event_at(m, kinds, node, Duration::from_secs(30), extra).saturating_sub(since)
        })
        .collect();
    times.sort_unstable();
    println!("{kinds:?}: {times:?} ms");
    times.last().copied().unwrap()
}

fn statuses(dir: &Path, node: &str) -> Option<String> {
    let (rc, v) = meshctl(&["mesh", "peers", "--data-dir", p(dir)]);
    assert_eq!(rc, 0, "{v}");
    v["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["node_id"] == node)
        .map(|x| x["status"].as_str().unwrap().to_owned())
}

#[test]
fn twenty_primaries_form_a_mesh_and_see_renames_blocks_leaves_and_crashes_in_time() {
    let root = tempfile::tempdir().unwrap();
    let mut members: Vec<Member> = Vec::new();
    for i in 0..N {
        let dir = root.path().join(format!("m{i}"));
        let name = format!("m{i}");
        // Each joins through the member before it: tokens from 19 members.
        let t = (i > 0).then(|| token(&members[i - 1].dir));
        let by_flag = i % 2 == 1;
        let run = start(&dir, &name, t.as_deref().filter(|_| by_flag));
        let first = run.wait_for("primary ");
        let id = first.split(' ').nth(1).unwrap().to_owned();
        run.wait_for("listening on");
        if let Some(t) = t.as_deref().filter(|_| !by_flag) {
            let (rc, v) = meshctl(&["mesh", "join", t, "--data-dir", p(&dir)]);
            assert_eq!(rc, 0, "{v}");
            assert_eq!(v["joined"], true);
            assert!(v["peers"].as_u64().unwrap() >= 1);
        } else if by_flag {
            run.wait_for("joined the mesh");
        }
        members.push(Member { dir, run, id });
    }
    let ids: Vec<String> = members.iter().map(|m| m.id.clone()).collect();
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), N);

    // Everyone comes to know everyone, active.
    let formed = Instant::now();
    for m in &members {
        eventually(&["mesh", "peers", "--data-dir", p(&m.dir)], |v| {
            v["peers"]
                .as_array()
                .is_some_and(|a| a.iter().filter(|x| x["status"] == "active").count() == N - 1)
        });
    }
    println!(
        "all {N} members active everywhere {:?} after the last join",
        formed.elapsed()
    );
    // A used token cannot be used again, by anyone.
    let t = token(&members[0].dir);
    let (rc, _) = meshctl(&["mesh", "join", &t, "--data-dir", p(&members[1].dir)]);
    assert_eq!(rc, 0);
    let (rc, v) = meshctl(&["mesh", "join", &t, "--data-dir", p(&members[2].dir)]);
    assert_eq!(
        (rc, v["error"]["kind"].as_str()),
        (2, Some("token_used")),
        "{v}"
    );
    let (rc, v) = meshctl(&["mesh", "tokens", "--data-dir", p(&members[0].dir)]);
    assert_eq!(rc, 0);
    let used = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["used_by"] == ids[2] || x["used_by"] == ids[1])
        .unwrap();
    assert_eq!(used["status"], "used");
    assert!(used.get("secret").is_none() && used.get("token").is_none());

    // Rename.
    let t0 = now_ms();
    let (rc, v) = meshctl(&[
        "mesh",
        "rename",
        "renamed-5",
        "--data-dir",
        p(&members[5].dir),
    ]);
    assert_eq!(rc, 0, "{v}");
    let took = slowest(&members, &[5], &["peer.renamed"], &ids[5], t0, |d| {
        d["new"] == "renamed-5"
    });
    println!("rename reached all {} others in {took} ms", N - 1);
    assert!(took <= 2_000, "rename took {took} ms");

    // Block m7 (by m3), then unblock.
    let t0 = now_ms();
    let (rc, v) = meshctl(&[
        "mesh",
        "block",
        &ids[7],
        "--reason",
        "test",
        "--data-dir",
        p(&members[3].dir),
    ]);
    assert_eq!(rc, 0, "{v}");
    let by = ids[3].clone();
    let took = slowest(&members, &[7], &["peer.blocklisted"], &ids[7], t0, |d| {
        d["by"] == by.as_str()
    });
    println!("block reached all {} others in {took} ms", N - 2);
    assert!(took <= 2_000, "block took {took} ms");
    let (_, v) = meshctl(&["mesh", "peers", "--data-dir", p(&members[12].dir)]);
    assert_eq!(v["blocked"][0]["node_id"], ids[7].as_str());
    assert_eq!(v["blocked"][0]["by"], ids[3].as_str());
    let (rc, v) = meshctl(&["mesh", "unblock", &ids[7], "--data-dir", p(&members[3].dir)]);
    assert_eq!(rc, 0, "{v}");
    slowest(&members, &[7], &["peer.unblocked"], &ids[7], t0, |_| true);

    // Graceful leave of m11.
    let t0 = now_ms();
    let (rc, v) = meshctl(&["mesh", "leave", "--data-dir", p(&members[11].dir)]);
    assert_eq!(rc, 0, "{v}");
    let took = slowest(&members, &[11], &["peer.left"], &ids[11], t0, |d| {
        d["reason"] == "left"
    });
    println!("leave reached all {} others in {took} ms", N - 1);
    assert!(took <= 2_000, "leave took {took} ms");

    // kill -9 of m9: suspect or inactive everywhere within 10 s.
    let t0 = now_ms();
    members[9].run.kill();
    let took = slowest(
        &members,
        &[9, 11],
        &["peer.suspect", "peer.left"],
        &ids[9],
        t0,
        |_| true,
    );
    println!("kill -9 seen (suspect or inactive) by all others in {took} ms");
    assert!(took <= 10_000, "failure detection took {took} ms");

    // Restart it (a new port: its new identity carries the new address):
    // active again everywhere within 10 s.
    let t0 = now_ms();
    let dir9 = members[9].dir.clone();
    members[9].run = start(&dir9, "m9", None);
    members[9].run.wait_for("listening on");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut pending: Vec<usize> = (0..N).filter(|i| *i != 9 && *i != 11).collect();
    while !pending.is_empty() {
        pending.retain(|i| statuses(&members[*i].dir, &ids[9]).as_deref() != Some("active"));
        assert!(
            Instant::now() < deadline,
            "{pending:?} never saw m9 active again"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = now_ms() - t0;
    println!("restarted member active everywhere in {took} ms (polled)");
    assert!(took <= 10_000, "rejoin took {took} ms");
}
