//! The worker's session machine, without sockets, on a controlled clock.

use std::time::Duration;

use super::*;
use crate::wire::{Command, EventPayload, JsonText, MessageId};

fn t(ms: u64) -> Timestamp {
    Timestamp::from_millis(ms)
}

fn drain(s: &mut WorkerSession) -> Vec<WorkerOutput> {
    std::iter::from_fn(|| s.poll_output()).collect()
}

fn session(msg: SessionMessage) -> Payload {
    Payload::Session(msg)
}

fn bye(reason: &str) -> Payload {
    session(SessionMessage::Bye {
        reason: reason.into(),
    })
}

fn command() -> Payload {
    Payload::Command(Command {
        command_id: MessageId::random(),
        name: "ping".into(),
        args: JsonText::null(),
        timeout_ms: 1000,
        usage: None,
    })
}

fn event(kind: &str) -> Payload {
    Payload::Event(EventPayload {
        kind: kind.into(),
        data: JsonText::null(),
    })
}

/// A session that said hello at 0 (welcome within 5 s, heartbeat every
/// second) and waits for the welcome.
fn hello() -> WorkerSession {
    let mut s = WorkerSession::new(
        t(0),
        [9; 32],
        Duration::from_secs(5),
        Duration::from_secs(1),
    );
    assert_eq!(
        drain(&mut s),
        vec![WorkerOutput::Send(session(SessionMessage::Hello {
            token: [9; 32]
        }))]
    );
    s
}

/// [`hello`], welcomed at 100: it sends its first heartbeat at once.
fn open() -> WorkerSession {
    let mut s = hello();
    assert!(!s.is_open());
    assert_eq!(s.poll_timeout(), Some(t(5000)));
    s.handle_message(session(SessionMessage::Welcome), t(100));
    assert_eq!(
        drain(&mut s),
        vec![WorkerOutput::Opened, WorkerOutput::Heartbeat]
    );
    assert!(s.is_open());
    s
}

#[test]
fn no_welcome_by_the_deadline_ends_the_session_as_lost_before_it_opened() {
    let mut s = hello();
    s.handle_timeout(t(4999));
    assert!(drain(&mut s).is_empty());
    s.handle_timeout(t(5000));
    assert_eq!(drain(&mut s), vec![WorkerOutput::Close { send_bye: false }]);
    assert!(matches!(
        s.ended(),
        Some(SessionEnd::Lost {
            connected: false,
            ..
        })
    ));
    assert_eq!(s.poll_timeout(), None);
    // Nothing after the end.
    s.handle_message(session(SessionMessage::Welcome), t(5001));
    assert!(drain(&mut s).is_empty());
}

#[test]
fn a_refused_hello_ends_with_the_primarys_reason() {
    let mut s = hello();
    s.handle_message(bye("revoked"), t(10));
    assert_eq!(drain(&mut s), vec![WorkerOutput::Close { send_bye: false }]);
    assert_eq!(s.ended(), Some(&SessionEnd::Bye(ByeReason::Revoked)));
    assert!(ByeReason::Revoked.is_permanent());
}

