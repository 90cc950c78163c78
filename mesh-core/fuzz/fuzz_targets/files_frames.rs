//! Arbitrary bytes as what a files peer sends: control messages, range
//! requests, and data answers taken into a partial file. No input may
//! panic; a message that parses re-encodes to bytes that parse to the same
//! message; an answer that does not match the root hash never leaves a
//! group counted as verified that does not verify.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mesh_core::files::verify::{Receiving, hash_file};
use mesh_core::files::{FileFrame, FileHash, GroupSet, RangeRequest, groups_of};

struct Fixture {
    _dir: tempfile::TempDir,
    part: std::path::PathBuf,
    outboard: std::path::PathBuf,
    hash: FileHash,
    size: u64,
}

/// A real 5-group file and its hash: answers are checked against it.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let data: Vec<u8> = (0..5 * 16 * 1024 + 77).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let (hash, size) = hash_file(&src, &dir.path().join("src.obao")).unwrap();
        Fixture {
            part: dir.path().join("part"),
            outboard: dir.path().join("part.obao"),
            _dir: dir,
            hash,
            size,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = FileFrame::decode(data) {
        assert_eq!(FileFrame::decode(&frame.encode()), Ok(frame));
    }
    if let Ok(req) = RangeRequest::decode(data) {
        let _ = req.check_size(1 << 30);
        let wire = req.encode();
        assert_eq!(RangeRequest::decode(&wire[2..]), Ok(req));
    }
    if data.len() >= 2 {
        let _ = RangeRequest::body_len([data[0], data[1]]);
    }
    // The bytes as the answer to a request for everything.
    let f = fixture();
    let total = groups_of(f.size);
    let Ok(mut rx) = Receiving::open(&f.part, &f.outboard, f.hash, f.size) else {
        return;
    };
    let mut have = GroupSet::new();
    let _ = rx.take(&[(0, total)], data, |g, _| {
        have.insert(g);
        true
    });
    // Whatever was taken verifies on disk.
    let found = rx.recover(&GroupSet::new()).unwrap();
    for &(s, e) in have.ranges() {
        for g in s..e {
            assert!(found.contains(g), "group {g} taken but does not verify");
        }
    }
});
