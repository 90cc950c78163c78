//! Identity on disk, sealed and signed messages through a byte stream, replay refusal.

use std::time::Duration;

use mesh_core::clock::{Clock, ManualClock, Timestamp};
use mesh_core::identity::NodeKey;
use mesh_core::wire::{
    Command, DEFAULT_MAX_FRAME_LEN, Destination, Envelope, FrameDecoder, JsonText, MessageId,
    Payload, ReplayConfig, ReplayError, ReplayGuard, WireError,
};

/// Decodes, verifies and admits every frame in `stream`, as a receiving node would.
fn receive(
    stream: &[u8],
    guard: &mut ReplayGuard,
    now: Timestamp,
) -> Vec<Result<mesh_core::wire::SignedEnvelope, WireError>> {
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
    let mut out = Vec::new();
    let mut rest = stream;
    // Feed in awkward 7-byte pieces, as a network might deliver them.
    while !rest.is_empty() {
        let piece = &rest[..rest.len().min(7)];
        let (used, frame) = decoder.feed(piece);
        rest = &rest[used..];
        if let Some(frame) = frame {
            out.push(
                frame
                    .map_err(WireError::from)
                    .and_then(|u| u.verify().map_err(WireError::from))
                    .and_then(|env| {
                        guard
                            .admit(&env, now)
                            .map(|()| env)
                            .map_err(WireError::from)
                    }),
            );
        }
    }
    out
}

#[test]
fn two_nodes_exchange_sealed_commands_through_a_stream() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, created) = NodeKey::load_or_generate(dir.path().join("primary.key")).unwrap();
    assert!(created);
    let (worker, _) = NodeKey::load_or_generate(dir.path().join("worker.key")).unwrap();
    // Restart: the same identities come back from disk.
    let primary = {
        let again = NodeKey::load(dir.path().join("primary.key")).unwrap();
        assert_eq!(again.node_id(), primary.node_id());
        again
    };

    let clock = ManualClock::new(Timestamp::from_millis(1_750_000_000_000));
    let command = Payload::Command(Command {
        command_id: MessageId::random(),
        name: "run_action".into(),
        args: JsonText::new(r#"{"action": "backup"}"#).unwrap(),
        timeout_ms: 30_000,
        usage: None,
    });
    let first = Envelope::new_sealed(primary.node_id(), worker.node_id(), clock.now(), &command)
        .unwrap()
        .sign(&primary)
        .unwrap();
    let mut stream = Vec::new();
    first
        .write_frame(&mut stream, DEFAULT_MAX_FRAME_LEN)
        .unwrap();
    // An attacker on the path replays the frame.
    first
        .write_frame(&mut stream, DEFAULT_MAX_FRAME_LEN)
        .unwrap();

    let mut guard = ReplayGuard::new(ReplayConfig::default().max_skew(Duration::from_secs(30)));
    let results = receive(&stream, &mut guard, clock.now());
    assert_eq!(results.len(), 2);
    let got = results[0].as_ref().unwrap();
    assert_eq!(got.envelope().from, primary.node_id());
    assert_eq!(got.envelope().to, Destination::Node(worker.node_id()));
    assert_eq!(got.envelope().open_sealed(&worker).unwrap(), command);
    assert!(matches!(
        results[1],
        Err(WireError::Replay(ReplayError::Replayed { .. }))
    ));

    // Captured traffic played back a minute later is stale, not merely a duplicate.
    clock.advance(Duration::from_secs(60));
    let mut fresh_guard =
        ReplayGuard::new(ReplayConfig::default().max_skew(Duration::from_secs(30)));
    let late = receive(&stream[..first.frame_len()], &mut fresh_guard, clock.now());
    assert!(matches!(
        late[0],
        Err(WireError::Replay(ReplayError::Stale { .. }))
    ));
}
