//! Helpers shared by the test modules.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use mesh_core::events::{Event, Received, Subscription};

/// How long a test waits for something that should happen at once.
pub(crate) const WAIT: Duration = Duration::from_secs(10);

/// The next event of `kind` (others are skipped), within `within`.
pub(crate) async fn next(sub: &mut Subscription, kind: &str, within: Duration) -> Arc<Event> {
    tokio::time::timeout(within, async {
        loop {
            match sub.recv().await {
                Some(Received::Event(e)) if e.kind == kind => return e,
                Some(_) => continue,
                None => panic!("event bus closed"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {kind} event within {within:?}"))
}

/// Runs writer `bin` on `db` until it has acknowledged (printed
/// `committed N`) at least `target` (bounded wait), then kills it with
/// SIGKILL. Returns the last acknowledgement, counting those still in the
/// pipe, if any came.
pub(crate) fn run_and_kill(bin: &str, db: &Path, target: u64) -> Option<u64> {
    let mut child = Command::new(bin)
        .arg(db)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(n) = line.strip_prefix("committed ") {
                let _ = tx.send(n.parse::<u64>().unwrap());
            }
        }
    });
    let mut last = None;
    while let Ok(n) = rx.recv_timeout(Duration::from_secs(30)) {
        last = Some(n);
        if n >= target {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    reader.join().unwrap();
    while let Ok(n) = rx.try_recv() {
        last = Some(n);
    }
    last
}

/// A test that cannot run here (no root, no iproute2): says SKIPPED on a
/// developer's machine, but fails under CI (`CI` set), which runs as root:
/// there a skipped test would hide a broken one.
pub(crate) fn cannot_run(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("cannot run under CI: {why}");
    }
    eprintln!("SKIPPED: {why}");
}
