//! Arbitrary bytes as what a files peer sends: control messages, range
//! requests, data answers taken into a partial file, and media framing
//! (open messages, group headers, frame records into a receiver). No input
//! may panic; a message that parses re-encodes to bytes that parse to the same
//! message; an answer that does not match the root hash never leaves a
//! group counted as verified that does not verify.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mesh_core::files::verify::{Receiving, hash_file};
use mesh_core::files::{FileFrame, FileHash, GroupSet, RangeRequest, groups_of};
use mesh_core::media::{FrameRecord, GroupHeader, MediaOpen, MediaReceiver, ReceiverSettings};

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
        let _ = GroupHeader::body_len([data[0], data[1]]);
    }
    if let Ok(open) = MediaOpen::decode(data) {
        assert_eq!(MediaOpen::decode(&open.encode()), Ok(open));
    }
    if let Ok(h) = GroupHeader::decode(data) {
        let wire = h.encode();
        assert_eq!(GroupHeader::decode(&wire[2..]), Ok(h));
    }
    // The bytes as a run of frame records into a receiver.
    let mut receiver = MediaReceiver::new(ReceiverSettings::default());
    let mut rest = data;
    let mut now = 0u64;
    while rest.len() >= 4 {
        let Ok(n) = FrameRecord::rest_len([rest[0], rest[1], rest[2], rest[3]]) else {
            break;
        };
        let Some(body) = rest.get(4..4 + n) else { break };
        if let Ok(f) = FrameRecord::decode(body) {
            let mut again = Vec::new();
            f.encode_into(&mut again);
            assert_eq!(FrameRecord::decode(&again[4..]).as_ref(), Ok(&f));
            receiver.push(f, 100, now);
            let _ = receiver.poll(now);
        }
        now += 7;
        rest = &rest[4 + n..];
    }
    let _ = receiver.finish(now + 1_000);
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