#[test]
fn anything_but_a_welcome_first_is_a_broken_primary_and_is_retried() {
    let mut s = hello();
    s.handle_message(command(), t(10));
    assert_eq!(drain(&mut s), vec![WorkerOutput::Close { send_bye: false }]);
    match s.ended() {
        Some(SessionEnd::Lost { connected, error }) => {
            assert!(!connected);
            assert!(error.contains("no welcome"), "{error}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn heartbeats_follow_the_interval_and_a_late_driver_gets_one_not_a_burst() {
    let mut s = open();
    assert_eq!(s.poll_timeout(), Some(t(1100)));
    s.handle_timeout(t(1099));
    assert!(drain(&mut s).is_empty());
    s.handle_timeout(t(1100));
    assert_eq!(drain(&mut s), vec![WorkerOutput::Heartbeat]);
    assert_eq!(s.poll_timeout(), Some(t(2100)));
    // Ten seconds late: one heartbeat, and the next a full interval on.
    s.handle_timeout(t(12_000));
    assert_eq!(drain(&mut s), vec![WorkerOutput::Heartbeat]);
    assert_eq!(s.poll_timeout(), Some(t(13_000)));
}

#[test]
fn commands_results_and_the_primarys_own_event_kinds_are_delivered_nothing_else() {
    let mut s = open();
    let cmd = command();
    s.handle_message(cmd.clone(), t(200));
    s.handle_message(event(crate::events::kinds::ACTION_UPDATED), t(201));
    // A primary cannot put an arbitrary kind on a worker's bus …
    s.handle_message(event("pairing.completed"), t(202));
    // … and a second welcome or a hello is not its to send.
    s.handle_message(session(SessionMessage::Welcome), t(203));
    s.handle_message(session(SessionMessage::Hello { token: [1; 32] }), t(204));
    assert_eq!(
        drain(&mut s),
        vec![
            WorkerOutput::Deliver(cmd),
            WorkerOutput::Deliver(event(crate::events::kinds::ACTION_UPDATED)),
        ]
    );
    assert!(s.is_open());
}

#[test]
fn a_rotated_token_is_acknowledged_only_once_stored() {
    let mut s = open();
    s.handle_message(
        session(SessionMessage::TokenRotated { token: [4; 32] }),
        t(300),
    );
    let out = drain(&mut s);
    assert_eq!(out.len(), 1);
    let WorkerOutput::StoreToken(token) = &out[0] else {
        panic!("{out:?}");
    };
    assert_eq!(token.expose(), &[4; 32]);
    // Never printed.
    assert!(!format!("{out:?}").contains("4, 4"));
    // A second rotation while the first is being stored is not started.
    s.handle_message(
        session(SessionMessage::TokenRotated { token: [5; 32] }),
        t(301),
    );
    assert!(drain(&mut s).is_empty());
    // Not stored: no acknowledgement (the primary keeps the old token).
    s.handle_token_stored(false);
    assert!(drain(&mut s).is_empty());
    // The primary tries again; this time it is stored and acknowledged.
    s.handle_message(
        session(SessionMessage::TokenRotated { token: [6; 32] }),
        t(400),
    );
    assert!(matches!(drain(&mut s)[..], [WorkerOutput::StoreToken(_)]));
    s.handle_token_stored(true);
    assert_eq!(
        drain(&mut s),
        vec![WorkerOutput::Send(session(SessionMessage::TokenStored {
            digest: SessionMessage::stored_digest(&[6; 32])
        }))]
    );
    // A stray report changes nothing.
    s.handle_token_stored(true);
    assert!(drain(&mut s).is_empty());
}

#[test]
fn the_end_is_the_primarys_bye_a_lost_connection_or_this_side_stopping() {
    let mut s = open();
    s.handle_message(bye("token_rotated"), t(500));
    assert_eq!(drain(&mut s), vec![WorkerOutput::Close { send_bye: false }]);
    assert_eq!(s.ended(), Some(&SessionEnd::Bye(ByeReason::TokenRotated)));
    assert!(!ByeReason::TokenRotated.is_permanent());

    let mut s = open();
    s.handle_lost("connection reset");
    assert_eq!(drain(&mut s), vec![WorkerOutput::Close { send_bye: false }]);
    assert!(matches!(
        s.ended(),
        Some(SessionEnd::Lost {
            connected: true,
            ..
        })
    ));

    let mut s = open();
    s.end();
    assert_eq!(drain(&mut s), vec![WorkerOutput::Close { send_bye: true }]);
    assert_eq!(s.ended(), Some(&SessionEnd::Bye(ByeReason::Shutdown)));
    // Ended once: a later loss does not rewrite why.
    s.handle_lost("closed");
    assert!(drain(&mut s).is_empty());
    assert_eq!(s.ended(), Some(&SessionEnd::Bye(ByeReason::Shutdown)));
    // Stopping before the welcome: no session to say goodbye to.
    let mut s = hello();
    s.end();
    assert_eq!(drain(&mut s), vec![WorkerOutput::Close { send_bye: false }]);
    assert_eq!(s.ended(), Some(&SessionEnd::Bye(ByeReason::Shutdown)));
    // An unknown reason from a newer primary arrives as such and is retried.
    let mut s = open();
    s.handle_message(bye("moved_to_mars"), t(600));
    assert_eq!(
        s.ended(),
        Some(&SessionEnd::Bye(ByeReason::Other("moved_to_mars".into())))
    );
    assert!(!ByeReason::Other("moved_to_mars".into()).is_permanent());
}
