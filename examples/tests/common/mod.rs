//! What the binary tests share: running binaries, calling `meshctl`.
#![allow(dead_code, clippy::unwrap_used)] // each test binary uses part of it

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running binary whose stdout lines arrive on a channel.
pub(crate) struct Running {
    child: Child,
    pub(crate) lines: mpsc::Receiver<String>,
}

impl Running {
    pub(crate) fn start(bin: &str, args: &[&str]) -> Running {
        let mut child = Command::new(bin)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running { child, lines }
    }

    /// The first line containing `needle`, within 20 s.
    pub(crate) fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .expect(needle);
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no line with {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// The 6-digit code a worker prints.
    pub(crate) fn pairing_code(&self) -> String {
        let line = self.wait_for("pairing code:");
        line.rsplit(' ').next().unwrap().to_owned()
    }

    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(crate) fn meshctl(args: &[&str]) -> (i32, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_str(text.trim()).unwrap_or(Value::Null),
    )
}

pub(crate) fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Polls `meshctl` until `check` holds (bounded).
pub(crate) fn eventually(args: &[&str], check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, v) = meshctl(args);
        if code == 0 && check(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{args:?} never satisfied; last answer {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
